"""Shared fixtures: small generated image folders and the optional real dataset."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from fake_cuda import fake_cuda  # noqa: F401 - a fixture for every test module
from PIL import Image

HYMENOPTERA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hymenoptera_data"


def write_image_folder(root: Path, *, splits=("train", "val"), classes=("cats", "dogs"), per_class=6,
                       size=(40, 30), seed=0, fmt="png") -> Path:
    """Class-dependent colour images in ``root/<split>/<class>/`` (or ``root/<class>/`` if splits=())."""
    rng = np.random.default_rng(seed)
    for split in splits or (None,):
        for ci, cls in enumerate(classes):
            d = root / split / cls if split else root / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                base = np.zeros((size[1], size[0], 3), np.float64)
                base[..., ci % 3] = 180
                arr = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(d / f"img_{i:03d}.{fmt}")
    return root


# The tiny test backbone (random tiny_cnn, no DataLoader workers, no progress output), defined once:
# library keywords, and the same as command-line options.  Tests add their batch size, device, ...
TINY_BACKBONE = dict(backbone="tiny_cnn", weights="random")
TINY_KW = dict(TINY_BACKBONE, num_workers=0, progress=False)
TINY_CLI = ["--backbone", "tiny_cnn", "--weights", "random", "--workers", "0"]


def tiny_embed(root: Path, cache_dir: Path, **overrides):
    """``featx.embed`` of ``root`` with the tiny backbone (batch 16) into ``cache_dir``."""
    import featx

    return featx.embed(root, cache_dir=cache_dir, **{**TINY_KW, "batch_size": 16, **overrides})


def make_tiny_cache(tmp: Path, *, per_class: int = 10, classes=("cats", "dogs", "owls"), **overrides):
    """A tiny cache of generated images (train and val splits of ``classes``) under ``tmp``."""
    root = write_image_folder(tmp / "data", classes=classes, per_class=per_class)
    return tiny_embed(root, tmp / "cache", **overrides)


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    """One tiny cache per test module: 3 classes x 10 images in train and in val, views final and stages."""
    return make_tiny_cache(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return write_image_folder(tmp_path / "data")


@pytest.fixture
def hymenoptera() -> Path:
    if not HYMENOPTERA.is_dir():
        pytest.skip("../shared/data/hymenoptera_data is not present")
    return HYMENOPTERA


@pytest.fixture(autouse=True)
def _openvino_cache(tmp_path_factory, monkeypatch):
    # Converted OpenVINO networks go to a per-session folder, never to the user's ~/.cache.
    if "FEATX_OPENVINO_CACHE" not in os.environ:
        monkeypatch.setenv("FEATX_OPENVINO_CACHE", str(tmp_path_factory.getbasetemp() / "openvino"))


@pytest.fixture(autouse=True)
def _quiet_threads(monkeypatch):
    # Keep the 2-core CI machine responsive when tests start subprocesses.
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "2"))


FAULTS = Path(__file__).resolve().parent / "faults"


def fault_env(**switches: str) -> dict[str, str]:
    """The environment of a featx subprocess with fault injection (``tests/faults/sitecustomize.py``):
    that folder first on PYTHONPATH, and the switches (``FEATX_TEST_CHUNK_DELAY="0.3"``...) set."""
    path = os.pathsep.join(filter(None, [str(FAULTS), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **switches}


def assert_same_cache(a: Path, b: Path) -> None:
    """Same keys in the same order, labels, splits, classes, failures, fingerprint; features within 1e-5."""
    from featx.cache.store import FeatureCache

    fa, fb = FeatureCache(a), FeatureCache(b)
    assert fa.keys() == fb.keys() and fa.classes == fb.classes and fa.failed == fb.failed
    assert (fa.labels() == fb.labels()).all() and (fa.split_array() == fb.split_array()).all()
    assert fa.fingerprint == fb.fingerprint
    np.testing.assert_allclose(fa.features(), fb.features(), atol=1e-5)


def kill_mid_run(cmd: list[str], env: dict, cache: Path, *, chunks: int = 2) -> Path:
    """Run ``cmd`` (a ``featx embed`` writing ``cache``) and SIGKILL it once ``chunks`` chunk files are
    committed; returns the cache's ``.parts`` folder."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    parts = Path(str(cache) + ".parts")
    deadline = time.time() + 120
    while time.time() < deadline and len(list(parts.glob("chunk-*.h5"))) < chunks:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return parts


@pytest.fixture
def fresh_openvino(tmp_path, monkeypatch):
    """A test's own OpenVINO disk cache, and empty per-process caches of converted/compiled networks."""
    from featx.embedding.runtimes import forward as runtimes

    monkeypatch.setenv("FEATX_OPENVINO_CACHE", str(tmp_path / "ov-cache"))
    for name in ("_CONVERTED", "_COMPILED", "_FAILED"):
        monkeypatch.setattr(runtimes, name, {})
