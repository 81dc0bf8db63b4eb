"""How a batch travels from the GPU engine's loader workers: one byte buffer plus offsets.

Why: a DataLoader worker sends every tensor of a batch as its own shared-memory segment, and the
main process holds one file descriptor per segment until the batch is used.  With one tensor per
file, 16 workers x prefetch 4 x batch 256 is 16,000 descriptors: far past the usual
``ulimit -n 1024`` ("Too many open files", "received 0 items of ancdata").  Packed, a batch
is at most two tensors (all JPEG bytes in one uint8 buffer, all Pillow-decoded images in one
float tensor) whatever its size.

Also here: cutting a batch's JPEGs into decode groups under a pixel budget, so that the decoded
images alive on the device at any moment stay bounded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence


@dataclass
class Item:
    """What a worker makes of one file: raw JPEG bytes, or an already prepared tensor."""

    index: int
    kind: str  # "jpeg", "tensor" or "fail"
    payload: object  # uint8 tensor of bytes / float tensor [3, crop, crop] / None
    error: str
    mtime_ns: int
    size: int
    orientation: int = 1
    path: str = ""
    pixels: int = 0  # width x height from the JPEG header (0: unknown)


@dataclass
class PackedBatch:
    """A batch of :class:`Item` as (at most) two tensors plus plain lists."""

    items: list  # the Items without their payloads
    data: object = None  # uint8 [total bytes]: the JPEGs one after another
    offsets: list = field(default_factory=list)  # JPEG k is data[offsets[k]:offsets[k + 1]]
    images: object = None  # float [n, 3, crop, crop]: the "tensor" items, in order


def pack_items(items: list) -> PackedBatch:
    """The DataLoader ``collate_fn`` of the GPU engine (runs in the worker)."""
    import torch  # heavy

    jpegs = [it.payload for it in items if it.kind == "jpeg"]
    tensors = [it.payload for it in items if it.kind == "tensor"]
    offsets = [0]
    for b in jpegs:
        offsets.append(offsets[-1] + int(b.numel()))
    data = torch.cat(jpegs) if jpegs else None
    images = torch.stack(tensors) if tensors else None
    bare = [Item(it.index, it.kind, None, it.error, it.mtime_ns, it.size, it.orientation, it.path, it.pixels)
            for it in items]
    return PackedBatch(bare, data, offsets, images)


def unpack(batch) -> list:
    """The Items back, their payloads views into the batch's two tensors (no copies)."""
    if not isinstance(batch, PackedBatch):
        return list(batch)
    out, j, t = [], 0, 0
    for it in batch.items:
        payload = None
        if it.kind == "jpeg":
            payload = batch.data[batch.offsets[j] : batch.offsets[j + 1]]
            j += 1
        elif it.kind == "tensor":
            payload = batch.images[t]
            t += 1
        out.append(Item(it.index, it.kind, payload, it.error, it.mtime_ns, it.size, it.orientation, it.path,
                        it.pixels))
    return out


def pixel_groups(pixels: Sequence[int], budget: int) -> list[list[int]]:
    """Consecutive positions cut into groups of at most ``budget`` pixels (an image larger than
    the budget makes a group of its own)."""
    groups: list[list[int]] = [[]]
    used = 0
    for j, px in enumerate(pixels):
        if groups[-1] and used + px > budget:
            groups.append([])
            used = 0
        groups[-1].append(j)
        used += px
    return [g for g in groups if g]
