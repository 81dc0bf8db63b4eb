"""Tables of images (``featx embed data.parquet --image-column image --label-column label``), one or several.

Parquet files (local or any fsspec URL) and the Arrow files of a ``datasets`` ``save_to_disk`` folder, read with
pyarrow (the ``parquet`` extra; :mod:`featx.data.tables`).  The image column holds encoded image bytes, or a
``{bytes, path}`` struct (the Hugging Face ``datasets`` layout, whose ``ClassLabel`` names become the class
names).  A struct with bytes is read from the table; one with only a path (``Dataset.to_parquet`` of images
cast from files) is the file at that path: relative to ``--data-root``, else to the table's folder.  Such a
sample is a plain local file, as in a CSV manifest: its key is the path relative to the data root (rows
outside it are allowed, keyed by their absolute path, and logged), a missing file is skipped at discovery, and
when every row is a path the data root is the dataset's root.  Discovery reads only the label, split and key
columns (and a group's ``bytes`` nulls, from the statistics when they say it).  The key of a cell with bytes
is the struct's ``path`` when every row of its table has a distinct one, else ``row-N``; with several tables
whose keys collide, each key is prefixed with its table's name.  Splits: the ``--split-column``, else
``--split``, else a ``train``/``val``/``test`` part of the table's file name or folder, else ``train``.
"""

from __future__ import annotations

import logging
import os
from typing import Callable

from ..base.errors import FeatxError
from .folders import SPLIT_NAMES, Dataset, Sample
from .inputs import class_sort_key
from .remote import is_url
from .splits import canonical_split
from .tables import MAX_CELL_BYTES, Table, label_names, open_table, read_cell  # noqa: F401 - the sources' reader

log = logging.getLogger(__name__)


def _check_columns(tab: Table, columns: dict[str, str | None]) -> None:
    have = tab.schema.names
    for opt, col in columns.items():
        if col is not None and col not in have:
            raise FeatxError(f"{tab.url} has no column {col!r} ({opt}); its columns are {', '.join(have)}")


def _paths(tab: Table, image_column: str) -> list[str | None] | None:
    """The image struct's ``path`` of every row, or None when the column has no such field."""
    import pyarrow as pa

    typ = tab.schema.field(image_column).type
    if not (pa.types.is_struct(typ) and typ.get_field_index("path") >= 0):
        return None
    try:
        return tab.struct_field(image_column, "path")
    except Exception as exc:  # noqa: BLE001 - only the keys' nicety is lost
        log.debug("cannot read %s.path of %s: %s", image_column, tab.url, exc)
        return None


def _keys(paths: list | None, rows: int) -> list[str]:
    """The struct paths when all are present and distinct, else ``row-N``."""
    if paths and all(paths) and len(set(paths)) == len(paths):
        return [str(p) for p in paths]
    width = max(6, len(str(rows)))
    return [f"row-{i:0{width}d}" for i in range(rows)]


def _split_of(value, default: str, where: str) -> str:
    if value is None or str(value).strip() == "":
        return default
    sp = canonical_split(value)
    if sp is None:
        raise FeatxError(f"{where}: split {value!r} is not one of {', '.join(SPLIT_NAMES)} (or training, valid, "
                         "validation, testing); fix the split column")
    return sp


class _Rows:
    """The rows found so far, over every table: (path-or-locator, key, class name, split, table url, is_file)."""

    def __init__(self, data_root: str | None):
        self.data_root = os.path.abspath(data_root) if data_root else None
        self.rows: list[tuple[str, str, str, str, str, bool]] = []
        self.skipped: list[tuple[str, str]] = []
        self.outside = 0
        self.all_absolute = True  # every path-only cell held an absolute path

    def local_file(self, tab: Table, path: str, where: str) -> str | None:
        """The local file a path-only cell names, or None (skipped, with the reason)."""
        if is_url(path):
            self.skipped.append((where, f"image cell has only a URL path {path!r}; featx reads paths of local files"))
            return None
        if not os.path.isabs(path):
            self.all_absolute = False
            if self.data_root is None and is_url(tab.url):
                self.skipped.append((where, f"image cell has only a relative path {path!r} in a table at a URL; "
                                            "pass --data-root FOLDER where the images are"))
                return None
            path = os.path.join(self.data_root or os.path.dirname(os.path.abspath(tab.url)), path)
        if not os.path.isfile(path):
            self.skipped.append((where, f"image cell has only a path, and {path} is missing; pass --data-root "
                                        "FOLDER if the paths are relative to another folder"))
            return None
        return os.path.abspath(path)


def _scan_table(tab: Table, found: _Rows, opts: dict, default_split: str, locator: Callable) -> None:
    """Append one table's usable rows to ``found``."""
    image_column, label_column, split_column = opts["image_column"], opts["label_column"], opts["split_column"]
    _check_columns(tab, {"--image-column": image_column, "--label-column": label_column,
                         "--split-column": split_column})
    cols = [label_column] + ([split_column] if split_column else [])
    paths = _paths(tab, image_column)
    keys = _keys(paths, tab.num_rows)
    names = opts["names"]
    n = 0
    for rg in range(tab.num_groups):
        t = tab.group(rg, cols)
        nulls = tab.null_bytes(rg, image_column) or [False] * t.num_rows
        labels = t.column(label_column).to_pylist()
        splits = t.column(split_column).to_pylist() if split_column else [None] * len(labels)
        for r, (lab, sp) in enumerate(zip(labels, splits)):
            key, path = keys[n], paths[n] if paths else None
            n += 1
            where = f"{tab.url}:{key}"
            if lab is None or str(lab).strip() == "":
                found.skipped.append((where, f"missing label (column {label_column!r})"))
                continue
            if names and isinstance(lab, int) and not 0 <= lab < len(names):  # -1: the datasets' "no label"
                why = "unlabelled (ClassLabel -1)" if lab == -1 else f"label {lab} is outside the {len(names)} " \
                                                                     "ClassLabel names"
                found.skipped.append((where, f"{why}; the row is left out (give it a label to embed it)"))
                continue
            name = names[lab] if names and isinstance(lab, int) else str(lab).strip()
            split = _split_of(sp, default_split, where)
            if nulls[r] and path:
                full = found.local_file(tab, str(path), where)
                if full is not None:
                    found.rows.append((full, key, name, split, tab.url, True))
                continue
            found.rows.append((locator("pq", tab.url, tab.stamp, tab.size, rg, r, image_column), key, name, split,
                               tab.url, False))


