#!/usr/bin/env python
"""Heads at scale: a synthetic cache of N rows written by featx's own writer, then ``featx probe`` on it.

The features are Gaussian class clusters of a known separability (``--separation``: distance
between two class means in units of the within-class spread, along the line joining them),
plus a few strong nuisance directions shared by every class (as CNN features have), shifted
and scaled per feature like a real cache's (``--like CACHE`` takes the per-feature mean and
pooled within-class spread from a real featx cache).  The cache is written through
:class:`featx.cache.store.PartsDir` chunk files and :func:`featx.cache.store.write_final`, as
``featx embed`` writes it, with N training rows and ``--eval`` val rows.

Each probe run is a fresh ``featx probe`` process; the table shows its wall time, its peak
RSS (``ru_maxrss`` of the child) and the accuracy on the val rows beside it:

    python benchmarks/heads_scale.py --rows 1000000 --dim 1280 --classes 1000        # the issue's case
    python benchmarks/heads_scale.py --rows 100000 --dim 1280 --classes 100 --compare 100000
    python benchmarks/heads_scale.py --rows 20000 --dim 256 --classes 50 --compare 20000   # minutes

``--compare N`` also probes a stratified N-row subset with ``--solver memory`` and with
``--solver stream`` (same features, same val rows).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, print_table, save_json  # noqa: E402

CHUNK_ROWS = 50_000


def _like(path: str | None, dim: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and pooled within-class spread: from a real cache, else CNN-like defaults."""
    if path is None:
        mean = rng.gamma(1.5, 0.3, dim).astype(np.float32)
        return mean, (mean * rng.uniform(0.6, 1.2, dim)).astype(np.float32) + 0.02
    from featx.cache.store import FeatureCache

    fc = FeatureCache(path)
    X, y = fc.features("train"), fc.labels("train")
    within = np.sqrt(np.mean([X[y == c].var(0) for c in np.unique(y)], 0)) + 1e-3
    idx = rng.integers(0, X.shape[1], dim) if dim != X.shape[1] else np.arange(dim)
    return X.mean(0)[idx].astype(np.float32), within[idx].astype(np.float32)


