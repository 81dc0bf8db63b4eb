"""Choosing among feature candidates by repeated, paired, stratified CV (issue 19).

With a few hundred training rows, a 5-fold CV difference of 1 pt is one to three images, and a
full hyperparameter search per candidate costs K searches for K candidates.  So the choice
among candidates (feature views, backbones, their concatenation; each with a normalisation)
is made here with a cheap *proxy* of the head, on identical folds for every candidate:

- folds: ``repeats`` x ``folds``-fold stratified CV on the training rows only, seeded
  (repeat r uses seed + r; :class:`featx.heads.tuning.cv.AdaptiveStratifiedKFold`);
- proxy: for logreg/SVM a kernel ridge classifier on the candidate's Gram matrix (each stored
  part L2-normalised, a bias, a small relative ridge grid), for kNN heads a similarity-weighted
  cosine kNN (small k grid).  A candidate's Gram matrix is the weighted sum of its parts' Gram
  matrices, computed once per part and shared by every candidate that uses it (``final``,
  ``multi2``, ``multi3`` and the concatenation of backbones share their parts' products);
- successive halving: after the first repeat, candidates worse than the best by more than two
  standard errors of their paired fold differences are not scored again (the simplest
  candidate, the reference, always is);
- choice: the first (simplest) candidate whose mean score is within one standard error of the
  best one's, where that standard error is of the *paired* fold differences between the best
  and the simplest candidate: a richer candidate has to beat the simplest by more than the noise
  of their difference to be used.

The chosen candidate is then fitted by the head's own CV search, as before.  Only the training
rows are ever read.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
from scipy.linalg import LinAlgError, cho_factor, cho_solve
from threadpoolctl import threadpool_limits

from ...cache.multi import view_layout
from ...cache.views import l2_rows
from .cv import AdaptiveStratifiedKFold
from .rows import TrainingRows
from .selection import (
    Candidate,
    FeatureNorm,
    SearchPlan,
    Selection,
    best_index,
    fit_candidate,
    plain_and_augmented,
    select,
)

# Ridge penalties, relative to the mean of the Gram diagonal (each part is L2-normalised).
RIDGE_ALPHAS = (0.1, 0.3, 1.0)
KNN_KS = (1, 5, 10, 20)
# Rows a ridge fit of the proxy uses at most (a seeded, stratified subset of the fold's training
# rows; every validation row is scored): keeps the solve at about a second on 2 CPU cores.
PROXY_MAX_FIT_ROWS = 1500
# Training rows the choice looks at, at most (a seeded, stratified subset): Gram matrices are
# rows x rows (6,000 rows: 144 MB per stored part); the chosen candidate's search uses every row.
PROXY_MAX_ROWS = 6000
DROP_SE = 2.0  # successive halving: drop a candidate worse than the best by this many paired s.e.


def proxy_for(head: str) -> str:
    """The proxy that stands in for ``head`` while choosing: ``ridge`` (linear heads) or ``knn``."""
    return "knn" if head.startswith("knn") else "ridge"


@dataclass
class Spec:
    """A candidate for the proxy: its Gram blocks ``(key, weight, columns)`` and how to read its rows.

    ``read()`` gives the candidate's [n_train, d] matrix; block ``columns`` (start, stop) are
    L2-normalised row-wise before their Gram matrix is taken.  ``transform`` (e.g. power-norm)
    replaces block sharing: the whole transformed matrix is one block keyed by ``key``.
    """

    blocks: list[tuple[tuple, float, tuple[int, int]]]
    read: Callable[[], np.ndarray]
    transform: Callable[[np.ndarray], np.ndarray] | None = None


class GramStore:
    """Gram matrices of L2-normalised blocks, computed once per block and shared by candidates."""

    def __init__(self) -> None:
        self.memo: dict[tuple, np.ndarray] = {}

    def gram(self, spec: Spec) -> np.ndarray:
        missing = [b for b in spec.blocks if b[0] not in self.memo]
        if missing:
            X = np.asarray(spec.read(), dtype=np.float32)
            if spec.transform is not None:
                X = spec.transform(X)
            for key, _, (a, b) in missing:
                Z = l2_rows(X[:, a:b])
                self.memo[key] = Z @ Z.T
        G = None
        for key, w, _ in spec.blocks:
            G = self.memo[key] * w if G is None else G + self.memo[key] * w
        return np.asarray(G, dtype=np.float64)


def fold_plan(y: np.ndarray, folds: int, repeats: int, seed: int) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """``repeats`` lists of (train, validation) rows: stratified ``folds``-fold CV with seeds seed, seed+1, ..."""
    y = np.asarray(y)
    return [list(AdaptiveStratifiedKFold(folds, random_state=seed + r).split(np.zeros(len(y)), y))
            for r in range(repeats)]


def _subset(tr: np.ndarray, y: np.ndarray, cap: int, seed: int) -> np.ndarray:
    """A seeded, stratified subset of at most ``cap`` of the rows ``tr``."""
    if len(tr) <= cap:
        return tr
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(y[tr]):
        rows = tr[y[tr] == c]
        keep.append(rng.permutation(rows)[: max(1, int(round(cap * len(rows) / len(tr))))])
    return np.sort(np.concatenate(keep))


def ridge_scores(G: np.ndarray, y: np.ndarray, splits: Sequence, *, seed: int) -> np.ndarray:
    """Accuracy [alpha, fold] of a one-vs-rest kernel ridge classifier (with bias) on Gram matrix ``G``."""
    classes = np.unique(y)
    Y = np.where(y[:, None] == classes[None, :], 1.0, -1.0)
    scale = float(np.mean(np.diag(G))) or 1.0
    out = np.zeros((len(RIDGE_ALPHAS), len(splits)))
    for j, (tr, va) in enumerate(splits):
        tr = _subset(np.asarray(tr), y, PROXY_MAX_FIT_ROWS, seed + j)
        K = G[np.ix_(tr, tr)] + 1.0
        K_va = G[np.ix_(va, tr)] + 1.0
        for i, a in enumerate(RIDGE_ALPHAS):
            try:
                A = cho_solve(cho_factor(K + a * scale * np.eye(len(tr)), check_finite=False), Y[tr], check_finite=False)
            except LinAlgError:  # pragma: no cover - the ridge keeps K positive definite
                A = np.linalg.lstsq(K + a * scale * np.eye(len(tr)), Y[tr], rcond=None)[0]
            out[i, j] = float(np.mean(classes[np.argmax(K_va @ A, axis=1)] == y[va]))
    return out


def knn_scores(G: np.ndarray, y: np.ndarray, splits: Sequence) -> np.ndarray:
    """Accuracy [k, fold] of a similarity-weighted cosine kNN on Gram matrix ``G``."""
    norms = np.sqrt(np.maximum(np.diag(G), 1e-12))
    classes = np.unique(y)
    code = np.searchsorted(classes, y)
    out = np.zeros((len(KNN_KS), len(splits)))
    for j, (tr, va) in enumerate(splits):
        S = G[np.ix_(va, tr)] / norms[va, None] / norms[None, tr]
        kmax = min(max(KNN_KS), len(tr))
        top = np.argpartition(-S, kmax - 1, axis=1)[:, :kmax]
        order = np.argsort(-np.take_along_axis(S, top, axis=1), axis=1)
        top = np.take_along_axis(top, order, axis=1)
        sims = np.maximum(np.take_along_axis(S, top, axis=1), 0.0) + 1e-6
        labels = code[tr][top]
        for i, k in enumerate(KNN_KS):
            k = min(k, kmax)
            votes = np.zeros((len(va), len(classes)))
            np.add.at(votes, (np.repeat(np.arange(len(va)), k), labels[:, :k].ravel()), sims[:, :k].ravel())
            out[i, j] = float(np.mean(classes[np.argmax(votes, axis=1)] == y[va]))
    return out


@dataclass
class _Scored:
    """A candidate's proxy accuracies [grid value, fold] over the folds scored so far."""

    grid: list[np.ndarray] = field(default_factory=list)  # one [n_grid, folds] array per repeat
    dropped_after: int | None = None

    def folds(self) -> np.ndarray:
        """Per-fold accuracy at the grid value with the best mean over the folds scored."""
        A = np.hstack(self.grid)
        return A[int(np.argmax(A.mean(axis=1)))]

    def best(self) -> int:
        return int(np.argmax(np.hstack(self.grid).mean(axis=1)))


