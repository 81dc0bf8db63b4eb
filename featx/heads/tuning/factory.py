"""``create_head``: the one factory of heads, the right implementation for the device, the problem size and
the solver.

scikit-learn (:class:`~featx.heads.tuning.cv.HeadSearch`), the warm-started C path on the CPU
(:class:`~featx.heads.estimators.linear_path.PathLinearHead`) or the batched torch heads (CUDA, or the
CPU where they measured faster) all choose hyperparameters by CV on the same folds
(:func:`featx.heads.tuning.cv.cv_splits`); with ``solver="stream"`` the streamed heads
(:mod:`featx.heads.stream`) choose on held-out rows or the same folds.  The few-shot heads
(:mod:`featx.heads.estimators.fewshot`) use the same pipelines (:func:`head_pipeline`).
"""

from __future__ import annotations

import difflib
import logging
import os
import sys
from typing import Any

from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer, StandardScaler

from ...base.errors import FeatxError
from ...base.runtime import resolve_device
from ..estimators.dino_knn import DinoKNNClassifier
from ..estimators.linear_path import PathLinearHead
from ..estimators.torch_heads import create_torch_head
from ..stream.knn import StreamingKNN
from ..stream.linear_head import StreamingLinearHead
from .cv import SCORERS, AdaptiveStratifiedKFold, HeadSearch
from .grids import HEAD_NAMES, KERNELS, LINEAR_HEADS, expand_values, resolve_grids, validate_heads_section

log = logging.getLogger(__name__)

# Measured on a 2-core x86 CPU (benchmarks/heads.md): the C path beats scikit-learn's grid for
# logreg and the linear SVM at every size measured (flowers12 720 x 1,280 x 12 classes: SVM 689 s
# -> 2.6 s CPU; 10,000 x 1,280 x 100), so it is used whenever the scoring allows it.  The kNN
# search in torch computes each fold's neighbours once for every k, where scikit-learn recomputes
# them per candidate (flowers12: 0.6 s + 2 s to import torch, against 4.8 s; 3,000 rows: 1.8 s
# against 22 s): it wins once that outweighs importing torch, above about this many
# (training rows)^2 x features (~500 rows of 1,280 features).
TORCH_KNN_MIN_WORK = 3e8


def check_head_name(name: str) -> str:
    """``name`` if it is a head, else a FeatxError with the closest name."""
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


