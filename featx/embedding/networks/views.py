"""Feature views from one pass of the frozen backbone.

Besides the final pooled features (what a cache has always held), one forward pass can keep:

- ``stages``: the average-pooled outputs of the two stages before the final feature map (timm's
  ``forward_intermediates``, torchvision's feature extractor); the probe's ``multi2``/``multi3``
  views concatenate them, each L2-normalised, with the final features.
- ``gem``: generalised-mean pooling (p=3) of the final feature map, a second pooling.
- ``--tta flip``: every part also averaged over the image and its mirror (a second pass of the
  network on the same decoded batch), stored beside the plain parts so the probe can choose.

The network is wrapped in :class:`ViewNet`, whose single output is all parts side by side
(``Backbone.layout`` names the columns): every engine and runtime (torch, OpenVINO, the GPU
path, Ray actors) runs it unchanged, and the chunk writer splits the columns into parts.
With only ``final`` and no TTA the backbone is not wrapped at all: the features, and the cache
fingerprint, are those of caches written before views existed.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
from torch import nn

from ...base.choices import TTAS
from ...base.errors import FeatxError
from ...cache.views import FLIP_PREFIX

PARTS = ("final", "stages", "gem")
GEM_P = 3.0


def parse_parts(views: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"final,stages"`` -> ("final", "stages"): known names, ``final`` always first."""
    if views is None:
        return ("final",)
    names = [v.strip() for v in (views.split(",") if isinstance(views, str) else views) if v and v.strip()]
    bad = [v for v in names if v not in PARTS]
    if bad:
        raise FeatxError(f"--views {','.join(names)!s}: unknown part(s) {', '.join(bad)}; choose from "
                         f"{', '.join(PARTS)} (comma list; final is always stored)")
    return ("final",) + tuple(p for p in PARTS[1:] if p in names)


def check_tta(tta: str | None) -> str:
    t = (tta or "none").lower()
    if t not in TTAS:
        raise FeatxError(f"--tta {tta!r}: expected one of {', '.join(TTAS)}")
    return t


def views_fingerprint(parts: Sequence[str], tta: str) -> dict:
    """Cache-fingerprint entries of the stored parts: none for the plain final features."""
    if tuple(parts) == ("final",) and tta == "none":
        return {}
    return {"views": ",".join(parts), "tta": tta}


class ViewNet(nn.Module):
    """``x -> [B, sum of part widths]``: the final features, then the requested extra parts.

    ``stage_net(x)`` returns (pooled final features, [stage maps], final feature map).
    """

    def __init__(self, stage_net: nn.Module, parts: Sequence[str], tta: str) -> None:
        super().__init__()
        self.stage_net = stage_net
        self.parts = tuple(parts)
        self.tta = tta

    def _one(self, x: torch.Tensor) -> torch.Tensor:
        pooled, stages, fmap = self.stage_net(x)
        cols = [pooled.float().flatten(1)]
        if "stages" in self.parts:
            cols += [s.float().mean(dim=(2, 3)) for s in stages]
        if "gem" in self.parts:
            cols.append(fmap.float().clamp(min=1e-6).pow(GEM_P).mean(dim=(2, 3)).pow(1.0 / GEM_P))
        return torch.cat(cols, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._one(x)
        if self.tta == "flip":
            y = torch.cat([y, (y + self._one(torch.flip(x, dims=[3]))) / 2], dim=1)
        return y


def _part_names(parts: Sequence[str], n_stages: int) -> list[str]:
    names = ["features"]
    if "stages" in parts:
        names += [f"stage{i + 1}" for i in range(n_stages)]
    if "gem" in parts:
        names.append("gem")
    return names


def with_views(backbone, views: str | Sequence[str] | None = None, tta: str | None = None):
    """``backbone`` whose model outputs every requested part (itself when only ``final``, no TTA).

    The returned backbone's ``layout`` is ((part, width), ...) in column order, its fingerprint
    names the parts and the TTA, and ``out_dim`` is the total width.
    """
    parts, tta = parse_parts(views), check_tta(tta)
    if parts == ("final",) and tta == "none":
        return backbone
    if backbone.stage_net is None:
        raise FeatxError(f"backbone {backbone.name!r} cannot give its stage outputs; embed with --views final")
    net = ViewNet(backbone.stage_net(backbone.model), parts, tta).eval()
    crop = backbone.preprocess.crop
    with torch.inference_mode():
        pooled, stages, fmap = net.stage_net(torch.zeros(1, 3, crop, crop))
    widths = [int(pooled.flatten(1).shape[1])]
    widths += [int(s.shape[1]) for s in stages] if "stages" in parts else []
    widths += [int(fmap.shape[1])] if "gem" in parts else []
    names = _part_names(parts, len(stages))
    layout = tuple(zip(names, widths))
    if tta == "flip":
        layout += tuple((FLIP_PREFIX + n, w) for n, w in zip(names, widths))
    for p in net.parameters():
        p.requires_grad_(False)
    return dataclasses.replace(backbone, model=net, parts=parts, tta=tta, layout=layout)
