"""Is an HDF5 file safe and whole before featx reads it?  Self-contained, consistent, undamaged.

Why: a cache or chunk file comes from a stranger as easily as from featx itself, and disks
corrupt bytes silently.  HDF5 can make a dataset read another file (external raw storage,
external links, virtual datasets) and can declare shapes far larger than the file holds (so a
29 KB file reads as terabytes of zeros).  Neither is anything featx writes, so both are
refused, naming the dataset, before any array is read.  Feature rows carry 64-bit checksums
(``checksums/<dataset>``, one per row: a weighted sum of the row's words), written by featx
and verified whenever rows are read; a file without them (written before checksums existed)
opens as before, unverified.  Per row, so that a row that turned NaN/inf is named by the
NaN/inf rule and any other changed row by its checksum, and a read of any rows checks exactly
those rows.
"""

from __future__ import annotations

import json
import logging
from typing import Iterator

import h5py
import numpy as np

from ...base.errors import FeatxError
from ...base.files import open_regular

CHECKSUM_GROUP = "checksums"
MAX_DEPTH = 8  # featx files nest 3 deep; a hard-link cycle would otherwise recurse forever
MAX_OBJECTS = 10000
log = logging.getLogger(__name__)
COMPRESSION_RATIO = 100  # a filtered (compressed) dataset may declare at most this many times its storage
MAX_ATTRS = 256  # featx writes about 30 attributes on a cache, 1 on a chunk file
MAX_ATTR_BYTES = 1 << 20  # featx's largest attribute (fingerprint_json) is a few KB


class CacheDamagedError(FeatxError):
    """A cache's bytes do not match its checksums, or HDF5 cannot read them."""


# --------------------------------------------------------------------------- structure


def _walk(g: h5py.Group, prefix: str, depth: int, seen: list) -> Iterator[tuple[str, h5py.Dataset]]:
    """(name, dataset) of every dataset below ``g``; soft and external links are refused, never followed."""
    if depth > MAX_DEPTH:
        raise ValueError(f"group {prefix or '/'} is nested deeper than {MAX_DEPTH} levels")
    for name in g:
        full = f"{prefix}{name}"
        seen.append(full)
        if len(seen) > MAX_OBJECTS:
            raise ValueError(f"the file holds more than {MAX_OBJECTS} objects")
        try:
            link = g.get(name, getlink=True)
        except Exception:  # noqa: BLE001 - a user-defined link class h5py cannot show
            raise ValueError(f"{full!r} is a link of an unknown kind") from None
        if isinstance(link, h5py.ExternalLink):
            raise ValueError(f"{full!r} is an external link to {link.filename!r}")
        if isinstance(link, h5py.SoftLink):
            raise ValueError(f"{full!r} is a soft link to {link.path!r}")
        if not isinstance(link, h5py.HardLink):
            raise ValueError(f"{full!r} is a link of an unknown kind")
        obj = g[name]
        if isinstance(obj, h5py.Group):
            yield from _walk(obj, full + "/", depth + 1, seen)
        elif isinstance(obj, h5py.Dataset):
            yield full, obj


def _declared_bytes(d: h5py.Dataset) -> int:
    n = 1
    for s in d.shape or ():
        n *= int(s)
    return n * int(d.id.get_type().get_size())


def check_file(f: h5py.File) -> None:
    """Raise ValueError naming the dataset unless ``f`` is self-contained and its shapes fit its size.

    Refused: external raw storage, virtual datasets, external and soft links (anywhere); a
    dataset declaring more bytes than it stores (unwritten storage reads as zeros without end);
    storage that adds up to more than the file (chunks pointing at the same bytes).
    """
    check_attrs(f)
    total = 0
    for name, d in _walk(f, "", 0, []):
        if d.external:
            raise ValueError(f"dataset {name!r} stores its data in another file ({d.external[0][0]!r})")
        if d.is_virtual:
            raise ValueError(f"dataset {name!r} is a virtual dataset (it reads other files)")
        if d.dtype.hasobject:  # variable-length values: what a read allocates is their lengths, not 16 bytes each
            vlen = vlen_bytes(f, name, d)
            if vlen > f.id.get_filesize() + (1 << 20):
                raise ValueError(f"dataset {name!r} holds {vlen} bytes of variable-length values, more than the "
                                 f"file's {f.id.get_filesize()} bytes (its elements share heap objects)")
        declared, stored = _declared_bytes(d), int(d.id.get_storage_size())
        filtered = d.id.get_create_plist().get_nfilters() > 0
        if (stored < declared and not filtered) or declared > COMPRESSION_RATIO * stored + (1 << 20):
            raise ValueError(f"dataset {name!r} declares shape {d.shape} ({declared} bytes) but the file stores "
                             f"only {stored} bytes of it")
        total += stored
    size = f.id.get_filesize()
    if total > size:
        raise ValueError(f"its datasets claim {total} bytes of storage, more than the file's {size} bytes")


