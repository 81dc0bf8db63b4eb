"""OpenVINO bf16 vs fp32 features: does the probe's accuracy change? (issue 22 item 3)

For every data set: ``featx embed DATA --runtime openvino`` and ``--runtime openvino-bf16``
(default backbone and views, each in its own cache: the runtime is part of the fingerprint),
then ``featx probe --head all`` on both caches with the same options, and compares:

- each head's evaluation accuracy (fp32, bf16, difference in points; the decision rule of the
  issue: make bf16 the default only if every head agrees within 0.2 pt);
- how many evaluation images the two runtimes' heads predict differently;
- the features themselves: min / mean cosine between a row's fp32 and bf16 features.

Caches go to ``--work`` (default /tmp/featx-bf16-study); the JSON per set is kept there, so a
rerun only prints the table (``--again`` redoes the probes).

    python benchmarks/bf16_study.py hymenoptera_data flowers12 dtd10 rsscn7 neu_steel medmnist6 --data ../shared/data
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

RUNTIMES = ("openvino", "openvino-bf16")
HEADS = ("logreg", "svm", "knn")


def _embed(data: Path, rt: str, work: Path):
    from featx.embedding.runner import embed

    t0 = time.perf_counter()
    fc = embed(str(data), runtime=rt, cache_dir=str(work / rt), progress=False, device="cpu")
    return fc, time.perf_counter() - t0


def _probe(fc, out: Path, view: str) -> dict:
    from featx.runs.probe import probe

    t0 = time.perf_counter()
    res = probe(fc, head="all", out_dir=str(out), save=False, plots=False, view=view)
    heads = {h: {"accuracy": e["accuracy"], "view": e["view"], "norm": e.get("norm"), "params": e.get("params")}
             for h, e in res["heads"].items()}
    preds = {}
    for h in heads:
        p = out / f"predictions_{h}.csv"
        if p.exists():
            with p.open(newline="") as fh:
                preds[h] = [(r["path"], r["pred"]) for r in csv.DictReader(fh)]
    return {"heads": heads, "predictions": preds, "seconds": time.perf_counter() - t0}


def _cosines(a, b) -> dict:
    ka, kb = list(a.keys()), list(b.keys())
    pos = {k: i for i, k in enumerate(kb)}
    rows = [(i, pos[k]) for i, k in enumerate(ka) if k in pos]
    X, Y = a.features()[[i for i, _ in rows]], b.features()[[j for _, j in rows]]
    cos = (X * Y).sum(1) / np.maximum(np.linalg.norm(X, axis=1) * np.linalg.norm(Y, axis=1), 1e-30)
    return {"rows": len(rows), "min_cosine": float(cos.min()), "mean_cosine": float(cos.mean())}


def run_set(name: str, data: Path, work: Path, view: str, again: bool) -> dict:
    path = work / f"{name}.json"
    if path.exists() and not again:
        return json.loads(path.read_text())
    doc: dict = {"set": name, "view": view, "load_start": os.getloadavg()[0]}
    caches = {}
    for rt in RUNTIMES:
        fc, sec = _embed(data / name, rt, work)
        caches[rt] = fc
        doc[rt] = {"embed_seconds": sec, "images": len(fc), **_probe(fc, work / "probe" / name / rt, view)}
    doc["features"] = _cosines(caches[RUNTIMES[0]], caches[RUNTIMES[1]])
    doc["load_end"] = os.getloadavg()[0]
    path.write_text(json.dumps(doc, indent=2))
    return doc


def _differ(a: list, b: list) -> int:
    """Evaluation images whose predicted class differs (matched by path)."""
    pa, pb = dict(map(tuple, a)), dict(map(tuple, b))
    return sum(pa.get(k) != pb.get(k) for k in set(pa) | set(pb))


def _choice(head: dict) -> str:
    params = ",".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in (head["params"] or {}).items())
    return f"{head['view']}/{head['norm']} {params}"


def table(docs: list[dict]) -> str:
    lines = ["| set | head | fp32 % | bf16 % | bf16 − fp32 (pt) | eval images predicted differently | "
             "view/norm hyperparameters, fp32 → bf16 | min / mean cosine of the features |",
             "|---|---|---:|---:|---:|---:|---|---|"]
    worst = 0.0
    for d in docs:
        f, b = d[RUNTIMES[0]], d[RUNTIMES[1]]
        for h in HEADS:
            if h not in f["heads"]:
                continue
            fa, ba = 100 * f["heads"][h]["accuracy"], 100 * b["heads"][h]["accuracy"]
            worst = max(worst, abs(ba - fa))
            n_eval = len(f["predictions"].get(h, []))
            diff = _differ(f["predictions"].get(h, []), b["predictions"].get(h, []))
            choice = f"{_choice(f['heads'][h])} → {_choice(b['heads'][h])}"
            feats = d["features"]
            lines.append(f"| {d['set']} | {h} | {fa:.2f} | {ba:.2f} | {ba - fa:+.2f} | {diff} of {n_eval} | {choice} | "
                         f"{feats['min_cosine']:.5f} / {feats['mean_cosine']:.6f} |")
    verdict = "every head within 0.2 pt" if worst <= 0.2 else f"largest difference {worst:.2f} pt (> 0.2 pt)"
    return "\n".join(lines) + f"\n\n{verdict}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sets", nargs="+")
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--work", default="/tmp/featx-bf16-study")
    ap.add_argument("--view", default="auto", help="probe --view (auto: featx's default choice among views)")
    ap.add_argument("--again", action="store_true", help="redo the probes even where a result is kept")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}; load average at the start {' '.join(f'{v:.2f}' for v in os.getloadavg())}",
          flush=True)
    docs = []
    for name in a.sets:
        docs.append(run_set(name, Path(a.data), work, a.view, a.again))
        print(f"... {name}: done (load {os.getloadavg()[0]:.1f})", flush=True)
    print(table(docs))
    print(f"\nload average at the end {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
