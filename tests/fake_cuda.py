"""A recording stand-in for ``torch.cuda`` on machines without a GPU.

The GPU path looks its ``torch.cuda`` functions up when it runs, so a test replaces them with
these doubles and checks what was asked of CUDA: which device a thread selected, which stream an
event was recorded on, whether a stream was drained before a decode.  Tensors stay on the CPU.
"""

from __future__ import annotations

import contextlib
import threading

import pytest
import torch


class FakeStream:
    def __init__(self, cuda: "FakeCuda", device) -> None:
        self.cuda = cuda
        self.device = torch.device(device)

    def synchronize(self) -> None:
        self.cuda.log.append(("sync", str(self.device)))

    def wait_event(self, event) -> None:
        self.cuda.log.append(("wait", str(self.device)))


class FakeEvent:
    def __init__(self, cuda: "FakeCuda") -> None:
        self.cuda = cuda
        self.stream = "not recorded"

    def record(self, stream=None) -> None:
        self.stream = stream
        self.cuda.log.append(("record", None if stream is None else str(stream.device)))

    def synchronize(self) -> None:
        pass


class FakeCuda:
    """Installs itself over ``torch.cuda.*`` with ``monkeypatch``; ``log`` lists what was asked."""

    def __init__(self, monkeypatch, *, count: int = 2, free: int = 80 << 30) -> None:
        self.log: list[tuple] = []
        self.count = count
        self.free = free
        self.current = threading.local()
        m = monkeypatch
        m.setattr(torch.cuda, "is_available", lambda: True)
        m.setattr(torch.cuda, "device_count", lambda: self.count)
        m.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream(self, device or self._device()))
        m.setattr(torch.cuda, "Stream", lambda device=None, **_: FakeStream(self, device or self._device()))
        m.setattr(torch.cuda, "Event", lambda *a, **k: FakeEvent(self))
        m.setattr(torch.cuda, "stream", self._stream)
        m.setattr(torch.cuda, "device", self._device_ctx)
        m.setattr(torch.cuda, "mem_get_info", lambda device=None: (self.free, 2 * self.free))

    def _device(self) -> str:
        return getattr(self.current, "device", "cuda:0")

    @contextlib.contextmanager
    def _device_ctx(self, device):
        self.log.append(("device", str(torch.device(device)), threading.current_thread().name))
        old = self._device()
        self.current.device = str(torch.device(device))
        try:
            yield
        finally:
            self.current.device = old

    @contextlib.contextmanager
    def _stream(self, stream):
        self.log.append(("stream", None if stream is None else str(stream.device)))
        yield


@pytest.fixture
def fake_cuda(monkeypatch) -> FakeCuda:
    """Two fake GPUs (cuda:0, cuda:1) with 80 GiB free each."""
    return FakeCuda(monkeypatch)
