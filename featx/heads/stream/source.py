"""Training rows read block by block, for heads that never hold a whole feature matrix.

Why: a cache bigger than memory must still train a head on all of its rows.  A
:class:`CacheSource` reads a view of the training rows from the HDF5 file in contiguous pieces
(about one storage chunk each), gathers pieces in a random order into blocks of bounded size
and shuffles each block, so that class-sorted caches (ImageFolder order) still give mixed
minibatches.  :func:`prefetch` reads the next block on a background thread while the current
one trains.  :class:`ArraySource` gives the same interface over an in-memory array (tests, the
scikit-learn ``fit(X, y)`` contract).
"""

from __future__ import annotations

import contextlib
import queue
import threading
from typing import Iterator

import numpy as np
from sklearn.utils.multiclass import check_classification_targets

from ..estimators.norms import FeatureNorm
from ..tuning.cv import cv_splits
from ..tuning.memory import available_bytes

# Rows per contiguous read (a storage chunk of the cache is ~1 MiB of rows) and bytes per block
# (float32): two blocks are in memory at once, the one training and the one being read.
PIECE_ROWS = 512
BLOCK_BYTES = 64 << 20
# How every streamed head (the linear heads' C, kNN's k) is chosen: k-fold CV up to KFOLD_MAX_ROWS training
# rows (plus a refit on all rows), above it a stratified held-out slice of HOLDOUT_FRACTION of them, at most
# HOLDOUT_MAX_ROWS rows (a held-out row costs a linear head one product per C; the kNN caps its held-out
# queries lower, at featx.heads.stream.knn.HOLDOUT_MAX_QUERIES, as each query is a pass over every row).
KFOLD_MAX_ROWS = 20_000
HOLDOUT_FRACTION = 0.1
HOLDOUT_MAX_ROWS = 50_000


class ArraySource:
    """Training rows held in memory (``X`` [n, d]); ``norm``: a row normalisation of :data:`NORMS`."""

    def __init__(self, X: np.ndarray, *, norm: str = "none") -> None:
        self.X = X
        self.norm = norm
        self.n, self.dim = int(X.shape[0]), int(X.shape[1])

    def read(self, a: int, b: int) -> np.ndarray:
        """Rows [a, b) of the training rows as float32 (normalised)."""
        return _normalised(np.asarray(self.X[a:b], dtype=np.float32), self.norm)


class CacheSource:
    """The training rows ``rows`` (sorted global row numbers) of a cache's ``view``, read on demand."""

    def __init__(self, fc, rows: np.ndarray, *, view: str = "final", norm: str = "none") -> None:
        self.fc, self.rows, self.view, self.norm = fc, np.asarray(rows, np.int64), view, norm
        self.n, self.dim = len(self.rows), int(fc.view_dim(view))
        self._files = contextlib.ExitStack()
        self._read = None

    def read(self, a: int, b: int) -> np.ndarray:
        """Training rows [a, b): the contiguous span of the cache that holds them, then those rows."""
        if self._read is None:  # the file stays open between pieces (h5py serialises access across threads)
            self._read = self._files.enter_context(self.fc.reader(self.view))
        lo, hi = int(self.rows[a]), int(self.rows[b - 1]) + 1
        return _normalised(self._read(lo, hi)[self.rows[a:b] - lo], self.norm)

    def close(self) -> None:
        self._read = None
        self._files.close()


def training_source(X, y) -> tuple:
    """(row source, classes, label index of each row) of a streamed head's ``fit(X, y)``: ``X`` a source or an array."""
    source = X if hasattr(X, "read") else ArraySource(np.asarray(X, dtype=np.float32))
    y = np.asarray(y)
    check_classification_targets(y)
    if len(y) != source.n:
        raise ValueError(f"X has {source.n} rows but y has {len(y)}")
    classes, yi = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise ValueError(f"the training labels have {len(classes)} class; a classifier needs at least 2")
    return source, classes, yi


def _normalised(X: np.ndarray, norm: str) -> np.ndarray:
    return X if norm == "none" else FeatureNorm(norm).fit(X[:1]).transform(X)


