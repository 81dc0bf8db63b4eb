"""Files that are either complete or absent: atomic commits, strict JSON, file hashes.

Everything featx writes (chunks, caches, checkpoints, results) goes through a temporary name,
fsync and rename, so a kill or a full disk at any instant never leaves a half-written file.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import uuid
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .errors import FileWriteError
from .text import csv_row, csv_value


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside ``path`` durable."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_commit(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """fsync ``tmp`` and rename it onto ``final`` (atomic on POSIX file systems)."""
    fd = os.open(str(tmp), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, final)
    fsync_dir(Path(final).parent)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes (weights files, saved heads), read in 1 MB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def json_default(o: Any) -> Any:
    """numpy scalars and arrays, paths; anything else as its ``str`` (settings objects, dtypes)."""
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def clean_json(o: Any) -> Any:
    """NaN/inf become null so that the file is strict JSON."""
    if isinstance(o, dict):
        return {str(k): clean_json(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [clean_json(v) for v in o]
    if isinstance(o, np.generic):
        o = o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented strict JSON (NaN/inf as null), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(clean_json(obj), indent=2, default=json_default, allow_nan=False) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a unique temporary name, fsync and rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_bytes(data)
        atomic_commit(tmp, path)
    except OSError as exc:  # a full disk, a quota, a read-only folder: one line naming the file, no temporary left
        unlink_quiet(tmp)  # may fail too (a "folder" that is a file): the write's error is the one to report
        if isinstance(exc, FileWriteError):
            raise
        raise FileWriteError(f"cannot write {path} ({exc.strerror or type(exc).__name__}); free disk space or "
                             "choose a folder you can write, then run the command again") from exc
    except BaseException:
        unlink_quiet(tmp)
        raise
    return path


def unlink_quiet(p: str | os.PathLike) -> None:
    """Remove ``p`` if it is there; a removal that fails (a "folder" that is a file) is not the error to report."""
    try:
        os.unlink(p)
    except OSError:
        pass


# CSV files featx writes are opened by people in spreadsheets: every text cell goes through
# featx.base.text.csv_cell (never run as a formula), and file names that are not UTF-8 are kept byte
# for byte (surrogateescape), so a path read back names the same file.
CSV_ENCODING = {"encoding": "utf-8", "errors": "surrogateescape"}


def csv_text(header: Iterable[Any], rows: Iterable[Iterable[Any]]) -> str:
    """The text of a CSV file: ``header``, then ``rows``, every text cell through csv_cell."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(csv_row(header))
    w.writerows(csv_row(r) for r in rows)
    return buf.getvalue()


def write_csv(path: str | os.PathLike, header: Iterable[Any], rows: Iterable[Iterable[Any]]) -> Path:
    """Write a CSV atomically (see :func:`csv_text`); a full disk is a FileWriteError naming the file."""
    return atomic_write_bytes(path, csv_text(header, rows).encode(CSV_ENCODING["encoding"], CSV_ENCODING["errors"]))


def read_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of a CSV written by :func:`write_csv`, as dicts of the values that were written."""
    with open(path, newline="", **CSV_ENCODING) as fh:
        return [{k: csv_value(v) if isinstance(v, str) else v for k, v in r.items()} for r in csv.DictReader(fh)]
