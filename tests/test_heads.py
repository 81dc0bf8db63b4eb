"""Heads, CV selection, split fallback, saved-head verification and refusal, probe and predict."""

from __future__ import annotations

import csv
import json
import logging
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import featx
from featx.cache.store import FeatureCache
from featx.cli import cli
from featx.data import train_eval_split
from featx.data.splits import plan_folds
from featx.errors import FeatxError
from featx.heads.saved.persist import load_head
from featx.heads.tuning import factory, grids
from featx.heads.tuning import factory as heads
from featx.runs.predict import predict

from conftest import tiny_embed, write_image_folder


def _blobs(n_per=30, d=8, k=3, sep=4.0, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, sep, size=(k, d))
    X = np.concatenate([rng.normal(c, 1.0, size=(n_per, d)) for c in centers]).astype(np.float32)
    y = np.repeat(np.arange(k), n_per)
    return X, y


def _cache(root: Path, cache_dir: Path, *, weights="random") -> FeatureCache:
    return tiny_embed(root, cache_dir, weights=weights)


# --------------------------------------------------------------------------- heads


@pytest.mark.parametrize("name,kernel", [("logreg", "linear"), ("svm", "linear"), ("svm", "rbf"), ("knn", "linear")])
@pytest.mark.slow
def test_each_head_learns_and_gives_probabilities(name, kernel):
    X, y = _blobs()
    Xt, yt = _blobs(n_per=20, seed=0)  # same centres, fresh noise
    rng = np.random.default_rng(1)
    Xt = Xt + rng.normal(0, 0.1, Xt.shape).astype(np.float32)
    est = heads.create_head(name, kernel=kernel, folds=3, n_jobs=1)
    assert est.fit(X, y) is est
    assert (est.predict(Xt) == yt).mean() > 0.9
    p = est.predict_proba(Xt)
    assert p.shape == (len(Xt), 3)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-6)
    assert (p.argmax(axis=1) == yt).mean() > 0.9
    assert est.params_ and set(est.params_) <= grids.GRID_PARAMS[heads.grid_key(name, kernel)]
    assert 0.9 < est.best_score_ <= 1.0


@pytest.mark.slow
def test_cv_chooses_different_c_when_the_data_demands_it():
    rng = np.random.default_rng(0)
    # Few rows, 300 noisy features, weak signal spread over 5 of them: strong regularisation wins.
    y_a = np.repeat([0, 1], 30)
    X_a = rng.normal(size=(60, 300))
    X_a[:, :5] += 1.5 * y_a[:, None]
    # Many rows, a clean linear boundary in 20 features: weak regularisation wins.
    X_b = rng.normal(size=(400, 20))
    y_b = (X_b[:, 0] + 0.5 * X_b[:, 1] > 0).astype(int)
    for name in ("logreg", "svm"):
        c_a = heads.create_head(name, n_jobs=1).fit(X_a, y_a).params_["C"]
        c_b = heads.create_head(name, n_jobs=1).fit(X_b, y_b).params_["C"]
        assert c_a * 100 <= c_b, (name, c_a, c_b)


def test_knn_grid_is_capped_to_the_fold_size():
    X, y = _blobs(n_per=4, k=2)  # 8 rows, 4-fold CV -> 6 training rows per fold
    est = heads.create_head("knn", n_jobs=1).fit(X, y)
    assert est.params_["n_neighbors"] <= 6
    assert est.n_candidates_ < 8 * 2


def test_grid_override_and_logspace():
    est = heads.create_head("logreg", grid={"C": {"logspace": [-1, 1, 3]}}, n_jobs=1)
    np.testing.assert_allclose(est.param_grid["clf__C"], [0.1, 1.0, 10.0])
    with pytest.raises(FeatxError, match="unknown parameter"):
        heads.create_head("logreg", grid={"gamma": [1.0]})
    with pytest.raises(FeatxError, match="did you mean 'svm'"):
        heads.create_head("svn")


