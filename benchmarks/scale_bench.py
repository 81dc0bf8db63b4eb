#!/usr/bin/env python
"""The serial parts of a scaled-out embed, timed at N generated paths (default 1,000,000).

However many GPUs or Ray actors embed the chunks, the driver alone discovers the files, reads
which chunks are done (and stats every file to notice changes), and assembles the finished
HDF5.  This script measures exactly those stages with ``featx.embedding.runner``'s own stage
functions on N empty files (1,000 per class folder) and pre-made chunk files of tiny features
(``tiny_cnn``: 32 float32 per image), as if every shard had already run; run it a second time
to time the rerun of a finished cache (discover, read its index, stat every file):

    python benchmarks/scale_bench.py --n 1000000 --dir /tmp/scale --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from featx.cache.store import Chunk, FeatureCache  # noqa: E402
from featx.embedding.runner import EmbedStats, check_options, finalise, is_up_to_date, plan, read_done  # noqa: E402


def make_files(root: Path, n: int, per_class: int = 1000) -> None:
    for c in range((n + per_class - 1) // per_class):
        d = root / "train" / f"c{c:05d}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(min(per_class, n - c * per_class)):
            os.close(os.open(d / f"{i:06d}.jpg", os.O_CREAT | os.O_WRONLY, 0o644))


def make_chunks(p, chunk_size: int, dim: int) -> None:
    rng = np.random.default_rng(0)
    p.parts.ensure()
    for a in range(0, len(p.samples), chunk_size):
        block = p.samples[a : a + chunk_size]
        st = [os.stat(s.path) for s in block]
        p.parts.write_chunk(Chunk([s.key for s in block], rng.standard_normal((len(block), dim), dtype=np.float32),
                                  np.array([x.st_mtime_ns for x in st]), np.array([x.st_size for x in st])))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dir", default="/tmp/featx-scale")
    ap.add_argument("--chunk-size", type=int, default=1024)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    base = Path(a.dir)
    root, cache = base / "data", base / "scale.h5"
    out: dict = {"n": a.n, "chunk_size": a.chunk_size, "load_before": os.getloadavg()}
    if not (root / "train").is_dir():
        t = time.perf_counter()
        make_files(root, a.n)
        out["make_files_s"] = time.perf_counter() - t
    s = check_options(backbone="tiny_cnn", weights="random", device="cpu", engine="auto", batch_size=64,
                      num_workers=0, dtype="float32", chunk_size=a.chunk_size)
    t = time.perf_counter()
    p = plan(root, manifest=None, settings=s, cache=cache, cache_dir=None, limit=None)
    out["discover_s"] = time.perf_counter() - t
    if cache.exists():  # second run: the finished cache is there, nothing to embed
        t = time.perf_counter()
        read_done(p)
        out["rerun_read_done_s"] = time.perf_counter() - t
        out["rerun_up_to_date"] = is_up_to_date(p)
        out["rows"] = len(FeatureCache(cache))
    else:
        if not p.parts.chunk_files():
            t = time.perf_counter()
            make_chunks(p, a.chunk_size, p.backbone.dim)
            out["make_chunks_s"] = time.perf_counter() - t
        t = time.perf_counter()
        p.parts.read_index()
        out["read_chunk_index_s"] = time.perf_counter() - t
        t = time.perf_counter()
        read_done(p)  # the chunk index again, plus one stat per file to notice changed images
        out["read_done_s"] = time.perf_counter() - t
        assert not p.todo, f"{len(p.todo)} images not in the chunks"
        t = time.perf_counter()
        fc = finalise(p, s, EmbedStats(total=len(p.samples)))
        out["finalise_s"] = time.perf_counter() - t
        out["rows"] = len(FeatureCache(fc.path))
        out["cache_mb"] = fc.path.stat().st_size / 1e6
    out["load_after"] = os.getloadavg()
    print(json.dumps(out, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
