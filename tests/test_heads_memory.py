"""Caches bigger than memory: a clear message naming what fits, or a stratified subset; never a crash."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

import featx
from featx.base.errors import FeatxError
from featx.cache.rows import read_rows
from featx.cache.store import FeatureCache
from featx.heads.tuning import memory

from conftest import make_tiny_cache

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory) -> FeatureCache:
    return make_tiny_cache(tmp_path_factory.mktemp("mem"), views="final")  # _big_cache copies a plain cache


def _big_cache(template: FeatureCache, path: Path, *, n_train: int, n_eval: int, dim: int) -> Path:
    """A cache of the template's format with ``n_train`` + ``n_eval`` synthetic rows (3 separable classes)."""
    rng = np.random.default_rng(0)
    n = n_train + n_eval
    y = np.concatenate([np.arange(n_train) % 3, np.arange(n_eval) % 3])
    with h5py.File(template.path, "r") as src, h5py.File(path, "w") as f:
        for k, v in src.attrs.items():
            f.attrs[k] = v
        f.copy(src["classes"], "classes")
        f.copy(src["failed"], "failed")
        feats = f.create_dataset("features", shape=(n, dim), dtype="float16", chunks=(1024, dim))
        centres = rng.normal(0, 1, (3, dim)).astype(np.float32)
        for a in range(0, n, 8192):
            b = min(n, a + 8192)
            feats[a:b] = centres[y[a:b]] + rng.normal(0, 2.0, (b - a, dim)).astype(np.float32)
        f.create_dataset("labels", data=y.astype(np.int64))
        split_names = json.loads(src.attrs["split_names"])
        codes = [split_names.index("train")] * n_train + [split_names.index("val")] * n_eval
        f.create_dataset("split", data=np.asarray(codes, dtype=np.uint8))
        f.create_dataset("paths", data=np.asarray([f"r{i}.jpg".encode() for i in range(n)]))
        f.create_dataset("mtime_ns", data=np.zeros(n, np.int64))
        f.create_dataset("size", data=np.zeros(n, np.int64))
        f.attrs["rows"] = n
        f.attrs["feature_dim"] = dim
    return path


SCRIPT = textwrap.dedent("""
    import json, resource, sys
    import featx.runs.probe as probing
    from featx.heads.tuning.memory import address_space_bytes
    # Cap the address space at what is mapped now plus a budget: the cache's features do not fit.
    budget = int(sys.argv[2]) << 20
    resource.setrlimit(resource.RLIMIT_AS, (address_space_bytes() + budget, resource.RLIM_INFINITY))
    rows = None if sys.argv[3] == "none" else int(sys.argv[3])
    try:
        res = probing.probe(sys.argv[1], head="logreg", folds=2, device="cpu", n_jobs=1, plots=False, save=False,
                            out_dir=sys.argv[4], grids={"logreg": {"C": [0.1]}}, max_train_rows=rows,
                            solver="memory")  # solver auto streams instead (tests/test_heads_streaming.py)
    except probing.FeatxError as exc:
        print(json.dumps({"error": str(exc)}))
    else:
        print(json.dumps({"accuracy": res["heads"]["logreg"]["accuracy"], "subset": res["train_subset"]}))
""")


def _run_limited(cache: Path, budget_mb: int, max_rows, out: Path) -> dict:
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(cache), str(budget_mb), str(max_rows), str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "MemoryError" not in done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_probe_under_a_memory_limit_names_the_need_then_fits_a_subset(tiny_cache, tmp_path):
    # 120,000 x 768 float32 training features = 352 MiB, more than the 300 MiB allowed.
    n_train, dim, budget_mb = 120_000, 768, 300
    assert n_train * dim * 4 > budget_mb << 20
    cache = _big_cache(tiny_cache, tmp_path / "big.h5", n_train=n_train, n_eval=300, dim=dim)
    refused = _run_limited(cache, budget_mb, "none", tmp_path / "o1")
    msg = refused["error"]
    assert "needs about" in msg and "120,000 training rows" in msg and "--max-train-rows" in msg
    suggested = int(msg.split("--max-train-rows ")[1].split()[0])
    assert 1_000 < suggested < n_train
    ok = _run_limited(cache, budget_mb, suggested, tmp_path / "o2")
    assert ok["accuracy"] > 0.9
    assert ok["subset"]["n_available"] == n_train and ok["subset"]["n_used"] <= suggested


def test_stratified_subset_keeps_class_shares_and_is_seeded():
    y = np.array([0] * 900 + [1] * 90 + [2] * 10)
    rows = np.arange(1000) + 5
    a = memory.stratified_subset(rows, y, 100, seed=1)
    assert len(a) <= 100 and np.all(np.diff(a) > 0)
    counts = np.bincount(y[a - 5])
    assert counts.tolist() == [90, 9, 1]
    assert np.array_equal(a, memory.stratified_subset(rows, y, 100, seed=1))
    assert not np.array_equal(a, memory.stratified_subset(rows, y, 100, seed=2))
    with pytest.raises(FeatxError, match="at least 1"):
        memory.stratified_subset(rows, y, 0, seed=0)


def test_read_rows_in_blocks_equals_whole_split_reads(tiny_cache, monkeypatch):
    from featx.cache import rows as probing

    monkeypatch.setattr(probing, "READ_BLOCK_BYTES", 1)  # blocks of the minimum, 256 rows... and fewer rows here
    splits = tiny_cache.split_array()
    rows = np.flatnonzero(splits == "val")[::2]
    got = read_rows(tiny_cache, rows, splits)
    start = np.flatnonzero(splits == "val")[0]
    np.testing.assert_array_equal(got, tiny_cache.features("val")[rows - start])


@pytest.mark.slow
def test_probe_result_is_a_dataclass_with_the_metrics_json_keys(tiny_cache, tmp_path):
    import dataclasses

    res = featx.probe(tiny_cache, head="knn", out_dir=tmp_path, n_jobs=1, device="cpu", plots=False, save=False,
                      max_train_rows=15)
    assert dataclasses.is_dataclass(res)
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert list(on_disk) == list(res.to_dict()) == [
        "featx_version", "created", "cache", "backbone", "fingerprint", "split", "cv", "settings", "load_seconds",
        "heads", "seconds", "out_dir", "table", "metrics_path", "train_subset", "identity", "run_key",
    ]
    assert res["split"]["n_train"] == 15 and res.train_subset["n_available"] == 30
    assert np.bincount(tiny_cache.labels("train")).tolist() == [10, 10, 10]
