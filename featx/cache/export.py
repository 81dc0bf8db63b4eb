"""``featx export``: a cache as one row per image (path, label, split, features) for other tools.

Why: pandas, Ray Data, Spark and vector databases read Parquet (or .npy / CSV), not featx's
HDF5 layout.  Rows are streamed in blocks of ``chunk_rows`` (features through
:meth:`FeatureCache.iter_features`, the per-row columns sliced alongside), so a cache larger
than memory exports in constant memory.  Parquet carries the cache's attributes (backbone,
weights sha256, preprocessing, fingerprint...) and the class list as file metadata; features
are a fixed-size list of float32, the layout vector stores expect.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from ..base.choices import EXPORT_FORMATS
from ..base.errors import FeatxError
from ..base.io import CSV_ENCODING, atomic_commit
from ..base.text import csv_row
from .keys import decode_key
from .multi import open_cache
from .reader import FeatureCache

log = logging.getLogger(__name__)

FORMATS = EXPORT_FORMATS
CHUNK_ROWS = 8192


def _view_kwargs(fc: FeatureCache, view: str | None) -> dict:
    if view is None:
        return {}
    fc.view_dim(view)  # an unknown view, or one the cache cannot give, is refused with the views it has
    return {"view": view}


def _blocks(fc: FeatureCache, *, kw: dict, chunk_rows: int) -> Iterator[tuple[np.ndarray, list[str], np.ndarray, np.ndarray]]:
    """(features, keys, labels, split codes) for consecutive blocks of rows, in cache order."""
    start = 0
    with h5py.File(getattr(fc, "first", fc).path, "r") as f:  # a cache set: its members hold the same rows
        for feats in fc.iter_features(None, rows=chunk_rows, **kw):
            stop = start + len(feats)
            keys = [decode_key(k) for k in f["paths"][start:stop]]
            yield feats, keys, f["labels"][start:stop].astype(np.int64), f["split"][start:stop]
            start = stop


def _finite(blocks, left_out: list[str]):
    """The blocks without rows whose features are NaN/inf (a damaged cache); their keys go to ``left_out``."""
    for feats, keys, labels, codes in blocks:
        ok = np.isfinite(feats).all(axis=1)
        if not ok.all():
            left_out += [k for k, good in zip(keys, ok) if not good]
            feats, labels, codes, keys = feats[ok], labels[ok], codes[ok], [k for k, good in zip(keys, ok) if good]
        yield feats, keys, labels, codes


def _shortened(path: Path, n: int) -> None:
    """The .npy matrix at ``path`` cut to its first ``n`` rows (rows were left out), copied block by block."""
    src = np.load(path, mmap_mode="r")
    short = path.with_name(path.name + ".short")
    try:
        dst = np.lib.format.open_memmap(short, mode="w+", dtype=np.float32, shape=(n, src.shape[1]))
        for a in range(0, n, CHUNK_ROWS):
            b = min(n, a + CHUNK_ROWS)
            dst[a:b] = src[a:b]
        dst.flush()
        del dst, src
        os.replace(short, path)
    finally:
        short.unlink(missing_ok=True)


def _utf8(key: str) -> str:
    """A key that is valid UTF-8 text (non-UTF-8 file names come back as surrogates; Parquet strings cannot hold them)."""
    try:
        key.encode("utf-8")
        return key
    except UnicodeEncodeError:
        return key.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def cache_metadata(fc: FeatureCache) -> dict[str, str]:
    """The cache's attributes as strings (JSON for non-strings), plus ``classes`` and the source file."""
    meta = {k: v if isinstance(v, str) else json.dumps(v, default=str) for k, v in fc.meta.items()}
    meta["classes"] = json.dumps(fc.classes)
    meta["source_cache"] = str(fc.path)
    return meta


def _tmp_for(out: Path) -> Path:
    return out.with_name(f".{out.name}.tmp")


def _export_parquet(fc: FeatureCache, out: Path, blocks, split_names: list[str], dim: int) -> None:
    import pyarrow as pa  # optional extra featx[parquet]
    import pyarrow.parquet as pq

    schema = pa.schema(
        [("path", pa.string()), ("label", pa.string()), ("label_index", pa.int64()), ("split", pa.string()),
         ("features", pa.list_(pa.float32(), dim))],
        metadata={f"featx.{k}".encode(): v.encode() for k, v in cache_metadata(fc).items()},
    )
    classes = np.asarray(fc.classes, dtype=object)
    names = np.asarray(split_names, dtype=object)
    tmp = _tmp_for(out)
    with pq.ParquetWriter(tmp, schema) as w:
        for feats, keys, labels, codes in blocks:
            flat = pa.array(np.ascontiguousarray(feats, dtype=np.float32).reshape(-1), type=pa.float32())
            w.write_table(pa.table(
                [pa.array([_utf8(k) for k in keys], pa.string()), pa.array(classes[labels], pa.string()), pa.array(labels, pa.int64()),
                 pa.array(names[codes], pa.string()), pa.FixedSizeListArray.from_arrays(flat, dim)],
                schema=schema,
            ))
    atomic_commit(tmp, out)


