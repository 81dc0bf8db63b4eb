"""Embed an image folder with a frozen backbone into a resumable HDF5 cache.

The run is a sequence of committed chunks (see :mod:`featx.cache`): images already in the
finished cache or in a committed chunk are never embedded again, so a killed run resumes where
it stopped, a finished one returns in seconds, and images added later are embedded
incrementally (removed ones are dropped when the cache is rebuilt).

Three stages, each reused by every way of running: :func:`plan` (discover, fingerprint, read
which images are done, list the pending work deterministically), running the pending chunks
(in this process, as one ``--shard`` of a scheduler array, or on a Ray Data actor pool — each
chunk committed atomically into ``NAME.h5.parts/``), and :func:`finalise` (assemble the
finished HDF5 from the chunks and the previous cache).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from ..base.choices import EXECUTORS  # noqa: F401 - re-exported
from ..base.errors import FeatxError
from ..base.runtime import default_workers, resolve_device
from ..base.version import __version__
from ..cache.store import (
    FeatureCache,
    PartsDir,
    PartsLock,
    acquire_lock,
    default_cache_path,
    fingerprint_digest,
    read_final_index,
    write_final,
)
from ..cache.trust.roots import sign_root
from ..cache.trust.verify import forget_damaged
from ..config import EmbedSettings
from ..data.folders import Dataset
from ..data.sources import SourceOptions, discover_any, dominant_failure, is_local, stamp_of
from .backbones import Backbone
from .engines import augment
from .engines.chunks import DECODE_VERSION, DTYPES, EngineSettings, cache_fingerprint, default_engine, iter_chunks  # noqa: F401 - DECODE_VERSION re-exported
from .networks.views import check_tta, parse_parts
from .ray_executor import import_ray, parse_shard, run_on_ray
from .runtimes.cards import run_backbone
from .runtimes.forward import resolve_runtime

log = logging.getLogger(__name__)

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
    executor: str = "local"

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class ShardResult:
    """What one ``--shard I/N`` run did: chunks added to ``parts``; no finished cache is written."""

    shard: str
    parts: str
    cache: str
    pending: int  # images no run had embedded yet when this shard planned (all shards together)
    assigned: int  # of those, the ones in this shard's deterministic share
    stats: EmbedStats

    def to_dict(self) -> dict:
        return {"shard": self.shard, "parts": self.parts, "cache": self.cache, "pending": self.pending,
                "assigned": self.assigned, "run": self.stats.to_dict()}


@dataclass
class EmbedPlan:
    """Everything decided before any image is embedded; :func:`read_done` fills in what is done."""

    path: Path
    dataset: Dataset
    samples: list
    backbone: Backbone
    fingerprint: dict
    parts: PartsDir
    index: dict = field(default_factory=dict)  # key -> where its row (or failure) is already stored
    old: FeatureCache | None = None  # the finished cache from an earlier run, if any
    prior_seconds: float = 0.0  # embedding time of earlier runs, so reports can count all of it
    todo: list = field(default_factory=list)
    train_views: int | None = None  # augmented views per training image; None until read_done: keep the cache's


def check_options(settings: EmbedSettings | None = None, **overrides: Any) -> EngineSettings:
    """Refuse bad options before any file is read; resolve device, engine and workers.

    ``settings``/``overrides``: as :func:`embed` takes them.  Under ``executor="ray"`` each node
    resolves ``--device cuda`` itself: the driver (a head node often has no GPU) checks only its form.
    """
    s, _ = EmbedSettings.with_overrides(settings, overrides, call="check_options")
    backbone, weights, device, engine, batch_size = s.backbone, s.weights, s.device, s.engine, s.batch_size
    num_workers, dtype, chunk_size, runtime, views, tta = s.workers, s.dtype, s.chunk_size, s.runtime, s.views, s.tta
    train_views, executor = s.train_views, s.executor
    parts, tta = parse_parts(views), check_tta(tta)
    train_views = augment.check_train_views(train_views)
    if batch_size is None or batch_size < 1:
        raise FeatxError(f"--batch-size must be a positive integer, got {batch_size}")
    if chunk_size is None or chunk_size < 1:
        raise FeatxError(f"--chunk-size must be a positive integer, got {chunk_size}")
    if dtype not in DTYPES:
        raise FeatxError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    dev = resolve_device(device, local=executor != "ray")
    if engine not in ("auto", "cpu", "gpu"):
        raise FeatxError(f"--engine {engine!r}: expected auto, cpu or gpu")
    if engine == "gpu" and not dev.startswith("cuda"):
        raise FeatxError("--engine gpu needs CUDA; use --engine cpu (or auto)")
    eng = engine if engine != "auto" else default_engine(dev)
    workers = default_workers() if num_workers is None else int(num_workers)
    if workers < 0:
        raise FeatxError(f"--workers must be >= 0, got {num_workers}")
    if eng == "cpu":
        resolve_runtime(runtime, dev)  # an impossible explicit choice fails here, before any file is read
    elif (runtime or "auto").lower() not in ("auto", "torch"):
        raise FeatxError(f"--runtime {runtime} runs the network on the CPU; the GPU engine uses torch: drop "
                         "--runtime, or pass --device cpu")
    # The request is kept ("auto" may still fall back to torch if a network does not convert).
    return EngineSettings(backbone, None if weights is None else str(weights), dev, eng, int(batch_size), workers,
                          dtype, int(chunk_size), device_request=device, engine_request=engine,
                          runtime=(runtime or "auto").lower(), views=",".join(parts), tta=tta,
                          train_views=train_views)


def _cache_path(cache, cache_dir, ds: Dataset, bb: Backbone, fp: dict, limit: int | None) -> Path:
    """The cache file for these settings, with its folder created."""
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
    return path


def plan(root, *, manifest, settings: EngineSettings, cache, cache_dir, limit: int | None,
         source: SourceOptions | None = None) -> EmbedPlan:
    """Discover the images, build the backbone and fingerprint, and name the cache file (no lock yet).

    ``root`` may be a folder, an fsspec URL, WebDataset shards or a Parquet table (:mod:`featx.data.sources`).
    """
    if root is None and manifest is None:
        raise FeatxError("pass a dataset folder (or --manifest FILE.csv)")
    ds = discover_any(root, manifest=manifest, options=source)  # folders, URLs, WebDataset, Parquet
    samples = ds.samples if limit is None else limit_per_split(ds.samples, limit)
    samples = augment.add_train_views(samples, settings.train_views or 0)
    openvino = settings.engine == "cpu" and resolve_runtime(settings.runtime, settings.device).startswith("openvino")
    bb = run_backbone(settings.backbone, weights=settings.weights, views=settings.views, tta=settings.tta,
                      openvino=openvino)  # an OpenVINO run with a kept card builds no torch network
    fp = cache_fingerprint(bb, settings.dtype, settings.runtime, device=settings.device, engine=settings.engine)
    path = _cache_path(cache, cache_dir, ds, bb, fp, limit)
    return EmbedPlan(path, ds, samples, bb, fp, PartsDir(path, fp), train_views=settings.train_views)


def read_done(p: EmbedPlan, *, overwrite: bool = False) -> EmbedPlan:
    """Read what the finished cache and the committed chunks already hold; list the images to embed.

    Call with the lock held: the state it reads must not change under it.
    """
    if overwrite:
        if p.path.exists():
            log.info("--overwrite: removing %s", p.path)
            p.path.unlink()
        p.parts.remove()
    if p.path.exists():
        p.old = FeatureCache(p.path)  # raises a clear error if damaged
        p.old.check_compatible(p.fingerprint)
        if p.old.root and os.path.realpath(p.old.root) != os.path.realpath(p.dataset.root):
            log.warning("cache %s was built from %s; reusing images by relative path", p.path, p.old.root)
        p.index.update(read_final_index(p.old))
        forget_damaged(p.old, p.index)  # rows failing their checksums are embedded again
        p.prior_seconds = float(p.old.meta.get("embed_seconds", 0.0))
    if p.train_views is None:  # not asked: keep the augmented views the cache has (finished work)
        p.train_views = p.old.train_views if p.old is not None else 0
        p.samples = augment.add_train_views(p.samples, p.train_views)
    if p.parts.exists():
        p.parts.ensure()  # refuses parts written with other settings
        p.index.update(p.parts.read_index())
    todo = [s for s in p.samples if not _is_fresh(p.index.get(s.key), s.path)]
    p.samples = augment.drop_views_of_failed(p.samples, p.index, retried={s.key for s in todo})
    kept = {s.key for s in p.samples}
    p.todo = [s for s in todo if s.key in kept]
    return p


def _is_fresh(entry: tuple | None, path: str) -> bool:
    """Is this stored row (or failure) still valid for the file at ``path``?"""
    if entry is None:
        return False
    if entry[0] == "failed" and entry[1].startswith(_RETRY_REASONS):
        # Access problems get fixed without touching mtime/size (chmod, a new link target):
        # retry once the file is readable, without rebuilding the cache while it is not.
        return not _readable(path)
    try:
        mtime, size = stamp_of(path)  # a remote sample's ETag (or mtime) and size, read at discovery
    except OSError:
        return entry[0] == "failed"
    return entry[-2] == mtime and entry[-1] == size


def is_up_to_date(p: EmbedPlan) -> bool:
    """Nothing to embed, no unfinished chunks, and the finished cache holds exactly these images."""
    if p.old is None or p.parts.exists() or p.todo:
        return False
    return set(p.index) == {s.key for s in p.samples} and p.old.classes == list(p.dataset.classes)


def shard_share(p: EmbedPlan, shard: tuple[int, int], chunk_size: int) -> list:
    """The pending images of shard I of N: block b of the full, ordered image list goes to shard
    b mod N, with blocks of ``chunk_size`` images, smaller when the list has fewer than 4 blocks
    per shard (so 2 shards of 960 images split them evenly, not 960 + 0).

    Decided on the image list and the options, not on what is pending, so shards that start at
    different moments (and see different chunks done) still split the work without gaps.
    """
    i, n = shard
    block = max(1, min(chunk_size, -(-len(p.samples) // (4 * n))))
    pos = {s.key: k for k, s in enumerate(p.samples)}
    return [s for s in p.todo if (pos[s.key] // block) % n == i]


def run_local(p: EmbedPlan, todo: Sequence, s: EngineSettings, stats: EmbedStats, *, progress: bool) -> None:
    """Embed ``todo`` in this process, committing a chunk file every ``chunk_size`` images."""
    t_embed = time.perf_counter()
    done = 0
    for chunk in iter_chunks(todo, p.backbone, device=s.device, batch_size=s.batch_size, num_workers=s.num_workers,
                             chunk_size=s.chunk_size, dtype=s.dtype, progress=progress, engine=s.engine,
                             runtime=s.runtime):
        cf = p.parts.write_chunk(chunk)
        done += len(chunk.keys) + len(chunk.failed)
        stats.failed_new += len(chunk.failed)
        for i, k in enumerate(chunk.keys):
            p.index[k] = ("chunk", cf, i, int(chunk.mtime_ns[i]), int(chunk.size[i]))
        for k, r, m, sz in chunk.failed:
            p.index[k] = ("failed", r, int(m), int(sz))
    _count(stats, done, time.perf_counter() - t_embed)


def _count(stats: EmbedStats, done: int, seconds: float) -> None:
    stats.embedded = done - stats.failed_new
    stats.images_per_s = done / seconds if seconds > 0 else 0.0
    stats.embed_seconds = seconds


def finalise(p: EmbedPlan, s: EngineSettings, stats: EmbedStats) -> FeatureCache:
    """Assemble the finished cache from the chunks and the previous cache, then drop ``.parts``."""
    import torch  # heavy: only for its version string, already loaded by the backbone

    bb, ds = p.backbone, p.dataset
    attrs = {
        "backbone": bb.name,
        "weights_sha256": bb.weights_sha256,
        "weights_source": bb.weights_source,
        "preprocess": bb.preprocess.describe(),
        "preprocess_json": json.dumps(bb.preprocess.to_dict()),
        "fingerprint": fingerprint_digest(p.fingerprint),
        "fingerprint_json": json.dumps(p.fingerprint, sort_keys=True),
        "featx_version": __version__,
        "torch_version": torch.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "root": ds.root,
        "root_mac": sign_root(ds.root, fingerprint_digest(p.fingerprint)),  # image files are read only from signed roots
        "layout": ds.layout,
        "device": s.device,
        "engine": s.engine,
        # The network runtime asked for and the one it resolves to here (provenance: torch and openvino
        # give the same features; a network that does not convert falls back to torch with a warning).
        "runtime": resolve_runtime(s.runtime, s.device) if s.engine == "cpu" else "torch",
        "runtime_request": s.runtime,
        # Total time spent embedding this cache over all runs: the finished cache's, plus every committed
        # chunk's own time (this run's, a killed run's, shards' and Ray actors').
        "embed_seconds": p.prior_seconds + max(stats.embed_seconds, p.parts.total_seconds()),
        "train_views": p.train_views,
        "train_views_recipe": augment.describe(p.train_views) if p.train_views else "",
    }
    write_final(p.path, samples=p.samples, classes=ds.classes, index=p.index, dim=bb.dim, dtype=s.dtype, attrs=attrs,
                layout=bb.layout)
    p.parts.remove()
    stats.rebuilt = True
    return FeatureCache(p.path)


# Keywords of embed() that are not options of `featx embed`, with their library defaults.
_EXTRAS = {"progress": True, "wait": True}


def embed(root: str | os.PathLike | None = None, *, settings: EmbedSettings | None = None,
          **overrides: Any) -> "FeatureCache | ShardResult":
    """Embed every image under ``root`` (or in ``manifest``) and return the finished cache.

    Safe to rerun: finished images are reused, new ones embedded, removed ones dropped; a cache
    written with other settings is refused unless ``overwrite``.  ``strict`` turns any image
    that fails to load into an error after the run (the cache is still written).
    ``executor="ray"`` runs the pending chunks on a Ray Data actor pool (``ray_address``: an
    existing cluster; default a local Ray on this machine; ``num_actors``: default one per GPU,
    else one per CPU).  ``shard="I/N"`` embeds only shard I's deterministic 1/N of the pending
    chunks and returns a :class:`ShardResult` without writing the finished cache: run every
    shard (at the same time, anywhere the cache folder is shared), then a plain ``embed``.
    ``views`` (``final``, ``stages``, ``gem``) and ``tta`` (``flip``) store extra feature parts
    that the probe can choose among (:mod:`featx.embedding.networks.views`); ``views="final"`` writes the
    plain cache of earlier featx versions.  ``train_views`` also stores that many augmented views
    of each training image (:mod:`featx.embedding.engines.augment`) in the cache's ``augmented/`` group;
    None keeps what the cache already stores, 0 removes them.

    ``settings``: the options of ``featx embed`` (:class:`featx.config.EmbedSettings`, default its
    defaults); keyword ``overrides`` replace single fields, by field name or the library's name for
    it (``cache`` for ``cache_path``, ``num_workers`` for ``workers``); an unknown name is a TypeError.
    Library-only keywords: ``progress`` (a bar or log lines) and ``wait`` (for another writer; False
    fails at once, as ``no_wait``).
    """
    t0 = time.perf_counter()
    s, x = EmbedSettings.with_overrides(settings, overrides, call="embed", extras=_EXTRAS)
    cache, cache_dir, manifest, limit, overwrite, strict = s.cache_path, s.cache_dir, s.manifest, s.limit, s.overwrite, s.strict
    executor, shard, num_actors, ray_address = s.executor, s.shard, s.num_actors, s.ray_address
    progress, wait = x["progress"], x["wait"] and not s.no_wait
    settings = check_options(s)
    sh = _check_scale_options(executor, shard, overwrite, num_actors)
    src = SourceOptions(s.image_column, s.label_column, s.read_concurrency, tuple(s.storage_option), s.split_column, s.split,
                        s.data_root, s.class_names, allow_other_buckets=s.allow_other_buckets,
                        max_image_bytes=s.max_image_bytes)
    p = plan(root, manifest=manifest, settings=settings, cache=cache, cache_dir=cache_dir, limit=limit, source=src)
    if sh is not None:
        return _embed_shard(p, settings, sh, t0=t0, progress=progress, wait=wait)
    stats = EmbedStats(total=len(p.samples), device=settings.device, executor=executor)
    lock = acquire_lock(p.path, wait=wait)
    try:
        with PartsLock(p.path).acquire(shared=False, wait=wait):
            read_done(p, overwrite=overwrite)
            stats.reused = _reused(p)
            if is_up_to_date(p):
                stats.seconds = time.perf_counter() - t0
                log.info("cache %s is complete and up to date (%d images); nothing to embed", p.path, len(p.samples))
                p.old.stats = stats
                _check_strict(p.old, strict)
                _check_failures(p.old)
                return p.old
            if p.todo:
                _run_pending(p, settings, stats, executor=executor, ray_address=ray_address, num_actors=num_actors,
                             progress=progress)
            fc = finalise(p, settings, stats)
        stats.seconds = time.perf_counter() - t0
        fc.stats = stats
        log.info("wrote %s: %d rows, %d failed, %.1fs (%.1f images/s embedding)",
                 p.path, len(fc), len(fc.failed), stats.seconds, stats.images_per_s)
        _check_strict(fc, strict)
        _check_failures(fc)
        return fc
    finally:
        lock.release()


def _check_scale_options(executor: str, shard, overwrite: bool, num_actors: int | None) -> tuple[int, int] | None:
    if executor not in EXECUTORS:
        raise FeatxError(f"--executor {executor!r}: expected one of {', '.join(EXECUTORS)}")
    if num_actors is not None and num_actors < 1:
        raise FeatxError(f"--num-actors must be a positive integer, got {num_actors}")
    if executor == "ray":
        import_ray()  # fail before discovery when the extra is missing
    sh = parse_shard(shard)
    if sh is not None and executor != "local":
        raise FeatxError("--shard and --executor ray are alternatives: a shard runs in this process; drop one")
    if sh is not None and overwrite:
        raise FeatxError("--overwrite cannot be combined with --shard (other shards may be writing); run a plain "
                         "`featx embed ... --overwrite` first, or delete the cache and its .parts folder")
    return sh


def _run_pending(p: EmbedPlan, s: EngineSettings, stats: EmbedStats, *, executor: str, ray_address, num_actors,
                 progress: bool) -> None:
    """Embed ``p.todo`` with the chosen executor; every chunk is committed to ``p.parts``."""
    p.parts.ensure()
    log.info("embedding %d images (%d reused) with %s on %s [%s engine, %s executor], writing %s",
             len(p.todo), stats.reused, p.backbone.name, s.device, s.engine, executor, p.parts.dir)
    if executor == "local":
        run_local(p, p.todo, s, stats, progress=progress)
        return
    t_embed = time.perf_counter()
    done, failed = run_on_ray(p.todo, settings=s, parts=p.parts, ray_address=ray_address,
                              num_actors=num_actors, progress=progress)
    stats.failed_new = failed
    _count(stats, done, time.perf_counter() - t_embed)
    p.index.update(p.parts.read_index())


def _embed_shard(p: EmbedPlan, s: EngineSettings, shard: tuple[int, int], *, t0: float, progress: bool,
                 wait: bool) -> ShardResult:
    """One ``--shard I/N`` run: add this shard's chunks to ``.parts``; never write the finished cache."""
    stats = EmbedStats(total=len(p.samples), device=s.device, executor="local")
    with PartsLock(p.path).acquire(shared=True, wait=wait):
        read_done(p)
        mine = shard_share(p, shard, s.chunk_size)
        stats.reused = _reused(p)
        label = f"{shard[0]}/{shard[1]}"
        if mine:
            p.parts.ensure()
            log.info("shard %s: embedding %d of the %d pending images into %s", label, len(mine), len(p.todo),
                     p.parts.dir)
            run_local(p, mine, s, stats, progress=progress)
        else:
            log.info("shard %s: nothing to embed (%d images pending in other shards)", label, len(p.todo))
    stats.seconds = time.perf_counter() - t0
    return ShardResult(label, str(p.parts.dir), str(p.path), len(p.todo), len(mine), stats)


