"""A saved head as torch ops (for ``featx export-model``): features -> (class probabilities, class index).

Each fitted head featx saves is rewritten as the arithmetic it does in ``predict_proba`` / ``predict``,
in float64 where featx computes in float64, so that an exported graph predicts what ``featx predict``
does: the row normalisation of ``--norm`` (:class:`~featx.heads.tuning.selection.FeatureNorm`), the
scikit-learn pipelines the factory builds (StandardScaler, Normalizer, LogisticRegression, LinearSVC with
its sigmoid calibration, cosine kNN), the warm-started C path and the streamed linear heads (one linear
map, softmax / sigmoid / Platt), the torch heads, DINO's weighted kNN and the streamed kNN (its reference
rows carried in the graph, read from its cache when the head refers to one).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ...base.errors import FeatxError
from ...cache.views import l2_rows
from ..estimators.dino_knn import DinoKNNClassifier
from ..estimators.linear_path import PathLinearHead
from ..estimators.torch_heads import TorchKNN, TorchLinearSVC, TorchLogisticRegression
from ..stream.knn import StreamingKNN
from ..stream.source import iter_blocks
from ..tuning.cv import HeadSearch
from ..tuning.selection import FeatureNorm


def _t(a, dtype=torch.float64) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(a)).to(dtype)


class RowNorm(nn.Module):
    """``l2`` rows to unit length, ``power`` signed square root then unit length, ``none`` as is (float32)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "none":
            return x
        if self.kind == "power":
            x = torch.sign(x) * torch.sqrt(torch.abs(x))
        return x / torch.clamp(torch.linalg.vector_norm(x, dim=1, keepdim=True), min=1e-12)


