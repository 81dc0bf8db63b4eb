"""kNN on caches of any size: exact cosine search in blocks, with bounded memory.

Why: the in-memory kNN heads (scikit-learn's brute search, :class:`~featx.heads.estimators.torch_heads.TorchKNN`)
hold the normalised training matrix and its CV copies, so a cache bigger than memory could only
be probed on a subset.  Here the training rows are read block by block from the cache
(:mod:`featx.heads.stream.source`, the next block read on a thread while the current one is
searched); each block of reference rows is searched for a group of query rows held in memory,
and every query keeps a running top-k (the block's top-k merged with the best so far:
:mod:`featx.heads.stream.topk`, the search the audit uses too).  The search is exact (float32 inner products of L2-normalised rows): faiss's flat index when faiss is
installed (``pip install 'featx[faiss]'``), else torch matrix products and ``topk``.

``n_neighbors``, ``weights`` and ``metric`` are chosen as the streamed linear heads choose C
(:func:`featx.heads.stream.source.selection_folds`): by k-fold CV while the cache is small (every
row a query against the rows of the other folds, in the same single pass), else on a stratified
held-out slice of the training rows (at most :data:`HOLDOUT_MAX_QUERIES` queries against the other
rows; ``selection_`` says which).  One search for the largest k scores every candidate.

What the fitted head keeps (and a saved ``.skops`` head holds): the normalised reference rows when
they take at most :data:`HOLD_BYTES` (the head is self-contained, as the in-memory kNN heads are),
else a reference to the cache (its absolute path, identity (:mod:`featx.cache.identity`), view,
normalisation and the training rows' row numbers): predicting then reads the reference rows from that
cache block by block, and refuses with a one-line error when the cache is missing or its identity
differs (another data set's cache with the same embedding settings is not the same rows).  A kNN head over a
million rows thus stays a few megabytes instead of gigabytes, at the price of needing its cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import weakref

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin

from ...base.errors import FeatxError
from ...cache.identity import identity_of
from ...cache.multi import open_cache
from ...cache.views import l2_rows  # float32 rows stay float32, as scikit-learn's Normalizer
from ..tuning.cv import cv_summary, score_predictions
from ..tuning.grids import resolve_grids
from .source import ArraySource, CacheSource, iter_blocks, prefetch, selection_folds, training_source, uses_kfold
from .topk import budget, search, search_backend

log = logging.getLogger(__name__)

# Held-out queries at most when the cache is large (featx.heads.stream.source.selection_folds chooses as for
# the linear heads otherwise): each costs a pass of inner products over every training row, so fewer than the
# linear heads' HOLDOUT_MAX_ROWS held-out rows, which cost one product per C.
HOLDOUT_MAX_QUERIES = 10_000
# Query rows held at once (float32 bytes); more queries take another pass over the reference rows.
QUERY_BYTES = 128 << 20
# Reference rows (float32, normalised) kept inside the fitted head at most; beyond, it refers to the cache.
HOLD_BYTES = 256 << 20
METRICS = ("cosine", "euclidean")


def votes(sim: np.ndarray, labels: np.ndarray, *, k: int, weights: str, metric: str, n_classes: int) -> np.ndarray:
    """[queries, classes] votes of the first ``k`` neighbours, by scikit-learn's rules (``distance``:
    1 / distance, and only the neighbours at distance 0 when a query has any); missing neighbours: none."""
    s, lab = sim[:, :k].astype(np.float64), labels[:, :k]
    valid = lab >= 0
    if weights == "uniform":
        w = valid.astype(np.float64)
    else:
        d = np.clip(1 - s, 0, 2) if metric == "cosine" else np.sqrt(np.clip(2 - 2 * s, 0, 4))
        zero = (d <= 0) & valid
        with np.errstate(divide="ignore"):
            w = np.where(zero.any(1, keepdims=True), zero, 1.0 / d) * valid
    out = np.zeros((len(sim), n_classes))
    rows = np.repeat(np.arange(len(sim)), lab.shape[1])
    np.add.at(out, (rows, np.maximum(lab, 0).ravel()), w.ravel())
    return out


def knn_candidates(grid: dict, max_k: int) -> list[dict]:
    """The (n_neighbors, weights, metric) grid, k above ``max_k`` (the fewest reference rows of a split) dropped."""
    extra = set(grid) - {"n_neighbors", "weights", "metric"}
    if extra:
        raise FeatxError(f"heads.knn: the streamed kNN searches n_neighbors, weights and metric, not {sorted(extra)}")
    metrics = list(grid.get("metric", ["cosine"]))
    if any(m not in METRICS for m in metrics):
        raise FeatxError(f"heads.knn.metric {metrics}: the streamed kNN searches {', '.join(METRICS)}; "
                         "use --solver memory with --max-train-rows N for other metrics")
    ks = sorted({int(k) for k in grid["n_neighbors"]})
    keep = [k for k in ks if k <= max_k] or [1]
    if len(keep) < len(ks):
        log.info("kNN: dropping k > %d (the reference rows of one split) from the grid", max_k)
    return [{"n_neighbors": k, "weights": w, "metric": m} for k in keep for w in grid.get("weights", ["uniform"])
            for m in metrics]


class StreamingKNN(ClassifierMixin, BaseEstimator):
    """L2-normalise + exact k nearest neighbours, searched in blocks; (k, weights, metric) chosen on training rows.

    ``fit(X, y)``: ``X`` an array or a row source (:class:`~featx.heads.stream.source.CacheSource`).
    After ``fit``: ``classes_``, ``best_params_``, ``best_score_``, ``cv_results_``, ``selection_``
    (e.g. ``holdout 1% (10,000 of 1,000,000 training rows ...)``), ``backend_`` and either
    ``fit_X_`` (the normalised reference rows) or ``reference_`` (the cache they are read from).
    """

    def __init__(self, *, grid: dict | None = None, folds: int = 5, seed: int = 0, scoring: str = "accuracy",
                 backend: str = "auto", hold_bytes: int | None = None) -> None:
        self.grid = grid
        self.folds = folds
        self.seed = seed
        self.scoring = scoring
        self.backend = backend
        self.hold_bytes = hold_bytes

    @property
    def params_(self) -> dict:
        """The chosen hyperparameters, e.g. ``{"n_neighbors": 9, "weights": "distance", "metric": "cosine"}``."""
        return dict(self.best_params_)

    def fit(self, X, y) -> "StreamingKNN":
        """Choose (k, weights, metric) on held-out rows or CV folds of (X, y); keep or refer to the reference rows."""
        t0 = time.perf_counter()
        source, self.classes_, yi = training_source(X, y)
        self.n_features_in_ = source.dim
        self.backend_ = search_backend(self.backend)
        _LAST.clear()  # votes of this object's former fit are stale
        score_predictions(self.scoring, np.array([0, 1]), np.array([0, 1]))  # an unknown scoring fails first
        try:
            self._select(source, yi)
            self._keep_reference(source, yi)
        finally:
            if hasattr(source, "close"):
                source.close()
        self.fit_seconds_ = time.perf_counter() - t0
        return self

    def _select(self, source, yi: np.ndarray) -> None:
        fold, n_cv = selection_folds(yi, folds=self.folds, seed=self.seed, max_rows=HOLDOUT_MAX_QUERIES)
        refs = [int(np.sum(fold != f)) for f in range(n_cv)]
        g = dict(resolve_grids()["knn"], **(self.grid or {}))
        cands = knn_candidates(g, min(refs))
        kmax = max(c["n_neighbors"] for c in cands)
        q = np.flatnonzero(fold >= 0)
        sim, nbr, ok = _neighbours(source, q, fold, kmax, self.backend_)
        q, sim, nbr = q[ok], sim[ok], nbr[ok]
        lab = np.where(nbr >= 0, yi[np.maximum(nbr, 0)], -1)
        scores = np.zeros((len(cands), n_cv))
        for c, cand in enumerate(cands):
            pred = votes(sim, lab, k=cand["n_neighbors"], weights=cand["weights"], metric=cand["metric"],
                         n_classes=len(self.classes_)).argmax(1)
            for f in range(n_cv):
                m = fold[q] == f
                scores[c, f] = score_predictions(self.scoring, yi[q][m], pred[m])
        self.cv_results_ = cv_summary(cands, scores)
        best = int(np.argmin(self.cv_results_["rank_test_score"]))  # the first of the best, as scikit-learn
        self.best_index_, self.best_params_ = best, dict(cands[best])
        self.best_score_ = float(self.cv_results_["mean_test_score"][best])
        self.n_candidates_, self.n_splits_ = len(cands), n_cv
        n = len(yi)
        self.selection_ = (f"{n_cv}-fold cv (streamed search, {n:,} rows)" if uses_kfold(n) else
                           f"holdout {len(q) / n:.1%} ({len(q):,} of {n:,} training rows, stratified; searched among "
                           f"the others; predictions use all of them)")
        log.info("streamed kNN (%s): %s, %s %.4f", self.backend_, self.selection_, self.best_params_, self.best_score_)

    def _keep_reference(self, source, yi: np.ndarray) -> None:
        """The normalised rows in the head when they fit ``hold_bytes`` (None: :data:`HOLD_BYTES`), else where to read them."""
        hold = HOLD_BYTES if self.hold_bytes is None else self.hold_bytes
        if source.n * source.dim * 4 <= hold or not isinstance(source, CacheSource):
            pos, X = zip(*[(p, l2_rows(x)) for p, x in iter_blocks(source, None)]) if source.n else ((), ())
            pos = np.concatenate(pos) if pos else np.zeros(0, np.int64)
            self.fit_X_ = np.concatenate(X) if X else np.zeros((0, source.dim), np.float32)
            self.fit_y_ = yi[pos].astype(np.int64)
            self.reference_ = None
            return
        fc = source.fc
        self.fit_X_ = None
        self.fit_y_ = yi.astype(np.int64)
        # The cache's absolute path (featx predict may run in another folder) and its identity: the same rows
        # embedded with the same settings, not merely any file with the same embedding settings.
        self.reference_ = {"cache": os.path.abspath(fc.path), "fingerprint": str(fc.fingerprint),
                           "identity": identity_of(fc).digest, "view": source.view, "norm": source.norm}
        self.reference_rows_ = np.asarray(source.rows, np.int64)
        log.info("streamed kNN: %d reference rows (%.0f MiB) stay in %s; the saved head refers to it",
                 source.n, source.n * source.dim * 4 / 2**20, fc.path.name)

    def reference_source(self):
        """(source, labels by source position) of the reference rows: the head's own, or its cache's (checked:
        the cache must have the identity the head was trained on)."""
        if self.reference_ is None:
            return ArraySource(self.fit_X_), self.fit_y_
        ref = self.reference_
        try:
            fc = open_cache(ref["cache"])
        except FeatxError as exc:
            raise FeatxError(f"this kNN head reads its {len(self.fit_y_):,} reference rows from cache {ref['cache']}, "
                             f"which cannot be opened ({exc}); re-create the head with `featx probe`") from None
        if str(fc.fingerprint) != ref["fingerprint"] or identity_of(fc).digest != ref.get("identity"):
            why = ("the head was saved by an older featx that did not record the cache's identity"
                   if not ref.get("identity") else "its rows or embedding settings have changed since the head was "
                   "trained (another cache, or one embedded again)")
            raise FeatxError(f"this kNN head reads its reference rows from cache {ref['cache']}, but {why}; "
                             "re-create the head with `featx probe`")
        return CacheSource(fc, self.reference_rows_, view=ref["view"], norm=ref["norm"]), self.fit_y_

    def _votes(self, X) -> np.ndarray:
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != self.n_features_in_:
            raise ValueError(f"X has shape {X.shape}; this kNN head expects {self.n_features_in_} features")
        key = hashlib.blake2b(X.tobytes(), digest_size=16).hexdigest()
        owner = _LAST.get("owner")
        if owner is not None and owner() is self and _LAST.get("key") == key:  # predict(), then predict_proba(): one search
            return _LAST["votes"]
        src, labels = self.reference_source()
        p = self.best_params_
        k = min(int(p["n_neighbors"]), len(labels))
        try:
            sim, nbr, ok = _neighbours(src, None, None, k, self.backend_, queries=X)
        finally:
            if hasattr(src, "close"):
                src.close()
        lab = np.where(nbr >= 0, labels[np.maximum(nbr, 0)], -1)
        v = votes(sim, lab, k=k, weights=p["weights"], metric=p["metric"], n_classes=len(self.classes_))
        _LAST.clear()
        _LAST.update(owner=weakref.ref(self), key=key, votes=v)
        return v

    def predict_proba(self, X) -> np.ndarray:
        v = self._votes(X)
        return v / np.maximum(v.sum(1, keepdims=True), 1e-300)

    def predict(self, X) -> np.ndarray:
        return self.classes_[self._votes(X).argmax(1)]


# The last predicted rows' votes (not part of any head): the probe asks for labels, then probabilities.
_LAST: dict = {}


def _neighbours(source, q: np.ndarray | None, fold: np.ndarray | None, k: int, backend: str, *,
                queries: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(similarity, neighbour position, query usable) of queries against every row of ``source``.

    The queries are the source's rows ``q`` (each sees only rows of other folds than its own) or the
    rows ``queries`` (they see every row).  Queries are taken in groups of :data:`QUERY_BYTES`, each
    group one pass over the source; rows with NaN/inf features are no one's neighbours (and such a
    query is not usable).
    """
    n_q = len(queries) if queries is not None else len(q)
    sim = np.full((n_q, k), -np.inf, np.float32)
    nbr = np.full((n_q, k), -1, np.int64)
    ok = np.ones(n_q, bool)
    per = max(1, budget(QUERY_BYTES, 8) // (4 * max(1, source.dim)))
    for a in range(0, n_q, per):
        b = min(n_q, a + per)
        if queries is not None:
            Q, qf = l2_rows(queries[a:b]), np.full(b - a, -1, np.int64)
        else:
            Q, got = _gather(source, q[a:b])
            ok[a:b], qf = got, fold[q[a:b]]
        blocks = ((pos, l2_rows(X), fold[pos] if fold is not None else np.full(len(pos), -2, np.int64))
                  for pos, X in prefetch(iter_blocks(source, None)))
        sim[a:b], nbr[a:b] = search(Q, qf, blocks, k, backend)
    return sim, nbr, ok & np.isfinite(sim[:, 0])


def _gather(source, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(normalised features of the sorted positions ``rows``, whether each was finite), in one pass."""
    Q = np.zeros((len(rows), source.dim), np.float32)
    got = np.zeros(len(rows), bool)
    for pos, X in iter_blocks(source, None):
        j = np.searchsorted(rows, pos)
        hit = (j < len(rows)) & (rows[np.minimum(j, len(rows) - 1)] == pos)
        Q[j[hit]], got[j[hit]] = l2_rows(X[hit]), True
    return Q, got