def _readable(path: str) -> bool:
    """Can the file be opened now? (Pillow parses the header only: cheap.)  A remote sample is tried again."""
    from PIL import Image

    if not is_local(path):
        return True

    try:
        with Image.open(path):
            return True
    except OSError as exc:  # includes Pillow's UnidentifiedImageError: readable, just not an image
        return not isinstance(exc, (PermissionError, FileNotFoundError)) and exc.errno is None
    except Exception:  # noqa: BLE001 - readable now (if broken, the retry records the new reason)
        return True


def _reused(p: EmbedPlan) -> int:
    """Images whose stored row is used as it is (a stored failure is not a reused image)."""
    todo = {s.key for s in p.todo}
    return sum(1 for s in p.samples if s.key not in todo and (p.index.get(s.key) or ("",))[0] != "failed")


def _check_failures(fc) -> None:
    """Exit non-zero when no row was embedded, or more than half of the images failed for one reason."""
    why = dominant_failure(fc.failed, len(fc))
    if why:
        raise FeatxError(f"{why}; the cache {fc.path} records every failure (featx info {fc.path} --failed)")


def _check_strict(fc, strict: bool) -> None:
    if strict and fc.failed:
        shown = "; ".join(f"{k}: {r}" for k, r in fc.failed[:5])
        raise FeatxError(
            f"--strict: {len(fc.failed)} image(s) could not be loaded ({shown}{' ...' if len(fc.failed) > 5 else ''}); "
            f"fix or remove them, or drop --strict. The cache {fc.path} was still written."
        )


def limit_per_split(samples: Sequence, limit: int) -> list:
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


_limit_per_split = limit_per_split  # old name, used by benchmarks/embed_bench.py
