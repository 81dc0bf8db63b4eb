"""The torch heads fit the same models as the scikit-learn heads, on the CPU here."""

from __future__ import annotations

import inspect

import joblib
import numpy as np
import pytest

from featx.heads.estimators.torch_heads import (
    TorchKNN,
    TorchLinearSVC,
    TorchLogisticRegression,
    batched_lbfgs,
    create_torch_head,
)


def _blobs(n=240, d=12, k=3, seed=0, spread=1.6):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (k, d)) * 2
    y = rng.integers(0, k, n)
    X = (centres[y] + rng.normal(0, spread, (n, d))).astype(np.float32)
    return X, y


def test_signature_is_the_contract():
    sig = inspect.signature(create_torch_head)
    assert list(sig.parameters) == ["name", "grid", "folds", "seed", "device", "kernel", "scoring"]
    assert all(p.kind == p.KEYWORD_ONLY for n, p in sig.parameters.items() if n != "name")
    assert sig.parameters["kernel"].default == "linear"
    with pytest.raises(NotImplementedError):
        create_torch_head("svm", grid=None, folds=3, seed=0, device="cpu", kernel="rbf")


def test_batched_lbfgs_solves_differently_conditioned_problems():
    import torch

    torch.manual_seed(0)
    G, D = 4, 6
    scales = torch.tensor([1.0, 10.0, 100.0, 1000.0]).view(G, 1)
    diag = torch.rand(G, D) * scales + 0.1
    target = torch.randn(G, D)

    def fun(w, sel):
        dd, tt = diag[sel], target[sel]
        r = w - tt
        return 0.5 * (dd * r * r).sum(1), dd * r

    w, f, iters = batched_lbfgs(fun, torch.zeros(G, D), max_iter=300, gtol=1e-7)
    assert torch.allclose(w, target, atol=1e-4)
    assert (iters < 300).all()


@pytest.mark.parametrize("binary", [False, True])
def test_logreg_matches_sklearn_at_fixed_C(binary):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    X, y = _blobs(k=2 if binary else 3)
    C = 0.05
    head = TorchLogisticRegression(grid={"C": [C]}, folds=3, seed=0, device="cpu", tol=1e-7).fit(X, y)
    sc = StandardScaler().fit(X)
    sk = LogisticRegression(C=C, max_iter=5000, tol=1e-10).fit(sc.transform(X), y)
    # Same model: the probabilities agree closely.
    p_t = head.predict_proba(X)
    p_s = sk.predict_proba(sc.transform(X))
    assert np.abs(p_t - p_s).max() < 5e-3
    assert (head.predict(X) == sk.predict(sc.transform(X))).mean() > 0.99


def test_linear_svm_matches_liblinear_at_fixed_C():
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    X, y = _blobs()
    C = 0.01
    head = TorchLinearSVC(grid={"C": [C]}, folds=3, seed=0, device="cpu", tol=1e-7).fit(X, y)
    sc = StandardScaler().fit(X)
    sk = LinearSVC(C=C, max_iter=100000, tol=1e-8).fit(sc.transform(X), y)
    d_t = head.decision_function(X)
    d_s = sk.decision_function(sc.transform(X))
    assert d_t.shape == d_s.shape == (len(X), 3)
    assert np.abs(d_t - d_s).max() < 2e-2
    assert (head.predict(X) == sk.predict(sc.transform(X))).all()


@pytest.mark.parametrize("weights", ["uniform", "distance"])
def test_knn_matches_sklearn(weights):
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.preprocessing import normalize

    X, y = _blobs(n=200)
    Xq, _ = _blobs(n=60, seed=1)
    head = TorchKNN(grid={"n_neighbors": [5], "weights": [weights], "metric": ["cosine"]}, folds=3, device="cpu").fit(X, y)
    sk = KNeighborsClassifier(n_neighbors=5, weights=weights, metric="cosine", algorithm="brute").fit(normalize(X), y)
    assert (head.predict(Xq) == sk.predict(normalize(Xq))).all()
    assert np.allclose(head.predict_proba(Xq), sk.predict_proba(normalize(Xq)), atol=1e-4)


