"""The network half of an exported model (``featx export-model``): uint8 NHWC images -> a feature view.

:class:`ViewFeatures` does in one module what featx does between a decoded, resized and cropped image and
the row a head reads: scale to [0, 1] and normalise with the backbone's own mean and std
(:func:`featx.embedding.networks.eval_ops.normalize`), the frozen network with the parts the view needs
(:class:`~featx.embedding.networks.views.ViewNet`: stages, GeM, the mirrored pass), and the view's
composition (:func:`featx.cache.views.compose`: each part L2-normalised when the view concatenates several).
:class:`SetFeatures` is a cache set's ``VIEW@A+B`` (:func:`featx.cache.multi.compose_multi`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..cache.views import RECIPES, parts_for, view_blocks
from .backbones import create_backbone


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / torch.clamp(torch.linalg.vector_norm(x, dim=1, keepdim=True), min=1e-12)


class ViewFeatures(nn.Module):
    """uint8 ``[N, H, W, 3]`` -> float32 ``[N, dim]``: the ``view`` of backbone ``bb`` (built with its parts)."""

    def __init__(self, bb, view: str) -> None:
        super().__init__()
        self.model = bb.model
        pre = bb.preprocess
        self.register_buffer("mean", torch.tensor(pre.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(pre.std, dtype=torch.float32).view(1, 3, 1, 1))
        offsets, a = {}, 0
        for name, width in (bb.layout or (("features", bb.dim),)):
            offsets[name] = a
            a += width
        self.blocks = [(offsets[p], w) for p, w in view_blocks(view, bb.widths)]
        self.l2 = RECIPES[view.removesuffix("+flip")][1]

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image.permute(0, 3, 1, 2).to(torch.float32) * (1.0 / 255)
        y = self.model((x - self.mean) / self.std).float()
        cols = [y[:, a : a + w] for a, w in self.blocks]
        if len(cols) == 1 and not self.l2:
            return cols[0]
        return torch.cat([_unit(c) for c in cols], dim=1)


class SetFeatures(nn.Module):
    """A cache set's view: one member's view as is, several each L2-normalised side by side."""

    def __init__(self, members: list[ViewFeatures]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        outs = [m(image) for m in self.members]
        return outs[0] if len(outs) == 1 else torch.cat([_unit(o) for o in outs], dim=1)


class ExportGraph(nn.Module):
    """``image -> (probabilities, label)``: a features module, then a head module."""

    def __init__(self, features: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.features = features
        self.head = head

    def forward(self, image: torch.Tensor):
        return self.head(self.features(image))


def view_features(name: str, view: str, *, weights=None):
    """(:class:`ViewFeatures`, its Backbone) for backbone ``name`` and a plain (one-backbone) ``view``."""
    parts, tta = parts_for(view)
    bb = create_backbone(name, weights=weights, views=parts, tta=tta)
    return ViewFeatures(bb, view).eval(), bb