def _raw_blocks(f: h5py.File, name: str, d: h5py.Dataset, block: int = 16 << 20) -> Iterator[bytes]:
    """The stored bytes of an unfiltered dataset, as they are on disk (for variable-length values: heap IDs)."""
    plist = d.id.get_create_plist()
    if plist.get_nfilters():
        raise ValueError(f"dataset {name!r} stores variable-length values compressed (featx writes them plain)")
    layout = plist.get_layout()
    if layout == h5py.h5d.CHUNKED:
        for i in range(d.id.get_num_chunks()):
            yield d.id.read_direct_chunk(d.id.get_chunk_info(i).chunk_offset)[1]
        return
    if layout != h5py.h5d.CONTIGUOUS:
        raise ValueError(f"dataset {name!r} stores variable-length values in a compact or virtual layout "
                         "(featx writes them contiguous)")
    offset, size = d.id.get_offset(), int(d.id.get_storage_size())
    if offset is None or not size:
        return
    with open_regular(f.filename) as fh:
        fh.seek(offset)
        for _ in range(0, size, block):
            data = fh.read(min(block, size))
            size -= len(data)
            if not data:
                return
            yield data


def vlen_bytes(f: h5py.File, name: str, d: h5py.Dataset) -> int:
    """The bytes a read of the variable-length dataset ``d`` allocates: the sum of its elements' lengths, taken
    from the heap IDs stored in the dataset (length, heap collection address, object index) without reading
    the heap.  Why: 200,000 elements can all point at one 10 MB heap object, and a read copies it for each.
    """
    t = d.id.get_type()
    if isinstance(t, h5py.h5t.TypeStringID) and t.is_variable_str():
        unit = 1
    elif isinstance(t, h5py.h5t.TypeVlenID) and not t.get_super().detect_class(h5py.h5t.VLEN):
        unit = int(t.get_super().get_size())
    else:
        raise ValueError(f"dataset {name!r} holds variable-length values or references inside {d.dtype} "
                         "(featx writes only plain texts and byte strings)")
    record = 8 + int(f.id.get_create_plist().get_sizes()[0])  # 4 bytes of length, the address, 4 of index
    total = 0
    for raw in _raw_blocks(f, name, d):
        n = len(raw) // record
        lengths = np.frombuffer(raw, np.uint8, n * record).reshape(n, record)[:, :4].copy().view("<u4")
        total += int(lengths.sum(dtype=np.int64)) * unit
    return total


def check_attrs(obj: h5py.Group | h5py.Dataset) -> None:
    """Raise ValueError naming the attribute unless ``obj``'s attributes are few, scalar and small.

    Why: reading attributes (``dict(f.attrs)``) loads them whole, and it happens before any
    dataset check.  featx writes only scalar numbers and strings, so an array attribute (whose
    variable-length elements could all point at one large heap object) or a huge one is refused
    before it is read.
    """
    names = list(obj.attrs)
    if len(names) > MAX_ATTRS:
        raise ValueError(f"{obj.name!r} has {len(names)} attributes (featx writes at most {MAX_ATTRS})")
    for name in names:
        a = obj.attrs.get_id(name)
        if a.shape != ():
            raise ValueError(f"attribute {name!r} of {obj.name!r} is an array of shape {a.shape} "
                             "(featx writes single values)")
        t = a.get_type()
        size = max(int(a.get_storage_size()), int(t.get_size()))
        if isinstance(t, h5py.h5t.TypeStringID) and t.is_variable_str():  # the sizes above are of its pointer
            size = max(size, len(obj.attrs[name]))  # one string: no larger than the file, read once to measure
        if size > MAX_ATTR_BYTES:
            raise ValueError(f"attribute {name!r} of {obj.name!r} stores {size} bytes (at most {MAX_ATTR_BYTES})")


