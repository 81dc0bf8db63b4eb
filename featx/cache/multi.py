"""Several backbones' caches of one data set, read as one cache whose views name their backbone.

``featx embed DATA --backbone efficientnet_lite0,efficientnet_lite2`` writes one ordinary cache
per backbone (each resumable, shardable, Ray-embeddable on its own) and then this small JSON
*set file* beside them, ``<dataset>-<hash>__<a>+<b>.multi.json``, naming the member caches and
their fingerprints.  :class:`MultiCache` opens it and offers, besides each member's views,
the concatenation of the members (each member's view L2-normalised):

- ``VIEW@BACKBONE``: ``VIEW`` of one member (``final@efficientnet_lite2``, ``multi2@...``);
- ``VIEW@A+B``: L2(``VIEW`` of A) ⊕ L2(``VIEW`` of B).

Candidates are ordered simplest first: the first member's views, the next member's, then the
concatenations.  Members must hold the same images in the same order (they do when embedded by
one command); anything else is refused with the command that fixes it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..base.errors import FeatxError
from ..base.files import open_regular
from ..base.io import write_json
from .identity import CacheIdentity, identity_of
from .keys import MULTI_SUFFIX, fingerprint_digest  # noqa: F401 - MULTI_SUFFIX re-exported
from .reader import FeatureCache, find_cache
from .views import l2_rows, view_blocks

AT, JOIN = "@", "+"
SET_VERSION = 1
# A set file names a few backbones (each member is a whole cache opened and checked); a stranger's file
# naming thousands would take minutes to open, and one of megabytes is no set file featx wrote.
MAX_MEMBERS = 16
MAX_SET_BYTES = 1 << 20


def is_multi_view(view: str | None) -> bool:
    return bool(view) and AT in str(view)


def split_view(view: str) -> tuple[str, list[str]]:
    """``multi2@a+b`` -> ("multi2", ["a", "b"])."""
    base, _, members = str(view).rpartition(AT)
    names = [m for m in members.split(JOIN) if m]
    if not base or not names:
        raise FeatxError(f"--view {view!r}: expected VIEW@BACKBONE or VIEW@BACKBONE+BACKBONE, e.g. final@efficientnet_lite2")
    return base, names


def compose_multi(view: str, get: Callable[[str, str], np.ndarray]) -> np.ndarray:
    """The array of multi view ``view`` from ``get(backbone, base view)``: one member as is, several L2 ⊕ L2."""
    base, names = split_view(view)
    if len(names) == 1:
        return np.asarray(get(names[0], base), dtype=np.float32)
    return np.hstack([l2_rows(np.asarray(get(n, base), dtype=np.float32)) for n in names]).astype(np.float32, copy=False)


def set_path(first_member: Path, backbones: list[str]) -> Path:
    """``<dataset>-<hash>__<a>+<b>.multi.json`` beside the first member cache."""
    stem = first_member.name.split("__", 1)[0]
    slug = JOIN.join(b.replace(":", "-").replace("/", "-") for b in backbones)
    return first_member.with_name(f"{stem}__{slug}{MULTI_SUFFIX}")


def write_set(members: list[FeatureCache]) -> Path:
    """Write (atomically) the set file naming ``members``; returns its path."""
    names = [str(fc.meta.get("backbone")) for fc in members]
    if len(set(names)) != len(names):
        raise FeatxError(f"--backbone {','.join(names)}: name each backbone once")
    path = set_path(members[0].path, names)
    doc = {"featx_multi_cache": SET_VERSION, "members": [
        {"backbone": n, "cache": os.path.relpath(fc.path, path.parent), "fingerprint": fc.fingerprint}
        for n, fc in zip(names, members)]}
    write_json(path, doc)
    return path


def read_members(path: Path) -> list[tuple[str, str, str]]:
    """(backbone, cache path relative to the set file, fingerprint) of each member, checked before any is opened:
    1 to :data:`MAX_MEMBERS` entries of three strings, distinct names; anything else is one line naming the file."""
    def refuse(why: str) -> FeatxError:
        return FeatxError(f"cache set {str(path)!r} cannot be read ({why}); rerun `featx embed DATA --backbone A,B` "
                          "to write it again")

    try:
        with open_regular(path) as fh:  # a FIFO would block the open for ever
            raw = fh.read(MAX_SET_BYTES + 1)
        if len(raw) > MAX_SET_BYTES:
            raise refuse(f"larger than {MAX_SET_BYTES >> 20} MiB; a set file names a few member caches")
        doc = json.loads(raw.decode("utf-8"))
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise refuse(str(exc)) from None
    except RecursionError:
        raise refuse("nested too deeply to be a set file") from None
    members = doc.get("members") if isinstance(doc, dict) else None
    if not isinstance(members, list) or not members:
        raise refuse('no "members" list, or an empty one')
    if len(members) > MAX_MEMBERS:
        raise refuse(f"{len(members)} members; a set holds at most {MAX_MEMBERS}")
    keys = ("backbone", "cache", "fingerprint")
    bad = next((i for i, m in enumerate(members)
                if not (isinstance(m, dict) and all(isinstance(m.get(k), str) and m.get(k) for k in keys))), None)
    if bad is not None:
        raise refuse(f"member {bad} is not a mapping of {', '.join(keys)} (non-empty strings)")
    names = [m["backbone"] for m in members]
    if len(set(names)) != len(names):
        raise refuse("a backbone is named twice")
    return [(m["backbone"], m["cache"], m["fingerprint"]) for m in members]


class MultiCache:
    """Read access to a set of member caches as one cache (the probe, predict and export use it)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        entries = read_members(self.path)
        self.members: dict[str, FeatureCache] = {}
        for name, rel, fp in entries:
            fc = FeatureCache(self.path.parent / rel)
            if fc.fingerprint != fp:
                raise FeatxError(f"cache set {self.path.name}: member {fc.path.name} was rebuilt since the set was "
                                 "written; rerun `featx embed DATA --backbone ...` with the same backbones")
            self.members[name] = fc
        self._check_aligned()
        self.first = next(iter(self.members.values()))
        self.classes, self.dim, self.part_widths = self.first.classes, self.first.dim, self.first.part_widths
        self.meta = {**self.first.meta, "backbone": self.backbone}
        self.train_views = 0

    def _check_aligned(self) -> None:
        ref = None
        for name, fc in self.members.items():
            here = (fc.keys(), fc.classes, list(fc.labels()), list(fc.split_array()))
            if ref is not None and here != ref[1]:
                raise FeatxError(f"cache set {self.path.name}: {name}'s cache holds other images or labels than "
                                 f"{ref[0]}'s; embed both again with one `featx embed DATA --backbone ...`")
            ref = ref or (name, here)

    # -- what FeatureCache offers
    @property
    def backbone(self) -> str:
        return JOIN.join(self.members)

    def __len__(self) -> int:
        return len(self.first)

    @property
    def splits(self) -> list[str]:
        return self.first.splits

    @property
    def root(self) -> str:
        return self.first.root

    @property
    def failed(self) -> list[tuple[str, str]]:
        return self.first.failed

    @property
    def embedding_settings(self) -> str:
        return fingerprint_digest(self.embedding_settings_dict)

    @property
    def embedding_settings_dict(self) -> dict:
        return {"members": {n: fc.embedding_settings_dict for n, fc in self.members.items()}}

    fingerprint = embedding_settings  # the older names
    fingerprint_dict = embedding_settings_dict

    @property
    def identity(self) -> CacheIdentity:
        """The members' shared rows (checked aligned) and the set's embedding settings."""
        return identity_of(self)

    @property
    def views(self) -> list[str]:
        """Each member's views, then the concatenations of the views every member has."""
        out = [f"{v}{AT}{n}" for n, fc in self.members.items() for v in fc.views]
        common = [v for v in self.first.views if all(v in fc.views for fc in self.members.values())]
        return out + [f"{v}{AT}{JOIN.join(self.members)}" for v in common] if len(self.members) > 1 else out

    def _check(self, view: str | None) -> str:
        v = view or self.views[0]
        if v not in self.views:
            raise FeatxError(f"view {v!r} is not in cache set {self.path.name} (it has: {', '.join(self.views)})")
        return v

    def view_dim(self, view: str | None = None) -> int:
        base, names = split_view(self._check(view))
        return sum(self.members[n].view_dim(base) for n in names)

    def view_layout(self, view: str | None) -> list[tuple[tuple, float, tuple[int, int]]]:
        """Gram blocks (key, weight, columns) of ``view``: see :mod:`featx.heads.tuning.repeated_cv`."""
        base, names = split_view(self._check(view))
        out, at = [], 0
        for n in names:
            blocks = view_blocks(base, self.members[n].part_widths)
            w = 1.0 if len(names) == 1 else 1.0 / len(blocks)  # L2 of the member's view scales each part
            for part, width in blocks:
                out.append(((n, part), w, (at, at + width)))
                at += width
        return out

    def features(self, split: str | None = None, *, view: str | None = None, dtype=np.float32) -> np.ndarray:
        v = self._check(view)
        return compose_multi(v, lambda n, b: self.members[n].features(split, view=b)).astype(dtype, copy=False)

    def iter_features(self, split: str | None = None, *, rows: int = 65536, view: str | None = None
                      ) -> Iterator[np.ndarray]:
        base, names = split_view(self._check(view))
        its = {n: self.members[n].iter_features(split, rows=rows, view=base) for n in names}
        for blocks in zip(*its.values()):
            got = dict(zip(names, blocks))
            yield compose_multi(self._check(view), lambda n, b, got=got: got[n])

    def augmented(self, rows=None, *, view=None, block_rows: int = 65536):
        raise FeatxError(f"cache set {self.path.name} has no augmented training views; probe a member cache for them")

    def labels(self, split: str | None = None) -> np.ndarray:
        return self.first.labels(split)

    def keys(self, split: str | None = None) -> list[str]:
        return self.first.keys(split)

    def paths(self, split: str | None = None) -> list[str]:
        return self.first.paths(split)

    def split_array(self) -> np.ndarray:
        return self.first.split_array()

    def summary(self) -> dict:
        s = self.first.summary()
        return {**s, "path": str(self.path), "backbone": self.backbone, "views": self.views,
                "weights_source": {n: fc.meta.get("weights_source") for n, fc in self.members.items()},
                "preprocess": {n: fc.meta.get("preprocess") for n, fc in self.members.items()},
                "fingerprint": self.fingerprint, "embedding_settings": self.embedding_settings,
                "identity": self.identity.to_dict(), "members": {n: str(fc.path) for n, fc in self.members.items()},
                "dims": {n: fc.summary()["dim"] for n, fc in self.members.items()},
                "size_bytes": sum(fc.path.stat().st_size for fc in self.members.values())}

    def check_compatible(self, fingerprint: dict, *, what: str = "requested settings") -> None:
        if fingerprint != self.fingerprint_dict:
            raise FeatxError(f"cache set {self.path.name} was written with other settings than the {what}")


