"""Logistic regression and the linear SVM trained by mini-batch optimisation over streamed rows.

Why: the in-memory searches (:mod:`featx.heads.estimators.linear_path`, scikit-learn) hold the training
matrix and its CV copies, so a cache bigger than memory could only be probed on a subset.
Here the rows are read block by block from the cache (:mod:`featx.heads.stream.source`, the
next block read while the current one trains) and every C value of the grid is its own head
trained in the same pass, as DINOv2's linear evaluation trains many heads on one pass of
features: one matrix product per minibatch gives the logits of all heads.

The model is the in-memory one (standardise, then multinomial logistic regression or
one-vs-rest squared-hinge SVM, objective mean loss + ||W||^2 / (2 C n)), minimised from a
Gaussian-classifier warm start by momentum steps preconditioned by a curvature bound: in the
eigenbasis of the features' covariance (from the statistics pass) each weight's step is its
gradient over (bound x eigenvalue + 1 / (C n)), warmed up then cosine-annealed; bfloat16 matrix
products with float32 weights where the CPU supports them (or on CUDA).  C is chosen on a stratified held-out slice of the training rows
(large caches; the chosen head is the one trained on the other rows) or, for small caches,
by k-fold CV with one more head per C trained on all rows (the refit).  After each epoch but
the last, heads clearly worse than the best on the held-out rows, and heads whose held-out
predictions equal a smaller-C neighbour's, stop training (what was measured is reported).
"""

from __future__ import annotations

import contextlib
import logging
import time

import numpy as np

from ...base.runtime import resolve_device
from ..estimators.linear_path import LOSSES, PathLinearHead, platt
from ..tuning.cv import cv_summary
from .source import iter_blocks, prefetch, training_source
from .training import (
    EARLY_CHECKS,
    HeadSet,
    best_index,
    curvature_basis,
    held_out_decision,
    held_out_predictions,
    penalties,
    plan_folds,
    plan_steps,
    prune,
    score_heads,
    statistics_pass,
    train_step,
    warm_start,
)

log = logging.getLogger(__name__)

SMALL_STEP = 2e8  # multiply-adds of a minibatch's logits below which one CPU thread is faster


class StreamingLinearHead(PathLinearHead):
    """Standardise + L2 linear classifier, every C of ``Cs`` trained in one streamed pass.

    ``fit(X, y)``: ``X`` an array or a row source (:class:`~featx.heads.stream.source.CacheSource`).
    ``lr``: the share of the majorise-minimise step taken at the peak of the schedule (1: the whole step).
    After ``fit``: ``coef_``, ``intercept_``, ``classes_``, ``best_params_``, ``best_score_``,
    ``cv_results_`` and ``selection_`` (how C was chosen, e.g. ``holdout 10% (5,000 rows)``);
    prediction is :class:`~featx.heads.estimators.linear_path.PathLinearHead`'s.
    """

    def __init__(self, *, loss: str = "logistic", Cs=(1.0,), folds: int = 5, seed: int = 0,
                 scoring: str = "accuracy", epochs: int = 4, lr: float = 0.5, device: str = "cpu",
                 probability: bool = True) -> None:
        self.loss = loss
        self.Cs = Cs
        self.folds = folds
        self.seed = seed
        self.scoring = scoring
        self.epochs = epochs
        self.lr = lr
        self.device = device
        self.probability = probability

    def fit(self, X, y) -> "StreamingLinearHead":
        """Train every C on the streamed rows, choose one on held-out rows (or CV folds)."""
        t0 = time.perf_counter()
        Cs = self._check_settings()
        source, self.classes_, yi = training_source(X, y)
        self.n_features_in_ = source.dim
        try:
            run = _Run(self, source, yi, Cs)
            with _threads(run):
                run.train()
        finally:
            if hasattr(source, "close"):
                source.close()
        self._finish(run, Cs)
        self.fit_seconds_ = time.perf_counter() - t0
        return self

    def _finish(self, run: "_Run", Cs: list[float]) -> None:
        best = run.best_index()
        self.cv_results_ = cv_summary([{"C": c} for c in Cs], run.scores)
        self.best_index_ = best
        self.best_params_ = {"C": Cs[best]}
        self.best_score_ = float(self.cv_results_["mean_test_score"][best])
        self.n_candidates_, self.n_splits_ = len(Cs), run.n_cv
        self.selection_ = run.describe()
        self.epochs_run_ = run.epochs
        self.pruned_ = run.pruned
        coef, intercept = run.weights(best)
        if len(self.classes_) == 2:  # one score column, as scikit-learn's binary heads
            coef, intercept = coef[1:] - coef[:1], intercept[1:] - intercept[:1]
        self.coef_, self.intercept_ = coef, intercept
        self.calibration_ = None
        if self.loss == "squared_hinge" and self.probability:
            d = run.held_out_decision(best)
            if len(self.classes_) == 2:
                d = d[:, 1:] - d[:, :1]
            targets = [run.y_eval == 1] if d.shape[1] == 1 else [run.y_eval == k for k in range(d.shape[1])]
            self.calibration_ = np.array([platt(d[:, k], t) for k, t in enumerate(targets)], np.float64)