def check_rows(labels: np.ndarray, codes: np.ndarray, n_classes: int, split_names: list[str]) -> None:
    """Raise ValueError unless labels index the classes and each split is one contiguous run of rows."""
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise ValueError(f"dataset 'labels' is not a list of integers ({labels.dtype}, shape {labels.shape})")
    if codes.ndim != 1 or codes.dtype.kind not in "iu":
        raise ValueError(f"dataset 'split' is not a list of integers ({codes.dtype}, shape {codes.shape})")
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        bad = np.flatnonzero((labels < 0) | (labels >= n_classes))
        raise ValueError(f"labels of rows {rows_text(bad)} are outside the {n_classes} classes")
    if len(codes) and codes.max() >= len(split_names):
        bad = np.flatnonzero(codes >= len(split_names))
        raise ValueError(f"split codes of rows {rows_text(bad)} name no split (the cache has {len(split_names)})")
    if len(codes) > 1 and np.count_nonzero(np.diff(codes.astype(np.int64))) != len(np.unique(codes)) - 1:
        raise ValueError("the rows of a split are not contiguous (featx writes each split as one run)")


def rows_text(rows: np.ndarray, shown: int = 5) -> str:
    head = ", ".join(str(int(r)) for r in rows[:shown])
    return head + (f", ... ({len(rows)} in all)" if len(rows) > shown else "")


# --------------------------------------------------------------------------- checksums


_WEIGHTS: dict[int, np.ndarray] = {}


def _weights(n: int) -> np.ndarray:
    """Fixed odd 64-bit weights: a change to any one word of a row always changes its hash."""
    if n not in _WEIGHTS:
        _WEIGHTS[n] = np.random.default_rng(0x5EED).integers(0, 2**63, n, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    return _WEIGHTS[n]


def row_hashes(block: np.ndarray) -> np.ndarray:
    """A 64-bit checksum per row (weighted sum of its little-endian words, mod 2**64), vectorised."""
    arr = np.ascontiguousarray(block)
    if arr.size == 0:
        return np.zeros(len(arr), np.uint64)
    arr = np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("<"), copy=False)).reshape(len(arr), -1)
    raw = arr.view(np.uint8)
    width = raw.shape[1]
    words = raw.view("<u4") if width % 4 == 0 else raw.view("<u2") if width % 2 == 0 else raw
    return np.einsum("ij,j->i", words, _weights(words.shape[1]))  # uint64, wraps mod 2**64; no temporary


def _table_name(dataset: str) -> str:
    return f"{CHECKSUM_GROUP}/{dataset.replace('/', ':')}"


def write_checksums(f: h5py.File, block_rows: int = 16384) -> None:
    """Store ``checksums/<dataset>`` (one uint64 per row) for every feature dataset, read back from ``f``."""
    for dataset in feature_datasets(f):
        d = f[dataset]
        n = int(d.shape[0])
        out = f.create_dataset(_table_name(dataset), shape=(n,), dtype=np.uint64)
        for a in range(0, n, block_rows):
            out[a : a + block_rows] = row_hashes(d[a : a + block_rows])


def checksum_table(f: h5py.File, dataset: str) -> h5py.Dataset | None:
    """The per-row checksums of ``dataset``, or None for a file written without checksums."""
    name = _table_name(dataset)
    if name not in f:
        return None
    table = f[name]
    if table.shape != (f[dataset].shape[0],) or table.dtype != np.uint64:
        raise ValueError(f"checksum dataset {name!r} is malformed")
    return table


