"""The cache fingerprint names the engine and precision: GPU rows never join a CPU cache."""

from __future__ import annotations

import pytest

import featx
from featx import __version__
from featx.cache.store import fingerprint_digest
from featx.embedding.backbones import create_backbone
from featx.embedding.engines.chunks import DECODE_VERSION, EngineSettings, cache_fingerprint
from featx.embedding.runner import plan, read_done
from featx.errors import CacheMismatchError

from conftest import TINY_KW


def _settings(device: str, engine: str) -> EngineSettings:
    return EngineSettings("tiny_cnn", "random", device, engine, 4, 0, "float32", 8, device_request=device,
                          views="final")


def test_cpu_caches_keep_their_fingerprint():
    """Caches written before engine/precision were recorded keep their digest and file name."""
    bb = create_backbone("tiny_cnn", weights="random", views="final")
    old = {**bb.fingerprint(), "dtype": "float32", "featx_version": __version__, "decode": DECODE_VERSION}
    for fp in (cache_fingerprint(bb, "float32"), cache_fingerprint(bb, "float32", device="cpu", engine="cpu")):
        assert fp == old and fingerprint_digest(fp) == fingerprint_digest(old)


def test_gpu_rows_get_their_own_fingerprint_and_file(image_folder, tmp_path):
    cpu = plan(image_folder, manifest=None, settings=_settings("cpu", "cpu"), cache=None, cache_dir=tmp_path, limit=None)
    gpu = plan(image_folder, manifest=None, settings=_settings("cuda", "gpu"), cache=None, cache_dir=tmp_path,
               limit=None)
    torch_on_cuda = plan(image_folder, manifest=None, settings=_settings("cuda:1", "cpu"), cache=None,
                         cache_dir=tmp_path, limit=None)
    assert gpu.fingerprint["engine"] == "gpu" and gpu.fingerprint["autocast"] == "bf16-cuda"
    assert gpu.fingerprint["decode"].startswith("nvjpeg")
    assert torch_on_cuda.fingerprint["autocast"] == "bf16-cuda" and "engine" not in torch_on_cuda.fingerprint
    assert len({cpu.path, gpu.path, torch_on_cuda.path}) == 3  # three caches, never one mixed


def test_a_cpu_cache_refuses_gpu_rows(image_folder, tmp_path):
    target = tmp_path / "c.h5"
    featx.embed(image_folder, cache=target, **TINY_KW, device="cpu", views="final")
    p = plan(image_folder, manifest=None, settings=_settings("cuda", "gpu"), cache=target, cache_dir=tmp_path,
             limit=None)
    with pytest.raises(CacheMismatchError, match="engine|autocast|decode"):
        read_done(p)