def block_rows(dim: int) -> int:
    """Rows per block: :data:`BLOCK_BYTES` of float32 features (less where memory is short), whole pieces."""
    free = available_bytes()
    budget = BLOCK_BYTES if free is None else min(BLOCK_BYTES, free // 16)
    return max(PIECE_ROWS, (budget // (4 * max(1, dim))) // PIECE_ROWS * PIECE_ROWS)


def iter_blocks(source, rng: np.random.Generator | None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(positions, float32 rows) blocks covering every training row once; rows with NaN/inf are left out.

    ``rng``: pieces in a random order and rows shuffled within each block (training);
    None: in order (statistics passes).
    """
    starts = np.arange(0, source.n, PIECE_ROWS)
    if rng is not None:
        starts = rng.permutation(starts)
    per_block = max(1, block_rows(source.dim) // PIECE_ROWS)
    for i in range(0, len(starts), per_block):
        group = starts[i : i + per_block]
        pos = np.concatenate([np.arange(a, min(source.n, a + PIECE_ROWS)) for a in group])
        X = np.concatenate([source.read(int(a), min(source.n, int(a) + PIECE_ROWS)) for a in group])
        ok = np.isfinite(X).all(axis=1)
        if not ok.all():
            pos, X = pos[ok], X[ok]
        if rng is not None:
            order = rng.permutation(len(pos))
            pos, X = pos[order], X[order]
        yield pos, X


def prefetch(blocks: Iterator, depth: int = 1) -> Iterator:
    """Iterate ``blocks`` with the next ``depth`` items produced on a background thread.

    The training loop spends its time in matrix products that release the GIL, so reading and
    decompressing the next block overlaps with training the current one.  An exception in the
    reader is raised here; leaving the loop early stops the reader.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for item in blocks:
                while not stop.is_set():
                    try:
                        q.put((None, item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put((None, done))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            q.put((exc, None))

    t = threading.Thread(target=produce, name="featx-block-reader", daemon=True)
    t.start()
    try:
        while True:
            exc, item = q.get()
            if exc is not None:
                raise exc
            if item is done:
                return
            yield item
    finally:
        stop.set()
        while t.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                t.join(0.05)


def holdout_folds(y: np.ndarray, *, fraction: float, max_rows: int, seed: int) -> np.ndarray:
    """Fold of each row for held-out selection: 0 for a stratified, seeded slice, -1 for the rest.

    ``fraction`` of each class (at least one row of classes with two or more), at most ``max_rows`` in all.
    """
    rng = np.random.default_rng(seed)
    frac = min(fraction, max_rows / max(1, len(y)))
    fold = np.full(len(y), -1, np.int64)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        k = int(round(frac * len(idx))) if len(idx) > 1 else 0
        k = min(len(idx) - 1, max(1 if len(idx) > 1 else 0, k))
        fold[rng.choice(idx, size=k, replace=False)] = 0
    return fold


def uses_kfold(n: int) -> bool:
    """Whether a streamed head of ``n`` training rows is chosen by k-fold CV (else on a held-out slice)."""
    return n <= KFOLD_MAX_ROWS


def selection_folds(y: np.ndarray, *, folds: int, seed: int, max_rows: int | None = None) -> tuple[np.ndarray, int]:
    """(fold of each row, number of folds) for choosing a streamed head's hyperparameters.

    At most :data:`KFOLD_MAX_ROWS` rows: the k-fold CV folds of the in-memory heads
    (:func:`featx.heads.tuning.cv.cv_splits`, every row in one fold); more: one stratified held-out
    slice (:func:`holdout_folds`: fold 0, the other rows -1) of :data:`HOLDOUT_FRACTION` of the rows, at
    most ``max_rows`` (None: :data:`HOLDOUT_MAX_ROWS`).  A row is scored by heads that did not see its fold.
    """
    if not uses_kfold(len(y)):
        cap = HOLDOUT_MAX_ROWS if max_rows is None else max_rows
        return holdout_folds(y, fraction=HOLDOUT_FRACTION, max_rows=cap, seed=seed), 1
    fold = np.full(len(y), -1, np.int64)
    for f, (_, va) in enumerate(cv_splits(y, folds, seed)):
        fold[va] = f
    return fold, int(fold.max()) + 1
