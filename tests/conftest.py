"""Shared fixtures: small generated image folders and the optional real dataset."""

from __future__ import annotations

import json
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


# --------------------------------------------------------------------------- helpers of the command-line tests
# (moved from test_reliability.py; used by the per-module tests of embed, its inputs, its options and its cache files)

# Pinned to the CPU: runs are compared with atol 1e-5, which bf16 autocast on CUDA would not meet.
TINY_CPU = [*TINY_CLI, "--device", "cpu"]
TINY_CPU_KW = dict(TINY_KW, batch_size=4, device="cpu")


def rgb(seed: int, size: tuple[int, int] = (40, 30)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def small_dataset(root: Path, *, classes=("a", "b"), per_class: int = 12, val: int = 0, seed: int = 0) -> Path:
    for ci, c in enumerate(classes):
        for i in range(per_class):
            p = root / "train" / c / f"{i:03d}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            rgb(seed + 1000 * ci + i, (24, 20)).save(p)
        for i in range(val):
            p = root / "val" / c / f"{i:03d}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            rgb(seed + 5000 + 1000 * ci + i, (24, 20)).save(p)
    return root


def run_cli(*args, env: dict | None = None):
    """Invoke the CLI in-process; the root logger is restored afterwards (the CLI installs a handler)."""
    import logging

    from click.testing import CliRunner

    from featx.cli import cli

    root, flog = logging.getLogger(), logging.getLogger("featx")
    saved = (root.handlers[:], root.level, flog.level)
    try:
        return CliRunner().invoke(cli, [str(a) for a in args], env=env)
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        flog.setLevel(saved[2])


def assert_ok(res) -> None:
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "Traceback" not in res.output


def assert_clean_error(res, *needles: str) -> str:
    """Exit 2, no traceback, one ``error:`` line containing every needle; returns that line."""
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        import traceback

        pytest.fail("uncaught exception:\n" + "".join(traceback.format_exception(res.exception)))
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, res.output
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    return lines[0]


def no_leftovers(cache: Path) -> None:
    assert cache.is_file()
    assert not Path(str(cache) + ".parts").exists()
    assert not list(cache.parent.glob("*.tmp")), list(cache.parent.glob("*.tmp"))


def embed_cmd(data: Path, cache: Path, *extra: str, chunk: int = 4, batch: int = 2) -> list[str]:
    """``featx embed`` of ``data`` into ``cache`` as a subprocess command (tiny backbone, CPU, quiet)."""
    import sys

    return [sys.executable, "-m", "featx.cli", "embed", str(data), "--cache", str(cache), *TINY_CPU,
            "--batch-size", str(batch), "--chunk-size", str(chunk), "--quiet", *extra]


def parts_chunks(cache: Path) -> list[Path]:
    return sorted(Path(str(cache) + ".parts").glob("chunk-*.h5"))


def wait_for(cond, timeout: float = 120, what: str = "condition") -> None:
    deadline = time.time() + timeout
    while not cond():
        if time.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def clean_reference(data: Path, tmp_path: Path, name: str = "clean.h5") -> Path:
    import featx

    out = tmp_path / name
    featx.embed(data, cache=out, **TINY_CPU_KW)
    return out


def parts_only(data: Path, cache: Path, monkeypatch) -> None:
    """Leave ``cache`` as a run killed right before its final write: all chunks, no final file."""
    import featx
    import featx.cache.parts as fcache  # chunk files and the finished cache both commit through it

    real = fcache.atomic_commit

    def fail_final(tmp, final):
        if Path(final) == cache:
            raise KeyboardInterrupt  # stands in for the kill
        return real(tmp, final)

    monkeypatch.setattr(fcache, "atomic_commit", fail_final)
    with pytest.raises(KeyboardInterrupt):
        featx.embed(data, cache=cache, chunk_size=4, **TINY_CPU_KW)
    monkeypatch.setattr(fcache, "atomic_commit", real)
    assert not cache.exists() and parts_chunks(cache)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """A 6-image dataset (2 classes x 3, train only) for the tests of bad options and failed writes."""
    return small_dataset(tmp_path_factory.mktemp("opts") / "d", per_class=3)


@pytest.fixture(scope="module")
def kill_data(tmp_path_factory) -> tuple[Path, Path]:
    """A 28-image dataset with two bad files and its uninterrupted reference cache."""
    base = tmp_path_factory.mktemp("kill")
    data = small_dataset(base / "d", per_class=10, val=2)
    (data / "train" / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    (data / "train" / "b" / "empty.png").write_bytes(b"")
    return data, clean_reference(data, base)


def refuse_reading(monkeypatch, path: Path) -> None:
    """Make Pillow refuse ``path`` as a permission error (root would read a chmod-000 file)."""
    real_open = Image.open

    def guarded(fp, *a, **k):
        name = getattr(fp, "name", fp)  # featx opens the file itself and hands Pillow the file object
        if isinstance(name, (str, bytes, os.PathLike)) and os.fsdecode(name) == str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(fp, *a, **k)

    monkeypatch.setattr(Image, "open", guarded)


# --------------------------------------------------------------------------- saved heads and hostile files


class RunsCode:
    """Unpickling this calls ``exec``: it writes ``marker`` (stands for any command)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('code ran')",)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny cache and the three heads probe saves for it (skops, the default)."""
    import featx

    tmp = tmp_path_factory.mktemp("security")
    root = write_image_folder(tmp / "data", classes=("cats", "dogs", "owls"), per_class=8)
    fc = tiny_embed(root, tmp / "cache")
    res = featx.probe(fc, head="all", out_dir=tmp / "run", n_jobs=1, device="cpu", folds=3, plots=False)
    return fc, res


def forge_head(head: Path, tmp_path: Path, data: bytes | None = None, **fields) -> Path:
    """A copy of ``head`` (or ``data``) with a sidecar that matches it byte for byte, ``fields`` changed."""
    import hashlib

    from featx.heads.saved.persist import sidecar_path

    out = tmp_path / "h.skops"
    out.write_bytes(data if data is not None else head.read_bytes())
    meta = json.loads(sidecar_path(head).read_text())
    meta.update(fields, model_file=out.name, sha256=hashlib.sha256(out.read_bytes()).hexdigest())
    sidecar_path(out).write_text(json.dumps(meta))
    return out
