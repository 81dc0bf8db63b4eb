"""Metrics against hand-computed values, the comparison table, the confusion PNG, strict JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from featx.base.io import write_json
from featx.report import metrics as report


def test_metrics_match_hand_computed_values():
    classes = ["a", "b", "c"]
    y_true = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    y_pred = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    m = report.compute_metrics(y_true, y_pred, classes=classes)
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 1 / 2 + 1) / 3)
    # F1: a = 2*1*.75/1.75, b = 2*.5*.5/1, c = 2*(2/3)*1/(5/3)
    f1 = [2 * 0.75 / 1.75, 0.5, 0.8]
    assert m["macro_f1"] == pytest.approx(np.mean(f1))
    assert m["per_class"]["b"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert m["confusion_matrix"] == [[3, 1, 0], [0, 1, 1], [0, 0, 2]]
    assert "top5_accuracy" not in m  # only with more than 5 classes
    lo, hi = m["accuracy_ci95"]
    assert lo < 0.75 < hi and hi - lo > 0.4  # 8 images say little
    lo, hi = report.wilson_interval(950, 1000)
    assert 0.934 < lo < 0.94 and 0.96 < hi < 0.965


def test_balanced_accuracy_ignores_classes_absent_from_eval():
    m = report.compute_metrics(np.array([0, 0, 1]), np.array([0, 2, 1]), classes=["a", "b", "c"])
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 1) / 2)
    assert m["per_class"]["c"]["support"] == 0


def test_top5_with_more_than_five_classes():
    n_cls = 7
    classes = [f"c{i}" for i in range(n_cls)]
    y_true = np.array([0, 1, 2, 3])
    scores = np.tile(np.arange(n_cls, dtype=float)[::-1], (4, 1))  # ranking c0 > c1 > ... > c6
    m = report.compute_metrics(y_true, np.zeros(4, int), classes=classes, scores=scores)
    assert m["top5_accuracy"] == 1.0
    scores[3] = np.arange(n_cls)  # c6 > ... > c0: class 3 is 4th -> still top-5
    scores[2] = 0
    scores[2, 2] = -1  # class 2 is last
    m = report.compute_metrics(y_true, np.zeros(4, int), classes=classes, scores=scores)
    assert m["top5_accuracy"] == 0.75
    # Score columns for a subset of classes (a head that never saw some classes).
    sub = report.top_k_accuracy(np.array([5, 6]), np.array([[1.0, 0.0], [0.0, 1.0]]), [5, 6], k=1)
    assert sub == 1.0


def test_markdown_table_compares_heads():
    result = {
        "heads": {
            "logreg": {"accuracy": 0.95, "balanced_accuracy": 0.94, "macro_f1": 0.945, "cv_score": 0.96,
                       "params": {"C": 0.00316}, "fit_seconds": 1.23, "predict_seconds": 0.01},
            "knn": {"accuracy": 0.9, "balanced_accuracy": 0.9, "macro_f1": 0.9, "cv_score": float("nan"),
                    "params": {"n_neighbors": 5, "weights": "distance"}, "fit_seconds": 0.5, "predict_seconds": 0.02},
        },
        "split": {"kind": "holdout", "n_train": 80, "n_eval": 20, "eval_split": "train (held out)",
                  "test_size": 0.2, "seed": 0},
        "cache": {"backbone": "tiny_cnn", "dim": 32, "fingerprint": "abcdef0123456789", "classes": ["a", "b"]},
        "cv": {"used": 5},
    }
    t = report.markdown_table(result)
    lines = t.splitlines()
    assert lines[0].startswith("| head | accuracy |") and len(lines[0].split("|")) == len(lines[1].split("|"))
    assert "| logreg | 0.9500 | - | 0.9400 | 0.9450 | 0.9600 | C=0.00316 | 1.23 | 0.010 |" in t
    assert "| knn | 0.9000 |" in t and "n_neighbors=5, weights=distance" in t and "| - |" in t
    assert "hold-out" in t and "tiny_cnn" in t


@pytest.mark.slow
def test_confusion_png_small_and_large(tmp_path):
    cm = np.array([[8, 2], [1, 9]])
    p = report.plot_confusion(cm, ["ants", "bees"], tmp_path / "cm.png", title="t")
    with Image.open(p) as im:
        assert im.format == "PNG" and im.size[0] > 300
    rng = np.random.default_rng(0)
    big = rng.integers(0, 5, size=(60, 60)) + np.diag(np.full(60, 50))
    p2 = report.plot_confusion(big, [f"class_{i}" for i in range(60)], tmp_path / "big.png")
    assert p2.stat().st_size > 1000


def test_write_json_is_strict(tmp_path):
    p = write_json(tmp_path / "m.json", {"a": float("nan"), "b": np.float32(0.5), "c": np.arange(3), "d": [np.int64(2)]})
    assert json.loads(p.read_text()) == {"a": None, "b": 0.5, "c": [0, 1, 2], "d": [2]}


# --------------------------------------------------------------------------- report building blocks


def test_predictions_confidence_and_worst_first(tmp_path):
    from featx.report.predictions import make_predictions, read_predictions, worst_first, write_predictions

    classes = ["a", "b", "c"]
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.2, 0.7], [0.05, 0.9, 0.05], [0.3, 0.6, 0.1]])
    preds = make_predictions(rows=[10, 11, 12, 13], keys=["x/1.png", "x/2,comma.png", "y/3.png", "y/4.png"],
                             splits=["val"] * 4, y_true=[0, 0, 2, 1], y_pred=[0, 2, 1, 1], classes=classes,
                             scores=probs, score_labels=[0, 1, 2])
    assert preds[1].pred == "c" and preds[1].confidence == pytest.approx(0.7) and preds[1].p_true == pytest.approx(0.1)
    wrong = worst_first(preds)
    assert [p.row for p in wrong] == [12, 11]  # 0.9 confident mistake before 0.7
    path = write_predictions(tmp_path / "p.csv", preds)
    back = read_predictions(path)
    assert [p.to_dict() for p in back] == [p.to_dict() for p in preds]
    # decision values (not probabilities) are turned into a softmax; a head that never saw class 2
    d = make_predictions(rows=[0], keys=["k"], splits=["val"], y_true=[2], y_pred=[0], classes=classes,
                         scores=np.array([[2.0, -1.0]]), score_labels=[0, 1])
    assert d[0].confidence == pytest.approx(np.exp(2) / (np.exp(2) + np.exp(-1))) and d[0].p_true == 0.0


def test_per_class_rows_worst_first_and_escaping():
    from featx.report.tables import Markup, esc, per_class_rows, table

    rows = per_class_rows({"good": {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 5},
                           "bad": {"precision": 0.5, "recall": 0.2, "f1": 0.29, "support": 5},
                           "absent": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}})
    assert [r[0] for r in rows] == ["bad", "good"]
    assert esc('<b a="1">') == "&lt;b a=&quot;1&quot;&gt;" and esc(Markup("<b>")) == "<b>"
    t = table(["h<1>"], [["<script>"]])
    assert "<script>" not in t and "&lt;script&gt;" in t and "h&lt;1&gt;" in t


def test_fewshot_series_reads_several_layouts():
    from featx.report.plots.charts import compare_intervals, fewshot_series

    rows = {"rows": [{"head": "logreg", "shots": 5, "mean": 0.8, "ci95": [0.7, 0.9]},
                     {"head": "logreg", "shots": 1, "mean": 0.5, "ci95": [0.4, 0.6]}]}
    assert fewshot_series(rows) == {"logreg": [(1, 0.5, 0.4, 0.6), (5, 0.8, 0.7, 0.9)]}
    nested = {"heads": {"knn": {"1": {"accuracy_mean": 0.4, "accuracy_ci95": [0.3, 0.5]}, "10": {"mean": 0.7}}}}
    assert fewshot_series(nested) == {"knn": [(1, 0.4, 0.3, 0.5), (10, 0.7, None, None)]}
    assert fewshot_series({"heads": {"knn": [{"k": 2, "mean": 0.6}]}}) == {"knn": [(2, 0.6, None, None)]}
    assert fewshot_series({"something": "else"}) == {}
    ci = compare_intervals([{"method": "m", "accuracy": 0.5}, {"method": "n", "accuracy": float("nan")}], 100)
    assert len(ci) == 1 and ci[0]["ci95"] == pytest.approx(list(report.wilson_interval(50, 100)))
