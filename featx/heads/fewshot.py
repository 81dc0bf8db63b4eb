"""Few-shot curves: accuracy with k training images per class, over seeded draws, with 95% CIs.

Why: "how many labelled images do I need?" is the first question of a new user, and the
CLIP_benchmark / DINOv2 protocol answers it: for each shot count k and seed, draw k training
images per class, choose hyperparameters by CV *within the draw* (never on the evaluation
split), evaluate on the full evaluation split, and report mean, 95% CI and per-seed values.

Draws are nested: for one seed, each class's training rows are shuffled once and the first k
are taken, so the 5-shot set of seed 3 contains its 2-shot set and curves are smoother than
with independent draws.  At 1 shot no CV is possible (a fold would hold out a whole class), so
each head falls back to fixed defaults, recorded in the result's notes.
"""

from __future__ import annotations

import io
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer, StandardScaler
from threadpoolctl import threadpool_limits

from ..base.version import __version__
from ..base.errors import FeatxError
from ..base.io import atomic_write_bytes, write_json
from ..cache.store import FeatureCache, find_cache
from ..data.splits import train_eval_split
from ..report.publish import publish_run
from .dino_knn import DINO_KNN_GRID, DinoKNNClassifier
from .probing import read_rows

log = logging.getLogger(__name__)

FEWSHOT_HEADS = ("logreg", "knn", "knn_dino")
# Every other value of the probe's logreg grid (1e-5 .. 1e3): a few-shot draw cannot tell
# neighbouring values apart anyway, and 5 seeds x 5 shot counts must stay fast.
# logreg also chooses its scaling: per-feature standardisation (the probe's) needs several
# images per class to estimate 1,280 standard deviations; L2-normalising rows needs none.
FEWSHOT_GRIDS: dict[str, dict[str, list]] = {
    "logreg": {"scale": ["standard", "l2"], "C": [float(c) for c in np.logspace(-5, 3, 9)]},
    "knn": {"n_neighbors": [1, 3, 5, 9, 15], "weights": ["uniform", "distance"]},
    "knn_dino": {k: list(v) for k, v in DINO_KNN_GRID.items()},
}
# Used when the draw is too small to cross-validate (1 shot): scikit-learn's / DINO's defaults.
# logreg: L2 rows, C=1 -- on flowers12 / hymenoptera *training* rows outside 1-shot draws (5 seeds)
# this scored .70 / .77 against .44 / .52 with standardisation (a 1-shot draw cannot tell).
FALLBACK_PARAMS: dict[str, dict[str, Any]] = {
    "logreg": {"scale": "l2", "C": 1.0},
    "knn": {"n_neighbors": 1, "weights": "uniform"},
    "knn_dino": {"n_neighbors": 20, "temperature": 0.07},
}


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
        return "\n".join(lines)


SCALERS = {"standard": StandardScaler, "l2": Normalizer}


def _scaler(name: str):
    if name not in SCALERS:
        raise FeatxError(f"few-shot logreg grid: scale values are {', '.join(SCALERS)}, got {name!r}")
    return SCALERS[name]()


def _step_params(params: dict[str, Any]) -> dict[str, Any]:
    """Head parameters as pipeline parameters: ``scale`` names a step, the rest go to ``clf``."""
    return {("scale" if k == "scale" else f"clf__{k}"): (_scaler(v) if k == "scale" else v) for k, v in params.items()}


def _plain_params(params: dict[str, Any]) -> dict[str, Any]:
    """Pipeline parameters back to head parameters (the scaler step as its name), for JSON."""
    names = {cls: n for n, cls in SCALERS.items()}
    return {("scale" if k == "scale" else k.removeprefix("clf__")): (names[type(v)] if k == "scale" else v)
            for k, v in params.items()}


