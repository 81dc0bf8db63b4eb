"""The training of the streamed linear heads, along its seams (as DINOv2's linear evaluation is cut).

* the selection rows and the statistics pass (:func:`plan_folds`, :func:`statistics_pass`): which rows
  choose C, and the features' mean, scale, class sums and Gram matrix per fold;
* the set of heads (:class:`HeadSet`): one head per (split, C), all trained together, warm-started by
  :func:`warm_start` in the eigenbasis of :func:`curvature_basis`;
* one step (:func:`train_step`): the gradient of every head on one minibatch, then a damped
  majorise-minimise momentum step;
* evaluate and pick (:func:`score_heads`, :func:`prune`, :func:`best_index`): held-out scores, the heads
  that stop early, the chosen C.

:class:`featx.heads.stream.linear_head.StreamingLinearHead` runs them; the reasons for each choice are
in that module's docstring.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from ...base.errors import FeatxError
from ..tuning.cv import score_predictions
from .init import calibration_rows, class_sums, hinge_scaled, lda, softmax_temperature
from .source import block_rows, iter_blocks, prefetch, selection_folds, uses_kfold

log = logging.getLogger(__name__)

# Floats per minibatch in each [rows, heads x classes] array (logits, gradients): bounds their memory.
BATCH_FLOATS = 16 << 20
MIN_STEPS = 300  # small caches get more epochs, so that every head sees enough updates
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


# --------------------------------------------------------------------------- selection rows, statistics, schedule


@dataclass
class Folds:
    """Which rows choose C: ``fold`` of each row (-1: in no held-out fold), ``n_cv`` folds, ``n_splits`` heads
    per C (k-fold CV: + a refit head on all rows), ``eval_pos`` the held-out rows' positions."""

    fold: np.ndarray
    n_cv: int
    n_splits: int
    eval_pos: np.ndarray


def plan_folds(yi: np.ndarray, *, folds: int, seed: int) -> Folds:
    fold, n_cv = selection_folds(yi, folds=folds, seed=seed)
    return Folds(fold, n_cv, n_cv + (1 if uses_kfold(len(yi)) else 0), np.flatnonzero(fold >= 0))


@dataclass
class Statistics:
    """The statistics pass: per fold (index fold + 1; 0: rows in no held-out fold) class sums, counts and
    X^T X; the features' mean and scale (StandardScaler's); the held-out rows kept (float16 if large)."""

    class_sums: np.ndarray
    class_counts: np.ndarray
    gram: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    X_eval: np.ndarray
    y_eval: np.ndarray
    eval_fold: np.ndarray


def statistics_pass(source, yi: np.ndarray, folds: Folds, k: int) -> Statistics:
    """One pass over the rows: the warm start's sums of each split and the held-out rows."""
    d, n_cv, fold, eval_pos = source.dim, folds.n_cv, folds.fold, folds.eval_pos
    m = 0
    sums, counts, gram = np.zeros((n_cv + 1, k, d)), np.zeros((n_cv + 1, k)), np.zeros((n_cv + 1, d, d))
    keep_dtype = np.float16 if len(eval_pos) * d > 64 << 20 else np.float32
    X_eval = np.zeros((len(eval_pos), d), keep_dtype)
    ok_eval = np.zeros(len(eval_pos), bool)
    for pos, X in prefetch(iter_blocks(source, None)):
        m += len(X)
        f1 = fold[pos] + 1
        np.add.at(counts, (f1, yi[pos]), 1)
        for f in np.unique(f1):
            sel = f1 == f
            sums[f] += class_sums(X[sel], yi[pos[sel]], k)
            gram[f] += X[sel].T @ X[sel]
        j = np.searchsorted(eval_pos, pos)
        hit = (j < len(eval_pos)) & (eval_pos[np.minimum(j, len(eval_pos) - 1)] == pos)
        X_eval[j[hit]], ok_eval[j[hit]] = X[hit], True
    if m == 0:
        raise FeatxError("no training row has finite features; rebuild the cache with `featx embed ... --overwrite`")
    mean = sums.sum((0, 1)) / m
    scale = np.sqrt(np.maximum(np.diag(gram.sum(0)) / m - mean**2, 0.0))
    scale[scale < 1e-12] = 1.0
    return Statistics(sums, counts, gram, mean, scale, X_eval[ok_eval], yi[eval_pos][ok_eval], fold[eval_pos[ok_eval]])


