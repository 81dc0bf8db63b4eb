"""Device choice on the GPU path, checked without a GPU: ordinals, Ray actors, pinned batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from featx.base.errors import FeatxError
from featx.base.runtime import resolve_device
from featx.embedding.backbones import create_backbone
from featx.embedding.engines import chunks as engine
from featx.embedding.engines.chunks import EngineSettings, cache_fingerprint
from featx.embedding.ray_executor import ChunkEmbedder
from featx.embedding.runner import check_options

from conftest import TINY_BACKBONE

OPTS = dict(TINY_BACKBONE, engine="auto", batch_size=4, num_workers=0, dtype="float32", chunk_size=8)


def test_cuda_ordinal_is_checked_against_the_gpus_present(fake_cuda):
    fake_cuda.count = 1
    assert resolve_device("cuda") == "cuda" and resolve_device("cuda:0") == "cuda:0"
    with pytest.raises(FeatxError, match=r"--device cuda:7: this process sees 1 CUDA device\(s\) \(cuda:0\)"):
        resolve_device("cuda:7")
    with pytest.raises(FeatxError, match="expected auto, cpu, cuda, cuda:N or mps"):
        resolve_device("cuda:x")


def test_ray_actor_maps_cuda_n_to_its_own_gpu(fake_cuda, tmp_path):
    """Ray shows each GPU actor one GPU (cuda:0): the driver's cuda:3 must not fail there."""
    fake_cuda.count = 1
    s = EngineSettings("tiny_cnn", "random", "cuda:3", "gpu", 4, 0, "float32", 8, device_request="cuda:3",
                       engine_request="auto", views="final")
    bb = create_backbone("tiny_cnn", weights="random", views="final")
    fp = cache_fingerprint(bb, "float32", device="cuda", engine="gpu")
    actor = ChunkEmbedder(s.to_dict(), str(tmp_path / "c.h5"), fp, threads=1, workers=0)
    assert actor.device == "cuda" and actor.engine == "gpu"


def test_ray_driver_without_gpu_accepts_device_cuda(monkeypatch):
    """Each Ray node resolves --device cuda itself; a GPU-less head node must not refuse it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    s = check_options(device="cuda", executor="ray", **OPTS)
    assert s.device == "cuda" and s.engine == "gpu" and s.device_request == "cuda"
    with pytest.raises(FeatxError, match="CUDA is not available"):
        check_options(device="cuda", **OPTS)


def test_a_pinned_batch_goes_to_the_network_without_a_pageable_copy(fake_cuda, monkeypatch):
    """``x[ok]`` on a pinned batch makes a pageable copy, whose non-blocking copy then blocks."""
    x = torch.randn(3, 3, 8, 8)
    seen = []

    def fake_forward(backbone, device, *, runtime):
        return lambda t: seen.append(t) or np.zeros((len(t), 4), np.float32)

    def batches(todo, backbone, **_):
        yield [0, 1, 2], x, ["", "", ""], [0, 0, 0], [1, 1, 1]

    monkeypatch.setattr(engine, "forward_fn", fake_forward)
    monkeypatch.setattr(engine, "iter_cpu_batches", batches)
    list(engine.feature_batches([None] * 3, None, device="cuda:0", batch_size=3, num_workers=0, engine="cpu"))
    assert seen[0] is x  # all rows good: the pinned batch itself, not a copy


def test_some_failed_rows_are_dropped_on_the_device(monkeypatch):
    from featx.base.cuda import rows_to_device

    class Pinned:
        """A pinned host batch: records how it was moved."""

        def __init__(self, t):
            self.t, self.moves = t, []

        def __len__(self):
            return len(self.t)

        def is_pinned(self):
            return True

        def to(self, device, non_blocking=False):
            self.moves.append((device, non_blocking))
            return self.t  # stands for the device copy

        def __getitem__(self, rows):
            raise AssertionError("indexed on the host: a pageable copy")

    x = Pinned(torch.arange(12.0).view(4, 3))
    got = rows_to_device(x, [0, 2, 3], "cuda:0")
    assert x.moves == [("cuda:0", True)]
    assert torch.equal(got, x.t[[0, 2, 3]])


def test_cpu_engine_loader_starts_on_the_chosen_gpu(fake_cuda, monkeypatch):
    """The DataLoader's pinning thread pins on the creating thread's device: cuda:1, not cuda:0."""
    seen = []

    def batches(todo, backbone, **_):
        seen.append(fake_cuda._device())
        yield [0], torch.zeros(1, 3, 4, 4), [""], [0], [1]

    monkeypatch.setattr(engine, "forward_fn", lambda *a, **k: lambda t: np.zeros((len(t), 4), np.float32))
    monkeypatch.setattr(engine, "iter_cpu_batches", batches)
    list(engine.feature_batches([None], None, device="cuda:1", batch_size=1, num_workers=0, engine="cpu"))
    assert seen == ["cuda:1"]