def test_cuda_without_torch_head_falls_back_to_sklearn(monkeypatch, caplog):
    def unavailable(*a, **k):
        raise NotImplementedError("rbf kernel")

    monkeypatch.setattr(factory, "wants_cuda", lambda device: True)
    monkeypatch.setattr(factory, "create_torch_head", unavailable)
    with caplog.at_level(logging.WARNING, logger="featx.heads.tuning.factory"):
        est = heads.create_head("svm", device="cuda")
    assert isinstance(est, heads.HeadSearch)
    assert "no GPU implementation of head 'svm'" in caplog.text


@pytest.mark.slow
def test_head_search_pickles():
    X, y = _blobs(k=2)
    est = heads.create_head("svm", n_jobs=1).fit(X, y)
    again = pickle.loads(pickle.dumps(est))
    np.testing.assert_array_equal(again.predict(X), est.predict(X))


# --------------------------------------------------------------------------- folds / split fallback


def test_plan_folds_fallbacks():
    assert plan_folds(np.repeat([0, 1], 10), 5) == {"requested": 5, "used": 5, "stratified": True, "note": ""}
    small = plan_folds(np.array([0] * 10 + [1] * 3), 5)
    assert small["used"] == 3 and small["stratified"] and "only 3 training images" in small["note"]
    single = plan_folds(np.array([0] * 10 + [1]), 5)
    assert single["stratified"] and single["used"] == 5 and "single training image" in single["note"]
    assert list(heads.AdaptiveStratifiedKFold(5).split(np.zeros(11), np.array([0] * 10 + [1])))[0][0][-1] == 10
    with pytest.raises(FeatxError, match="at least 2"):
        plan_folds(np.zeros(10), 5)


@pytest.mark.parametrize("counts", [(12, 3), (12, 1)])
@pytest.mark.slow
def test_tiny_classes_never_crash(counts):
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], counts)
    X = rng.normal(size=(len(y), 4)) + 3 * y[:, None]
    from sklearn.exceptions import FitFailedWarning

    for name in grids.HEAD_NAMES:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FitFailedWarning)  # every CV fit must see both classes
            est = heads.create_head(name, n_jobs=1).fit(X, y)
        assert est.predict(X).shape == y.shape
        assert est.predict_proba(X).shape == (len(y), 2)


@pytest.mark.slow
def test_probe_holdout_split_matches_train_eval_split(tmp_path):
    root = write_image_folder(tmp_path / "flat", splits=(), classes=("a", "b"), per_class=10)
    fc = _cache(root, tmp_path / "cache")
    res = featx.probe(fc, head="knn", test_size=0.3, seed=3, out_dir=tmp_path / "out", n_jobs=1, device="cpu",
                      plots=False, save=False)
    tr, ev, desc = train_eval_split(fc.labels(), fc.split_array(), test_size=0.3, seed=3)
    assert res["split"]["kind"] == "holdout" and res["split"]["stratified"]
    assert res["split"]["n_eval"] == len(ev) == 6 and res["split"]["n_train"] == len(tr)
    assert res["split"]["seed"] == 3 and res["split"]["test_size"] == 0.3
    assert "hold-out" in res["table"]


@pytest.mark.slow
def test_probe_small_class_uses_fewer_folds(tmp_path, caplog):
    root = tmp_path / "data"
    write_image_folder(root, classes=("big",), per_class=8)
    write_image_folder(root, classes=("small",), per_class=2, seed=1)
    fc = _cache(root, tmp_path / "cache")
    with caplog.at_level(logging.WARNING, logger="featx.runs.probe"):
        res = featx.probe(fc, head="all", out_dir=tmp_path / "out", n_jobs=1, device="cpu", plots=False, save=False)
    assert res["cv"]["used"] == 2 and "2-fold" in res["cv"]["note"]
    assert all(h["cv_folds"] == 2 for h in res["heads"].values())
    assert "fewer than --folds 5" in caplog.text


# --------------------------------------------------------------------------- probe / save / load / refuse


