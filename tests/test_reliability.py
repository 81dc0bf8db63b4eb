"""Reliability end to end: whole ``featx embed`` commands killed (SIGKILL, Ctrl-C, SIGTERM, a kill during or
right after the final write) and rerun, and concurrent writers and readers of one cache.  Every case ends in the
identical cache or a one-line ``error: ...`` that says what to fix, never a traceback, and finished work is never lost.

The cases of one module each live in that module's tests: bad input files (test_images.py), bad data sets
(test_folders.py, test_splits.py), bad options (test_early.py, test_runtime.py, test_writable.py, test_loader.py),
damaged caches (test_reader.py), damaged work folders and a full disk (test_parts.py).
Fast cases only; ``scripts/fault_inject.py`` runs the 20+ random SIGKILL trials and the
100,000-file discovery timing.  Everything runs on the CPU with ``tiny_cnn`` and random weights.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import h5py
import pytest

import featx
from featx.cache.store import FeatureCache

import conftest
from conftest import TINY_CPU as TINY
from conftest import TINY_CPU_KW as TINY_KW
from conftest import (
    assert_ok,
    assert_same_cache,
    clean_reference,
    embed_cmd,
    no_leftovers,
    parts_chunks,
    parts_only,
    rgb,
    run_cli,
    small_dataset,
    wait_for,
)


def committed_rows(cache: Path, *, failed: bool | None = None) -> int:
    """Images in the committed chunk files of ``cache``'s .parts folder: embedded and failed (None), or only
    the failed ones (True) or only the embedded ones (False)."""
    n = 0
    for cf in parts_chunks(cache):
        with h5py.File(cf, "r") as f:
            n += (len(f["paths"]) if failed is not True else 0) + (len(f["failed_paths"]) if failed is not False else 0)
    return n


@pytest.mark.parametrize("when", ["before-first-chunk", "twice"])  # more in scripts/fault_inject.py
@pytest.mark.slow
def test_sigkill_then_rerun_gives_the_identical_cache(kill_data, tmp_path: Path, when: str) -> None:
    data, clean = kill_data
    cache = tmp_path / "k.h5"
    env = conftest.fault_env(FEATX_TEST_CHUNK_DELAY="0.15")
    kills = 2 if when == "twice" else 1
    for k in range(kills):
        proc = subprocess.Popen(embed_cmd(data, cache), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        if when == "before-first-chunk":
            # Killed once the run has planned and opened its work folder, while it embeds.
            meta = Path(str(cache) + ".parts") / "meta.json"
            wait_for(lambda: meta.exists() or proc.poll() is not None, what="the work folder")  # noqa: B023 - called within the iteration
        else:
            n = len(parts_chunks(cache))
            wait_for(lambda: len(parts_chunks(cache)) > n or proc.poll() is not None, what="a committed chunk")  # noqa: B023 - called within the iteration
            time.sleep(0.05 + 0.1 * k)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert not cache.exists(), "killed before the final write: no finished cache"
        assert Path(str(cache) + ".lock").exists() and (Path(str(cache) + ".parts") / "meta.json").exists()
    committed, committed_ok = committed_rows(cache), committed_rows(cache, failed=False)
    assert committed < len(FeatureCache(clean)) + len(FeatureCache(clean).failed)
    done = subprocess.run(embed_cmd(data, cache, "--json"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    run = json.loads(done.stdout)["run"]
    # Exactly what was committed before the kill is kept: its images reused, its failures kept as failures (not
    # counted as reused since issue 32, nor tried again); everything else is embedded now.
    assert run["reused"] == committed_ok
    assert run["embedded"] + run["failed_new"] == run["total"] - committed
    assert_same_cache(cache, clean)
    no_leftovers(cache)


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_says_how_to_resume(kill_data, tmp_path: Path) -> None:
    data, clean = kill_data
    cache = tmp_path / "i.h5"
    env = conftest.fault_env(FEATX_TEST_CHUNK_DELAY="0.3")
    # Two DataLoader workers, and SIGINT to the whole process group, as a terminal's Ctrl-C does.
    proc = subprocess.Popen(embed_cmd(data, cache, "--workers", "2"), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # live even under nohup
    wait_for(lambda: len(parts_chunks(cache)) >= 1 or proc.poll() is not None, what="a committed chunk")
    assert proc.poll() is None, "run ended before it could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert "interrupted" in err and "rerun the same command to resume" in err
    assert not cache.exists() and parts_chunks(cache), "committed chunks are kept"
    n_parts = len(parts_chunks(cache))
    done = subprocess.run(embed_cmd(data, cache, "--json"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    run = json.loads(done.stdout)["run"]
    assert run["reused"] >= 2 * n_parts  # batch 2 per chunk at least: the interrupted work was reused
    assert_same_cache(cache, clean)
    no_leftovers(cache)


@pytest.mark.slow
def test_sigterm_stops_cleanly_and_says_how_to_resume(kill_data, tmp_path: Path) -> None:
    data, clean = kill_data
    cache = tmp_path / "t.h5"
    env = conftest.fault_env(FEATX_TEST_CHUNK_DELAY="0.3")
    proc = subprocess.Popen(embed_cmd(data, cache), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: len(parts_chunks(cache)) >= 1 or proc.poll() is not None, what="a committed chunk")
    assert proc.poll() is None, "run ended before it could be terminated"
    proc.terminate()  # SIGTERM, as `kill` and job schedulers send
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "Traceback" not in err and "terminated (SIGTERM)" in err and "rerun the same command to resume" in err
    assert not cache.exists() and parts_chunks(cache), "committed chunks are kept"
    done = subprocess.run(embed_cmd(data, cache), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert_same_cache(cache, clean)
    no_leftovers(cache)


@pytest.mark.slow
def test_kill_during_final_write_leaves_a_partial_tmp_that_is_ignored(kill_data, tmp_path: Path, monkeypatch) -> None:
    data, clean = kill_data
    cache = tmp_path / "f.h5"
    parts_only(data, cache, monkeypatch)
    Path(str(cache) + ".tmp").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)  # half-written final file
    assert_ok(run_cli("embed", data, "--cache", cache, *TINY, "-q"))
    assert_same_cache(cache, clean)
    no_leftovers(cache)


@pytest.mark.slow
def test_kill_between_final_rename_and_parts_removal(kill_data, tmp_path: Path, monkeypatch) -> None:
    data, clean = kill_data
    cache = tmp_path / "r.h5"
    parts_only(data, cache, monkeypatch)
    saved = tmp_path / "parts-copy"
    shutil.copytree(str(cache) + ".parts", saved)
    assert_ok(run_cli("embed", data, "--cache", cache, *TINY, "-q"))
    shutil.copytree(saved, str(cache) + ".parts")  # both the final file and the parts exist
    res = run_cli("embed", data, "--cache", cache, *TINY, "-q", "--json")
    assert_ok(res)
    assert json.loads(res.output[res.output.index("{"):])["run"]["embedded"] == 0
    assert_same_cache(cache, clean)
    no_leftovers(cache)


@pytest.mark.slow
def test_concurrent_writers_wait_or_fail_fast_and_readers_keep_reading(tmp_path: Path) -> None:
    data = small_dataset(tmp_path / "d", per_class=4)
    other = tmp_path / "other.h5"  # a complete cache of another dataset, read during the run
    featx.embed(small_dataset(tmp_path / "o", per_class=6, val=2, seed=7), cache=other, **TINY_KW)
    cache = tmp_path / "shared.h5"
    featx.embed(data, cache=cache, **TINY_KW)  # version 1: 8 images
    for c in ("a", "b"):
        for i in range(4, 10):
            rgb(300 + i + (50 if c == "b" else 0), (24, 20)).save(data / "train" / c / f"{i:03d}.png")
    env = conftest.fault_env(FEATX_TEST_CHUNK_DELAY="0.2")
    a = subprocess.Popen(embed_cmd(data, cache), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    waiter_err = tmp_path / "waiter.err"
    waiter = None
    try:
        wait_for(lambda: len(parts_chunks(cache)) >= 1 or a.poll() is not None, what="the first writer's chunk")
        assert a.poll() is None
        a.send_signal(signal.SIGSTOP)  # freeze the first writer mid-run, holding the lock
        fast = subprocess.run(embed_cmd(data, cache, "--no-wait"), capture_output=True, text=True, timeout=120)
        assert fast.returncode == 2, fast.stderr
        assert "Traceback" not in fast.stderr
        assert "another featx process is writing" in fast.stderr and "--no-wait" in fast.stderr
        with open(waiter_err, "w") as fh:
            waiter = subprocess.Popen(embed_cmd(data, cache, "--json"), stdout=subprocess.PIPE, stderr=fh, text=True)
        wait_for(lambda: "waiting" in waiter_err.read_text() or waiter.poll() is not None, what="the second writer")
        assert waiter.poll() is None, waiter_err.read_text()
        # Readers: another complete cache, and the previous complete version of the one being rebuilt.
        res = run_cli("info", other)
        assert_ok(res)
        assert "rows       16 " in res.output
        assert FeatureCache(other).features().shape == (16, 32)
        res = run_cli("probe", other, "--head", "knn", "--n-jobs", "1", "--out-dir", tmp_path / "probe-out")
        assert_ok(res)
        assert (tmp_path / "probe-out" / "metrics.json").is_file()
        res = run_cli("info", cache)
        assert_ok(res)
        assert "rows       8 " in res.output
    finally:
        a.send_signal(signal.SIGCONT)
    assert a.wait(timeout=300) == 0
    out, _ = waiter.communicate(timeout=300)
    assert waiter.returncode == 0, waiter_err.read_text()
    assert json.loads(out)["run"]["embedded"] == 0  # it found the work done by the first writer
    assert_same_cache(cache, clean_reference(data, tmp_path))
    no_leftovers(cache)