def penalties(folds: Folds, n: int, Cs: list[float]) -> np.ndarray:
    """[splits, Cs]: 1 / (C n) with n the rows each split trains on."""
    counts = np.array([np.sum(folds.fold != s) for s in range(folds.n_cv)] + [n] * (folds.n_splits - folds.n_cv))
    return 1.0 / (np.asarray(Cs)[None, :] * counts[:, None])


@dataclass
class Schedule:
    """Rows per update (``batch``), rows per matrix product (``chunk``), epochs, and the updates made so far."""

    batch: int
    chunk: int
    n_epochs: int
    total_steps: int
    step: int = 0

    def lr(self, peak: float) -> float:
        """The share of the full step at update ``step``: warmed up, then cosine-annealed over the run."""
        warm = max(1, self.total_steps // 20)
        t = self.step
        return peak * (t / warm if t <= warm else 0.5 * (1 + math.cos(math.pi * min(1.0, (t - warm) / max(1, self.total_steps - warm)))))

    def when(self) -> str:
        return f"update {self.step:,} of {self.total_steps:,} (epoch {self.step * self.n_epochs / self.total_steps:.2f})"


def plan_steps(n: int, d: int, heads: int, epochs: int) -> Schedule:
    """The schedule of ``heads`` (splits x Cs x classes) outputs on ``n`` rows of ``d`` features.

    Why: each update touches every weight of every head, so on a large cache bigger updates
    (up to 4,096 rows, keeping at least :data:`MIN_STEPS` updates over the run) cost less per
    row; each update's gradient is summed over chunks whose logits fit :data:`BATCH_FLOATS`.
    """
    fit = min(n // 8, max(BATCH_FLOATS // heads, n * epochs // (2 * MIN_STEPS)))  # >= 8 steps per epoch
    batch = int(min(4096, 2 ** math.floor(math.log2(max(64, fit)))))
    chunk = int(min(batch, max(64, BATCH_FLOATS // heads)))
    blocks = math.ceil(n / block_rows(d))  # each block is cut into near-equal updates
    steps_per_epoch = max(1, blocks * math.ceil(n / blocks / batch))
    n_epochs = max(epochs, math.ceil(MIN_STEPS / steps_per_epoch))
    return Schedule(batch, chunk, n_epochs, n_epochs * steps_per_epoch)


# --------------------------------------------------------------------------- the set of heads


def curvature_basis(stats: Statistics, lam: np.ndarray, loss: str) -> tuple[np.ndarray, np.ndarray]:
    """(``U``, step scale [d + 1, splits, Cs]): the eigenbasis of the standardised features' covariance and
    each weight's inverse curvature bound there; the heads train on rotated features ``Z U``.

    Why: in that basis the data part of the Hessian is bounded by a diagonal (Böhning's bound:
    the softmax's curvature is at most 1/2, the squared hinge's 2, times the covariance's
    eigenvalue), so a step ``-g / (bound * eigenvalue + 1 / (C n))`` is a majorise-minimise step
    for the full-data objective (a split's or a minibatch's Gram is only nearly diagonal there),
    whatever the scale and correlation of the features and whatever C.  (Adam moved every weight
    by about its learning rate even where the gradient was noise: BENCHMARKS.md, 2 Dec.)
    """
    m = max(1.0, float(stats.class_counts.sum()))
    G = stats.gram.sum(0) / m
    cov = (G - np.outer(stats.mean, stats.mean)) / np.outer(stats.scale, stats.scale)
    ev, U = np.linalg.eigh((cov + cov.T) / 2)
    bound = 0.5 if loss == "logistic" else 2.0
    # [d + 1]; the intercept's feature is the constant 1.  Directions of almost no variance get the floor:
    # a minibatch's gradient there is mostly noise, which the exact bound would amplify without limit.
    curv = bound * np.r_[np.maximum(ev, CURVATURE_FLOOR), 1.0]
    inv = 1.0 / (curv[:, None, None] + lam[None, :, :])  # [d + 1, splits, Cs]
    if loss == "logistic":
        inv[-1] = 1.0 / curv[-1]  # the intercept is not penalised
    return U, inv


class HeadSet:
    """Every (split, C) head, trained together: weights ``W`` [d + 1, splits, active Cs, classes] on the
    standardised features rotated by ``U`` (last row: the intercept), their momentum ``m``, and which C
    values still train (``active``)."""

    def __init__(self, stats: Statistics, U: np.ndarray, inv: np.ndarray, lam: np.ndarray, *, loss: str, dev: str,
                 dtype) -> None:
        import torch

        self.torch, self.loss, self.dev, self.dtype, self.lam = torch, loss, dev, dtype, lam
        self.d, self.k = len(stats.mean), stats.class_sums.shape[1]
        self.mean, self.scale, self.U = stats.mean, stats.scale, U
        self.mean_t = torch.as_tensor(stats.mean, dtype=torch.float32, device=dev)
        self.scale_t = torch.as_tensor(stats.scale, dtype=torch.float32, device=dev)
        self.U_t = torch.as_tensor(U, dtype=torch.float32, device=dev)
        self.inv_curv = torch.as_tensor(inv, dtype=torch.float32, device=dev)[..., None]
        self.active = list(range(lam.shape[1]))
        self.W = self.m = None

    def start(self, W0: np.ndarray) -> None:
        """Every C of each split from that split's warm start ``W0`` [d + 1, splits, 1, classes]."""
        shape = (self.d + 1, W0.shape[1], len(self.active), self.k)
        self.W = self.torch.as_tensor(W0, dtype=self.torch.float32, device=self.dev).expand(shape).contiguous()
        self.m = self.torch.zeros_like(self.W)

    def design(self, X: np.ndarray):
        torch = self.torch
        Z = (torch.as_tensor(X, device=self.dev, dtype=torch.float32) - self.mean_t) / self.scale_t
        return torch.cat([Z @ self.U_t, torch.ones(len(Z), 1, device=self.dev)], 1)

    def logits(self, Z, W, Wf=None):
        """[rows, splits, active Cs, classes] scores of ``Z`` under weights ``W`` (fast dtype products;
        ``Wf``: ``W`` already flattened and cast)."""
        Wf = W.reshape(self.d + 1, -1).to(self.dtype) if Wf is None else Wf
        return (Z.to(self.dtype) @ Wf).float().reshape(Z.shape[0], *W.shape[1:])

    def keep(self, idx: list[int]) -> None:
        """Only the active C values at indices ``idx`` train on."""
        self.W, self.m = (t[:, :, idx].contiguous() for t in (self.W, self.m))
        self.active = [self.active[j] for j in idx]

    def weights(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        """(coef [classes, d], intercept [classes]) of C value ``c`` (its refit head with CV), in raw features."""
        W = self.W[:, -1, self.active.index(c)].cpu().numpy().astype(np.float64)  # [d + 1, classes], rotated
        coef = (self.U @ W[:-1]) / self.scale[:, None]
        return coef.T.astype(np.float32), (W[-1] - self.mean @ coef).astype(np.float32)


def warm_start(stats: Statistics, heads: HeadSet, folds: Folds, *, loss: str, seed: int) -> np.ndarray:
    """[d + 1, splits, 1, classes]: linear discriminant analysis (shrunk covariance) of each split's rows.

    Why: from zero, a thousand classes need many passes before the logits mean anything; the class means
    (in standardised units, from the statistics pass) give a classifier that the optimisation only refines.
    Each split's start is fitted on its own training rows, scaled on a sample of its held-out rows.
    """
    out = np.zeros((heads.d + 1, folds.n_splits, 1, heads.k))
    total_s, total_n, total_g = stats.class_sums.sum(0), stats.class_counts.sum(0), stats.gram.sum(0)
    temps: list[float] = []
    for s in range(folds.n_splits):
        drop = s + 1 if s < folds.n_cv else None  # the refit split uses every row
        sums = total_s - (stats.class_sums[drop] if drop is not None else 0)
        cnt = total_n - (stats.class_counts[drop] if drop is not None else 0)
        gram = total_g - (stats.gram[drop] if drop is not None else 0)
        W, b = lda(sums, cnt, gram, stats.mean, stats.scale)
        W = heads.U.T @ W  # in the rotated basis the heads train in
        if loss == "squared_hinge":
            rows = calibration_rows(np.arange(len(stats.X_eval)), seed=seed)
            W, b = hinge_scaled(W, b, heads.design(stats.X_eval[rows]).cpu().numpy().astype(np.float64))
        elif s < folds.n_cv:  # scaled on this split's own held-out rows (the refit split: the folds' median)
            rows = calibration_rows(np.flatnonzero(stats.eval_fold == s), seed=seed)
            Z = heads.design(stats.X_eval[rows]).cpu().numpy().astype(np.float64)
            temps.append(softmax_temperature(Z[:, :-1] @ W + b, stats.y_eval[rows]))
            W, b = W * temps[-1], b * temps[-1]
        else:
            W, b = W * float(np.median(temps)), b * float(np.median(temps))
        out[:-1, s, 0], out[-1, s, 0] = W, b
    return out


# --------------------------------------------------------------------------- one step


def train_step(heads: HeadSet, sched: Schedule, rows: tuple, folds: Folds, lr: float) -> None:
    """One update of every active head on ``rows`` = (positions, features, labels): the gradient summed over
    chunks of rows, the L2 penalty, then W -= lr * momentum(grad) / (curvature bound + 1 / (C n)) (``lr`` 1 is
    the full step at the peak of the schedule)."""
    torch = heads.torch
    pos, X, y = rows
    n_splits, n_cv = folds.n_splits, folds.n_cv
    fold = torch.as_tensor(folds.fold[pos], device=heads.dev)
    use = torch.stack([fold != s for s in range(n_cv)] +
                      [torch.ones_like(fold, dtype=torch.bool)] * (n_splits - n_cv), 1).float()
    use /= use.sum(0).clamp(min=1)  # [rows, splits]: each split's mean over its own rows
    Wf = heads.W.reshape(heads.d + 1, -1).to(heads.dtype)
    grad = None
    chunk = max(sched.chunk, BATCH_FLOATS // (n_splits * len(heads.active) * heads.k))  # more once heads stop
    for a in range(0, len(pos), chunk):
        g = _chunk_grad(heads, X[a : a + chunk], y[a : a + chunk], use[a : a + chunk], Wf)
        grad = g if grad is None else grad.add_(g)
    lam = torch.as_tensor(heads.lam[:, heads.active], dtype=torch.float32, device=heads.dev)[None, :, :, None]
    pen = heads.W * lam
    if heads.loss == "logistic":
        pen[-1] = 0  # intercept not penalised (LogisticRegression); LinearSVC penalises it
    grad.add_(pen)
    sched.step += 1
    b1, t = 0.9, sched.step
    heads.m.mul_(b1).add_(grad, alpha=1 - b1)
    idx = torch.as_tensor(heads.active, device=heads.dev)
    heads.W.addcmul_(heads.m / (1 - b1**t), heads.inv_curv.index_select(2, idx), value=-sched.lr(lr))


def _chunk_grad(heads: HeadSet, X: np.ndarray, y: np.ndarray, use, Wf):
    """Gradient of the weighted data loss of rows ``X`` (labels ``y``) for every head, shaped like ``W``."""
    torch = heads.torch
    Z = heads.design(X)
    y = torch.as_tensor(y, device=heads.dev)
    S = heads.logits(Z, heads.W, Wf)
    Y = torch.zeros_like(S[:, 0, 0]).scatter_(1, y[:, None], 1.0)[:, None, None, :]
    if heads.loss == "logistic":
        G = torch.softmax(S, dim=3).sub_(Y)
    else:
        sgn = 2 * Y - 1
        G = (1 - sgn * S).clamp_(min=0).mul_(sgn).mul_(-2)
    G.mul_(use[:, :, None, None])
    return (Z.to(heads.dtype).T @ G.reshape(len(Z), -1).to(heads.dtype)).float().reshape(heads.W.shape)


# --------------------------------------------------------------------------- evaluate and pick


def held_out_predictions(heads: HeadSet, stats: Statistics, n_cv: int) -> np.ndarray:
    """Held-out predicted labels [rows, active Cs], each row by the head of its own fold."""
    preds = np.empty((len(stats.X_eval), len(heads.active)), np.int64)
    for a in range(0, len(stats.X_eval), 2048):
        s = heads.logits(heads.design(stats.X_eval[a : a + 2048]), heads.W[:, :n_cv])
        f = heads.torch.as_tensor(stats.eval_fold[a : a + 2048], device=heads.dev)
        own = s[heads.torch.arange(len(f), device=heads.dev), f]  # [rows, Cs, classes]
        preds[a : a + 2048] = own.argmax(2).cpu().numpy()
    return preds


def score_heads(scores: np.ndarray, preds: np.ndarray, stats: Statistics, active: list[int], scoring: str) -> None:
    """``scores`` [Cs, folds] of the active heads (in place) from their held-out predictions ``preds``."""
    for j, c in enumerate(active):
        for f in range(scores.shape[1]):
            m = stats.eval_fold == f
            yt, yp = stats.y_eval[m], preds[m, j]
            scores[c, f] = np.mean(yt == yp) if scoring == "accuracy" else score_predictions(scoring, yt, yp)


def prune(heads: HeadSet, scores: np.ndarray, preds: np.ndarray, Cs: list[float], pruned: dict, *, n_eval: int,
          when: str, early: bool = False) -> None:
    """Stop the heads clearly worse than the best, or predicting as a smaller C does (``early``: within
    the first quarter of the updates, where only a wider margin counts as clearly worse); ``pruned``
    records why (C -> reason)."""
    mean = scores[heads.active].mean(1)
    best = float(mean.max())
    if best < 2.0 / heads.k:  # nothing learned yet: no score tells the heads apart
        return
    se = math.sqrt(max(best * (1 - best), 1e-6) / max(1, n_eval))
    keep = []
    for j, c in enumerate(heads.active):
        if mean[j] < best - max(PRUNE_MARGIN * (EARLY_MARGIN if early else 1), 2 * se):
            pruned[f"{Cs[c]:.3g}"] = f"held-out score {mean[j]:.4f} after {when} (best {best:.4f})"
        elif keep and np.mean(preds[:, j] == preds[:, keep[-1][0]]) >= SAME_PREDICTIONS:
            pruned[f"{Cs[c]:.3g}"] = f"same held-out predictions as C={Cs[keep[-1][1]]:.3g}"
        else:
            keep.append((j, c))
    if len(keep) < len(heads.active):
        heads.keep([j for j, _ in keep])
        log.info("streaming: %d of %d C values continue training after %s", len(heads.active), len(Cs), when)


def best_index(scores: np.ndarray, active: list[int]) -> int:
    """The best held-out (mean CV) score among the heads trained to the end; ties to the smaller C."""
    mean = scores.mean(1)
    return max(active, key=lambda c: (mean[c], -c))


def held_out_decision(heads: HeadSet, stats: Statistics, n_cv: int, c: int) -> np.ndarray:
    """Decision values of C value ``c`` on the held-out rows, each by its own fold's head (float32)."""
    W = heads.W[:, :n_cv, [heads.active.index(c)]]
    out = np.empty((len(stats.X_eval), *W.shape[1:]), np.float32)
    for a in range(0, len(stats.X_eval), 2048):
        out[a : a + 2048] = heads.logits(heads.design(stats.X_eval[a : a + 2048]), W).cpu().numpy()
    s = out[:, :, 0]
    return s[np.arange(len(s)), stats.eval_fold]