def make_head(name: str, *, max_iter: int = 2000) -> Pipeline:
    """The unfitted pipeline of a few-shot head (same preprocessing as the probe's heads)."""
    if name == "logreg":
        return Pipeline([("scale", StandardScaler()), ("clf", LogisticRegression(max_iter=max_iter))])
    if name == "knn":
        return Pipeline([("norm", Normalizer()), ("clf", KNeighborsClassifier(algorithm="brute", metric="cosine"))])
    if name == "knn_dino":
        return Pipeline([("clf", DinoKNNClassifier())])
    raise FeatxError(f"--head {name!r}: few-shot heads are {', '.join(FEWSHOT_HEADS)}")


def draw_shots(y: np.ndarray, shots: int, seed: int, *, cap: bool = False) -> tuple[np.ndarray, dict[int, int]]:
    """Row indices of ``shots`` rows per class present in ``y`` (seeded, nested across ``shots``).

    Returns (rows, {class: rows taken}) with rows sorted.  A class with fewer than ``shots``
    rows is an error unless ``cap`` (then all its rows are taken).
    """
    if shots < 1:
        raise FeatxError(f"--shots values must be >= 1, got {shots}")
    rng = np.random.default_rng(seed)
    rows, taken = [], {}
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        if len(idx) < shots and not cap:
            raise FeatxError(
                f"class {int(c)} has only {len(idx)} training image(s), fewer than {shots} shots: "
                f"drop that value from --shots (use at most {len(idx)}) or pass --cap-shots to take all of them"
            )
        rows.append(idx[:shots])
        taken[int(c)] = int(min(shots, len(idx)))
    return np.sort(np.concatenate(rows)), taken


def _grid_for(name: str, grid: dict[str, list], n_fit_min: int) -> dict[str, list]:
    """Prefixed parameter grid; kNN's k limited to the rows of the smallest CV training fold."""
    g = {k: list(v) for k, v in grid.items()}
    if name == "knn":
        g["n_neighbors"] = [k for k in g["n_neighbors"] if k <= n_fit_min] or [1]
    return {("scale" if k == "scale" else f"clf__{k}"): ([_scaler(s) for s in v] if k == "scale" else v)
            for k, v in g.items()}


def fit_in_draw(name: str, X: np.ndarray, y: np.ndarray, *, shots: int, seed: int, grid: dict[str, list],
                max_iter: int = 2000) -> tuple[Any, dict, bool]:
    """Fit head ``name`` on one draw: CV with min(shots, 5) stratified folds, or fixed defaults at 1 shot.

    Returns (fitted estimator, chosen params, whether CV was used).
    """
    pipe = make_head(name, max_iter=max_iter)
    per_class = int(np.bincount(np.unique(y, return_inverse=True)[1]).min())
    folds = min(per_class, 5)
    if folds < 2:
        # A grid restricted by the caller also restricts the fallback (its first value).
        params = {k: (v if k not in grid or v in grid[k] else list(grid[k])[0]) for k, v in FALLBACK_PARAMS[name].items()}
        if name == "knn":
            params["n_neighbors"] = min(params["n_neighbors"], len(y))
        pipe.set_params(**_step_params(params))
        return pipe.fit(X, y), params, False
    n_fit_min = len(y) - math.ceil(len(y) / folds)
    search = GridSearchCV(
        pipe, _grid_for(name, grid, n_fit_min), cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
        scoring="accuracy", n_jobs=None, refit=True,
    )
    search.fit(X, y)
    return search, _plain_params(search.best_params_), True


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float | None, float | None]:
    """Two-sided Student-t confidence interval of the mean (None, None for fewer than 2 values)."""
    from scipy import stats  # scikit-learn's own dependency; only needed here

    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return None, None
    half = float(stats.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return float(v.mean() - half), float(v.mean() + half)


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
    fc = source if isinstance(source, FeatureCache) else FeatureCache(find_cache(source, cache_dir=cache_dir))
    labels, splits = fc.labels(), fc.split_array()
    tr, ev, desc = train_eval_split(labels, splits, test_size=test_size, seed=split_seed)
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
                       "fingerprint": fc.fingerprint}, "name": fc.path.stem}


def _check_options(shots: Sequence[int], seeds: int | Sequence[int], heads: Sequence[str] | str) -> tuple[list, list, list]:
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


