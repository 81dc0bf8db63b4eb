"""The probe's training and evaluation rows: a typed object that owns the subset, the memory/solver
decision and the reads, and offers what selection, repeated CV and streaming need.

Why in heads: the searches read views of the training rows on demand (:meth:`TrainingRows.view`);
with the rows object defined here, nothing in heads calls up into the runs that drive it.  The
split itself is a :class:`featx.data.splits.Split`, computed once by the run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from ...base.errors import FeatxError
from ...cache.rows import read_rows
from ...cache.store import FeatureCache
from ...cache.trust.integrity import rows_text
from ...data.splits import Split
from .cv import GroupedViewFolds
from .memory import check_memory, stratified_subset
from .solver_choice import use_stream

log = logging.getLogger(__name__)


@dataclass
class TrainingRows:
    """Training and evaluation features read from a cache, with where they came from.

    ``tr``/``ev``: cache rows (sorted); ``X_tr``/``X_ev`` their final features (``X_tr`` None when
    streaming); ``split``: the run's :class:`Split` they were taken from."""

    X_tr: np.ndarray | None  # None when streaming (the heads read the training rows themselves)
    y_tr: np.ndarray
    tr: np.ndarray
    X_ev: np.ndarray
    y_ev: np.ndarray
    ev: np.ndarray
    split_desc: dict
    load_seconds: float
    subset: dict | None
    fc: FeatureCache | None = None
    stream: bool = False
    split: Split | None = None  # training rows are not held: heads read them block by block (featx.heads.stream.linear)
    # The last other view (or augmented rows) read: at most one is held beside the final features,
    # so choosing among views needs memory for two, not for all of them.
    by_view: dict = field(default_factory=dict)

    def _held(self, key, read):
        if key not in self.by_view:
            self.by_view.clear()
            self.by_view[key] = read()
        return self.by_view[key]

    def augmented(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Features of view ``name`` of the training rows' augmented views, and their row in ``X_tr``."""
        def read():
            X, src = self.fc.augmented(self.tr, view=name)
            return X, np.searchsorted(self.tr, src)  # tr is sorted

        return self._held(("augmented", name), read)

    def training(self, name: str, train_views: int, *, folds: int, seed: int):
        """(X, y, folds) to fit on: the plain training rows, plus their augmented views with
        folds grouped by image (:class:`featx.heads.tuning.cv.GroupedViewFolds`) when asked."""
        X_tr = self.view(name)[0]
        if not train_views:
            return X_tr, self.y_tr, folds
        X_aug, src = self.augmented(name)
        grouped = GroupedViewFolds(folds, random_state=seed, n_plain=len(X_tr), source=src)
        return np.vstack([X_tr, X_aug]), np.concatenate([self.y_tr, self.y_tr[src]]), grouped

    def view(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Training and evaluation features of view ``name`` (``final``: the cache's features)."""
        if name == "final":
            return self.X_tr, self.X_ev
        def read():
            splits = self.fc.split_array()
            X_tr = None if self.stream else read_rows(self.fc, self.tr, splits, view=name)
            return X_tr, read_rows(self.fc, self.ev, splits, view=name)

        return self._held(name, read)


def _drop_non_finite(X: np.ndarray, y: np.ndarray, idx: np.ndarray, what: str, name: str):
    bad = ~np.isfinite(X).all(axis=1)
    if not bad.any():
        return X, y, idx
    log.warning(
        "%d %s rows of %s have NaN/inf features and are left out (cache rows %s); rebuild the cache with "
        "`featx embed ... --dtype float32 --overwrite`", int(bad.sum()), what, name, rows_text(idx[bad]),
    )
    return X[~bad], y[~bad], idx[~bad]


def _subset(tr: np.ndarray, labels: np.ndarray, max_train_rows: int | None, seed: int) -> tuple[np.ndarray, dict | None]:
    if max_train_rows is None:
        return tr, None
    kept = stratified_subset(tr, labels[tr], int(max_train_rows), seed=seed)
    if len(kept) == len(tr):
        return tr, None
    log.info("training on a stratified subset of %d of %d training rows", len(kept), len(tr))
    return kept, {"max_train_rows": int(max_train_rows), "n_available": int(len(tr)), "n_used": int(len(kept)),
                  "stratified": True, "seed": seed}


def load_rows(fc: FeatureCache, split: Split, *, max_train_rows: int | None, dim: int, seed: int = 0,
              exclude: dict | None = None, solver: str = "memory", linear: bool = True) -> TrainingRows:
    """Leave out ``exclude`` rows of ``split``, subset (``max_train_rows``), check memory, then read block by block.

    With a streaming solver (asked, or ``auto`` and the training rows do not fit) only the
    evaluation rows are read; the heads stream the training rows themselves."""
    t0 = time.perf_counter()
    labels, splits = fc.labels(), fc.split_array()
    split.check_rows(len(labels), what=f"cache {fc.path.name}")
    tr, ev, split_desc = split.train, split.eval, dict(split.desc)
    if exclude:  # featx probe --drop-flagged: rows the audit flagged (the split itself is unchanged)
        tr, ev = np.setdiff1d(tr, exclude.get("train", [])), np.setdiff1d(ev, exclude.get("eval", []))
        split_desc = dict(split_desc, excluded={k: int(len(v)) for k, v in exclude.items()})
    if not len(ev):
        raise FeatxError(f"cache {fc.path.name} leaves no rows to evaluate on; add a val/ split or raise --test-size")
    tr, subset = _subset(tr, labels, max_train_rows, seed)
    stream = use_stream(solver, n_train=len(tr), n_eval=len(ev), dim=dim, n_classes=len(fc.classes), linear=linear)
    mem = check_memory(0 if stream else len(tr), len(ev), dim, len(fc.classes), cache_name=fc.path.name)
    log.info("probe memory: about %.0f MiB needed%s", mem["needed_bytes"] / 2**20,
             f" (streaming {len(tr):,} training rows)" if stream else "")
    if stream:
        X_tr, y_tr = None, labels[tr]
    else:
        X_tr, y_tr, tr = _drop_non_finite(read_rows(fc, tr, splits), labels[tr], tr, "training", fc.path.name)
    X_ev, y_ev, ev = _drop_non_finite(read_rows(fc, ev, splits), labels[ev], ev, "evaluation", fc.path.name)
    return TrainingRows(X_tr, y_tr, tr, X_ev, y_ev, ev, split_desc, time.perf_counter() - t0, subset, fc, stream, split=split)


def held_dim(fc: FeatureCache, cands: list) -> int:
    """Feature columns per training row held at once: the final features and one other view (the
    widest), which an augmented fit holds 1 + K times (plain rows, their views, and the stack of both)."""
    other = max((fc.view_dim(v) for v, _, _ in cands if v != "final"), default=0)
    k = max(k for _, _, k in cands)
    return fc.dim + other + (2 * (1 + k) * max(other, fc.dim) if k else 0)
