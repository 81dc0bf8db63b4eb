"""What the command line refuses before any heavy import: missing local paths and impossible sizes.

Why: the stages import torch, h5py and scikit-learn (3-6 s and ~800 MB on a busy machine) before
their own checks run, so a misspelt folder used to cost seconds.  :class:`CheckedCommand` (every
``featx`` command's class) looks at the parsed values first and raises the same
:class:`~featx.base.errors.FeatxError` the library would, naming the path or option and the fix.
Only the standard library is used here; URLs, glob and brace patterns are left to the library.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterable

import click

from ..base.errors import FeatxError

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_PATTERN = re.compile(r"[*?\[{]")

# parameter name -> (what it is, the fix): the library's own words for a path that does not exist
_MISSING = {
    "data": ("dataset folder", "pass an existing image folder"),
    "cache": ("cache", "create one with `featx embed DATA_DIR`"),
    "head_path": ("head file", "pass a .skops or .joblib file written by `featx probe`"),
    "inputs": ("input", "pass image files or folders of images"),
    "run_dir": ("run folder", "pass a folder under runs/ (or run `featx probe`)"),
    "manifest": ("manifest", "pass an existing CSV file with columns path,label[,split]"),
    "images": ("--images folder", "pass an existing folder of images"),
}
_POSITIVE = ("batch_size", "chunk_size")  # the library's check_options refuses these below 1 with these words
_CACHE_SUFFIXES = ("*.h5", "*.multi.json")  # what cache.reader.newest_cache looks for
_TABLE_SUFFIXES = (".parquet", ".arrow", ".tar")  # data arguments that name files, not folders


def _local(value: Any) -> bool:
    text = os.fspath(value)
    return not _URL.match(text) and not _PATTERN.search(text)


def missing_paths(params: dict) -> Iterable[str]:
    """One message per local path in ``params`` (click's parsed values) that does not exist."""
    for name, (what, fix) in _MISSING.items():
        values = params.get(name)
        for v in values if isinstance(values, (list, tuple)) else [values]:
            if v is not None and str(v) != "" and _local(v) and not os.path.exists(v):
                if name == "data" and Path(str(v)).suffix.lower() in _TABLE_SUFFIXES:  # a table or a shard
                    yield f"input {str(v)!r} does not exist; pass existing Parquet/Arrow tables or WebDataset .tar shards"
                else:
                    yield f"{what} {str(v)!r} does not exist; {fix}"
    weights = params.get("weights")
    if weights not in (None, "", "random") and _local(weights) and not os.path.exists(weights):
        yield f"--weights {weights!r}: file not found; pass a local state-dict file (.pth/.pt/.safetensors)"


def check_params(params: dict) -> None:
    """Raise the first early refusal for a command's parsed ``params``; nothing heavy is imported."""
    for message in missing_paths(params):
        raise FeatxError(message)
    for name in _POSITIVE:
        v = params.get(name)
        if isinstance(v, int) and v < 1:
            raise FeatxError(f"--{name.replace('_', '-')} must be a positive integer, got {v}")
    workers = params.get("workers")
    if isinstance(workers, int) and workers < 0:
        raise FeatxError(f"--workers must be >= 0, got {workers}")
    if "cache" in params and params.get("cache") is None and "data" not in params and params.get("cache_dir"):
        d = Path(params["cache_dir"])
        if not any(p for pat in _CACHE_SUFFIXES for p in (d.glob(pat) if d.is_dir() else ())):
            raise FeatxError(
                f"no cache in {str(d)!r}; run `featx embed DATA_DIR` first, or pass a cache file (or --cache-dir)")


class CheckedCommand(click.Command):
    """A click command whose parsed values pass :func:`check_params` before its body imports anything heavy."""

    def invoke(self, ctx: click.Context) -> Any:
        check_params(ctx.params)
        return super().invoke(ctx)
