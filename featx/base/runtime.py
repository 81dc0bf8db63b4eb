"""Where and how work runs: the device, worker counts, per-process thread and heap settings."""

from __future__ import annotations

import os
import sys

from .cuda import check_ordinal, parse_cuda
from .errors import FeatxError


def resolve_device(device: str | None, *, local: bool = True) -> str:
    """``auto`` picks CUDA when present; asking for CUDA without it, or for a GPU ordinal this
    process does not see, is an error with a fix.  ``local=False`` (work that runs on Ray nodes,
    each resolving its own device): ``cuda``/``cuda:N`` is only checked for its form."""
    import torch

    d = (device or "auto").lower()
    if d == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if d.startswith("cuda"):
        if not local:
            parse_cuda(d)
            return "cuda"
        if not torch.cuda.is_available():
            raise FeatxError(f"--device {device}: CUDA is not available on this machine; use --device cpu (or auto)")
        return check_ordinal(d)
    if d == "cpu":
        return d
    if d == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise FeatxError("--device mps: MPS is not available here; use --device cpu (or auto)")
        return d
    raise FeatxError(f"--device {device!r}: expected auto, cpu, cuda, cuda:N or mps")


def default_workers() -> int:
    n = os.cpu_count() or 1
    return max(0, min(n, 16))


def worker_init(_: int) -> None:
    """DataLoader worker: decode on one thread, leave the other cores to the network."""
    import torch

    torch.set_num_threads(1)


def keep_heap_buffers() -> None:
    """glibc only: keep freed activation buffers in the heap for the next batch.

    With glibc's default 32 MB mmap threshold every large activation is mmapped, page-faulted
    in and unmapped again per layer; on a small CPU machine that costs as much as the network.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def default_num_workers(device: str) -> int:
    """One loader worker per core on CUDA (at most 16); on the CPU the cores are needed for compute."""
    n = os.cpu_count() or 1
    if device.startswith("cuda"):
        return max(1, min(n, 16))
    return 0 if n <= 2 else min(4, n // 4)


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, job schedulers) unwinds like Ctrl-C, so the user is told how to resume."""


STOPPING: list[bool] = []  # a SIGTERM arrived: whatever goes wrong while the run unwinds is part of the stop


def on_sigterm(signum, frame) -> None:  # noqa: ARG001
    """The CLI's SIGTERM handler: raise :class:`Terminated` once.  SIGTERM to the process group (SLURM,
    ``timeout``) also ends the DataLoader workers: their deaths (torch's SIGCHLD handler) and errors of clean-up
    code (``__del__``, weakref callbacks) must not print over the one line that says how to resume."""
    import signal

    if not STOPPING:
        STOPPING.append(True)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        sys.unraisablehook = lambda *_: None
        raise Terminated()
