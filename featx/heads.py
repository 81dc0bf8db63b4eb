"""scikit-learn heads on cached features: logistic regression, SVM and kNN, tuned by CV.

``create_head(name)`` returns an unfitted :class:`HeadSearch` — a ``GridSearchCV`` over a
``Pipeline`` (scaling/normalisation + estimator) whose folds adapt to the smallest class, so a
class with 3 images means 3-fold CV with a logged note instead of a crash.  ``probe(cache)``
trains heads on a cache's training rows, evaluates on its ``val``/``test`` split (or a seeded
stratified hold-out from :func:`featx.data.train_eval_split`), writes ``metrics.json``, a
Markdown table, confusion matrices and the fitted heads (joblib + JSON sidecar with sha256).
``load_head`` verifies the checksum before unpickling; ``check_head_compatible`` refuses a
head trained on another backbone or preprocessing.  ``predict`` applies a saved head to image
files (embedding them with the head's backbone through :func:`featx.embed.embed`'s cache).

Hyperparameters are only ever chosen by cross-validation on the training rows.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import difflib
import json
import logging
import math
import os
import platform
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from . import __version__
from .config import EXTRA_SECTIONS
from .errors import FeatxError

log = logging.getLogger(__name__)

HEAD_NAMES = ("logreg", "svm", "knn")
KERNELS = ("linear", "rbf")
SIDECAR_FORMAT = "featx-head/1"
# Feature-matrix cells below which the search runs in-process with one BLAS thread per fit
# (e.g. 3,000 images x 1,280 features); larger problems use n_jobs worker processes.
SMALL_PROBLEM = 4_000_000

# Grid keys: the head name, or "svm_rbf" for ``svm`` with ``kernel="rbf"``.  A value is a
# list, or ``{"logspace": [start, stop, num]}`` (powers of ten).  Mirrored in the ``heads:``
# section of configs/default.yaml, which overrides these.
DEFAULT_GRIDS: dict[str, dict[str, Any]] = {
    # The best C on real CNN features is often 1e-3 or below: the grid is wide on purpose.
    "logreg": {"C": {"logspace": [-5, 3, 17]}},
    "svm": {"C": {"logspace": [-6, 2, 17]}},
    # Features are standardised then L2-normalised, so gamma ~ 1 is "one typical distance"
    # whatever the feature dimension.
    "svm_rbf": {"C": {"logspace": [-1, 3, 5]}, "gamma": {"logspace": [-2, 1, 7]}},
    "knn": {"n_neighbors": [1, 3, 5, 7, 9, 15, 21, 31], "weights": ["uniform", "distance"], "metric": ["cosine"]},
}
GRID_PARAMS = {
    "logreg": {"C"},
    "svm": {"C"},
    "svm_rbf": {"C", "gamma"},
    "knn": {"n_neighbors", "weights", "metric"},
}
SCALAR_KEYS = {"scoring": str, "max_iter": int}
DEFAULT_SCALARS = {"scoring": "accuracy", "max_iter": 2000}


# --------------------------------------------------------------------------- grids / config


def expand_values(spec: Any, *, where: str = "grid") -> list:
    """A grid entry as a plain list: lists pass through, ``{"logspace": [a, b, n]}`` expands."""
    if isinstance(spec, dict):
        if set(spec) != {"logspace"}:
            raise FeatxError(f"{where}: expected a list or {{logspace: [start, stop, num]}}, got {spec!r}")
        ls = spec["logspace"]
        if not (isinstance(ls, (list, tuple)) and len(ls) == 3 and all(isinstance(v, (int, float)) for v in ls)):
            raise FeatxError(f"{where}: logspace needs [start, stop, num] (powers of ten), got {ls!r}")
        if int(ls[2]) < 1:
            raise FeatxError(f"{where}: logspace num must be >= 1, got {ls[2]}")
        return [float(v) for v in np.logspace(float(ls[0]), float(ls[1]), int(ls[2]))]
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise FeatxError(f"{where}: the list of values is empty")
        return list(spec)
    return [spec]


def _check_param_values(head: str, param: str, values: list, where: str) -> None:
    for v in values:
        if param in ("C",) and not (isinstance(v, (int, float)) and v > 0):
            raise FeatxError(f"{where}: {param} values must be positive numbers, got {v!r}")
        if param == "gamma" and not ((isinstance(v, (int, float)) and v > 0) or v in ("scale", "auto")):
            raise FeatxError(f"{where}: gamma values must be positive numbers (or 'scale'/'auto'), got {v!r}")
        if param == "n_neighbors" and not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            raise FeatxError(f"{where}: n_neighbors values must be integers >= 1, got {v!r}")
        if param == "weights" and v not in ("uniform", "distance"):
            raise FeatxError(f"{where}: weights values must be 'uniform' or 'distance', got {v!r}")
        if param == "metric" and not isinstance(v, str):
            raise FeatxError(f"{where}: metric values must be names such as 'cosine' or 'euclidean', got {v!r}")


def validate_heads_section(section: dict, source: str = "configs/default.yaml") -> None:
    """Validator for the free-form ``heads:`` config section (registered in EXTRA_SECTIONS)."""
    if not isinstance(section, dict):
        raise FeatxError(f"config {source}: section 'heads' must be a mapping")
    for key, val in section.items():
        where = f"config {source}: heads.{key}"
        if key in SCALAR_KEYS:
            if not isinstance(val, SCALAR_KEYS[key]) or isinstance(val, bool):
                raise FeatxError(f"{where}: expected a {SCALAR_KEYS[key].__name__}, got {val!r}")
            continue
        if key not in GRID_PARAMS:
            known = sorted(set(GRID_PARAMS) | set(SCALAR_KEYS))
            hint = difflib.get_close_matches(str(key), known, n=1)
            raise FeatxError(
                f"{where}: unknown key" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                + f"; valid keys: {', '.join(known)}"
            )
        if not isinstance(val, dict):
            raise FeatxError(f"{where}: expected a mapping of parameter -> values, e.g. C: {{logspace: [-4, 4, 17]}}")
        for param, spec in val.items():
            if param not in GRID_PARAMS[key]:
                raise FeatxError(
                    f"{where}.{param}: unknown parameter; {key} searches {', '.join(sorted(GRID_PARAMS[key]))}"
                )
            values = expand_values(spec, where=f"{where}.{param}")
            _check_param_values(key, param, values, f"{where}.{param}")


EXTRA_SECTIONS["heads"] = validate_heads_section


def resolve_grids(grids: dict | None = None) -> dict[str, Any]:
    """Built-in grids, overridden by configs/default.yaml's ``heads:``, overridden by ``grids``.

    Returns ``{"logreg": {"C": [..]}, ..., "scoring": "accuracy", "max_iter": 2000}`` with every
    grid expanded to plain lists.
    """
    from .config import load_config, section

    merged: dict[str, Any] = copy.deepcopy(DEFAULT_GRIDS)
    merged.update(DEFAULT_SCALARS)
    layers = [section(load_config(), "heads")]
    if grids:
        layers.append(grids)
    for layer in layers:
        validate_heads_section(layer, "grids" if layer is grids else "configs/default.yaml")
        for k, v in layer.items():
            if isinstance(v, dict):
                merged[k] = {**merged.get(k, {}), **v}
            else:
                merged[k] = v
    out: dict[str, Any] = {}
    for k, v in merged.items():
        out[k] = {p: expand_values(s, where=f"heads.{k}.{p}") for p, s in v.items()} if isinstance(v, dict) else v
    return out


# --------------------------------------------------------------------------- CV folds


def plan_folds(y: np.ndarray, folds: int) -> dict:
    """How many folds the training labels allow: fewer than asked when a class is small.

    Stratified k-fold needs every class in every fold, so k is capped at the smallest class
    count; with a class of a single image, stratification is impossible and plain shuffled
    k-fold is used.  Never raises for small classes: the returned ``note`` says what happened.
    """
    y = np.asarray(y)
    if folds < 2:
        raise FeatxError(f"--folds must be at least 2, got {folds}")
    classes, counts = np.unique(y, return_counts=True)
    n = len(y)
    if len(classes) < 2:
        raise FeatxError(
            f"the training split has only {len(classes)} class(es); a classifier needs at least 2. "
            "Add images of other classes under train/<class>/"
        )
    smallest = int(counts.min())
    small_name = classes[int(counts.argmin())]
    if smallest >= folds:
        return {"requested": folds, "used": folds, "stratified": True, "note": ""}
    if smallest >= 2:
        note = (
            f"class {small_name!r} has only {smallest} training images, fewer than --folds {folds}: "
            f"using {smallest}-fold stratified cross-validation"
        )
        return {"requested": folds, "used": smallest, "stratified": True, "note": note}
    singles = [str(c) for c, k in zip(classes, counts) if k == 1]
    rest = counts[counts >= 2]
    if len(rest):
        used = int(min(folds, rest.min()))
        note = (
            f"{len(singles)} class(es) have a single training image ({', '.join(singles[:5])}"
            f"{', ...' if len(singles) > 5 else ''}): they stay in every CV training fold and are not scored; "
            f"using {used}-fold stratified cross-validation on the other classes. Add images for trustworthy "
            "hyperparameters"
        )
        return {"requested": folds, "used": used, "stratified": True, "note": note, "singletons_in_train": len(singles)}
    used = max(2, min(folds, n // 2))
    note = (
        "every class has a single training image, so cross-validation cannot score anything meaningful: "
        f"using plain shuffled {used}-fold cross-validation. Add images"
    )
    return {"requested": folds, "used": used, "stratified": False, "note": note}


def cv_splits(y: np.ndarray, folds: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (train, test) row indices of the CV search, exactly as the scikit-learn heads use them.

    For other implementations of the same search (e.g. :mod:`featx.torch_heads`), so that both
    score hyperparameters on identical folds.
    """
    _define_search_classes()
    y = np.asarray(y)
    return list(AdaptiveStratifiedKFold(folds, random_state=seed).split(np.zeros(len(y)), y))


