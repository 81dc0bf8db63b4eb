#!/usr/bin/env python
"""Streamed vs in-memory linear heads on the shared data sets: the same features, the same rows.

Why: the streamed solver (``--solver stream``: curvature-scaled minibatch steps over rows read
block by block) must reach the in-memory solver's accuracy (``--solver memory``: L-BFGS along
the C path), not only on the synthetic scale cache (``heads_scale.py --compare``) but on real features, whose
class structure the Gaussian warm start does not already solve.  Each set is embedded once with
the default backbone (``--cache-dir``), then probed on the final features with both solvers:

    python benchmarks/stream_vs_memory.py --data ../shared/data --cache-dir /tmp/featx-svm
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import print_table, save_json  # common also puts the repo on sys.path

import featx

SETS = ("hymenoptera_data", "flowers12", "dtd10", "rsscn7", "neu_steel", "medmnist6")


def _probe(cache, head: str, solver: str, out: Path) -> tuple[float, float, object]:
    t0 = time.perf_counter()
    res = featx.probe(cache, head=head, solver=solver, view="final", train_views="off", norm="none", save=False,
                      plots=False, out_dir=out / f"{cache.path.stem}-{head}-{solver}", device="cpu")
    h = res.heads[head]
    return h["accuracy"], time.perf_counter() - t0, h["params"].get("C")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--cache-dir", default="/tmp/featx-stream-vs-memory")
    ap.add_argument("--sets", default=",".join(SETS))
    ap.add_argument("--heads", default="logreg,svm")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    rows = []
    for name in a.sets.split(","):
        path = Path(a.data) / name
        if not path.is_dir():
            print(f"skip {name}: no {path}")
            continue
        fc = featx.embed(path, cache_dir=Path(a.cache_dir), progress=False)
        for head in a.heads.split(","):
            row = {"set": name, "head": head, "rows": len(fc)}
            for solver in ("memory", "stream"):
                acc, sec, c = _probe(fc, head, solver, Path(a.cache_dir) / "runs")
                row.update({f"{solver} acc": acc, f"{solver} s": sec, f"{solver} C": c})
            row["stream - memory (pt)"] = 100 * (row["stream acc"] - row["memory acc"])
            rows.append(row)
            print(row, flush=True)
    cols = ["set", "head", "rows", "memory acc", "stream acc", "stream - memory (pt)", "memory C", "stream C",
            "memory s", "stream s"]
    print_table(rows, cols)
    if rows:
        mean = sum(r["stream - memory (pt)"] for r in rows) / len(rows)
        print(f"\nmean stream - memory: {mean:+.2f} pt over {len(rows)} heads")
    save_json(a.json, {"args": vars(a), "rows": rows})


if __name__ == "__main__":
    main()
