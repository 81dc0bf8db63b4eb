"""The ``NAME.h5.parts/`` folder: chunk files, each committed atomically, and the atomic HDF5 write they share."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from ..base.errors import CacheMismatchError, CacheWriteError, FeatxError
from ..base.files import irregular_kind, read_regular
from ..base.io import atomic_commit, atomic_write_bytes, unlink_quiet
from .keys import BYTES_DTYPE, STR_DTYPE, decode_key, key_array, part_path
from .trust import integrity

log = logging.getLogger(__name__)


@dataclass
class Chunk:
    """Embedded results for a set of images (a committed unit of work)."""

    keys: list[str]
    features: np.ndarray
    mtime_ns: np.ndarray
    size: np.ndarray
    failed: list[tuple[str, str, int, int]] = field(default_factory=list)  # key, reason, mtime, size
    seconds: float = 0.0  # time spent embedding it, wherever it ran (summed into the cache's embed_seconds)
    parts: dict[str, np.ndarray] = field(default_factory=dict)  # extra feature parts (featx.cache.views)


class PartsDir:
    """The ``.parts`` folder of committed chunk files for one cache."""

    def __init__(self, final_path: str | os.PathLike, fingerprint: dict) -> None:
        self.final = Path(final_path)
        self.dir = Path(str(final_path) + ".parts")
        self.fingerprint = fingerprint

    def exists(self) -> bool:
        return self.dir.is_dir()

    def ensure(self) -> None:
        """Create the folder with its meta.json, or check that an existing one matches."""
        meta = self.dir / "meta.json"
        if meta.exists():
            try:
                found = json.loads(read_regular(meta, "work-in-progress file"))
            except (OSError, ValueError):
                found = None
            if found != self.fingerprint:
                raise CacheMismatchError(
                    f"unfinished work in {self.dir} was produced with other settings "
                    f"({settings_diff(found or {}, self.fingerprint)}); rerun with --overwrite to discard it, "
                    "or pass another --cache path"
                )
            return
        tmp = self.dir / f".meta.json.{uuid.uuid4().hex}.tmp"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(self.fingerprint, sort_keys=True, indent=1))
            atomic_commit(tmp, meta)
        except OSError as exc:
            unlink_quiet(tmp)
            raise FeatxError(
                f"could not start the cache's work folder {self.dir} ({why(exc)}); free disk space or fix "
                "permissions, or pass another --cache-dir / --cache"
            ) from exc

    def chunk_files(self) -> list[Path]:
        # a FIFO or device named like a chunk file is never opened (HDF5's open would block for ever)
        return sorted(p for p in self.dir.glob("chunk-*.h5") if not irregular_kind(p)) if self.exists() else []

    def write_chunk(self, chunk: Chunk, *, worker: str = "0") -> Path:
        """Commit one chunk atomically; returns its final path."""
        name = f"chunk-{worker}-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.h5"
        final = self.dir / name
        kept = (
            f"everything committed before is kept in {self.dir}. Free disk space (or fix permissions) and rerun "
            "the same command to resume."
        )
        # Built in memory, then written as bytes through a temporary name: a full disk fails the plain write
        # (one line, nothing left behind), never HDF5 with a half-written file open (which crashed the process).
        buf = io.BytesIO()
        with h5py.File(buf, "w") as f:
            self._fill_chunk(f, chunk)
        try:
            atomic_write_bytes(final, buf.getvalue())
        except OSError as exc:
            raise CacheWriteError(f"could not write {final} ({why(exc)}); {kept}") from exc
        return final

    @staticmethod
    def _fill_chunk(f: h5py.File, chunk: Chunk) -> None:
        """The chunk's datasets and checksums, written into the open HDF5 file ``f``."""
        f.create_dataset("paths", data=key_array(chunk.keys), dtype=BYTES_DTYPE)
        f.create_dataset("features", data=chunk.features)
        for pname, arr in chunk.parts.items():
            f.create_dataset(part_path(pname), data=arr)
        f.create_dataset("mtime_ns", data=np.asarray(chunk.mtime_ns, dtype=np.int64))
        f.create_dataset("size", data=np.asarray(chunk.size, dtype=np.int64))
        fk = [k for k, _, _, _ in chunk.failed]
        f.create_dataset("failed_paths", data=key_array(fk), dtype=BYTES_DTYPE)
        f.create_dataset("failed_reasons", data=[r for _, r, _, _ in chunk.failed], dtype=STR_DTYPE)
        f.create_dataset("failed_mtime_ns", data=np.asarray([m for _, _, m, _ in chunk.failed], dtype=np.int64))
        f.create_dataset("failed_size", data=np.asarray([s for _, _, _, s in chunk.failed], dtype=np.int64))
        f.attrs["seconds"] = float(chunk.seconds)
        integrity.write_checksums(f)

    def total_seconds(self) -> float:
        """Embedding time of every committed chunk (shards, Ray actors, killed runs included)."""
        total = 0.0
        for cf in self.chunk_files():
            try:
                with h5py.File(cf, "r") as f:
                    integrity.check_attrs(f)
                    total += float(f.attrs.get("seconds", 0.0))
            except (OSError, ValueError, TypeError):  # a damaged chunk is re-embedded by read_index
                continue
        return total

    def read_index(self) -> dict[str, tuple]:
        """key -> ("chunk", file, row, mtime, size) or ("failed", reason, mtime, size) over all chunks.

        A chunk file that cannot be read (it can only be damaged from outside, since commits
        are atomic) is moved aside and its images are embedded again.
        """
        index: dict[str, tuple] = {}
        for cf in self.chunk_files():
            try:
                with h5py.File(cf, "r") as f:
                    integrity.verify_chunk(f)  # self-contained, sizes real, features match checksums: before any read
                    keys = [decode_key(k) for k in f["paths"][()]]
                    mt = f["mtime_ns"][()]
                    sz = f["size"][()]
                    fkeys = [decode_key(k) for k in f["failed_paths"][()]]
                    freasons = [r.decode() if isinstance(r, bytes) else r for r in f["failed_reasons"][()]]
                    fmt = f["failed_mtime_ns"][()]
                    fsz = f["failed_size"][()]
            except Exception as exc:  # noqa: BLE001 - any damage means: redo that chunk
                log.warning("chunk file %s is unreadable (%s); its images will be embedded again", cf, exc)
                os.replace(cf, cf.with_suffix(".damaged"))
                continue
            for i, k in enumerate(keys):
                index[k] = ("chunk", cf, i, int(mt[i]), int(sz[i]))
            for k, r, m, s in zip(fkeys, freasons, fmt, fsz):
                index[k] = ("failed", r, int(m), int(s))
        return index

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager


