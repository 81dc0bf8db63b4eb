"""The tensor work of the torch heads: device and matmul precision, the batched L-BFGS, standardisation.

Separate from the estimators (:mod:`featx.heads.estimators.torch_heads`) so that each reads on its own: this module
knows tensors, not scikit-learn.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable

import numpy as np

from ..tuning.cv import cv_splits, fold_plan

log = logging.getLogger(__name__)


def torch_device(device: str):
    """The torch device to compute on: CUDA when asked for and present, else the CPU."""
    import torch

    d = (device or "cpu").lower()
    if d == "auto":
        d = "cuda" if torch.cuda.is_available() else "cpu"
    if d.startswith("cuda") and not torch.cuda.is_available():
        log.warning("CUDA is not available here; running the torch head on the CPU")
        d = "cpu"
    return torch.device(d)


def fast_matmul(dev, work: float = 0.0):
    """Full fp32 matrix products on CUDA for the duration of a fit, whatever the process set.

    Not TF32: the line search compares objective values that differ in their last digits, and
    kNN's exact-duplicate rule (distance <= 0) needs exact distances.

    On the CPU, a small problem (``work`` = rows x features below 2e7) runs on one intra-op
    thread: its many tiny ops otherwise spend their time in OpenMP barriers (3-10x slower on
    a loaded 2-core machine).
    """
    import torch  # heavy: only when a torch head is fitted

    @contextlib.contextmanager
    def ctx():
        if dev.type != "cuda":
            old = torch.get_num_threads()
            if work < 2e7 and old > 1:
                torch.set_num_threads(1)
            try:
                yield
            finally:
                if torch.get_num_threads() != old:
                    torch.set_num_threads(old)
            return
        old = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(old)

    return ctx()


def fold_splits(y: np.ndarray, folds, seed: int) -> tuple[list[tuple[np.ndarray, np.ndarray]], dict]:
    """The CV splits of the scikit-learn heads (:func:`featx.heads.tuning.cv.cv_splits`) and their plan."""
    return cv_splits(y, folds, seed), fold_plan(y, folds)


def bdot(a, b):
    """Per-problem dot products of [G, ...] tensors -> [G]."""
    return (a * b).flatten(1).sum(1)


def two_loop(ga, S, Y, R, act, n_hist: int, history: int):
    """L-BFGS two-loop recursion for the active problems: (descent direction, g.d)."""
    import torch  # heavy: only when a torch head is fitted

    view = lambda t, x: t.view((-1,) + (1,) * (x.dim() - 1))  # noqa: E731
    h = min(n_hist, history)
    order = [(n_hist - 1 - j) % history for j in range(h)]  # newest first
    q = ga.clone()
    alphas = []
    for slot in order:
        s, y, r = S[slot, act], Y[slot, act], R[slot, act]
        a = r * bdot(s, q)
        alphas.append(a)
        q -= view(a, q) * y
    if h:
        s, y = S[order[0], act], Y[order[0], act]
        sy, yy = bdot(s, y), bdot(y, y)
        gamma = torch.where((yy > 0) & (sy > 0), sy / yy.clamp_min(1e-30), 1.0 / ga.flatten(1).norm(dim=1).clamp_min(1.0))
        q *= view(gamma, q)
    else:
        q /= view(ga.flatten(1).norm(dim=1).clamp_min(1.0), q)
    for slot, a in zip(reversed(order), reversed(alphas)):
        s, y, r = S[slot, act], Y[slot, act], R[slot, act]
        b = r * bdot(y, q)
        q += view(a - b, q) * s
    d = -q
    bad = bdot(ga, d) >= 0  # not a descent direction: steepest descent instead (no host sync to ask)
    d = torch.where(view(bad, d), -ga, d)
    return d, bdot(ga, d)


def batched_lbfgs(
    fun: Callable, w0, *, max_iter: int = 500, history: int = 10, gtol: float = 1e-5, ftol: float = 1e-10
):
    """Minimise G independent smooth convex objectives at once.

    ``fun(W, sel) -> (f [g], grad like W)`` evaluates the problems with indices ``sel`` (a
    LongTensor of length g) at ``W`` [g, ...].  Each problem has its own L-BFGS memory and its
    own Armijo backtracking step, so a badly conditioned problem (a large C) never shrinks the
    step of a well conditioned one, and only problems that have not converged are computed.
    Returns (W, f, iterations per problem).  One host synchronisation per line-search trial
    (which problems still search) and one per iteration (which are still active).
    """
    import torch

    w = w0.clone()
    G = w.shape[0]
    dev = w.device
    view = lambda t, x: t.view((-1,) + (1,) * (x.dim() - 1))  # noqa: E731
    everyone = torch.arange(G, device=dev)
    f, g = fun(w, everyone)
    S = torch.zeros((history,) + tuple(w.shape), device=dev, dtype=w.dtype)
    Y = torch.zeros_like(S)
    R = torch.zeros(history, G, device=dev, dtype=w.dtype)
    n_hist = 0
    active = g.abs().flatten(1).amax(1) > gtol
    iters = torch.zeros(G, dtype=torch.long, device=dev)
    for it in range(max_iter):
        act = active.nonzero().flatten()
        if act.numel() == 0:
            break
        wa, fa, ga = w[act], f[act], g[act]
        d, gd = two_loop(ga, S, Y, R, act, n_hist, history)
        t = torch.ones(len(act), dtype=w.dtype, device=dev)
        accepted = torch.zeros(len(act), dtype=torch.bool, device=dev)
        wn, fn, gn = wa.clone(), fa.clone(), ga.clone()
        todo = torch.arange(len(act), device=dev)
        for _ in range(40):
            tt = t[todo]
            cand = wa[todo] + view(tt, d) * d[todo]
            fc, gc = fun(cand, act[todo])
            ok = fc <= fa[todo] + 1e-4 * tt * gd[todo]
            okv = view(ok, cand)
            wn[todo] = torch.where(okv, cand, wn[todo])
            fn[todo] = torch.where(ok, fc, fn[todo])
            gn[todo] = torch.where(okv, gc, gn[todo])
            accepted[todo] = ok
            t[todo] = torch.where(ok, tt, tt * 0.5)
            todo = (~accepted).nonzero().flatten()
            if todo.numel() == 0:
                break
        s = wn - wa
        y = gn - ga
        sy = bdot(s, y)
        slot = n_hist % history
        S[slot].zero_()
        Y[slot].zero_()
        R[slot].zero_()
        S[slot, act], Y[slot, act] = s, y
        R[slot, act] = torch.where(sy > 1e-20, 1.0 / sy.clamp_min(1e-20), torch.zeros_like(sy))
        n_hist += 1
        iters[act] += 1
        small = (fa - fn).abs() <= ftol * fa.abs()
        w[act], f[act], g[act] = wn, fn, gn
        still = accepted & ~small & (gn.abs().flatten(1).amax(1) > gtol)
        active[act] = still
    return w, f, iters


def wide_scores(Xa, W):
    """Xa [n, P] times each of W [g, P, K] in ONE matrix product -> [n, g, K] (no broadcast copies)."""
    g, P, K = W.shape
    return (Xa @ W.permute(1, 0, 2).reshape(P, g * K)).view(Xa.shape[0], g, K)


def wide_grad(Xa, M):
    """Xa.T times each of M [n, g, K] in one matrix product -> [g, P, K]."""
    n, g, K = M.shape
    return (Xa.T @ M.reshape(n, g * K)).view(Xa.shape[1], g, K).permute(1, 0, 2)


def standardise_stats(X):
    """StandardScaler's mean and scale (population std, 1 where a feature is constant)."""
    mean = X.mean(0)
    std = X.std(0, unbiased=False)
    std = torch_where_zero(std)
    return mean, std


def torch_where_zero(std):
    import torch

    return torch.where(std > 0, std, torch.ones_like(std))


def to_tensor(X, dev, rows: np.ndarray | None = None):
    """float32 tensor on ``dev`` (copying only the rows asked for)."""
    import torch

    arr = X if rows is None else X[rows]
    return torch.as_tensor(np.ascontiguousarray(arr, dtype=np.float32)).to(dev)


def to_numpy(t) -> np.ndarray:
    return t.detach().float().cpu().numpy()


# --------------------------------------------------------------------------- base