@pytest.mark.slow
def test_probe_all_writes_report_and_heads(tiny_cache, tmp_path):
    out = tmp_path / "run"
    res = featx.probe(tiny_cache, head="all", out_dir=out, n_jobs=1, device="cpu", folds=3)
    assert list(res["heads"]) == ["logreg", "svm", "knn"]
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["heads"]["svm"]["params"] == res["heads"]["svm"]["params"]
    assert on_disk["split"]["eval_split"] == "val" and on_disk["split"]["n_eval"] == 30
    assert on_disk["cache"]["fingerprint"] == tiny_cache.fingerprint
    for name, h in on_disk["heads"].items():
        for key in ("accuracy", "balanced_accuracy", "macro_f1", "fit_seconds", "predict_seconds", "params", "cv_score"):
            assert key in h, (name, key)
        assert h["accuracy"] > 0.8, (name, h["accuracy"])  # class colours are easy even for random features
        assert set(h["per_class"]) == {"cats", "dogs", "owls"}
        assert sum(map(sum, h["confusion_matrix"])) == 30
        assert Path(h["confusion_png"]).stat().st_size > 1000
        # The saved head reproduces the reported accuracy on the same rows.
        est, meta = load_head(h["model_path"])
        acc = (est.predict(tiny_cache.features("val")) == tiny_cache.labels("val")).mean()
        assert acc == pytest.approx(h["accuracy"])
        assert meta["classes"] == ["cats", "dogs", "owls"] and meta["backbone"] == "tiny_cnn"
        assert meta["fingerprint_dict"]["weights_sha256"] == tiny_cache.meta["weights_sha256"]
    assert "| logreg |" in res["table"] and "| knn |" in res["table"]
    assert (out / "report.md").read_text().startswith("| head |")


def test_load_head_refuses_tampered_or_unverifiable_files(tiny_cache, tmp_path):
    res = featx.probe(tiny_cache, head="logreg", out_dir=tmp_path, n_jobs=1, device="cpu", plots=False)
    path = Path(res["heads"]["logreg"]["model_path"])
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(FeatxError, match="NOT unpickled"):
        load_head(path)
    path.with_suffix(".json").unlink()
    with pytest.raises(FeatxError, match="no sidecar"):
        load_head(path)


@pytest.mark.slow
def test_head_from_one_backbone_is_refused_on_another(tiny_cache, tmp_path):
    res = featx.probe(tiny_cache, head="svm", out_dir=tmp_path / "run", n_jobs=1, device="cpu", plots=False)
    head = res["heads"]["svm"]["model_path"]
    # Same architecture, other weights: a different backbone as far as the features go.
    from featx.embedding.backbones import create_backbone

    sd = create_backbone("tiny_cnn").model.state_dict()
    torch.save({k: v + 0.01 if v.is_floating_point() else v for k, v in sd.items()}, tmp_path / "other.pt")
    root = write_image_folder(tmp_path / "data", classes=("cats", "dogs", "owls"), per_class=2)
    other = _cache(root, tmp_path / "cache2", weights=str(tmp_path / "other.pt"))
    with pytest.raises(FeatxError, match="weights_sha256.*Embed the images with --backbone tiny_cnn"):
        predict(head, [str(other.path)], out=tmp_path / "p.csv")
    r = CliRunner().invoke(cli, ["predict", "--head", head, str(other.path), "--out", str(tmp_path / "p.csv")])
    assert r.exit_code == 2 and "does not fit" in r.output
    # Images are refused before anything is embedded when the backbone cannot be rebuilt the same.
    with pytest.raises(FeatxError, match="weights_sha256"):
        predict(head, [root], weights=str(tmp_path / "other.pt"), cache_dir=tmp_path / "c3", progress=False)
    assert not (tmp_path / "c3").exists()


@pytest.mark.slow
def test_predict_images_csv_matches_report_and_lists_bad_images(tiny_cache, tmp_path):
    res = featx.probe(tiny_cache, head="logreg", out_dir=tmp_path / "run", n_jobs=1, device="cpu", plots=False)
    head = res["heads"]["logreg"]["model_path"]
    val = Path(tiny_cache.root) / "val"
    bad = tmp_path / "extra" / "broken.jpg"
    bad.parent.mkdir()
    bad.write_bytes(b"not an image")
    out = tmp_path / "pred.csv"
    pr = predict(head, [val, bad], out=out, cache_dir=tmp_path / "cache", num_workers=0, progress=False)
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 30 and pr["n_images"] == 30
    assert pr["n_failed"] == 1 and pr["failed"][0]["path"] == str(bad)
    assert set(rows[0]) == {"path", "predicted", "folder", "p_cats", "p_dogs", "p_owls"}
    assert pr["folder_accuracy"] == pytest.approx(res["heads"]["logreg"]["accuracy"])
    for r in rows:
        assert abs(sum(float(r[f"p_{c}"]) for c in ("cats", "dogs", "owls")) - 1) < 1e-4
    # A second run reuses the cached features.
    again = predict(head, [val, bad], out=out, cache_dir=tmp_path / "cache", num_workers=0, progress=False)
    assert again["folder_accuracy"] == pr["folder_accuracy"]


