#!/usr/bin/env python
"""``featx audit``'s label-error ranking beside cleanlab's documented ``Datalab`` workflow, on the same features.

    pip install 'featx[bench-audit]'     # cleanlab[datalab]: the anchor's own dependencies
    featx embed ../shared/data/flowers12 --cache-dir /tmp/auditcaches     # each set, default backbone
    python benchmarks/audit_vs_datalab.py --cache-dir /tmp/auditcaches flowers12 dtd10 rsscn7 \
        --planted /tmp/auditcaches/flowers12p-*.h5=/tmp/auditplant/flowers12p.truth.json

For each set: the cache's training rows (its ``train`` split) in the view asked (``--view``, default
``final``), with ``--flip`` of their labels moved to another class (seeded; or, with ``--planted
CACHE=TRUTH``, the labels of a copy made by ``benchmarks/audit_plant.py`` as they are, truth.json
naming the flipped files).  Then, on exactly these rows:

* **Datalab** (the anchor): ``P = cross_val_predict(make_pipeline(StandardScaler(),
  LogisticRegression(max_iter=2000)), X, y, cv=5, method="predict_proba")``, then
  ``Datalab(data={"label": y}).find_issues(features=X, pred_probs=P)``; its ranking is
  ``get_issues("label")`` by ``label_score`` (lowest first), its flags ``is_label_issue``.
* **featx**: :func:`featx.audit.finders.rank_label_issues`, the function ``featx audit`` ranks
  training rows with (the same folds, seed and C grid as the probe's).
* **featx (old)**: the ranking before issue 33 (C by CV accuracy on raw features, flagged rows only).

Scores, with k the number of flipped rows: recall@2k (flipped rows among the first 2k of the
ranking, over k) and precision@k (flipped among the first k, over k); and the rows each flags.
Prints a Markdown table (ACCURACY.md) and writes ``--json``.
"""

from __future__ import annotations

import argparse
import glob
import json
import time
from pathlib import Path

import numpy as np
from common import machine, print_table, save_json

from featx.audit import finders
from featx.cache.store import FeatureCache
from featx.heads.tuning.grids import resolve_grids


def newest_cache(cache_dir: Path, name: str) -> Path:
    found = sorted(glob.glob(str(cache_dir / f"{name}-*.h5")), key=lambda p: Path(p).stat().st_mtime)
    if not found:
        raise SystemExit(f"no cache {name}-*.h5 in {cache_dir}: featx embed ../shared/data/{name} --cache-dir {cache_dir}")
    return Path(found[-1])


