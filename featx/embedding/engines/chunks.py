"""One engine call: images in, committed-chunk-sized :class:`~featx.cache.Chunk` objects out.

Shared by every executor (the local runner, a ``--shard`` run, a Ray Data actor), so that all
of them embed an image the same way and a cache assembled from their chunks is identical to a
one-process run.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Sequence

import numpy as np

from ...base.choices import DTYPES  # noqa: F401 - re-exported
from ...base.cuda import device_scope, rows_to_device
from ...base.progress import progress_bar
from ...base.version import __version__
from ...cache.store import Chunk
from ...config import defaults
from ...data.sources import is_local
from ..runtimes.forward import runtime_fingerprint
from . import augment
from .cpu import forward_fn, iter_cpu_batches
from .gpu import iter_gpu_features

log = logging.getLogger(__name__)

_E = defaults("embed")  # the typed defaults of `featx embed`
# How images are decoded before the backbone's preprocessing (JPEG draft at >= 2x the resize).
DECODE_VERSION = "pil-draft2x"
# The GPU engine: baseline JPEGs by nvJPEG at full resolution, the other files as above.
GPU_DECODE_VERSION = "nvjpeg-full+pil-draft2x"


@dataclass(frozen=True)
class EngineSettings:
    """The validated options every executor needs to embed a chunk the same way.

    ``device``/``engine`` are resolved on the driver; ``device_request``/``engine_request`` are
    what the user asked for, resolved again on a Ray node (whose GPUs the driver may not have).
    """

    backbone: str
    weights: str | None
    device: str
    engine: str
    batch_size: int
    num_workers: int
    dtype: str
    chunk_size: int
    device_request: str = "auto"
    engine_request: str = "auto"
    runtime: str = "auto"  # network runtime on the CPU (featx.embedding.runtimes.forward)
    views: str = _E.views  # stored feature parts (featx.embedding.networks.views)
    tta: str = _E.tta
    # augmented views per training image (featx.embedding.engines.augment); None: what the cache stores
    train_views: int | None = _E.train_views

    def to_dict(self) -> dict:
        return asdict(self)


def cache_fingerprint(backbone, dtype: str, runtime: str = "auto", *, device: str = "cpu",
                      engine: str = "cpu") -> dict:
    """Everything that changes the stored features; a cache written with others is refused.

    Runtimes that reproduce torch fp32's features (torch, openvino) add nothing, so caches written
    before runtimes existed keep their fingerprint; openvino-bf16 adds its precision, and so do
    CUDA (bf16 autocast) and the GPU engine (nvJPEG decoding: :func:`device_fingerprint`).
    """
    fp = dict(backbone.fingerprint())
    fp.update(runtime_fingerprint(runtime))
    fp["dtype"] = dtype
    fp["featx_version"] = __version__
    fp["decode"] = DECODE_VERSION
    fp.update(device_fingerprint(device, engine))
    return fp


def device_fingerprint(device: str, engine: str) -> dict:
    """Fingerprint entries of where the network runs and who decodes: none on the CPU (old caches
    keep their name); bf16 on CUDA; nvJPEG at full resolution (4:2:0 chroma upsampled by nearest
    neighbour) for the GPU engine's JPEGs, PIL's draft decoding for the other files.

    The CUDA entry is ``autocast``, not ``precision``: a head trained on bf16 features still
    applies to fp32 ones (``featx.heads.saved.persist`` compares ``precision`` between head and features).
    """
    fp = {}
    if str(device).startswith("cuda"):
        fp["autocast"] = "bf16-cuda"
    if engine == "gpu":
        fp["engine"] = "gpu"
        fp["decode"] = GPU_DECODE_VERSION
    return fp


def default_engine(device: str) -> str:
    """``--engine auto``: nvJPEG decoding on CUDA, Pillow elsewhere."""
    return "gpu" if str(device).startswith("cuda") else "cpu"


def set_cpu_threads(num_workers: int, threads: int | None = None) -> int:
    """Intra-op threads for the network on the CPU (``FEATX_CPU_THREADS`` wins); returns the count.

    All cores for the network, beside the decode workers: measured on 2 cores with nothing else
    running, 2 intra-op threads + 2 workers embed 97 images/s (efficientnet_lite0) and 78
    (resnet18) vs 49 and 41 with 1 thread. When other processes load the machine, OpenMP's
    spin-waiting makes 1 thread the better choice (60 vs 24-32 images/s at load 2-3): set
    FEATX_CPU_THREADS=1 there.  A Ray actor passes its own CPU share as ``threads``.
    """
    import torch  # heavy: only when a network actually runs

    n = int(os.environ.get("FEATX_CPU_THREADS") or 0) or threads or (os.cpu_count() or 1)
    torch.set_num_threads(n)
    log.info("CPU layout: %d decode worker(s), %d intra-op thread(s) for the network", num_workers, n)
    return n


def _cpu_stream(todo: Sequence, backbone, *, device: str, batch_size: int, num_workers: int, runtime: str):
    """The CPU engine as (idx, errs, mtimes, sizes, ok, features) batches, like the GPU engine."""
    fwd = forward_fn(backbone, device, runtime=runtime)
    # OpenVINO normalises inside the network: the workers send uint8 images (a torch fallback normalises them)
    uint8 = getattr(fwd, "runtime", "torch").startswith("openvino")
    # a plain callable (one batch at a time) runs the batches in order
    run_many = getattr(fwd, "run_many", None) or (lambda tagged: ((tag, fwd(x)) for tag, x in tagged))
    with device_scope(device):  # the loader's pinning thread takes this thread's device (cuda:N, not cuda:0)
        batches = iter_cpu_batches(todo, backbone, batch_size=batch_size, num_workers=num_workers,
                                   pin=device.startswith("cuda"), uint8=uint8)
        for (idx, errs, mts, szs, ok), feats in run_many(_loaded_rows(batches, device)):
            yield idx, errs, mts, szs, ok, feats  # OpenVINO keeps several batches in flight meanwhile


def _loaded_rows(batches, device: str) -> Iterator:
    """(tag, the images that loaded) per batch; tag = (indices, errors, mtimes, sizes, loaded positions)."""
    for idx, x, errs, mts, szs in batches:
        ok = [j for j, e in enumerate(errs) if not e]
        yield (idx, errs, mts, szs, ok), rows_to_device(x, ok, device)


def feature_batches(todo: Sequence, backbone, *, device: str, batch_size: int, num_workers: int, engine: str,
                    cpu_threads: int | None = None, runtime: str = "auto") -> Iterator:
    """Batches ``(idx, errs, mtimes, sizes, ok, features)`` from the chosen engine.

    The GPU engine decodes plain images only: augmented training views go through the CPU
    decoder (still run by the network on the GPU).
    """
    if engine == "gpu":  # remote samples (featx.data.sources) are fetched and decoded by the CPU path too
        plain = [i for i, s in enumerate(todo) if not augment.is_aug(s.key) and is_local(s.path)]
        views = [i for i, s in enumerate(todo) if augment.is_aug(s.key) or not is_local(s.path)]
        gpu = iter_gpu_features([todo[i] for i in plain], backbone, device=device, batch_size=batch_size,
                                num_workers=num_workers)
        cpu = _cpu_stream([todo[i] for i in views], backbone, device=device, batch_size=batch_size,
                          num_workers=num_workers, runtime="torch") if views else iter(())
        return itertools.chain(_renumber(gpu, plain), _renumber(cpu, views))
    if device == "cpu":
        set_cpu_threads(num_workers, cpu_threads)
    return _cpu_stream(todo, backbone, device=device, batch_size=batch_size, num_workers=num_workers, runtime=runtime)


def _renumber(batches: Iterator, positions: list[int]) -> Iterator:
    """Batches of a sub-list with their indices mapped back to positions in the full list."""
    for idx, *rest in batches:
        yield ([positions[i] for i in idx], *rest)


class _ChunkBuffer:
    """Accumulates one chunk's rows until it is big enough to commit."""

    def __init__(self, layout: tuple = ()) -> None:
        self.layout = layout  # (part, width) of the network's output columns; () = features only
        self.keys: list[str] = []
        self.feats: list[np.ndarray] = []
        self.mts: list[int] = []
        self.szs: list[int] = []
        self.failed: list[tuple[str, str, int, int]] = []
        self.count = 0

    def add(self, todo: Sequence, batch, dtype: str) -> int:
        idx, errs, mts, szs, ok, feats = batch
        for j in ok:
            self.keys.append(todo[idx[j]].key)
            self.mts.append(mts[j])
            self.szs.append(szs[j])
        self.feats.append(feats.astype(dtype, copy=False))
        for j, e in enumerate(errs):
            if e:
                self.failed.append((todo[idx[j]].key, e, mts[j], szs[j]))
                log.warning("failed to load %s: %s", todo[idx[j]].path, e)
        self.count += len(idx)
        return len(idx)

    def chunk(self, seconds: float) -> Chunk:
        cols = split_parts(np.concatenate(self.feats), self.layout)
        feats = cols.pop("features")
        return Chunk(self.keys, feats, np.asarray(self.mts), np.asarray(self.szs), self.failed, seconds=seconds,
                     parts=cols)


