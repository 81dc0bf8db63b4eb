#!/usr/bin/env python
"""``featx audit``'s neighbour searches at scale, on synthetic features written to a real cache.

    python benchmarks/audit_bench.py --n 1000000 --dim 256 --dir /tmp/audit_bench --pairs-rows 100000

Writes (once) a cache of ``--n`` rows (1,000 per class, 80 % train) whose features are class
centres plus noise, with 0.1 % of the rows planted as near copies of another row.  Then times,
reading the cache block by block (memory: two blocks of rows and one [block x block] similarity
matrix, whatever ``--n``):

* ``nearest_in_class`` (the outlier score: k nearest training rows of the same class) over all rows;
* ``similar_pairs`` (near duplicates, exact all-pairs) over the first ``--pairs-rows`` rows — it
  is quadratic in the rows, so the time at ``--n`` is extrapolated as (n / pairs_rows)^2 and
  printed as such, unless ``--pairs-rows`` equals ``--n``;
* with ``--approx``, the same through the faiss IVF index the audit uses from
  ``APPROX_ABOVE`` rows, and with ``--recall-rows 50000`` its recall against exact search
  (pairs above ``--threshold``).

    python benchmarks/audit_bench.py --n 1000000 --dim 256 --approx --pairs-rows 1000000 --recall-rows 50000

Prints a Markdown row with seconds and the peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import h5py
import numpy as np
from common import machine, peak_rss_mb

from featx.audit.finders import nearest_in_class, similar_pairs
from featx.cache.store import Chunk, FeatureCache, PartsDir, fingerprint_digest, write_final
from featx.data.folders import Sample

PER_CLASS = 1000


def write_cache(path: Path, n: int, dim: int, seed: int = 0, chunk: int = 65536) -> FeatureCache:
    if path.is_file():
        return FeatureCache(path)
    rng = np.random.default_rng(seed)
    n_cls = (n + PER_CLASS - 1) // PER_CLASS
    centres = rng.normal(size=(n_cls, dim)).astype(np.float32)
    fp = {"backbone": "synthetic", "n": n, "dim": dim, "seed": seed}
    parts = PartsDir(path, fp)
    parts.ensure()
    y = np.arange(n) // PER_CLASS
    split = np.where(np.arange(n) % PER_CLASS < 0.8 * PER_CLASS, "train", "test")
    order = np.argsort(split == "test", kind="stable")  # the cache stores each split contiguously
    samples = [Sample(path=f"/synthetic/{split[i]}/c{y[i]:05d}/{i:07d}.jpg", key=f"{split[i]}/c{y[i]:05d}/{i:07d}.jpg",
                      label=int(y[i]), split=str(split[i])) for i in order]
    for a in range(0, n, chunk):
        rows = order[a:a + chunk]
        X = centres[y[rows]] + rng.normal(size=(len(rows), dim)).astype(np.float32)
        copy = rng.random(len(rows)) < 0.001  # planted near copies of the previous row
        X[1:][copy[1:]] = X[:-1][copy[1:]] + 0.01 * rng.normal(size=(int(copy[1:].sum()), dim)).astype(np.float32)
        parts.write_chunk(Chunk([samples[i].key for i in range(a, a + len(rows))], X, np.zeros(len(rows), np.int64),
                                np.ones(len(rows), np.int64)))
    write_final(path, samples=samples, classes=[f"c{c:05d}" for c in range(n_cls)], index=parts.read_index(), dim=dim,
                dtype="float32", attrs={"fingerprint": fingerprint_digest(fp), "fingerprint_json": json.dumps(fp),
                                        "backbone": "synthetic", "root": "/synthetic", "preprocess": "none"})
    parts.remove()
    return FeatureCache(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/audit_bench"))
    ap.add_argument("--pairs-rows", type=int, default=100_000)
    ap.add_argument("--block", type=int, default=4096)
    ap.add_argument("--threshold", type=float, default=0.95)
    ap.add_argument("--approx", action="store_true", help="near duplicates by the faiss IVF index (the audit's choice "
                    "from featx.heads.stream.topk.APPROX_ABOVE rows)")
    ap.add_argument("--recall-rows", type=int, default=0, help="also measure the IVF index's recall against exact "
                    "search on this many rows (e.g. 50000)")
    a = ap.parse_args()
    a.dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    fc = write_cache(a.dir / f"synthetic-{a.n}x{a.dim}.h5", a.n, a.dim)
    write_s = time.perf_counter() - t0
    with h5py.File(fc.path, "r") as f:
        feats = f["features"]
        read = (lambda lo, hi: feats[lo:hi])  # noqa: E731
        m = min(a.pairs_rows, a.n)
        recall = None
        if a.recall_rows:  # the approximate index against exact search, pairs above the threshold
            r = min(a.recall_rows, a.n)
            t0 = time.perf_counter()
            ei, ej, _ = similar_pairs((read, r), threshold=a.threshold, block=a.block, backend="torch", approximate=False)
            exact_s = time.perf_counter() - t0
            t0, c0 = time.perf_counter(), time.process_time()
            ai, aj, _ = similar_pairs((read, r), threshold=a.threshold, block=a.block, approximate=True)
            approx_s, approx_cpu = time.perf_counter() - t0, time.process_time() - c0
            exact, approx = set(zip(ei.tolist(), ej.tolist())), set(zip(ai.tolist(), aj.tolist()))
            recall = len(exact & approx) / max(1, len(exact))
            print(f"recall of the IVF index at {r:,} rows: {recall:.4f} ({len(exact & approx)} of {len(exact)} exact "
                  f"pairs >= {a.threshold}; {len(approx - exact)} extra); exact {exact_s:.1f} s, IVF {approx_s:.1f} s "
                  f"({approx_cpu:.1f} CPU s)",
                  flush=True)
        t0, c0 = time.perf_counter(), time.process_time()
        i, _, _ = similar_pairs((read, m), threshold=a.threshold, block=a.block, backend="torch",
                                approximate=a.approx if a.approx else False)
        pairs_s, pairs_cpu = time.perf_counter() - t0, time.process_time() - c0
        print(f"near-duplicate pairs of {m:,} rows ({'IVF' if a.approx else 'exact'}): {len(i)} in {pairs_s:.1f} s "
              f"({pairs_cpu:.1f} CPU s), "
              f"peak RSS {peak_rss_mb():.0f} MB", flush=True)
    X = fc.features()  # the outlier score holds the features (as the audit does)
    y, tr = fc.labels(), np.flatnonzero(fc.split_array() == "train")
    t0 = time.perf_counter()
    nearest_in_class(X, y, tr, k=5, block=a.block)
    knn_s = time.perf_counter() - t0
    extrap = pairs_s * (a.n / m) ** 2
    print(f"machine: {machine()}")
    print("| rows | dim | cache write s | kNN in class (outliers), all rows s | near-duplicate pairs: rows searched "
          "| search | pairs found | s | s at all rows | IVF recall | peak RSS MB |")
    at_all = ('%.0f (extrapolated, quadratic)' % extrap if m < a.n and not a.approx else
              '%.0f (extrapolated, linear)' % (pairs_s * a.n / m) if m < a.n else '%.1f' % pairs_s)
    print(f"| {a.n:,} | {a.dim} | {write_s:.0f} | {knn_s:.1f} | {m:,} | {'IVF' if a.approx else 'exact'} | {len(i)} | "
          f"{pairs_s:.1f} | {at_all} | {'-' if recall is None else '%.4f' % recall} | {peak_rss_mb():.0f} |")

if __name__ == "__main__":
    main()
