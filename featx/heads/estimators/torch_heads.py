"""GPU (torch) versions of the scikit-learn heads, with the whole CV search batched.

scikit-learn's ``LinearSVC`` takes minutes on 50,000 x 2,048 features with 100 classes and a
17-value C grid; the same search is a few hundred matrix products on a GPU.  These estimators
are scikit-learn estimators (``BaseEstimator`` + ``ClassifierMixin``; ``check_estimator``
passes; ``fit`` returns self, fitted attributes end in ``_``,
``classes_``, ``best_params_``, ``best_score_``, ``cv_results_``, ``predict``,
``predict_proba``/``decision_function``), pickle with joblib (fitted weights are CPU numpy
arrays) and fit the same models as :func:`featx.heads.create_head`'s pipelines:

- ``logreg``: standardise, multinomial logistic regression (``C * sum CE + ||W||^2 / 2``,
  intercept unpenalised; a single sigmoid for two classes), minimised by L-BFGS;
- ``svm`` (linear): standardise, one-vs-rest squared-hinge L2 SVM with a penalised intercept
  (``LinearSVC``'s defaults), minimised by L-BFGS;
- ``knn``: L2-normalise, cosine (or euclidean) neighbours by chunked matrix product + top-k,
  uniform or distance weights.

Hyperparameters are chosen by stratified CV on the training rows only, on the very folds of
the scikit-learn heads (:func:`featx.heads.tuning.cv.cv_splits`), scored by ``scoring``; in
each fold all C values are trained at once by a batched L-BFGS (one independent line search
per problem), and kNN computes the neighbours once per fold for every k and weighting.
"""

from __future__ import annotations

import logging
import time

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from ...base.cuda import is_oom
from ...base.errors import FeatxError
from ..tuning.cv import cv_summary, score_predictions
from ..tuning.grids import resolve_grids
from .device_memory import block_rows, c_group_size, run_in_groups
from .scores import softmax_of_scores
from .torch_ops import (  # noqa: F401 - batched_lbfgs re-exported
    batched_lbfgs,
    fast_matmul,
    fold_splits,
    standardise_stats,
    to_numpy,
    to_tensor,
    torch_device,
    wide_grad,
    wide_scores,
)

log = logging.getLogger(__name__)

KNN_METRICS = ("cosine", "euclidean")


class OneClassError(FeatxError, ValueError):
    """Training labels with fewer than two classes (a ValueError too, as scikit-learn expects)."""


class _TorchHead(ClassifierMixin, BaseEstimator):
    """Shared scikit-learn plumbing: label encoding, validation, CV bookkeeping.

    ``BaseEstimator`` supplies ``get_params``/``set_params``/``clone``; every hyperparameter is a
    keyword of the subclass's ``__init__`` and fitted attributes end in ``_``.
    """

    head_name = ""

    def __init__(
        self, *, grid: dict | None = None, folds: int = 5, seed: int = 0, device: str = "cpu", scoring: str = "accuracy",
    ) -> None:
        self.grid = grid
        self.folds = folds
        self.seed = seed
        self.device = device
        self.scoring = scoring

    def _grid(self) -> dict:
        """This head's grid: ``grid`` over the defaults of :func:`featx.heads.tuning.grids.resolve_grids`."""
        g = dict(resolve_grids()[self.head_name])
        if self.grid:
            g.update({k: list(v) for k, v in self.grid.items()})
        return g

    def _validate(self, X, y) -> tuple[np.ndarray, np.ndarray]:
        """Checked float32 features and label indices (``classes_`` set); scoring checked first."""
        score_predictions(self.scoring, np.array([0, 1]), np.array([0, 1]))  # NotImplementedError if unsupported
        X, y = validate_data(self, X, y, dtype=np.float32)
        check_classification_targets(y)
        return X, self._encode(y)

    def _encode(self, y) -> np.ndarray:
        y = np.asarray(y)
        self.classes_, yi = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise OneClassError(
                f"the training labels have {len(self.classes_)} class(es); a classifier needs at least 2"
            )
        return yi.astype(np.int64)

    def _decode(self, idx) -> np.ndarray:
        return self.classes_[np.asarray(idx)]

    @property
    def params_(self) -> dict:
        """The chosen hyperparameters, e.g. ``{"C": 0.003}``."""
        return dict(self.best_params_)

    def _check_X(self, X) -> np.ndarray:
        check_is_fitted(self)
        return validate_data(self, X, dtype=np.float32, reset=False)

    def _finish_search(self, cands: list[dict], scores: np.ndarray, plan: dict, t0: float) -> dict:
        self.cv_results_ = cv_summary(cands, scores)
        best = int(np.argmin(self.cv_results_["rank_test_score"]))  # first of the best, as sklearn
        self.best_index_ = best
        self.best_params_ = dict(cands[best])
        self.best_score_ = float(self.cv_results_["mean_test_score"][best])
        self.cv_plan_ = plan
        self.n_splits_ = int(scores.shape[1])
        self.n_candidates_ = len(cands)
        self.search_seconds_ = time.perf_counter() - t0
        return self.best_params_


