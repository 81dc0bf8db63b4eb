"""Heads: scikit-learn's grid vs the CPU C path vs the torch heads, same features, grids and folds.

For each head (logreg, linear SVM, kNN) each implementation (``--impls``: ``sklearn`` = the
GridSearchCV heads, ``path`` = the warm-started C path of featx.heads.estimators.linear_path, ``torch``
= the batched torch heads, ``auto`` = what ``featx probe`` picks for this size) runs featx's
hyperparameter search (the grids of :func:`featx.heads.resolve_grids`, 5-fold stratified CV)
on the same training rows; the table shows search+refit seconds (wall and CPU), CV score,
held-out accuracy, the chosen hyperparameters and the speed ratio, plus kNN query time.

Features are synthetic (``--n`` x ``--dim``, ``--classes`` Gaussian clusters of
non-negative, CNN-like features; a held-out 20 % to score) or a real featx cache (``--cache``,
its train rows to fit and val/test rows to score).

    python benchmarks/heads_bench.py --cpu-quick                # minutes on 2 CPU cores
    python benchmarks/heads_bench.py --n 12500 --dim 1280 --classes 100 --impls auto --device cpu
    python benchmarks/heads_bench.py                            # 50,000 x 2,048, 100 classes (GPU)
    python benchmarks/heads_bench.py --cache cache/xyz.h5       # real features
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, print_table, save_json  # noqa: E402


def synthetic(n: int, dim: int, classes: int, *, seed: int = 0, test_frac: float = 0.2, separation: float = 7.0):
    """Gaussian class clusters of a known separability (benchmarks/heads_scale.py's ``Clusters``).

    The features before (centres 3/sqrt(2 dim) apart in noise of spread 1.2) were close to
    inseparable: 5.5 % accuracy at 100 classes, so the C path stopped at small C and the timings
    said little about real data.  ``separation`` 7 gives accuracies like real linear probes.
    """
    from heads_scale import Clusters

    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    X = Clusters(dim=dim, classes=classes, separation=separation, seed=seed).sample(y).astype(np.float32)
    cut = int(n * (1 - test_frac))
    return X[:cut], y[:cut], X[cut:], y[cut:]


def from_cache(path: str):
    from featx.cache.store import FeatureCache

    fc = FeatureCache(path)
    ev = "val" if "val" in fc.splits else "test"
    return fc.features("train"), fc.labels("train"), fc.features(ev), fc.labels(ev)


def _args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-quick", action="store_true", help="small sizes for a 2-core CPU machine")
    ap.add_argument("--n", type=int, default=None, help="rows (train + 20%% held out); default 62,500 (quick 2,500)")
    ap.add_argument("--dim", type=int, default=None, help="feature dimension; default 2048 (quick 256)")
    ap.add_argument("--classes", type=int, default=None, help="default 100 (quick 10)")
    ap.add_argument("--cache", default=None, help="use a real featx cache instead of synthetic features")
    ap.add_argument("--separation", type=float, default=7.0,
                    help="synthetic: distance between class centres in within-class spreads")
    ap.add_argument("--heads", default="logreg,svm,knn")
    ap.add_argument("--impls", default="sklearn,torch", help="comma list of sklearn, path, torch, auto")
    ap.add_argument("--device", default="auto", help="device of the torch heads (auto: cuda if present)")
    ap.add_argument("--skip-sklearn", action="store_true", help="time only the torch heads")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--queries", type=int, default=None, help="kNN query rows timed (default 10,000; quick 1,000)")
    ap.add_argument("--json", default=None)
    return ap.parse_args(argv)


def _make(name: str, impl: str, g: dict, folds: int, dev: str, problem: tuple):
    from featx.heads.estimators.linear_path import PathLinearHead
    from featx.heads.estimators.torch_heads import create_torch_head
    from featx.heads.tuning.factory import create_head

    if impl == "sklearn":
        return create_head(name, grid=None, folds=folds, seed=0, n_jobs=-1, device="cpu")
    if impl == "path":
        if name == "knn":
            return None
        return PathLinearHead(loss="logistic" if name == "logreg" else "squared_hinge", Cs=tuple(g["C"]), folds=folds)
    if impl == "auto":
        return create_head(name, grid=None, folds=folds, seed=0, n_jobs=-1, device=dev, problem=problem)
    return create_torch_head(name, grid=g, folds=folds, seed=0, device=dev)


def _time_fit(est, Xtr, ytr, dev: str) -> tuple[float, float]:
    import torch

    if dev.startswith("cuda"):
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    est.fit(Xtr, ytr)
    if dev.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0, time.process_time() - c0


def main(argv=None) -> None:
    args = _args(argv)
    import torch

    from featx.heads.tuning.factory import grid_key
    from featx.heads.tuning.grids import resolve_grids

    dev = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    q = args.cpu_quick
    if args.cache:
        Xtr, ytr, Xte, yte = from_cache(args.cache)
        source = f"cache {args.cache}"
    else:
        n = args.n or (2500 if q else 62500)
        dim = args.dim or (256 if q else 2048)
        k = args.classes or (10 if q else 100)
        Xtr, ytr, Xte, yte = synthetic(n, dim, k, separation=args.separation)
        source = f"synthetic {n} x {dim}, {k} classes, separation {args.separation:g}"
    mach = machine()
    print(f"machine: {mach}\nfeatures: {source}; train {Xtr.shape}, held out {Xte.shape}; torch heads on {dev}", flush=True)
    grids = resolve_grids()
    problem = (len(Xtr), Xtr.shape[1], len(np.unique(ytr)))
    impls = [i for i in args.impls.split(",") if not (args.skip_sklearn and i == "sklearn")]
    rows, fitted = [], {}
    for name in args.heads.split(","):
        base = None
        for impl in impls:
            est = _make(name, impl, grids[grid_key(name)], args.folds, dev, problem)
            if est is None:
                continue
            print(f"... {name} {impl}", flush=True)
            secs, cpu = _time_fit(est, Xtr, ytr, dev)
            acc = float(np.mean(np.asarray(est.predict(Xte)) == yte))
            params = getattr(est, "params_", None) or est.best_params_
            base = base or secs
            fitted[(name, impl)] = est
            label = f"{impl}: {type(est).__name__}" if impl == "auto" else impl
            rows.append({"head": name, "impl": label if impl != "torch" else f"torch ({dev})",
                         "search+fit s": secs, "cpu s": cpu, "speed-up": base / secs, "cv score": float(est.best_score_),
                         "accuracy": acc, "candidates": int(getattr(est, "n_candidates_", 0)),
                         "best": ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())})
    rows += _knn_queries(fitted, Xte, args.queries or (1000 if q else 10000), dev)
    print()
    table = print_table(rows, ["head", "impl", "search+fit s", "cpu s", "speed-up", "cv score", "accuracy", "candidates", "best"])
    print(f"\nmachine: {mach}\nfeatures: {source}")
    save_json(args.json, {"machine": mach, "features": source, "device": dev, "rows": rows, "table": table})


def _knn_queries(fitted: dict, Xte, nq: int, dev: str) -> list[dict]:
    """kNN query time of each fitted kNN head on ``nq`` rows."""
    import torch

    Q = np.concatenate([Xte] * int(np.ceil(nq / max(len(Xte), 1))))[:nq]
    rows, base_q = [], None
    for (name, impl), est in fitted.items():
        if name != "knn":
            continue
        est.predict(Q[:10])
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        est.predict(Q)
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        secs = time.perf_counter() - t0
        base_q = base_q or secs
        rows.append({"head": f"knn query x{nq}", "impl": impl if impl != "torch" else f"torch ({dev})",
                     "search+fit s": secs, "speed-up": base_q / secs})
    return rows


if __name__ == "__main__":
    main()
