"""Hyperparameter grids of the heads: defaults, YAML overrides, validation."""

from __future__ import annotations

import copy
import difflib
from typing import Any

import numpy as np

from ..base.errors import FeatxError
from ..config import DEFAULT_GRIDS, DEFAULT_SCALARS, EXTRA_SECTIONS, load_config, section

HEAD_NAMES = ("logreg", "svm", "knn", "knn_dino")
# What ``--head all`` trains (knn_dino is asked for by name: on full training sets it scores like knn).
ALL_HEADS = ("logreg", "svm", "knn")
KERNELS = ("linear", "rbf")
# Feature-matrix cells below which the search runs in-process with one BLAS thread per fit
# (e.g. 3,000 images x 1,280 features); larger problems use n_jobs worker processes.
SMALL_PROBLEM = 4_000_000

# Grid keys: the head name, or "svm_rbf" for ``svm`` with ``kernel="rbf"``.  The defaults are typed in
# featx.config.settings (DEFAULT_GRIDS); the ``heads:`` config section overrides them.
GRID_PARAMS = {
    "logreg": {"C"},
    "svm": {"C"},
    "svm_rbf": {"C", "gamma"},
    "knn": {"n_neighbors", "weights", "metric"},
    "knn_dino": {"n_neighbors", "temperature"},
}
SCALAR_KEYS = {"scoring": str, "max_iter": int}



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
        if param == "temperature" and not (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0):
            raise FeatxError(f"{where}: temperature values must be positive numbers, got {v!r}")
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


EXTRA_SECTIONS["heads"] = validate_heads_section
