"""The finished cache: assembled from chunk files and/or the previous finished cache, written atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Sequence

import h5py
import numpy as np

from .keys import AUG_SEP, BYTES_DTYPE, LAYOUT_VERSION, SPLITS, STR_DTYPE, decode_key, image_key, key_array, part_path
from .parts import atomic_h5
from .reader import FeatureCache, open_h5
from .trust import integrity


def read_final_index(fc: FeatureCache) -> dict[str, tuple]:
    """key -> ("final", row, mtime, size) or ("failed", reason, mtime, size) for a finished cache.

    Takes a :class:`FeatureCache`, whose constructor has already validated the layout.
    """
    index: dict[str, tuple] = {}
    with open_h5(fc.path) as f:
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
    with atomic_h5(tmp, path, what=f"the finished cache {path}", kept=kept) as f:
        f.create_dataset("labels", data=np.asarray([s.label for s in ok], dtype=np.int64))
        f.create_dataset("split", data=np.asarray([code[s.split] for s in ok], dtype=np.uint8))
        f.create_dataset("paths", data=key_array([s.key for s in ok]), dtype=BYTES_DTYPE)
        f.create_dataset("mtime_ns", data=np.asarray([index[s.key][-2] for s in ok], dtype=np.int64))
        f.create_dataset("size", data=np.asarray([index[s.key][-1] for s in ok], dtype=np.int64))
        f.create_dataset("classes", data=list(classes), dtype=STR_DTYPE)
        g = f.create_group("failed")
        g.create_dataset("paths", data=key_array([s.key for s, _ in failed]), dtype=BYTES_DTYPE)
        g.create_dataset("reasons", data=[e[1] for _, e in failed], dtype=STR_DTYPE)
        g.create_dataset("mtime_ns", data=np.asarray([e[2] for _, e in failed], dtype=np.int64))
        g.create_dataset("size", data=np.asarray([e[3] for _, e in failed], dtype=np.int64))
        alive.append(_write_table(f, "", ok, index, widths, dtype, path, block_rows))
        if aug:
            ga = f.create_group("augmented")
            ga.create_dataset("source_row", data=np.asarray([row_of[image_key(s.key)] for s in aug], np.int64))
            ga.create_dataset("paths", data=key_array([s.key for s in aug]), dtype=BYTES_DTYPE)
            ga.create_dataset("mtime_ns", data=np.asarray([index[s.key][-2] for s in aug], dtype=np.int64))
            ga.create_dataset("size", data=np.asarray([index[s.key][-1] for s in aug], dtype=np.int64))
            alive.append(_write_table(f, "augmented/", aug, index, widths, dtype, path, block_rows))
        integrity.write_checksums(f)  # one per feature row (featx.cache.trust.integrity)
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
    targets = {name: _row_dataset(f, prefix + part_path(name), len(rows), w, dtype) for name, w in widths.items()}
    by_src: dict[tuple, list[tuple[int, int]]] = {}
    for out_row, s in enumerate(rows):
        e = index[s.key]
        src = (e[1], "") if e[0] == "chunk" else (final, "augmented/" if e[0] == "final_aug" else "")
        by_src.setdefault(src, []).append((out_row, e[2] if e[0] == "chunk" else e[1]))
    for (src_path, src_prefix), pairs in by_src.items():
        with h5py.File(src_path, "r") as sf:
            for name, target in targets.items():
                _copy_runs(sf[src_prefix + part_path(name)], target, pairs, block_rows, dtype)
    return targets


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