def _class_names(tables: list[Table], label_column: str) -> list[str] | None:
    named = [(t.url, n) for t in tables if (n := label_names(t.schema, label_column))]
    for url, n in named[1:]:
        if n != named[0][1]:
            raise FeatxError(f"{url}: its ClassLabel names differ from those of {named[0][0]}; embed tables of one "
                             "data set together")
    return named[0][1] if named else None


def _table_names(urls: list[str]) -> dict[str, str]:
    """Each table's path below the tables' common folder, without its suffix (the key prefix of its rows)."""
    base = os.path.commonpath([os.path.dirname(u) for u in urls]) if len(urls) > 1 and not any(map(is_url, urls)) \
        else os.path.dirname(os.path.commonprefix(urls))
    return {u: os.path.splitext(u[len(base):].strip("/"))[0] for u in urls}


def _root_and_keys(found: _Rows, root: str) -> tuple[str, list[tuple[str, str, str, str]]]:
    """The dataset root (the data root when every row is a file) and each row's final, distinct key."""
    files = [r for r in found.rows if r[5]]
    if files and len(files) == len(found.rows):  # the data root: --data-root, the tables' folder, else the images'
        root = found.data_root or os.path.commonpath([os.path.dirname(os.path.abspath(r[4])) for r in files])
        if found.data_root is None and found.all_absolute:
            root = os.path.commonpath([os.path.dirname(r[0]) for r in files])
    tables = list(dict.fromkeys(r[4] for r in found.rows))
    prefix = len(tables) > 1 and len({r[1] for r in found.rows if not r[5]}) < sum(1 for r in found.rows if not r[5])
    names = _table_names(tables)
    out, seen = [], set()
    for path, key, name, split, url, is_file in found.rows:
        if is_file:
            rel = os.path.relpath(path, root) if not is_url(root) else path
            inside = not rel.startswith(os.pardir + os.sep) and rel != os.pardir and not os.path.isabs(rel)
            found.outside += not inside
            key = rel.replace(os.sep, "/") if inside else path
        elif prefix:
            key = f"{names[url]}/{key}"
        if key in seen:
            found.skipped.append((f"{url}:{key}", "duplicate key (the same image twice); only the first is used"))
            continue
        seen.add(key)
        out.append((path, key, name, split))
    return root, out


def discover_tables(files: list[tuple[str, str | None]], *, root: str, image_column: str, label_column: str,
                    split_column: str | None = None, split: str | None = None, data_root: str | None = None,
                    locator: Callable) -> Dataset:
    """One sample per row with an image and a label, over every table (``files``: (url, split from its name))."""
    if split is not None and canonical_split(split) is None:
        raise FeatxError(f"--split {split!r}: expected one of {', '.join(SPLIT_NAMES)}")
    files = [(u if is_url(u) else os.path.abspath(u), sp) for u, sp in files]  # a worker may run elsewhere
    tables = [open_table(url) for url, _ in files]
    found = _Rows(data_root)
    names = _class_names(tables, label_column)
    opts = {"image_column": image_column, "label_column": label_column, "split_column": split_column, "names": names}
    for tab, (_, name_split) in zip(tables, files):
        _scan_table(tab, found, opts, canonical_split(split) if split else name_split or "train", locator)
    root, rows = _root_and_keys(found, root)
    for p, reason in found.skipped:
        log.warning("skipped %s: %s", p, reason)
    if found.outside:
        log.warning("%d image path(s) lie outside the data root %s; they are read from there, keyed by their "
                    "absolute path", found.outside, root)
    if not rows:
        why = found.skipped[0][1] if found.skipped else "no rows"
        raise FeatxError(f"{files[0][0]}{' and the other tables' if len(files) > 1 else ''}: no row with an image "
                         f"and a label in column {label_column!r} ({why})")
    present = {r[2] for r in rows}
    classes = sorted(present, key=class_sort_key)
    if names:  # the ClassLabel's order; a label that is no ClassLabel name (a string column) after them
        classes = [c for c in dict.fromkeys(names) if c in present] + [c for c in classes if c not in names]
    index = {c: i for i, c in enumerate(classes)}
    order = {s: i for i, s in enumerate(SPLIT_NAMES)}
    samples = sorted((Sample(loc, key, index[lab], sp) for loc, key, lab, sp in rows), key=lambda s: order[s.split])
    return Dataset(root, classes, samples, "parquet", found.skipped)


def discover_table(url: str, *, image_column: str, label_column: str, split_column: str | None,
                   split: str | None, locator: Callable) -> Dataset:
    """One table (the form of earlier versions)."""
    return discover_tables([(url, None)], root=url, image_column=image_column, label_column=label_column,
                           split_column=split_column, split=split, locator=locator)