@contextlib.contextmanager
def _threads(run: "_Run"):
    """One torch thread for small heads on the CPU: their many small products otherwise spend the
    time in thread hand-offs (20 ms per operation measured on the loaded 2-core machine)."""
    torch = run.torch
    before = torch.get_num_threads()
    small = run.dev == "cpu" and min(4096, run.n // 8) * (run.d + 1) * len(run.Cs) * run.k * (run.n_cv + 1) < SMALL_STEP
    if small:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _fast_dtype(device: str):
    """bfloat16 for the matrix products on CUDA and on CPUs with bf16 instructions, else float32."""
    import torch

    if device.startswith("cuda"):
        return torch.bfloat16
    cpu = getattr(torch.backends, "cpu", None)
    isa = cpu.get_cpu_capability() if cpu is not None and hasattr(cpu, "get_cpu_capability") else ""
    return torch.bfloat16 if isa in ("AVX512",) and _has_bf16_flag() else torch.float32


def _has_bf16_flag() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            return any("avx512_bf16" in line or "amx_bf16" in line for line in fh if line.startswith("flags"))
    except OSError:
        return False


class _Run:
    """One streamed training of all heads: the statistics pass, the set of heads, its epochs of steps, and the
    held-out scores that prune heads and pick C (the plain functions of :mod:`featx.heads.stream.training`)."""

    def __init__(self, head: StreamingLinearHead, source, yi: np.ndarray, Cs: list[float]) -> None:
        import torch

        if head.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {head.loss!r}")
        self.h, self.source, self.yi, self.Cs = head, source, yi, Cs
        self.n, self.d, self.k = source.n, source.dim, int(yi.max()) + 1
        self.dev = resolve_device(head.device or "cpu")
        self.dtype = _fast_dtype(self.dev)
        self.rng = np.random.default_rng(head.seed)
        self.torch = torch
        self.folds = plan_folds(yi, folds=head.folds, seed=head.seed)
        self.n_cv, self.n_splits, self.eval_pos = self.folds.n_cv, self.folds.n_splits, self.folds.eval_pos
        self.y_eval = yi[self.eval_pos]
        self.scores = np.full((len(Cs), self.n_cv), np.nan)
        self.pruned: dict[str, str] = {}
        self.epochs = 0

    def describe(self) -> str:
        if self.n_splits > self.n_cv:
            return f"{self.n_cv}-fold cv (streamed, refit on all {self.n:,} rows; {self.epochs} epochs)"
        return (f"holdout {len(self.eval_pos) / self.n:.0%} ({len(self.eval_pos):,} of {self.n:,} training rows, "
                f"stratified; the chosen head trained on the others; {self.epochs} epochs)")

    def _setup(self) -> None:
        """The statistics pass, the schedule and the set of heads at their warm start."""
        self.stats = statistics_pass(self.source, self.yi, self.folds, self.k)
        self.y_eval = self.stats.y_eval
        lam = penalties(self.folds, self.n, self.Cs)
        self.sched = plan_steps(self.n, self.d, self.n_splits * len(self.Cs) * self.k, int(self.h.epochs))
        U, inv = curvature_basis(self.stats, lam, self.h.loss)
        self.heads = HeadSet(self.stats, U, inv, lam, loss=self.h.loss, dev=self.dev, dtype=self.dtype)
        self.heads.start(warm_start(self.stats, self.heads, self.folds, loss=self.h.loss, seed=self.h.seed))

    def train(self) -> None:
        self._setup()
        sched = self.sched
        log.info("streaming %s: %d rows x %d features, %d classes, %d C values x %d splits, batch %d (in chunks of %d), "
                 "%d epochs, %s", self.h.loss, self.n, self.d, self.k, len(self.Cs), self.n_splits, sched.batch,
                 sched.chunk, sched.n_epochs, self.dtype)
        checks = sorted({max(1, int(sched.total_steps * f)) for f in EARLY_CHECKS})
        for e in range(sched.n_epochs):
            t0 = time.perf_counter()
            for pos, X in prefetch(iter_blocks(self.source, self.rng)):
                # Near-equal updates of the same sizes block after block (held-out rows ride along with weight
                # 0): every new product shape is a new oneDNN primitive kept in its cache (address space).
                cuts = np.linspace(0, len(pos), -(-len(pos) // sched.batch) + 1).astype(int)
                for a, b in zip(cuts[:-1], cuts[1:]):
                    train_step(self.heads, sched, (pos[a:b], X[a:b], self.yi[pos[a:b]]), self.folds, self.h.lr)
                    if checks and sched.step >= checks[0]:
                        checks = [c for c in checks if c > sched.step]
                        self._score()
                        self._prune(early=True)
            self.epochs = e + 1
            self._score()
            log.info("epoch %d/%d (%.1fs): held-out %s per C %s", e + 1, sched.n_epochs, time.perf_counter() - t0,
                     self.h.scoring, np.round(np.nanmean(self.scores, 1), 4).tolist())
            if e + 1 < sched.n_epochs and sched.step >= sched.total_steps // 4:  # not before a quarter of the updates
                self._prune()

    def _score(self) -> None:
        self.preds = held_out_predictions(self.heads, self.stats, self.n_cv)
        score_heads(self.scores, self.preds, self.stats, self.heads.active, self.h.scoring)

    def _prune(self, *, early: bool = False) -> None:
        prune(self.heads, self.scores, self.preds, self.Cs, self.pruned, n_eval=len(self.y_eval),
              when=self.sched.when(), early=early)

    def best_index(self) -> int:
        return best_index(self.scores, self.heads.active)

    def weights(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        return self.heads.weights(c)

    def held_out_decision(self, c: int) -> np.ndarray:
        return held_out_decision(self.heads, self.stats, self.n_cv, c)
