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
from ..heads.stream.topk import APPROX_ABOVE, ivf_cells, ivf_index, nearest_others, search_backend
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


# Fold partitions whose calibrated out-of-fold probabilities are averaged (the probe's default --cv-repeats).
RANK_REPEATS = 3


@dataclass
class LabelRanking:
    """Every row ranked by how likely its label is wrong (issue 33): worst first, flags, and how far to trust them.

    ``order``: positions of rows with a scored label, lowest quality (self-confidence of the
    given label in calibrated out-of-fold probabilities) first; ``flagged_mask``: cleanlab's
    ``prune_by_noise_rate`` verdict per row; ``probs``: those probabilities [n, classes] (columns
    ``classes``); ``head``/``temperature``: the probe's logistic regression refitted on all rows and
    the temperature that calibrates it (:meth:`probabilities` of other rows); ``C``, ``log_loss``,
    ``accuracy``, ``ece``: the C chosen by CV and the out-of-fold log-loss, accuracy and expected
    calibration error.
    """

    order: np.ndarray
    quality: np.ndarray
    suggested: np.ndarray
    flagged_mask: np.ndarray
    probs: np.ndarray
    classes: np.ndarray
    head: PathLinearHead
    temperature: float
    C: float
    log_loss: float
    accuracy: float
    ece: float

    def probabilities(self, X: np.ndarray) -> np.ndarray:
        """Calibrated probabilities [len(X), classes] of other rows (the refitted head, the same temperature)."""
        return _probabilities(self.head.decision_function(X), self.temperature)


