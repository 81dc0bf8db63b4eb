"""Streamed kNN: exact search in blocks with bounded memory, k chosen on held-out rows or CV folds."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import Normalizer
from test_heads_memory import tiny_cache  # noqa: F401 - fixture

import featx
from featx.base.errors import FeatxError
from featx.heads.estimators.torch_heads import TorchKNN
from featx.heads.saved.persist import load_head
from featx.heads.stream import knn as stream_knn
from featx.heads.stream import source as stream_source
from featx.heads.stream.knn import StreamingKNN
from featx.heads.stream.topk import merge_topk, search_backend

BACKENDS = ["torch"] + (["faiss"] if search_backend() == "faiss" else [])


def _problem(n: int, dim: int = 16, classes: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (classes, dim))
    y = rng.integers(0, classes, n)
    return (centres[y] + rng.normal(0, 1.2, (n, dim))).astype(np.float32), y


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 64 rows, queries in groups of 50: every search merges many blocks and groups."""
    monkeypatch.setattr(stream_source, "PIECE_ROWS", 32)
    monkeypatch.setattr(stream_source, "BLOCK_BYTES", 64 * 16 * 4)
    monkeypatch.setattr(stream_knn, "QUERY_BYTES", 50 * 16 * 4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weights", ["uniform", "distance"])
@pytest.mark.slow
def test_predictions_equal_scikit_learns(backend, weights, small_blocks):
    X, y = _problem(700)
    Xt, yt, Xe = X[:500], y[:500], X[500:]
    for k in (1, 5, 15):
        ours = StreamingKNN(grid={"n_neighbors": [k], "weights": [weights], "metric": ["cosine"]}, backend=backend)
        ref = make_pipeline(Normalizer(), KNeighborsClassifier(k, weights=weights, metric="cosine", algorithm="brute"))
        ours.fit(Xt, yt)
        ref.fit(Xt, yt)
        assert np.array_equal(ours.predict(Xe), ref.predict(Xe)), (backend, weights, k)
        assert np.allclose(ours.predict_proba(Xe), ref.predict_proba(Xe), atol=1e-6)


@pytest.mark.slow
def test_cv_choice_and_scores_equal_the_in_memory_knns(small_blocks):
    X, y = _problem(600)
    grid = {"n_neighbors": [1, 3, 7, 15], "weights": ["uniform", "distance"], "metric": ["cosine"]}
    ours = StreamingKNN(grid=grid, folds=3, seed=2).fit(X, y)
    mem = TorchKNN(grid=grid, folds=3, seed=2).fit(X, y)
    assert ours.selection_.startswith("3-fold cv")
    assert ours.best_params_ == mem.best_params_
    assert np.allclose(ours.cv_results_["mean_test_score"], mem.cv_results_["mean_test_score"])


def test_large_sets_choose_k_on_a_held_out_slice(monkeypatch):
    monkeypatch.setattr(stream_source, "KFOLD_MAX_ROWS", 100)
    monkeypatch.setattr(stream_knn, "HOLDOUT_MAX_QUERIES", 80)
    X, y = _problem(1500)
    est = StreamingKNN(grid={"n_neighbors": [1, 9, 31]}).fit(X[:1000], y[:1000])
    assert est.selection_.startswith("holdout 8.1% (81 of 1,000 training rows")  # 8% of each class, rounded
    assert est.n_splits_ == 1 and len(est.cv_results_["params"]) == 6  # 3 k x the default weights
    assert est.score(X[1000:], y[1000:]) > 0.8


def test_merge_keeps_the_best_of_both_lists():
    s, i = np.array([[0.9, 0.5, -np.inf]], np.float32), np.array([[4, 7, -1]])
    merge_topk(s, i, np.array([[0.7, 0.6, 0.1]], np.float32), np.array([[1, 2, 3]]))
    assert s.tolist() == [[pytest.approx(0.9), pytest.approx(0.7), pytest.approx(0.6)]] and i.tolist() == [[4, 1, 2]]


@pytest.mark.slow
def test_probe_streams_knn_and_saves_a_head_that_predicts(tiny_cache, tmp_path):  # noqa: F811
    res = featx.probe(tiny_cache, head="knn", solver="stream", out_dir=tmp_path, n_jobs=1, device="cpu", plots=False,
                      view="final")
    entry = res["heads"]["knn"]
    assert entry["solver"] == "stream" and "fold cv" in entry["selection"]
    assert (tmp_path / "predictions_knn.csv").is_file()
    est, _ = load_head(entry["model_path"])
    assert est.reference_ is None and est.fit_X_ is not None  # small: the rows are in the head
    assert np.mean(est.predict(tiny_cache.features("val")) == tiny_cache.labels("val")) == entry["accuracy"]


@pytest.mark.slow
def test_a_large_reference_stays_in_the_cache(tiny_cache, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr(stream_knn, "HOLD_BYTES", 0)
    cache = tmp_path / "c.h5"
    shutil.copy(tiny_cache.path, cache)
    res = featx.probe(cache, head="knn", solver="stream", out_dir=tmp_path / "o", n_jobs=1, device="cpu", plots=False,
                      view="final")
    entry = res["heads"]["knn"]
    est, _ = load_head(entry["model_path"])
    assert est.fit_X_ is None and est.reference_["cache"] == str(cache)
    X, y = tiny_cache.features("val"), tiny_cache.labels("val")
    assert np.mean(est.predict(X) == y) == entry["accuracy"]
    cache.rename(tmp_path / "moved.h5")
    with pytest.raises(FeatxError, match="reads its .* reference rows from cache .*re-create the head"):
        est.predict(X[:3] + 1)
