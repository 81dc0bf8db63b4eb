#!/usr/bin/env python
"""What the cache's integrity checks cost: writing checksums, reading with and without them, featx verify.

A synthetic cache (``--rows`` x ``--dim`` float32, train/val) is assembled by the real writer
(``write_final`` from one committed chunk file), then read whole three times with checksums and
three times with the ``checksums`` group removed (as a cache from before checksums), and checked
by ``verify_cache``.  Prints a table; best of three.

    python benchmarks/integrity_bench.py --rows 50000 --dim 1280
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from featx.cache.store import Chunk, FeatureCache, PartsDir, write_final  # noqa: E402
from featx.cache.trust.verify import verify_cache  # noqa: E402
from featx.data.folders import Sample  # noqa: E402


def best(fn, n: int = 3) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=50000)
    ap.add_argument("--dim", type=int, default=1280)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="featx-integrity-"))
    try:
        n, d = args.rows, args.dim
        rng = np.random.default_rng(0)
        keys = [f"train/c{i % 10}/img_{i:07d}.jpg" for i in range(n)]
        parts = PartsDir(work / "c.h5", {"bench": 1})
        parts.ensure()
        t = time.perf_counter()
        parts.write_chunk(Chunk(keys, rng.standard_normal((n, d), dtype=np.float32), np.zeros(n, np.int64),
                                np.zeros(n, np.int64)))
        chunk_s = time.perf_counter() - t
        index = parts.read_index()
        samples = [Sample(k, k, i % 10, "train" if i < int(0.8 * n) else "val") for i, k in enumerate(keys)]
        attrs = {"backbone": "bench", "fingerprint": "x", "fingerprint_json": "{}", "root": ""}
        t = time.perf_counter()
        write_final(work / "c.h5", samples=samples, classes=[f"c{i}" for i in range(10)], index=index, dim=d,
                    dtype="float32", attrs=attrs)
        final_s = time.perf_counter() - t
        fc = FeatureCache(work / "c.h5")
        with_s = best(lambda: fc.features())
        plain = work / "plain.h5"
        shutil.copy(fc.path, plain)
        with h5py.File(plain, "a") as f:
            del f["checksums"]
        fp = FeatureCache(plain)
        without_s = best(lambda: fp.features())
        verify_s = best(lambda: verify_cache(fc.path), 1)
        mb = n * d * 4 / 2**20
        print(f"machine: {platform.processor() or platform.machine()}, {platform.python_version()}; "
              f"{n:,} x {d} float32 = {mb:.0f} MiB")
        print(f"{'step':44s} {'seconds':>8s} {'MiB/s':>8s}")
        for name, s in (("commit one chunk (row checksums included)", chunk_s),
                        ("write_final (copy + row checksums)", final_s),
                        ("read all features, checksums verified", with_s),
                        ("read all features, no checksums (old cache)", without_s),
                        ("featx verify (checksums + NaN scan)", verify_s)):
            print(f"{name:44s} {s:8.2f} {mb / s:8.0f}")
        print(f"verification overhead on a full read: {100 * (with_s - without_s) / without_s:+.0f}%")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
