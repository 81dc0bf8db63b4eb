"""`--strategy head`: the frozen trunk every step (before) vs features embedded once per epoch, same cache.

Runs ``featx.finetune.finetune(strategy="head")`` on one cache, interleaved in one process
(new, old, new, ...), and prints wall and CPU seconds (this process and its loader workers),
accuracy and the load average per run. "old" is the same code with the feature source switched
off (:func:`featx.finetune.features.plan_source` returning None), so only the path differs.

    python benchmarks/head_features_bench.py cache/flowers12-....h5 --epochs 2 --rounds 1
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, print_table, save_json  # noqa: E402


def cpu_seconds() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cache", help="a featx cache whose images are on disk")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1, help="(new, old) pairs, then one more new")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from featx.cache.store import FeatureCache
    from featx.finetune import train as ft

    fc, feature_source = FeatureCache(args.cache), ft.plan_source
    order = [("embedded once per epoch", feature_source), ("trunk every step", lambda fc, s: None)] * args.rounds
    order.append(order[0])
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for i, (name, plan) in enumerate(order):
            ft.plan_source = plan
            t, c = time.perf_counter(), cpu_seconds()
            r = ft.finetune(fc, strategy="head", epochs=args.epochs, progress=False, out_dir=Path(out) / str(i))
            rows.append({"run": name, "features": r.features, "wall s": time.perf_counter() - t,
                         "CPU s": cpu_seconds() - c, "accuracy": r.accuracy, "load": os.getloadavg()[0]})
            ft.plan_source = feature_source
    print(f"\n{machine()}; {fc.path.name}, {args.epochs} epochs\n")
    print_table(rows, ["run", "features", "wall s", "CPU s", "accuracy", "load"])
    save_json(args.json, {"machine": machine(), "cache": str(fc.path), "epochs": args.epochs, "rows": rows})


if __name__ == "__main__":
    main()
