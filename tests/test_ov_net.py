"""OpenVINO with several batches in flight and uint8 input: same features, same order, as one by one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from featx.data.folders import discover
from featx.embedding.backbones import create_backbone
from featx.embedding.engines.cpu import forward_fn, iter_cpu_batches
from featx.embedding.runner import embed
from featx.embedding.runtimes import forward as runtimes

from conftest import TINY_BACKBONE

pytestmark = [pytest.mark.skipif(not runtimes.openvino_available(), reason="openvino is not installed"),
              pytest.mark.usefixtures("fresh_openvino")]




def _torch_fp32(bb, x: torch.Tensor) -> np.ndarray:
    """Plain torch on uint8 images normalised by torch (float ones are normalised already)."""
    x = bb.preprocess.normalize(x) if x.dtype == torch.uint8 else x
    with torch.inference_mode():
        return bb.model.eval()(x.contiguous()).float().numpy()


@pytest.mark.slow
def test_run_many_keeps_order_and_matches_one_by_one():
    bb = create_backbone("tiny_cnn", weights="random", views="final,stages")
    crop = bb.preprocess.crop
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (n, 3, crop, crop), dtype=torch.uint8, generator=gen) for n in (7, 0, 3, 8, 1, 5)]
    batches.insert(3, bb.preprocess.normalize(batches[2]))  # a float batch among uint8 ones
    f = forward_fn(bb, "cpu", runtime="openvino")
    out = list(f.run_many((i, x) for i, x in enumerate(batches)))
    assert [tag for tag, _ in out] == list(range(len(batches)))
    for (_, got), x in zip(out, batches):
        assert got.shape == (len(x), bb.out_dim) and got.dtype == np.float32
        if len(x):
            np.testing.assert_allclose(got, f(x), rtol=1e-5, atol=1e-6)  # in flight = one synchronous request
            ref = _torch_fp32(bb, x)
            assert np.abs(got - ref).max() < 1e-4  # uint8 normalised inside the network = torch's normalisation
    np.testing.assert_allclose(out[3][1], out[2][1], rtol=1e-4, atol=1e-5)  # uint8 and its float twin


@pytest.mark.slow
def test_run_many_stopped_early_waits_for_the_requests_in_flight():
    bb = create_backbone("tiny_cnn", weights="random")
    x = torch.zeros(4, 3, bb.preprocess.crop, bb.preprocess.crop, dtype=torch.uint8)
    it = forward_fn(bb, "cpu", runtime="openvino").run_many((i, x.clone()) for i in range(10))
    assert next(it)[0] == 0
    it.close()  # no request may still read an input that is freed now


@pytest.mark.slow
def test_uint8_loader_with_a_broken_image_gives_torch_features(image_folder, tmp_path):
    (image_folder / "train" / "cats" / "broken.jpg").write_bytes(b"not a jpeg")
    fc = embed(image_folder, **TINY_BACKBONE, cache_dir=tmp_path / "c", num_workers=1, batch_size=4, progress=False,
               device="cpu", runtime="openvino")
    assert [k for k, _ in fc.failed] == ["train/cats/broken.jpg"]
    bb = create_backbone("tiny_cnn", weights="random")
    samples = [s for s in discover(image_folder).samples if "broken" not in s.key]
    ref = {}
    for idx, x, errs, _m, _s in iter_cpu_batches(samples, bb, batch_size=5, num_workers=0, pin=False, uint8=True):
        assert x.dtype == torch.uint8 and not any(errs)
        for i, row in zip(idx, _torch_fp32(bb, x)):
            ref[samples[i].key] = row
    want = np.stack([ref[k] for k in fc.keys()])
    assert np.abs(fc.features() - want).max() < 1e-4
