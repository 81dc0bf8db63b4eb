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
import math
import time

import numpy as np

from ...base.errors import FeatxError
from ...base.runtime import resolve_device
from ..estimators.linear_path import LOSSES, PathLinearHead, platt
from ..tuning.cv import cv_summary, score_predictions
from ..tuning.grids import LINEAR_HEADS
from ..tuning.selection import Candidate, SearchPlan, fold_std_err, with_norm
from .init import calibration_rows, class_sums, hinge_scaled, lda, softmax_temperature
from .knn import StreamingKNN
from .source import CacheSource, block_rows, iter_blocks, prefetch, selection_folds, training_source

log = logging.getLogger(__name__)

# Below this many training rows selection is k-fold CV (plus a refit head per C); above it, a held-out slice.
KFOLD_MAX_ROWS = 20_000
HOLDOUT_FRACTION = 0.1
HOLDOUT_MAX_ROWS = 50_000
# Floats per minibatch in each [rows, heads x classes] array (logits, gradients): bounds their memory.
BATCH_FLOATS = 16 << 20
MIN_STEPS = 300  # small caches get more epochs, so that every head sees enough updates
SMALL_STEP = 2e8  # multiply-adds of a minibatch's logits below which one CPU thread is faster
# A head stops early when its held-out score is this far below the best (and 2 standard errors),
# or when its held-out predictions agree with a smaller C's on this share of rows.
PRUNE_MARGIN = 0.01
SAME_PREDICTIONS = 0.999
# Pruning before the first quarter of the updates (at these shares of them; the C values of a large cache
# mostly differ little, so most heads stop early): "clearly worse" then needs EARLY_MARGIN x PRUNE_MARGIN.
EARLY_CHECKS = (1 / 16, 1 / 8)
EARLY_MARGIN = 3.0
# Smallest eigenvalue of the standardised features' covariance the step trusts (their mean is 1).
CURVATURE_FLOOR = 0.1


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
    """One streamed training of all heads: statistics pass, epochs, held-out scoring, pruning."""

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
        self._plan_folds()
        self.active = list(range(len(Cs)))
        self.scores = np.full((len(Cs), self.n_cv), np.nan)
        self.pruned: dict[str, str] = {}
        self.epochs = 0

    # -- selection rows
    def _plan_folds(self) -> None:
        self.fold, self.n_cv = selection_folds(self.yi, folds=self.h.folds, seed=self.h.seed, kfold_max_rows=KFOLD_MAX_ROWS,
                                               fraction=HOLDOUT_FRACTION, max_rows=HOLDOUT_MAX_ROWS)
        holdout = self.n > KFOLD_MAX_ROWS
        self.n_splits = self.n_cv + (0 if holdout else 1)  # k-fold CV: + the refit head of every C, on all rows
        self.eval_pos = np.flatnonzero(self.fold >= 0)
        self.y_eval = self.yi[self.eval_pos]

    def describe(self) -> str:
        if self.n_splits > self.n_cv:
            return f"{self.n_cv}-fold cv (streamed, refit on all {self.n:,} rows; {self.epochs} epochs)"
        return (f"holdout {len(self.eval_pos) / self.n:.0%} ({len(self.eval_pos):,} of {self.n:,} training rows, "
                f"stratified; the chosen head trained on the others; {self.epochs} epochs)")

    # -- passes
    def _statistics(self) -> None:
        """Mean and scale of every feature (StandardScaler's), and the held-out rows kept (float16 if large)."""
        m = 0
        # Class sums per fold (index fold + 1; 0: rows in no held-out fold): the warm start of each split.
        self.class_sums = np.zeros((self.n_cv + 1, self.k, self.d))
        self.class_counts = np.zeros((self.n_cv + 1, self.k))
        self.gram = np.zeros((self.n_cv + 1, self.d, self.d))  # X^T X per fold: the within-class covariance
        keep_dtype = np.float16 if len(self.eval_pos) * self.d > 64 << 20 else np.float32
        self.X_eval = np.zeros((len(self.eval_pos), self.d), keep_dtype)
        ok_eval = np.zeros(len(self.eval_pos), bool)
        for pos, X in prefetch(iter_blocks(self.source, None)):
            m += len(X)
            f1 = self.fold[pos] + 1
            np.add.at(self.class_counts, (f1, self.yi[pos]), 1)
            for f in np.unique(f1):
                sel = f1 == f
                self.class_sums[f] += class_sums(X[sel], self.yi[pos[sel]], self.k)
                self.gram[f] += X[sel].T @ X[sel]
            j = np.searchsorted(self.eval_pos, pos)
            hit = (j < len(self.eval_pos)) & (self.eval_pos[np.minimum(j, len(self.eval_pos) - 1)] == pos)
            self.X_eval[j[hit]], ok_eval[j[hit]] = X[hit], True
        if m == 0:
            raise FeatxError("no training row has finite features; rebuild the cache with `featx embed ... --overwrite`")
        self.mean = self.class_sums.sum((0, 1)) / m
        self.scale = np.sqrt(np.maximum(np.diag(self.gram.sum(0)) / m - self.mean**2, 0.0))
        self.scale[self.scale < 1e-12] = 1.0
        self.X_eval, self.y_eval, self.eval_fold = self.X_eval[ok_eval], self.y_eval[ok_eval], self.fold[self.eval_pos[ok_eval]]
        counts = np.array([np.sum(self.fold != s) for s in range(self.n_cv)] + [self.n] * (self.n_splits - self.n_cv))
        self.lam = 1.0 / (np.asarray(self.Cs)[None, :] * counts[:, None])  # [splits, Cs]: 1 / (C n)

    def train(self) -> None:
        torch = self.torch
        self._statistics()
        self._plan_steps()
        shape = (self.d + 1, self.n_splits, len(self.Cs), self.k)
        self.mean_t = torch.as_tensor(self.mean, dtype=torch.float32, device=self.dev)
        self.scale_t = torch.as_tensor(self.scale, dtype=torch.float32, device=self.dev)
        self._basis()
        self.W = torch.as_tensor(self._warm_start(), dtype=torch.float32, device=self.dev).expand(shape).contiguous()
        self.m = torch.zeros_like(self.W)
        log.info("streaming %s: %d rows x %d features, %d classes, %d C values x %d splits, batch %d (in chunks of %d), "
                 "%d epochs, %s", self.h.loss, self.n, self.d, self.k, len(self.Cs), self.n_splits, self.batch, self.chunk,
                 self.n_epochs, self.dtype)
        checks = sorted({max(1, int(self.total_steps * f)) for f in EARLY_CHECKS})
        for e in range(self.n_epochs):
            t0 = time.perf_counter()
            for pos, X in prefetch(iter_blocks(self.source, self.rng)):
                # Near-equal updates of the same sizes block after block (held-out rows ride along with weight
                # 0): every new product shape is a new oneDNN primitive kept in its cache (address space).
                cuts = np.linspace(0, len(pos), -(-len(pos) // self.batch) + 1).astype(int)
                for a, b in zip(cuts[:-1], cuts[1:]):
                    self._step(pos[a:b], X[a:b])
                    if checks and self.step >= checks[0]:
                        checks = [c for c in checks if c > self.step]
                        self._score()
                        self._prune(early=True)
            self.epochs = e + 1
            self._score()
            log.info("epoch %d/%d (%.1fs): held-out %s per C %s", e + 1, self.n_epochs, time.perf_counter() - t0,
                     self.h.scoring, np.round(np.nanmean(self.scores, 1), 4).tolist())
            if e + 1 < self.n_epochs and self.step >= self.total_steps // 4:  # not before a quarter of the updates
                self._prune()

    def _plan_steps(self) -> None:
        """Rows per update (``batch``), rows per matrix product (``chunk``: the logits' memory bound), epochs.

        Why: each update touches every weight of every head, so on a large cache bigger updates
        (up to 4,096 rows, keeping at least :data:`MIN_STEPS` updates over the run) cost less per
        row; each update's gradient is summed over chunks whose logits fit :data:`BATCH_FLOATS`.
        """
        heads = self.n_splits * len(self.Cs) * self.k
        epochs = int(self.h.epochs)
        fit = min(self.n // 8, max(BATCH_FLOATS // heads, self.n * epochs // (2 * MIN_STEPS)))  # >= 8 steps per epoch
        self.batch = int(min(4096, 2 ** math.floor(math.log2(max(64, fit)))))
        self.chunk = int(min(self.batch, max(64, BATCH_FLOATS // heads)))
        blocks = math.ceil(self.n / block_rows(self.d))  # each block is cut into near-equal updates
        steps_per_epoch = max(1, blocks * math.ceil(self.n / blocks / self.batch))
        self.n_epochs = max(epochs, math.ceil(MIN_STEPS / steps_per_epoch))
        self.total_steps, self.step = self.n_epochs * steps_per_epoch, 0

    def _warm_start(self) -> np.ndarray:
        """[d + 1, splits, 1, classes]: linear discriminant analysis (shrunk covariance) of each split's rows.

        Why: from zero, a thousand classes need many passes before the logits mean anything; the class means
        (in standardised units, from the statistics pass) give a classifier that the optimisation only refines.
        Each split's start is fitted on its own training rows, scaled on a sample of its held-out rows.
        """
        out = np.zeros((self.d + 1, self.n_splits, 1, self.k))
        total_s, total_n, total_g = self.class_sums.sum(0), self.class_counts.sum(0), self.gram.sum(0)
        temps: list[float] = []
        for s in range(self.n_splits):
            drop = s + 1 if s < self.n_cv else None  # the refit split uses every row
            sums = total_s - (self.class_sums[drop] if drop is not None else 0)
            cnt = total_n - (self.class_counts[drop] if drop is not None else 0)
            gram = total_g - (self.gram[drop] if drop is not None else 0)
            W, b = lda(sums, cnt, gram, self.mean, self.scale)
            W = self.U.T @ W  # in the rotated basis the heads train in
            if self.h.loss == "squared_hinge":
                rows = calibration_rows(np.arange(len(self.X_eval)), seed=self.h.seed)
                W, b = hinge_scaled(W, b, self._design(self.X_eval[rows]).cpu().numpy().astype(np.float64))
            elif s < self.n_cv:  # scaled on this split's own held-out rows (the refit split: the folds' median)
                rows = calibration_rows(np.flatnonzero(self.eval_fold == s), seed=self.h.seed)
                Z = self._design(self.X_eval[rows]).cpu().numpy().astype(np.float64)
                temps.append(softmax_temperature(Z[:, :-1] @ W + b, self.y_eval[rows]))
                W, b = W * temps[-1], b * temps[-1]
            else:
                W, b = W * float(np.median(temps)), b * float(np.median(temps))
            out[:-1, s, 0], out[-1, s, 0] = W, b
        return out

    def _basis(self) -> None:
        """The eigenbasis ``U`` of the standardised features' covariance (from the statistics pass) and
        each weight's curvature bound there: the heads train on rotated features ``Z U``.

        Why: in that basis the data part of the Hessian is bounded by a diagonal (Böhning's bound:
        the softmax's curvature is at most 1/2, the squared hinge's 2, times the covariance's
        eigenvalue), so a step ``-g / (bound * eigenvalue + 1 / (C n))`` is a majorise-minimise step
        for the full-data objective (a split's or a minibatch's Gram is only nearly diagonal there),
        whatever the scale and correlation of the features and whatever C.  (Adam moved every weight
        by about its learning rate even where the gradient was noise: BENCHMARKS.md, 2 Dec.)
        """
        torch = self.torch
        m = max(1.0, float(self.class_counts.sum()))
        G = self.gram.sum(0) / m
        cov = (G - np.outer(self.mean, self.mean)) / np.outer(self.scale, self.scale)
        ev, U = np.linalg.eigh((cov + cov.T) / 2)
        self.U = U
        self.U_t = torch.as_tensor(U, dtype=torch.float32, device=self.dev)
        bound = 0.5 if self.h.loss == "logistic" else 2.0
        # [d + 1]; the intercept's feature is the constant 1.  Directions of almost no variance get the floor:
        # a minibatch's gradient there is mostly noise, which the exact bound would amplify without limit.
        curv = bound * np.r_[np.maximum(ev, CURVATURE_FLOOR), 1.0]
        inv = 1.0 / (curv[:, None, None] + self.lam[None, :, :])  # [d + 1, splits, Cs]
        if self.h.loss == "logistic":
            inv[-1] = 1.0 / curv[-1]  # the intercept is not penalised
        self.inv_curv = torch.as_tensor(inv, dtype=torch.float32, device=self.dev)[..., None]

    def _design(self, X: np.ndarray):
        torch = self.torch
        Z = (torch.as_tensor(X, device=self.dev, dtype=torch.float32) - self.mean_t) / self.scale_t
        return torch.cat([Z @ self.U_t, torch.ones(len(Z), 1, device=self.dev)], 1)

    def _logits(self, Z, W, Wf=None):
        """[rows, splits, active Cs, classes] scores of ``Z`` under weights ``W`` (fast dtype products;
        ``Wf``: ``W`` already flattened and cast)."""
        Wf = W.reshape(self.d + 1, -1).to(self.dtype) if Wf is None else Wf
        return (Z.to(self.dtype) @ Wf).float().reshape(Z.shape[0], *W.shape[1:])

    def _step(self, pos: np.ndarray, X: np.ndarray) -> None:
        """One update on rows ``pos`` (features ``X``): the gradient summed over chunks of rows."""
        torch = self.torch
        fold = torch.as_tensor(self.fold[pos], device=self.dev)
        use = torch.stack([fold != s for s in range(self.n_cv)] +
                          [torch.ones_like(fold, dtype=torch.bool)] * (self.n_splits - self.n_cv), 1).float()
        use /= use.sum(0).clamp(min=1)  # [rows, splits]: each split's mean over its own rows
        Wf = self.W.reshape(self.d + 1, -1).to(self.dtype)
        grad = None
        chunk = max(self.chunk, BATCH_FLOATS // (self.n_splits * len(self.active) * self.k))  # more once heads stop
        for a in range(0, len(pos), chunk):
            g = self._chunk_grad(pos[a : a + chunk], X[a : a + chunk], use[a : a + chunk], Wf)
            grad = g if grad is None else grad.add_(g)
        lam = torch.as_tensor(self.lam[:, self.active], dtype=torch.float32, device=self.dev)[None, :, :, None]
        pen = self.W * lam
        if self.h.loss == "logistic":
            pen[-1] = 0  # intercept not penalised (LogisticRegression); LinearSVC penalises it
        grad.add_(pen)
        self._update(grad)

    def _chunk_grad(self, pos: np.ndarray, X: np.ndarray, use, Wf):
        """Gradient of the weighted data loss of rows ``pos`` for every head, shaped like ``W``."""
        torch = self.torch
        Z = self._design(X)
        y = torch.as_tensor(self.yi[pos], device=self.dev)
        S = self._logits(Z, self.W, Wf)
        Y = torch.zeros_like(S[:, 0, 0]).scatter_(1, y[:, None], 1.0)[:, None, None, :]
        if self.h.loss == "logistic":
            G = torch.softmax(S, dim=3).sub_(Y)
        else:
            sgn = 2 * Y - 1
            G = (1 - sgn * S).clamp_(min=0).mul_(sgn).mul_(-2)
        G.mul_(use[:, :, None, None])
        return (Z.to(self.dtype).T @ G.reshape(len(Z), -1).to(self.dtype)).float().reshape(self.W.shape)

    def _update(self, grad, b1: float = 0.9) -> None:
        """W -= lr * momentum(grad) / (curvature bound + 1 / (C n)): a damped majorise-minimise step
        per head (``lr`` 1 is the full step), warmed up then cosine-annealed over the run."""
        self.step += 1
        warm = max(1, self.total_steps // 20)
        t = self.step
        lr = self.h.lr * (t / warm if t <= warm else 0.5 * (1 + math.cos(math.pi * min(1.0, (t - warm) / max(1, self.total_steps - warm)))))
        self.m.mul_(b1).add_(grad, alpha=1 - b1)
        idx = self.torch.as_tensor(self.active, device=self.dev)
        self.W.addcmul_(self.m / (1 - b1**t), self.inv_curv.index_select(2, idx), value=-lr)

    # -- scoring and pruning
    def _eval_scores(self, W) -> np.ndarray:
        """Decision values [held-out rows, splits, active Cs, classes] in blocks (float32)."""
        out = np.empty((len(self.X_eval), *W.shape[1:]), np.float32)
        for a in range(0, len(self.X_eval), 2048):
            out[a : a + 2048] = self._logits(self._design(self.X_eval[a : a + 2048]), W).cpu().numpy()
        return out

    def _predictions(self) -> np.ndarray:
        """Held-out predicted labels [rows, active Cs], each row by the head of its own fold."""
        preds = np.empty((len(self.X_eval), len(self.active)), np.int64)
        for a in range(0, len(self.X_eval), 2048):
            s = self._logits(self._design(self.X_eval[a : a + 2048]), self.W[:, : self.n_cv])
            f = self.torch.as_tensor(self.eval_fold[a : a + 2048], device=self.dev)
            own = s[self.torch.arange(len(f), device=self.dev), f]  # [rows, Cs, classes]
            preds[a : a + 2048] = own.argmax(2).cpu().numpy()
        return preds

    def _score(self) -> None:
        self.preds = self._predictions()
        for j, c in enumerate(self.active):
            for f in range(self.n_cv):
                m = self.eval_fold == f
                yt, yp = self.y_eval[m], self.preds[m, j]
                self.scores[c, f] = np.mean(yt == yp) if self.h.scoring == "accuracy" else \
                    score_predictions(self.h.scoring, yt, yp)

    def _prune(self, *, early: bool = False) -> None:
        """Stop the heads clearly worse than the best, or predicting as a smaller C does (``early``: within
        the first quarter of the updates, where only a wider margin counts as clearly worse)."""
        mean = self.scores[self.active].mean(1)
        best = float(mean.max())
        if best < 2.0 / self.k:  # nothing learned yet: no score tells the heads apart
            return
        se = math.sqrt(max(best * (1 - best), 1e-6) / max(1, len(self.y_eval)))
        keep = []
        for j, c in enumerate(self.active):
            if mean[j] < best - max(PRUNE_MARGIN * (EARLY_MARGIN if early else 1), 2 * se):
                self.pruned[f"{self.Cs[c]:.3g}"] = f"held-out score {mean[j]:.4f} after {self._when()} (best {best:.4f})"
            elif keep and np.mean(self.preds[:, j] == self.preds[:, keep[-1][0]]) >= SAME_PREDICTIONS:
                self.pruned[f"{self.Cs[c]:.3g}"] = f"same held-out predictions as C={self.Cs[keep[-1][1]]:.3g}"
            else:
                keep.append((j, c))
        if len(keep) < len(self.active):
            idx = [j for j, _ in keep]
            self.W, self.m = (t[:, :, idx].contiguous() for t in (self.W, self.m))
            self.active = [c for _, c in keep]
            log.info("streaming: %d of %d C values continue training after %s", len(self.active), len(self.Cs), self._when())

    def _when(self) -> str:
        return f"update {self.step:,} of {self.total_steps:,} (epoch {self.step * self.n_epochs / self.total_steps:.2f})"

    def best_index(self) -> int:
        """The best held-out (mean CV) score among the heads trained to the end; ties to the smaller C."""
        mean = self.scores.mean(1)
        return max(self.active, key=lambda c: (mean[c], -c))

    def weights(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        """(coef [classes, d], intercept [classes]) of C value ``c`` (its refit head with CV), in raw features."""
        W = self.W[:, -1, self.active.index(c)].cpu().numpy().astype(np.float64)  # [d + 1, classes], rotated
        coef = (self.U @ W[:-1]) / self.scale[:, None]
        return coef.T.astype(np.float32), (W[-1] - self.mean @ coef).astype(np.float32)

    def held_out_decision(self, c: int) -> np.ndarray:
        """Decision values of C value ``c`` on the held-out rows, each by its own fold's head."""
        s = self._eval_scores(self.W[:, : self.n_cv, [self.active.index(c)]])[:, :, 0]
        return s[np.arange(len(s)), self.eval_fold]


def create_stream_head(name: str, *, kernel: str, grid: dict, folds: int, seed: int, device: str, scoring: str,
                       epochs: int | None = None) -> StreamingLinearHead | StreamingKNN:
    """The streaming head for ``name`` (logreg, the linear SVM, or kNN); other heads are refused with the fix.

    ``epochs``: passes over the rows of a linear head (None: the head's default)."""
    if name == "knn":
        return StreamingKNN(grid=grid, folds=folds, seed=seed, scoring=scoring)
    if name not in LINEAR_HEADS or kernel != "linear" or set(grid) != {"C"}:
        raise FeatxError(f"--solver stream trains logreg, the linear SVM and knn; head {name!r} (kernel {kernel}) needs "
                         "the in-memory solver: use --solver memory with --max-train-rows N")
    return StreamingLinearHead(loss="logistic" if name == "logreg" else "squared_hinge", Cs=tuple(grid["C"]),
                               folds=folds, seed=seed, scoring=scoring, device=device,
                               **({} if epochs is None else {"epochs": epochs}))


def stream_candidates(cands: list[tuple[str, str, int]]) -> list[tuple[str, str, int]]:
    """The (view, norm, augmented views) candidates a streamed probe scores: the plain rows only."""
    plain = list(dict.fromkeys((v, n, 0) for v, n, _ in cands))
    if len(plain) < len(cands):
        log.warning("streaming: the augmented training views are not used (--train-views off)")
    return plain


def fit_streamed(rows, cand: tuple[str, str, int], plan: SearchPlan, *, refit: bool = False):
    """(fitted head, its streaming search, Candidate row) of one (view, norm) on streamed training rows.

    :func:`featx.heads.tuning.selection.fit_candidate`'s contract for ``select(..., fit=fit_streamed)``; ``rows``
    holds the cache (``fc``), the training rows' cache row numbers (``tr``) and labels (``y_tr``).
    """
    view, norm, _ = cand
    inner = create_stream_head(plan.name, kernel=plan.kernel, grid=plan.grid, folds=plan.folds, seed=plan.seed,
                               device=plan.device, scoring=plan.scoring, epochs=plan.stream_epochs)
    log.info("%s streamed %s on %d rows of view %s, norm %s", "refitting the chosen" if refit else "fitting",
             plan.name, len(rows.tr), view, norm)
    t0 = time.perf_counter()
    inner.fit(CacheSource(rows.fc, rows.tr, view=view, norm=norm), rows.y_tr)
    est = with_norm(inner, norm)
    if est is not inner:  # the normalisation was applied while reading: fit its (stateless) step alone
        est.steps[0][1].fit(np.zeros((1, inner.n_features_in_), np.float32))
    row = Candidate(view, norm, 0, int(inner.n_features_in_), float(inner.best_score_), fold_std_err(inner),
                    dict(inner.params_), time.perf_counter() - t0)
    return est, inner, row