@pytest.mark.slow
def test_search_mirrors_sklearn_heads_on_the_same_folds():
    """Same grid, same folds: the chosen C and the held-out accuracy agree with featx.heads."""
    from featx.heads import create_head

    X, y = _blobs(n=400, d=30, k=4, spread=2.5)
    Xtr, ytr, Xte, yte = X[:300], y[:300], X[300:], y[300:]
    grid = {"C": [float(c) for c in np.logspace(-4, 1, 6)]}
    for name in ("logreg", "svm"):
        th = create_torch_head(name, grid=grid, folds=3, seed=0, device="cpu").fit(Xtr, ytr)
        sk = create_head(name, grid=grid, folds=3, seed=0, n_jobs=1, device="cpu").fit(Xtr, ytr)
        acc_t = (th.predict(Xte) == yte).mean()
        acc_s = (sk.predict(Xte) == yte).mean()
        assert abs(acc_t - acc_s) <= 0.02, (name, acc_t, acc_s)
        assert abs(th.best_score_ - sk.best_score_) <= 0.02
        assert th.best_params_["C"] in grid["C"]


@pytest.mark.slow
def test_estimator_contract_labels_pickle(tmp_path):
    X, y = _blobs(n=150, k=3)
    labels = np.array(["ant", "bee", "wasp"])[y]
    for name in ("logreg", "svm", "knn"):
        est = create_torch_head(name, grid=None, folds=3, seed=0, device="cpu")
        assert not hasattr(est, "classes_")
        assert est.fit(X, labels) is est
        assert list(est.classes_) == ["ant", "bee", "wasp"]
        assert est.best_params_ and est.params_ == est.best_params_
        cv = est.cv_results_
        assert len(cv["params"]) == len(cv["mean_test_score"]) == est.n_candidates_
        assert cv["rank_test_score"][est.best_index_] == 1
        assert est.n_splits_ == 3 and est.cv_plan_["used"] == 3
        pred = est.predict(X)
        assert pred.dtype == labels.dtype and (pred == labels).mean() > 0.8
        if name == "svm":
            assert est.decision_function(X).shape == (len(X), 3)
            assert not hasattr(est, "predict_proba")
        else:
            p = est.predict_proba(X)
            assert p.shape == (len(X), 3) and np.allclose(p.sum(1), 1)
        path = tmp_path / f"{name}.joblib"
        joblib.dump(est, path)
        again = joblib.load(path)
        assert (again.predict(X) == pred).all()


def test_binary_svm_decision_is_one_dimensional():
    X, y = _blobs(k=2)
    est = create_torch_head("svm", grid={"C": [0.1, 1.0]}, folds=3, seed=0, device="cpu").fit(X, y)
    d = est.decision_function(X)
    assert d.shape == (len(X),)
    assert ((d > 0).astype(int) == est.predict(X)).all()


def test_knn_grid_capped_to_fold_size():
    X, y = _blobs(n=12, k=2)
    est = create_torch_head("knn", grid={"n_neighbors": [1, 3, 50], "weights": ["uniform"], "metric": ["cosine"]},
                            folds=3, seed=0, device="cpu").fit(X, y)
    assert max(p["n_neighbors"] for p in est.cv_results_["params"]) <= 8
    with pytest.raises(NotImplementedError):
        create_torch_head("knn", grid={"n_neighbors": [1], "metric": ["manhattan"]}, folds=3, seed=0, device="cpu").fit(X, y)


# --------------------------------------------------------------------------- bugs fixed, estimator contract


def test_torch_and_sklearn_searches_use_the_same_folds_with_a_one_image_class():
    """Bug: torch_heads' folds lacked the one-image-class branch, so both families scored other folds."""
    from featx.heads import create_head

    rng = np.random.default_rng(0)
    y = np.array([0] * 12 + [1] * 12 + [2])  # class 2 has a single image
    X = (rng.normal(size=(len(y), 6)) + 2.0 * y[:, None]).astype(np.float32)
    grid = {"n_neighbors": [1, 3, 5], "weights": ["uniform"], "metric": ["cosine"]}
    th = create_torch_head("knn", grid=grid, folds=3, seed=0, device="cpu").fit(X, y)
    sk = create_head("knn", grid=grid, folds=3, seed=0, n_jobs=1, device="cpu").fit(X, y)
    for k in range(3):
        np.testing.assert_allclose(th.cv_results_[f"split{k}_test_score"], sk.cv_results_[f"split{k}_test_score"])


