"""The ``head`` strategy on features: the frozen trunk runs once per image and view, never per step.

Why: with the backbone frozen, every training step of ``--strategy head`` used to decode an
image, augment it and run the whole network, only to train one linear layer on its pooled
output.  The features of an augmented view do not depend on the head, so each epoch's view is
embedded once, in large batches on featx's embedding runtime (OpenVINO on the CPU when
installed), and the head trains on the feature rows in well under a second per epoch, with the
same optimiser, schedule, batch order, early stopping and checkpoints as before.

Where the features come from (``FinetuneResult.features``, shown in the compare report):

- ``cache train views (K=k)``: the cache holds ``--train-views k`` augmented views per training
  image (:mod:`featx.embedding.engines.augment`, the fine-tune's own augmentation); epoch ``e`` trains on
  view ``e mod k``, validation and evaluation use the cache's plain features: no network pass at
  all.
- ``embedded once per epoch``: epoch ``e``'s view is the augmented view number ``e`` that
  ``featx embed --train-views`` would store (same recipe, same per-image seed), embedded at the
  start of the epoch (saved in the run folder as it goes, so a kill resumes it); validation and
  evaluation use the cache's plain features (files changed since embedding are embedded again, once).
- ``trunk every step``: the strategies that train the backbone (``partial``, ``full``), and a
  ``head`` run whose augmentation differs from the cache's recipe (``min_scale``).
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from ..base.io import atomic_write_bytes
from ..cache.rows import read_rows
from ..cache.store import AUG_SEP, FeatureCache
from ..config import defaults
from ..data.folders import Sample
from ..data.sources import stamp_of
from ..embedding.engines import augment
from ..embedding.engines.chunks import feature_batches
from ..embedding.runtimes.forward import runtime_fingerprint

log = logging.getLogger(__name__)

TRUNK = "trunk every step"
EMBEDDED = "embedded once per epoch"


def cache_views_label(k: int) -> str:
    return f"cache train views (K={k})"


def plan_source(fc: FeatureCache, settings) -> dict | None:
    """Where the ``head`` strategy's features come from, as it enters the run's key; None: the trunk every step.

    The cache's views qualify when they were made with the fine-tune's augmentation recipe.
    """
    if settings.strategy != "head" or settings.min_scale != augment.MIN_SCALE:
        return None
    k = int(getattr(fc, "train_views", 0) or 0)
    if k and all(_recipe(key) == augment.RECIPE for key in fc.augmented_keys()):
        return {"source": "cache", "views": k, "recipe": augment.RECIPE}
    return {"source": "embedded", "recipe": augment.RECIPE}


def source_label(plan: dict | None) -> str:
    if plan is None:
        return TRUNK
    return cache_views_label(plan["views"]) if plan["source"] == "cache" else EMBEDDED


def cache_runtime(fc: FeatureCache, device: str) -> str:
    """The runtime whose features ``fc`` holds: ``openvino-bf16`` for a bf16 cache on the CPU, else ``auto``
    (OpenVINO fp32 or torch on the CPU, torch on CUDA)."""
    fp = fc.fingerprint_dict
    bf16 = runtime_fingerprint("openvino-bf16")
    same = bool(bf16) and all(fp.get(k) == v for k, v in bf16.items())
    return "openvino-bf16" if same and device == "cpu" else "auto"


def unchanged(fc: FeatureCache, rows: np.ndarray, paths: list[str]) -> np.ndarray:
    """Which of ``rows`` still have the file (mtime, size) they were embedded from."""
    mtime, size = fc.stamps()
    out = np.zeros(len(rows), bool)
    for i, r in enumerate(rows):
        try:
            out[i] = stamp_of(paths[int(r)]) == (int(mtime[r]), int(size[r]))
        except OSError:
            pass
    return out


def _recipe(key: str) -> str:
    return key.split(AUG_SEP, 1)[1].rsplit(":", 1)[0] if AUG_SEP in key else ""


@dataclass
class Table:
    """Feature rows of some cache rows; ``ok`` is False where an image did not load (or has no view)."""

    rows: np.ndarray
    feats: np.ndarray
    ok: np.ndarray

    def take(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pos = np.searchsorted(self.rows, rows)
        return self.feats[pos], self.ok[pos]


def _sorted(rows: np.ndarray) -> np.ndarray:
    return np.sort(np.asarray(rows, dtype=np.int64))


class CacheViews:
    """The cache's augmented views (epoch ``e``: view ``e mod K``) and its plain features: no network."""

    def __init__(self, fc: FeatureCache, fit_rows: np.ndarray, k: int) -> None:
        self.fc, self.k = fc, k
        self.fit = _sorted(fit_rows)
        feats, src = fc.augmented(self.fit)
        view = np.asarray([int(key.rsplit(":", 1)[1]) for key in fc.augmented_keys(self.fit)], dtype=np.int64)
        self.views = []
        pos = np.searchsorted(self.fit, src)
        for v in range(k):
            t = Table(self.fit, np.zeros((len(self.fit), feats.shape[1]), np.float32), np.zeros(len(self.fit), bool))
            m = view == v
            t.feats[pos[m]], t.ok[pos[m]] = feats[m], True
            if not t.ok.all():
                log.warning("finetune[head]: %d of %d training images have no cached view %d; that epoch skips them",
                            int((~t.ok).sum()), len(t.ok), v)
            self.views.append(t)

    def train_view(self, epoch: int) -> Table:
        return self.views[epoch % self.k]

    def plain(self, rows: np.ndarray) -> Table:
        rows = _sorted(rows)
        return Table(rows, read_rows(self.fc, rows, self.fc.split_array()), np.ones(len(rows), bool))