def _probabilities(d: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Class probabilities of linear scores [n, 1 (binary) or n, classes] divided by ``temperature``."""
    d = np.asarray(d, dtype=np.float64).reshape(len(d), -1) / temperature
    if d.shape[1] == 1:
        p1 = 1.0 / (1.0 + np.exp(-d[:, 0]))
        return np.stack([1 - p1, p1], axis=1)
    return softmax_of_scores(d)


def _log_loss(p: np.ndarray, yi: np.ndarray) -> float:
    return float(-np.mean(np.log(np.clip(p[np.arange(len(yi)), yi], 1e-12, 1.0))))


def temperature_of(d: np.ndarray, yi: np.ndarray) -> float:
    """The temperature T (0.05..20) whose probabilities softmax(d / T) have the least log-loss on labels ``yi``."""
    from scipy.optimize import minimize_scalar

    if not len(yi):
        return 1.0
    res = minimize_scalar(lambda t: _log_loss(_probabilities(d, t), yi), bounds=(0.05, 20.0), method="bounded",
                          options={"xatol": 1e-3})
    return float(res.x)


def calibrated_oof_probabilities(X: np.ndarray, y: np.ndarray, *, folds: int, seed: int, Cs: Sequence[float],
                                 max_iter: int = 2000, scoring: str = "accuracy") -> tuple[np.ndarray, PathLinearHead, float]:
    """(out-of-fold probabilities, the head refitted on all rows, temperature): the probe's logistic regression, calibrated.

    The head, folds and C are the probe's (:class:`PathLinearHead`, C by CV ``scoring``); its
    out-of-fold scores are then divided by the one temperature that minimises their log-loss.
    Why (issue 33): the ranking reads the probability of the given label, and the probe's C
    (chosen for accuracy, which is flat over a wide range of C) gives over- or under-confident
    probabilities; one temperature fitted out of fold makes them calibrated without changing any
    row's predicted class.  Rows in no validation fold get the refitted head's scores.
    """
    head = PathLinearHead(loss="logistic", Cs=tuple(Cs), folds=folds, seed=seed, scoring=scoring,
                          max_iter=max_iter, probability=True, patience=4)
    head.fit(X, y)
    d = np.asarray(head.oof_decision_, dtype=np.float64)
    unseen = ~head.oof_seen_
    if unseen.any():
        d[unseen] = np.asarray(head.decision_function(X[unseen]), dtype=np.float64).reshape(int(unseen.sum()), -1)
    yi = np.searchsorted(head.classes_, y)
    t = temperature_of(d[~unseen], yi[~unseen])
    return _probabilities(d, t), head, t


def expected_calibration_error(probs: np.ndarray, yi: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error of the top class (equal-width confidence bins, weighted by rows)."""
    conf, hit = probs.max(1), (probs.argmax(1) == yi)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    return float(sum(abs(conf[which == b].mean() - hit[which == b].mean()) * (which == b).mean()
                     for b in range(bins) if (which == b).any()))


def rank_label_issues(X: np.ndarray, y: np.ndarray, *, folds: int, seed: int, Cs: Sequence[float],
                      max_iter: int = 2000, scoring: str = "accuracy", repeats: int = RANK_REPEATS) -> LabelRanking:
    """Every row of (X, y) ranked by how likely its label is wrong, from calibrated out-of-fold probabilities.

    The probabilities: :func:`calibrated_oof_probabilities`, averaged over ``repeats`` fold
    partitions (seeds ``seed``, ``seed + 1``, ...: one partition's luck moves a few rows of the
    top; measured in ACCURACY.md); the quality of a row: cleanlab's
    self-confidence (``get_label_quality_scores``, the score Datalab ranks by); the flags:
    cleanlab's ``find_label_issues(filter_by="prune_by_noise_rate")``.
    """
    y = np.asarray(y)
    runs = [calibrated_oof_probabilities(X, y, folds=folds, seed=seed + r, Cs=Cs, max_iter=max_iter, scoring=scoring)
            for r in range(max(1, int(repeats)))]
    probs = np.mean([p for p, _, _ in runs], axis=0)  # each row judged by `repeats` fold models that never saw it
    _, head, t = runs[0]
    classes = np.asarray(head.classes_)
    yi = np.searchsorted(classes, y)
    li = label_issues(y, probs, classes=classes)
    mask = np.zeros(len(y), bool)
    mask[li.flagged] = True
    order = np.argsort(np.nan_to_num(li.quality, nan=np.inf), kind="stable")
    return LabelRanking(order=order.astype(np.int64), quality=li.quality, suggested=li.suggested, flagged_mask=mask,
                        probs=probs, classes=classes, head=head, temperature=t, C=float(head.best_params_["C"]),
                        log_loss=_log_loss(probs, yi), accuracy=float((probs.argmax(1) == yi).mean()),
                        ece=expected_calibration_error(probs, yi))


# When the label flags are only "for review" (label_trust): the probe's out-of-fold accuracy below MIN_ACCURACY,
# its expected calibration error above MAX_ECE, or more than MAX_CONFUSABLE of the flags between two classes
# whose unflagged rows give each other a mean probability of CONFUSABLE or more (ACCURACY.md, issue 33).
MIN_ACCURACY = 0.8
MAX_ECE = 0.15
MAX_CONFUSABLE = 0.5
CONFUSABLE = 0.1


def label_trust(y: np.ndarray, rk: LabelRanking, *, min_accuracy: float = MIN_ACCURACY, max_ece: float = MAX_ECE,
                max_confusable: float = MAX_CONFUSABLE, confusable: float = CONFUSABLE) -> dict:
    """How far the flags of a ranking can be trusted (issue 33): noise estimate, confusions, accuracy, calibration.

    * ``noise_rate``: cleanlab's estimate of the share of wrong labels (1 - trace of the joint of
      given and true labels, ``cleanlab.count.estimate_joint``);
    * class pairs the probe mixes up anyway: (a, b) where rows labelled a that are not flagged
      give b a mean probability of at least ``confusable`` (or b's give a);
      ``flags_confusable_share``: the share of flags whose (given, suggested) is such a pair;
    * ``reliable``: the out-of-fold accuracy is at least ``min_accuracy``, the expected
      calibration error at most ``max_ece``, and at most ``max_confusable`` of the flags are such
      confusions.  Otherwise the flags are rows for review, not likely errors, and ``why`` says which.
    ``_pairs``: the set of (given, suggested) label pairs counted as confusions (for the CSV).
    """
    from cleanlab.count import estimate_joint

    y = np.asarray(y)
    yi = np.searchsorted(rk.classes, y)
    k = len(rk.classes)
    noise = float("nan")
    if k >= 2 and len(np.unique(yi)) == k:
        try:
            noise = float(1.0 - np.trace(estimate_joint(yi, _renormalised(rk.probs))))
        except (ValueError, ZeroDivisionError, np.linalg.LinAlgError):
            pass
    keep = ~rk.flagged_mask
    M = np.zeros((k, k))
    for c in range(k):
        rows = keep & (yi == c)
        if rows.any():
            M[c] = rk.probs[rows].mean(0)
    np.fill_diagonal(M, 0.0)
    mixed = (M >= confusable) | (M.T >= confusable)
    pairs = {(int(rk.classes[a]), int(rk.classes[b])) for a, b in zip(*np.nonzero(mixed))}
    fl = np.flatnonzero(rk.flagged_mask)
    share = (float(np.mean([(int(y[r]), int(rk.suggested[r])) in pairs for r in fl])) if len(fl) else 0.0)
    why = []
    if rk.accuracy < min_accuracy:
        why.append(f"the probe's out-of-fold accuracy {rk.accuracy:.2f} is below {min_accuracy:.2f}")
    if rk.ece > max_ece:
        why.append(f"its calibration error {rk.ece:.2f} is above {max_ece:.2f}")
    if len(fl) and share > max_confusable:
        why.append(f"{share:.0%} of the flags are confusions between classes it mixes up anyway")
    reliable = not why
    n = int(len(fl))
    note = ("" if reliable else
            f"the {n} flagged label(s) are for review, not likely errors: {'; '.join(why)}, so a low score often "
            "means a hard image rather than a wrong label (estimated label noise "
            f"{noise:.1%}); look at them, but do not drop them blindly")
    return {"reliable": reliable, "wording": "likely label errors" if reliable else "for review",
            "why": "; ".join(why), "note": note, "oof_accuracy": round(rk.accuracy, 4), "ece": round(rk.ece, 4),
            "log_loss": round(rk.log_loss, 4), "noise_rate": None if not np.isfinite(noise) else round(noise, 4),
            "flags": n, "flags_confusable": int(round(share * n)), "flags_confusable_share": round(share, 4),
            "confused_pairs": len({tuple(sorted(p)) for p in pairs}),
            "thresholds": {"min_accuracy": min_accuracy, "max_ece": max_ece, "max_confusable": max_confusable,
                           "confusable": confusable}, "_pairs": pairs}


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
                  backend: str = "torch", approximate: bool | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair (i < j) of rows with cosine similarity >= ``threshold``: (i, j, similarity), most similar first.

    ``X``: an [n, d] array, or ``(read, n)`` where ``read(a, b)`` returns rows a..b (a cache read
    block by block: memory is two blocks of rows and one block of similarities).  Exact search
    over the upper triangle in [block x block] matrix products.  At most ``max_pairs`` pairs are
    kept (the most similar); a log line says when more were found.
    ``approximate``: a faiss IVF index (:func:`featx.heads.stream.topk.ivf_index`) instead of the
    exact search; None: from :data:`~featx.heads.stream.topk.APPROX_ABOVE` rows when faiss is installed.
    """
    read, n = _rows_of(X)
    if approximate is None:
        approximate = n >= APPROX_ABOVE and search_backend("auto") == "faiss"
        if n >= APPROX_ABOVE and not approximate:
            log.warning("audit: exact all-pairs search of %d rows is quadratic (hours at a million rows); pip install "
                        "'featx[faiss]' for the approximate index", n)
    if approximate:
        return _faiss_pairs(read, n, threshold=threshold, block=block, max_pairs=max_pairs, approximate=True)
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
    _, first = np.unique(np.stack([i, j], 1), axis=0, return_index=True)  # a pair found from both of its rows: once
    if len(first) < len(i):
        i, j, s = i[first], j[first], s[first]
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


def _spread_sample(read: Rows, n: int, rows: int, piece: int = 256) -> np.ndarray:
    """About ``rows`` normalised rows read in pieces spread evenly over all ``n`` (a cache is stored class by class)."""
    if n <= rows:
        return _unit(read(0, n))
    starts = np.linspace(0, n - piece, max(1, rows // piece)).astype(np.int64)
    return np.concatenate([_unit(read(int(a), int(a) + piece)) for a in starts])


def _faiss_pairs(read: Rows, n: int, *, threshold: float, block: int, max_pairs: int, approximate: bool = False):
    """The same pairs through faiss (range search per query block): an exact flat index, or ``approximate`` IVF.

    Either index holds every normalised row (n x d floats); the torch path holds two blocks.
    """
    import faiss

    first = read(0, min(n, 1))
    if approximate:
        index = ivf_index(_spread_sample(read, n, min(40 * ivf_cells(n), 262_144)), n)
        log.info("audit: near duplicates of %d rows by an approximate faiss IVF index (%d cells, %d probed)", n,
                 index.nlist, index.nprobe)
    else:
        index = faiss.IndexFlatIP(int(first.shape[1]))
    for a in range(0, n, block):
        index.add(_unit(read(a, min(n, a + block))))
    fi, fj, fs = [], [], []
    dropped = 0
    for qa in range(0, n, block):
        lims, D, nbr = index.range_search(_unit(read(qa, min(n, qa + block))), float(threshold))
        lims = lims.astype(np.int64)
        q = np.repeat(np.arange(len(lims) - 1), np.diff(lims)) + qa
        nbr = nbr.astype(np.int64)
        # exact: each pair from its first row; approximate: from either row (the other's cells may miss it)
        keep = nbr != q if approximate else nbr > q
        fi.append(np.minimum(q, nbr)[keep])
        fj.append(np.maximum(q, nbr)[keep])
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
