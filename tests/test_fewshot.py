"""Few-shot curves: the sampler (k per class, seeds reproducible, nested), CV within the draw, JSON, PNG."""

from __future__ import annotations

import json

import numpy as np
import pytest

import featx
from featx.base.errors import FeatxError
from featx.heads.estimators.fewshot import FALLBACK_PARAMS, draw_shots, fit_in_draw, t_interval
from featx.runs.fewshot import fewshot
from tests.conftest import write_image_folder


def _blobs(n_per_class: int = 30, n_classes: int = 4, dim: int = 12, seed: int = 0, noise: float = 1.0):
    rng = np.random.default_rng(seed)
    centres = 2.0 * rng.normal(size=(n_classes, dim))
    y = np.repeat(np.arange(n_classes), n_per_class)
    return centres[y] + noise * rng.normal(size=(len(y), dim)), y


def _arrays(noise: float = 1.0):
    X, y = _blobs(30, noise=noise, seed=0)
    Xe, ye = _blobs(25, noise=noise, seed=0)
    rng = np.random.default_rng(99)
    Xe = Xe + 0.1 * rng.normal(size=Xe.shape)  # same centres (seed 0), fresh noise
    return {"X_train": X, "y_train": y, "X_eval": Xe, "y_eval": ye, "classes": ["a", "b", "c", "d"]}


def test_draw_takes_exactly_k_per_class_reproducibly_and_nested():
    y = np.array([0] * 7 + [1] * 12 + [2] * 5)
    for k in (1, 2, 5):
        rows, taken = draw_shots(y, k, seed=3)
        assert np.bincount(y[rows]).tolist() == [k, k, k]
        assert taken == {0: k, 1: k, 2: k}
        again, _ = draw_shots(y, k, seed=3)
        np.testing.assert_array_equal(rows, again)
    other, _ = draw_shots(y, 5, seed=4)
    assert not np.array_equal(draw_shots(y, 5, seed=3)[0], other)
    assert set(draw_shots(y, 2, seed=3)[0]) <= set(draw_shots(y, 5, seed=3)[0])  # nested over k


def test_draw_too_few_images_errors_with_fix_or_caps():
    y = np.array([0] * 7 + [1] * 3)
    with pytest.raises(FeatxError, match=r"class 1 has only 3 .*--shots.*--cap-shots"):
        draw_shots(y, 5, seed=0)
    rows, taken = draw_shots(y, 5, seed=0, cap=True)
    assert taken == {0: 5, 1: 3} and np.bincount(y[rows]).tolist() == [5, 3]


@pytest.mark.slow
def test_one_shot_falls_back_and_more_shots_cross_validate():
    X, y = _blobs(10)
    rows, _ = draw_shots(y, 1, seed=0)
    est, params, used_cv = fit_in_draw("logreg", X[rows], y[rows], shots=1, seed=0, grid={"C": [0.1, 1.0]})
    assert not used_cv and params == FALLBACK_PARAMS["logreg"] == {"scale": "l2", "C": 1.0}
    assert type(est.named_steps["scale"]).__name__ == "Normalizer"
    _, params, _ = fit_in_draw("logreg", X[rows], y[rows], shots=1, seed=0, grid={"scale": ["standard"], "C": [0.1]})
    assert params == {"scale": "standard", "C": 0.1}  # a restricted grid restricts the fallback too
    rows, _ = draw_shots(y, 2, seed=0)
    est, params, used_cv = fit_in_draw("logreg", X[rows], y[rows], shots=2, seed=0,
                                       grid={"scale": ["standard", "l2"], "C": [1.0]})
    assert used_cv and len(est.cv_results_["params"]) == 2 and params["scale"] in ("standard", "l2")
    with pytest.raises(FeatxError, match="scale values"):
        fit_in_draw("logreg", X[rows], y[rows], shots=2, seed=0, grid={"scale": ["minmax"], "C": [1.0]})
    rows, _ = draw_shots(y, 3, seed=0)
    est, params, used_cv = fit_in_draw("knn", X[rows], y[rows], shots=3, seed=0,
                                       grid={"n_neighbors": [1, 3, 50], "weights": ["uniform"]})
    assert used_cv and est.cv.get_n_splits() == 3
    # 12 rows, 3 folds -> 8 rows per CV training fold: k = 50 is dropped from the grid.
    assert [p["clf__n_neighbors"] for p in est.cv_results_["params"]] == [1, 3]