def _plain(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    return v


def _define_search_classes() -> None:
    """Define the sklearn-based classes on first use, so that importing this module (which the
    CLI does to validate the ``heads:`` config section) does not import scikit-learn."""
    global AdaptiveStratifiedKFold, HeadSearch
    if "HeadSearch" in globals():
        return
    from sklearn.base import clone
    from sklearn.model_selection import BaseCrossValidator, GridSearchCV, KFold, ParameterGrid, StratifiedKFold
    from sklearn.utils.metaestimators import available_if

    class AdaptiveStratifiedKFold(BaseCrossValidator):
        """Shuffled stratified k-fold that lowers k to what the smallest class allows (see plan_folds)."""

        def __init__(self, n_splits: int = 5, *, random_state: int | None = 0) -> None:
            self.n_splits = n_splits
            self.random_state = random_state

        def _splitter(self, y):
            plan = plan_folds(y, self.n_splits)
            cls = StratifiedKFold if plan["stratified"] else KFold
            return cls(plan["used"], shuffle=True, random_state=self.random_state)

        def get_n_splits(self, X=None, y=None, groups=None) -> int:
            if y is None:
                return self.n_splits
            return self._splitter(y).get_n_splits(X, y, groups)

        def split(self, X, y=None, groups=None):
            if y is None:
                raise ValueError("AdaptiveStratifiedKFold needs y")
            y = np.asarray(y)
            plan = plan_folds(y, self.n_splits)
            if plan.get("singletons_in_train"):
                # Classes with one image are in every training fold (so every fit sees all classes)
                # and in no test fold; the other classes are split stratified.
                cls, cnt = np.unique(y, return_counts=True)
                single = np.isin(y, cls[cnt == 1])
                rest, always = np.flatnonzero(~single), np.flatnonzero(single)
                skf = StratifiedKFold(plan["used"], shuffle=True, random_state=self.random_state)
                for tr, te in skf.split(rest, y[rest]):
                    yield np.sort(np.concatenate([rest[tr], always])), rest[te]
                return
            yield from self._splitter(y).split(X, y, groups)

        def _iter_test_indices(self, X=None, y=None, groups=None):  # pragma: no cover - split is overridden
            raise NotImplementedError

    # ------------------------------------------------------------------ the search estimator


    def _best_has(attr: str):
        def check(self) -> bool:
            if attr == "predict_proba" and getattr(self, "probability", False):
                return True
            if hasattr(self, "best_estimator_"):
                return hasattr(self.best_estimator_, attr)
            return hasattr(self.estimator, attr)

        return check

    class HeadSearch(GridSearchCV):
        """``GridSearchCV`` with adaptive folds, kNN grids capped to the fold size, and probabilities.

        ``probability=True`` makes ``predict_proba`` available for estimators without one (SVMs):
        a sigmoid calibration fitted on out-of-fold decision values (``CalibratedClassifierCV``
        with ``ensemble=False``), while ``predict`` stays the SVM's own decision.  After ``fit``:
        ``params_`` (chosen hyperparameters, without pipeline prefixes), ``best_score_``,
        ``cv_plan_`` (folds asked/used and why), ``n_candidates_``.
        """

        def __init__(
            self,
            estimator,
            param_grid,
            *,
            scoring=None,
            n_jobs=None,
            refit=True,
            cv=None,
            verbose=0,
            pre_dispatch="2*n_jobs",
            error_score=np.nan,
            return_train_score=False,
            probability=False,
        ) -> None:
            super().__init__(
                estimator, param_grid, scoring=scoring, n_jobs=n_jobs, refit=refit, cv=cv, verbose=verbose,
                pre_dispatch=pre_dispatch, error_score=error_score, return_train_score=return_train_score,
            )
            self.probability = probability

        def fit(self, X, y=None, **params):
            y_arr = np.asarray(y)
            folds = getattr(self.cv, "n_splits", 5) if not isinstance(self.cv, int) else self.cv
            plan = plan_folds(y_arr, int(folds))
            self.cv_plan_ = plan
            # kNN: k may not exceed the number of training rows in a CV fold.
            n = len(y_arr)
            self._max_train_rows = n - int(math.ceil(n / plan["used"]))
            # Small problems: one BLAS thread per fit. Multi-threaded BLAS on a few hundred rows
            # is slower, and 10-20x slower when other processes compete for the cores.
            from threadpoolctl import threadpool_limits

            from joblib import parallel_config

            small = np.asarray(X).size < SMALL_PROBLEM
            # ...and no worker processes: starting them costs seconds, the whole search less.
            backend = parallel_config(backend="sequential") if small else contextlib.nullcontext()
            self.parallel_ = "sequential (small problem)" if small else f"n_jobs={self.n_jobs}"
            with warnings.catch_warnings(), threadpool_limits(1 if small else None), backend:
                warnings.filterwarnings("ignore", message=".*[Cc]onverge.*")
                super().fit(X, y, **params)
                self.calibrator_ = None
                if self.probability and not hasattr(self.best_estimator_, "predict_proba"):
                    self.calibrator_ = self._fit_calibrator(X, y_arr)
            return self

        def _fit_calibrator(self, X, y):
            from sklearn.calibration import CalibratedClassifierCV

            cal = CalibratedClassifierCV(
                clone(self.estimator).set_params(**self.best_params_), method="sigmoid", cv=self.cv,
                ensemble=False, n_jobs=self.n_jobs,
            )
            try:
                return cal.fit(X, y)
            except ValueError as exc:  # e.g. a training fold missing a class
                log.warning("could not calibrate probabilities by cross-validation (%s); using a softmax of the scores", exc)
                return None

        def _run_search(self, evaluate_candidates) -> None:
            cands = list(ParameterGrid(self.param_grid))
            limit = getattr(self, "_max_train_rows", None)
            if limit:
                keep = [c for c in cands if all(v <= limit for k, v in c.items() if k.endswith("n_neighbors"))]
                if len(keep) < len(cands):
                    log.info("kNN: dropping k > %d (the rows in one CV training fold) from the grid", limit)
                cands = keep or [{k: (1 if k.endswith("n_neighbors") else v) for k, v in cands[0].items()}]
            self.n_candidates_ = len(cands)
            evaluate_candidates(cands)

        @available_if(_best_has("predict_proba"))
        def predict_proba(self, X):
            if getattr(self, "calibrator_", None) is not None:
                return self.calibrator_.predict_proba(X)
            if hasattr(self.best_estimator_, "predict_proba"):
                return self.best_estimator_.predict_proba(X)
            d = np.asarray(self.best_estimator_.decision_function(X), dtype=np.float64)
            if d.ndim == 1:
                d = np.stack([-d, d], axis=1)
            d = d - d.max(axis=1, keepdims=True)
            e = np.exp(d)
            return e / e.sum(axis=1, keepdims=True)

        @property
        def params_(self) -> dict:
            """The chosen hyperparameters, e.g. ``{"C": 0.003}``."""
            return {k.split("__")[-1]: _plain(v) for k, v in self.best_params_.items()}

    for cls in (AdaptiveStratifiedKFold, HeadSearch):
        cls.__qualname__ = cls.__name__  # picklable as featx.heads.<name>
        cls.__module__ = __name__


def __getattr__(name: str):
    if name in ("AdaptiveStratifiedKFold", "HeadSearch"):
        _define_search_classes()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------- factory


def _check_name(name: str) -> str:
    if name not in HEAD_NAMES:
        close = difflib.get_close_matches(str(name), HEAD_NAMES, n=1)
        raise FeatxError(
            f"unknown head {name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
            + f"; choose --head {', '.join(HEAD_NAMES)} or all"
        )
    return name


def grid_key(name: str, kernel: str = "linear") -> str:
    """Key of a head's grid in ``heads:``: the name, or ``svm_rbf`` for the RBF SVM."""
    return "svm_rbf" if name == "svm" and kernel == "rbf" else name


def _wants_cuda(device: str) -> bool:
    d = (device or "cpu").lower()
    if d == "cpu":
        return False
    if d == "auto" and "torch" not in sys.modules and sys.platform.startswith("linux"):
        # Importing torch only to learn there is no GPU costs seconds; no NVIDIA driver, no CUDA.
        if not (os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidiactl")):
            return False
    from .embed import resolve_device

    return resolve_device(d).startswith("cuda")


def create_head(
    name: str,
    *,
    kernel: str = "linear",
    grid: dict | None = None,
    folds: int = 5,
    seed: int = 0,
    n_jobs: int | None = -1,
    device: str = "cpu",
    scoring: str | None = None,
    max_iter: int | None = None,
    probability: bool = True,
):
    """An unfitted head: hyperparameter search by stratified CV over scaling + estimator.

    ``grid`` maps parameter -> values (lists or ``{"logspace": [a, b, n]}``) for this head and
    replaces its default grid parameter by parameter.  On CUDA (``device`` "cuda" or "auto" with
    a GPU) the torch implementation from :mod:`featx.torch_heads` is used when present.
    """
    _check_name(name)
    if kernel not in KERNELS:
        raise FeatxError(f"--kernel {kernel!r}: expected one of {', '.join(KERNELS)}")
    key = grid_key(name, kernel)
    resolved = resolve_grids()
    g = dict(resolved[key])
    if grid:
        validate_heads_section({key: grid}, "grid")
        g.update({p: expand_values(v, where=f"grid.{p}") for p, v in grid.items()})
    scoring = scoring or resolved["scoring"]
    max_iter = int(max_iter or resolved["max_iter"])

    if _wants_cuda(device):
        try:
            from .torch_heads import create_torch_head
        except ImportError as exc:
            log.warning("GPU heads are not available (%s); training the %s head with scikit-learn on the CPU", exc, name)
        else:
            try:
                return create_torch_head(name, grid=g, folds=folds, seed=seed, device=device, kernel=kernel)
            except NotImplementedError as exc:
                log.warning("no GPU implementation of head %r (%s); using scikit-learn on the CPU", name, exc)

    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import Normalizer, StandardScaler

    if name == "logreg":
        from sklearn.linear_model import LogisticRegression

        # lbfgs fits the multinomial (softmax) model for more than two classes.
        pipe = Pipeline([("scale", StandardScaler()), ("clf", LogisticRegression(max_iter=max_iter))])
    elif name == "svm" and kernel == "linear":
        from sklearn.svm import LinearSVC

        pipe = Pipeline([("scale", StandardScaler()), ("clf", LinearSVC(max_iter=max_iter, random_state=seed))])
    elif name == "svm":
        from sklearn.svm import SVC

        pipe = Pipeline(
            [("scale", StandardScaler()), ("norm", Normalizer()), ("clf", SVC(kernel="rbf", random_state=seed))]
        )
    else:  # knn: cosine on L2-normalised features
        pipe = Pipeline([("norm", Normalizer()), ("clf", KNeighborsClassifier(algorithm="brute"))])
    param_grid = {f"clf__{p}": list(v) for p, v in g.items()}
    _define_search_classes()
    return HeadSearch(
        pipe, param_grid, scoring=scoring, n_jobs=n_jobs, cv=AdaptiveStratifiedKFold(folds, random_state=seed),
        probability=probability,
    )


# --------------------------------------------------------------------------- save / load


def _sha256(path: str | os.PathLike) -> str:
    from .cache import sha256_file  # lazy: h5py is not needed to import featx.heads

    return sha256_file(path)


def sidecar_path(path: str | os.PathLike) -> Path:
    return Path(path).with_suffix(".json")


def save_head(estimator, path: str | os.PathLike, *, sidecar: dict) -> Path:
    """Write ``path`` (joblib) and its JSON sidecar (with the file's sha256); returns ``path``."""
    import joblib
    import sklearn

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    joblib.dump(estimator, tmp)
    os.replace(tmp, path)
    meta = dict(sidecar)
    meta.update(
        format=SIDECAR_FORMAT,
        sha256=_sha256(path),
        model_file=path.name,
        featx_version=__version__,
        sklearn_version=sklearn.__version__,
        joblib_version=joblib.__version__,
        python_version=platform.python_version(),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    from .report import write_json

    write_json(sidecar_path(path), meta)
    return path


def load_head(path: str | os.PathLike) -> tuple[Any, dict]:
    """Load a saved head after checking its sidecar and sha256; returns (estimator, sidecar).

    Heads are pickles: a file whose checksum does not match its sidecar is never unpickled.
    """
    import joblib
    import sklearn

    path = Path(path)
    if path.suffix == ".json":
        path = path.with_suffix(".joblib")
    if not path.is_file():
        raise FeatxError(f"head file {str(path)!r} does not exist; pass a .joblib file written by `featx probe`")
    sc = sidecar_path(path)
    if not sc.is_file():
        raise FeatxError(
            f"head {str(path)!r} has no sidecar {sc.name}; featx refuses to unpickle a head it cannot verify. "
            "Re-create it with `featx probe`"
        )
    try:
        meta = json.loads(sc.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise FeatxError(f"head sidecar {str(sc)!r} is unreadable ({exc}); re-create the head with `featx probe`") from None
    if not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT or "sha256" not in meta:
        raise FeatxError(f"{str(sc)!r} is not a featx head sidecar ({SIDECAR_FORMAT}); re-create the head with `featx probe`")
    digest = _sha256(path)
    if digest != meta["sha256"]:
        raise FeatxError(
            f"head {str(path)!r} does not match the sha256 in {sc.name} (file {digest[:12]}..., sidecar "
            f"{str(meta['sha256'])[:12]}...): it was modified or damaged, so it was NOT unpickled. "
            "Re-create it with `featx probe`"
        )
    if meta.get("sklearn_version") != sklearn.__version__:
        log.warning(
            "head %s was saved with scikit-learn %s, this is %s; predictions may differ",
            path, meta.get("sklearn_version"), sklearn.__version__,
        )
    est = joblib.load(path)
    return est, meta


FINGERPRINT_KEYS = ("backbone", "weights_sha256", "preprocess")


def check_head_compatible(sidecar: dict, fingerprint: dict, *, dim: int | None = None, what: str = "these features") -> None:
    """Refuse to apply a head to features from another backbone, weights or preprocessing."""
    trained = sidecar.get("fingerprint_dict") or {}
    def show(k: str, v: Any) -> str:
        return repr(v[:12] + "...") if k == "weights_sha256" and isinstance(v, str) else repr(v)

    diffs = [
        f"{k}: head trained on {show(k, trained.get(k))}, {what} has {show(k, fingerprint.get(k))}"
        for k in FINGERPRINT_KEYS
        if trained.get(k) != fingerprint.get(k)
    ]
    if dim is not None and sidecar.get("dim") not in (None, dim):
        diffs.append(f"feature dimension: head expects {sidecar.get('dim')}, {what} has {dim}")
    if diffs:
        raise FeatxError(
            f"head {sidecar.get('model_file', '?')} does not fit {what}: " + "; ".join(diffs)
            + f". Embed the images with --backbone {trained.get('backbone')} (same weights), or train a head on "
            "this cache with `featx probe`"
        )


# --------------------------------------------------------------------------- probe


def _open_cache(cache, cache_dir: str | os.PathLike):
    from .cache import FeatureCache, find_cache

    if isinstance(cache, FeatureCache):
        return cache
    return FeatureCache(find_cache(cache, cache_dir=cache_dir))


def _gather_rows(fc, rows: np.ndarray, splits: np.ndarray) -> np.ndarray:
    """Features of global ``rows``, read one split at a time (never the whole cache at once)."""
    out = np.empty((len(rows), fc.dim), dtype=np.float32)
    for name in fc.splits:
        in_split = np.flatnonzero(splits == name)
        if not len(in_split):
            continue
        start = int(in_split[0])
        mask = (rows >= start) & (rows < start + len(in_split))
        if mask.any():
            out[mask] = fc.features(name)[rows[mask] - start]
    return out


def _heads_list(head: str | Sequence[str]) -> list[str]:
    if isinstance(head, str):
        names = list(HEAD_NAMES) if head == "all" else [h.strip() for h in head.split(",") if h.strip()]
    else:
        names = list(head)
    if not names:
        raise FeatxError("--head: name at least one head (logreg, svm, knn) or all")
    for n in names:
        _check_name(n)
    return list(dict.fromkeys(names))


def _scores(est, X) -> np.ndarray | None:
    if hasattr(est, "predict_proba"):
        return np.asarray(est.predict_proba(X))
    if hasattr(est, "decision_function"):
        d = np.asarray(est.decision_function(X))
        return np.stack([-d, d], axis=1) if d.ndim == 1 else d
    return None


def _grid_edges(params: dict, grid: dict) -> list[str]:
    """Numeric hyperparameters chosen at the smallest or largest value of a grid of 3 or more."""
    out = []
    for k, v in params.items():
        vals = grid.get(k)
        if not vals or len(vals) < 3 or not all(isinstance(x, (int, float)) for x in vals):
            continue
        if not isinstance(v, (int, float)):
            continue
        if v == max(vals) or (v == min(vals) and k != "n_neighbors"):  # k=1 is a natural lower bound
            out.append(f"{k}={v:.3g}")
    return out


def probe(
    cache=None,
    *,
    head: str | Sequence[str] = "svm",
    kernel: str = "linear",
    test_size: float = 0.2,
    folds: int = 5,
    seed: int = 0,
    device: str = "auto",
    n_jobs: int | None = -1,
    out_dir: str | os.PathLike | None = None,
    grids: dict | None = None,
    save: bool = True,
    cache_dir: str | os.PathLike = "cache",
    plots: bool = True,
) -> dict:
    """Train ``head`` ("logreg", "svm", "knn", "all" or a list) on a cache and evaluate it.

    ``cache``: a path, a :class:`FeatureCache`, or None for the newest cache in ``cache_dir``.
    Hyperparameters are chosen by CV on the training rows only; the evaluation rows are the
    cache's val/test split or a seeded stratified hold-out (``test_size``).  Writes
    ``metrics.json``, ``report.md``, ``confusion_<head>.png`` and ``<head>.joblib`` (+ sidecar)
    to ``out_dir`` (default ``runs/probe-<cache stem>/``) and returns the same dict.
    """
    from .data import train_eval_split
    from .report import compute_metrics, markdown_table, plot_confusion, write_json

    names = _heads_list(head)
    if kernel not in KERNELS:
        raise FeatxError(f"--kernel {kernel!r}: expected one of {', '.join(KERNELS)}")
    if folds is None or folds < 2:
        raise FeatxError(f"--folds must be at least 2, got {folds}")
    fc = _open_cache(cache, cache_dir)
    resolved = resolve_grids(grids)
    t_load = time.perf_counter()
    labels = fc.labels()
    splits = fc.split_array()
    tr, ev, split_desc = train_eval_split(labels, splits, test_size=test_size, seed=seed)
    if not len(ev):
        raise FeatxError(
            f"cache {fc.path.name} leaves no rows to evaluate on; add a val/ split or raise --test-size"
        )
    X_tr, y_tr = _gather_rows(fc, tr, splits), labels[tr]
    X_ev, y_ev = _gather_rows(fc, ev, splits), labels[ev]
    load_seconds = time.perf_counter() - t_load
    for what, X_, y_, idx in (("training", X_tr, y_tr, tr), ("evaluation", X_ev, y_ev, ev)):
        bad = ~np.isfinite(X_).all(axis=1)
        if bad.any():
            log.warning(
                "%d %s rows of %s have NaN/inf features and are left out; rebuild the cache with "
                "`featx embed ... --dtype float32 --overwrite`", int(bad.sum()), what, fc.path.name,
            )
            if what == "training":
                X_tr, y_tr, tr = X_[~bad], y_[~bad], idx[~bad]
            else:
                X_ev, y_ev, ev = X_[~bad], y_[~bad], idx[~bad]
    plan = plan_folds(y_tr, folds)
    if plan["note"]:
        log.warning("%s", plan["note"])
    missing = sorted(set(np.unique(y_ev)) - set(np.unique(y_tr)))
    if missing:
        log.warning(
            "classes %s appear in the evaluation split but not in training: no head can predict them",
            [fc.classes[i] for i in missing],
        )
    out = Path(out_dir) if out_dir is not None else Path("runs") / f"probe-{fc.path.stem}"
    out.mkdir(parents=True, exist_ok=True)
    dev = "cpu" if (device or "cpu").lower() == "cpu" else device
    summary = fc.summary()
    split_info = dict(split_desc, n_train=int(len(tr)), n_eval=int(len(ev)))
    settings = {
        "heads": names, "kernel": kernel, "test_size": test_size, "folds": folds, "seed": seed,
        "device": device, "n_jobs": n_jobs, "grids": {grid_key(n, kernel): resolved[grid_key(n, kernel)] for n in names},
        "scoring": resolved["scoring"], "max_iter": resolved["max_iter"],
    }
    result: dict[str, Any] = {
        "featx_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cache": summary,
        "backbone": summary.get("backbone"),
        "fingerprint": fc.fingerprint,
        "split": split_info,
        "cv": plan,
        "settings": settings,
        "load_seconds": load_seconds,
        "heads": {},
    }
    fp_dict = fc.fingerprint_dict
    for name in names:
        est = create_head(
            name, kernel=kernel, grid=resolved[grid_key(name, kernel)], folds=folds, seed=seed, n_jobs=n_jobs,
            device=dev, scoring=resolved["scoring"], max_iter=resolved["max_iter"],
        )
        log.info("fitting %s on %d rows x %d features (%d-fold CV)", name, len(tr), fc.dim, plan["used"])
        t0 = time.perf_counter()
        est.fit(X_tr, y_tr)
        fit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        pred = np.asarray(est.predict(X_ev))
        scores = _scores(est, X_ev)
        pred_s = time.perf_counter() - t0
        est_classes = np.asarray(getattr(est, "classes_", np.unique(y_tr)))
        m = compute_metrics(y_ev, pred, classes=fc.classes, scores=scores, score_labels=est_classes)
        params = getattr(est, "params_", None) or {k.split("__")[-1]: _plain(v) for k, v in getattr(est, "best_params_", {}).items()}
        if name == "svm":
            params = {"kernel": kernel, **params}
        entry: dict[str, Any] = {
            **{k: m[k] for k in ("accuracy", "accuracy_ci95", "balanced_accuracy", "macro_f1") if k in m},
            **({"top5_accuracy": m["top5_accuracy"]} if "top5_accuracy" in m else {}),
            "fit_seconds": fit_s,
            "predict_seconds": pred_s,
            "params": params,
            "cv_score": _plain(getattr(est, "best_score_", float("nan"))),
            "cv_scoring": resolved["scoring"],
            "cv_folds": int(getattr(est, "n_splits_", plan["used"])),
            "n_candidates": int(getattr(est, "n_candidates_", 0) or 0),
            "search": getattr(est, "parallel_", type(est).__name__),
            "probabilities": "calibrated (sigmoid, out-of-fold)" if getattr(est, "calibrator_", None) is not None
            else ("native" if hasattr(est, "predict_proba") else "none"),
            "per_class": m["per_class"],
            "model_path": None,
            "confusion_png": None,
        }
        edges = _grid_edges(params, resolved[grid_key(name, kernel)])
        if edges:
            entry["grid_edge"] = edges
            log.warning(
                "%s: chosen %s at the edge of the searched grid; widen heads.%s in the config to be sure the "
                "optimum is inside it", name, ", ".join(edges), grid_key(name, kernel),
            )
        if "confusion_matrix" in m:
            entry["confusion_matrix"] = m["confusion_matrix"]
        if plots:
            png = out / f"confusion_{name}.png"
            plot_confusion(
                m["confusion_full"], fc.classes, png,
                title=f"{name} on {summary.get('backbone')} features: {split_info['eval_split']} "
                f"(n={len(ev)}, accuracy {m['accuracy']:.3f})",
            )
            entry["confusion_png"] = str(png)
        if save:
            sidecar = {
                "head": name,
                "kernel": kernel if name == "svm" else None,
                "classes": list(fc.classes),
                "estimator_classes": [int(c) for c in est_classes],
                "backbone": summary.get("backbone"),
                "weights_source": summary.get("weights_source"),
                "preprocess": summary.get("preprocess"),
                "fingerprint": fc.fingerprint,
                "fingerprint_dict": fp_dict,
                "dim": fc.dim,
                "params": params,
                "cv_score": entry["cv_score"],
                "eval_accuracy": entry["accuracy"],
                "cache": str(fc.path),
                "n_train": int(len(tr)),
                "split": split_info,
            }
            entry["model_path"] = str(save_head(est, out / f"{name}.joblib", sidecar=sidecar))
        log.info("%s: accuracy %.4f (cv %.4f, %s) in %.1fs", name, entry["accuracy"], entry["cv_score"], params, fit_s)
        result["heads"][name] = entry
    result["seconds"] = time.perf_counter() - t_load
    result["out_dir"] = str(out)
    result["table"] = markdown_table(result)
    (out / "report.md").write_text(result["table"] + "\n", encoding="utf-8")
    result["metrics_path"] = str(out / "metrics.json")
    write_json(out / "metrics.json", result)
    return result


# --------------------------------------------------------------------------- predict


def _collect_inputs(inputs: Iterable[str | os.PathLike]) -> list[tuple[str, str]]:
    """(absolute path, folder class) for every image file given or found below given folders."""
    from .data import is_image_name

    out: list[tuple[str, str]] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            for dirpath, dirnames, filenames in os.walk(p, followlinks=False):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for fn in sorted(filenames):
                    if is_image_name(fn):
                        out.append((os.path.abspath(os.path.join(dirpath, fn)), os.path.basename(dirpath)))
        elif p.exists() or p.is_symlink():
            out.append((os.path.abspath(p), p.parent.name))
        else:
            raise FeatxError(f"{str(p)!r} does not exist; pass image files or folders of images")
    return list(dict.fromkeys(out))


def predict(
    head: str | os.PathLike,
    inputs: Sequence[str | os.PathLike] | str | os.PathLike,
    *,
    out: str | os.PathLike | None = None,
    weights: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike = "cache",
    device: str = "auto",
    batch_size: int = 64,
    num_workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Apply a saved head to images (files/folders) or to a featx cache (.h5); write a CSV.

    Images are embedded with the head's backbone via :func:`featx.embed.embed` into a cache
    under ``cache_dir/predict/`` (so a rerun is instant).  The CSV has ``path``, ``predicted``,
    ``folder`` (the parent folder name) and one ``p_<class>`` column per class.  Images that
    cannot be decoded are listed in the result (``failed``), not fatal.  A head trained on
    another backbone, weights or preprocessing is refused.
    """
    from .cache import FeatureCache
    from .report import write_json

    est, meta = load_head(head)
    classes: list[str] = list(meta.get("classes") or [])
    est_classes = np.asarray(meta.get("estimator_classes") or getattr(est, "classes_", range(len(classes))))
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    inputs = list(inputs)
    if not inputs:
        raise FeatxError("pass image files or folders (or a .h5 cache) to predict on")
    failed: list[tuple[str, str]] = []
    if len(inputs) == 1 and str(inputs[0]).endswith(".h5") and Path(inputs[0]).is_file():
        fc = FeatureCache(inputs[0])
        check_head_compatible(meta, fc.fingerprint_dict, dim=fc.dim, what=f"cache {fc.path.name}")
        X = fc.features()
        paths = fc.paths()
        folder = [fc.classes[i] for i in fc.labels()]
        failed = list(fc.failed)
    else:
        from .extractor import embed_files, resolve_weights

        items = _collect_inputs(inputs)
        if not items:
            raise FeatxError(f"no image files found in {', '.join(map(str, inputs))}")
        w = weights if weights is not None else resolve_weights(meta.get("fingerprint_dict") or {}, meta.get("weights_source"))
        emb = embed_files(
            [p for p, _ in items], backbone=meta["backbone"], weights=w, cache_dir=Path(cache_dir) / "predict",
            device=device, batch_size=batch_size, num_workers=num_workers, progress=progress,
            check=lambda fp, dim: check_head_compatible(meta, fp, dim=dim, what=f"backbone {meta['backbone']} as built here"),
        )
        X = emb["features"]
        ok = emb["ok"]
        paths = [items[i][0] for i in ok]
        folder = [items[i][1] for i in ok]
        failed = emb["failed"]
    t0 = time.perf_counter()
    pred = np.asarray(est.predict(X)) if len(X) else np.zeros(0, dtype=int)
    scores = _scores(est, X) if len(X) else np.zeros((0, len(est_classes)))
    pred_s = time.perf_counter() - t0
    score_kind = "p" if hasattr(est, "predict_proba") else "score"
    names = [classes[int(c)] if classes else str(c) for c in est_classes]
    pred_names = [classes[int(c)] if classes else str(c) for c in pred]
    out_path = Path(out) if out is not None else Path("runs") / f"predict-{Path(head).stem}.csv"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "w", newline="", encoding="utf-8") as fh:
        w_ = csv.writer(fh)
        w_.writerow(["path", "predicted", "folder"] + [f"{score_kind}_{n}" for n in names])
        for i, p in enumerate(paths):
            w_.writerow([p, pred_names[i], folder[i]] + [f"{v:.6g}" for v in scores[i]])
    known = [i for i, f in enumerate(folder) if f in classes]
    acc = float(np.mean([pred_names[i] == folder[i] for i in known])) if known else None
    res = {
        "head": str(head),
        "head_name": meta.get("head"),
        "backbone": meta.get("backbone"),
        "csv": str(out_path),
        "n_images": len(paths),
        "n_failed": len(failed),
        "failed": [{"path": p, "reason": r} for p, r in failed],
        "counts": {n: int(sum(1 for q in pred_names if q == n)) for n in names},
        "n_with_folder_class": len(known),
        "folder_accuracy": acc,
        "predict_seconds": pred_s,
    }
    write_json(out_path.with_suffix(".json"), res)
    return res
