"""--shard I/N: a deterministic share of the pending chunks per run, shards side by side,
a plain embed afterwards only assembles, and a cache is never assembled while a shard still writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

import featx
from featx.base.errors import CacheLockedError, FeatxError
from featx.cache.store import FeatureCache, PartsLock, acquire_lock
from featx.embedding.engines.chunks import EngineSettings
from featx.embedding.ray_executor import parse_shard
from featx.embedding.runner import ShardResult, check_options, plan, read_done, shard_share

import conftest
from conftest import TINY_BACKBONE, assert_same_cache

TINY_KW = dict(conftest.TINY_KW, batch_size=2, device="cpu", chunk_size=4)
REPO = Path(__file__).resolve().parents[1]


def make_data(root: Path, per_class: int = 9) -> Path:
    rng = np.random.default_rng(3)
    for split, n in (("train", per_class), ("val", 2)):
        for c in ("a", "b", "c"):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(d / f"{i:03d}.png")
    (root / "train" / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("shard")
    root = make_data(base / "d")
    ref = base / "local.h5"
    featx.embed(root, cache=ref, **TINY_KW)
    return root, ref


def _shard_cmd(root: Path, cache: Path, shard: str) -> list[str]:
    code = (
        "import json, sys, featx; "
        f"r = featx.embed({str(root)!r}, cache={str(cache)!r}, shard={shard!r}, **{TINY_KW!r}); "
        "print(json.dumps(r.to_dict()))"
    )
    return [sys.executable, "-c", code]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


@pytest.mark.parametrize("text,want", [("0/1", (0, 1)), ("3/4", (3, 4)), ((1, 2), (1, 2)), (None, None)])
def test_parse_shard(text, want) -> None:
    assert parse_shard(text) == want


@pytest.mark.parametrize("bad", ["2/2", "-1/2", "1", "a/b", "0/0", "1/2/3"])
def test_bad_shard_is_a_clear_error(bad) -> None:
    with pytest.raises(FeatxError, match=r"--shard .*expected I/N with 0 <= I < N"):
        parse_shard(bad)


@pytest.mark.slow
def test_shares_cover_the_pending_images_once_and_do_not_move(data, tmp_path: Path) -> None:
    root, _ = data
    s = check_options(**TINY_BACKBONE, device="cpu", engine="auto", batch_size=2, num_workers=0, dtype="float32",
                      chunk_size=4)
    assert isinstance(s, EngineSettings)
    p = read_done(plan(root, manifest=None, settings=s, cache=tmp_path / "c.h5", cache_dir=None, limit=None))
    shares = [shard_share(p, (i, 3), 4) for i in range(3)]
    keys = [x.key for sh in shares for x in sh]
    assert sorted(keys) == sorted(x.key for x in p.todo) and len(set(keys)) == len(keys)
    assert [len(sh) for sh in shares] == [12, 12, 10]  # 34 images in blocks of 3 (4 blocks per shard at least)
    big = shard_share(p, (0, 1), 1024)
    assert big == p.todo
    # Shard 0 finishes first; shard 1 plans afterwards and still gets exactly its own share.
    r0 = featx.embed(root, cache=tmp_path / "c.h5", shard="0/3", **TINY_KW)
    assert isinstance(r0, ShardResult) and r0.assigned == len(shares[0]) and r0.pending == len(p.todo)
    p2 = read_done(plan(root, manifest=None, settings=s, cache=tmp_path / "c.h5", cache_dir=None, limit=None))
    assert [x.key for x in shard_share(p2, (1, 3), 4)] == [x.key for x in shares[1]]
    assert shard_share(p2, (0, 3), 4) == []


@pytest.mark.slow
def test_two_concurrent_shards_then_a_plain_embed_only_assembles(data, tmp_path: Path) -> None:
    root, ref = data
    cache = tmp_path / "s.h5"
    procs = [subprocess.Popen(_shard_cmd(root, cache, f"{i}/2"), env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        results.append(json.loads(out.splitlines()[-1]))
    assert not cache.exists(), "a shard never writes the finished cache"
    assert sum(r["assigned"] for r in results) == len(FeatureCache(ref)) + len(FeatureCache(ref).failed)
    assert all(r["assigned"] > 0 and r["run"]["embedded"] + r["run"]["failed_new"] == r["assigned"] for r in results)
    # Rerunning a shard is harmless: its share is done.
    again = featx.embed(root, cache=cache, shard="1/2", **TINY_KW)
    assert again.assigned == 0 and again.stats.embedded == 0
    fc = featx.embed(root, cache=cache, **TINY_KW)
    # Every row is reused; rows that failed before are not counted as reused (issue 32), and none is new.
    assert fc.stats.embedded == 0 and fc.stats.failed_new == 0 and fc.stats.reused + len(fc.failed) == fc.stats.total
    assert len(fc.failed) == len(FeatureCache(ref).failed) > 0
    assert fc.stats.rebuilt
    assert float(fc.meta["embed_seconds"]) > 0, "the shards' embedding time is counted"
    assert_same_cache(cache, ref)
    assert not Path(str(cache) + ".parts").exists()


def test_shard_does_not_need_the_writer_lock(data, tmp_path: Path) -> None:
    root, _ = data
    cache = tmp_path / "w.h5"
    held = acquire_lock(cache, wait=False)  # e.g. a stopped plain run's lock file is busy
    try:
        r = featx.embed(root, cache=cache, shard="0/2", wait=False, **TINY_KW)
        assert r.assigned > 0
    finally:
        held.release()


@pytest.mark.slow
def test_finalising_run_refuses_or_waits_while_a_shard_writes(data, tmp_path: Path) -> None:
    root, ref = data
    cache = tmp_path / "f.h5"
    featx.embed(root, cache=cache, shard="0/2", **TINY_KW)
    shard = PartsLock(cache).acquire(shared=True)  # a shard that is still running
    try:
        with pytest.raises(CacheLockedError, match=r"--shard run\(s\) are still adding chunks.*after every --shard"):
            featx.embed(root, cache=cache, wait=False, **TINY_KW)
        assert not cache.exists()
        err = tmp_path / "waiter.err"
        code = (f"import featx, logging; logging.basicConfig(); "
                f"featx.embed({str(root)!r}, cache={str(cache)!r}, **{TINY_KW!r})")
        with open(err, "w") as fh:
            waiter = subprocess.Popen([sys.executable, "-c", code], env=_env(), stderr=fh)
        deadline = time.time() + 120
        while "still adding chunks" not in err.read_text() and waiter.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert waiter.poll() is None, err.read_text()
        assert not cache.exists(), "nothing is assembled while the shard holds its lock"
        # The shard commits its last chunks, then ends.
        featx.embed(root, cache=cache, shard="1/2", **TINY_KW)
    finally:
        shard.release()
    assert waiter.wait(timeout=300) == 0, err.read_text()
    assert_same_cache(cache, ref)


def test_shard_waits_or_refuses_while_a_run_assembles(data, tmp_path: Path) -> None:
    root, _ = data
    cache = tmp_path / "a.h5"
    with PartsLock(cache).acquire(shared=False):  # a plain run embedding/assembling
        with pytest.raises(CacheLockedError, match="another featx run is embedding into or assembling"):
            featx.embed(root, cache=cache, shard="0/2", wait=False, **TINY_KW)


@pytest.mark.slow
def test_shard_option_conflicts(data, tmp_path: Path) -> None:
    root, _ = data
    with pytest.raises(FeatxError, match="--overwrite cannot be combined with --shard"):
        featx.embed(root, cache=tmp_path / "x.h5", shard="0/2", overwrite=True, **TINY_KW)
    with pytest.raises(FeatxError, match="--shard and --executor ray are alternatives"):
        featx.embed(root, cache=tmp_path / "x.h5", shard="0/2", executor="ray", **TINY_KW)
    with pytest.raises(FeatxError, match="--executor 'dask'"):
        featx.embed(root, cache=tmp_path / "x.h5", executor="dask", **TINY_KW)
    assert not list(tmp_path.iterdir())


def test_chunk_file_counts_match_the_share(data, tmp_path: Path) -> None:
    """Each shard commits chunks of at most --chunk-size images (one file per committed chunk)."""
    root, _ = data
    cache = tmp_path / "n.h5"
    r = featx.embed(root, cache=cache, shard="1/2", **TINY_KW)
    files = sorted(Path(r.parts).glob("chunk-*.h5"))
    sizes = []
    for cf in files:
        with h5py.File(cf, "r") as f:
            sizes.append(len(f["paths"]) + len(f["failed_paths"]))
    assert sum(sizes) == r.assigned and max(sizes) <= 4 and len(files) == -(-r.assigned // 4)
