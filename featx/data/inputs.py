"""The data arguments of ``featx embed`` as one input: several files, directories, globs and brace patterns.

``featx embed a.parquet b.parquet``, ``featx embed 'data/*.parquet'``, ``featx embed hf_dir/`` (a ``datasets``
``save_to_disk`` folder or the Hub's ``data/train-00000-of-00002.parquet`` layout), ``featx embed
'shards/train-{000000..000002}.tar' 'shards/test-*.tar'``: every argument is expanded (brace patterns, never
the same file twice; globs; directories of tables), all of one kind, into one cache.  The split of a file is a
``train``/``val``/``test`` part (or an alias: :data:`featx.data.splits.SPLIT_ALIASES`) of its name, else of
the folders between the argument and the file.  The cache is named after the inputs in a few readable words.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass

from ..base.errors import FeatxError
from .folders import is_image_name
from .remote import filesystem, is_url
from .splits import SPLIT_ALIASES, canonical_split
from .tables import TABLE_SUFFIXES

_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(\d+)\.\.(\d+)$")
_SPLIT_IN_NAME = re.compile(r"(?<![a-z])(" + "|".join(sorted(SPLIT_ALIASES, key=len, reverse=True)) + r")(?![a-z])")
_GLOB = re.compile(r"[*?\[]")
_HF_FILES = ("dataset_info.json", "dataset_dict.json", "state.json")
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
MAX_BRACE_NAMES = 1_000_000  # names one brace pattern may make (x-{000000000..999999999}.tar was 5 GB)


@dataclass(frozen=True)
class Inputs:
    """What the data arguments name: ``kind`` (parquet, webdataset) and the files with their split from names."""

    kind: str
    files: list[tuple[str, str | None]]  # (path or URL, split from its name or folders, or None)
    root: str  # the dataset's root: short, readable, unique per location (names the cache)


def expand_braces(pattern: str) -> list[str]:
    """webdataset's brace patterns: ``{000..099}`` (zero-padded ranges) and ``{a,b}`` alternatives, nested;
    each name once, in first-seen order; more than :data:`MAX_BRACE_NAMES` names are refused before any is made."""
    n = brace_count(pattern)
    if n > MAX_BRACE_NAMES:
        raise FeatxError(f"{pattern[:200]}: this brace pattern names {n:,} files, more than {MAX_BRACE_NAMES:,}; "
                         "check the ranges (one {000000..000099} per shard number), or use a glob")
    return list(dict.fromkeys(_expand(pattern)))


def brace_count(pattern: str) -> int:
    """How many names :func:`_expand` makes of ``pattern``, counted without making them (an option holds no
    brace, so every option of a group leaves the same groups to expand)."""
    m = _BRACE.search(pattern)
    if not m:
        return 1
    body = m.group(1)
    rng = _RANGE.match(body)
    n = max(0, int(rng.group(2)) - int(rng.group(1)) + 1) if rng else len(body.split(","))
    first = rng.group(1) if rng else body.split(",")[0]
    return n * brace_count(pattern[: m.start()] + first + pattern[m.end():]) if n else 0


def _expand(pattern: str) -> list[str]:
    m = _BRACE.search(pattern)
    if not m:
        return [pattern]
    body, head, tail = m.group(1), pattern[: m.start()], pattern[m.end():]
    rng = _RANGE.match(body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    return [x for opt in options for x in _expand(head + opt + tail)]


MAX_CLASS_DIGITS = 18  # a class number (cls label) fits in 64 bits; longer digit strings are names


def class_sort_key(name: str) -> tuple[int, int, str]:
    """Class numbers (``-1``, ``7``: ASCII digits, at most :data:`MAX_CLASS_DIGITS`) in numeric order first, then
    names; ``²`` or 5,000 nines are names (``int()`` refused them with a ValueError)."""
    digits = name[1:] if name.startswith("-") else name
    if digits.isascii() and digits.isdigit() and len(digits) <= MAX_CLASS_DIGITS:
        return (0, int(name), name)
    return (1, 0, name)


def split_from_name(path: str) -> str | None:
    """The split a file name says (``train-00000-of-00002.parquet``, ``flowers-validation-0001.tar``), or None."""
    m = _SPLIT_IN_NAME.findall(os.path.basename(path.rstrip("/")).lower())
    return canonical_split(m[-1]) if m else None


def split_from_path(path: str, base: str) -> str | None:
    """The split of a file found under the argument ``base``: from its name, else the folders between."""
    sp = split_from_name(path)
    if sp:
        return sp
    rel = path[len(base):].strip("/").split("/")[:-1]
    for part in reversed(rel):
        if canonical_split(part):
            return canonical_split(part)
    return None


def has_pattern(text: str) -> bool:
    """Does the argument hold a glob or a brace pattern?"""
    return bool(_GLOB.search(text) or _BRACE.search(text))


def table_kind(name: str) -> str | None:
    low = name.lower().rstrip("/")
    if low.endswith(TABLE_SUFFIXES):
        return "parquet"
    if low.endswith(SHARD_SUFFIXES):
        return "webdataset"
    return None


def is_table_dir(path: str) -> bool:
    """A local folder of tables: a ``save_to_disk`` folder, or Parquet files with no image folders beside them."""
    if is_url(path) or not os.path.isdir(path):
        return False
    if any(os.path.isfile(os.path.join(path, f)) for f in _HF_FILES):
        return True
    return not _has_image_folders(path) and bool(_tables_in(path))


def _has_image_folders(path: str) -> bool:
    for _dirpath, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        if any(is_image_name(f) for f in files):
            return True
    return False


def _tables_in(path: str) -> list[str]:
    """Every table file below a local folder, in path order (hidden folders and ``cache-*.arrow`` left out)."""
    found = []
    for dirpath, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(dirpath, f) for f in sorted(files)
                  if table_kind(f) == "parquet" and not f.startswith(("cache-", "."))]
    return sorted(found, key=lambda p: p.split(os.sep))


def _glob(pattern: str) -> list[str]:
    if is_url(pattern):
        fs, path = filesystem(pattern)
        proto = pattern.split("://", 1)[0]
        return sorted(f"{proto}://{p}" for p in fs.glob(path))
    return sorted(glob.glob(pattern))


def expand_argument(arg: str) -> list[tuple[str, str | None]]:
    """The files one data argument names, each with the split its name (or folder) says."""
    out: list[tuple[str, str | None]] = []
    for name in expand_braces(arg):
        if _GLOB.search(name):
            matches = _glob(name)
            if not matches:
                raise FeatxError(f"{name}: no file matches this pattern; check the path")
            for m in matches:
                out += expand_argument(m) if is_table_dir(m) else [(m, split_from_name(m))]
        elif is_table_dir(name):
            base = name.rstrip("/")
            out += [(f, split_from_path(f, base)) for f in _tables_in(base)]
        else:
            out.append((name, split_from_name(name)))
    return out


def expand_inputs(args: list[str]) -> Inputs:
    """The tables or shards the data arguments name; refuses a mix of kinds and a file named twice."""
    files: list[tuple[str, str | None]] = []
    for arg in args:
        files += expand_argument(str(arg))
    kinds = {table_kind(f) for f, _ in files}
    if len(kinds) != 1 or None in kinds:
        odd = next((f for f, _ in files if table_kind(f) != table_kind(files[0][0])), files[0][0])
        raise FeatxError(f"{odd}: several data arguments must all be Parquet/Arrow tables or all WebDataset .tar "
                         "shards (or one folder, URL or --manifest); embed the others into their own cache")
    unique, seen = [], set()
    for f, sp in files:  # the same file through two arguments is read once
        key = f if is_url(f) else os.path.abspath(f)
        if key not in seen:
            seen.add(key)
            unique.append((f, sp))
    return Inputs(kinds.pop(), unique, readable_root(args, [f for f, _ in unique]))


def _stem(name: str) -> str:
    base = os.path.basename(name.rstrip("/"))
    for suf in TABLE_SUFFIXES + SHARD_SUFFIXES:
        if base.lower().endswith(suf):
            base = base[: -len(suf)]
    base = re.sub(r"\d+-of-\d+", "", _BRACE.sub("", _GLOB.sub("", base)))
    return re.sub(r"[\d_.-]+$", "", base).strip("-_.")


def readable_root(args: list[str], files: list[str]) -> str:
    """A short root for the cache name: the folder of the inputs plus their names without numbers.

    ``shards/{train-{000000..000002},test-000000}.tar`` -> ``<abs>/shards/train+test``; a single plain file
    keeps its own path (existing caches keep their names); a table folder is itself."""
    if len(args) == 1 and not has_pattern(args[0]):
        one = str(args[0]).rstrip("/")
        return one if is_url(one) else os.path.abspath(one)
    where = [f if is_url(f) else os.path.abspath(f) for f in files]
    parent = os.path.commonpath([os.path.dirname(w) for w in where]) if not any(map(is_url, where)) \
        else os.path.dirname(os.path.commonprefix(where))
    stems = list(dict.fromkeys(s for f in files if (s := _stem(f))))
    label = "+".join(stems[:3]) + ("+more" if len(stems) > 3 else "")
    return f"{parent}/{label or os.path.basename(parent) or 'data'}"