# --------------------------------------------------------------------------- linear heads


class _LinearHead(_TorchHead):
    """Standardise + linear model with an L2 penalty, tuned over C by batched L-BFGS."""

    @staticmethod
    def _predict_idx(z):
        import torch

        if z.shape[-1] == 1:
            return (z[..., 0] > 0).long()
        return torch.argmax(z, -1)

    def __init__(
        self, *, grid: dict | None = None, folds: int = 5, seed: int = 0, device: str = "cpu",
        scoring: str = "accuracy", max_iter: int = 500, tol: float = 1e-5,
    ) -> None:
        super().__init__(grid=grid, folds=folds, seed=seed, device=device, scoring=scoring)
        self.max_iter = max_iter
        self.tol = tol

    # Subclasses: _objective(Xa, yi, n_out, Cs) -> fun(W) for batched_lbfgs; penalise_bias.
    penalise_bias = False

    def _n_out(self) -> int:
        return 1 if len(self.classes_) == 2 else len(self.classes_)

    def _train(self, Xs, yi, Cs, dev, *, max_iter: int):
        """Fit one model per C on standardised rows Xs; returns W [G, D+1, n_out].

        On CUDA the C values go in groups that fit the free memory (:mod:`featx.heads.estimators.device_memory`)."""
        import torch

        n, D = Xs.shape
        Xa = torch.cat([Xs, torch.ones(n, 1, device=dev, dtype=Xs.dtype)], 1)
        y = torch.as_tensor(yi, device=dev)

        def run(cs: list) -> tuple:
            C = torch.as_tensor(np.asarray(cs, dtype=np.float32), device=dev)
            w0 = torch.zeros(len(cs), D + 1, self._n_out(), device=dev, dtype=Xs.dtype)
            w, _, iters = batched_lbfgs(self._objective(Xa, y, C), w0, max_iter=max_iter, gtol=self.tol)
            return w, iters

        parts = run_in_groups(run, Cs, c_group_size(n, D, self._n_out(), len(Cs), dev))
        w, iters = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        self.n_iter_ = int(iters.max())  # of the last call: the refit
        if bool((iters >= max_iter).any()):
            log.info("%s: L-BFGS hit max_iter=%d for some C values (as sklearn would warn)", self.head_name, max_iter)
        return w

    def _penalty_mask(self, Xa, n_out):
        import torch

        m = torch.ones(1, Xa.shape[1], n_out, device=Xa.device, dtype=Xa.dtype)
        if not self.penalise_bias:
            m[:, -1] = 0
        return m

    @staticmethod
    def _scores(Xa, W):
        return wide_scores(Xa, W).permute(1, 0, 2)  # [G, n, K]

    def _predict_all(self, Xva, W, dev) -> np.ndarray:
        """Predicted indices [G, n_va] of every C's model, as many C values at a time as fit."""
        size = c_group_size(Xva.shape[0], Xva.shape[1], W.shape[-1], W.shape[0], dev)
        return np.concatenate([to_numpy(self._predict_idx(self._scores(Xva, W[a : a + size])))
                               for a in range(0, W.shape[0], size)])

    def fit(self, X, y) -> "_LinearHead":
        """Choose C by CV on (X, y), then refit on all of it."""
        import torch

        t0 = time.perf_counter()
        X, yi = self._validate(X, y)
        dev = torch_device(self.device)
        grid = self._grid()
        Cs = [float(c) for c in grid["C"]]
        if not Cs or any(c <= 0 for c in Cs):
            raise FeatxError(f"{self.head_name} grid: C values must be positive, got {Cs}")
        extra = set(grid) - {"C"}
        if extra:
            raise NotImplementedError(f"torch {self.head_name} searches only C, not {sorted(extra)}")
        splits, plan = fold_splits(yi, self.folds, self.seed)
        scores = np.zeros((len(Cs), len(splits)))
        with torch.inference_mode(False), torch.no_grad(), fast_matmul(dev, float(X.shape[0]) * X.shape[1]):
            Xall = to_tensor(X, dev)
            for k, (tr, va) in enumerate(splits):
                tr_t = torch.as_tensor(tr, device=dev)
                va_t = torch.as_tensor(va, device=dev)
                Xtr = Xall.index_select(0, tr_t)
                mean, std = standardise_stats(Xtr)
                Xtr = (Xtr - mean) / std
                W = self._train(Xtr, yi[tr], Cs, dev, max_iter=self.max_iter)
                del Xtr
                Xva = (Xall.index_select(0, va_t) - mean) / std
                Xva = torch.cat([Xva, torch.ones(len(va), 1, device=dev)], 1)
                pred = self._predict_all(Xva, W, dev)  # [G, n_va]
                scores[:, k] = [score_predictions(self.scoring, yi[va], p) for p in pred]
            self._finish_search([{"C": c} for c in Cs], scores, plan, t0)
            mean, std = standardise_stats(Xall)
            Xs = (Xall - mean) / std
            W = self._train(Xs, yi, [self.best_params_["C"]], dev, max_iter=max(self.max_iter, 1000))[0]
        # Fold the standardisation into the weights: scores = X @ coef + intercept.
        Wd, b = W[:-1], W[-1]
        coef = Wd / std.unsqueeze(1)
        intercept = b - (mean / std) @ Wd
        self.scaler_mean_ = to_numpy(mean)
        self.scaler_scale_ = to_numpy(std)
        self.coef_ = to_numpy(coef.T)  # [n_out, D], like sklearn
        self.intercept_ = to_numpy(intercept)
        self.fit_seconds_ = time.perf_counter() - t0
        return self

    def _raw(self, X) -> np.ndarray:
        """X @ coef.T + intercept in float64 numpy: [n, n_out] (CPU; cheap compared with a fit)."""
        X = self._check_X(X)
        return X.astype(np.float64) @ self.coef_.T.astype(np.float64) + self.intercept_.astype(np.float64)

    def decision_function(self, X) -> np.ndarray:
        d = self._raw(X)
        return d[:, 0] if d.shape[1] == 1 else d

    def predict(self, X) -> np.ndarray:
        d = self._raw(X)
        idx = (d[:, 0] > 0).astype(int) if d.shape[1] == 1 else d.argmax(1)
        return self._decode(idx)


