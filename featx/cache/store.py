"""The self-describing, crash-safe HDF5 feature cache.

On disk, for a cache ``cache/NAME.h5``:

- ``NAME.h5`` — the finished cache, only ever created by writing ``NAME.h5.tmp``, fsync and
  rename, so it is either absent, the previous complete version, or the new complete version.
- ``NAME.h5.parts/`` — work in progress: ``meta.json`` (the fingerprint) and one small HDF5
  *chunk file* per committed chunk of embedded images, each written under a temporary name,
  fsynced and renamed.  A kill at any instant loses at most the chunk being written.  Chunk
  files are independent, so several workers (processes, machines, a Ray Data job) can each
  embed a slice of the file list into the same ``.parts`` folder; :func:`finalize` merges them.
- ``NAME.h5.lock`` — an advisory lock held by the process that writes.

Datasets of the finished file: ``features`` [N, D] (chunked), ``labels`` [N], ``paths`` [N]
(relative to the dataset root, file-system bytes), ``split`` [N] (codes into the ``splits``
attribute), ``mtime_ns``/``size`` [N] (to notice changed files), ``classes``, and
``failed/paths`` + ``failed/reasons``.  Attributes record everything that changes the
features (backbone, weights sha256, preprocessing, dtype, featx version) plus provenance.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import h5py
import numpy as np

from ..base.errors import CacheLockedError, CacheMismatchError, CacheWriteError, FeatxError
from ..base.io import atomic_commit, fsync_dir, sha256_file  # noqa: F401 - re-exported for old imports
from .views import available_views, check_view, compose, view_dim

log = logging.getLogger(__name__)

LAYOUT_VERSION = 1
SPLITS = ("train", "val", "test")
_STR = h5py.string_dtype("utf-8")
# Keys of augmented training views: the image's key, this separator, the recipe and view number
# (featx.embedding.augment); such rows are kept in the finished cache's augmented/ group.
AUG_SEP = "\x00aug:"


def image_key(key: str) -> str:
    """The key of the image an augmented-view key shows (a plain image's key is its own)."""
    return key.split(AUG_SEP, 1)[0]
_BYTES = h5py.vlen_dtype(np.dtype("uint8"))


# --------------------------------------------------------------------------- atomic files








def fingerprint_digest(fp: dict) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()


def encode_key(key: str) -> np.ndarray:
    return np.frombuffer(os.fsencode(key), dtype=np.uint8)


def decode_key(raw) -> str:
    return os.fsdecode(bytes(raw))


def _key_array(keys: Sequence[str]) -> np.ndarray:
    arr = np.empty(len(keys), dtype=object)
    for i, k in enumerate(keys):
        arr[i] = encode_key(k)
    return arr


def default_cache_path(cache_dir: str | os.PathLike, root: str, backbone: str, fingerprint: dict) -> Path:
    """``cache_dir/<dataset>__<backbone>__<fp10>.h5``: readable, and unique per settings."""
    slug = lambda s: re.sub(r"[^A-Za-z0-9._-]+", "-", s).strip("-") or "data"  # noqa: E731
    name = Path(root).name or "data"
    where = root if "://" in root else str(Path(root).resolve())  # a URL (featx.data.remote) is already absolute
    root_tag = hashlib.sha256(where.encode()).hexdigest()[:6]
    digest = fingerprint_digest(fingerprint)[:10]
    return Path(cache_dir) / f"{slug(name)}-{root_tag}__{slug(backbone)}__{digest}.h5"


# --------------------------------------------------------------------------- chunk files


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
                found = json.loads(meta.read_text())
            except (OSError, ValueError):
                found = None
            if found != self.fingerprint:
                raise CacheMismatchError(
                    f"unfinished work in {self.dir} was produced with other settings "
                    f"({_diff(found or {}, self.fingerprint)}); rerun with --overwrite to discard it, "
                    "or pass another --cache path"
                )
            return
        tmp = self.dir / f".meta.json.{uuid.uuid4().hex}.tmp"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(self.fingerprint, sort_keys=True, indent=1))
            atomic_commit(tmp, meta)
        except OSError as exc:
            _unlink_quiet(tmp)
            raise FeatxError(
                f"could not start the cache's work folder {self.dir} ({_why(exc)}); free disk space or fix "
                "permissions, or pass another --cache-dir / --cache"
            ) from exc

    def chunk_files(self) -> list[Path]:
        return sorted(self.dir.glob("chunk-*.h5")) if self.exists() else []

    def write_chunk(self, chunk: Chunk, *, worker: str = "0") -> Path:
        """Commit one chunk atomically; returns its final path."""
        name = f"chunk-{worker}-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.h5"
        final = self.dir / name
        tmp = self.dir / f".{name}.tmp"
        kept = (
            f"everything committed before is kept in {self.dir}. Free disk space (or fix permissions) and rerun "
            "the same command to resume."
        )
        with _atomic_h5(tmp, final, what=str(final), kept=kept) as f:
            f.create_dataset("paths", data=_key_array(chunk.keys), dtype=_BYTES)
            f.create_dataset("features", data=chunk.features)
            for pname, arr in chunk.parts.items():
                f.create_dataset(_part_path(pname), data=arr)
            f.create_dataset("mtime_ns", data=np.asarray(chunk.mtime_ns, dtype=np.int64))
            f.create_dataset("size", data=np.asarray(chunk.size, dtype=np.int64))
            fk = [k for k, _, _, _ in chunk.failed]
            f.create_dataset("failed_paths", data=_key_array(fk), dtype=_BYTES)
            f.create_dataset("failed_reasons", data=[r for _, r, _, _ in chunk.failed], dtype=_STR)
            f.create_dataset("failed_mtime_ns", data=np.asarray([m for _, _, m, _ in chunk.failed], dtype=np.int64))
            f.create_dataset("failed_size", data=np.asarray([s for _, _, _, s in chunk.failed], dtype=np.int64))
            f.attrs["seconds"] = float(chunk.seconds)
        return final

    def total_seconds(self) -> float:
        """Embedding time of every committed chunk (shards, Ray actors, killed runs included)."""
        total = 0.0
        for cf in self.chunk_files():
            try:
                with h5py.File(cf, "r") as f:
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
def _atomic_h5(tmp: Path, final: Path, *, what: str, kept: str) -> Iterator[h5py.File]:
    """Yield ``tmp`` open for writing, then fsync and rename it onto ``final``.

    On failure ``tmp`` is removed and a :class:`CacheWriteError` says what is ``kept``. h5py
    reports a failed write (disk full, file-size limit) as a RuntimeError on close, not OSError.
    """
    try:
        with h5py.File(tmp, "w") as f:
            yield f
        atomic_commit(tmp, final)
    except (OSError, RuntimeError) as exc:
        _unlink_quiet(tmp)
        raise CacheWriteError(f"could not write {what} ({_why(exc)}); {kept}") from exc


