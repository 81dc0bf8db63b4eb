"""Streaming heads: logreg / linear SVM trained on rows read block by block, every C in one pass."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
from test_heads_memory import _big_cache, tiny_cache  # noqa: F401 - fixture

import featx
from featx.base.errors import FeatxError
from featx.heads.estimators.linear_path import PathLinearHead
from featx.heads.saved.persist import load_head
from featx.heads.stream import source as stream_source
from featx.heads.stream.linear import StreamingLinearHead
from featx.heads.stream.source import ArraySource, holdout_folds, iter_blocks, prefetch
from featx.heads.tuning.solver_choice import use_stream

ROOT = Path(__file__).resolve().parents[1]
CS = tuple(np.logspace(-3, 1, 5))


def _problem(n: int, dim: int = 16, classes: int = 4, *, noise: float = 1.5, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (classes, dim))
    y = np.arange(n) % classes
    X = (centres[y] + rng.normal(0, noise, (n, dim)) + 5.0).astype(np.float32)  # offset: standardising matters
    return X, y


@pytest.mark.parametrize("loss", ["logistic", "squared_hinge"])
@pytest.mark.slow
def test_streamed_head_matches_the_in_memory_path(loss):
    X, y = _problem(2000)
    Xt, yt, Xe, ye = X[:1200], y[:1200], X[1200:], y[1200:]
    s = StreamingLinearHead(loss=loss, Cs=CS, folds=3).fit(Xt, yt)
    p = PathLinearHead(loss=loss, Cs=CS, folds=3, patience=None).fit(Xt, yt)
    assert s.selection_.startswith("3-fold cv")
    assert abs(s.score(Xe, ye) - p.score(Xe, ye)) <= 0.02
    assert s.score(Xe, ye) > 0.8
    assert s.best_params_["C"] in CS and len(s.cv_results_["params"]) == len(CS)
    proba = s.predict_proba(Xe)
    assert proba.shape == (800, 4) and np.allclose(proba.sum(1), 1)


@pytest.mark.parametrize("C", [0.01, 1.0])
@pytest.mark.slow
def test_streamed_logreg_reaches_the_regularised_optimum(C):
    """At one C the streamed head ends at scikit-learn's objective: a small C is its own (poor) optimum, not a
    drifted warm start, so the C chosen on held-out rows means what it says."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    X, y = _problem(2000, classes=3)
    X = X @ np.random.default_rng(1).normal(0, 1, (16, 16)).astype(np.float32)  # correlated features
    scale = X.std(0)

    def objective(coef, b):  # mean log loss + the L2 penalty in standardised units, as scikit-learn's
        z = X @ coef.T + b
        z = z - z.max(1, keepdims=True)
        nll = np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(y)), y])
        return nll + 0.5 * np.sum((coef * scale) ** 2) / (C * len(y))

    ref = LogisticRegression(C=C, tol=1e-8, max_iter=5000).fit(StandardScaler().fit_transform(X), y)
    ref_obj = objective(ref.coef_ / scale, ref.intercept_ - (ref.coef_ / scale) @ X.mean(0))
    s = StreamingLinearHead(loss="logistic", Cs=(C,), epochs=4).fit(X, y)
    assert objective(s.coef_, s.intercept_) <= ref_obj * 1.002 + 1e-4


@pytest.mark.slow
def test_large_sets_select_on_a_stratified_held_out_slice(monkeypatch):
    monkeypatch.setattr(stream_source, "KFOLD_MAX_ROWS", 100)
    X, y = _problem(3000, classes=2)
    s = StreamingLinearHead(loss="logistic", Cs=CS, epochs=2).fit(X[:2500], y[:2500])
    assert s.selection_.startswith("holdout 10% (250 of 2,500")
    assert s.n_splits_ == 1 and s.coef_.shape == (1, 16)  # binary: one score column, as scikit-learn
    assert s.score(X[2500:], y[2500:]) > 0.8


def test_holdout_is_stratified_and_seeded():
    y = np.array([0] * 900 + [1] * 90 + [2] * 10 + [3])
    f = holdout_folds(y, fraction=0.1, max_rows=10_000, seed=1)
    assert np.bincount(y[f == 0]).tolist() == [90, 9, 1]  # the single row of class 3 is never held out
    assert np.array_equal(f, holdout_folds(y, fraction=0.1, max_rows=10_000, seed=1))
    assert (holdout_folds(y, fraction=0.1, max_rows=50, seed=1) == 0).sum() <= 55