class Standardise(nn.Module):
    """scikit-learn's StandardScaler on float32 rows."""

    def __init__(self, mean, scale) -> None:
        super().__init__()
        self.register_buffer("mean", _t(mean, torch.float32))
        self.register_buffer("scale", _t(np.where(np.asarray(scale) == 0, 1.0, scale), torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.scale


class LinearHead(nn.Module):
    """``d = x W^T + b`` in float64; probabilities by softmax / sigmoid (``logistic``), Platt sigmoids per
    output, normalised (``platt``), or a softmax of the decision values (``softmax``); label = argmax of d."""

    def __init__(self, coef, intercept, mapping: str, platt=None) -> None:
        super().__init__()
        coef = np.atleast_2d(np.asarray(coef, np.float64))
        self.register_buffer("coef", _t(coef.T))
        self.register_buffer("intercept", _t(np.asarray(intercept, np.float64).reshape(-1)))
        self.mapping, self.binary, self.n_out = mapping, coef.shape[0] == 1, coef.shape[0]
        self.register_buffer("platt", _t(platt if platt is not None else np.zeros((coef.shape[0], 2))))

    def forward(self, x: torch.Tensor):
        d = x.to(torch.float64) @ self.coef + self.intercept
        if self.binary:
            z = d[:, 0]
            if self.mapping == "platt":
                p1 = 1 / (1 + torch.exp(self.platt[0, 0] * z + self.platt[0, 1]))
            elif self.mapping == "logistic":
                p1 = 1 / (1 + torch.exp(-z))
            else:
                p1 = torch.softmax(torch.stack([-z, z], 1), 1)[:, 1]
            return torch.stack([1 - p1, p1], 1), (z > 0).to(torch.int64)
        if self.mapping == "platt":
            p = 1 / (1 + torch.exp(self.platt[:, 0] * d + self.platt[:, 1]))
            s = p.sum(1, keepdim=True)
            p = torch.where(s > 0, p / torch.where(s > 0, s, torch.ones_like(s)), torch.full_like(p, 1.0 / self.n_out))
        else:
            p = torch.softmax(d, 1)
        return p, torch.argmax(d, 1)


class KnnHead(nn.Module):
    """Top-k cosine neighbours among the stored unit rows; votes by scikit-learn's rules (uniform,
    ``distance``: 1 / distance, only the neighbours at distance 0 when there are any) or DINO's
    ``exp((s - max s) / T)``; probabilities = normalised votes, label = their argmax."""

    def __init__(self, reference, labels, n_classes: int, k: int, weights: str, metric: str = "cosine") -> None:
        super().__init__()
        self.register_buffer("reference_t", _t(np.asarray(reference, np.float32).T, torch.float32))
        self.register_buffer("labels", torch.as_tensor(np.asarray(labels, np.int64)))
        self.n_classes, self.k, self.weights, self.metric = int(n_classes), min(int(k), len(labels)), weights, metric

    def forward(self, x: torch.Tensor):
        q = x / torch.clamp(torch.linalg.vector_norm(x, dim=1, keepdim=True), min=1e-12)
        sim, idx = torch.topk(q @ self.reference_t, self.k, dim=1)
        s = sim.to(torch.float64)
        if self.weights == "uniform":
            w = torch.ones_like(s)
        elif self.weights.startswith("dino:"):
            w = torch.exp((s - s.max(1, keepdim=True).values) / float(self.weights[5:]))
        else:
            d = torch.clamp(1 - s, 0, 2) if self.metric == "cosine" else torch.sqrt(torch.clamp(2 - 2 * s, 0, 4))
            zero = d <= 0
            w = torch.where(zero.any(1, keepdim=True), zero.to(s.dtype), 1.0 / torch.clamp(d, min=1e-300))
        onehot = (self.labels[idx].unsqueeze(2) == torch.arange(self.n_classes).view(1, 1, -1)).to(s.dtype)
        votes = (w.unsqueeze(2) * onehot).sum(1)
        p = votes / torch.clamp(votes.sum(1, keepdim=True), min=1e-300)
        return p, torch.argmax(votes, 1)


class HeadNet(nn.Module):
    """Row transforms, then the final head: ``x -> (probabilities float32, class index int64)``."""

    def __init__(self, pre: list[nn.Module], head: nn.Module) -> None:
        super().__init__()
        self.pre = nn.ModuleList(pre)
        self.head = head

    def forward(self, x: torch.Tensor):
        for m in self.pre:
            x = m(x)
        p, label = self.head(x)
        return p.to(torch.float32), label


def _streamed_reference(est: StreamingKNN) -> np.ndarray:
    """The unit reference rows of a streamed kNN head: held in the head, or read from the cache it names."""
    if est.reference_ is None:
        return np.asarray(est.fit_X_, np.float32)
    src, _ = est.reference_source()  # the cache it names, refused unless it has the identity the head was trained on
    try:
        pos, rows = zip(*[(p, l2_rows(x)) for p, x in iter_blocks(src, None)])
    finally:
        if hasattr(src, "close"):
            src.close()
    out = np.zeros((len(est.fit_y_), rows[0].shape[1]), np.float32)
    out[np.concatenate(pos)] = np.concatenate(rows)
    return out


def _calibrated(cal, n_classes: int) -> tuple[list[nn.Module], nn.Module]:
    """scikit-learn's CalibratedClassifierCV (ensemble=False) over a linear pipeline: Platt per output."""
    cc = cal.calibrated_classifiers_[0]
    pre, lin = _modules(cc.estimator, n_classes)
    ab = np.array([[c.a_, c.b_] for c in cc.calibrators], np.float64)
    if not isinstance(lin, LinearHead):
        raise FeatxError("export-model: calibrated probabilities are exported for linear heads only; "
                         "export a logreg, linear svm or kNN head")
    lin.mapping = "platt"
    lin.platt = _t(ab)
    return pre, lin


def _sklearn_step(step, n_classes: int):
    """(row transform or None, final head or None) of one scikit-learn / featx pipeline step."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.preprocessing import Normalizer, StandardScaler
    from sklearn.svm import LinearSVC

    if isinstance(step, StandardScaler):
        return Standardise(step.mean_ if step.with_mean else np.zeros(step.n_features_in_),
                           step.scale_ if step.with_std else np.ones(step.n_features_in_)), None
    if isinstance(step, Normalizer):
        if step.norm != "l2":
            raise FeatxError(f"export-model: Normalizer(norm={step.norm!r}) has no export; only l2")
        return RowNorm("l2"), None
    if isinstance(step, FeatureNorm):
        return RowNorm(step.kind), None
    if isinstance(step, LogisticRegression):
        return None, LinearHead(step.coef_, step.intercept_, "logistic")
    if isinstance(step, LinearSVC):
        return None, LinearHead(step.coef_, step.intercept_, "softmax")
    if isinstance(step, KNeighborsClassifier):
        if step.metric not in ("cosine", "euclidean") or step.weights not in ("uniform", "distance"):
            raise FeatxError(f"export-model: kNN with metric {step.metric!r} / weights {step.weights!r} has no export")
        fitted_x, fitted_y = step._fit_X, step._y  # the stored rows and their class indices (scikit-learn's)
        return None, KnnHead(l2_rows(np.asarray(fitted_x, np.float32)), fitted_y, len(step.classes_), step.n_neighbors,
                             step.weights, step.metric)
    return None, None


def _modules(est, n_classes: int) -> tuple[list[nn.Module], nn.Module]:
    """(row transforms, final head) of a fitted head."""
    from sklearn.pipeline import Pipeline

    if isinstance(est, HeadSearch):
        if getattr(est, "calibrator_", None) is not None:
            return _calibrated(est.calibrator_, n_classes)
        return _modules(est.best_estimator_, n_classes)
    if isinstance(est, Pipeline):
        pre: list[nn.Module] = []
        for _, step in est.steps[:-1]:
            pre += _modules(step, n_classes)[0]
        last_pre, head = _modules(est.steps[-1][1], n_classes)
        return pre + last_pre, head
    if isinstance(est, PathLinearHead):  # also the streamed linear heads
        mapping = "logistic" if est.loss == "logistic" else ("platt" if est.calibration_ is not None else "softmax")
        return [], LinearHead(est.coef_, est.intercept_, mapping, est.calibration_)
    if isinstance(est, (TorchLogisticRegression, TorchLinearSVC)):
        return [], LinearHead(est.coef_, est.intercept_, "logistic" if isinstance(est, TorchLogisticRegression) else "softmax")
    if isinstance(est, (TorchKNN, StreamingKNN)):
        p = est.best_params_
        ref = est.fit_X_ if isinstance(est, TorchKNN) else _streamed_reference(est)
        return [], KnnHead(ref, est.fit_y_, len(est.classes_), p["n_neighbors"], p["weights"], p.get("metric", "cosine"))
    if isinstance(est, DinoKNNClassifier):
        return [], KnnHead(est.train_, est.y_idx_, len(est.classes_), est.n_neighbors, f"dino:{float(est.temperature)!r}")
    pre, head = _sklearn_step(est, n_classes)
    if pre is not None:
        return [pre], None
    if head is not None:
        return [], head
    raise FeatxError(f"export-model: a {type(est).__name__} head has no ONNX export (export logreg, linear svm, knn, "
                     "knn_dino or a streamed head)")


def head_net(est, n_classes: int) -> HeadNet:
    """The torch module of a fitted head: ``features -> (probabilities [n, classes] float32, index int64)``."""
    pre, head = _modules(est, n_classes)
    if head is None:
        raise FeatxError(f"export-model: {type(est).__name__} has no final estimator to export")
    return HeadNet(pre, head).eval()


def reference_bytes(est) -> int:
    """Bytes of the reference rows a kNN head carries into the graph (0 for the other heads)."""
    from sklearn.pipeline import Pipeline

    if isinstance(est, HeadSearch):
        return reference_bytes(est.best_estimator_)
    if isinstance(est, Pipeline):
        return reference_bytes(est.steps[-1][1])
    if isinstance(est, StreamingKNN):
        return len(est.fit_y_) * int(est.n_features_in_) * 4
    for attr in ("fit_X_", "train_", "_fit_X"):
        if getattr(est, attr, None) is not None:
            return int(np.asarray(getattr(est, attr)).size) * 4
    return 0
