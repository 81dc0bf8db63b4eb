"""The few-shot run: accuracy with k training images per class, over seeded draws, with 95% CIs.

Why: "how many labelled images do I need?" is the first question of a new user, and the
CLIP_benchmark / DINOv2 protocol answers it: for each shot count k and seed, draw k training
images per class, choose hyperparameters by CV *within the draw* (never on the evaluation
split), evaluate on the full evaluation split, and report mean, 95% CI and per-seed values.
The estimators, draws and intervals live in :mod:`featx.heads.estimators.fewshot`.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from threadpoolctl import threadpool_limits

from ..base.errors import FeatxError
from ..base.io import write_json
from ..base.version import __version__
from ..base.writable import default_run_dir, run_key, staged_dir
from ..cache.multi import open_cache
from ..cache.rows import read_rows
from ..config import FewshotSettings
from ..data.splits import Split
from ..heads.estimators.fewshot import (
    FALLBACK_PARAMS,
    FEWSHOT_GRIDS,
    FEWSHOT_HEADS,
    draw_shots,
    fit_in_draw,
    t_interval,
)
from ..report.plots.charts import fewshot_series, plot_fewshot
from .publish import publish_run

log = logging.getLogger(__name__)


@dataclass
class FewShotResult:
    """Per head and shot count: mean accuracy, 95% CI (t interval over seeds), per-seed values."""

    settings: dict
    classes: list[str]
    split: dict
    heads: dict[str, dict[str, dict]]
    notes: list[str] = field(default_factory=list)
    source: dict = field(default_factory=dict)
    featx_version: str = __version__
    created: str = ""
    seconds: float = 0.0
    json_path: str | None = None
    png_path: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def mean(self, head: str, shots: int) -> float:
        return float(self.heads[head][str(shots)]["mean"])

    def table(self) -> str:
        """Mean accuracy [95% CI] per shot count (rows) and head (columns), as Markdown."""
        heads = list(self.heads)
        lines = ["| shots | " + " | ".join(heads) + " |", "|---:|" + "---:|" * len(heads)]
        for k in self.settings["shots"]:
            cells = []
            for h in heads:
                cell = self.heads[h][str(k)]
                lo, hi = cell["ci95"]
                ci = f" [{100 * lo:.1f}, {100 * hi:.1f}]" if lo is not None and hi is not None else ""
                cells.append(f"{100 * cell['mean']:.1f}%{ci}")
            lines.append(f"| {k} | " + " | ".join(cells) + " |")
        n = len(self.settings["seeds"])
        lines.append(f"\nMean accuracy on the evaluation split over {n} seeds (draws); in brackets its 95% confidence "
                     "interval (Student t over the seeds; none with one seed).")
        return "\n".join(lines)


def load_data(source, *, test_size: float = 0.2, split_seed: int = 0, cache_dir: str | os.PathLike = "cache",
              view: str | None = None) -> dict:
    """Training/evaluation arrays from a cache (path, FeatureCache or None = newest) or from arrays.

    Arrays: a dict with ``X_train, y_train, X_eval, y_eval`` (optional ``classes``) or the same
    four as a tuple.  Caches are split exactly as the probe splits them (``train_eval_split``).
    """
    if isinstance(source, (dict, tuple, list)):
        if view not in (None, "final"):
            raise FeatxError(f"fewshot: --view {view} needs a featx cache, not arrays")
        d = dict(source) if isinstance(source, dict) else dict(zip(("X_train", "y_train", "X_eval", "y_eval"), source))
        missing = {"X_train", "y_train", "X_eval", "y_eval"} - set(d)
        if missing:
            raise FeatxError(f"fewshot: arrays need X_train, y_train, X_eval, y_eval; missing {sorted(missing)}")
        y_all = np.concatenate([np.asarray(d["y_train"]), np.asarray(d["y_eval"])])
        classes = list(d.get("classes") or [str(c) for c in np.unique(y_all)])
        return {"X_train": np.asarray(d["X_train"], np.float32), "y_train": np.asarray(d["y_train"]),
                "X_eval": np.asarray(d["X_eval"], np.float32), "y_eval": np.asarray(d["y_eval"]),
                "classes": classes, "split": {"kind": "arrays"}, "source": {"kind": "arrays"}, "name": "arrays"}
    fc = open_cache(source, cache_dir=cache_dir)
    labels, splits = fc.labels(), fc.split_array()
    split = Split.of(labels, splits, test_size=test_size, seed=split_seed)
    tr, ev, desc = split.train, split.eval, split.desc
    if not len(ev):
        raise FeatxError(f"cache {fc.path.name} leaves no rows to evaluate on; add a val/ split or raise --test-size")
    # train_eval_split returns sorted rows, the order read_rows reads them in (block by block).
    X_tr, X_ev = read_rows(fc, tr, splits, view=view), read_rows(fc, ev, splits, view=view)
    keep_tr, keep_ev = np.isfinite(X_tr).all(axis=1), np.isfinite(X_ev).all(axis=1)
    if not (keep_tr.all() and keep_ev.all()):
        log.warning("%d rows of %s have NaN/inf features and are left out; rebuild the cache with "
                    "`featx embed ... --dtype float32 --overwrite`", int((~keep_tr).sum() + (~keep_ev).sum()), fc.path.name)
    summary = fc.summary()
    return {"X_train": X_tr[keep_tr], "y_train": labels[tr][keep_tr], "X_eval": X_ev[keep_ev], "y_eval": labels[ev][keep_ev],
            "classes": list(fc.classes), "split": dict(desc, n_train=int(keep_tr.sum()), n_eval=int(keep_ev.sum())),
            "source": {"kind": "cache", "path": str(fc.path), "backbone": summary.get("backbone"),
                       "fingerprint": fc.fingerprint, "identity": fc.identity.to_dict()}, "name": fc.path.stem}


def _check_options(shots: str | Sequence[int], seeds: int | Sequence[int], heads: Sequence[str] | str) -> tuple[list, list, list]:
    if isinstance(shots, str):
        try:
            shots = [int(k) for k in shots.split(",") if k.strip()]
        except ValueError:
            raise FeatxError(f"--shots {shots!r}: expected a comma list of positive integers, e.g. 1,5,10") from None
    heads_l = [h.strip() for h in heads.split(",")] if isinstance(heads, str) else list(heads)
    heads_l = [h for h in dict.fromkeys(heads_l) if h]
    for h in heads_l:
        if h not in FEWSHOT_HEADS:
            raise FeatxError(f"--head {h!r}: few-shot heads are {', '.join(FEWSHOT_HEADS)}")
    if not heads_l:
        raise FeatxError(f"--head: name at least one of {', '.join(FEWSHOT_HEADS)}")
    shots_l = sorted({int(k) for k in shots})
    if not shots_l or shots_l[0] < 1:
        raise FeatxError(f"--shots: give positive integers such as 1,2,5,10,20, got {list(shots)}")
    seeds_l = list(range(int(seeds))) if isinstance(seeds, (int, np.integer)) else [int(s) for s in seeds]
    if not seeds_l:
        raise FeatxError("--seeds must be at least 1")
    return shots_l, seeds_l, heads_l


def _summarise(accs: list[float], params: list[dict], used_cv: list[bool], n_train: list[int], seeds: list[int],
               seconds: float) -> dict:
    lo, hi = t_interval(accs)
    # Accuracy lives in [0, 1]; a t interval over few seeds can leave it.
    lo, hi = (None if lo is None else max(0.0, lo)), (None if hi is None else min(1.0, hi))
    return {
        "mean": float(np.mean(accs)), "std": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0,
        "ci95": [lo, hi], "per_seed": [float(a) for a in accs], "seeds": seeds, "params": params,
        "cv": bool(all(used_cv)), "n_train": n_train, "fit_seconds": seconds,
    }



def _run_draws(raw: dict, notes: list, data: dict, shots_l: list, seeds_l: list, heads_l: list, use_grids: dict,
               *, cap: bool, max_iter: int) -> None:
    """Every (seed, shots, head) fit, appended to ``raw[(head, shots)]`` as (acc, params, cv, n, seconds)."""
    X_tr, y_tr, X_ev, y_ev = data["X_train"], data["y_train"], data["X_eval"], data["y_eval"]
    for seed in seeds_l:
        for k in shots_l:
            rows, taken = draw_shots(y_tr, k, seed, cap=cap)
            short = {data["classes"][c]: n for c, n in taken.items() if n < k}
            if short:
                notes.append(f"{k} shots, seed {seed}: classes with fewer images took all they have: {short}")
            for h in heads_l:
                t0 = time.perf_counter()
                est, params, used_cv = fit_in_draw(h, X_tr[rows], y_tr[rows], shots=k, seed=seed,
                                                   grid=use_grids[h], max_iter=max_iter)
                acc = float(np.mean(np.asarray(est.predict(X_ev)) == y_ev))
                raw[(h, k)].append((acc, params, used_cv, int(len(rows)), time.perf_counter() - t0))
            log.info("seed %d, %d shots: %s", seed, k, {h: round(raw[(h, k)][-1][0], 4) for h in heads_l})


# Keywords of fewshot() that are not options of `featx fewshot`, with their library defaults.
_EXTRAS = {"grids": None, "max_iter": 2000, "plot": True, "report": None}


def fewshot(source=None, *, settings: FewshotSettings | None = None, **overrides: Any) -> FewShotResult:
    """Accuracy vs shots per class for each head; writes ``fewshot.json`` and ``fewshot.png`` to ``out_dir``.

    ``settings``: the options of ``featx fewshot`` (:class:`featx.config.FewshotSettings`); keyword
    ``overrides`` replace single fields, by field name or the library's name for it (``heads`` for
    ``head``, ``cap`` for ``cap_shots``, ``split_seed`` for ``seed``); an unknown name is a TypeError.
    ``shots``: a comma list or a sequence of ints.  Library-only keywords: ``grids`` (overrides
    :data:`featx.heads.estimators.fewshot.FEWSHOT_GRIDS` per head), ``max_iter``, ``plot`` and ``report``
    (``report.html``; default: what a ``settings`` object says, else none, as :func:`featx.probe`).

    ``source``: a cache path, a :class:`FeatureCache`, None (newest cache in ``cache_dir``) or
    arrays (see :func:`load_data`).  ``seeds``: a count (seeds 0..n-1) or explicit seeds.
    Hyperparameters are chosen by CV inside each draw (min(k, 5) folds); the evaluation split
    is only used to score.  ``view``: a feature view of the cache (:mod:`featx.cache.views`), or
    a comma list for one curve per (head, view), labelled ``head@view``, on the same draws.
    """
    s, x = FewshotSettings.with_overrides(settings, overrides, call="fewshot", extras=_EXTRAS)
    shots, seeds, heads, out_dir, cap, test_size = s.shots, s.seeds, s.head, s.out_dir, s.cap_shots, s.test_size
    split_seed, cache_dir, mlflow, view, grids, max_iter = s.seed, s.cache_dir, s.mlflow, s.view, x["grids"], x["max_iter"]
    report = x["report"] if x["report"] is not None else (settings is not None and s.report)
    t_start = time.perf_counter()
    shots_l, seeds_l, heads_l = _check_options(shots, seeds, heads)
    views = [v.strip() for v in view.split(",") if v.strip()] if isinstance(view, str) else list(view)
    use_grids = {h: dict(FEWSHOT_GRIDS[h], **((grids or {}).get(h) or {})) for h in heads_l}
    raw: dict[tuple[str, int], list] = {}
    notes: list[str] = []
    for v in views or ["final"]:
        data = load_data(source, test_size=test_size, split_seed=split_seed, cache_dir=cache_dir, view=v)
        part = {(h, k): [] for h in heads_l for k in shots_l}
        # Few-shot fits are tiny: one BLAS thread each is several times faster than threads that
        # spin against each other (and against other processes) on a busy machine.
        with threadpool_limits(limits=1):
            _run_draws(part, notes, data, shots_l, seeds_l, heads_l, use_grids, cap=cap, max_iter=max_iter)
        raw.update({((h if len(views) < 2 else f"{h}@{v}"), k): r for (h, k), r in part.items()})
    heads_l = list(dict.fromkeys(h for h, _ in raw))
    if any(not r[2] for v in raw.values() for r in v):
        notes.append("draws with fewer than 2 images per class cannot be cross-validated: those fits use fixed "
                     f"defaults {', '.join(f'{h} {FALLBACK_PARAMS[h]}' for h in use_grids)}")
    table = {h: {str(k): _summarise([r[0] for r in raw[(h, k)]], [r[1] for r in raw[(h, k)]],
                                    [r[2] for r in raw[(h, k)]], [r[3] for r in raw[(h, k)]], seeds_l,
                                    float(sum(r[4] for r in raw[(h, k)]))) for k in shots_l} for h in heads_l}
    fit_heads = list(use_grids)
    settings = {"shots": shots_l, "seeds": seeds_l, "heads": heads_l, "cap": cap, "test_size": test_size, "view": views,
                "split_seed": split_seed, "grids": use_grids, "fallback_params": {h: FALLBACK_PARAMS[h] for h in fit_heads},
                "max_iter": max_iter, "cv": "StratifiedKFold(min(shots, 5), shuffle, random_state=seed)",
                "draw": "per seed, each class's training rows shuffled once; first k taken (nested over k)"}
    result = FewShotResult(settings=settings, classes=data["classes"], split=dict(data["split"]), heads=table,
                           notes=notes, source=data["source"],
                           created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    key = run_key("fewshot", (data["source"].get("identity") or {}).get("digest"), settings, data["split"])
    out = Path(out_dir) if out_dir is not None else default_run_dir("fewshot", data["name"], key)
    with staged_dir(out, option="--out-dir") as work:
        _write_files(result, data, work, out, n_seeds=len(seeds_l), plot=x["plot"], started=t_start)
    if report or mlflow:
        publish_run(out, report=report, mlflow=mlflow)
    return result


def _write_files(result: FewShotResult, data: dict, work: Path, out: Path, *, n_seeds: int, plot: bool,
                 started: float) -> None:
    """fewshot.png and fewshot.json into the staging folder ``work`` (paths recorded as in ``out``)."""
    if plot:
        title = " / ".join(str(v) for v in (data["name"].split("__")[0], data["source"].get("backbone")) if v)
        plot_fewshot(fewshot_series(result.to_dict()), work / "fewshot.png", title=title, n_seeds=n_seeds)
        result.png_path = str(out / "fewshot.png")
    result.json_path = str(out / "fewshot.json")
    result.seconds = time.perf_counter() - started
    write_json(work / "fewshot.json", result.to_dict())
