"""What the feature views cost: embedding time and cache size per ``--views`` / ``--tta`` / ``--train-views``.

Each setting embeds the same folder from scratch (``--overwrite``, one subprocess each, runs
interleaved ``--repeat`` times, the median reported) into a temporary cache folder, after one
warm-up run per setting that converts its network for OpenVINO (so conversion, paid once per
machine, is not counted).  Prints a Markdown table: setting, images embedded, seconds,
images/s, seconds and cache bytes per dataset image relative to the plain ``--views final``.

    python benchmarks/views_bench.py ../shared/data/flowers12 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, machine, print_table

SETTINGS = {
    "plain (--views final)": ["--views", "final"],
    "default (final,stages)": [],
    "final,stages,gem": ["--views", "final,stages,gem"],
    "--tta flip": ["--tta", "flip"],
    "--train-views 8": ["--train-views", "8"],
}


def run(data: str, cache_dir: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "featx.cli", "embed", data, "--cache-dir", str(cache_dir), "--overwrite", "-q",
           "--json", *extra]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    wall = time.perf_counter() - t0
    doc = json.loads(out.stdout)
    return {"wall": wall, "embedded": doc["run"]["embedded"], "rows": doc["cache"]["rows"],
            "bytes": doc["cache"]["size_bytes"], "load": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--only", default="", help="comma list of setting names to run (default: all)")
    args = ap.parse_args()
    chosen = {k: v for k, v in SETTINGS.items() if not args.only or k in args.only.split(",")}
    results: dict[str, list[dict]] = {k: [] for k in chosen}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in chosen.items():  # warm-up: OpenVINO conversion of each network
            run(args.data, Path(tmp) / "warm", extra)
        for _ in range(args.repeat):
            for name, extra in chosen.items():
                results[name].append(run(args.data, Path(tmp) / "c", extra))
    base = statistics.median(r["wall"] for r in results.get("plain (--views final)", results[next(iter(results))]))
    base_bytes = results.get("plain (--views final)", results[next(iter(results))])[0]["bytes"]
    rows = []
    for name, rs in results.items():
        wall = statistics.median(r["wall"] for r in rs)
        rows.append({"setting": name, "images embedded": rs[0]["embedded"], "wall s (median)": wall,
                     "images/s": rs[0]["embedded"] / wall, "time vs plain": wall / base,
                     "cache bytes/image": rs[0]["bytes"] / rs[0]["rows"], "size vs plain": rs[0]["bytes"] / base_bytes,
                     "runs": " ".join(f"{r['wall']:.1f}" for r in rs), "load at start": " ".join(f"{r['load']:.1f}" for r in rs)})
    print(f"machine: {machine()}")
    print_table(rows, list(rows[0]))


if __name__ == "__main__":
    main()