# --------------------------------------------------------------------------- config + CLI


def test_heads_config_section_is_validated(tmp_path):
    grids.validate_heads_section({"svm": {"C": [0.1, 1]}, "scoring": "balanced_accuracy"}, "x.yaml")
    for bad, msg in [
        ({"svn": {"C": [1]}}, "did you mean 'svm'"),
        ({"svm": {"C": [-1]}}, "positive"),
        ({"knn": {"n_neighbors": [0]}}, ">= 1"),
        ({"logreg": {"C": {"logspace": [1, 2]}}}, "start, stop, num"),
    ]:
        with pytest.raises(FeatxError, match=msg):
            grids.validate_heads_section(bad, "x.yaml")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("heads:\n  svm:\n    C: [-1]\n")
    r = CliRunner().invoke(cli, ["--config", str(cfg), "probe", "--help"])
    assert r.exit_code == 2 and "heads.svm.C" in r.output


@pytest.mark.slow
def test_cli_probe_newest_cache_and_config_grid(tiny_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / tiny_cache.path.name).symlink_to(tiny_cache.path)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("heads:\n  svm:\n    C: [0.5]\nprobe:\n  folds: 3\n")
    r = CliRunner().invoke(cli, ["--config", str(cfg), "probe", "--head", "svm", "--n-jobs", "1", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "| svm |" in r.output and "C=0.5" in r.output
    runs = list((tmp_path / "runs").glob("probe-*/metrics.json"))
    assert len(runs) == 1
    m = json.loads(runs[0].read_text())
    assert m["heads"]["svm"]["params"]["C"] == 0.5 and m["settings"]["folds"] == 3


@pytest.mark.slow
def test_probe_many_classes_reports_top5_and_cli_predict(tmp_path):
    root = write_image_folder(tmp_path / "data", classes=tuple(f"k{i}" for i in range(7)), per_class=4, size=(36, 36))
    fc = _cache(root, tmp_path / "cache")
    res = featx.probe(fc, head="logreg", out_dir=tmp_path / "run", n_jobs=1, device="cpu", folds=3)
    h = res["heads"]["logreg"]
    assert 0 <= h["accuracy"] <= h["top5_accuracy"] <= 1 and "top-5" in res["table"]
    assert res["cv"]["used"] == 3
    out = tmp_path / "p.csv"
    r = CliRunner().invoke(cli, ["predict", "--head", h["model_path"], str(root / "val"), "--out", str(out),
                                 "--cache-dir", str(tmp_path / "pc"), "--workers", "0", "-q"])
    assert r.exit_code == 0, r.output
    assert "predicted 28 images" in r.output
    rows = list(csv.DictReader(out.open()))
    acc = np.mean([row["predicted"] == row["folder"] for row in rows])
    assert acc == pytest.approx(h["accuracy"])


@pytest.mark.slow
def test_probe_leaves_out_rows_with_nan_features(tiny_cache, tmp_path, caplog):
    import shutil

    import h5py

    path = tmp_path / tiny_cache.path.name
    shutil.copy(tiny_cache.path, path)
    with h5py.File(path, "r+") as f:
        f["features"][0] = np.nan  # a train row
    with caplog.at_level(logging.WARNING, logger="featx.runs.probe"):
        res = featx.probe(str(path), head="knn", out_dir=tmp_path / "o", n_jobs=1, device="cpu", plots=False, save=False)
    assert res["split"]["n_train"] == 29 and "NaN/inf" in caplog.text