def test_create_head_passes_scoring_to_the_torch_head(monkeypatch):
    """Bug: create_torch_head never received heads.scoring, so CUDA searches always optimised accuracy."""
    from featx.heads.tuning import factory

    monkeypatch.setattr(factory, "wants_cuda", lambda device: True)
    est = factory.create_head("logreg", device="cuda", scoring="balanced_accuracy")
    assert isinstance(est, TorchLogisticRegression) and est.scoring == "balanced_accuracy"
    X, y = _blobs(n=200, k=2)
    y = np.where(np.arange(200) < 170, 0, 1)  # imbalanced: balanced accuracy != accuracy
    X[y == 1] += 1.0
    est.set_params(grid={"C": [0.01]}, device="cpu").fit(X, y)
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from featx.heads.tuning.cv import cv_splits

    expect = np.mean([
        balanced_accuracy_score(y[va], make_pipeline(StandardScaler(), LogisticRegression(C=0.01)).fit(X[tr], y[tr]).predict(X[va]))
        for tr, va in cv_splits(y, 5, 0)
    ])
    assert est.best_score_ == pytest.approx(expect, abs=0.02)


def test_knn_grid_has_one_source_for_both_families():
    """Bug: the torch kNN grid ([1, 3, 5, 10, 20, 50]) differed from the scikit-learn one."""
    from sklearn.model_selection import ParameterGrid

    from featx.heads.tuning.grids import resolve_grids

    X, y = _blobs(n=300)
    est = create_torch_head("knn", grid=None, folds=3, seed=0, device="cpu").fit(X, y)
    expected = list(ParameterGrid(resolve_grids()["knn"]))
    key = lambda p: (p["n_neighbors"], p["weights"], p["metric"])  # noqa: E731
    assert sorted(map(key, est.cv_results_["params"])) == sorted(map(key, expected))


@pytest.mark.parametrize("make", [
    lambda: TorchLogisticRegression(grid={"C": [0.1, 1.0]}, folds=3),
    lambda: TorchLinearSVC(grid={"C": [0.1, 1.0]}, folds=3),
    lambda: TorchKNN(grid={"n_neighbors": [1, 3]}, folds=3),
], ids=["logreg", "svm", "knn"])
@pytest.mark.slow
def test_torch_heads_pass_sklearn_check_estimator(make):
    import warnings

    from sklearn.utils.estimator_checks import check_estimator

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = check_estimator(make(), on_fail=None)
    failed = [(r["check_name"], str(r["exception"])[:300]) for r in results if r["status"] == "failed"]
    assert failed == []
    assert len(results) > 40


# --------------------------------------------------------------------------- on CUDA (issue 25), without a GPU


def test_cuda_fits_use_full_fp32_matmuls():
    """TF32 would blur the objective values the line search compares and kNN's zero distances."""
    import torch

    from featx.heads.estimators.torch_ops import fast_matmul as _fast_matmul

    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # what a fine-tune or the user may have set
    try:
        with _fast_matmul(torch.device("cuda")):
            assert torch.get_float32_matmul_precision() == "highest"
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(old)


class _SyncCounter:
    """Counts the tensor operations that make the host wait for the device (on CUDA)."""

    SYNCING = ("__bool__", "item", "nonzero", "tolist", "__int__", "__float__", "masked_select")

    def __new__(cls):
        import torch
        from torch.overrides import TorchFunctionMode

        class Mode(TorchFunctionMode):
            n = 0

            def __torch_function__(self, func, types, args=(), kwargs=None):
                name = getattr(func, "__name__", "")
                sync = name in cls.SYNCING
                if name in ("__getitem__", "__setitem__") and len(args) > 1:  # boolean-mask indexing
                    idx = args[1] if isinstance(args[1], tuple) else (args[1],)
                    sync = any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in idx)
                Mode.n += sync
                return func(*args, **(kwargs or {}))

        return Mode()


@pytest.mark.slow
def test_batched_lbfgs_syncs_once_per_line_search_trial():
    import torch

    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 10, generator=g)
    y = (X[:, 0] > 0).float()
    C = torch.tensor([0.01, 1.0, 100.0])
    calls = [0]

    def fun(W, sel):
        calls[0] += 1
        z = X @ W[:, :, 0].T
        r = 1 / C[sel] / 200
        f = (torch.nn.functional.softplus(z) - y[:, None] * z).sum(0) / 200 + 0.5 * r * (W * W).sum((1, 2))
        grad = (X.T @ (torch.sigmoid(z) - y[:, None])).T.unsqueeze(-1) / 200 + r.view(-1, 1, 1) * W
        return f, grad

    counter = _SyncCounter()
    with counter:
        w, f, iters = batched_lbfgs(fun, torch.zeros(3, 10, 1), max_iter=50)
    assert int(iters.min()) > 2
    # One per trial (which problems still search) + one per iteration (which are active); was ~8 per trial.
    assert counter.n <= 2 * calls[0], (counter.n, calls[0])
