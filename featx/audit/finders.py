"""The finders of ``featx audit``: label errors, duplicates and outliers, as pure functions over arrays.

Why here: they need what the heads level has (the probe's logistic-regression path and its CV
folds) and nothing of the run (no files, no cache).  :mod:`featx.runs.audit` reads the cache,
calls these and writes the CSVs.

* :func:`out_of_fold_probabilities` — the probe's logistic regression (same folds, same C grid,
  :class:`featx.heads.estimators.linear_path.PathLinearHead`) gives out-of-fold class probabilities of every
  training row at the C chosen by CV; the head refitted on all training rows scores other rows.
* :func:`label_issues` — cleanlab's ``find_label_issues`` and ``get_label_quality_scores`` on
  those probabilities (the ranking is cleanlab's, not ours).
* :func:`similar_pairs` / :func:`nearest_in_class` — exact cosine neighbour search in blocks
  (torch matrix products, or faiss when installed and asked: :func:`featx.heads.stream.topk.search_backend`),
  so memory is one block of similarities, whatever the number of rows; the nearest rows are the
  streamed kNN's top-k search (:mod:`featx.heads.stream.topk`).
* :func:`hash_groups` — byte-identical files from their hashes.
* :func:`outlier_scores` — distance to the k nearest training rows of the row's own class,
  as a robust z-score within that class.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ..cache.views import l2_rows
from ..heads.estimators.linear_path import PathLinearHead
from ..heads.stream.topk import nearest_others, search_backend
from ..heads.tuning.cv import softmax_of_scores

log = logging.getLogger(__name__)

# Rows of a block: a [block x block] float32 similarity matrix is 64 MiB at 4096.
DEFAULT_BLOCK = 4096


# --------------------------------------------------------------------------- label issues


def out_of_fold_probabilities(X: np.ndarray, y: np.ndarray, *, folds: int, seed: int, Cs: Sequence[float],
                              max_iter: int = 2000, scoring: str = "accuracy") -> tuple[np.ndarray, PathLinearHead]:
    """(out-of-fold probabilities [n, classes present], head fitted on all rows) of a logistic regression.

    The folds are the probe's (:func:`featx.heads.tuning.cv.cv_splits` with ``folds`` and ``seed``)
    and C is chosen by their CV score; every row's probabilities come from the fold model that
    did not train on it.  Rows in no validation fold (classes with a single image) get the
    refitted head's probabilities (they are in-sample: such rows cannot be judged honestly).
    """
    head = PathLinearHead(loss="logistic", Cs=tuple(Cs), folds=folds, seed=seed, scoring=scoring,
                          max_iter=max_iter, probability=True, patience=4)
    head.fit(X, y)
    d = head.oof_decision_
    if d.shape[1] == 1:
        p1 = 1.0 / (1.0 + np.exp(-d[:, 0].astype(np.float64)))
        probs = np.stack([1 - p1, p1], axis=1)
    else:
        probs = softmax_of_scores(d.astype(np.float64))
    unseen = ~head.oof_seen_
    if unseen.any():
        probs[unseen] = head.predict_proba(X[unseen])
    return probs, head


@dataclass
class LabelIssues:
    """cleanlab's verdict on some rows: ``flagged`` (positions, worst first), quality of every row, suggestion."""

    flagged: np.ndarray
    quality: np.ndarray
    suggested: np.ndarray