def _why(exc: BaseException) -> str:
    """A one-line reason; HDF5's multi-line write errors are reduced to their system message."""
    text = getattr(exc, "strerror", None) or str(exc)
    m = re.search(r"error message = '([^']+)'", text)
    if m:
        text = m.group(1)
    return " ".join(text.split())[:300]


def _unlink_quiet(p: str | os.PathLike) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass


def _diff(found: dict, wanted: dict) -> str:
    keys = sorted(set(found) | set(wanted))
    parts = [f"{k}: cache has {found.get(k)!r}, requested {wanted.get(k)!r}" for k in keys if found.get(k) != wanted.get(k)]
    return "; ".join(parts) or "unknown difference"


# --------------------------------------------------------------------------- reader


def _open_h5(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except FileNotFoundError:
        raise FeatxError(f"cache {str(path)!r} does not exist; create it with `featx embed DATA_DIR`") from None
    except (OSError, ValueError) as exc:
        raise FeatxError(
            f"cache {str(path)!r} is damaged or not a featx HDF5 cache ({exc}); delete it or rerun "
            "`featx embed ... --overwrite` to rebuild it"
        ) from None


_ROW_DATASETS = ("labels", "split", "paths", "mtime_ns", "size")
_FAILED_DATASETS = ("failed/paths", "failed/reasons", "failed/mtime_ns", "failed/size")


def _plain_attrs(attrs: dict) -> dict:
    """HDF5 attributes as plain strings and numbers (featx writes no arrays there: one is damage)."""
    out = {}
    for k, v in attrs.items():
        if isinstance(v, np.ndarray) and v.size != 1:
            raise ValueError(f"attribute {k!r} is an array of {v.size} values")
        out[k] = v.item() if hasattr(v, "item") else v
    return out


def _part_widths(f: h5py.File, meta: dict, dim: int, n: int) -> dict[str, int]:
    """{part: width} of the stored feature parts, ``features`` first (checked against the datasets)."""
    widths = {"features": dim}
    for name, width in json.loads(meta.get("parts_json") or "[]"):
        d = f[_part_path(name)]
        if tuple(d.shape) != (n, int(width)):
            raise ValueError(f"dataset {_part_path(name)} has shape {d.shape}, expected ({n}, {width})")
        widths[str(name)] = int(width)
    return widths


def _split_names(raw) -> list[str]:
    names = json.loads(raw)
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise ValueError("attribute 'split_names' is not a JSON list of names")
    return names


class FeatureCache:
    """Read access to a finished cache; arrays are read lazily, split by split.

    >>> fc = FeatureCache("cache/hymenoptera_data-1a2b3c__efficientnet_lite0__0123456789.h5")
    >>> X, y = fc.features("train"), fc.labels("train")
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        with _open_h5(self.path) as f:
            try:
                attrs = dict(f.attrs)
                layout = int(attrs.get("featx_cache_layout", 0))
                if layout != LAYOUT_VERSION:
                    raise FeatxError(
                        f"cache {str(self.path)!r} uses cache layout {layout}, this featx reads layout "
                        f"{LAYOUT_VERSION}; rebuild it with `featx embed ... --overwrite`"
                    )
                self.classes: list[str] = [c.decode() if isinstance(c, bytes) else c for c in f["classes"][()]]
                codes = f["split"][()]
                self._n = int(f["features"].shape[0])
                self.dim = int(f["features"].shape[1])
                for name in _ROW_DATASETS:
                    if f[name].shape[0] != self._n:
                        raise ValueError(f"dataset {name!r} has {f[name].shape[0]} rows, features has {self._n}")
                nf = {f[name].shape[0] for name in _FAILED_DATASETS}
                if len(nf) != 1:
                    raise ValueError("the failed/ datasets have different lengths")
                for key in ("fingerprint", "fingerprint_json", "split_names", "backbone"):
                    if key not in attrs:
                        raise ValueError(f"attribute {key!r} is missing")
                self.meta: dict = _plain_attrs(attrs)
                split_names = _split_names(self.meta["split_names"])
                self.part_widths = _part_widths(f, self.meta, self.dim, self._n)
                self._n_aug = int(f["augmented/source_row"].shape[0]) if "augmented" in f else 0
            except FeatxError:
                raise
            except Exception as exc:  # noqa: BLE001 - missing datasets/attrs => damaged
                raise FeatxError(
                    f"cache {str(self.path)!r} is incomplete or damaged ({exc}); rebuild it with "
                    "`featx embed ... --overwrite`"
                ) from None
        self._ranges: dict[str, tuple[int, int]] = {}
        for code, name in enumerate(split_names):
            idx = np.flatnonzero(codes == code)
            if len(idx):
                # Rows are written split by split, so each split is one contiguous slice.
                assert idx[-1] - idx[0] + 1 == len(idx), "split rows must be contiguous"
                self._ranges[name] = (int(idx[0]), int(idx[-1]) + 1)
        self._codes = codes

    # -- descriptive
    def __len__(self) -> int:
        return self._n

    def __repr__(self) -> str:
        counts = ", ".join(f"{s}={b - a}" for s, (a, b) in self._ranges.items())
        return f"FeatureCache({str(self.path)!r}, {counts}, dim={self.dim}, backbone={self.meta.get('backbone')!r})"

    @property
    def splits(self) -> list[str]:
        return [s for s in SPLITS if s in self._ranges]

    @property
    def fingerprint(self) -> str:
        return str(self.meta["fingerprint"])

    @property
    def fingerprint_dict(self) -> dict:
        return json.loads(self.meta["fingerprint_json"])

    @property
    def root(self) -> str:
        return str(self.meta.get("root", ""))

    def _slice(self, split: str | None) -> slice:
        if split is None:
            return slice(0, self._n)
        if split not in self._ranges:
            raise FeatxError(
                f"cache {self.path.name} has no {split!r} split (it has: {', '.join(self.splits) or 'none'})"
            )
        a, b = self._ranges[split]
        return slice(a, b)

    # -- views
    @property
    def views(self) -> list[str]:
        """Feature views this cache can give (:mod:`featx.cache.views`); ``final`` for every cache."""
        return available_views(self.part_widths)

    def view_dim(self, view: str | None = None) -> int:
        return view_dim(check_view(view, self.views, where=f"cache {self.path.name}"), self.part_widths)

    def _read_view(self, f: h5py.File, view: str | None, rows, dtype, prefix: str = "") -> np.ndarray:
        v = check_view(view, self.views, where=f"cache {self.path.name}")
        get = lambda p: np.asarray(f[prefix + _part_path(p)][rows], dtype=np.float32)  # noqa: E731
        return np.asarray(compose(v, get), dtype=dtype)

    # -- augmented training views (featx embed --train-views)
    @property
    def train_views(self) -> int:
        """Augmented views stored per training image (0 for caches without them)."""
        return int(self.meta.get("train_views", 0) or 0) if self._n_aug else 0

    def augmented(self, rows: np.ndarray | None = None, *, view: str | None = None,
                  block_rows: int = 65536) -> tuple[np.ndarray, np.ndarray]:
        """(features of ``view``, row of their image) of the augmented views of ``rows`` (all if None).

        Read in contiguous blocks (no HDF5 point selection, memory bounded by one block + the result).
        """
        feats, src_out = [np.zeros((0, self.view_dim(view)), np.float32)], [np.zeros(0, np.int64)]
        with _open_h5(self.path) as f:
            src = f["augmented/source_row"][()] if self._n_aug else np.zeros(0, np.int64)
            want = np.ones(len(src), bool) if rows is None else np.isin(src, rows)
            for a in range(0, len(src), block_rows):
                m = want[a : a + block_rows]
                if m.any():
                    block = self._read_view(f, view, slice(a, a + len(m)), np.float32, prefix="augmented/")
                    feats.append(block[m])
                    src_out.append(src[a : a + len(m)][m])
        return np.concatenate(feats), np.concatenate(src_out)

    # -- arrays
    def features(self, split: str | None = None, *, view: str | None = None, dtype=np.float32) -> np.ndarray:
        """Features of ``split`` (all rows if None) as a [n, dim] array; ``view`` picks a stored view."""
        with _open_h5(self.path) as f:
            return self._read_view(f, view, self._slice(split), dtype)

    def iter_features(self, split: str | None = None, *, rows: int = 65536, view: str | None = None
                      ) -> Iterator[np.ndarray]:
        """Yield features in blocks of ``rows`` so that huge caches never sit in memory whole."""
        s = self._slice(split)
        with _open_h5(self.path) as f:
            for a in range(s.start, s.stop, rows):
                yield self._read_view(f, view, slice(a, min(a + rows, s.stop)), np.float32)

    def labels(self, split: str | None = None) -> np.ndarray:
        with _open_h5(self.path) as f:
            return f["labels"][self._slice(split)].astype(np.int64)

    def keys(self, split: str | None = None) -> list[str]:
        """Paths relative to the dataset root."""
        with _open_h5(self.path) as f:
            return [decode_key(k) for k in f["paths"][self._slice(split)]]

    def paths(self, split: str | None = None) -> list[str]:
        """Absolute paths of the images (root joined with the stored relative paths)."""
        root = self.root
        return [k if os.path.isabs(k) else os.path.join(root, k) for k in self.keys(split)]

    def split_array(self) -> np.ndarray:
        names = json.loads(self.meta["split_names"])
        return np.asarray([names[c] for c in self._codes])

    @property
    def failed(self) -> list[tuple[str, str]]:
        with _open_h5(self.path) as f:
            g = f["failed"]
            return [
                (decode_key(k), r.decode() if isinstance(r, bytes) else r)
                for k, r in zip(g["paths"][()], g["reasons"][()])
            ]

    def summary(self) -> dict:
        """Plain-dict description used by ``featx info`` and the reports."""
        return {
            "path": str(self.path),
            "rows": self._n,
            "splits": {s: b - a for s, (a, b) in self._ranges.items()},
            "classes": self.classes,
            "dim": self.dim,
            "views": self.views,
            "train_views": self.train_views,
            "dtype": self.meta.get("dtype"),
            "backbone": self.meta.get("backbone"),
            "weights_sha256": self.meta.get("weights_sha256"),
            "weights_source": self.meta.get("weights_source"),
            "preprocess": self.meta.get("preprocess"),
            "fingerprint": self.fingerprint,
            "root": self.root,
            "failed": len(self.failed),
            "created": self.meta.get("created"),
            "featx_version": self.meta.get("featx_version"),
            "torch_version": self.meta.get("torch_version"),
            "device": self.meta.get("device"),
            "size_bytes": self.path.stat().st_size,
        }

    def check_compatible(self, fingerprint: dict, *, what: str = "requested settings") -> None:
        """Raise :class:`CacheMismatchError` unless this cache was written with ``fingerprint``."""
        found = self.fingerprint_dict
        if found != fingerprint:
            raise CacheMismatchError(
                f"cache {str(self.path)!r} was written with other settings than the {what} "
                f"({_diff(found, fingerprint)}). Rerun with --overwrite to rebuild it, or pass another --cache path."
            )


# --------------------------------------------------------------------------- finalize


def read_final_index(fc: FeatureCache) -> dict[str, tuple]:
    """key -> ("final", row, mtime, size) or ("failed", reason, mtime, size) for a finished cache.

    Takes a :class:`FeatureCache`, whose constructor has already validated the layout.
    """
    index: dict[str, tuple] = {}
    with _open_h5(fc.path) as f:
        keys = [decode_key(k) for k in f["paths"][()]]
        mt, sz = f["mtime_ns"][()], f["size"][()]
        for i, k in enumerate(keys):
            index[k] = ("final", i, int(mt[i]), int(sz[i]))
        g = f["failed"]
        for k, r, m, s in zip(g["paths"][()], g["reasons"][()], g["mtime_ns"][()], g["size"][()]):
            index[decode_key(k)] = ("failed", r.decode() if isinstance(r, bytes) else r, int(m), int(s))
        if "augmented" in f:
            a = f["augmented"]
            for i, (k, m, s) in enumerate(zip(a["paths"][()], a["mtime_ns"][()], a["size"][()])):
                index[decode_key(k)] = ("final_aug", i, int(m), int(s))
    return index


def write_final(
    path: Path,
    *,
    samples: Sequence,  # data.Sample in output order (split-contiguous), augmented views last
    classes: Sequence[str],
    index: dict[str, tuple],
    dim: int,
    dtype: str,
    attrs: dict,
    block_rows: int = 65536,
    layout: Sequence[tuple[str, int]] = (),
) -> None:
    """Assemble the finished cache from chunk files and/or the previous finished cache.

    Written to ``path.tmp`` and renamed, so a kill leaves the previous version (or nothing)
    and the chunk files intact; features are copied in contiguous runs, never all at once.
    Augmented training views (keys with :data:`AUG_SEP`) go to the ``augmented/`` group, with
    the row of their image; views of an image that failed to load are left out.
    """
    stored = [s for s in samples if index.get(s.key, ("missing",))[0] in ("chunk", "final", "final_aug")]
    ok = [s for s in stored if AUG_SEP not in s.key]
    failed = [(s, index[s.key]) for s in samples if index.get(s.key, ("missing",))[0] == "failed" and AUG_SEP not in s.key]
    row_of = {s.key: i for i, s in enumerate(ok)}
    aug = [s for s in stored if AUG_SEP in s.key and image_key(s.key) in row_of]
    n = len(ok)
    tmp = Path(str(path) + ".tmp")
    code = {name: i for i, name in enumerate(SPLITS)}
    kept = (
        f"the embedded chunks are kept in {str(path)}.parts. Free disk space and rerun the same command: "
        "it only rebuilds the file."
    )
    widths = {"features": dim, **{name: w for name, w in layout if name != "features"}}
    # The feature datasets stay referenced until the file is closed: a dataset freed earlier flushes
    # its chunk cache on its own, and a failing write there (disk full) is only printed, not raised.
    alive: list = []
    with _atomic_h5(tmp, path, what=f"the finished cache {path}", kept=kept) as f:
        f.create_dataset("labels", data=np.asarray([s.label for s in ok], dtype=np.int64))
        f.create_dataset("split", data=np.asarray([code[s.split] for s in ok], dtype=np.uint8))
        f.create_dataset("paths", data=_key_array([s.key for s in ok]), dtype=_BYTES)
        f.create_dataset("mtime_ns", data=np.asarray([index[s.key][-2] for s in ok], dtype=np.int64))
        f.create_dataset("size", data=np.asarray([index[s.key][-1] for s in ok], dtype=np.int64))
        f.create_dataset("classes", data=list(classes), dtype=_STR)
        g = f.create_group("failed")
        g.create_dataset("paths", data=_key_array([s.key for s, _ in failed]), dtype=_BYTES)
        g.create_dataset("reasons", data=[e[1] for _, e in failed], dtype=_STR)
        g.create_dataset("mtime_ns", data=np.asarray([e[2] for _, e in failed], dtype=np.int64))
        g.create_dataset("size", data=np.asarray([e[3] for _, e in failed], dtype=np.int64))
        alive.append(_write_table(f, "", ok, index, widths, dtype, path, block_rows))
        if aug:
            ga = f.create_group("augmented")
            ga.create_dataset("source_row", data=np.asarray([row_of[image_key(s.key)] for s in aug], np.int64))
            ga.create_dataset("paths", data=_key_array([s.key for s in aug]), dtype=_BYTES)
            ga.create_dataset("mtime_ns", data=np.asarray([index[s.key][-2] for s in aug], dtype=np.int64))
            ga.create_dataset("size", data=np.asarray([index[s.key][-1] for s in aug], dtype=np.int64))
            alive.append(_write_table(f, "augmented/", aug, index, widths, dtype, path, block_rows))
        if len(widths) > 1:
            f.attrs["parts_json"] = json.dumps([[k, w] for k, w in widths.items() if k != "features"])
        for k, v in attrs.items():
            f.attrs[k] = str(v) if isinstance(v, str) else v
        f.attrs["featx_cache_layout"] = LAYOUT_VERSION
        f.attrs["split_names"] = json.dumps(list(SPLITS))
        f.attrs["rows"] = n
        f.attrs["feature_dim"] = dim
        f.attrs["dtype"] = dtype
    del alive


def _write_table(f: h5py.File, prefix: str, rows: Sequence, index: dict, widths: dict[str, int], dtype: str,
                 final: Path, block_rows: int) -> dict:
    """``prefix``features and ``prefix``parts/* of ``rows``, copied in contiguous runs from their sources.

    A row's source is a chunk file (root datasets) or the previous finished cache (``final``: root
    datasets, ``final_aug``: the ``augmented/`` group).
    """
    targets = {name: _row_dataset(f, prefix + _part_path(name), len(rows), w, dtype) for name, w in widths.items()}
    by_src: dict[tuple, list[tuple[int, int]]] = {}
    for out_row, s in enumerate(rows):
        e = index[s.key]
        src = (e[1], "") if e[0] == "chunk" else (final, "augmented/" if e[0] == "final_aug" else "")
        by_src.setdefault(src, []).append((out_row, e[2] if e[0] == "chunk" else e[1]))
    for (src_path, src_prefix), pairs in by_src.items():
        with h5py.File(src_path, "r") as sf:
            for name, target in targets.items():
                _copy_runs(sf[src_prefix + _part_path(name)], target, pairs, block_rows, dtype)
    return targets


def _part_path(name: str) -> str:
    return name if name == "features" else f"parts/{name}"


def _row_dataset(f: h5py.File, name: str, n: int, width: int, dtype: str):
    """An [n, width] dataset chunked in ~1 MiB row blocks (so reading a split never reads the others)."""
    chunk_rows = max(1, min(n, max(1, (1 << 20) // max(1, width * np.dtype(dtype).itemsize))))
    return f.create_dataset(name, shape=(n, width), dtype=dtype, chunks=(chunk_rows, width) if n else None)


def _copy_runs(src, target, pairs: list[tuple[int, int]], block_rows: int, dtype: str) -> None:
    for out_a, src_a, length in _runs(pairs):
        for off in range(0, length, block_rows):
            m = min(block_rows, length - off)
            target[out_a + off : out_a + off + m] = np.asarray(src[src_a + off : src_a + off + m]).astype(dtype)


def _runs(pairs: list[tuple[int, int]]) -> Iterator[tuple[int, int, int]]:
    """Split (out_row, src_row) pairs (sorted by out_row) into runs contiguous in both."""
    if not pairs:
        return
    start_o, start_s = pairs[0]
    length = 1
    for o, s in pairs[1:]:
        if o == start_o + length and s == start_s + length:
            length += 1
        else:
            yield start_o, start_s, length
            start_o, start_s, length = o, s, 1
    yield start_o, start_s, length


def acquire_lock(path: Path, *, wait: bool = True):
    """Hold ``path.lock`` while writing; a second writer waits, or fails fast with ``wait=False``."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(path) + ".lock")
    try:
        lock.acquire(timeout=0)
        return lock
    except Timeout:
        if not wait:
            raise CacheLockedError(
                f"another featx process is writing {path}; wait for it to finish, or drop --no-wait to wait "
                "for it automatically"
            ) from None
    except OSError as exc:  # after Timeout, which is an OSError too
        raise FeatxError(
            f"cannot create the lock file {path}.lock ({_why(exc)}); pass a writable --cache-dir or --cache"
        ) from None
    log.warning("another featx process is writing %s; waiting for it to finish", path)
    lock.acquire()
    return lock


class PartsLock:
    """``NAME.h5.shards.lock``: ``--shard`` runs hold it shared while they add chunk files; a run
    that assembles the finished cache (or removes ``.parts``) holds it exclusively.

    So shards run side by side on one or many machines (``flock`` works across NFS clients),
    while a cache is never assembled from a ``.parts`` folder that a shard is still filling:
    it would lack that shard's rows.  The writer lock (:func:`acquire_lock`) stays separate:
    a shard never holds it, so it never blocks another shard.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(str(path) + ".shards.lock")
        self.cache = Path(path)
        self._fd: int | None = None

    def acquire(self, *, shared: bool, wait: bool = True) -> "PartsLock":
        """Take the lock; when it is busy, wait with a log line that says why, or raise with ``wait=False``."""
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise FeatxError(
                f"cannot create the lock file {self.path} ({_why(exc)}); pass a writable --cache-dir or --cache"
            ) from None
        mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        try:
            fcntl.flock(self._fd, mode | fcntl.LOCK_NB)
            return self
        except BlockingIOError:
            pass
        if shared:
            busy = (f"another featx run is embedding into or assembling {self.cache}; this shard "
                    "continues when it has finished")
            fix = "wait for that run to finish, or drop --no-wait to wait for it automatically"
        else:
            busy = (f"--shard run(s) are still adding chunks to {self.cache}.parts; assembling the cache now "
                    "would leave out their images, so this run waits for them to finish")
            fix = "rerun after every --shard run has finished, or drop --no-wait to wait for them"
        if not wait:
            self.release()
            raise CacheLockedError(f"{busy.split(';')[0]}; {fix}")
        log.warning("%s", busy)
        fcntl.flock(self._fd, mode)
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> "PartsLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def find_cache(cache: str | os.PathLike | None, *, cache_dir: str | os.PathLike = "cache") -> Path:
    """``cache`` itself, or the most recently written finished cache in ``cache_dir``."""
    if cache is not None:
        p = Path(cache)
        if not p.exists():
            raise FeatxError(f"cache {str(p)!r} does not exist; create one with `featx embed DATA_DIR`")
        return p
    d = Path(cache_dir)
    found = sorted(d.glob("*.h5"), key=lambda p: p.stat().st_mtime) if d.is_dir() else []
    if not found:
        raise FeatxError(
            f"no cache in {str(d)!r}; run `featx embed DATA_DIR` first, or pass a cache file (or --cache-dir)"
        )
    if len(found) > 1:
        log.info("using the newest cache in %s: %s (pass a path to choose another)", d, found[-1].name)
    return found[-1]