def split_parts(X: np.ndarray, layout: tuple) -> dict[str, np.ndarray]:
    """The network's output columns as named parts (``{"features": X}`` without a layout)."""
    if not layout:
        return {"features": X}
    out, a = {}, 0
    for name, width in layout:
        out[name] = np.ascontiguousarray(X[:, a : a + width])
        a += width
    return out


def iter_chunks(todo: Sequence, backbone, *, chunk_size: int, dtype: str, progress: bool, **stream: Any) -> Iterator[Chunk]:
    """Run the network over ``todo`` (samples) and yield :class:`featx.cache.Chunk` objects of ~chunk_size.

    ``stream``: the keywords of :func:`feature_batches` (device, batch_size, num_workers, engine,
    cpu_threads, runtime), passed on unchanged.
    """
    stream = feature_batches(todo, backbone, **stream)
    bar = progress_bar(total=len(todo), unit="img", disable=not progress, desc="embed")
    buf = _ChunkBuffer(backbone.layout)
    t0 = time.perf_counter()  # each chunk carries its embedding time (not the time to commit it)
    try:
        for batch in stream:
            bar.update(buf.add(todo, batch, dtype))
            if buf.count >= chunk_size:
                yield buf.chunk(time.perf_counter() - t0)
                buf = _ChunkBuffer(backbone.layout)
                t0 = time.perf_counter()
        if buf.count:
            yield buf.chunk(time.perf_counter() - t0)
    finally:
        bar.close()
