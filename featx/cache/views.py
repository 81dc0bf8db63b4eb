"""Feature views: how the parts a cache stores combine into the arrays heads train on.

A cache always stores ``features`` (the final pooled features); caches embedded with
``--views stages`` / ``gem`` / ``--tta flip`` also store the parts of
:mod:`featx.embedding.networks.views`.  Views are built from them when read, so one cache serves every
view and the probe can choose among them by cross-validation:

- ``final``: the final pooled features (the only view of caches written before views existed);
- ``multi2``: L2(last stage before the final map) ⊕ L2(final);
- ``multi3``: L2(the two stages before it) ⊕ L2(final);
- ``gem``: GeM-pooled final map;
- ``<view>+flip``: the same from the parts averaged over the image and its mirror.

Multi-stage parts are L2-normalised one by one so that no stage dominates by its scale
(as in the study behind ACCURACY.md).
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

from ..base.errors import FeatxError

FLIP = "+flip"
FLIP_PREFIX = "flip_"
# view -> (parts, L2-normalise each part before concatenating)
RECIPES: dict[str, tuple[tuple[str, ...], bool]] = {
    "final": (("features",), False),
    "multi2": (("stage2", "features"), True),
    "multi3": (("stage1", "stage2", "features"), True),
    "gem": (("gem",), False),
}
DEFAULT_VIEW = "final"


def _recipe(view: str) -> tuple[tuple[str, ...], bool]:
    base, flip = (view[: -len(FLIP)], True) if view.endswith(FLIP) else (view, False)
    if base not in RECIPES:
        raise FeatxError(f"--view {view!r}: unknown view; views are {', '.join(RECIPES)} (and <view>{FLIP})")
    parts, l2 = RECIPES[base]
    return tuple(FLIP_PREFIX + p for p in parts) if flip else parts, l2


def available_views(part_names: Iterable[str]) -> list[str]:
    """Views that can be built from the stored ``part_names`` (``final`` first)."""
    have = set(part_names)
    out = [v for v in RECIPES if set(RECIPES[v][0]) <= have]
    out += [v + FLIP for v in RECIPES if {FLIP_PREFIX + p for p in RECIPES[v][0]} <= have]
    return out


def check_view(view: str | None, views: list[str], *, where: str) -> str:
    """``view`` (default ``final``) if ``views`` has it, else a FeatxError that lists them."""
    v = view or DEFAULT_VIEW
    _recipe(v)
    if v not in views:
        raise FeatxError(f"view {v!r} is not in {where} (it has: {', '.join(views)}); embed with --views stages,gem "
                         "(and --tta flip for +flip views), or choose one of those")
    return v


def parts_for(view: str | None) -> tuple[str, str]:
    """(``--views``, ``--tta``) an embedding needs to give ``view``: e.g. multi3+flip -> ("final,stages", "flip")."""
    v = view or DEFAULT_VIEW
    parts, _ = _recipe(v)
    need = ["final"] + (["stages"] if any(p.startswith(("stage", FLIP_PREFIX + "stage")) for p in parts) else [])
    need += ["gem"] if any(p.endswith("gem") for p in parts) else []
    return ",".join(need), ("flip" if v.endswith(FLIP) else "none")


def view_dim(view: str, widths: dict[str, int]) -> int:
    return sum(widths[p] for p in _recipe(view)[0])


def l2_rows(X: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (all-zero rows stay zero): how every concatenated view weighs its parts."""
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


def compose(view: str, get: Callable[[str], np.ndarray]) -> np.ndarray:
    """The ``view`` array from ``get(part)`` (float32 [n, width] per stored part)."""
    parts, l2 = _recipe(view)
    arrays = [np.asarray(get(p), dtype=np.float32) for p in parts]
    if len(arrays) == 1 and not l2:
        return arrays[0]
    return np.hstack([l2_rows(a) for a in arrays]).astype(np.float32, copy=False)


def compose_from(view: str, parts: dict[str, np.ndarray]) -> np.ndarray:
    """:func:`compose` from a dict of part arrays (an extractor's or a chunk's)."""
    missing = [p for p in _recipe(view)[0] if p not in parts]
    if missing:
        raise FeatxError(f"view {view!r} needs the part(s) {', '.join(missing)}, which were not embedded; "
                         "embed with --views stages,gem (and --tta flip for +flip views)")
    return compose(view, parts.__getitem__)


def view_blocks(view: str, widths: dict[str, int]) -> list[tuple[str, int]]:
    """(part, width) of the column blocks of ``view``, in column order (each block is one stored part)."""
    return [(p, widths[p]) for p in _recipe(view)[0]]