def label_issues(labels: np.ndarray, probs: np.ndarray, *, classes: np.ndarray) -> LabelIssues:
    """Rows whose given label is likely wrong, from probabilities the rows' own labels did not train.

    ``classes``: the label of each column of ``probs``; rows whose label is not a column are
    never flagged (quality NaN).  cleanlab's default ``prune_by_noise_rate`` decides which rows
    are flagged; ``get_label_quality_scores`` (self-confidence) ranks them, lowest first.
    """
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    labels, classes = np.asarray(labels), np.asarray(classes)
    col = {int(c): i for i, c in enumerate(classes)}
    known = np.array([int(v) in col for v in labels], dtype=bool)
    quality = np.full(len(labels), np.nan)
    suggested = classes[np.asarray(probs).argmax(1)] if len(labels) else labels.copy()
    idx = np.flatnonzero(known)
    if len(idx) < 2 or len(np.unique(labels[idx])) < 2:
        return LabelIssues(np.zeros(0, np.int64), quality, suggested)
    yi = np.array([col[int(v)] for v in labels[idx]], dtype=np.int64)
    p = _renormalised(np.asarray(probs, dtype=np.float64)[idx])
    quality[idx] = get_label_quality_scores(yi, p)
    # cleanlab wants every column to be some row's label: score on the columns present here
    present = np.unique(yi)
    sub = _renormalised(p[:, present])
    # n_jobs=1: no process pool (its workers would inherit the CLI's SIGTERM handler; one process is fast enough)
    mask = find_label_issues(np.searchsorted(present, yi), sub, filter_by="prune_by_noise_rate", n_jobs=1)
    flagged = idx[np.flatnonzero(mask)]
    flagged = flagged[np.argsort(quality[flagged], kind="stable")]
    return LabelIssues(flagged.astype(np.int64), quality, suggested)


def _renormalised(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-12, None)
    return p / p.sum(1, keepdims=True)


# --------------------------------------------------------------------------- neighbours


def _unit(block: np.ndarray) -> np.ndarray:
    """Rows at unit length as float32 (NaN/inf features as numbers first: such a row is still placed)."""
    return l2_rows(np.nan_to_num(np.asarray(block, dtype=np.float32)))


Rows = Callable[[int, int], np.ndarray]


def _rows_of(X) -> tuple[Rows, int]:
    """(read(a, b) -> rows a..b, n) of an array or of a ``(read, n)`` tuple."""
    if isinstance(X, tuple):
        return X[0], int(X[1])
    arr = np.asarray(X)
    return (lambda a, b: arr[a:b]), len(arr)


