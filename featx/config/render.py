"""Settings as a commented YAML file: ``configs/default.yaml`` and ``featx config --yaml``."""

from __future__ import annotations

import dataclasses
from typing import Any

import yaml

from .settings import SETTINGS

HEADER = """\
# featx defaults, rendered from featx/config/settings.py by `featx config --yaml`: do not edit
# (tests/test_config.py keeps the two equal). To change a setting, copy its section and key into
# your own file and run `featx --config my.yaml COMMAND`; command-line options override both.
# Ready-made files to copy: configs/cpu-quick.yaml, configs/gpu-large.yaml.
"""
_COMMENT_COLUMN = 34  # comments start here unless the line is longer


def format_value(value: Any) -> str:
    """One value in YAML flow style (``null``, ``0.003``, ``{logspace: [-5, 3, 17]}``)."""
    if isinstance(value, (dict, list, tuple)):
        return yaml.safe_dump(value, default_flow_style=True, width=10**6, sort_keys=False).strip()
    return yaml.safe_dump([value], default_flow_style=True, width=10**6).strip()[1:-1]


def _lines(cls: type, values: dict[str, Any]) -> list[tuple[str, str]]:
    """(text, comment) per line of one section, in the dataclass's field order."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    out = []
    for key in [k for k in known if k in values] + [k for k in values if k not in known]:
        value = values[key]
        help_text = known[key].metadata.get("help", "") if key in known else ""
        if isinstance(value, dict) and value:  # a grid: one line per parameter
            out.append((f"  {key}:", help_text))
            out += [(f"    {p}: {format_value(v)}", "") for p, v in value.items()]
        else:
            out.append((f"  {key}: {format_value(value)}", help_text))
    return out


def render_yaml(values: dict[str, dict[str, Any]], header: str = HEADER) -> str:
    """A config file holding ``values`` (sections in pipeline order), commented with the help texts."""
    text = [header.rstrip("\n")] if header else []
    names = [n for n in SETTINGS if n in values] + [n for n in values if n not in SETTINGS]
    for name in names:
        cls = SETTINGS.get(name)
        text += ["", f"# {cls.describe()}" if cls else f"# {name}", f"{name}:"]
        if cls is not None:
            lines = _lines(cls, values[name])
        else:  # a free-form section registered in EXTRA_SECTIONS
            lines = [(f"  {k}: {format_value(v)}", "") for k, v in values[name].items()]
        for body, comment in lines:
            text.append(f"{body.ljust(_COMMENT_COLUMN - 1)} # {comment}" if comment else body)
    return "\n".join(text).lstrip("\n") + "\n"


def format_entries(entries: list, config_path: str | None) -> str:
    """``featx config``'s table: one line per setting with its value and its source."""
    head = "config file: " + (config_path or "none (built-in defaults; --config FILE to override)")
    rows = [(e.name, format_value(e.value), e.source) for e in entries]
    w_name = max((len(r[0]) for r in rows), default=0) + 2
    w_value = min(max((len(r[1]) for r in rows), default=0), 40) + 2
    return "\n".join([head, ""] + [f"{n.ljust(w_name)}{v.ljust(w_value)}{s}" for n, v, s in rows])
