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
MAX_CELL_BYTES = 32 << 20  # the largest image cell read (--max-image-bytes); a larger one is recorded as failed
GROUP_FACTOR = 16  # a Parquet group's image column above this many largest cells is streamed, never read whole
STREAM_ROWS = 16  # rows per batch of a streamed group
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


def column_bytes(tab: Table, i: int, column: str) -> int | None:
    """Uncompressed bytes of ``column`` (all its leaves) in Parquet row group ``i``, from the metadata alone;
    None for an Arrow file (memory-mapped: a cell is measured without being copied)."""
    if tab.arrow:
        return None
    md = tab._pf.metadata.row_group(i)
    return sum(md.column(c).total_uncompressed_size for c in range(md.num_columns)
               if md.column(c).path_in_schema == column or md.column(c).path_in_schema.startswith(column + "."))


def _group_cells(url: str, rg: int, row: int, column: str, max_bytes: int):
    """The pyarrow cell ``row`` of ``column`` in group ``rg`` (nothing copied to Python), from this process's small
    cache of recent groups.  A Parquet group whose column is larger than :data:`GROUP_FACTOR` cells of
    ``max_bytes`` is not read whole: it is streamed in batches of :data:`STREAM_ROWS` rows, the stream kept for
    the next row."""
    key = (os.getpid(), url, rg, column)
    with _LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            cells = _CACHE[key]
        else:
            tab = open_table(url)
            size = column_bytes(tab, rg, column)
            cells = tab.group(rg, [column]).column(0) if size is None or size <= GROUP_FACTOR * max_bytes \
                else _Stream(tab, rg, column)
            _CACHE[key] = cells
            while len(_CACHE) > KEEP_ROW_GROUPS:
                _CACHE.popitem(last=False)
        return cells.cell(row) if isinstance(cells, _Stream) else cells[row]


class _Stream:
    """A Parquet row group's column read in batches, forward; a row behind the last batch starts it again."""

    def __init__(self, tab: Table, rg: int, column: str):
        self.tab, self.rg, self.column = tab, rg, column
        self._restart()

    def _restart(self) -> None:
        self._it = self.tab._pf.iter_batches(batch_size=STREAM_ROWS, row_groups=[self.rg], columns=[self.column])
        self._start, self._batch = 0, None

    def cell(self, row: int):
        if self._batch is not None and row < self._start:
            self._restart()
        while self._batch is None or row >= self._start + self._batch.num_rows:
            if self._batch is not None:
                self._start += self._batch.num_rows
            self._batch = next(self._it)  # StopIteration past the end: recorded as the row's failure
        return self._batch.column(0)[row - self._start]


def _cell_bytes(cell) -> tuple[object, int]:
    """(the scalar holding the image bytes or None, its size in bytes) of a binary or {bytes, path} cell."""
    if hasattr(cell, "keys") and "bytes" in cell.keys():
        if not cell.is_valid:
            return None, 0
        cell = cell["bytes"]
    if not cell.is_valid or not hasattr(cell, "as_buffer"):
        return cell, 0
    return cell, cell.as_buffer().size


def read_cell(url: str, rg: int, row: int, column: str, max_bytes: int = MAX_CELL_BYTES) -> tuple[bytes | None, str]:
    """The image bytes of one cell, or (None, reason); a cell larger than ``max_bytes`` is refused without being
    copied or decoded.  Never raises."""
    try:
        cell = _group_cells(url, rg, row, column, max_bytes)
        data, size = _cell_bytes(cell)
    except FeatxError as exc:
        return None, f"cannot read: {exc}"
    except Exception as exc:  # noqa: BLE001 - a damaged row group is recorded for its rows
        return None, f"cannot read: {type(exc).__name__}: {str(exc)[:200]}"
    if size > max_bytes:
        return None, (f"image cell of {size} bytes is larger than --max-image-bytes {max_bytes}; not read (raise "
                      "--max-image-bytes if it is a real image)")
    value = cell.as_py() if not (hasattr(cell, "keys") and "bytes" in cell.keys()) else None
    if hasattr(cell, "keys") and "bytes" in cell.keys():
        if not cell.is_valid:
            return None, "sample without an image (empty cell)"
        if not data.is_valid:
            path = cell["path"].as_py() if "path" in cell.keys() else None
            where = f" (only a path: {path!r}; featx reads it from there when it exists)" if path else ""
            return None, f"image cell has no bytes{where}"
        value = data.as_py()
    if value is None:
        return None, "sample without an image (empty cell)"
    if not isinstance(value, (bytes, bytearray)):
        return None, f"image cell holds {type(value).__name__}, not encoded image bytes"
    return bytes(value), ""
