"""Embed an image folder with a frozen backbone into a resumable HDF5 cache.

The run is a sequence of committed chunks (see :mod:`featx.cache`): images already in the
finished cache or in a committed chunk are never embedded again, so a killed run resumes where
it stopped, a finished one returns in seconds, and images added later are embedded
incrementally (removed ones are dropped when the cache is rebuilt).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .. import __version__
from ..base.errors import FeatxError
from ..base.runtime import default_workers, resolve_device
from ..cache.store import Chunk, FeatureCache, PartsDir, acquire_lock, default_cache_path, fingerprint_digest, read_final_index, write_final
from ..data.folders import discover
from .backbones import create_backbone
from .cpu import forward_fn, iter_cpu_batches
from .gpu import iter_gpu_features

log = logging.getLogger(__name__)

DTYPES = ("float32", "float16")
# How images are decoded before the backbone's preprocessing (JPEG draft at >= 2x the resize).
DECODE_VERSION = "pil-draft2x"
# Failures that can be fixed without changing the file's mtime or size: retried on every run.
_RETRY_REASONS = ("permission denied", "broken symlink", "file not found", "symlink loop", "cannot read")


@dataclass
class EmbedStats:
    """What one call of :func:`embed` did (kept on the returned cache as ``.stats``)."""

    total: int = 0
    reused: int = 0
    embedded: int = 0
    failed_new: int = 0
    seconds: float = 0.0
    images_per_s: float = 0.0
    embed_seconds: float = 0.0
    device: str = "cpu"
    rebuilt: bool = False

    def to_dict(self) -> dict:
        return dict(self.__dict__)






def cache_fingerprint(backbone, dtype: str) -> dict:
    """Everything that changes the stored features; a cache written with others is refused."""
    fp = dict(backbone.fingerprint())
    fp["dtype"] = dtype
    fp["featx_version"] = __version__
    fp["decode"] = DECODE_VERSION
    return fp
















def _embed_chunks(
    todo: Sequence,
    backbone,
    *,
    device: str,
    batch_size: int,
    num_workers: int,
    chunk_size: int,
    dtype: str,
    progress: bool,
    engine: str,
) -> Iterator:
    """Run the network over ``todo`` and yield :class:`featx.cache.Chunk` objects of ~chunk_size."""
    from tqdm.auto import tqdm


    if engine == "gpu":

        stream = iter_gpu_features(todo, backbone, device=device, batch_size=batch_size, num_workers=num_workers)
    else:
        if device == "cpu":
            import torch

            # All cores for the network, beside the decode workers: measured on 2 cores with
            # nothing else running, 2 intra-op threads + 2 workers embed 97 images/s
            # (efficientnet_lite0) and 78 (resnet18) vs 49 and 41 with 1 thread. When other
            # processes load the machine, OpenMP's spin-waiting makes 1 thread the better
            # choice (60 vs 24-32 images/s at load 2-3): set FEATX_CPU_THREADS=1 there.
            ncpu = os.cpu_count() or 1
            threads = int(os.environ.get("FEATX_CPU_THREADS") or 0) or ncpu
            torch.set_num_threads(threads)
            log.info("CPU layout: %d decode worker(s), %d intra-op thread(s) for the network", num_workers, threads)
        fwd = forward_fn(backbone, device)

        def cpu_stream():
            for idx, x, errs, mts, szs in iter_cpu_batches(
                todo, backbone, batch_size=batch_size, num_workers=num_workers, pin=device.startswith("cuda")
            ):
                ok = [j for j, e in enumerate(errs) if not e]
                feats = fwd(x[ok]) if ok else np.zeros((0, backbone.dim), np.float32)
                yield idx, errs, mts, szs, ok, feats

        stream = cpu_stream()

    bar = tqdm(total=len(todo), unit="img", disable=not progress, dynamic_ncols=True, desc="embed")
    keys: list[str] = []
    feats_acc: list[np.ndarray] = []
    mts_acc: list[int] = []
    szs_acc: list[int] = []
    failed: list[tuple[str, str, int, int]] = []
    pending = 0
    try:
        for idx, errs, mts, szs, ok, feats in stream:
            for j in ok:
                keys.append(todo[idx[j]].key)
                mts_acc.append(mts[j])
                szs_acc.append(szs[j])
            feats_acc.append(feats.astype(dtype, copy=False))
            for j, e in enumerate(errs):
                if e:
                    failed.append((todo[idx[j]].key, e, mts[j], szs[j]))
                    log.warning("failed to load %s: %s", todo[idx[j]].path, e)
            pending += len(idx)
            bar.update(len(idx))
            if pending >= chunk_size:
                yield Chunk(keys, np.concatenate(feats_acc), np.asarray(mts_acc), np.asarray(szs_acc), failed)
                keys, feats_acc, mts_acc, szs_acc, failed, pending = [], [], [], [], [], 0
        if pending:
            yield Chunk(keys, np.concatenate(feats_acc), np.asarray(mts_acc), np.asarray(szs_acc), failed)
    finally:
        bar.close()


def embed(
    root: str | os.PathLike | None = None,
    *,
    backbone: str = "efficientnet_lite0",
    weights: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike = "cache",
    cache: str | os.PathLike | None = None,
    manifest: str | os.PathLike | None = None,
    batch_size: int = 64,
    num_workers: int | None = None,
    device: str = "auto",
    dtype: str = "float32",
    chunk_size: int = 1024,
    overwrite: bool = False,
    strict: bool = False,
    progress: bool = True,
    wait: bool = True,
    engine: str = "auto",
    limit: int | None = None,
) -> "FeatureCache":  # noqa: F821
    """Embed every image under ``root`` (or in ``manifest``) and return the finished cache.

    Safe to rerun: finished images are reused, new ones embedded, removed ones dropped; a cache
    written with other settings is refused unless ``overwrite``.  ``strict`` turns any image
    that fails to load into an error after the run (the cache is still written).
    """
    import torch


    if batch_size is None or batch_size < 1:
        raise FeatxError(f"--batch-size must be a positive integer, got {batch_size}")
    if chunk_size is None or chunk_size < 1:
        raise FeatxError(f"--chunk-size must be a positive integer, got {chunk_size}")
    if dtype not in DTYPES:
        raise FeatxError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if root is None and manifest is None:
        raise FeatxError("pass a dataset folder (or --manifest FILE.csv)")
    t0 = time.perf_counter()
    dev = resolve_device(device)
    if engine not in ("auto", "cpu", "gpu"):
        raise FeatxError(f"--engine {engine!r}: expected auto, cpu or gpu")
    if engine == "gpu" and not dev.startswith("cuda"):
        raise FeatxError("--engine gpu needs CUDA; use --engine cpu (or auto)")
    eng = engine if engine != "auto" else ("gpu" if dev.startswith("cuda") else "cpu")
    workers = default_workers() if num_workers is None else int(num_workers)
    if workers < 0:
        raise FeatxError(f"--workers must be >= 0, got {num_workers}")

    ds = discover(root if root is not None else manifest, manifest=manifest)
    samples = ds.samples
    if limit is not None:
        samples = _limit_per_split(samples, limit)
    bb = create_backbone(backbone, weights=weights)
    fp = cache_fingerprint(bb, dtype)
    if cache is not None:
        path = Path(cache)
    else:
        path = default_cache_path(cache_dir, ds.root, bb.name, fp)
        if limit is not None:  # a quick subset must not replace the full cache
            path = path.with_name(f"{path.stem}-limit{limit}.h5")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FeatxError(
            f"cannot create the cache folder {str(path.parent)!r} ({exc.strerror or exc}); pass a writable "
            "--cache-dir or --cache"
        ) from None
    stats = EmbedStats(total=len(samples), device=dev)

    lock = acquire_lock(path, wait=wait)
    try:
        parts = PartsDir(path, fp)
        if overwrite:
            if path.exists():
                log.info("--overwrite: removing %s", path)
                path.unlink()
            parts.remove()
        index: dict[str, tuple] = {}
        old = None  # the finished cache from an earlier run, if any
        prior_seconds = 0.0  # embedding time of earlier runs, so reports can count all of it
        if path.exists():
            old = FeatureCache(path)  # raises a clear error if damaged
            old.check_compatible(fp)
            if old.root and os.path.realpath(old.root) != os.path.realpath(ds.root):
                log.warning("cache %s was built from %s; reusing images by relative path", path, old.root)
            index.update(read_final_index(old))
            prior_seconds = float(old.meta.get("embed_seconds", 0.0))
        if parts.exists():
            parts.ensure()  # refuses parts written with other settings
            index.update(parts.read_index())

        def fresh(s) -> bool:
            e = index.get(s.key)
            if e is None:
                return False
            if e[0] == "failed" and e[1].startswith(_RETRY_REASONS):
                # Access problems get fixed without touching mtime/size (chmod, a new link target):
                # retry once the file is readable, without rebuilding the cache while it is not.
                return not _readable(s.path)
            try:
                st = os.stat(s.path)
            except OSError:
                return e[0] == "failed"
            return e[-2] == st.st_mtime_ns and e[-1] == st.st_size

        todo = [s for s in samples if not fresh(s)]
        stats.reused = len(samples) - len(todo)
        want_keys = {s.key for s in samples}
        if old is not None and not parts.exists() and not todo:
            if set(index) == want_keys and old.classes == list(ds.classes):
                stats.seconds = time.perf_counter() - t0
                log.info("cache %s is complete and up to date (%d images); nothing to embed", path, len(samples))
                old.stats = stats
                _check_strict(old, strict)
                return old

        if todo:
            parts.ensure()
            log.info(
                "embedding %d images (%d reused) with %s on %s [%s engine], writing %s",
                len(todo), stats.reused, bb.name, dev, eng, parts.dir,
            )
            delay = float(os.environ.get("FEATX_TEST_CHUNK_DELAY", "0") or 0)  # fault-injection tests
            t_embed = time.perf_counter()
            done = 0
            for chunk in _embed_chunks(
                todo, bb, device=dev, batch_size=batch_size, num_workers=workers, chunk_size=chunk_size,
                dtype=dtype, progress=progress, engine=eng,
            ):
                cf = parts.write_chunk(chunk)
                done += len(chunk.keys) + len(chunk.failed)
                stats.failed_new += len(chunk.failed)
                for i, k in enumerate(chunk.keys):
                    index[k] = ("chunk", cf, i, int(chunk.mtime_ns[i]), int(chunk.size[i]))
                for k, r, m, sz in chunk.failed:
                    index[k] = ("failed", r, int(m), int(sz))
                if delay:
                    time.sleep(delay)
            stats.embedded = done - stats.failed_new
            el = time.perf_counter() - t_embed
            stats.images_per_s = done / el if el > 0 else 0.0
            stats.embed_seconds = el

        attrs = {
            "backbone": bb.name,
            "weights_sha256": bb.weights_sha256,
            "weights_source": bb.weights_source,
            "preprocess": bb.preprocess.describe(),
            "preprocess_json": json.dumps(bb.preprocess.to_dict()),
            "fingerprint": fingerprint_digest(fp),
            "fingerprint_json": json.dumps(fp, sort_keys=True),
            "featx_version": __version__,
            "torch_version": torch.__version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "root": ds.root,
            "layout": ds.layout,
            "device": dev,
            "engine": eng,
            # Total time spent embedding this cache over all runs (resumed ones included).
            "embed_seconds": prior_seconds + stats.embed_seconds,
        }
        write_final(path, samples=samples, classes=ds.classes, index=index, dim=bb.dim, dtype=dtype, attrs=attrs)
        parts.remove()
        stats.rebuilt = True
        stats.seconds = time.perf_counter() - t0
        fc = FeatureCache(path)
        fc.stats = stats
        log.info(
            "wrote %s: %d rows, %d failed, %.1fs (%.1f images/s embedding)",
            path, len(fc), len(fc.failed), stats.seconds, stats.images_per_s,
        )
        _check_strict(fc, strict)
        return fc
    finally:
        lock.release()


def _readable(path: str) -> bool:
    """Can the file be opened now? (Pillow parses the header only: cheap.)"""
    from PIL import Image

    try:
        with Image.open(path):
            return True
    except OSError as exc:  # includes Pillow's UnidentifiedImageError: readable, just not an image
        return not isinstance(exc, (PermissionError, FileNotFoundError)) and exc.errno is None
    except Exception:  # noqa: BLE001 - readable now (if broken, the retry records the new reason)
        return True


def _check_strict(fc, strict: bool) -> None:
    if strict and fc.failed:
        shown = "; ".join(f"{k}: {r}" for k, r in fc.failed[:5])
        raise FeatxError(
            f"--strict: {len(fc.failed)} image(s) could not be loaded ({shown}{' ...' if len(fc.failed) > 5 else ''}); "
            f"fix or remove them, or drop --strict. The cache {fc.path} was still written."
        )


def _limit_per_split(samples: Sequence, limit: int) -> list:
    """Keep at most ``limit`` images per split, spread evenly over classes (for quick runs)."""
    if limit < 1:
        raise FeatxError(f"--limit must be a positive integer, got {limit}")
    out = []
    for split in ("train", "val", "test"):
        rows = [s for s in samples if s.split == split]
        if len(rows) <= limit:
            out.extend(rows)
            continue
        by_class: dict[int, list] = {}
        for s in rows:
            by_class.setdefault(s.label, []).append(s)
        picked: list = []
        queues = [list(v) for _, v in sorted(by_class.items())]
        while len(picked) < limit:
            for q in queues:
                if q and len(picked) < limit:
                    picked.append(q.pop(0))
        key = {id(s): i for i, s in enumerate(rows)}
        out.extend(sorted(picked, key=lambda s: key[id(s)]))
    return out
