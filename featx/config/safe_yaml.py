"""YAML for config files: plain values only, bounded in size and depth.

Why: ``yaml.safe_load`` never runs code, but a 415-byte file of nested aliases ("billion
laughs") expands to gigabytes, and a file nested 100,000 deep exhausts the stack.  featx config
files need neither: aliases are refused where they appear, deep nesting is a one-line error,
and values shown in messages are bounded (:func:`shown`).
"""

from __future__ import annotations

import reprlib
from typing import Any

import yaml

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60
_REPR.maxlist = _REPR.maxdict = _REPR.maxtuple = 6
_REPR.maxlevel = 3


class _PlainLoader(yaml.SafeLoader):
    """SafeLoader without aliases (``*name``)."""

    def compose_node(self, parent, index):  # noqa: ANN001 - PyYAML's signature
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not accepted in featx config files; "
                                              "write the value out", mark)
        return super().compose_node(parent, index)


def load_plain(text: str) -> Any:
    """The YAML document in ``text``; yaml.YAMLError for aliases and syntax, RecursionError when nested too deep."""
    return yaml.load(text, Loader=_PlainLoader)  # noqa: S506 - a SafeLoader subclass


def shown(value: Any) -> str:
    """A short ``repr`` of any value (never the whole of a large one)."""
    return "null" if value is None else _REPR.repr(value)