def test_t_interval():
    lo, hi = t_interval([0.8, 0.9, 1.0])
    assert lo == pytest.approx(0.9 - 4.302653 * 0.1 / 3 ** 0.5, rel=1e-5)
    assert hi == pytest.approx(0.9 + 4.302653 * 0.1 / 3 ** 0.5, rel=1e-5)
    assert t_interval([0.5]) == (None, None)


@pytest.mark.slow
def test_fewshot_on_arrays_json_shape_png_and_reproducible(tmp_path):
    data = _arrays()
    res = fewshot(data, shots=(1, 2, 5), seeds=2, heads=("logreg", "knn", "knn_dino"), out_dir=tmp_path / "a")
    d = json.loads((tmp_path / "a" / "fewshot.json").read_text())
    assert set(d["heads"]) == {"logreg", "knn", "knn_dino"}
    assert d["settings"]["shots"] == [1, 2, 5] and d["settings"]["seeds"] == [0, 1]
    for head, per in d["heads"].items():
        assert set(per) == {"1", "2", "5"}
        for k, cell in per.items():
            assert len(cell["per_seed"]) == 2 and cell["n_train"] == [4 * int(k)] * 2
            assert cell["mean"] == pytest.approx(np.mean(cell["per_seed"]))
            assert cell["ci95"][0] <= cell["mean"] <= cell["ci95"][1]
            assert cell["cv"] is (k != "1")
            if head == "logreg":
                assert all(set(p) == {"scale", "C"} for p in cell["params"])
    assert any("fixed defaults" in n for n in d["notes"])
    # Well separated blobs: 5 shots beat chance (25 %) by far.
    assert res.mean("logreg", 5) > 0.9
    png = tmp_path / "a" / "fewshot.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    again = fewshot(data, shots=(1, 2, 5), seeds=2, heads=("logreg", "knn", "knn_dino"), out_dir=tmp_path / "b",
                    plot=False)
    for head in res.heads:
        for k in ("1", "2", "5"):
            assert again.heads[head][k]["per_seed"] == res.heads[head][k]["per_seed"]
            assert again.heads[head][k]["params"] == res.heads[head][k]["params"]
    assert again.png_path is None and not (tmp_path / "b" / "fewshot.png").exists()


def test_fewshot_options_are_checked():
    data = _arrays()
    with pytest.raises(FeatxError, match="few-shot heads"):
        fewshot(data, heads="svm", shots=(1,), seeds=1, plot=False)
    with pytest.raises(FeatxError, match="--shots"):
        fewshot(data, shots=(0,), seeds=1, plot=False)
    with pytest.raises(FeatxError, match="fewer than 40 shots"):
        fewshot(data, shots=(40,), seeds=1, plot=False)
    with pytest.raises(FeatxError, match="missing"):
        fewshot({"X_train": data["X_train"]}, shots=(1,), seeds=1)


@pytest.mark.slow
def test_fewshot_on_a_cache_uses_the_probe_split(tmp_path):
    root = write_image_folder(tmp_path / "data", splits=(), classes=("r", "g", "b"), per_class=8)
    fc = featx.embed(root, backbone="tiny_cnn", weights="random", cache_dir=tmp_path / "cache", progress=False)
    res = fewshot(fc, shots=(1, 2), seeds=2, heads="logreg,knn_dino", out_dir=tmp_path / "out")
    # No val/test split: the probe's seeded stratified hold-out (20 % of 24 -> 5 eval rows).
    assert res.split["kind"] == "holdout" and res.split["n_eval"] == 5 and res.split["n_train"] == 19
    assert res.source["kind"] == "cache" and sorted(res.classes) == ["b", "g", "r"]
    assert res.heads["logreg"]["2"]["n_train"] == [6, 6]
    assert (tmp_path / "out" / "fewshot.png").exists() and (tmp_path / "out" / "fewshot.json").exists()