def view_layout(fc, view: str) -> list[tuple[tuple, float, tuple[int, int]]]:
    """Gram blocks of ``view`` of a cache or cache set (each block is one stored part)."""
    if isinstance(fc, MultiCache):
        return fc.view_layout(view)
    out, at = [], 0
    for part, width in view_blocks(view, fc.part_widths):
        out.append((("", part), 1.0, (at, at + width)))
        at += width
    return out


def open_cache(cache, *, cache_dir: str | os.PathLike = "cache"):
    """A FeatureCache or MultiCache: ``cache`` itself, a path to either, or the newest of both in ``cache_dir``."""
    if isinstance(cache, (FeatureCache, MultiCache)):
        return cache
    p = find_cache(cache, cache_dir=cache_dir)
    return MultiCache(p) if p.name.endswith(MULTI_SUFFIX) else FeatureCache(p)


def open_single_cache(cache, *, cache_dir: str | os.PathLike = "cache", what: str) -> FeatureCache:
    """One backbone's cache for ``what`` (fine-tuning, the audit...): a cache set is refused with its members named."""
    fc = open_cache(cache, cache_dir=cache_dir)
    if isinstance(fc, MultiCache):
        members = ", ".join(str(m.path) for m in fc.members.values())
        raise FeatxError(f"{what} reads one backbone's cache, and {fc.path.name} is a cache set of several; "
                         f"pass one of its members instead: {members}")
    return fc
