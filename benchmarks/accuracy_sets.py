"""Accuracy over the shared data sets (issue 19): plain scikit-learn defaults vs featx's probe.

For each data set, on caches already written by
``featx embed DATA --backbone efficientnet_lite0,efficientnet_lite2 --cache-dir CACHE_DIR``:

- ``plain``: scikit-learn defaults on the Lite0 final features (LogisticRegression(), SVC(), 5-NN);
- ``today``: ``featx probe --head all`` on the Lite0 cache with one full search per view (``cv_repeats=1``);
- ``default``: the same with the repeated paired choice (featx's default now);
- ``lite0+lite2``: ``featx probe --head all`` on the cache set of both backbones.

Every figure is an accuracy on the evaluation split (never used to choose), with a Wilson 95 %
interval; seconds are wall time of the probe (or of the three plain fits).  Writes one JSON per
set and prints a Markdown table.

    python benchmarks/accuracy_sets.py hymenoptera_data flowers12 --data ../shared/data --cache-dir cache --out runs/acc
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.svm import SVC

from featx.cache.multi import MultiCache, write_set
from featx.cache.store import FeatureCache
from featx.report.metrics import wilson_interval
from featx.runs.probe import probe

BACKBONES = ("efficientnet_lite0", "efficientnet_lite2")


def _member(cache_dir: Path, name: str, backbone: str) -> FeatureCache:
    found = sorted(cache_dir.glob(f"{name}-*__{backbone}__*.h5"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"no {backbone} cache of {name} in {cache_dir}: featx embed DATA --backbone {','.join(BACKBONES)}")
    return FeatureCache(found[-1])


def _acc(y, pred) -> dict:
    n, k = len(y), int(np.sum(np.asarray(y) == np.asarray(pred)))
    lo, hi = wilson_interval(k, n)
    return {"accuracy": k / n, "ci95": [lo, hi]}


def plain_defaults(fc: FeatureCache) -> dict:
    splits = fc.split_array()
    ev = "val" if "val" in fc.splits else "test"
    X, y = fc.features(), fc.labels()
    tr, te = splits == "train", splits == ev
    out, t0 = {}, time.perf_counter()
    for name, est in (("logreg", LogisticRegression(max_iter=5000)), ("svm_rbf", SVC()),
                      ("knn5", KNeighborsClassifier(5))):
        out[name] = _acc(y[te], est.fit(X[tr], y[tr]).predict(X[te]))
    out["seconds"] = time.perf_counter() - t0
    return out


def featx_probe(cache, out: Path, **kw) -> dict:
    t0 = time.perf_counter()
    res = probe(cache, head="all", out_dir=out, save=False, plots=False, **kw)
    heads = {h: {"accuracy": e["accuracy"], "ci95": list(e["accuracy_ci95"]), "view": e["view"],
                 "cv_score": e["cv_score"], "choice": e.get("choice", {}).get("rows"),
                 "views": [(c["view"], round(c["cv_score"], 4)) for c in e["views"]]}
             for h, e in res["heads"].items()}
    return {"heads": heads, "seconds": time.perf_counter() - t0}


def best(row: dict) -> tuple[str, float]:
    items = [(k, v["accuracy"]) for k, v in (row.get("heads") or row).items() if isinstance(v, dict)]
    return max(items, key=lambda kv: kv[1])


def run_set(name: str, cache_dir: Path, out: Path, which: list[str]) -> dict:
    members = [_member(cache_dir, name, b) for b in BACKBONES]
    path = out / f"{name}.json"
    doc = json.loads(path.read_text()) if path.exists() else {}
    if "plain" in which:
        doc["plain"] = plain_defaults(members[0])
    if "default" in which:
        doc["default"] = featx_probe(members[0], out / name / "default")
    if "multi" in which:
        doc["multi"] = featx_probe(MultiCache(write_set(members)), out / name / "multi")
    if "today" in which:
        doc["today"] = featx_probe(members[0], out / name / "today", cv_repeats=1)
    path.write_text(json.dumps(doc, indent=2))
    return doc


def _pct(v: dict) -> str:
    return f"{100 * v['accuracy']:.2f} [{100 * v['ci95'][0]:.1f}, {100 * v['ci95'][1]:.1f}]"


def _row(name: str, d: dict) -> tuple[str, float | None]:
    pl = d.get("plain", {})
    cells = [_pct(pl[k]) if k in pl else "–" for k in ("logreg", "svm_rbf", "knn5")]
    for key in ("today", "default", "multi"):
        if key in d:
            h, _ = best(d[key])
            cells.append(f"{_pct(d[key]['heads'][h])} {h}: {d[key]['heads'][h]['view']}")
        else:
            cells.append("–")
    gain = 100 * (best(d["multi"])[1] - best(pl)[1]) if pl and "multi" in d else None
    cells.append("–" if gain is None else f"{gain:+.2f}")
    cells.append(" / ".join(f"{d[k]['seconds']:.0f}" if k in d else "–" for k in ("plain", "today", "default", "multi")))
    return f"| {name} | " + " | ".join(cells) + " |", gain


def table(out: Path, names: list[str]) -> str:
    lines = ["| set | plain LR | plain RBF SVC | plain 5-NN | featx before (best head) | featx default (best head) | "
             "featx lite0+lite2 (best head) | lite0+lite2 − best plain (pt) | seconds: plain / before / default / lite0+lite2 |",
             "|---|---|---|---|---|---|---|---:|---|"]
    gains = {}
    for name in names:
        p = out / f"{name}.json"
        if p.exists():
            line, gains[name] = _row(name, json.loads(p.read_text()))
            lines.append(line)
    five = [g for n, g in gains.items() if g is not None and n != "medmnist6"]
    if five:
        lines.append(f"\nMean gain of lite0+lite2 over the best plain head, {len(five)} sets without medmnist6: "
                     f"{sum(five) / len(five):+.2f} pt")
    return "\n".join(lines)


def heads_table(out: Path, names: list[str]) -> str:
    """Every head of 'before' and the default, per set: test accuracy and the view chosen."""
    lines = ["| set | head | before | default | lite0+lite2 |", "|---|---|---|---|---|"]
    for name in names:
        p = out / f"{name}.json"
        if not p.exists():
            continue
        d = json.loads(p.read_text())
        for h in ("logreg", "svm", "knn"):
            cells = [f"{100 * d[k]['heads'][h]['accuracy']:.2f} ({d[k]['heads'][h]['view']})" if k in d else "–"
                     for k in ("today", "default", "multi")]
            lines.append(f"| {name} | {h} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sets", nargs="+")
    ap.add_argument("--cache-dir", default="cache")
    ap.add_argument("--out", default="runs/acc")
    ap.add_argument("--which", default="plain,default,multi,today")
    ap.add_argument("--table-only", action="store_true")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if not a.table_only:
        for name in a.sets:
            run_set(name, Path(a.cache_dir), out, a.which.split(","))
            print(table(out, a.sets), flush=True)
    print(table(out, a.sets))
    print()
    print(heads_table(out, a.sets))


if __name__ == "__main__":
    main()
