"""Hostile and damaged inputs III (issue 31, items 4, 5, 6 and their tracebacks): a shared-heap bomb in a
dataset, FIFOs wherever featx opens a file, tar and Parquet sizes, unlabelled and odd labels, random HDF5
metadata corruption, SIGTERM during embed, huge brace patterns.  Every crafted file is built here, small
(sparse files and header tricks), and anything that could hang or grow runs in a subprocess with a timeout
and a memory limit."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

import featx
from featx.base.errors import FeatxError

from conftest import TINY_KW, make_tiny_cache, write_image_folder

REPO = Path(__file__).resolve().parents[1]
MEMORY_LIMIT = 1 << 30  # 1 GiB of address space beyond what the interpreter starts with is plenty for every case


def run_isolated(code: str, *, timeout: float = 90, memory: int | None = None, cwd: Path | None = None):
    """Run ``code`` in a fresh interpreter (a hang is a timeout, a bomb a MemoryError under ``memory`` bytes of
    address space); returns the CompletedProcess."""
    pre = None
    if memory is not None:
        def pre():
            import resource
            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    env = dict(os.environ, PYTHONPATH=str(REPO / "tests") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, preexec_fn=pre, env=env, cwd=cwd)


# --------------------------------------------------------------------------- 5. FIFOs outside data folders


def test_fifos_wherever_featx_opens_a_file_are_refused_never_opened(tmp_path):
    """A FIFO as a cache, a cache set, a config, the newest *.h5 of a cache folder, a streamed kNN head's cache,
    a saved head, a WebDataset shard, a Parquet table, a manifest: each is one line naming it, none blocks."""
    for name in ("p.h5", "p.multi.json", "p.yaml", "cache/newest.h5", "head.skops", "head.json", "s-000.tar",
                 "t.parquet", "list.csv"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        os.mkfifo(tmp_path / name)
    proc = run_isolated("""
        import numpy as np
        from click.testing import CliRunner
        from featx.base.errors import FeatxError
        from featx.cli import cli

        def case(name, call):
            try:
                call()
                print(name, "| no error")
            except FeatxError as exc:
                print(name, "|", str(exc).splitlines()[0])

        def info(*args):
            r = CliRunner().invoke(cli, ["info", *args])
            raise FeatxError(" ".join(r.output.split()) + f" (exit {r.exit_code})")

        from featx.cache.multi import open_cache
        from featx.config.loader import read_yaml
        from featx.heads.saved.persist import load_head
        from featx.heads.stream.knn import StreamingKNN
        import featx.data.sources as sources

        def knn():
            est = StreamingKNN()
            est.reference_ = {"cache": "p.h5", "fingerprint": "x", "identity": "x", "view": "final", "norm": "l2"}
            est.fit_y_ = np.zeros(3, np.int64)
            est.reference_source()

        opts = sources.SourceOptions(image_column="image", label_column="label", read_concurrency=1)
        case("info", lambda: info("p.h5"))
        case("set", lambda: open_cache("p.multi.json"))
        case("config", lambda: read_yaml("p.yaml"))
        case("newest", lambda: info("--cache-dir", "cache"))
        case("knn", knn)
        case("head", lambda: load_head("head.skops"))
        case("shard", lambda: sources.discover_any(["s-000.tar"], options=opts))
        case("table", lambda: sources.discover_any(["t.parquet"], options=opts))
        case("manifest", lambda: sources.discover_any(None, manifest="list.csv"))
    """, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(" | ", 1) for line in proc.stdout.splitlines() if " | " in line)
    assert set(lines) == {"info", "set", "config", "newest", "knn", "head", "shard", "table", "manifest"}, proc.stdout
    for name, text in lines.items():
        if name == "newest":  # the FIFO is left out of the choice: the folder holds no cache
            assert "no cache in" in text, text
            continue
        assert "FIFO" in text and "regular file" in text, (name, text)
    assert "Traceback" not in lines["info"] and "exit 0" not in lines["info"]


# --------------------------------------------------------------------------- SIGTERM to the process group


@pytest.mark.slow
def test_sigterm_to_the_process_group_during_embed_is_one_line_and_resumes(tmp_path):
    """What SLURM and `timeout` send: SIGTERM to featx and its DataLoader workers at once, at several moments;
    each stop is the one line saying how to resume, and the rerun finishes the cache."""
    from conftest import TINY_CLI, fault_env

    data = write_image_folder(tmp_path / "data", per_class=8)
    cache = tmp_path / "c.h5"
    parts = Path(str(cache) + ".parts")
    cmd = [sys.executable, "-m", "featx.cli", "embed", str(data), "--cache", str(cache), *TINY_CLI[:4],
           "--workers", "2", "--batch-size", "2", "--chunk-size", "4", "--quiet"]
    env = fault_env(FEATX_TEST_CHUNK_DELAY="0.3")
    for delay in (0.0, 0.2):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        n0, t0 = len(list(parts.glob("chunk-*.h5"))), time.time()
        while len(list(parts.glob("chunk-*.h5"))) <= n0 and proc.poll() is None and time.time() - t0 < 120:
            time.sleep(0.02)
        time.sleep(delay)
        assert proc.poll() is None, "the run ended before it could be stopped"
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 143 and err.strip().splitlines() == [
            "terminated (SIGTERM): finished work is saved; rerun the same command to resume where it stopped."], err
    done = subprocess.run(cmd[:-1] + ["--json"], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    run = json.loads(done.stdout)["run"]
    assert run["reused"] >= 2 * 2 and run["embedded"] + run["reused"] == run["total"] == 2 * 2 * 8


# --------------------------------------------------------------------------- 4. a shared-heap bomb in a dataset


def _shared_heap_bomb(src: Path, dst: Path, *, n: int, big: int) -> Path:
    """A copy of cache ``src`` whose ``failed/`` datasets hold ``n`` rows, every ``failed/reasons`` element pointing
    at one heap object of ``big`` bytes (its heap IDs rewritten in place): n * big bytes to read, a small file."""
    import shutil
    import struct

    shutil.copy(src, dst)
    with h5py.File(dst, "a") as f:
        del f["failed"]
        g = f.create_group("failed")
        g.create_dataset("paths", data=[np.frombuffer(f"x{i}".encode(), np.uint8) for i in range(n)],
                         dtype=h5py.vlen_dtype(np.uint8))
        g.create_dataset("reasons", data=["r" * big] + ["r"] * (n - 1), dtype=h5py.string_dtype("utf-8"))
        g.create_dataset("mtime_ns", data=np.zeros(n, np.int64))
        g.create_dataset("size", data=np.zeros(n, np.int64))
        offset, size = g["reasons"].id.get_offset(), g["reasons"].id.get_storage_size()
    with open(dst, "r+b") as fh:
        fh.seek(offset)
        raw = fh.read(size)
        assert struct.unpack("<I", raw[:4])[0] == big
        fh.seek(offset)
        fh.write(raw[:16] * n)  # every element: (length big, the first element's heap object)
    return dst


@pytest.mark.slow
def test_a_shared_heap_bomb_in_a_dataset_is_refused_before_it_is_read(tmp_path):
    made = make_tiny_cache(tmp_path / "m", per_class=3)
    bomb = _shared_heap_bomb(made.path, tmp_path / "bomb.h5", n=3000, big=1 << 20)  # 3 GB to read, a 1 MB file
    assert bomb.stat().st_size < 2 << 20
    with pytest.raises(FeatxError, match=r"'failed/reasons' holds 3145728000 bytes of variable-length values.*share "
                                         r"heap objects"):
        featx.FeatureCache(bomb)
    # info, verify and probe: one line each, in bounded memory
    proc = run_isolated(f"""
        from click.testing import CliRunner
        from featx.cli import cli
        for args in (["info"], ["verify"], ["probe", "--head", "logreg", "--out-dir", "run"]):
            r = CliRunner().invoke(cli, [*args, {str(bomb)!r}])
            print(args[0], r.exit_code, " ".join(r.output.split())[:300], type(r.exception).__name__)
    """, memory=3 << 30, cwd=tmp_path)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0 and len(lines) == 3, proc.stderr[-2000:]
    for line in lines:
        assert " 2 error: cache" in line and "share heap objects" in line and "SystemExit" in line, line
    # featx's own caches pass: their elements are stored once each
    featx.FeatureCache(made.path)
