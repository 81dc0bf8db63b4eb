"""Lazy re-exports for package ``__init__`` files: ``import featx.heads.tuning.grids`` must not import torch."""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, names: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that imports ``package + "." + names[attr]`` on first use."""

    def __getattr__(attr: str) -> Any:
        if attr in names:
            return getattr(importlib.import_module(f"{package}.{names[attr]}"), attr)
        raise AttributeError(f"module {package!r} has no attribute {attr!r}")

    return __getattr__
