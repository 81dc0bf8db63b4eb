"""The CPU engine: Pillow decoding in DataLoader workers, the network in channels_last."""

from __future__ import annotations

import os
from typing import Sequence

from ..base.runtime import keep_heap_buffers, worker_init
from ..data.images import load_or_blank


class _ImageDataset:
    """Map-style dataset: index -> (index, tensor, error, mtime_ns, size). Never raises."""

    def __init__(self, samples: Sequence, transform, crop: int, draft_size: int | None) -> None:
        self.samples = samples
        self.transform = transform
        self.crop = crop
        self.draft = draft_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        s = self.samples[i]
        try:
            st = os.stat(s.path)
            mtime, size = st.st_mtime_ns, st.st_size
        except OSError:
            mtime, size = 0, -1
        x, err = load_or_blank(s.path, self.transform, crop=self.crop, draft_size=self.draft)
        return i, x, err, mtime, size


def _collate(batch):
    import torch

    idx = [b[0] for b in batch]
    x = torch.stack([b[1] for b in batch])
    return idx, x, [b[2] for b in batch], [b[3] for b in batch], [b[4] for b in batch]


def iter_cpu_batches(samples, backbone, *, batch_size: int, num_workers: int, pin: bool, draft: bool = True):
    """Yield (indices, images tensor, errors, mtimes, sizes) using a torch DataLoader."""
    import torch
    from torch.utils.data import DataLoader

    pre = backbone.preprocess
    ds = _ImageDataset(samples, pre.pil_transform(), pre.crop, pre.resize if draft else None)
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


def forward_fn(backbone, device: str):
    """Return f(x) -> float32 numpy features: channels_last everywhere, bf16 autocast on CUDA.

    On the CPU two things matter more than anything else on small machines: channels_last
    (oneDNN's fast convolution layout, ~1.4x for EfficientNet/ResNet) and keeping glibc from
    returning every large activation buffer to the OS after each layer (with its default
    32 MB mmap threshold, a batch of 64 at 224 px page-faults gigabytes per batch and the run
    spends more time in the kernel than in the network).
    """
    import torch

    model = backbone.model.to(device).eval()
    cuda = device.startswith("cuda")
    # The channels_last copy of the weights is made on the first batch, after the DataLoader
    # has forked its workers: an OpenMP parallel region in the parent before fork() leaves
    # libgomp's state broken in the children and their first tensor op hangs.
    converted = []
    if device == "cpu":
        keep_heap_buffers()

    def f(x):
        if not converted:
            model.to(memory_format=torch.channels_last)
            converted.append(True)
        with torch.inference_mode():
            x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            if cuda:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    y = model(x)
            else:
                y = model(x)
            return y.float().cpu().numpy()

    return f