def test_blocks_cover_every_row_once_and_drop_non_finite_rows():
    X = np.arange(3000 * 4, dtype=np.float32).reshape(3000, 4)
    X[7] = np.nan
    blocks = list(prefetch(iter_blocks(ArraySource(X), np.random.default_rng(0))))
    pos = np.concatenate([p for p, _ in blocks])
    assert sorted(pos.tolist()) == [i for i in range(3000) if i != 7]
    assert all(np.array_equal(Xb, X[p]) for p, Xb in blocks)


def test_prefetch_raises_the_readers_error():
    def bad():
        yield 1
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        list(prefetch(bad()))


def test_solver_choice():
    assert use_stream("stream", n_train=10, n_eval=1, dim=4, n_classes=2)
    assert not use_stream("memory", n_train=10**9, n_eval=1, dim=4096, n_classes=2)
    assert use_stream("auto", n_train=10**9, n_eval=1, dim=4096, n_classes=2)  # 16 TB: streams
    assert not use_stream("auto", n_train=100, n_eval=10, dim=8, n_classes=2)
    with pytest.raises(FeatxError, match="--solver"):
        use_stream("fast", n_train=1, n_eval=1, dim=1, n_classes=2)


def test_auto_names_the_streaming_solver_when_the_in_memory_search_would_take_hours(monkeypatch, caplog):
    from featx.heads.tuning import solver_choice

    monkeypatch.setattr(solver_choice, "available_bytes", lambda: 1 << 40)  # fits: auto keeps it in memory
    with caplog.at_level("WARNING"):
        assert not use_stream("auto", n_train=1437, n_eval=360, dim=1712, n_classes=10)  # the demo
        assert not caplog.text
        assert not use_stream("auto", n_train=100_000, n_eval=10_000, dim=1280, n_classes=1000)
    assert "100,000 rows x 1,280 features x 1,000 classes can take hours" in caplog.text
    assert "--solver stream" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):  # kNN alone runs no C search, and --solver stream would not train it faster
        assert not use_stream("auto", n_train=100_000, n_eval=10_000, dim=1280, n_classes=1000, linear=False)
    assert not caplog.text


@pytest.mark.slow
def test_probe_streams_saves_a_loadable_head_and_refuses_knn_dino(tiny_cache, tmp_path):  # noqa: F811
    res = featx.probe(tiny_cache, head="logreg", solver="stream", out_dir=tmp_path, n_jobs=1, device="cpu",
                      plots=False, grids={"logreg": {"C": [0.01, 1.0]}}, view="final")
    entry = res["heads"]["logreg"]
    assert entry["solver"] == "stream" and "fold cv" in entry["selection"]
    est, _ = load_head(entry["model_path"])
    X = tiny_cache.features("val")
    assert np.mean(est.predict(X) == tiny_cache.labels("val")) == entry["accuracy"]
    with pytest.raises(FeatxError, match="--solver memory"):
        featx.probe(tiny_cache, head="knn_dino", solver="stream", out_dir=tmp_path / "k", n_jobs=1, device="cpu",
                    plots=False, save=False)


SCRIPT = textwrap.dedent("""
    import json, resource, sys
    import torch  # mapped before the limit: the budget is for the features
    try:
        import faiss  # noqa: F401 - likewise, where installed (the streamed kNN's search)
    except ImportError:
        pass
    import featx.runs.probe as probing
    from featx.heads.tuning.memory import address_space_bytes
    resource.setrlimit(resource.RLIMIT_AS, (address_space_bytes() + (int(sys.argv[2]) << 20), resource.RLIM_INFINITY))
    head = sys.argv[4] if len(sys.argv) > 4 else "logreg"
    import featx.heads.stream.knn as stream_knn
    stream_knn.HOLDOUT_MAX_QUERIES = 2_000  # k chosen on 2,000 held-out queries (10,000 by default): a shorter test
    grids = {"logreg": {"C": [0.01, 1.0]}} if head == "logreg" else {"knn": {"n_neighbors": [1, 5, 15]}}
    res = probing.probe(sys.argv[1], head=head, device="cpu", n_jobs=1, plots=False, out_dir=sys.argv[3],
                        grids=grids, stream_epochs=1)
    h = res["heads"][head]
    print(json.dumps({"accuracy": h["accuracy"], "solver": h["solver"], "n_train": res["split"]["n_train"],
                      "selection": h.get("selection")}))
""")
N_TRAIN, DIM, BUDGET_MB = 160_000, 768, 300  # 160,000 x 768 float32 training features = 469 MiB, more than 300 MiB


