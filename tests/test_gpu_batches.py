"""The GPU engine's batches: one byte buffer plus offsets, so loader workers stay under ``ulimit -n``."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from featx.embedding.engines.gpu_batches import Item, pack_items, pixel_groups, unpack


def test_pack_then_unpack_gives_the_items_back():
    items = [
        Item(0, "jpeg", torch.tensor([1, 2, 3], dtype=torch.uint8), "", 5, 3, 6, "a.jpg", 12),
        Item(1, "tensor", torch.ones(3, 2, 2), "", 6, 9, 1, "b.png"),
        Item(2, "fail", None, "cannot decode", 7, 0, 1, "c.jpg"),
        Item(3, "jpeg", torch.tensor([9, 8], dtype=torch.uint8), "", 8, 2, 1, "d.jpg", 4),
    ]
    packed = pack_items(items)
    assert packed.data.numel() == 5 and packed.images.shape == (1, 3, 2, 2)  # two tensors for four files
    back = unpack(packed)
    for a, b in zip(items, back):
        assert (a.index, a.kind, a.error, a.mtime_ns, a.size, a.orientation, a.path, a.pixels) == (
            b.index, b.kind, b.error, b.mtime_ns, b.size, b.orientation, b.path, b.pixels)
        assert (a.payload is None and b.payload is None) or torch.equal(a.payload, b.payload)


def test_pixel_groups_respect_the_budget():
    assert pixel_groups([4, 4, 4, 10, 1], 8) == [[0, 1], [2], [3], [4]]
    assert pixel_groups([], 8) == []


_SCRIPT = """
import resource, sys
from pathlib import Path
resource.setrlimit(resource.RLIMIT_NOFILE, ({limit}, {limit}))
from featx.data import Sample
from featx.embedding.backbones import create_backbone
from featx.embedding.engines.gpu import iter_gpu_features
paths = sorted(Path(sys.argv[1]).glob("*.jpg"))
todo = [Sample(str(p), p.name, 0, "train") for p in paths]
n = 0
for idx, errs, mts, szs, ok, feats in iter_gpu_features(todo, create_backbone("tiny_cnn"), device="cpu",
                                                        batch_size={batch}, num_workers=2):
    assert not any(errs), errs
    n += len(ok)
print("embedded", n)
"""


@pytest.mark.slow
def test_loader_stays_under_a_low_descriptor_limit(tmp_path):
    """2 workers x prefetch 4 x batch 96 files sent one tensor each need ~800 descriptors; the
    packed batch needs a few per batch.  (The failing layout: "received 0 items of ancdata".)"""
    rng = np.random.default_rng(0)
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(960):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(d / f"{i:04d}.jpg", quality=80)
    script = textwrap.dedent(_SCRIPT.format(limit=256, batch=96))
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", script, str(d)], capture_output=True, text=True, timeout=300,
                       cwd=root, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0 and "embedded 960" in r.stdout, (r.stdout + r.stderr)[-2000:]
