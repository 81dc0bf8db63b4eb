"""Embedding throughput by where the images live: a local folder vs a local S3 server vs WebDataset shards
vs a Parquet table (issue 21), with the features of each compared to the folder's (max |delta|).

Starts moto's S3 server (``python -m moto.server``, featx[storage-test]) as its own process on 127.0.0.1,
uploads each data set, writes WebDataset shards (one series per split, ~``--shard-size`` images each) and a
Parquet table (Hugging Face ``{bytes, path}`` image structs) of it, and times ``featx.embed`` on each input
with the default backbone, every run to a fresh cache.  ``images/s`` is the embedding phase (reads, decode,
network; what a chunk costs), ``total s`` the whole call (listing or shard scan, network set-up, final
cache).  ``--concurrency 1,4,16`` also times the S3 folder at those ``--read-concurrency`` values.
``--repeat K`` interleaves K rounds and reports each input's median: use it on a shared machine.

    python benchmarks/storage_bench.py --dataset ../shared/data/flowers12 --dataset ../shared/data/rsscn7
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import machine, print_table, save_json

import featx
from featx.data.folders import discover


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server() -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1")
    return proc, endpoint


def write_inputs(folder: Path, out: Path, shard_size: int) -> tuple[str, Path]:
    """WebDataset shards (the same number per split) and a Parquet table of ``folder`` under ``out``."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_sources import write_parquet, write_shards  # the tests' writers: one definition of the layouts

    pattern = write_shards(folder, out / "shards", shards=max(1, -(-len(discover(folder)) // shard_size)))
    table = write_parquet(folder, out / "table.parquet", row_group_size=256)
    return pattern, table


def upload(folder: Path, url: str) -> None:
    import s3fs

    fs = s3fs.S3FileSystem()
    bucket = url.split("://", 1)[1].split("/", 1)[0]
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    fs.put(str(folder) + "/", url.split("://", 1)[1], recursive=True)


def run(name: str, data: str, ref, cache_dir: Path, **kw) -> dict:
    cache = cache_dir / f"{name}-{time.monotonic_ns()}.h5"
    t0 = time.perf_counter()
    fc = featx.embed(data, cache=cache, progress=False, **kw)
    total = time.perf_counter() - t0
    row = {"input": name, "images": len(fc) + len(fc.failed), "images/s": fc.stats.images_per_s, "total s": total,
           "load": os.getloadavg()[0]}
    if ref is not None:
        order = [ref.keys().index(k) for k in fc.keys()]
        row["max |delta|"] = float(np.abs(fc.features() - ref.features()[order]).max())
    return row


def bench_dataset(folder: Path, work: Path, args) -> list[dict]:
    n = len(discover(folder))
    pattern, table = write_inputs(folder, work / folder.name, args.shard_size)
    bucket = f"s3://bench-{folder.name.lower().replace('_', '-')}"
    upload(folder, f"{bucket}/folder")
    upload(work / folder.name / "shards", f"{bucket}/shards")
    inputs = {"disk folder": str(folder), "S3 folder": f"{bucket}/folder", "WebDataset (disk)": pattern,
              f"WebDataset ({bucket}/shards)": f"{bucket}/shards/{Path(pattern).name}", "Parquet (disk)": str(table)}
    ref = featx.embed(folder, cache=work / f"ref-{folder.name}.h5", progress=False)  # also warms the runtime
    rounds: dict[str, list[dict]] = {}
    for _ in range(args.repeat):
        for name, data in inputs.items():
            kw = {"split_column": "split"} if name.startswith("Parquet") else {}
            rounds.setdefault(name, []).append(run(name, data, ref, work, **kw))
        for c in args.concurrency:
            name = f"S3 folder, --read-concurrency {c}"
            rounds.setdefault(name, []).append(run(name, inputs["S3 folder"], ref, work, read_concurrency=c))
    rows = []
    for name, runs in rounds.items():
        med = dict(runs[0])
        for k in ("images/s", "total s"):
            med[k] = statistics.median(r[k] for r in runs)
        med["runs (images/s)"] = ", ".join(f"{r['images/s']:.1f}" for r in runs)
        med["dataset"] = f"{folder.name} ({n})"
        rows.append(med)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", action="append", required=True, help="a split/class/image folder (repeatable)")
    ap.add_argument("--shard-size", type=int, default=256, help="about this many images per WebDataset shard")
    ap.add_argument("--concurrency", default="", help="also time the S3 folder at these --read-concurrency values")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c]
    proc, endpoint = start_server()
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for d in args.dataset:
                rows += bench_dataset(Path(d).resolve(), Path(tmp), args)
    finally:
        proc.terminate()
        proc.wait()
    print(f"machine: {machine()}; S3: moto server at {endpoint} (its own process)")
    print_table(rows, ["dataset", "input", "images/s", "total s", "max |delta|", "runs (images/s)", "load"])
    save_json(args.json, {"machine": machine(), "rows": rows})


if __name__ == "__main__":
    main()