@pytest.fixture(scope="module")
def big_cache(tiny_cache, tmp_path_factory):  # noqa: F811
    return _big_cache(tiny_cache, tmp_path_factory.mktemp("big") / "big.h5", n_train=N_TRAIN, n_eval=300, dim=DIM)


def _limited(cache: Path, out: Path, head: str) -> dict:
    """The probe of ``head`` in a subprocess that may add only BUDGET_MB to its address space."""
    import json

    env = {"PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2",
           "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(cache), str(BUDGET_MB), str(out), head],
                          capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_streaming_trains_on_a_cache_bigger_than_the_address_space_limit(big_cache, tmp_path):
    n_train, dim, budget_mb = N_TRAIN, DIM, BUDGET_MB
    assert n_train * dim * 4 > budget_mb << 20
    cache = big_cache
    got = _limited(cache, tmp_path / "o", "logreg")
    assert got["solver"] == "stream" and got["n_train"] == n_train
    # The same rows in memory (no limit), on a 20,000-row subset: the streamed head is as accurate.
    ref = featx.probe(cache, head="logreg", solver="memory", max_train_rows=20_000, out_dir=tmp_path / "m",
                      n_jobs=1, device="cpu", plots=False, save=False, grids={"logreg": {"C": [0.01, 1.0]}})
    assert got["accuracy"] >= ref["heads"]["logreg"]["accuracy"] - 0.01
    with h5py.File(cache) as f:
        assert f["features"].shape == (n_train + 300, dim)


@pytest.mark.slow
def test_streamed_knn_searches_a_cache_bigger_than_the_address_space_limit(big_cache, tmp_path):
    got = _limited(big_cache, tmp_path / "o", "knn")
    assert got["solver"] == "stream" and got["n_train"] == N_TRAIN
    assert got["selection"].startswith("holdout 1.3% (2,001 of 160,000 training rows")
    assert (tmp_path / "o" / "predictions_knn.csv").is_file()
    est, _ = load_head(tmp_path / "o" / "knn.skops")  # 469 MiB of reference rows: the head reads them from the cache
    assert est.fit_X_ is None and est.reference_["cache"] == str(big_cache)
    ref = featx.probe(big_cache, head="knn", solver="memory", max_train_rows=20_000, out_dir=tmp_path / "m",
                      n_jobs=1, device="cpu", plots=False, save=False, grids={"knn": {"n_neighbors": [1, 5, 15]}})
    assert got["accuracy"] >= ref["heads"]["knn"]["accuracy"] - 0.01


def test_streamed_reads_are_checked_against_the_row_checksums(tiny_cache, tmp_path, caplog):  # noqa: F811
    import shutil

    from featx.cache.store import FeatureCache
    from featx.heads.stream.source import CacheSource

    path = tmp_path / "damaged.h5"
    shutil.copy(tiny_cache.path, path)
    with h5py.File(path, "r") as f:  # one feature row overwritten in place, as a bad disk would
        d = f["features"]
        off = d.id.get_offset() if d.chunks is None else d.id.get_chunk_info(0).byte_offset
        width = d.shape[1] * d.dtype.itemsize
    with open(path, "r+b") as fh:
        fh.seek(off + width)
        fh.write(np.full(d.shape[1], 2.4e38, np.float32).astype(d.dtype).tobytes())
    fc = FeatureCache(path)
    src = CacheSource(fc, np.arange(4))
    with caplog.at_level("WARNING", logger="featx.cache.trust.integrity"):
        src.read(0, 4)
    src.close()
    assert "rows 1 of dataset 'features' do not match their checksums" in caplog.text


@pytest.mark.slow
def test_report_says_a_streamed_head_chose_on_a_held_out_slice_not_by_cv(tiny_cache, tmp_path, monkeypatch):  # noqa: F811
    from featx.report.metrics import markdown_table

    monkeypatch.setattr(stream_source, "KFOLD_MAX_ROWS", 10)
    res = featx.probe(tiny_cache, head="logreg", solver="stream", out_dir=tmp_path, n_jobs=1, device="cpu",
                      plots=False, grids={"logreg": {"C": [0.01, 1.0]}}, view="final", report=True)
    selection = res["heads"]["logreg"]["selection"]
    assert selection.startswith("holdout")
    for text in (markdown_table(res.to_dict()), (tmp_path / "report.html").read_text()):
        assert f"logreg: {selection}" in text and "fold CV" not in text
