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
import json
import logging
import os
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from ..base.errors import CacheMismatchError, FeatxError
from ..base.files import check_regular, irregular_kind
from .identity import CacheIdentity, identity_of
from .keys import LAYOUT_VERSION, MULTI_SUFFIX, SPLITS, decode_key, part_path
from .parts import settings_diff
from .trust import integrity
from .views import available_views, check_view, compose, view_dim

log = logging.getLogger(__name__)


def open_h5(path: Path) -> h5py.File:
    check_regular(path, "cache")  # HDF5's own open of a FIFO would block for ever
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
        d = f[part_path(name)]
        if tuple(d.shape) != (n, int(width)):
            raise ValueError(f"dataset {part_path(name)} has shape {d.shape}, expected ({n}, {width})")
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
        # What the embed() call that returned this cache did (featx.embedding.runner.EmbedStats); None when
        # the cache was opened directly.
        self.stats = None
        with open_h5(self.path) as f:
            try:
                integrity.check_attrs(f)  # attributes are read whole: few, scalar and small first
                attrs = dict(f.attrs)
                layout = int(attrs.get("featx_cache_layout", 0))
                if layout != LAYOUT_VERSION:
                    raise FeatxError(
                        f"cache {str(self.path)!r} uses cache layout {layout}, this featx reads layout "
                        f"{LAYOUT_VERSION}; rebuild it with `featx embed ... --overwrite`"
                    )
                integrity.check_file(f)  # self-contained, shapes backed by storage: before any array is read
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
                integrity.check_layout(f, self.classes, self.meta, split_names, codes)
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
                # Rows are written split by split, so each split is one contiguous slice (integrity.check_rows).
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
    def embedding_settings(self) -> str:
        """Digest of the settings that made the features (backbone, weights, preprocessing...): not the data."""
        return str(self.meta["fingerprint"])

    @property
    def embedding_settings_dict(self) -> dict:
        return json.loads(self.meta["fingerprint_json"])

    # The older names of the embedding settings (the HDF5 attributes keep them).
    fingerprint = embedding_settings
    fingerprint_dict = embedding_settings_dict

    @property
    def identity(self) -> CacheIdentity:
        """The data this cache holds and its embedding settings (:mod:`featx.cache.identity`)."""
        return identity_of(self)

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
        get = lambda p: np.asarray(integrity.read_verified(f, prefix + part_path(p), rows, self.path),  # noqa: E731
                                   dtype=np.float32)
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
        with open_h5(self.path) as f:
            src = self._read(f, "augmented/source_row") if self._n_aug else np.zeros(0, np.int64)
            want = np.ones(len(src), bool) if rows is None else np.isin(src, rows)
            for a in range(0, len(src), block_rows):
                m = want[a : a + block_rows]
                if m.any():
                    block = self._read_view(f, view, slice(a, a + len(m)), np.float32, prefix="augmented/")
                    feats.append(block[m])
                    src_out.append(src[a : a + len(m)][m])
        return np.concatenate(feats), np.concatenate(src_out)

    def augmented_keys(self, rows: np.ndarray | None = None) -> list[str]:
        """Keys (image key, recipe, view number) of the augmented views of ``rows``, in :meth:`augmented`'s order."""
        if not self._n_aug:
            return []
        with open_h5(self.path) as f:
            src, keys = self._read(f, "augmented/source_row"), self._read(f, "augmented/paths")
        want = np.ones(len(src), bool) if rows is None else np.isin(src, rows)
        return [decode_key(k) for k, w in zip(keys, want) if w]

    # -- arrays
    def _read(self, f: h5py.File, name: str, rows=()) -> np.ndarray:
        """``f[name][rows]``; HDF5 failing to read it (damaged metadata, a broken heap) is one line naming the
        cache and the fix (integrity.read_or_refuse)."""
        return integrity.read_or_refuse(f, name, rows, self.path)

    def features(self, split: str | None = None, *, view: str | None = None, dtype=np.float32) -> np.ndarray:
        """Features of ``split`` (all rows if None) as a [n, dim] array; ``view`` picks a stored view."""
        with open_h5(self.path) as f:
            return self._read_view(f, view, self._slice(split), dtype)

    def iter_features(self, split: str | None = None, *, rows: int = 65536, view: str | None = None
                      ) -> Iterator[np.ndarray]:
        """Yield features in blocks of ``rows`` so that huge caches never sit in memory whole."""
        s = self._slice(split)
        with open_h5(self.path) as f:
            for a in range(s.start, s.stop, rows):
                yield self._read_view(f, view, slice(a, min(a + rows, s.stop)), np.float32)

    @contextlib.contextmanager
    def reader(self, view: str | None = None) -> Iterator:
        """``read(a, b)``: float32 features of ``view`` for rows [a, b), the file held open (block streaming).

        Reads go through :meth:`_read_view`, so their rows are checked against the checksums as every read is.
        """
        with open_h5(self.path) as f:
            yield lambda a, b: self._read_view(f, view, slice(a, b), np.float32)

    def labels(self, split: str | None = None) -> np.ndarray:
        with open_h5(self.path) as f:
            return self._read(f, "labels", self._slice(split)).astype(np.int64)

    def keys(self, split: str | None = None) -> list[str]:
        """Paths relative to the dataset root."""
        with open_h5(self.path) as f:
            return [decode_key(k) for k in self._read(f, "paths", self._slice(split))]

    def paths(self, split: str | None = None) -> list[str]:
        """Absolute paths of the images (root joined with the stored relative paths)."""
        root = self.root
        return [k if os.path.isabs(k) else os.path.join(root, k) for k in self.keys(split)]

    def stamps(self) -> tuple[np.ndarray, np.ndarray]:
        """(mtime_ns, size) of every row's file when it was embedded: a file whose stamp differs changed since."""
        with open_h5(self.path) as f:
            return self._read(f, "mtime_ns").astype(np.int64), self._read(f, "size").astype(np.int64)

    def split_array(self) -> np.ndarray:
        names = json.loads(self.meta["split_names"])
        return np.asarray([names[c] for c in self._codes])

    @property
    def failed(self) -> list[tuple[str, str]]:
        with open_h5(self.path) as f:
            return [
                (decode_key(k), r.decode() if isinstance(r, bytes) else r)
                for k, r in zip(self._read(f, "failed/paths"), self._read(f, "failed/reasons"))
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
            "embedding_settings": self.embedding_settings,
            "identity": self.identity.to_dict(),
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
                f"({settings_diff(found, fingerprint)}). Rerun with --overwrite to rebuild it, or pass another --cache path."
            )


