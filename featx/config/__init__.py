"""One typed source for every option: defaults, config files, and where each value came from.

* :mod:`featx.config.settings` — one frozen dataclass per command (``EmbedSettings``, ...) and
  ``HeadsSettings`` for the hyperparameter grids; ``defaults("compare").epochs`` for library code.
* :mod:`featx.config.loader` — ``--config FILE``: read, check (one-line errors), merge, explain.
* :mod:`featx.config.render` — the settings as commented YAML (``configs/default.yaml``).
* :mod:`featx.config.options` — the click options generated from the dataclasses (CLI only).

The defaults live in the package, so an installed wheel behaves like the checkout.
"""

from __future__ import annotations

from .loader import (
    COMMAND_LINE,
    DEFAULT,
    EXTRA_SECTIONS,
    Entry,
    convert_value,
    default_values,
    explain,
    load_config,
    merge,
    nest,
    read_config,
    read_yaml,
    section,
    validate,
)
from .render import HEADER, format_entries, format_value, render_yaml
from .settings import (
    DEFAULT_GRIDS,
    DEFAULT_SCALARS,
    SETTINGS,
    CompareSettings,
    EmbedSettings,
    ExportSettings,
    FewshotSettings,
    HeadsSettings,
    InfoSettings,
    PredictSettings,
    ProbeSettings,
    ReportSettings,
    Settings,
    defaults,
    field_types,
    flag,
    option,
)

__all__ = [
    "COMMAND_LINE", "DEFAULT", "EXTRA_SECTIONS", "Entry", "convert_value", "default_values", "explain",
    "load_config", "merge", "nest", "read_config", "read_yaml", "section", "validate",
    "HEADER", "format_entries", "format_value", "render_yaml",
    "DEFAULT_GRIDS", "DEFAULT_SCALARS", "SETTINGS", "CompareSettings", "ExportSettings", "FewshotSettings",
    "ReportSettings", "EmbedSettings", "HeadsSettings",
    "InfoSettings", "PredictSettings", "ProbeSettings", "Settings", "defaults", "field_types", "flag", "option",
]