class Clusters:
    """Gaussian class clusters ``separation`` within-class spreads apart, plus 16 shared nuisance directions."""

    def __init__(self, *, dim: int, classes: int, separation: float, like: str | None = None, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.mean, self.spread = _like(like, dim, self.rng)
        # Class centres: random directions, scaled so that two centres are `separation` spreads apart.
        self.centres = self.rng.normal(0, separation / np.sqrt(2 * dim), (classes, dim)).astype(np.float32)
        self.nuisance = self.rng.normal(0, 1, (16, dim)).astype(np.float32) * 2.0 / np.sqrt(16)

    def sample(self, y: np.ndarray) -> np.ndarray:
        """float32 features of one row per label in ``y``."""
        n, dim = len(y), self.centres.shape[1]
        z = self.centres[y] + self.rng.standard_normal((n, dim), np.float32)
        z += self.rng.standard_normal((n, 16), np.float32) @ self.nuisance
        return self.mean + self.spread * z


def write_cache(path: Path, *, rows: int, n_eval: int, dim: int, classes: int, separation: float,
                like: str | None, seed: int = 0) -> dict:
    """Write the synthetic cache (train + val rows) through featx's chunk files and final writer."""
    from featx.cache.store import Chunk, PartsDir, fingerprint_digest, write_final
    from featx.data.folders import Sample

    gen = Clusters(dim=dim, classes=classes, separation=separation, like=like, seed=seed)
    fp = {"backbone": "synthetic", "dim": dim, "classes": classes, "separation": separation, "seed": seed}
    parts = PartsDir(path, fp)
    parts.ensure()
    samples, total = [], rows + n_eval
    labels = np.concatenate([np.arange(rows) % classes, np.arange(n_eval) % classes])
    split = ["train"] * rows + ["val"] * n_eval
    for a in range(0, total, CHUNK_ROWS):
        b = min(total, a + CHUNK_ROWS)
        keys = [f"{split[i]}/c{labels[i]:04d}/{i:08d}.jpg" for i in range(a, b)]
        parts.write_chunk(Chunk(keys=keys, features=gen.sample(labels[a:b]).astype(np.float16),
                                mtime_ns=np.zeros(b - a, np.int64), size=np.zeros(b - a, np.int64)))
        samples += [Sample(path=k, key=k, label=int(labels[i]), split=split[i]) for i, k in zip(range(a, b), keys)]
    attrs = {"backbone": "synthetic", "fingerprint": fingerprint_digest(fp), "fingerprint_json": json.dumps(fp, sort_keys=True),
             "root": str(path.parent), "layout": "synthetic", "preprocess": "none"}
    write_final(path, samples=samples, classes=[f"c{c:04d}" for c in range(classes)], index=parts.read_index(),
                dim=dim, dtype="float16", attrs=attrs)
    parts.remove()
    return fp


def run_probe(cache: Path, out: Path, args: list[str]) -> dict:
    """One ``featx probe`` in a fresh process: wall seconds, peak RSS (MiB) and the head's metrics."""
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-c", _MEASURED, str(out / "rss.txt"), "-vv", "probe", str(cache), "--out-dir", str(out),
           "--no-report", "--no-save", *args]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    before = os.times()
    log = out / "probe.log"  # the heads' log as it goes: epochs, pruning, held-out scores, C path
    with log.open("w") as err:
        done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
    wall, after = time.perf_counter() - t0, os.times()
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{log.read_text()[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    return {"wall_s": wall, "peak_rss_mb": int((out / "rss.txt").read_text()) / 1024, "metrics": metrics,
            "cpu_s": (after.children_user - before.children_user) + (after.children_system - before.children_system)}


# The featx CLI in this process, then its own peak RSS (KiB) written to argv[1].
_MEASURED = """
import resource, sys
path = sys.argv.pop(1)
from featx.cli import main
try:
    main()
finally:
    open(path, "w").write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
"""


def _row(what: str, res: dict, head: str) -> dict:
    h = res["metrics"]["heads"][head]
    return {"run": what, "train rows": res["metrics"]["split"]["n_train"], "solver": h.get("solver", "memory"),
            "wall s": res["wall_s"], "CPU s": res["cpu_s"], "fit s": h["fit_seconds"], "peak RSS MB": res["peak_rss_mb"],
            "accuracy": h["accuracy"], "C": h["params"].get("C"), "selection": h.get("selection", f"{h['cv_folds']}-fold cv")}


def _args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="training rows")
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--eval", type=int, default=10_000, help="val rows (scored)")
    ap.add_argument("--separation", type=float, default=7.0, help="distance between class centres / within-class spread")
    ap.add_argument("--like", default=None, help="a real featx cache to take per-feature mean and spread from")
    ap.add_argument("--head", default="logreg")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--epochs", type=int, default=None, help="--stream-epochs for the probe")
    ap.add_argument("--compare", type=int, default=0, help="also probe an N-row subset in memory and streamed")
    ap.add_argument("--folds", type=int, default=None, help="CV folds of the in-memory --compare run (default: the probe's)")
    ap.add_argument("--skip-full", action="store_true", help="only the --compare runs")
    ap.add_argument("--dir", default="/tmp/featx-heads-scale", help="where the cache and runs go (kept)")
    ap.add_argument("--json", default=None)
    return ap.parse_args(argv)


def main(argv=None) -> None:
    a = _args(argv)
    base = Path(a.dir)
    base.mkdir(parents=True, exist_ok=True)
    cache = base / f"synthetic-{a.rows}x{a.dim}x{a.classes}-s{a.separation:g}.h5"
    if not cache.exists():
        t0 = time.perf_counter()
        write_cache(cache, rows=a.rows, n_eval=a.eval, dim=a.dim, classes=a.classes, separation=a.separation, like=a.like)
        print(f"wrote {cache} ({cache.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - t0:.0f}s", flush=True)
    common = ["--head", a.head, "--device", a.device] + (["--stream-epochs", str(a.epochs)] if a.epochs else [])
    rows, load0 = [], os.getloadavg()
    if not a.skip_full:
        rows.append(_row("full", run_probe(cache, base / "full", common + ["--solver", "stream"]), a.head))
    if a.compare:
        sub = ["--max-train-rows", str(a.compare)]
        for solver in ("stream", "memory"):  # the quick one first
            extra = ["--folds", str(a.folds)] if solver == "memory" and a.folds else []
            rows.append(_row(f"subset {a.compare:,}", run_probe(cache, base / f"sub-{solver}", common + sub + extra + ["--solver", solver]), a.head))
    load = os.getloadavg()
    print(f"\nmachine: {os.cpu_count()} cores, load average {load0[0]:.1f} {load0[1]:.1f} {load0[2]:.1f} at the start, "
          f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f} at the end (CPU s: user + system seconds of the probe process)")
    print_table(rows, ["run", "train rows", "solver", "wall s", "CPU s", "fit s", "peak RSS MB", "accuracy", "C", "selection"])
    save_json(a.json, {"args": vars(a), "rows": rows, "load": load})


if __name__ == "__main__":
    main()
