"""Parquet tables of images (``featx embed data.parquet --image-column image --label-column label``).

A local file or any fsspec URL, read with pyarrow (the ``parquet`` extra) one row group at a time.  The
image column holds encoded image bytes, or a struct with a ``bytes`` field (the Hugging Face ``datasets``
layout, whose ``ClassLabel`` names become the class names).  Discovery reads only the label, split and
key columns; a worker reads the image column of a row group once and keeps the last few in memory, so a
batch costs no more than its share of a row-group read.  A sample's key is the image struct's ``path``
when every row has a distinct one (``datasets`` written from files keep their names), else ``row-N``.
A cell without bytes, a missing label or an undecodable image is recorded, never fatal.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
from typing import Callable

from ..base.errors import FeatxError
from .folders import SPLIT_NAMES, Dataset, Sample
from .remote import filesystem, is_url, refusal, stamp_of_info

log = logging.getLogger(__name__)

KEEP_ROW_GROUPS = 2  # image columns of row groups kept per process (a batch often spans two)
_SPLIT_ALIAS = {"valid": "val", "validation": "val", "training": "train", "testing": "test"}
_CACHE: OrderedDict = OrderedDict()
_LOCK = threading.Lock()


def open_table(url: str):
    """(pyarrow ParquetFile, (stamp, size)), or a one-line refusal naming the file and the fix."""
    try:
        import pyarrow.parquet as pq  # optional extra featx[parquet]
    except ImportError:
        raise FeatxError(f"{url}: reading Parquet needs pyarrow: pip install 'featx[parquet]'") from None
    try:
        if is_url(url):
            fs, path = filesystem(url)
            info = fs.info(path)
            return pq.ParquetFile(fs.open(path, "rb")), stamp_of_info(info)
        st = os.stat(url)
        return pq.ParquetFile(url), (st.st_mtime_ns, st.st_size)
    except FeatxError:
        raise
    except OSError as exc:
        if not is_url(url) and isinstance(exc, FileNotFoundError):
            raise FeatxError(f"Parquet file {url!r} does not exist; check the path") from None
        raise refusal(url, exc) if is_url(url) else FeatxError(f"{url}: not a readable Parquet file ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowInvalid for a file that is not Parquet
        raise FeatxError(f"{url}: not a readable Parquet file ({type(exc).__name__}: {exc})") from None


def _label_names(pf, column: str) -> list[str] | None:
    """A Hugging Face ``ClassLabel``'s names, from the table's metadata, if there are any."""
    meta = pf.schema_arrow.metadata or {}
    try:
        feats = json.loads(meta[b"huggingface"])["info"]["features"]
        names = feats[column].get("names")
        return [str(n) for n in names] if names else None
    except (KeyError, ValueError, TypeError, AttributeError):
        return None


def _check_columns(pf, url: str, columns: dict[str, str | None]) -> None:
    have = pf.schema_arrow.names
    for opt, col in columns.items():
        if col is not None and col not in have:
            raise FeatxError(f"{url} has no column {col!r} ({opt}); its columns are {', '.join(have)}")


def _keys(pf, image_column: str, rows: int) -> list[str]:
    """The image struct's ``path`` per row when all are present and distinct, else ``row-N``."""
    import pyarrow as pa

    typ = pf.schema_arrow.field(image_column).type
    if pa.types.is_struct(typ) and typ.get_field_index("path") >= 0:
        try:
            paths = pf.read(columns=[f"{image_column}.path"]).column(0).to_pylist()
            paths = [p.get("path") if isinstance(p, dict) else p for p in paths]
            if all(paths) and len(set(paths)) == len(paths):
                return [str(p) for p in paths]
        except Exception as exc:  # noqa: BLE001 - only the keys' nicety is lost
            log.debug("cannot read %s.path: %s", image_column, exc)
    width = max(6, len(str(rows)))
    return [f"row-{i:0{width}d}" for i in range(rows)]


