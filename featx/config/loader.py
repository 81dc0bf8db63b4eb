"""Config files: read, check against the typed settings, merge over the built-in defaults, explain.

A file has one section per command (``embed:``, ``probe:``, ...) whose keys are that command's
option names (``batch_size`` for ``--batch-size``), plus ``heads:`` (the hyperparameter grids).
Unknown sections or keys and wrong types are one-line errors naming the file, so a typo never
silently does nothing.  The defaults are the dataclasses of :mod:`featx.config.settings` (inside
the package: an installed wheel behaves like the checkout); no YAML file is read unless given.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Union

import yaml

from ..base.errors import FeatxError
from ..base.files import open_regular
from .grids import validate_heads_section
from .safe_yaml import load_plain, shown
from .settings import SETTINGS, Settings, field_types

# Extra checks of a section: name -> validator(section_dict, source) raising FeatxError.  A name
# that is not in SETTINGS makes a free-form section checked only by its validator.
EXTRA_SECTIONS: dict[str, Callable[[dict, str], None]] = {"heads": validate_heads_section}

DEFAULT = "default"
COMMAND_LINE = "command line"
# A featx config is a few KB; PyYAML reads about 0.6 MB/s, so a 20 MB string took 34 s and 200 MB never ended.
MAX_CONFIG_BYTES = 256 << 10


def read_yaml(path: str | os.PathLike) -> dict[str, dict]:
    """The sections of a YAML file, unchecked except for their shape."""
    path = Path(path)
    try:
        with open_regular(path) as fh:  # a FIFO would block the open for ever
            raw = fh.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise FeatxError(f"--config {str(path)!r}: larger than {MAX_CONFIG_BYTES >> 10} KiB, which no featx config "
                             "needs (a few KB); pass the config file itself, with plain values")
        text = raw.decode("utf-8")
    except OSError as exc:
        raise FeatxError(f"--config {str(path)!r}: cannot read it ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise FeatxError(f"--config {str(path)!r}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
    try:
        data = load_plain(text) or {}
    except yaml.YAMLError as exc:
        raise FeatxError(f"--config {str(path)!r}: not valid YAML ({' '.join(str(exc).split())})") from None
    except RecursionError:
        raise FeatxError(f"--config {str(path)!r}: nested too deeply to be a featx config file") from None
    if not isinstance(data, dict):
        raise FeatxError(f"--config {str(path)!r}: expected a mapping of sections (embed:, probe:, ...)")
    for k, v in data.items():
        if not isinstance(v, dict):
            raise FeatxError(f"--config {str(path)!r}: section {k!r} must be a mapping, got {type(v).__name__}")
    return data


def _shown(value: Any) -> str:
    return shown(value)


def convert_value(value: Any, hint: Any) -> Any:
    """``value`` as type ``hint`` (no lossy casts), or ValueError with click's wording."""
    if typing.get_origin(hint) in (Union, types.UnionType):  # Optional[int] or int | None
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None and len(args) < len(typing.get_args(hint)):
            return None
        hint = args[0]
    if typing.get_origin(hint) is tuple:  # a repeatable option (--storage-option): a list of strings in a file
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise ValueError(f"{_shown(value)} is not a list of strings.")
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        if value in choices and isinstance(value, type(choices[0])):
            return value
        raise ValueError(f"{_shown(value)} is not one of {', '.join(repr(c) for c in choices)}.")
    kinds = {bool: "boolean", int: "integer", float: "float", str: "string", dict: "mapping"}
    ok = isinstance(value, hint) and not (hint is int and isinstance(value, bool))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not ok:
        raise ValueError(f"{_shown(value)} is not a valid {kinds.get(hint, getattr(hint, '__name__', hint))}.")
    return value


def _check_section(cls: type[Settings], values: dict, source: str) -> dict[str, Any]:
    types = field_types(cls)
    out = {}
    for key, val in values.items():
        if key not in types:
            # The keys `featx config` shows; per-run switches (out_dir, quiet, as_json...) are accepted but not listed.
            shown = [f.name for f in dataclasses.fields(cls) if f.metadata.get("file", True)]
            hint = difflib.get_close_matches(str(key), shown, n=1) or difflib.get_close_matches(str(key), list(types), n=1)
            raise FeatxError(
                f"config {source}: unknown key {cls.section}.{key}"
                + (f" (did you mean {hint[0]!r}?)" if hint else "")
                + f"; valid keys for {cls.section}: {', '.join(sorted(shown))} (see `featx config {cls.section}`)"
            )
        try:
            out[key] = convert_value(val, types[key])
        except ValueError as exc:
            raise FeatxError(f"config {source}: {cls.section}.{key}: {exc}") from None
    return out