def similar_pairs(X, *, threshold: float, block: int = DEFAULT_BLOCK, max_pairs: int = 100_000,
                  backend: str = "torch") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair (i < j) of rows with cosine similarity >= ``threshold``: (i, j, similarity), most similar first.

    ``X``: an [n, d] array, or ``(read, n)`` where ``read(a, b)`` returns rows a..b (a cache read
    block by block: memory is two blocks of rows and one block of similarities).  Exact search
    over the upper triangle in [block x block] matrix products.  At most ``max_pairs`` pairs are
    kept (the most similar); a log line says when more were found.
    """
    read, n = _rows_of(X)
    if search_backend(backend, option="--backend") == "faiss":
        return _faiss_pairs(read, n, threshold=threshold, block=block, max_pairs=max_pairs)
    import torch

    found_i, found_j, found_s = [], [], []
    kept, dropped = 0, 0
    for qa in range(0, n, block):
        Q = torch.from_numpy(_unit(read(qa, min(n, qa + block))))
        for ka in range(qa, n, block):
            K = Q if ka == qa else torch.from_numpy(_unit(read(ka, min(n, ka + block))))
            S = Q @ K.T
            if ka == qa:  # the upper triangle only: each pair once, never a row with itself
                S.masked_fill_(torch.ones(S.shape, dtype=torch.bool).tril(), -2.0)
            qi, kj = torch.nonzero(S >= threshold, as_tuple=True)
            if len(qi):
                found_i.append(qi.numpy() + qa)
                found_j.append(kj.numpy() + ka)
                found_s.append(S[qi, kj].numpy())
                kept += len(qi)
            if kept > 2 * max_pairs:
                dropped += _prune(found_i, found_j, found_s, max_pairs)
                kept = max_pairs
    return _finish_pairs(found_i, found_j, found_s, max_pairs, dropped)


def _prune(fi: list, fj: list, fs: list, cap: int) -> int:
    i, j, s = np.concatenate(fi), np.concatenate(fj), np.concatenate(fs)
    top = np.argsort(-s, kind="stable")[:cap]
    fi[:], fj[:], fs[:] = [i[top]], [j[top]], [s[top]]
    return len(s) - len(top)


def _finish_pairs(fi, fj, fs, cap, dropped):
    if not fi:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    dropped += _prune(fi, fj, fs, cap)
    if dropped:
        log.warning("audit: %d more similar pairs than --max-pairs %d were found; the most similar are kept", dropped, cap)
    return fi[0].astype(np.int64), fj[0].astype(np.int64), fs[0].astype(np.float32)


def _faiss_pairs(read: Rows, n: int, *, threshold: float, block: int, max_pairs: int):
    """The same pairs through faiss (exact inner-product index, range search per query block).

    The flat index holds every normalised row (n x d floats); the torch path holds two blocks.
    """
    import faiss

    first = read(0, min(n, 1))
    index = faiss.IndexFlatIP(int(first.shape[1]))
    for a in range(0, n, block):
        index.add(_unit(read(a, min(n, a + block))))
    fi, fj, fs = [], [], []
    dropped = 0
    for qa in range(0, n, block):
        lims, D, nbr = index.range_search(_unit(read(qa, min(n, qa + block))), float(threshold))
        lims = lims.astype(np.int64)
        q = np.repeat(np.arange(len(lims) - 1), np.diff(lims)) + qa
        keep = nbr > q
        fi.append(q[keep])
        fj.append(nbr[keep].astype(np.int64))
        fs.append(D[keep])
        if sum(len(x) for x in fi) > 2 * max_pairs:
            dropped += _prune(fi, fj, fs, max_pairs)
    return _finish_pairs(fi, fj, fs, max_pairs, dropped)


def nearest_in_class(X: np.ndarray, labels: np.ndarray, ref: np.ndarray, *, k: int,
                     block: int = DEFAULT_BLOCK, backend: str = "torch") -> np.ndarray:
    """Mean cosine similarity of every row of ``X`` to its ``k`` nearest rows of the same label among ``ref``.

    ``ref``: positions (into ``X``) of the reference rows, the training rows: a row is never its
    own neighbour.  Rows whose class has no other reference row get NaN.  Blocked per class, over
    queries and references alike (memory: one block of similarities and the top k), by the
    streamed kNN's exact search (:func:`featx.heads.stream.topk.nearest_others`).
    """
    labels = np.asarray(labels)
    ref = np.asarray(ref, dtype=np.int64)
    out = np.full(len(X), np.nan)
    found = search_backend(backend, option="--backend")
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        keys = ref[labels[ref] == c]
        kk = min(k, len(keys) - 1)  # one reference row may be the query itself
        if kk >= 1:
            for a in range(0, len(rows), block):
                q = rows[a:a + block]
                blocks = ((keys[b:b + block], _unit(X[keys[b:b + block]]), np.full(len(keys[b:b + block]), -2))
                          for b in range(0, len(keys), block))
                top = nearest_others(_unit(X[q]), q, blocks, kk, found).astype(np.float64)
                top[~np.isfinite(top)] = np.nan
                out[q] = np.nanmean(top, axis=1)
    return out


# --------------------------------------------------------------------------- hashes, outliers


def hash_groups(hashes: Sequence[str | None], *, max_group: int = 50) -> list[np.ndarray]:
    """Positions of rows sharing one file hash, one array per hash seen more than once (None: unread)."""
    by: dict[str, list[int]] = {}
    for i, h in enumerate(hashes):
        if h:
            by.setdefault(h, []).append(i)
    groups = [np.asarray(v[:max_group], np.int64) for v in by.values() if len(v) > 1]
    return sorted(groups, key=lambda g: int(g[0]))


def outlier_scores(similarity: np.ndarray, labels: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Robust z-score of ``1 - similarity`` within each class, centred on the class's reference rows.

    (median and 1.4826 x MAD of the reference rows' distances, so evaluation rows never move
    the yardstick of training rows.)  NaN where the class has too few reference rows.
    """
    dist = 1.0 - np.asarray(similarity, dtype=np.float64)
    labels = np.asarray(labels)
    ref = np.asarray(ref, dtype=np.int64)
    z = np.full(len(dist), np.nan)
    for c in np.unique(labels):
        r = ref[(labels[ref] == c) & np.isfinite(dist[ref])]
        if len(r) < 3:
            continue
        med = float(np.median(dist[r]))
        mad = 1.4826 * float(np.median(np.abs(dist[r] - med)))
        rows = np.flatnonzero(labels == c)
        z[rows] = (dist[rows] - med) / max(mad, 1e-6)
    return z