def _split_of(value, default: str, where: str) -> str:
    sp = str(value).strip().lower() if value is not None else ""
    sp = _SPLIT_ALIAS.get(sp, sp) or default
    if sp not in SPLIT_NAMES:
        raise FeatxError(f"{where}: split {value!r} is not one of {', '.join(SPLIT_NAMES)} (or valid/validation)")
    return sp


def discover_table(url: str, *, image_column: str, label_column: str, split_column: str | None,
                   split: str | None, locator: Callable) -> Dataset:
    """One sample per row with an image and a label, in table order within each split."""
    if split is not None and split not in SPLIT_NAMES:
        raise FeatxError(f"--split {split!r}: expected one of {', '.join(SPLIT_NAMES)}")
    pf, (stamp, size) = open_table(url)
    _check_columns(pf, url, {"--image-column": image_column, "--label-column": label_column,
                             "--split-column": split_column})
    cols = [label_column] + ([split_column] if split_column else [])
    keys = _keys(pf, image_column, pf.metadata.num_rows)
    names = _label_names(pf, label_column)
    skipped: list[tuple[str, str]] = []
    rows, n = [], 0
    for rg in range(pf.num_row_groups):
        t = pf.read_row_group(rg, columns=cols)
        labels = t.column(label_column).to_pylist()
        splits = t.column(split_column).to_pylist() if split_column else [None] * len(labels)
        for r, (lab, sp) in enumerate(zip(labels, splits)):
            key = keys[n]
            n += 1
            if lab is None or str(lab).strip() == "":
                skipped.append((f"{url}:{key}", f"missing label (column {label_column!r})"))
                continue
            name = names[lab] if names and isinstance(lab, int) and 0 <= lab < len(names) else str(lab).strip()
            rows.append((locator("pq", url, stamp, size, rg, r, image_column), key, name,
                         _split_of(sp, split or "train", f"{url}:{key}")))
    if not rows:
        raise FeatxError(f"{url} has no rows with a label in column {label_column!r}")
    for p, reason in skipped:
        log.warning("skipped %s: %s", p, reason)
    classes = sorted({r[2] for r in rows}, key=lambda c: (0, int(c), c) if c.lstrip("-").isdigit() else (1, 0, c))
    if names:
        classes = [c for c in names if c in {r[2] for r in rows}]
    index = {c: i for i, c in enumerate(classes)}
    order = {s: i for i, s in enumerate(SPLIT_NAMES)}
    samples = sorted((Sample(loc, key, index[lab], sp) for loc, key, lab, sp in rows), key=lambda s: order[s.split])
    return Dataset(url, classes, samples, "parquet", skipped)


def _row_group(url: str, rg: int, column: str) -> list:
    """The column's values in one row group, from this process's small cache of recent row groups."""
    key = (os.getpid(), url, rg, column)
    with _LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
        pf, _ = open_table(url)
        values = pf.read_row_group(rg, columns=[column]).column(0).to_pylist()
        _CACHE[key] = values
        while len(_CACHE) > KEEP_ROW_GROUPS:
            _CACHE.popitem(last=False)
        return values


def read_cell(url: str, rg: int, row: int, column: str) -> tuple[bytes | None, str]:
    """The image bytes of one cell, or (None, reason).  Never raises."""
    try:
        value = _row_group(url, rg, column)[row]
    except FeatxError as exc:
        return None, f"cannot read: {exc}"
    except Exception as exc:  # noqa: BLE001 - a damaged row group is recorded for its rows
        return None, f"cannot read: {type(exc).__name__}: {str(exc)[:200]}"
    if isinstance(value, dict):
        data = value.get("bytes")
        if data is None:
            where = f" (only a path: {value.get('path')!r})" if value.get("path") else ""
            return None, f"image cell has no bytes{where}"
        value = data
    if value is None:
        return None, "sample without an image (empty cell)"
    if not isinstance(value, (bytes, bytearray)):
        return None, f"image cell holds {type(value).__name__}, not encoded image bytes"
    return bytes(value), ""
