"""The CPU engine: Pillow decoding in DataLoader workers, the network run by a runtime (torch or OpenVINO)."""

from __future__ import annotations

from typing import Sequence

from ...base.runtime import worker_init
from ...data.images import load_or_blank
from ...data.sources import Fetched, blank, fetch_many, stamp_of
from ..runtimes.forward import Forward, make_forward
from . import augment


class _ImageDataset:
    """Map-style dataset: index -> (index, tensor, error, mtime_ns, size). Never raises."""

    def __init__(self, samples: Sequence, transform, crop: int, draft_size: int | None, aug_transform=None,
                 uint8: bool = False) -> None:
        self.samples = samples
        self.transform = transform
        self.uint8 = uint8  # transform gives uint8 images (no augmented views then)
        self.aug_transform = aug_transform  # for augmented training views (featx.embedding.engines.augment)
        self.crop = crop
        self.draft = draft_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitems__(self, indices: list[int]) -> list:
        """A batch: remote samples' bytes are fetched together, ``--read-concurrency`` at a time."""
        fetched = fetch_many([self.samples[i].path for i in indices])
        return [self._item(i, f) for i, f in zip(indices, fetched)]

    def __getitem__(self, i: int):
        return self._item(i, fetch_many([self.samples[i].path])[0])

    def _item(self, i: int, fetched: Fetched | None):
        s = self.samples[i]
        try:
            mtime, size = stamp_of(s.path)
        except OSError:
            mtime, size = 0, -1
        tf = self.transform
        if augment.is_aug(s.key):
            import torch

            torch.manual_seed(augment.view_seed(s.key))  # this view is the same in every process and run
            tf = self.aug_transform
        if fetched is not None and fetched.error:
            return i, self._blank(blank(self.crop)), fetched.error, mtime, size
        src = s.path if fetched is None else fetched.open()
        x, err = load_or_blank(src, tf, crop=self.crop, draft_size=self.draft)
        return i, self._blank(x) if err else x, err, mtime, size

    def _blank(self, x):
        """A failed image's stand-in, of the batch's dtype (uint8 when the network normalises)."""
        import torch

        return torch.zeros(x.shape, dtype=torch.uint8) if self.uint8 else x


def _collate(batch):
    import torch

    idx = [b[0] for b in batch]
    x = torch.stack([b[1] for b in batch])
    return idx, x, [b[2] for b in batch], [b[3] for b in batch], [b[4] for b in batch]


def iter_cpu_batches(samples, backbone, *, batch_size: int, num_workers: int, pin: bool, draft: bool = True,
                     uint8: bool = False):
    """Yield (indices, images tensor, errors, mtimes, sizes) using a torch DataLoader.

    ``uint8``: resized, cropped uint8 images, not normalised (for a network that normalises them
    itself: a quarter of the bytes, and the workers skip a third of their work); ignored when
    ``samples`` hold augmented training views (their transform ends in float).
    """
    import torch
    from torch.utils.data import DataLoader

    pre = backbone.preprocess
    views = any(augment.is_aug(s.key) for s in samples)
    aug = pre.train_transform(min_scale=augment.MIN_SCALE) if views else None
    uint8 = uint8 and not views
    tf = pre.uint8_transform() if uint8 else pre.pil_transform()
    ds = _ImageDataset(samples, tf, pre.crop, pre.resize if draft else None, aug, uint8=uint8)
    kwargs = {}
    if num_workers > 0:
        kwargs.update(prefetch_factor=4, persistent_workers=False)
        # Each worker decodes on one thread; the main process keeps the rest for the network.
        kwargs["worker_init_fn"] = worker_init
    loader = DataLoader(
        ds, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=_collate,
        pin_memory=pin, **kwargs,
    )
    del torch
    yield from loader


def forward_fn(backbone, device: str, *, runtime: str = "auto", model_cache=None) -> Forward:
    """Return f(x) -> float32 numpy features, run by ``runtime`` (see :mod:`featx.embedding.runtimes.forward`).

    ``auto`` runs OpenVINO fp32 on the CPU when installed (same features, 2-4x faster on small
    CPUs) and torch otherwise; ``f.runtime`` says which one ran ("torch" or "openvino"), for the
    cache's provenance. An explicit runtime that cannot run here raises FeatxError.
    ``openvino-bf16`` is faster and changes the features: opt-in, and part of the cache
    fingerprint via :func:`featx.embedding.runtimes.forward.runtime_fingerprint`.
    """
    return make_forward(backbone, device, runtime=runtime, model_cache=model_cache)