def mismatched(raw: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Indices of the rows of ``raw`` whose checksum is not ``want``."""
    return np.flatnonzero(row_hashes(raw) != want) if len(raw) else np.zeros(0, np.int64)


def read_verified(f: h5py.File, dataset: str, rows: slice, path) -> np.ndarray:
    """``f[dataset][rows]``, its rows checked against their checksums: a warning names the rows that fail
    and the fix (``featx embed`` embeds them again, ``featx verify`` fails); CacheDamagedError when HDF5
    cannot read them at all.  Rows that now hold NaN/inf are left to the callers' NaN/inf rule (they
    never reach a head).
    """
    try:
        d = f[dataset]
        raw = d[rows]
        table = checksum_table(f, dataset) if isinstance(rows, slice) and rows.step in (None, 1) else None
        bad = mismatched(raw, table[rows]) if table is not None else np.zeros(0, np.int64)
    except (OSError, ValueError, KeyError) as exc:
        raise CacheDamagedError(
            f"cache {str(path)!r} is damaged: HDF5 cannot read dataset {dataset!r} ({' '.join(str(exc).split())[:200]}); "
            "delete it and rebuild it with `featx embed DATA` (or `featx embed DATA --overwrite`)"
        ) from None
    if len(bad):
        bad = bad[np.isfinite(np.asarray(raw[bad], dtype=np.float64)).all(axis=1)]
    if len(bad):  # reported, not refused: the rows are still what the file holds, and the fix is named
        log.warning("%s", damage_message(path, dataset, bad + (rows.start or 0)))
    return raw


def read_or_refuse(f: h5py.File, name: str, rows, path) -> np.ndarray:
    """``f[name][rows]``, or CacheDamagedError naming the cache, the dataset and the fix when HDF5 cannot read it
    (a corrupted heap or B-tree: an OSError deep in HDF5 that was a traceback)."""
    try:
        return f[name][rows]
    except (OSError, ValueError, KeyError, UnicodeError) as exc:
        raise CacheDamagedError(
            f"cache {str(path)!r} is damaged: HDF5 cannot read dataset {name!r} ({' '.join(str(exc).split())[:200]}); "
            "delete it and rebuild it with `featx embed DATA` (or `featx embed DATA --overwrite`)") from None


def read_everything(f: h5py.File, path, block_rows: int = 65536) -> None:
    """Read every dataset of ``f`` in blocks of rows (what any command may read), raising CacheDamagedError for
    the first that HDF5 cannot read; variable-length values are bounded by :func:`check_file` first."""
    check_file(f)
    for name, d in _walk(f, "", 0, []):
        n = int(d.shape[0]) if d.shape else 1
        for a in range(0, max(n, 1), block_rows):
            read_or_refuse(f, name, slice(a, a + block_rows) if d.shape else (), path)


def damage_message(path, dataset: str, rows: np.ndarray) -> str:
    return (f"cache {str(path)!r} is damaged: rows {rows_text(rows)} of dataset {dataset!r} do not match their "
            "checksums (modified or corrupted on disk); rerun `featx embed DATA` to embed those rows again, or "
            "delete the cache and rebuild it (`featx verify` checks a whole cache)")


def feature_datasets(f: h5py.File) -> list[str]:
    """The [rows, width] feature datasets of a cache or chunk file (those that carry checksums)."""
    names = []
    for prefix in ("", "augmented/"):
        if prefix + "features" in f:
            names.append(prefix + "features")
        if prefix + "parts" in f:
            names.extend(f"{prefix}parts/{k}" for k in f[prefix + "parts"])
    return names


def scan_damage(f: h5py.File, *, block_rows: int = 65536) -> dict[str, np.ndarray]:
    """{dataset: rows whose checksum does not match (NaN/inf ones included)} over datasets with checksums."""
    out: dict[str, np.ndarray] = {}
    for name in feature_datasets(f):
        table = checksum_table(f, name)
        if table is None:
            continue
        d, bad = f[name], []
        for a in range(0, int(d.shape[0]), block_rows):
            b = min(a + block_rows, int(d.shape[0]))
            try:
                bad.append(mismatched(d[a:b], table[a:b]) + a)
            except OSError:  # HDF5 cannot even read these rows
                bad.append(np.arange(a, b))
        rows = np.concatenate(bad) if bad else np.zeros(0, np.int64)
        if len(rows):
            out[name] = rows
    return out


def verify_chunk(f: h5py.File) -> None:
    """Raise ValueError unless a chunk file is self-contained and its features match their checksums."""
    check_file(f)
    damage = scan_damage(f)
    if damage:
        name, rows = next(iter(damage.items()))
        raise ValueError(f"rows {rows_text(rows)} of dataset {name!r} do not match their checksums")


def check_layout(f: h5py.File, classes: list, meta: dict, split_names: list[str], codes: np.ndarray) -> None:
    """Raise ValueError unless a finished cache's values have the types and ranges featx reads them as."""
    for name in feature_datasets(f):
        d = f[name]
        if d.ndim != 2 or d.dtype.kind != "f":
            raise ValueError(f"dataset {name!r} is not a 2-D array of floats ({d.dtype}, shape {d.shape})")
    bad = [c for c in classes if not isinstance(c, str)]
    if bad:
        raise ValueError(f"dataset 'classes' holds non-text class names ({str(bad[0])[:40]!r})")
    try:
        fp = json.loads(meta["fingerprint_json"])
    except (TypeError, ValueError, RecursionError):
        fp = None
    if not isinstance(fp, dict):
        raise ValueError("attribute 'fingerprint_json' is not a JSON object")
    check_rows(f["labels"][()], np.asarray(codes), len(classes), split_names)
