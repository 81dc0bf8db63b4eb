"""featx export-model: the ONNX graph predicts what `featx predict` does (tiny backbone, generated images)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

import featx
from featx.base.errors import FeatxError
from featx.embedding.multi import embed_backbones

from conftest import make_tiny_cache, write_image_folder

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def _probe(fc, out: Path, **kw) -> Path:
    featx.probe(fc, out_dir=out, quiet=True, report=False, **kw)
    return out


def _check(head: Path, tmp: Path, cache_dir: Path) -> featx.runs.export_model.ExportModelResult:
    res = featx.export_model(head, tmp / f"{head.stem}.onnx", cache_dir=cache_dir)
    assert res.verified_images == res.top1_agree == 30  # every evaluation image: same class as featx predict
    assert res.max_abs_diff <= 1e-4
    model = onnx.load(res.model)
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["classes"]) == ["cats", "dogs", "owls"]
    assert meta["featx_version"] == featx.__version__ and meta["cache_identity"]
    assert [i.name for i in model.graph.input] == ["image"]
    assert [o.name for o in model.graph.output] == ["probabilities", "label"]
    return res


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return make_tiny_cache(tmp_path_factory.mktemp("export"))


@pytest.mark.slow
def test_every_head_exports_and_matches_predict(cache, tmp_path):
    runs = _probe(cache, tmp_path / "runs", head="all")
    dino = _probe(cache, tmp_path / "dino", head="knn_dino")
    for name in ("logreg", "svm", "knn"):
        _check(runs / f"{name}.skops", tmp_path, cache.path.parent)
    _check(dino / "knn_dino.skops", tmp_path, cache.path.parent)


@pytest.mark.slow
def test_view_norm_and_streamed_heads(cache, tmp_path):
    runs = _probe(cache, tmp_path / "r1", head="logreg", view="multi3", norm="power")
    res = _check(runs / "logreg.skops", tmp_path, cache.path.parent)
    assert res.view == "multi3"
    runs = _probe(cache, tmp_path / "r2", head="all", solver="stream")
    for name in ("logreg", "svm", "knn"):
        _check(runs / f"{name}.skops", tmp_path, cache.path.parent)


@pytest.mark.slow
def test_cache_set_head_exports_both_networks(tmp_path):
    root = write_image_folder(tmp_path / "data", classes=("cats", "dogs", "owls"), per_class=10)
    _, cs = embed_backbones(root, backbone="tiny_cnn,tiny_cnn_b", cache_dir=tmp_path / "cache", weights="random",
                            device="cpu", num_workers=0, progress=False)
    runs = _probe(cs, tmp_path / "runs", head="logreg", view="final@tiny_cnn+tiny_cnn_b")
    res = _check(runs / "logreg.skops", tmp_path, tmp_path / "cache")
    assert res.view == "final@tiny_cnn+tiny_cnn_b"


@pytest.mark.slow
def test_knn_over_the_size_limit_is_refused_and_nothing_written(cache, tmp_path):
    runs = _probe(cache, tmp_path / "runs", head="knn")
    with pytest.raises(FeatxError, match="max-model-mb"):
        featx.export_model(runs / "knn.skops", tmp_path / "m.onnx", max_model_mb=0.001, cache_dir=cache.path.parent)
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "preprocess.py").exists()


@pytest.mark.slow
def test_preprocess_py_is_bit_identical_to_featx(tmp_path):
    from PIL import Image

    from featx.embedding.export_preprocess import preprocess_source
    from featx.embedding.networks.registry import Preprocess

    rng = np.random.default_rng(0)
    for resize, crop, interp in [(36, 32, "bilinear"), (256, 224, "bicubic"), (298, 260, "bicubic")]:
        pre = Preprocess(resize, crop, (0.5,) * 3, (0.5,) * 3, interp)
        src = preprocess_source(pre)
        assert len(src.splitlines()) <= 30 and "torch" not in src
        (tmp_path / "preprocess.py").write_text(src)
        spec = importlib.util.spec_from_file_location("pp", tmp_path / "preprocess.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        for size in [(40, 30), (500, 333), (224, 224), (97, 300), (20, 20)]:
            im = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
            want = pre.uint8_transform()(im).permute(1, 2, 0).numpy()[None]
            assert np.array_equal(mod.preprocess(im), want), (resize, interp, size)


@pytest.mark.slow
def test_cli_export_model(cache, tmp_path):
    from click.testing import CliRunner

    from featx.cli import cli

    runs = _probe(cache, tmp_path / "runs", head="logreg")
    out = tmp_path / "cli" / "model.onnx"
    r = CliRunner().invoke(cli, ["export-model", "--head", str(runs / "logreg.skops"), "--out", str(out),
                                 "--cache-dir", str(cache.path.parent), "--verify", "8"])
    assert r.exit_code == 0, r.output
    assert "checked  8 images" in r.output and out.is_file() and (out.parent / "preprocess.py").is_file()


@pytest.mark.slow
def test_openvino_ir_matches_predict(cache, tmp_path):
    ov = pytest.importorskip("openvino")
    runs = _probe(cache, tmp_path / "runs", head="knn_dino")
    res = featx.export_model(runs / "knn_dino.skops", tmp_path / "ir" / "model.xml", fmt="openvino",
                             cache_dir=cache.path.parent)
    assert res.fmt == "openvino" and res.verified_images == res.top1_agree == 30 and res.max_abs_diff <= 1e-4
    assert (tmp_path / "ir" / "model.bin").is_file() and (tmp_path / "ir" / "preprocess.py").is_file()
    model = ov.Core().read_model(res.model)
    assert json.loads(model.get_rt_info(["featx", "classes"]).astype(str)) == ["cats", "dogs", "owls"]
    assert [i.get_any_name() for i in model.inputs] == ["image"]
    out = ov.Core().compile_model(model, "CPU")(np.zeros((2, 32, 32, 3), np.uint8))
    assert out["probabilities"].shape == (2, 3) and np.allclose(out["probabilities"].sum(1), 1, atol=1e-5)


@pytest.mark.slow
def test_export_requests_that_cannot_be_written_are_refused(cache, tmp_path):
    runs = _probe(cache, tmp_path / "runs", head="logreg")
    with pytest.raises(FeatxError, match="--format openvino"):
        featx.export_model(runs / "logreg.skops", tmp_path / "m.onnx", quantize="int8", cache_dir=cache.path.parent)
    with pytest.raises(FeatxError, match=r"must end in \.xml"):
        featx.export_model(runs / "logreg.skops", tmp_path / "m.onnx", fmt="openvino", cache_dir=cache.path.parent)
    assert not list(tmp_path.glob("m.*"))


def test_mcnemar_p():
    from featx.runs.export_openvino import mcnemar_p

    assert mcnemar_p(0, 0) == 1.0 and mcnemar_p(3, 3) == 1.0
    assert mcnemar_p(0, 6) == pytest.approx(2 / 64) and mcnemar_p(1, 9) == pytest.approx(2 * 11 / 1024)


@pytest.mark.slow
def test_int8_study_is_paired_and_a_drop_is_refused(cache, tmp_path):
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    runs = _probe(cache, tmp_path / "runs", head="logreg")
    res = featx.export_model(runs / "logreg.skops", tmp_path / "q" / "model.xml", fmt="openvino", quantize="int8",
                             max_accuracy_drop=100, verify=8, cache_dir=cache.path.parent)
    q = res.int8
    assert q["images"] == 30 and q["calibration_images"] == 30  # every val image, calibrated on the train split
    assert q["change_pts"] == pytest.approx(100 * (q["int8_accuracy"] - q["float_accuracy"]))
    assert q["change_pts"] == pytest.approx(100 * (q["int8_only_right"] - q["float_only_right"]) / 30)
    assert (tmp_path / "q" / "model.bin").is_file()
    with pytest.raises(FeatxError, match="max-accuracy-drop"):  # a drop of -100 pts: no model can pass
        featx.export_model(runs / "logreg.skops", tmp_path / "r" / "model.xml", fmt="openvino", quantize="int8",
                           max_accuracy_drop=-100, verify=0, cache_dir=cache.path.parent)
    assert not (tmp_path / "r").exists() or not list((tmp_path / "r").glob("model.*"))