class EmbeddedViews:
    """Each epoch's augmented view embedded once (the view ``featx embed --train-views`` would store).

    Validation and evaluation rows use the cache's features of the same backbone, except for files
    changed since they were embedded, which are embedded again (or skipped when they no longer load).
    The network runs in the cache's runtime precision (fp32, or OpenVINO bf16 for a bf16 cache).
    The view being embedded is saved in the run folder every ``every`` seconds (and when complete),
    so a killed run resumes it where it stopped; a finished epoch's view is removed.
    """

    def __init__(self, fc: FeatureCache, backbone, fit_rows: np.ndarray, *, device: str, num_workers: int,
                 store: Path | None = None, every: float = 0.0) -> None:
        self.fc, self.bb, self.device, self.num_workers = fc, backbone, device, num_workers
        self.paths, self.keys = fc.paths(), fc.keys()
        self.fit = _sorted(fit_rows)
        self.runtime = cache_runtime(fc, device)
        self.store, self.every = store, every
        self.current: tuple[int, Table] | None = None

    def train_view(self, epoch: int) -> Table:
        if self.current is None or self.current[0] != epoch:
            self.current = (epoch, self.embed_view(epoch))
        return self.current[1]

    def plain(self, rows: np.ndarray) -> Table:
        rows = _sorted(rows)
        same = unchanged(self.fc, rows, self.paths)
        t = Table(rows, np.zeros((len(rows), self.fc.dim), np.float32), same.copy())
        if same.any():
            t.feats[same] = read_rows(self.fc, rows[same], self.fc.split_array())
        if not same.all():
            log.info("finetune[head]: %d images changed since they were embedded; embedding them again", int((~same).sum()))
            self.embed(t, np.flatnonzero(~same), view=None)
        return t

    def embed_view(self, epoch: int) -> Table:
        """Epoch ``epoch``'s view of the training rows, continuing a saved part of it."""
        t, done = Table(self.fit, np.zeros((len(self.fit), self.fc.dim), np.float32), np.zeros(len(self.fit), bool)), None
        path = self.store / f"view-{epoch:04d}.npz" if self.store is not None else None
        if path is not None:
            for old in self.store.glob("view-*.npz"):  # earlier epochs are in the checkpoint
                if old != path:
                    old.unlink(missing_ok=True)
            done = _load_view(path, t)
        if done is None:
            done = np.zeros(len(self.fit), bool)
        elif done.any():
            log.info("finetune[head]: resuming view %d: %d of %d images were embedded", epoch, int(done.sum()), len(done))
        saved = [time.perf_counter()]

        def batch_done(pos: np.ndarray, last: bool) -> None:
            done[pos] = True
            if path is not None and (last or (self.every and time.perf_counter() - saved[0] >= self.every)):
                _save_view(path, t, done)
                saved[0] = time.perf_counter()

        self.embed(t, np.flatnonzero(~done), view=epoch, on_batch=batch_done)
        return t

    def embed(self, t: Table, pos: np.ndarray, *, view: int | None, on_batch=None) -> None:
        """Fill ``t`` at positions ``pos`` (augmented view number ``view``, or the eval transform), in large batches."""
        t0 = time.perf_counter()
        rows = t.rows[pos]
        samples = [Sample(self.paths[r], self.keys[r] if view is None else augment.aug_key(self.keys[r], view), 0, "train")
                   for r in rows]
        with torch.random.fork_rng(devices=[]):  # the views seed themselves; the trainer's RNG stays as it was
            for idx, errs, _, _, good, f in feature_batches(
                samples, self.bb, device=self.device, batch_size=defaults("embed").batch_size,
                num_workers=self.num_workers, engine="cpu", runtime=self.runtime,
            ):
                at = pos[np.asarray(idx, dtype=np.int64)]
                t.feats[at[good]], t.ok[at[good]] = f, True
                for j, e in enumerate(errs):
                    if e:
                        log.warning("skipping %s: %s", samples[idx[j]].path, e)
                if on_batch is not None:
                    on_batch(at, False)
        if on_batch is not None:
            on_batch(pos[:0], True)
        dt = time.perf_counter() - t0
        log.info("finetune[head]: embedded %s of %d images in %.1f s (%.1f images/s)",
                 "the eval transform" if view is None else f"augmented view {view}", len(rows), dt, len(rows) / max(dt, 1e-9))