class TorchLogisticRegression(_LinearHead):
    """Standardise + multinomial logistic regression (L-BFGS), C chosen by batched CV."""

    head_name = "logreg"
    penalise_bias = False

    def _objective(self, Xa, yi, C):
        import torch

        n = Xa.shape[0]
        n_out = 1 if len(self.classes_) == 2 else len(self.classes_)
        mask = self._penalty_mask(Xa, n_out)
        reg = (1.0 / (C * n)).view(-1, 1, 1)
        if n_out == 1:
            yb = yi.to(Xa.dtype).view(n, 1, 1)

            def fun(W, sel):
                r = reg[sel]
                z = wide_scores(Xa, W)  # [n, g, 1]
                loss = torch.nn.functional.softplus(z) - yb * z
                p = torch.sigmoid(z) - yb
                grad = wide_grad(Xa, p) / n + r * W * mask
                f = loss.sum((0, 2)) / n + 0.5 * (r.view(-1) * (W * W * mask).sum((1, 2)))
                return f, grad
        else:
            onehot = torch.nn.functional.one_hot(yi, n_out).to(Xa.dtype).unsqueeze(1)

            def fun(W, sel):
                r = reg[sel]
                z = wide_scores(Xa, W)  # [n, g, K]
                lse = torch.logsumexp(z, -1)
                f = (lse - (z * onehot).sum(-1)).sum(0) / n + 0.5 * (r.view(-1) * (W * W * mask).sum((1, 2)))
                p = torch.softmax(z, -1) - onehot
                grad = wide_grad(Xa, p) / n + r * W * mask
                return f, grad

        return fun

    def predict_proba(self, X) -> np.ndarray:
        d = self._raw(X)
        if d.shape[1] == 1:
            p1 = 1.0 / (1.0 + np.exp(-d[:, 0]))
            return np.stack([1 - p1, p1], 1)
        return softmax_of_scores(d)