def _se(d: np.ndarray) -> float:
    return float(np.std(d, ddof=1) / math.sqrt(len(d))) if len(d) > 1 else 0.0


def _paired(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean and standard error of the paired differences a - b over their common folds."""
    n = min(len(a), len(b))
    d = a[:n] - b[:n]
    return float(np.mean(d)), _se(d)


@dataclass
class Choice:
    """What :func:`choose` found: one row per candidate and the index chosen."""

    rows: list[dict]
    chosen: int
    seconds: float
    folds: int
    repeats: int
    proxy: str

    def to_dict(self) -> dict:
        return {"method": f"repeated stratified CV ({self.repeats} x {self.folds}-fold, paired; proxy {self.proxy})",
                "chosen": self.chosen, "seconds": self.seconds, "rows": self.rows}


class _Run:
    """Scores candidates repeat by repeat on shared folds and Gram blocks."""

    def __init__(self, specs: Sequence[Spec], y: np.ndarray, *, proxy: str, plan: list, seed: int) -> None:
        self.specs, self.y, self.proxy, self.plan, self.seed = list(specs), np.asarray(y), proxy, plan, seed
        self.store = GramStore()
        self.scored = [_Scored() for _ in self.specs]

    def score(self, c: int, r: int) -> None:
        G = self.store.gram(self.specs[c])
        splits = self.plan[r]
        grid = knn_scores(G, self.y, splits) if self.proxy == "knn" else ridge_scores(G, self.y, splits, seed=self.seed + 101 * r)
        self.scored[c].grid.append(grid)

    def halve(self) -> None:
        """After the first repeat: drop candidates clearly worse than the best (never the simplest)."""
        means = [s.folds().mean() for s in self.scored]
        b = int(np.argmax(means))
        for c, s in enumerate(self.scored):
            if c in (0, b):
                continue
            m, se = _paired(self.scored[b].folds(), s.folds())
            if m > 0 and m > DROP_SE * se:
                s.dropped_after = 1

    def complete(self, c: int) -> None:
        for r in range(len(self.scored[c].grid), len(self.plan)):
            self.score(c, r)
        self.scored[c].dropped_after = None

    def choose(self) -> tuple[int, int, float]:
        """(chosen, best, s.e. of best vs simplest): the first candidate within that s.e. of the best."""
        means = np.array([s.folds().mean() for s in self.scored])
        top = int(np.argmax(means))
        se = _paired(self.scored[top].folds(), self.scored[0].folds())[1] if top else 0.0
        return int(np.flatnonzero(means >= means[top] - se)[0]), top, se


def choose(specs: Sequence[Spec], y: np.ndarray, *, head: str, folds: int, repeats: int, seed: int) -> Choice:
    """Score every candidate on the same repeated folds (successive halving) and choose one.

    ``specs`` are ordered simplest first.  Returns rows with each candidate's mean proxy score,
    the standard error of its paired difference with the simplest (``cv_std_err``), its paired
    margin to the chosen candidate and that margin's standard error.
    """
    t0 = time.perf_counter()
    proxy = proxy_for(head)
    run = _Run(specs, y, proxy=proxy, plan=fold_plan(y, folds, max(1, repeats), seed), seed=seed)
    # Many small solves: one BLAS thread each (two threads on 2 busy cores measured 16x slower).
    with threadpool_limits(1):
        for c in range(len(specs)):
            run.score(c, 0)
        if repeats > 1 and len(specs) > 2:
            run.halve()
        for c, s in enumerate(run.scored):
            if s.dropped_after is None:
                run.complete(c)
        chosen, top, se = run.choose()
        while run.scored[chosen].dropped_after is not None:  # never choose on one repeat only
            run.complete(chosen)
            chosen, top, se = run.choose()
    ref = run.scored[0].folds()
    rows = []
    for c, s in enumerate(run.scored):
        f = s.folds()
        margin, margin_se = _paired(f, run.scored[chosen].folds())
        grid_value = (KNN_KS if proxy == "knn" else RIDGE_ALPHAS)[s.best()]
        rows.append({
            "cv_score": float(f.mean()),
            "cv_std_err": _se(f) if c == 0 else _paired(f, ref)[1],
            "paired_margin": margin,
            "paired_se": margin_se,
            "folds_scored": int(len(f)),
            "dropped_after_repeat": s.dropped_after,
            "params": {"proxy": proxy, ("k" if proxy == "knn" else "relative_alpha"): grid_value},
        })
    if top:
        rows[top]["cv_std_err"] = se  # the threshold of the choice: best vs simplest, paired
    return Choice(rows, chosen, time.perf_counter() - t0, len(run.plan[0]), len(run.plan), proxy)


def choose_plain(rows: TrainingRows, plain: Sequence[tuple[str, str, int]], *, head: str, folds: int, repeats: int, seed: int,
                 memo: dict | None = None) -> tuple[list[Candidate], int, Choice]:
    """Candidate rows (proxy scores) for the probe's plain (view, norm) candidates and the index chosen.

    ``rows``: the probe's training rows (``rows.fc``, ``rows.y_tr``, ``rows.view(name)[0]``).
    ``memo``: a dict shared by the heads of one probe, so heads with the same proxy (logreg and
    SVM) choose once.
    """
    key = (proxy_for(head), tuple(plain), folds, repeats, seed)
    if memo is not None and key in memo:
        table, chosen, choice = memo[key]
        return [dataclasses.replace(c) for c in table], chosen, choice
    out = _choose_plain(rows, plain, head=head, folds=folds, repeats=repeats, seed=seed)
    if memo is not None:
        memo[key] = ([dataclasses.replace(c) for c in out[0]], out[1], out[2])
    return out


def _choose_plain(rows: TrainingRows, plain, *, head: str, folds: int, repeats: int, seed: int):
    sub = _subset(np.arange(len(rows.y_tr)), rows.y_tr, PROXY_MAX_ROWS, seed)
    specs = []
    for view, norm, _ in plain:
        read = functools.partial(lambda v: rows.view(v)[0][sub], view)
        if norm == "none":
            specs.append(Spec(view_layout(rows.fc, view), read))
        else:
            dim = rows.fc.view_dim(view)
            specs.append(Spec([((view, norm), 1.0, (0, dim))], read, FeatureNorm(norm).transform))
    choice = choose(specs, rows.y_tr[sub], head=head, folds=folds, repeats=repeats, seed=seed)
    table = [Candidate(view, norm, 0, int(rows.fc.view_dim(view)), r["cv_score"], r["cv_std_err"], r["params"], 0.0,
                       paired_margin=r["paired_margin"], paired_se=r["paired_se"], folds_scored=r["folds_scored"],
                       dropped_after_repeat=r["dropped_after_repeat"])
             for (view, norm, _), r in zip(plain, choice.rows)]
    return table, choice.chosen, choice


def select_repeated(rows: TrainingRows, plan: SearchPlan) -> Selection:
    """:func:`featx.heads.tuning.selection.select`, except that several plain candidates (with ``plan.cv_repeats`` > 1)
    are chosen by :func:`choose_plain` (a cheap proxy on repeated paired folds); then only the choice is
    fitted by the head's own search.  Augmented views, if any, are tried on that choice and kept when their
    search beats its search (or always, when forced)."""
    t0 = time.perf_counter()
    plain_c, aug, forced_aug = plain_and_augmented(plan.candidates)
    if len(plain_c) < 2 or plan.cv_repeats < 2:
        return select(rows, plan)
    table, b, choice = choose_plain(rows, plain_c, head=plan.name, folds=plan.folds, repeats=plan.cv_repeats,
                                    seed=plan.seed, memo=plan.memo)
    est, inner, real = fit_candidate(rows, (table[b].view, table[b].norm, 0), plan)
    table[b].params, table[b].fit_seconds = real.params, real.fit_seconds
    doc = {**choice.to_dict(), "search_cv_score": real.cv_score}
    if aug:
        a_est, a_inner, a_row = fit_candidate(rows, (table[b].view, table[b].norm, aug[-1]), plan)
        table.append(a_row)
        if forced_aug or best_index([real, a_row]) == 1:
            return Selection(a_est, a_inner, table, len(table) - 1, time.perf_counter() - t0, doc)
    return Selection(est, inner, table, b, time.perf_counter() - t0, doc)