def _save_view(path: Path, t: Table, done: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez(buf, rows=t.rows, feats=t.feats, ok=t.ok, done=done)
    atomic_write_bytes(path, buf.getvalue())


def _load_view(path: Path, t: Table) -> np.ndarray | None:
    """The saved part of a view into ``t``; its done mask, or None (none saved, or of other rows)."""
    try:
        with np.load(path) as z:
            if not np.array_equal(z["rows"], t.rows) or z["feats"].shape != t.feats.shape:
                return None
            t.feats[:], t.ok[:] = z["feats"], z["ok"]
            return z["done"].astype(bool)
    except (OSError, ValueError, KeyError):
        return None


class FeatureBatches:
    """(features, labels, ok) batches of ``rows`` in their order; the features are made on first iteration."""

    def __init__(self, table: Callable[[], Table], rows: np.ndarray, labels: np.ndarray, batch_size: int) -> None:
        self.table, self.rows, self.labels, self.batch_size = table, np.asarray(rows, np.int64), labels, batch_size
        self.made: Table | None = None

    def prepare(self) -> None:
        """Make the features now (a view may be embedded here), so that a step bar started after it times steps only."""
        if self.made is None:
            self.made = self.table()

    def __len__(self) -> int:
        return -(-len(self.rows) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        self.prepare()
        t, self.made = self.made, None
        # Steps of one linear layer are too small to share: one intra-op thread (measured on 2 busy cores: 1.1 ms
        # a step, against 6-14 ms with 2 threads spin-waiting for each other).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for a in range(0, len(self.rows), self.batch_size):
                r = self.rows[a : a + self.batch_size]
                x, ok = t.take(r)
                yield torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(self.labels[r]), torch.from_numpy(ok)
        finally:
            torch.set_num_threads(threads)


class FeatureLoaders:
    """:class:`featx.finetune.inputs.RowLoaders`' interface over feature rows (a source above)."""

    def __init__(self, source, labels: np.ndarray, *, batch_size: int) -> None:
        self.source, self.labels, self.batch_size = source, np.asarray(labels, np.int64), batch_size
        self.plain_tables: dict[bytes, Table] = {}

    def train(self, rows: np.ndarray, *, epoch: int = 0) -> FeatureBatches:
        return FeatureBatches(lambda: self.source.train_view(epoch), rows, self.labels, self.batch_size)

    def evaluation(self, rows: np.ndarray) -> FeatureBatches:
        def table() -> Table:  # validation is read every epoch: its features are made once
            key = _sorted(rows).tobytes()
            if key not in self.plain_tables:
                self.plain_tables[key] = self.source.plain(rows)
            return self.plain_tables[key]

        return FeatureBatches(table, rows, self.labels, 1024)


def feature_loaders(fc: FeatureCache, plan: dict, backbone, fit_rows: np.ndarray, labels: np.ndarray, *,
                    batch_size: int, device: str, num_workers: int, store: Path | None = None,
                    every: float = 0.0) -> FeatureLoaders:
    """The loaders of a ``head`` run on features from ``plan`` (:func:`plan_source`); ``store``/``every``: where and
    how often the view being embedded is saved (the run folder, ``checkpoint_seconds``)."""
    if plan["source"] == "cache":
        source = CacheViews(fc, fit_rows, int(plan["views"]))
    else:
        source = EmbeddedViews(fc, backbone, fit_rows, device=device, num_workers=num_workers, store=store, every=every)
    return FeatureLoaders(source, labels, batch_size=batch_size)