def validate(data: dict[str, dict], source: str) -> dict[str, dict]:
    """Check every section of a config mapping; returns it with values converted (ints to floats...)."""
    out = {}
    for sec, values in data.items():
        if sec not in SETTINGS and sec not in EXTRA_SECTIONS:
            known = sorted(set(SETTINGS) | set(EXTRA_SECTIONS))
            raise FeatxError(f"config {source}: unknown section {sec!r}; known sections: {', '.join(known)}")
        if sec in EXTRA_SECTIONS:  # the specific check first: its messages are the most helpful
            EXTRA_SECTIONS[sec](values, source)
        out[sec] = _check_section(SETTINGS[sec], values, source) if sec in SETTINGS else dict(values)
    return out


def read_config(path: str | os.PathLike) -> dict[str, dict]:
    """A config file's sections, checked and converted (only what the file sets)."""
    return validate(read_yaml(path), str(path))


def default_values(*, everything: bool = False) -> dict[str, dict[str, Any]]:
    """The built-in defaults as config sections (``everything``: also per-run keys such as ``quiet``)."""
    out = {}
    for name, cls in SETTINGS.items():
        inst = cls()
        out[name] = {f.name: copy.deepcopy(getattr(inst, f.name))
                     for f in dataclasses.fields(cls) if everything or f.metadata.get("file", True)}
    return out


def merge(base: dict, over: dict) -> dict:
    """``over`` laid on ``base``; nested mappings (the grids) merge key by key."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_config(path: str | os.PathLike | None = None) -> dict[str, dict[str, Any]]:
    """The built-in defaults merged with the file ``path`` (if given; checked)."""
    cfg = default_values()
    if path is not None:
        cfg = merge(cfg, read_config(path))
        cfg["_source"] = {"path": str(path)}
    return cfg


def section(cfg: dict, name: str) -> dict:
    """One section (a copy), or an empty dict."""
    return copy.deepcopy(cfg.get(name) or {})


@dataclass(frozen=True)
class Entry:
    """One effective setting: where it lives, its value, and where the value came from."""

    section: str
    key: tuple[str, ...]
    value: Any
    source: str

    @property
    def name(self) -> str:
        return ".".join((self.section, *self.key))


def _section_entries(cls: type[Settings], file_values: dict, cli_values: dict, file_source: str) -> list[Entry]:
    inst = cls()
    out = []
    for f in dataclasses.fields(cls):
        value, source = getattr(inst, f.name), DEFAULT
        if f.name in cli_values:
            value, source = cli_values[f.name], COMMAND_LINE
        elif f.name in file_values:
            value, source = file_values[f.name], file_source
        if not f.metadata.get("file", True) and source == DEFAULT:
            continue
        if isinstance(value, dict):  # a grid: one entry per searched parameter
            given = file_values.get(f.name, {})
            for param, spec in {**getattr(inst, f.name), **given}.items():
                out.append(Entry(cls.section, (f.name, param), spec, file_source if param in given else DEFAULT))
            continue
        out.append(Entry(cls.section, (f.name,), value, source))
    return out


def explain(path: str | os.PathLike | None = None, sections: list[str] | None = None,
            cli_values: dict[str, Any] | None = None) -> list[Entry]:
    """Every effective setting of ``sections`` (default: all) and its source: the built-in default,
    the file ``path``, or ``cli_values`` (options given on the command line, for ``sections[0]``)."""
    file_cfg = read_config(path) if path is not None else {}
    file_source = f"file {path}"
    out: list[Entry] = []
    for i, name in enumerate(sections or list(SETTINGS)):
        cli = (cli_values or {}) if (sections and i == 0) else {}
        out += _section_entries(SETTINGS[name], file_cfg.get(name, {}), cli, file_source)
    return out


def nest(entries: list[Entry]) -> dict[str, dict[str, Any]]:
    """Entries back into config sections (the shape of a YAML file)."""
    out: dict[str, dict[str, Any]] = {}
    for e in entries:
        node = out.setdefault(e.section, {})
        for k in e.key[:-1]:
            node = node.setdefault(k, {})
        node[e.key[-1]] = copy.deepcopy(e.value)
    return out