def _export_npy(fc: FeatureCache, out: Path, blocks, split_names: list[str], dim: int) -> list[Path]:
    rows_csv = out.with_suffix(".rows.csv")
    meta_json = out.with_suffix(".meta.json")
    tmp = _tmp_for(out)
    arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(fc), dim))
    pos = 0
    with open(_tmp_for(rows_csv), "w", newline="", **CSV_ENCODING) as fh:  # file names byte for byte
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["row", "path", "label", "label_index", "split"])
        for feats, keys, labels, codes in blocks:
            arr[pos : pos + len(feats)] = feats
            for i, k in enumerate(keys):  # names never run as formulas in a spreadsheet
                w.writerow(csv_row([pos + i, k, fc.classes[labels[i]], int(labels[i]), split_names[codes[i]]]))
            pos += len(feats)
    arr.flush()
    del arr
    if pos < len(fc):  # rows with NaN/inf features were left out
        _shortened(tmp, pos)
    _tmp_for(meta_json).write_text(json.dumps(cache_metadata(fc), indent=1), encoding="utf-8")
    for final in (out, rows_csv, meta_json):
        atomic_commit(_tmp_for(final), final)
    return [out, rows_csv, meta_json]


def _export_csv(fc: FeatureCache, out: Path, blocks, split_names: list[str], dim: int) -> None:
    tmp = _tmp_for(out)
    with open(tmp, "w", newline="", **CSV_ENCODING) as fh:  # file names byte for byte
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["path", "label", "label_index", "split"] + [f"f{j}" for j in range(dim)])
        for feats, keys, labels, codes in blocks:
            for i, k in enumerate(keys):  # names never run as formulas in a spreadsheet
                w.writerow(csv_row([k, fc.classes[labels[i]], int(labels[i]), split_names[codes[i]]])
                           + [format(float(x), ".7g") for x in feats[i]])
    atomic_commit(tmp, out)


def export_cache(
    cache: FeatureCache | str | os.PathLike,
    *,
    fmt: str = "parquet",
    out: str | os.PathLike,
    view: str | None = None,
    chunk_rows: int = CHUNK_ROWS,
) -> dict:
    """Write every cached image as one row: ``path`` (relative to the data set root), ``label``
    (class name), ``label_index``, ``split`` and ``features``.

    ``fmt``: "parquet" (features as fixed-size float32 lists, cache attributes as ``featx.*`` file
    metadata), "npy" (``out`` holds the [N, D] float32 matrix; ``<out>.rows.csv`` the rows in the
    same order, ``<out>.meta.json`` the attributes) or "csv" (one column per feature).  Files
    appear complete or not at all.  Returns ``{"out", "files", "rows", "dim", "format"}``.
    """
    if fmt not in FORMATS:
        raise FeatxError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if chunk_rows < 1:
        raise FeatxError(f"chunk_rows must be at least 1, got {chunk_rows}")
    fc = open_cache(cache)  # a cache, or a set of several backbones' caches (view VIEW@A+B)
    out = Path(out)
    if out.is_dir():
        raise FeatxError(f"--out {str(out)!r} is a folder; give a file name such as {out / (fc.path.stem + '.' + fmt)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    split_names = json.loads(fc.meta["split_names"])
    left_out: list[str] = []  # rows of a damaged cache whose features are NaN/inf are never exported
    blocks = _finite(_blocks(fc, kw=_view_kwargs(fc, view), chunk_rows=chunk_rows), left_out)
    dim = fc.view_dim(view)
    try:
        if fmt == "parquet":
            _export_parquet(fc, out, blocks, split_names, dim)
            files = [out]
        elif fmt == "npy":
            files = _export_npy(fc, out, blocks, split_names, dim)
        else:
            _export_csv(fc, out, blocks, split_names, dim)
            files = [out]
    except BaseException as exc:  # no half-written temporary files left behind, whatever stopped us
        for f in (out, out.with_suffix(".rows.csv"), out.with_suffix(".meta.json")):
            _tmp_for(f).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise FeatxError(f"could not write {out} ({exc}); free disk space or choose another --out") from exc
        raise
    if left_out:
        log.warning("export: %d row(s) of %s have NaN/inf features and were left out (e.g. %s); the cache is damaged: "
                    "`featx verify %s` lists them, and `featx embed DATA` embeds them again", len(left_out),
                    fc.path.name, left_out[0], fc.path)
    rows = len(fc) - len(left_out)
    log.info("export: %d rows x %d features (view %s) -> %s", rows, dim, view or "final", ", ".join(map(str, files)))
    return {"out": str(out), "files": [str(f) for f in files], "rows": rows, "dim": dim, "format": fmt,
            "view": view or "final", "left_out": left_out}