def fewshot(
    source=None,
    *,
    shots: Sequence[int] = (1, 2, 5, 10, 20),
    seeds: int | Sequence[int] = 5,
    heads: Sequence[str] | str = ("logreg", "knn"),
    out_dir: str | os.PathLike | None = None,
    cap: bool = False,
    test_size: float = 0.2,
    split_seed: int = 0,
    grids: dict[str, dict[str, list]] | None = None,
    max_iter: int = 2000,
    plot: bool = True,
    cache_dir: str | os.PathLike = "cache",
    report: bool = False,
    mlflow: bool = False,
    view: str | Sequence[str] = "final",
) -> FewShotResult:
    """Accuracy vs shots per class for each head; writes ``fewshot.json`` and ``fewshot.png`` to ``out_dir``.

    ``source``: a cache path, a :class:`FeatureCache`, None (newest cache in ``cache_dir``) or
    arrays (see :func:`load_data`).  ``seeds``: a count (seeds 0..n-1) or explicit seeds.
    ``grids`` overrides :data:`FEWSHOT_GRIDS` per head.  Hyperparameters are chosen by CV
    inside each draw (min(k, 5) folds); the evaluation split is only used to score.  ``view``:
    a feature view of the cache (:mod:`featx.cache.views`), or a comma list for one curve per
    (head, view), labelled ``head@view``, on the same draws.
    """
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
    out = Path(out_dir) if out_dir is not None else Path("runs") / f"fewshot-{data['name']}"
    out.mkdir(parents=True, exist_ok=True)
    if plot:
        title = " / ".join(str(v) for v in (data["name"].split("__")[0], data["source"].get("backbone")) if v)
        result.png_path = str(plot_curve(result, out / "fewshot.png", title=title))
    result.json_path = str(out / "fewshot.json")
    result.seconds = time.perf_counter() - t_start
    write_json(result.json_path, result.to_dict())
    if report or mlflow:
        publish_run(out, report=report, mlflow=mlflow)
    return result


def plot_curve(result: FewShotResult, path: str | os.PathLike, *, title: str = "") -> Path:
    """Accuracy vs shots per class, one line per head with its 95% CI band (log-scaled x axis)."""
    import matplotlib  # optional heavy dependency: only for the figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shots = result.settings["shots"]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for i, (h, per) in enumerate(result.heads.items()):
        mean = np.array([per[str(k)]["mean"] for k in shots]) * 100
        lo = [per[str(k)]["ci95"][0] for k in shots]
        hi = [per[str(k)]["ci95"][1] for k in shots]
        has_ci = all(v is not None for v in lo + hi)
        if len(shots) == 1:  # one shot count: points side by side with CI whiskers (a band needs two)
            x = [shots[0] * (1 + 0.04 * (i - (len(result.heads) - 1) / 2))]
            err = [[mean[0] - lo[0] * 100], [hi[0] * 100 - mean[0]]] if has_ci else None
            ax.errorbar(x, mean, yerr=err, marker="o", capsize=4, linestyle="none", label=h)
            continue
        ax.plot(shots, mean, marker="o", label=h)
        if has_ci:
            ax.fill_between(shots, np.array(lo) * 100, np.array(hi) * 100, alpha=0.2)
    if len(shots) > 1:
        ax.set_xscale("log")
    ax.set_xticks(shots)
    ax.set_xticklabels([str(k) for k in shots])
    ax.minorticks_off()
    ax.set_xlabel("training images per class (shots)")
    ax.set_ylabel("accuracy on the evaluation split (%)")
    n_seeds = len(result.settings["seeds"])
    what = "whiskers" if len(shots) == 1 else "band"
    ax.set_title(f"{title}\nfew-shot accuracy, mean of {n_seeds} seed(s), {what} = 95% CI".lstrip(), fontsize=9)
    ax.grid(True, alpha=0.3)
    if len(shots) == 1:  # the points spread across the plot: the legend goes below it
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=min(3, len(result.heads)), fontsize=8)
    else:
        ax.legend(loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())
