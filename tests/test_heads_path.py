"""The CPU C-path linear heads: same models and choices as scikit-learn's grid, and the CPU rule."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from featx.heads.estimators.linear_path import PathLinearHead
from featx.heads.tuning import factory
from featx.heads.tuning.cv import HeadSearch


def _blobs(n=240, d=12, k=3, seed=0, spread=1.6):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (k, d)) * 2
    y = rng.integers(0, k, n)
    return (centres[y] + rng.normal(0, spread, (n, d))).astype(np.float32), y


@pytest.mark.parametrize("k", [2, 3])
def test_logistic_path_matches_sklearn_at_fixed_c(k):
    X, y = _blobs(k=k)
    head = PathLinearHead(loss="logistic", Cs=(0.05,), folds=3, tol=1e-7).fit(X, y)
    sc = StandardScaler().fit(X)
    sk = LogisticRegression(C=0.05, max_iter=5000, tol=1e-10).fit(sc.transform(X), y)
    assert np.abs(head.predict_proba(X) - sk.predict_proba(sc.transform(X))).max() < 5e-3


def test_squared_hinge_path_matches_liblinear_and_reduces_exactly_when_rows_are_few():
    X, y = _blobs()
    head = PathLinearHead(loss="squared_hinge", Cs=(0.01,), folds=3, tol=1e-7).fit(X, y)
    sc = StandardScaler().fit(X)
    sk = LinearSVC(C=0.01, max_iter=100000, tol=1e-8).fit(sc.transform(X), y)
    assert np.abs(head.decision_function(X) - sk.decision_function(sc.transform(X))).max() < 2e-2
    # Fewer rows than features: solved in the rows' span (an SVD), the same solution.
    rng = np.random.default_rng(1)
    Xw = np.hstack([X[:60], rng.normal(size=(60, 100)).astype(np.float32)])
    wide = PathLinearHead(loss="squared_hinge", Cs=(0.01,), folds=3, tol=1e-7).fit(Xw, y[:60])
    scw = StandardScaler().fit(Xw)
    skw = LinearSVC(C=0.01, max_iter=100000, tol=1e-8).fit(scw.transform(Xw), y[:60])
    assert np.abs(wide.decision_function(Xw) - skw.decision_function(scw.transform(Xw))).max() < 2e-2


@pytest.mark.parametrize("name", ["logreg", "svm"])
@pytest.mark.slow
def test_path_search_chooses_what_the_full_sklearn_grid_chooses(name):
    X, y = _blobs(n=400, d=30, k=4, spread=2.5)
    grid = {"C": [float(c) for c in np.logspace(-4, 2, 13)]}
    path = factory.create_head(name, grid=grid, folds=3, problem=(400, 30, 4)).fit(X, y)
    assert isinstance(path, PathLinearHead)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = factory.create_head(name, grid=grid, folds=3, n_jobs=1).fit(X, y)
    assert isinstance(full, HeadSearch)
    assert abs(path.best_score_ - full.best_score_) <= 0.01
    assert path.n_candidates_ <= len(grid["C"])
    assert abs(np.log10(path.params_["C"]) - np.log10(full.params_["C"])) <= 1.0


@pytest.mark.slow
def test_path_stops_after_patience_and_without_it_fits_every_c():
    X, y = _blobs(n=300)
    Cs = tuple(np.logspace(-4, 4, 17))
    short = PathLinearHead(loss="squared_hinge", Cs=Cs, folds=3, patience=2).fit(X, y)
    full = PathLinearHead(loss="squared_hinge", Cs=Cs, folds=3, patience=None).fit(X, y)
    assert full.n_candidates_ == 17 and short.n_candidates_ < 17
    assert short.n_candidates_ == short.best_index_ + 3
    assert short.best_params_ == full.best_params_ or short.best_score_ >= full.best_score_ - 0.01


def test_calibrated_svm_probabilities_and_string_labels():
    X, y = _blobs()
    labels = np.array(["ant", "bee", "wasp"])[y]
    est = PathLinearHead(loss="squared_hinge", Cs=(0.01, 0.1), folds=3).fit(X, labels)
    p = est.predict_proba(X)
    assert p.shape == (len(X), 3) and np.allclose(p.sum(1), 1)
    assert (est.classes_[p.argmax(1)] == est.predict(X)).mean() > 0.95
    assert (est.predict(X) == labels).mean() > 0.9 and est.calibration_.shape == (3, 2)


@pytest.mark.parametrize("loss", ["logistic", "squared_hinge"])
@pytest.mark.slow
def test_path_head_passes_sklearn_check_estimator(loss):
    from sklearn.utils.estimator_checks import check_estimator

    # probability=False: Platt-calibrated probabilities may rank classes unlike the SVM's own
    # decision (as SVC(probability=True)), which check_classifiers_train forbids.
    est = PathLinearHead(loss=loss, Cs=(0.1, 1.0), folds=3, probability=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = check_estimator(est, on_fail=None)
    assert [r["check_name"] for r in results if r["status"] == "failed"] == []


def test_cpu_rule_picks_the_measured_faster_implementation():
    from featx.heads.estimators.torch_heads import TorchKNN

    assert isinstance(factory.create_head("logreg", problem=(720, 1280, 12)), PathLinearHead)
    assert isinstance(factory.create_head("svm", problem=(720, 1280, 12)), PathLinearHead)
    assert isinstance(factory.create_head("svm", kernel="rbf", problem=(720, 1280, 12)), HeadSearch)
    assert isinstance(factory.create_head("knn", problem=(720, 1280, 12)), TorchKNN)
    assert isinstance(factory.create_head("knn", problem=(30, 64, 3)), HeadSearch)
    # Scorers that need probabilities stay with scikit-learn, which supports them all.
    assert isinstance(factory.create_head("logreg", scoring="neg_log_loss", problem=(720, 1280, 12)), HeadSearch)
    assert isinstance(factory.create_head("logreg"), HeadSearch)  # sizes unknown: as before


@pytest.mark.parametrize("loss", ["logistic", "squared_hinge"])
@pytest.mark.slow
def test_folds_on_threads_give_the_same_head_as_one_thread(loss):
    """Each fold keeps its own warm start, so solving the folds side by side changes nothing."""
    rng = np.random.default_rng(3)
    y = np.repeat(np.arange(4), 40)
    X = (rng.normal(size=(len(y), 60)) + 0.4 * np.eye(4)[y] @ rng.normal(size=(4, 60))).astype(np.float32)
    Cs = tuple(np.logspace(-3, 2, 8))
    one = PathLinearHead(loss=loss, Cs=Cs, folds=5, n_jobs=None).fit(X, y)
    two = PathLinearHead(loss=loss, Cs=Cs, folds=5, n_jobs=2).fit(X, y)
    assert one.best_params_ == two.best_params_ and one.n_iter_ == two.n_iter_
    np.testing.assert_array_equal(one.cv_results_["mean_test_score"], two.cv_results_["mean_test_score"])
    np.testing.assert_allclose(one.coef_, two.coef_, rtol=0, atol=0)
    np.testing.assert_array_equal(one.oof_decision_, two.oof_decision_)