def atomic_h5(tmp: Path, final: Path, *, what: str, kept: str) -> Iterator[h5py.File]:
    """Yield ``tmp`` open for writing, then fsync and rename it onto ``final``.

    On failure ``tmp`` is removed and a :class:`CacheWriteError` says what is ``kept``. h5py
    reports a failed write (disk full, file-size limit) as a RuntimeError on close, not OSError.
    """
    try:
        with h5py.File(tmp, "w") as f:
            yield f
        atomic_commit(tmp, final)
    except (OSError, RuntimeError) as exc:
        unlink_quiet(tmp)
        raise CacheWriteError(f"could not write {what} ({why(exc)}); {kept}") from exc


def why(exc: BaseException) -> str:
    """A one-line reason; HDF5's multi-line write errors are reduced to their system message."""
    text = getattr(exc, "strerror", None) or str(exc)
    m = re.search(r"error message = '([^']+)'", text)
    if m:
        text = m.group(1)
    return " ".join(text.split())[:300]


def settings_diff(found: dict, wanted: dict) -> str:
    keys = sorted(set(found) | set(wanted))
    parts = [f"{k}: cache has {found.get(k)!r}, requested {wanted.get(k)!r}" for k in keys if found.get(k) != wanted.get(k)]
    return "; ".join(parts) or "unknown difference"
