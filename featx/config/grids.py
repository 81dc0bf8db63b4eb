"""The ``heads:`` config section: which grid keys and parameters exist, and the check of their values.

It lives in config, beside the typed defaults (``DEFAULT_GRIDS``), so that reading any config file checks
it without importing the heads (scikit-learn); :mod:`featx.heads.tuning.grids` resolves the grids from it.
"""

from __future__ import annotations

import difflib
from typing import Any

from ..base.errors import FeatxError

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
        import numpy as np  # keeps `featx --help` fast

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
    """Validator for the free-form ``heads:`` config section (the ``heads`` entry of featx.config.loader.EXTRA_SECTIONS)."""
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
