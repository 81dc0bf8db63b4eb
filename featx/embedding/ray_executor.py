"""Run pending chunks on a Ray Data actor pool (``featx embed --executor ray``), and parse ``--shard``.

Following Ray's batch-inference pattern: ``ray.data.from_items`` of chunk descriptors (one per
block), ``map_batches`` with a callable class that builds the backbone once per actor
(``ActorPoolStrategy``; ``num_gpus=1`` per actor on GPU clusters, one CPU per actor otherwise).
Each actor runs featx's own engine on its chunk and commits the chunk file atomically into the
shared ``NAME.h5.parts`` folder, so the driver (which holds the cache lock) only counts finished
chunks for its progress bar and then assembles the finished cache exactly as a local run does.
An actor killed mid-chunk is restarted and its chunk retried: Ray Data creates its actor pools
with ``max_restarts=-1`` and ``max_task_retries=-1`` (its documented default; passing them
ourselves goes through ``ray_remote_args``, deprecated since Ray 2.60).  A chunk committed
twice is harmless (same rows, same features), and one never committed is embedded again.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Sequence

import numpy as np

from ..base.cuda import actor_device
from ..base.errors import FeatxError
from ..base.progress import progress_bar
from ..base.runtime import resolve_device
from ..cache.store import PartsDir
from ..data.folders import Sample
from ..data.sources import SourceOptions, configure, current_options
from .backbones import create_backbone
from .engines.chunks import EngineSettings, cache_fingerprint, default_engine, iter_chunks

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'featx[ray]'"


def parse_shard(shard: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """``"I/N"`` (0 <= I < N) -> (I, N); None stays None."""
    if shard is None:
        return None
    try:
        i, n = (int(v) for v in (shard.split("/") if isinstance(shard, str) else shard))
    except (ValueError, TypeError):
        i, n = -1, 0
    if not (n >= 1 and 0 <= i < n):
        raise FeatxError(f"--shard {shard!r}: expected I/N with 0 <= I < N, e.g. --shard 0/4 ... --shard 3/4 "
                         "(SLURM: --array=0-3 with --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)")
    return i, n


def import_ray():
    """Ray, or a one-line error saying how to install it (it is an optional extra)."""
    try:
        import ray  # optional dependency: featx[ray]
        import ray.data  # noqa: F401 - the executor needs Ray Data, not only Ray core
    except ImportError as exc:
        raise FeatxError(f"--executor ray needs Ray Data ({exc.name or 'ray'} is not installed): "
                         f"{INSTALL_HINT}") from None
    return ray


def chunk_tasks(todo: Sequence, chunk_size: int, *, actors: int = 1) -> list[list]:
    """The pending images cut into chunk descriptors, in order: at most ``chunk_size`` images
    each, and at least about 4 per actor so that every actor has work (and a slow chunk does
    not leave the others idle at the end)."""
    if not todo:
        return []
    size = max(1, min(chunk_size, -(-len(todo) // (4 * max(1, actors)))))
    return [list(todo[a : a + size]) for a in range(0, len(todo), size)]


def describe_chunks(tasks: Sequence[Sequence]) -> list[dict]:
    """Chunk descriptors as Ray Data rows.  Paths travel as ASCII JSON: Arrow needs valid UTF-8,
    file names need not be."""
    return [{"chunk": k, "n": len(t), "task": json.dumps([[s.path, s.key] for s in t])} for k, t in enumerate(tasks)]


class ChunkEmbedder:
    """Ray Data actor: builds the backbone once, then embeds and commits one chunk per row."""

    def __init__(self, settings: dict, cache_path: str, fingerprint: dict, threads: int, workers: int,
                 source: SourceOptions | None = None) -> None:
        self.s = EngineSettings(**settings)
        configure(source)  # the driver's storage options: this actor reads remote inputs itself
        self.device = resolve_device(actor_device(self.s.device_request))  # cuda:N -> this actor's own GPU
        req = self.s.engine_request
        self.engine = req if req != "auto" else default_engine(self.device)
        self.bb = create_backbone(self.s.backbone, weights=self.s.weights, views=self.s.views, tta=self.s.tta)
        if self.engine != "cpu" and self.s.runtime not in ("auto", "torch"):
            raise FeatxError(f"--runtime {self.s.runtime} runs on the CPU, but Ray node {os.uname().nodename} embeds "
                             "on a GPU; drop --runtime or run CPU-only actors")
        found = cache_fingerprint(self.bb, self.s.dtype, self.s.runtime, device=self.device, engine=self.engine)
        if found != fingerprint:
            raise FeatxError(
                f"the backbone built on Ray node {os.uname().nodename} (device {self.device}, engine {self.engine}) "
                f"differs from the driver's ({found} vs {fingerprint}); install the same featx, torch and weights "
                "file on every node, and pass --device cuda or --device cpu when the driver has no GPU but the "
                "nodes do"
            )
        self.parts = PartsDir(cache_path, fingerprint)
        self.threads, self.workers = threads, workers
        self.worker = f"ray{os.getpid()}"

    def __call__(self, batch: dict) -> dict:
        out: dict[str, list] = {"chunk": [], "done": [], "failed": []}
        for cid, task in zip(batch["chunk"], batch["task"]):
            samples = [Sample(p, k, 0, "train") for p, k in json.loads(str(task))]
            done = failed = 0
            for chunk in iter_chunks(samples, self.bb, device=self.device, batch_size=self.s.batch_size,
                                     num_workers=self.workers, chunk_size=max(1, len(samples)), dtype=self.s.dtype,
                                     progress=False, engine=self.engine, cpu_threads=self.threads,
                                     runtime=self.s.runtime if self.engine == "cpu" else "torch"):
                self.parts.write_chunk(chunk, worker=self.worker)
                done += len(chunk.keys) + len(chunk.failed)
                failed += len(chunk.failed)
            out["chunk"].append(int(cid))
            out["done"].append(done)
            out["failed"].append(failed)
        return {k: np.asarray(v, dtype=np.int64) for k, v in out.items()}


def _connect(ray, ray_address: str | None) -> bool:
    """Join ``ray_address`` (or an already initialised Ray), else start a local one; True if we started it.

    Without an address Ray would join any cluster that ``ray start`` left on this machine (even
    another user's or another featx version's); "local" always starts a private one, and
    ``--ray-address auto`` joins the machine's cluster on purpose.
    """
    if ray.is_initialized():
        return False
    try:
        ray.init(address=ray_address or "local", include_dashboard=False, logging_level=logging.WARNING,
                 configure_logging=True, log_to_driver=True)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise FeatxError(f"--ray-address {ray_address!r}: cannot connect to a Ray cluster ({exc}); start one with "
                         "`ray start --head` or drop --ray-address to start Ray on this machine") from None
    return True


def _pool(ray, n_items: int, num_actors: int | None, s: EngineSettings) -> tuple[int, dict, int, int]:
    """(actors, resources per actor, CPU threads, decode workers per actor) for this cluster."""
    res = ray.cluster_resources()
    gpus, cpus = int(res.get("GPU", 0)), max(1, int(res.get("CPU", 1)))
    if gpus and s.device_request != "cpu":
        # One actor per GPU by default; more actors than GPUs share them (fractional GPUs), which
        # helps only when one actor cannot keep its GPU busy.
        actors = max(1, min(num_actors or gpus, n_items))
        per = max(1, min(8, cpus // max(actors, gpus)))
        return actors, {"num_gpus": min(1.0, gpus / actors), "num_cpus": per}, 1, min(s.num_workers, per)
    # CPU actors share the cores: each gets cpus // actors of them, as intra-op threads for the
    # network and (with 2 or more) as many DataLoader decode workers, the local engine's layout.
    actors = max(1, min(num_actors or cpus, cpus, n_items))
    per = max(1, cpus // actors)
    return actors, {"num_cpus": per}, per, (per if per > 1 else 0)


def run_on_ray(todo: Sequence, *, settings: EngineSettings, parts: PartsDir, ray_address: str | None,
               num_actors: int | None, progress: bool) -> tuple[int, int]:
    """Embed ``todo`` on a Ray Data actor pool, one chunk file per descriptor; returns (images done, failed)."""
    ray = import_ray()
    started = _connect(ray, ray_address)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # one bar, the driver's, over all actors
        ctx.print_on_execution_start = False  # featx logs what runs where itself
        actors, resources, threads, workers = _pool(ray, len(todo), num_actors, settings)
        tasks = chunk_tasks(todo, settings.chunk_size, actors=actors)
        log.info("Ray: %d actor(s) with %s each, %d chunk(s)", actors, resources, len(tasks))
        rows = describe_chunks(tasks)
        ds = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
            ChunkEmbedder,
            fn_constructor_kwargs=dict(settings=settings.to_dict(), cache_path=str(parts.final),
                                       fingerprint=parts.fingerprint, threads=threads, workers=workers,
                                       source=current_options()),
            batch_size=1, compute=ray.data.ActorPoolStrategy(size=actors), **resources,
        )
        done = failed = 0
        with progress_bar(total=sum(r["n"] for r in rows), unit="img", disable=not progress,
                  desc="embed") as bar:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                n = int(batch["done"].sum())
                done += n
                failed += int(batch["failed"].sum())
                bar.update(n)
        return done, failed
    except ray.exceptions.RayError as exc:
        raise FeatxError(f"the Ray job failed ({str(exc).splitlines()[0]}); committed chunks are kept in "
                         f"{parts.dir}: rerun the same command to resume") from None
    finally:
        if started:
            ray.shutdown()
