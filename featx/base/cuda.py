"""CUDA helpers that keep the GPU path right on any device ordinal, in any thread, under Ray.

Why a module of its own: every call that touches CUDA goes through ``torch.cuda`` attributes
looked up when it runs, so a test can replace them with recording doubles and check, on a
machine without a GPU, which device and stream each step uses.  Nothing here imports torch
at module level (``featx --help`` stays fast).
"""

from __future__ import annotations

import contextlib
import re

from .errors import FeatxError

_CUDA = re.compile(r"^cuda(?::(\d+))?$")


def parse_cuda(device: str) -> int | None:
    """``cuda`` -> None, ``cuda:N`` -> N; anything else is an error naming the option."""
    m = _CUDA.match(device.strip().lower())
    if m is None:
        raise FeatxError(f"--device {device!r}: expected auto, cpu, cuda, cuda:N or mps")
    return None if m.group(1) is None else int(m.group(1))


def check_ordinal(device: str) -> str:
    """``cuda:N`` must name a GPU this process can see; checked before any file is read."""
    import torch  # heavy

    n = parse_cuda(device)
    if n is None:
        return "cuda"
    count = int(torch.cuda.device_count())
    if n >= count:
        seen = ", ".join(f"cuda:{i}" for i in range(count)) or "none"
        raise FeatxError(f"--device {device}: this process sees {count} CUDA device(s) ({seen}); pass one of them "
                         "(CUDA_VISIBLE_DEVICES renumbers the GPUs it lists from cuda:0)")
    return f"cuda:{n}"


def actor_device(device_request: str) -> str:
    """The device a Ray actor asks for: ``cuda:N`` -> ``cuda``.

    Ray gives each GPU actor its own GPU through ``CUDA_VISIBLE_DEVICES``, where it is always
    ``cuda:0``; an ordinal chosen on the driver means nothing on the actor's node.
    """
    d = (device_request or "auto").strip().lower()
    return "cuda" if d.startswith("cuda") else d


def is_cuda(dev) -> bool:
    return getattr(dev, "type", str(dev).split(":")[0]) == "cuda"


def device_scope(dev):
    """``torch.cuda.device(dev)`` on CUDA (a thread starts on cuda:0 whatever the main thread set)."""
    import torch  # heavy

    return torch.cuda.device(dev) if is_cuda(dev) else contextlib.nullcontext()


def record_event(dev):
    """An event recorded on ``dev``'s current stream (``Event.record()`` alone records on the
    current *device*'s stream, which is cuda:0's in a thread that never chose one)."""
    import torch  # heavy

    ev = torch.cuda.Event()
    ev.record(torch.cuda.current_stream(dev))
    return ev


def drain_stream(dev) -> None:
    """Wait on the host until ``dev``'s current stream is idle.

    torchvision's batched CUDA ``decode_jpeg`` allocates its outputs on the caller's stream and
    writes them from nvJPEG's own stream without waiting for the caller's queued work, so a
    block freed on the caller's stream but still read by queued kernels can be overwritten
    (pytorch/vision#9606).  Draining the caller's stream before each decode closes that window.
    """
    import torch  # heavy

    if is_cuda(dev):
        torch.cuda.current_stream(dev).synchronize()


def free_bytes(dev) -> int | None:
    """Free memory on a CUDA device (``torch.cuda.mem_get_info``); None elsewhere."""
    import torch  # heavy

    if not is_cuda(dev):
        return None
    return int(torch.cuda.mem_get_info(dev)[0])


def is_oom(exc: BaseException) -> bool:
    """Is ``exc`` a device out-of-memory error (``torch.cuda.OutOfMemoryError``)?"""
    import torch  # heavy

    return isinstance(exc, torch.cuda.OutOfMemoryError)


def rows_to_device(x, rows: list[int], device: str):
    """``x[rows]`` for the network, keeping a pinned batch's copy to the GPU asynchronous.

    ``x[rows]`` on a pinned tensor makes a pageable copy, whose ``.to(cuda, non_blocking=True)``
    then blocks; so on CUDA the whole pinned batch goes over first and is indexed on the device.
    """
    if len(rows) == len(x):
        return x
    if str(device).startswith("cuda") and x.is_pinned():
        return x.to(device, non_blocking=True)[rows]
    return x[rows]

