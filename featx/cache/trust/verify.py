"""``featx verify [CACHE]``: read a whole cache and say whether it is safe and undamaged.

Why: corruption is silent until a head trains on it.  Opening a cache already refuses files
that read other files and shapes the file cannot hold (:mod:`featx.cache.trust.integrity`); this
reads every feature row against its checksum and for NaN/inf, in blocks, so a cache of any
size is checked in bounded memory.  :func:`forget_damaged` lets ``featx embed`` embed the
damaged rows of a finished cache again.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field

import h5py
import numpy as np

from ..store import FeatureCache
from .integrity import checksum_table, damage_message, feature_datasets, read_everything, rows_text, scan_damage

BLOCK_ROWS = 65536
log = logging.getLogger(__name__)


@dataclass
class VerifyResult:
    """What ``featx verify`` found; ``ok`` is False when any feature row fails its checksum."""

    path: str
    rows: int
    datasets: list[str]
    checksums: str  # "verified", "absent" (written before checksums) or "partial"
    damaged: dict[str, str] = field(default_factory=dict)  # dataset -> the rows that fail, as text
    non_finite_rows: int = 0
    non_finite_examples: list[str] = field(default_factory=list)
    failed_images: int = 0

    @property
    def ok(self) -> bool:
        return not self.damaged

    def to_dict(self) -> dict:
        return dict(asdict(self), ok=self.ok)


def _non_finite(fc: FeatureCache) -> tuple[int, list[str]]:
    count, examples = 0, []
    with h5py.File(fc.path, "r") as f:
        d = f["features"]
        for a in range(0, len(fc), BLOCK_ROWS):
            bad = np.flatnonzero(~np.isfinite(np.asarray(d[a : a + BLOCK_ROWS], np.float32)).all(axis=1)) + a
            count += len(bad)
            if len(examples) < 5 and len(bad):
                keys = fc.keys()
                examples += [f"row {int(r)} ({keys[int(r)]})" for r in bad[: 5 - len(examples)]]
    return count, examples


def verify_cache(path: str | os.PathLike) -> VerifyResult:
    """Check ``path`` in full (structure, shapes, every checksum, NaN/inf); raises FeatxError if it cannot open."""
    fc = FeatureCache(path)  # refuses external storage, links, virtual datasets, inconsistent shapes
    with h5py.File(fc.path, "r") as f:
        read_everything(f, fc.path)  # everything any command reads (keys, failures, labels, ...): HDF5 can read it
        names = feature_datasets(f)
        have = [checksum_table(f, n) is not None for n in names]
        damage = scan_damage(f, block_rows=BLOCK_ROWS)
    state = "verified" if all(have) else ("absent" if not any(have) else "partial")
    count, examples = _non_finite(fc)
    return VerifyResult(
        path=str(fc.path), rows=len(fc), datasets=names, checksums=state,
        damaged={k: rows_text(v) for k, v in damage.items()},
        non_finite_rows=count, non_finite_examples=examples, failed_images=len(fc.failed),
    )


def forget_damaged(fc: FeatureCache, index: dict[str, tuple]) -> int:
    """Drop from ``index`` (:func:`featx.cache.store.read_final_index`) the rows that fail their checksums,
    so that ``featx embed`` embeds them again; returns how many were dropped."""
    with h5py.File(fc.path, "r") as f:
        damage = scan_damage(f, block_rows=BLOCK_ROWS)
    if not damage:
        return 0
    rows: dict[str, set[int]] = {"final": set(), "final_aug": set()}
    for name, bad in damage.items():
        rows["final_aug" if name.startswith("augmented/") else "final"].update(int(r) for r in bad)
    gone = [k for k, e in index.items() if e[0] in rows and e[1] in rows[e[0]]]
    for k in gone:
        del index[k]
    name, bad = next(iter(damage.items()))
    log.warning("%s; embedding those %d images again", damage_message(fc.path, name, bad), len(gone))
    return len(gone)