class TorchLinearSVC(_LinearHead):
    """Standardise + one-vs-rest squared-hinge linear SVM (LinearSVC's model), batched over C."""

    head_name = "svm"
    penalise_bias = True  # liblinear penalises the intercept (intercept_scaling=1)

    def _objective(self, Xa, yi, C):
        import torch

        n = Xa.shape[0]
        n_out = 1 if len(self.classes_) == 2 else len(self.classes_)
        if n_out == 1:
            yb = (yi.to(Xa.dtype) * 2 - 1).view(n, 1, 1)
        else:
            yb = (torch.nn.functional.one_hot(yi, n_out).to(Xa.dtype) * 2 - 1).unsqueeze(1)
        reg = (1.0 / (C * n)).view(-1, 1, 1)

        def fun(W, sel):
            r = reg[sel]
            z = wide_scores(Xa, W)  # [n, g, K]
            h = (1 - yb * z).clamp_min(0)
            f = (h * h).sum((0, 2)) / n + 0.5 * r.view(-1) * (W * W).sum((1, 2))
            grad = wide_grad(Xa, -2 * h * yb) / n + r * W
            return f, grad

        return fun


# --------------------------------------------------------------------------- kNN


class TorchKNN(_TorchHead):
    """L2-normalise + k nearest neighbours by chunked matrix product and top-k."""

    head_name = "knn"

    def __init__(
        self, *, grid: dict | None = None, folds: int = 5, seed: int = 0, device: str = "cpu",
        scoring: str = "accuracy", chunk_rows: int = 4096,
    ) -> None:
        super().__init__(grid=grid, folds=folds, seed=seed, device=device, scoring=scoring)
        self.chunk_rows = chunk_rows

    @staticmethod
    def _normalise(X):
        return X / X.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def _neighbours(self, Q, K, kmax: int):
        """Top-``kmax`` (similarity, index) of each query row among key rows, in blocks of query rows.

        A block's similarities (and top-k's workspace) take 3 floats per key row per query row; the
        block fits the free GPU memory (or 256 MiB off CUDA), and one that still runs out of device
        memory is halved (a million training rows would otherwise need 16 GB per 4,096 queries)."""
        import torch

        rows = block_rows(3 * 4 * K.shape[0], Q.device, most=self.chunk_rows)
        sims, idxs, s = [], [], 0
        while s < Q.shape[0]:
            try:
                v, i = torch.topk(Q[s : s + rows] @ K.T, kmax, dim=1, largest=True, sorted=True)
            except Exception as exc:  # noqa: BLE001 - only out-of-memory is retried
                if not is_oom(exc) or rows < 2:
                    raise
                rows //= 2
                log.warning("GPU out of memory in the kNN search; retrying %d query rows at a time", rows)
                continue
            sims.append(v)
            idxs.append(i)
            s += len(v)
        return torch.cat(sims), torch.cat(idxs)

    @staticmethod
    def _votes(sim, nbr_labels, k: int, weights: str, metric: str, n_classes: int):
        """Class scores [n, n_classes] from the first k neighbours (sklearn's rules for ties/zeros)."""
        import torch

        s = sim[:, :k]
        lab = nbr_labels[:, :k]
        if weights == "uniform":
            w = torch.ones_like(s)
        else:
            if metric == "cosine":
                d = (1 - s).clamp_min(0)
            else:  # euclidean on unit vectors
                d = (2 - 2 * s).clamp_min(0).sqrt()
            zero = d <= 0
            w = torch.where(zero.any(1, keepdim=True), zero.to(s.dtype), 1.0 / d.clamp_min(1e-30))
        votes = torch.zeros(s.shape[0], n_classes, device=s.device, dtype=s.dtype)
        votes.scatter_add_(1, lab, w)
        return votes

    def _check_grid(self, grid: dict, n_train_min: int) -> list[dict]:
        extra = set(grid) - {"n_neighbors", "weights", "metric"}
        if extra:
            raise NotImplementedError(f"torch kNN does not search {sorted(extra)}")
        metrics = list(grid.get("metric", ["cosine"]))
        if any(m not in KNN_METRICS for m in metrics):
            raise NotImplementedError(f"torch kNN supports metrics {KNN_METRICS}, got {metrics}")
        ks = sorted({int(k) for k in grid["n_neighbors"]})
        keep = [k for k in ks if k <= n_train_min] or [1]
        if len(keep) < len(ks):
            log.info("kNN: dropping k > %d (the rows in one CV training fold) from the grid", n_train_min)
        return [
            {"n_neighbors": k, "weights": w, "metric": m}
            for k in keep
            for w in grid.get("weights", ["uniform"])
            for m in metrics
        ]

    def fit(self, X, y) -> "TorchKNN":
        """Choose (k, weights, metric) by CV on (X, y) and keep the normalised training rows."""
        import torch

        t0 = time.perf_counter()
        X, yi = self._validate(X, y)
        dev = torch_device(self.device)
        splits, plan = fold_splits(yi, self.folds, self.seed)
        cands = self._check_grid(self._grid(), min(len(tr) for tr, _ in splits))
        kmax = max(c["n_neighbors"] for c in cands)
        nc = len(self.classes_)
        scores = np.zeros((len(cands), len(splits)))
        with torch.no_grad(), fast_matmul(dev, float(X.shape[0]) * X.shape[1]):
            Xall = self._normalise(to_tensor(X, dev))
            yall = torch.as_tensor(yi, device=dev)
            for f, (tr, va) in enumerate(splits):
                tr_t, va_t = torch.as_tensor(tr, device=dev), torch.as_tensor(va, device=dev)
                sim, nb = self._neighbours(Xall.index_select(0, va_t), Xall.index_select(0, tr_t), kmax)
                nbl = yall.index_select(0, tr_t)[nb]
                yv_np = yi[va]
                for c, cand in enumerate(cands):
                    v = self._votes(sim, nbl, cand["n_neighbors"], cand["weights"], cand["metric"], nc)
                    scores[c, f] = score_predictions(self.scoring, yv_np, to_numpy(v.argmax(1)))
            self._finish_search(cands, scores, plan, t0)
            self.fit_X_ = to_numpy(Xall)
        self.fit_y_ = yi
        self.fit_seconds_ = time.perf_counter() - t0
        return self

    def _votes_for(self, X) -> np.ndarray:
        import torch

        X = self._check_X(X)
        dev = torch_device(self.device)
        p = self.best_params_
        k = min(int(p["n_neighbors"]), len(self.fit_y_))
        with torch.no_grad(), fast_matmul(dev):
            K = torch.as_tensor(self.fit_X_).to(dev)
            yk = torch.as_tensor(self.fit_y_).to(dev)
            Q = self._normalise(to_tensor(X, dev))
            sim, nb = self._neighbours(Q, K, k)
            v = self._votes(sim, yk[nb], k, p["weights"], p["metric"], len(self.classes_))
            return to_numpy(v).astype(np.float64)

    def predict_proba(self, X) -> np.ndarray:
        v = self._votes_for(X)
        return v / np.maximum(v.sum(1, keepdims=True), 1e-300)

    def predict(self, X) -> np.ndarray:
        return self._decode(self._votes_for(X).argmax(1))


