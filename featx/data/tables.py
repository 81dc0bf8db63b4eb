"""Tables of images as pyarrow reads them: Parquet files, and the Arrow files of ``datasets``' ``save_to_disk``.

One interface over both: a table has a schema (with the Hugging Face ``ClassLabel`` names in its metadata),
groups of rows (a Parquet row group; a record batch of an Arrow stream file) and a freshness stamp.  A worker
reads the image column of one group once and keeps the last few in memory, so a batch costs no more than its
share of a group read.  Arrow files are memory-mapped: a group read copies nothing.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict

from ..base.errors import FeatxError
from ..base.files import check_regular
from .remote import filesystem, is_url, refusal, stamp_of_info

KEEP_ROW_GROUPS = 2  # image columns of groups kept per process (a batch often spans two)
ARROW_SUFFIXES = (".arrow",)
TABLE_SUFFIXES = (".parquet", ".pq") + ARROW_SUFFIXES
_CACHE: OrderedDict = OrderedDict()
_LOCK = threading.Lock()


def _pyarrow(url: str):
    try:
        import pyarrow as pa  # optional extra featx[parquet]
        import pyarrow.parquet as pq
    except ImportError:
        raise FeatxError(f"{url}: reading Parquet and Arrow tables needs pyarrow: pip install 'featx[parquet]'") from None
    return pa, pq


class Table:
    """A Parquet file or an Arrow stream file: ``schema``, ``num_groups``, ``group(i, columns)``, ``stamp``."""

    def __init__(self, url: str):
        self.url = url
        self.arrow = url.lower().endswith(ARROW_SUFFIXES)
        pa, pq = _pyarrow(url)
        if is_url(url):
            fs, path = filesystem(url)
            self.stamp, self.size = stamp_of_info(fs.info(path))
            fh = fs.open(path, "rb")
            source = pa.BufferReader(fh.read()) if self.arrow else fh
        else:
            check_regular(url, "table")  # pyarrow's open of a FIFO would block for ever
            st = os.stat(url)
            self.stamp, self.size = st.st_mtime_ns, st.st_size
            source = pa.memory_map(url) if self.arrow else url
        if self.arrow:
            reader = pa.ipc.open_stream(source)
            self.schema = reader.schema
            self._batches = list(reader)
            self.num_groups = len(self._batches)
            self.num_rows = sum(b.num_rows for b in self._batches)
        else:
            self._pf = pq.ParquetFile(source)
            self.schema = self._pf.schema_arrow
            self.num_groups = self._pf.num_row_groups
            self.num_rows = self._pf.metadata.num_rows

    def group(self, i: int, columns: list[str]):
        """The rows of group ``i`` as a pyarrow Table of ``columns``."""
        if not self.arrow:
            return self._pf.read_row_group(i, columns=columns)
        pa, _ = _pyarrow(self.url)
        return pa.Table.from_batches([self._batches[i]]).select(columns)

    def group_rows(self, i: int) -> int:
        return self._batches[i].num_rows if self.arrow else self._pf.metadata.row_group(i).num_rows

    def struct_field(self, column: str, name: str) -> list:
        """Field ``name`` of the struct column ``column`` over every row (a Parquet file reads that field only)."""
        if self.arrow:
            return [v for b in self._batches for v in b.column(column).field(name).to_pylist()]
        col = self._pf.read(columns=[f"{column}.{name}"]).column(0).combine_chunks()
        values = col.field(name) if hasattr(col, "field") and col.type.num_fields else col
        return values.to_pylist()

    def null_bytes(self, i: int, column: str) -> list[bool] | None:
        """Per row of group ``i``: is the ``bytes`` field of the image struct ``column`` null (a path-only cell)?
        None when the column is not a struct with ``bytes`` and ``path`` fields."""
        import pyarrow as pa

        typ = self.schema.field(column).type
        if not (pa.types.is_struct(typ) and typ.get_field_index("bytes") >= 0 and typ.get_field_index("path") >= 0):
            return None
        n = self.group_rows(i)
        if not self.arrow:  # the column chunk's statistics answer without reading the bytes
            md = self._pf.metadata.row_group(i)
            for c in range(md.num_columns):
                col = md.column(c)
                if col.path_in_schema == f"{column}.bytes" and col.is_stats_set and col.statistics.has_null_count:
                    if col.statistics.null_count in (0, n):
                        return [col.statistics.null_count == n] * n
        cells = self.group(i, [column]).column(0).combine_chunks()
        return cells.field("bytes").is_null().to_pylist()


def open_table(url: str) -> Table:
    """The table at ``url``, or a one-line refusal naming the file and the fix."""
    try:
        return Table(url)
    except FeatxError:
        raise
    except OSError as exc:
        if not is_url(url) and isinstance(exc, FileNotFoundError):
            raise FeatxError(f"table {url!r} does not exist; check the path") from None
        if is_url(url):
            raise refusal(url, exc) from None
        raise FeatxError(f"{url}: not a readable Parquet or Arrow file ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowInvalid for a file that is not a table
        raise FeatxError(f"{url}: not a readable Parquet or Arrow file ({type(exc).__name__}: {exc})") from None


def label_names(schema, column: str) -> list[str] | None:
    """A Hugging Face ``ClassLabel``'s names, from the table's schema metadata, if there are any."""
    meta = schema.metadata or {}
    try:
        info = json.loads(meta[b"huggingface"])
        feats = info.get("info", info)["features"]
        names = feats[column].get("names")
        return [str(n) for n in names] if names else None
    except (KeyError, ValueError, TypeError, AttributeError):
        return None


def _group_values(url: str, rg: int, column: str) -> list:
    """The column's values in one group, from this process's small cache of recent groups."""
    key = (os.getpid(), url, rg, column)
    with _LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
        values = open_table(url).group(rg, [column]).column(0).to_pylist()
        _CACHE[key] = values
        while len(_CACHE) > KEEP_ROW_GROUPS:
            _CACHE.popitem(last=False)
        return values


def read_cell(url: str, rg: int, row: int, column: str) -> tuple[bytes | None, str]:
    """The image bytes of one cell, or (None, reason).  Never raises."""
    try:
        value = _group_values(url, rg, column)[row]
    except FeatxError as exc:
        return None, f"cannot read: {exc}"
    except Exception as exc:  # noqa: BLE001 - a damaged row group is recorded for its rows
        return None, f"cannot read: {type(exc).__name__}: {str(exc)[:200]}"
    if isinstance(value, dict):
        data = value.get("bytes")
        if data is None:
            where = f" (only a path: {value.get('path')!r}; featx reads it from there when it exists)" \
                if value.get("path") else ""
            return None, f"image cell has no bytes{where}"
        value = data
    if value is None:
        return None, "sample without an image (empty cell)"
    if not isinstance(value, (bytes, bytearray)):
        return None, f"image cell holds {type(value).__name__}, not encoded image bytes"
    return bytes(value), ""
