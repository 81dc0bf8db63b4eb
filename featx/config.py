"""Defaults from ``configs/default.yaml``, overridable by ``--config FILE`` and CLI options.

The file has one section per command (``embed``, ``probe``, ``compare``, ...) whose keys are
that command's option names (``batch_size`` for ``--batch-size``), plus free-form sections
registered by library modules (e.g. ``heads`` for the hyper-parameter grids). Unknown keys
are an error, so a typo never silently does nothing.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Callable

import yaml

from .base.errors import FeatxError

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"

# Sections that are not command options: name -> validator(section_dict, source) raising FeatxError.
EXTRA_SECTIONS: dict[str, Callable[[dict, str], None]] = {}


def _read(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise FeatxError(f"--config {str(path)!r}: cannot read it ({exc.strerror or exc})") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise FeatxError(f"--config {str(path)!r}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise FeatxError(f"--config {str(path)!r}: expected a mapping of sections (embed:, probe:, ...)")
    for k, v in data.items():
        if not isinstance(v, dict):
            raise FeatxError(f"--config {str(path)!r}: section {k!r} must be a mapping, got {type(v).__name__}")
    return data


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(path: str | os.PathLike | None = None) -> dict[str, dict[str, Any]]:
    """The default config merged with ``path`` (if given)."""
    cfg = _read(DEFAULT_CONFIG) if DEFAULT_CONFIG.is_file() else {}
    if path is not None:
        user = _read(Path(path))
        cfg = _merge(cfg, user)
        cfg["_source"] = {"path": str(path)}
    return cfg


def section(cfg: dict, name: str) -> dict:
    """One section (a copy), or an empty dict."""
    return copy.deepcopy(cfg.get(name) or {})
