"""Few-shot estimators: the heads, the nested draws and the t intervals of accuracy with k training images per class.

Why: "how many labelled images do I need?" is the first question of a new user, and the
CLIP_benchmark / DINOv2 protocol answers it: for each shot count k and seed, draw k training
images per class, choose hyperparameters by CV *within the draw* (never on the evaluation
split), evaluate on the full evaluation split, and report mean, 95% CI and per-seed values.

Draws are nested: for one seed, each class's training rows are shuffled once and the first k
are taken, so the 5-shot set of seed 3 contains its 2-shot set and curves are smoother than
with independent draws.  At 1 shot no CV is possible (a fold would hold out a whole class), so
each head falls back to fixed defaults, recorded in the result's notes.  The run itself (reading the
cache, every draw, the files) is :mod:`featx.runs.fewshot`.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer, StandardScaler

from ...base.errors import FeatxError
from ..tuning.factory import head_pipeline
from .dino_knn import DINO_KNN_GRID

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
    """The unfitted pipeline of a few-shot head: the probe's (:func:`featx.heads.tuning.factory.head_pipeline`),
    kNN on cosine distance (the probe's grid names the metric; the few-shot grid does not)."""
    if name not in FEWSHOT_HEADS:
        raise FeatxError(f"--head {name!r}: few-shot heads are {', '.join(FEWSHOT_HEADS)}")
    pipe = head_pipeline(name, max_iter=max_iter)
    return pipe.set_params(clf__metric="cosine") if name == "knn" else pipe


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