def wants_cuda(device: str) -> bool:
    """Whether ``device`` means a CUDA GPU here (``auto`` checks for a driver before importing torch)."""
    d = (device or "cpu").lower()
    if d == "cpu":
        return False
    if d == "auto" and "torch" not in sys.modules and sys.platform.startswith("linux"):
        # Importing torch only to learn there is no GPU costs seconds; no NVIDIA driver, no CUDA.
        if not (os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidiactl")):
            return False
    return resolve_device(d).startswith("cuda")


def cpu_implementation(name: str, kernel: str, scoring: str, problem: tuple[int, int, int] | None) -> str:
    """"path", "torch" or "sklearn": the faster CPU search for ``problem`` (rows, features, classes).

    Without ``problem`` (sizes unknown) the scikit-learn search is used, as before.
    """
    if problem is None or scoring not in SCORERS:
        return "sklearn"
    rows, features, _ = problem
    if name in LINEAR_HEADS and kernel == "linear":
        return "path"
    if name == "knn" and float(rows) * rows * features >= TORCH_KNN_MIN_WORK:
        return "torch"
    return "sklearn"


def head_pipeline(name: str, kernel: str = "linear", max_iter: int = 2000, seed: int = 0) -> Pipeline:
    """The unfitted scikit-learn pipeline of head ``name`` (scaling + estimator), without its search."""
    if name == "logreg":
        from sklearn.linear_model import LogisticRegression

        # lbfgs fits the multinomial (softmax) model for more than two classes.
        return Pipeline([("scale", StandardScaler()), ("clf", LogisticRegression(max_iter=max_iter))])
    if name == "svm" and kernel == "linear":
        from sklearn.svm import LinearSVC

        return Pipeline([("scale", StandardScaler()), ("clf", LinearSVC(max_iter=max_iter, random_state=seed))])
    if name == "svm":
        from sklearn.svm import SVC

        return Pipeline(
            [("scale", StandardScaler()), ("norm", Normalizer()), ("clf", SVC(kernel="rbf", random_state=seed))]
        )
    if name == "knn_dino":
        return Pipeline([("clf", DinoKNNClassifier())])
    # knn: cosine on L2-normalised features
    return Pipeline([("norm", Normalizer()), ("clf", KNeighborsClassifier(algorithm="brute"))])


def create_head(
    name: str,
    *,
    kernel: str = "linear",
    grid: dict | None = None,
    folds: int = 5,
    seed: int = 0,
    n_jobs: int | None = -1,
    device: str = "cpu",
    problem: tuple[int, int, int] | None = None,
    **search: Any,
):
    """An unfitted head: hyperparameter search by stratified CV over scaling + estimator.

    ``grid`` maps parameter -> values (lists or ``{"logspace": [a, b, n]}``) for this head and
    replaces its default grid parameter by parameter.  On CUDA (``device`` "cuda" or "auto" with
    a GPU) the torch implementation is used when present.  On the CPU, ``problem`` = (training
    rows, features, classes) lets :func:`cpu_implementation` pick the faster search.  ``search``:
    ``scoring`` and ``max_iter`` (default: the ``heads:`` config), ``probability`` (default True:
    heads without ``predict_proba`` get out-of-fold calibrated probabilities), ``solver`` ("memory", the
    default, or "stream": the heads trained on rows read block by block, :func:`stream_head`) and
    ``epochs`` (passes of a streamed linear head; None: its default).
    """
    unknown = sorted(set(search) - {"scoring", "max_iter", "probability", "solver", "epochs"})
    if unknown:
        raise TypeError(f"create_head() got unexpected keyword argument(s) {', '.join(unknown)}")
    scoring, max_iter, probability = search.get("scoring"), search.get("max_iter"), search.get("probability", True)
    check_head_name(name)
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
    solver = search.get("solver", "memory")
    if solver == "stream":
        return stream_head(name, kernel=kernel, grid=g, folds=folds, seed=seed, device=device, scoring=scoring,
                           epochs=search.get("epochs"))
    if solver != "memory":
        raise FeatxError(f"create_head(solver={solver!r}): expected memory or stream (the probe resolves auto)")
    impl = "cuda" if wants_cuda(device) else cpu_implementation(name, kernel, scoring, problem)
    if impl in ("cuda", "torch"):
        try:
            return create_torch_head(name, grid=g, folds=folds, seed=seed, device=device if impl == "cuda" else "cpu",
                                     kernel=kernel, scoring=scoring)
        except NotImplementedError as exc:
            log.warning("no GPU implementation of head %r (%s); using scikit-learn on the CPU", name, exc)
    if impl == "path" and set(g) == {"C"}:
        return PathLinearHead(loss="logistic" if name == "logreg" else "squared_hinge", Cs=tuple(g["C"]), folds=folds,
                              seed=seed, scoring=scoring, probability=probability, max_iter=max_iter,
                              n_jobs=n_jobs)
    param_grid = {f"clf__{p}": list(v) for p, v in g.items()}
    return HeadSearch(
        head_pipeline(name, kernel, max_iter, seed), param_grid, scoring=scoring, n_jobs=n_jobs,
        cv=folds if hasattr(folds, "split") else AdaptiveStratifiedKFold(folds, random_state=seed),
        probability=probability,
    )


def stream_head(name: str, *, kernel: str, grid: dict, folds: int, seed: int, device: str, scoring: str,
                epochs: int | None = None) -> StreamingLinearHead | StreamingKNN:
    """The streamed head for ``name`` (logreg, the linear SVM, or kNN); other heads are refused with the fix.

    ``grid``: the head's resolved grid; ``epochs``: passes over the rows of a linear head (None: its default)."""
    if name == "knn":
        return StreamingKNN(grid=grid, folds=folds, seed=seed, scoring=scoring)
    if name not in LINEAR_HEADS or kernel != "linear" or set(grid) != {"C"}:
        raise FeatxError(f"--solver stream trains logreg, the linear SVM and knn; head {name!r} (kernel {kernel}) needs "
                         "the in-memory solver: use --solver memory with --max-train-rows N")
    return StreamingLinearHead(loss="logistic" if name == "logreg" else "squared_hinge", Cs=tuple(grid["C"]),
                               folds=folds, seed=seed, scoring=scoring, device=device,
                               **({} if epochs is None else {"epochs": epochs}))