def flip(y: np.ndarray, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(noisy labels, flipped positions): ``share`` of the rows moved to another class, uniformly, seeded."""
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    rows = np.sort(rng.choice(len(y), size=max(1, int(round(share * len(y)))), replace=False))
    noisy = y.copy()
    for r in rows:
        noisy[r] = rng.choice(classes[classes != y[r]])
    return noisy, rows


def scores(order: np.ndarray, flipped: np.ndarray, flagged: int) -> dict:
    k = len(flipped)
    f = set(np.asarray(flipped).tolist())
    return {"recall@2k": sum(int(r) in f for r in order[: 2 * k]) / k,
            "precision@k": sum(int(r) in f for r in order[:k]) / k, "flagged": int(flagged)}


def datalab(X: np.ndarray, y: np.ndarray, folds: int = 5) -> tuple[np.ndarray, int, float, dict]:
    """The anchor, as cleanlab documents it: (ranking, rows flagged, seconds, near-duplicate sets)."""
    from cleanlab import Datalab
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    t0 = time.perf_counter()
    P = cross_val_predict(make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)), X, y, cv=folds,
                          method="predict_proba")
    lab = Datalab(data={"label": y}, label_name="label", verbosity=0)
    lab.find_issues(features=X, pred_probs=P)
    iss = lab.get_issues("label")
    order = np.argsort(iss["label_score"].to_numpy(), kind="stable")
    near = {}
    try:
        nd = lab.get_issues("near_duplicate")
        near = {int(i): [int(j) for j in s] for i, s in zip(nd.index, nd["near_duplicate_sets"]) if len(s)}
    except ValueError:
        pass
    return order, int(iss["is_label_issue"].sum()), time.perf_counter() - t0, near


def featx_rank(X: np.ndarray, y: np.ndarray, *, folds: int, seed: int, old: bool = False) -> tuple[np.ndarray, int, float]:
    """featx's ranking of training rows: (every row, worst first; rows flagged; seconds)."""
    resolved = resolve_grids(None)
    t0 = time.perf_counter()
    if old:  # before issue 33: C by CV accuracy, raw features, only the flagged rows listed
        probs, head = finders.out_of_fold_probabilities(X, y, folds=folds, seed=seed, Cs=resolved["logreg"]["C"],
                                                        max_iter=resolved["max_iter"], scoring=resolved["scoring"])
        li = finders.label_issues(y, probs, classes=np.asarray(head.classes_))
        return li.flagged, len(li.flagged), time.perf_counter() - t0
    r = finders.rank_label_issues(X, y, folds=folds, seed=seed, Cs=resolved["logreg"]["C"],
                                  max_iter=resolved["max_iter"], scoring=resolved["scoring"])
    return r.order, int(r.flagged_mask.sum()), time.perf_counter() - t0


def run_set(name: str, path: Path, a, truth: Path | None) -> list[dict]:
    fc = FeatureCache(path)
    tr = np.flatnonzero(fc.split_array() == "train")
    X = np.asarray(fc.features(None, view=a.view), dtype=np.float32)[tr]
    y_true = fc.labels()[tr]
    if truth is not None:
        t = json.loads(truth.read_text())
        keys = [fc.keys()[i] for i in tr]
        where = {k: i for i, k in enumerate(keys)}
        flipped = np.array(sorted(where[f["path"]] for f in t["flipped"] if f["path"] in where))
        y, how = y_true, f"planted copy ({len(flipped)} flips by benchmarks/audit_plant.py)"
    else:
        y, flipped = flip(y_true, a.flip, a.seed)
        how = f"{a.flip:.0%} flipped, seed {a.seed}"
    out = []
    base = {"set": name, "rows": len(y), "classes": len(np.unique(y)), "flips": len(flipped), "noise": how,
            "view": a.view}

    def add(tool, order, n_flag, sec):
        out.append({**base, "tool": tool, **scores(order, flipped, n_flag), "seconds": round(sec, 1)})
        r = out[-1]
        print(f"{name:12s} {tool:22s} recall@2k {r['recall@2k']:.3f} precision@k {r['precision@k']:.3f} "
              f"flagged {r['flagged']:4d} ({r['seconds']} s)", flush=True)

    order, n_flag, sec = featx_rank(X, y, folds=a.folds, seed=a.seed)
    add("featx audit", order, n_flag, sec)
    if a.old:
        add("featx audit (before)", *featx_rank(X, y, folds=a.folds, seed=a.seed, old=True))
    if not a.no_datalab:
        order, n_flag, sec, _ = datalab(X, y)
        add("cleanlab Datalab", order, n_flag, sec)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sets", nargs="*", default=["flowers12", "dtd10", "rsscn7"])
    ap.add_argument("--cache-dir", type=Path, default=Path("/tmp/auditcaches"))
    ap.add_argument("--planted", action="append", default=[], metavar="CACHE=TRUTH",
                    help="a cache of a copy made by audit_plant.py and its truth.json (repeatable)")
    ap.add_argument("--flip", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--view", default="final")
    ap.add_argument("--old", action="store_true", help="also the ranking before issue 33")
    ap.add_argument("--no-datalab", action="store_true", help="featx only (a quick check)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    rows = []
    for spec in a.planted:
        c, t = spec.split("=", 1)
        c = sorted(glob.glob(c))[-1]
        rows += run_set(Path(c).name.split("__")[0].rsplit("-", 1)[0] + " (planted)", Path(c), a, Path(t))
    for name in a.sets:
        rows += run_set(name, newest_cache(a.cache_dir, name), a, None)
    print()
    print_table(rows, ["set", "rows", "flips", "noise", "tool", "recall@2k", "precision@k", "flagged", "seconds"])
    print(f"\nmachine: {machine()}")
    save_json(a.json, {"machine": machine(), "rows": rows, "args": {k: str(v) for k, v in vars(a).items()}})


if __name__ == "__main__":
    main()
