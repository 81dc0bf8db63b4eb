"""The work folder of a cache being built (cache/parts.py): damaged chunk files and metadata, and a full disk
while a chunk, the metadata or the final file is committed: one-line errors, finished chunks kept, and a
rerun gives the same cache.  CPU, ``tiny_cnn``, random weights."""

from __future__ import annotations

import errno
import json
import resource
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

import featx
import featx.base.io
from featx.cache.store import FeatureCache

from conftest import TINY_CPU as TINY
from conftest import TINY_CPU_KW as TINY_KW
from conftest import (
    assert_clean_error,
    assert_ok,
    assert_same_cache,
    embed_cmd,
    no_leftovers,
    parts_chunks,
    parts_only,
    rgb,
    run_cli,
)


@pytest.mark.slow
def test_damaged_chunk_file_is_set_aside_and_redone(kill_data, tmp_path: Path, monkeypatch) -> None:
    data, clean = kill_data
    cache = tmp_path / "p.h5"
    parts_only(data, cache, monkeypatch)
    chunks = parts_chunks(cache)
    chunks[1].write_bytes(b"garbage" * 10)
    res = run_cli("embed", data, "--cache", cache, *TINY, "--json")
    assert_ok(res)
    assert "unreadable" in res.output
    run = json.loads(res.output[res.output.index("{"):res.output.rindex("}") + 1])["run"]
    assert 0 < run["embedded"] + run["failed_new"] <= 8 and run["reused"] > 0
    assert_same_cache(cache, clean)
    no_leftovers(cache)


@pytest.mark.slow
def test_damaged_parts_metadata_is_a_clear_error(kill_data, tmp_path: Path, monkeypatch) -> None:
    data, clean = kill_data
    cache = tmp_path / "m.h5"
    parts_only(data, cache, monkeypatch)
    (Path(str(cache) + ".parts") / "meta.json").write_text("{not json")
    assert_clean_error(run_cli("embed", data, "--cache", cache, *TINY, "-q"), "--overwrite")
    assert_ok(run_cli("embed", data, "--cache", cache, *TINY, "-q", "--overwrite"))
    assert_same_cache(cache, clean)


def _enospc_on(monkeypatch, nth_chunk: int | None = None, final: Path | None = None) -> None:
    import featx.cache.parts as fcache  # chunk files and the finished cache both commit through it

    real = fcache.atomic_commit
    count = {"chunks": 0}

    def commit(tmp, dest):
        if Path(dest).name.startswith("chunk-"):
            count["chunks"] += 1
            if count["chunks"] == nth_chunk:
                raise OSError(errno.ENOSPC, "No space left on device")
        if final is not None and Path(dest) == final:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tmp, dest)

    monkeypatch.setattr(fcache, "atomic_commit", commit)
    monkeypatch.setattr(featx.base.io, "atomic_commit", commit)  # chunk files are written as bytes through base.io


@pytest.mark.slow
def test_disk_full_while_committing_a_chunk(kill_data, tmp_path: Path, monkeypatch) -> None:
    data, clean = kill_data
    cache = tmp_path / "full.h5"
    _enospc_on(monkeypatch, nth_chunk=3)
    res = run_cli("embed", data, "--cache", cache, *TINY, "--batch-size", "2", "--chunk-size", "4", "-q")
    assert_clean_error(res, "No space left on device", "rerun the same command")
    monkeypatch.undo()
    assert len(parts_chunks(cache)) == 2 and not cache.exists()  # finished chunks are kept
    assert not list(Path(str(cache) + ".parts").glob(".*.tmp"))
    res = run_cli("embed", data, "--cache", cache, *TINY, "-q", "--json")
    assert_ok(res)
    assert json.loads(res.output[res.output.index("{"):])["run"]["reused"] == 8
    assert_same_cache(cache, clean)
    no_leftovers(cache)


@pytest.mark.slow
def test_disk_full_while_writing_the_final_file(kill_data, tmp_path: Path, monkeypatch) -> None:
    data, clean = kill_data
    cache = tmp_path / "full.h5"
    featx.embed(data, cache=cache, **TINY_KW)
    before = FeatureCache(cache).keys()
    rgb(77, (24, 20)).save(data.parent / "extra.png")
    extra = data / "train" / "a" / "zz_extra.png"
    shutil.copy(data.parent / "extra.png", extra)
    try:
        _enospc_on(monkeypatch, final=cache)
        res = run_cli("embed", data, "--cache", cache, *TINY, "-q")
        assert_clean_error(res, "No space left on device", ".parts", "rerun")
        monkeypatch.undo()
        assert FeatureCache(cache).keys() == before  # the previous complete version is untouched
        assert parts_chunks(cache) and not list(tmp_path.glob("*.tmp"))
        assert_ok(run_cli("embed", data, "--cache", cache, *TINY, "-q"))
        assert "train/a/zz_extra.png" in FeatureCache(cache).keys()
        no_leftovers(cache)
    finally:
        extra.unlink()


def test_disk_full_before_the_first_chunk(tiny_data: Path, tmp_path: Path, monkeypatch) -> None:
    import featx.cache.parts as fcache  # chunk files and the finished cache both commit through it

    real = fcache.atomic_commit

    def commit(tmp, dest):
        if Path(dest).name == "meta.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tmp, dest)

    monkeypatch.setattr(fcache, "atomic_commit", commit)
    res = run_cli("embed", tiny_data, "--cache", tmp_path / "c.h5", *TINY, "-q")
    assert_clean_error(res, "No space left on device")


def _run_with_file_size_limit(cmd: list[str], limit: int) -> subprocess.CompletedProcess:
    def limit_writes() -> None:  # the file system "fills up" at `limit` bytes per file
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, preexec_fn=limit_writes)


@pytest.fixture(scope="module")
def real_full_disk(kill_data, tmp_path_factory):
    """A real write failure inside HDF5 (EFBIG from RLIMIT_FSIZE) while the final file is written."""
    data, clean = kill_data
    base = tmp_path_factory.mktemp("efbig")
    cache = base / "c.h5"
    limit = int(clean.stat().st_size * 0.7)  # chunk files are small, the final file is not
    res = _run_with_file_size_limit(embed_cmd(data, cache, chunk=4, batch=2), limit)
    res.leftover_tmp = list(base.glob("*.tmp"))
    return data, clean, cache, res


@pytest.mark.slow
def test_real_write_failure_keeps_every_chunk(real_full_disk) -> None:
    data, clean, cache, res = real_full_disk
    assert res.returncode != 0 and not cache.exists()
    assert len(parts_chunks(cache)) >= 5, "all chunks were committed before the final write failed"
    done = subprocess.run(embed_cmd(data, cache, "--json"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["run"]["embedded"] == 0  # nothing had to be embedded again
    assert_same_cache(cache, clean)
    no_leftovers(cache)


@pytest.mark.slow
def test_real_write_failure_is_a_clear_error(real_full_disk) -> None:
    data, clean, cache, res = real_full_disk
    assert "Traceback" not in res.stderr
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith("error: could not write")
    assert not res.leftover_tmp
