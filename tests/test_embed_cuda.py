"""The CUDA variants of the embed and CLI tests (those are pinned to --device cpu); run only where CUDA is.

On a GPU host these check what the fakes elsewhere cannot: the GPU engine and the torch heads
really run, GPU rows get their own cache, and their features match the CPU's.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import featx
from featx.cli import cli

from conftest import TINY_BACKBONE, write_image_folder

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TINY = dict(TINY_BACKBONE, num_workers=2, progress=False, batch_size=8, views="final")


@pytest.fixture
def jpeg_folder(tmp_path):
    return write_image_folder(tmp_path / "data", per_class=12, size=(96, 72), fmt="jpg")


def _rows(fc) -> dict:
    return dict(zip(fc.keys(), fc.features().astype(np.float64)))


@pytest.mark.parametrize("engine", ["gpu", "cpu"])
def test_cuda_cache_is_its_own_and_matches_the_cpu(jpeg_folder, tmp_path, engine):
    cpu = featx.embed(jpeg_folder, cache_dir=tmp_path / "c", device="cpu", **TINY)
    gpu = featx.embed(jpeg_folder, cache_dir=tmp_path / "c", device="cuda", engine=engine, **TINY)
    assert gpu.path != cpu.path and len(gpu) == len(cpu) == 48 and not gpu.failed
    fp = gpu.fingerprint_dict
    assert fp["autocast"] == "bf16-cuda" and (fp.get("engine") == "gpu") == (engine == "gpu")
    a, b = _rows(cpu), _rows(gpu)
    cos = [a[k] @ b[k] / (np.linalg.norm(a[k]) * np.linalg.norm(b[k])) for k in a]
    assert min(cos) >= 0.99, min(cos)
    again = featx.embed(jpeg_folder, cache_dir=tmp_path / "c", device="cuda", engine=engine, **TINY)
    assert again.stats.embedded == 0 and again.path == gpu.path


def test_cuda_ordinal_zero_and_a_missing_ordinal(jpeg_folder, tmp_path):
    fc = featx.embed(jpeg_folder, cache_dir=tmp_path / "c", device="cuda:0", **TINY)
    assert len(fc) == 48
    with pytest.raises(featx.FeatxError, match="CUDA device"):
        featx.embed(jpeg_folder, cache_dir=tmp_path / "c", device=f"cuda:{torch.cuda.device_count()}", **TINY)


def test_cli_embed_and_probe_on_cuda(jpeg_folder, tmp_path):
    r = CliRunner()
    args = ["--backbone", "tiny_cnn", "--weights", "random", "--workers", "2", "--batch-size", "8", "--quiet"]
    out = r.invoke(cli, ["embed", str(jpeg_folder), "--cache-dir", str(tmp_path / "c"), "--device", "cuda", *args])
    assert out.exit_code == 0, out.output
    out = r.invoke(cli, ["probe", "--cache-dir", str(tmp_path / "c"), "--device", "cuda", "--head", "all",
                         "--out-dir", str(tmp_path / "p"), "--no-report", "--quiet"])
    assert out.exit_code == 0, out.output
    metrics = json.loads((tmp_path / "p" / "metrics.json").read_text())
    assert set(metrics["heads"]) == {"logreg", "svm", "knn"}
