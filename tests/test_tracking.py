"""MLflow logging of a run folder, against real local MLflow stores (SQLite and the plain-file store)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from featx.base.errors import FeatxError
from featx.base.io import write_json
from featx.report.tracking import log_run

mlflow = pytest.importorskip("mlflow")


@pytest.fixture
def run_dir(tmp_path):
    """A probe run folder as featx writes it (JSON, report, PNG, a saved head with its sidecar)."""
    d = tmp_path / "runs" / "probe-x"
    d.mkdir(parents=True)
    write_json(d / "metrics.json", {
        "featx_version": "0.1.0", "fingerprint": "f" * 64,
        "cache": {"path": "/nowhere.h5", "backbone": "tiny_cnn", "dim": 32, "classes": ["a", "b"], "root": "/data/ants",
                  "fingerprint": "f" * 64},
        "settings": {"heads": ["logreg", "knn"], "test_size": 0.2, "seed": 0, "grids": {"logreg": {"C": [0.1, 1.0]}}},
        "split": {"n_train": 80, "n_eval": 20}, "cv": {"used": 5},
        "heads": {"logreg": {"accuracy": 0.9, "accuracy_ci95": [0.7, 0.97], "balanced_accuracy": 0.89, "macro_f1": 0.88,
                             "cv_score": 0.91, "fit_seconds": 1.5, "params": {"C": 0.1}, "model_path": str(d / "logreg.joblib")},
                  "knn": {"accuracy": 0.85, "cv_score": None, "params": {"n_neighbors": 5}}},
    })
    (d / "report.html").write_text("<!doctype html><title>r</title>")
    Image.new("RGB", (10, 10)).save(d / "confusion_logreg.png")
    (d / "logreg.joblib").write_bytes(b"head bytes")
    write_json(d / "logreg.json", {"format": "featx-head/1"})
    write_json(d / "fewshot.json", {"rows": [{"head": "logreg", "shots": k, "mean": m} for k, m in ((1, .5), (5, .8))]})
    return d


def _check(uri: str, res: dict) -> None:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    r = c.get_run(res["run_id"])
    assert r.info.status == "FINISHED" and r.info.run_name == "probe-x"
    m = r.data.metrics
    assert m["logreg.accuracy"] == 0.9 and m["logreg.accuracy_ci95_low"] == 0.7 and m["knn.accuracy"] == 0.85
    assert "knn.cv_score" not in m  # missing numbers are not logged as zeros
    p = r.data.params
    assert p["probe.seed"] == "0" and p["probe.grids.logreg.C"] == "[0.1, 1.0]" and p["cache.backbone"] == "tiny_cnn"
    assert p["probe.logreg.params.C"] == "0.1" and p["cache.n_classes"] == "2"
    assert r.data.tags["featx.dataset"] == "ants"
    hist = c.get_metric_history(res["run_id"], "fewshot.logreg.accuracy")
    assert sorted((h.step, h.value) for h in hist) == [(1, 0.5), (5, 0.8)]
    names = {a.path for a in c.list_artifacts(res["run_id"])}
    assert {"report.html", "confusion_logreg.png", "logreg.joblib", "logreg.json", "metrics.json", "fewshot.json"} <= names


@pytest.mark.slow
def test_log_run_to_a_local_sqlite_store(run_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # the default store is ./mlruns
    res = log_run(run_dir)
    assert res["tracking_uri"] == f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    _check(res["tracking_uri"], res)
    assert any((tmp_path / "mlruns" / "artifacts").rglob("report.html"))
    again = log_run(run_dir)  # same experiment, a second run
    assert again["experiment_id"] == res["experiment_id"] and again["run_id"] != res["run_id"]


def test_log_run_to_a_file_store_from_the_environment(run_dir, tmp_path, monkeypatch):
    uri = (tmp_path / "store").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps its file store behind this switch
    res = log_run(run_dir, experiment="featx-test")
    assert res["tracking_uri"] == uri
    _check(uri, res)
    assert (tmp_path / "store" / res["experiment_id"] / res["run_id"] / "artifacts" / "report.html").is_file()


def test_log_run_errors(tmp_path, run_dir):
    with pytest.raises(FeatxError, match="does not exist"):
        log_run(tmp_path / "missing")
    with pytest.raises(FeatxError, match="could not log"):
        log_run(run_dir, tracking_uri="unknownscheme://x")
    json.loads((run_dir / "metrics.json").read_text())  # the run folder is left as it was