# --------------------------------------------------------------------------- factory


def create_torch_head(
    name: str, *, grid: dict | None, folds: int, seed: int, device: str, kernel: str = "linear",
    scoring: str = "accuracy",
):
    """An unfitted torch head (``logreg``, ``svm`` or ``knn``) with its CV search built in.

    ``grid``: parameter -> list of values (``C`` for logreg/svm; ``n_neighbors``, ``weights``,
    ``metric`` for knn); None uses the head's grid from :func:`featx.heads.tuning.grids.resolve_grids`
    (the same defaults as the scikit-learn heads).  ``scoring``: the CV criterion (a name in
    :data:`featx.heads.tuning.cv.SCORERS`; others raise NotImplementedError).  Raises NotImplementedError
    for what has no torch version (the RBF SVM) so the caller can use scikit-learn instead.
    """
    if name == "svm" and kernel != "linear":
        raise NotImplementedError(f"no torch version of the {kernel} SVM")
    if name == "knn_dino":
        raise NotImplementedError("no torch DINO kNN")
    classes = {"logreg": TorchLogisticRegression, "svm": TorchLinearSVC, "knn": TorchKNN}
    if name not in classes:
        raise FeatxError(f"unknown head {name!r}; expected one of {', '.join(classes)}")
    score_predictions(scoring, np.array([0, 1]), np.array([0, 1]))  # NotImplementedError if unsupported
    return classes[name](grid=grid, folds=folds, seed=seed, device=device, scoring=scoring)