# --------------------------------------------------------------------------- finalize


def _irregular(path: Path) -> bool:
    """A FIFO, socket or device named like a cache is never a candidate (it would hang the open); logged."""
    kind = irregular_kind(path)
    if kind:
        log.warning("%s is %s, not a cache; it is left out of the newest-cache choice", path, kind)
    return bool(kind)


def newest_cache(cache_dir: str | os.PathLike = "cache") -> Path:
    """The one rule for "the newest cache": the most recently written finished cache or cache set
    (``*.h5`` or ``*.multi.json``) in ``cache_dir``; a set is written after its members, so it wins."""
    d = Path(cache_dir)
    found = sorted((p for pat in ("*.h5", "*" + MULTI_SUFFIX) for p in d.glob(pat) if not _irregular(p)),
                   key=lambda p: (p.stat().st_mtime, p.name.endswith(MULTI_SUFFIX))) if d.is_dir() else []
    if not found:
        raise FeatxError(
            f"no cache in {str(d)!r}; run `featx embed DATA_DIR` first, or pass a cache file (or --cache-dir)"
        )
    if len(found) > 1:
        log.info("using the newest cache in %s: %s (pass a path to choose another)", d, found[-1].name)
    return found[-1]


def find_cache(cache: str | os.PathLike | None, *, cache_dir: str | os.PathLike = "cache") -> Path:
    """``cache`` itself, or the newest finished cache or cache set in ``cache_dir`` (:func:`newest_cache`)."""
    if cache is not None:
        p = Path(cache)
        if not p.exists():
            raise FeatxError(f"cache {str(p)!r} does not exist; create one with `featx embed DATA_DIR`")
        return p
    return newest_cache(cache_dir)
