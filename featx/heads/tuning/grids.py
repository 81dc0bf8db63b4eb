"""Hyperparameter grids of the heads: defaults, YAML overrides, validation."""

from __future__ import annotations

import copy
from typing import Any

from ...base.choices import KERNELS  # noqa: F401 - re-exported: the heads' kernels
from ...config import DEFAULT_GRIDS, DEFAULT_SCALARS, load_config, section
from ...config.grids import GRID_PARAMS, SCALAR_KEYS, expand_values, validate_heads_section  # noqa: F401 - re-exported

HEAD_NAMES = ("logreg", "svm", "knn", "knn_dino")
# What ``--head all`` trains (knn_dino is asked for by name: on full training sets it scores like knn).
ALL_HEADS = ("logreg", "svm", "knn")
# The linear heads (the SVM with kernel="linear"): a warm-started C path in memory, or streamed.
LINEAR_HEADS = ("logreg", "svm")
# Feature-matrix cells below which the search runs in-process with one BLAS thread per fit
# (e.g. 3,000 images x 1,280 features); larger problems use n_jobs worker processes.
SMALL_PROBLEM = 4_000_000

def resolve_grids(grids: dict | None = None) -> dict[str, Any]:
    """Built-in grids, overridden by configs/default.yaml's ``heads:``, overridden by ``grids``.

    Returns ``{"logreg": {"C": [..]}, ..., "scoring": "accuracy", "max_iter": 2000}`` with every
    grid expanded to plain lists.
    """

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

