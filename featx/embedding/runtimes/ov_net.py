"""A compiled OpenVINO network: one batch at a time, or a stream of batches with several in flight.

- **Several infer requests in flight** (:meth:`OpenVinoNet.run_many`): with the ``THROUGHPUT``
  hint OpenVINO splits the cores into streams (2 streams of 1 thread on 2 cores) and each
  request runs a whole batch on one stream. While the network works on the batches in flight
  the Python thread collects finished features and hands the next decoded batch over, so the
  network never waits for Python between batches (measured: +10-30 % over one synchronous
  request with all threads on the 2-core EPYC under load, see BENCHMARKS.md).
- **uint8 input**: the decode workers send resized, cropped uint8 images (a quarter of the
  bytes of float ones) and the network scales and normalises them itself, as its first
  layers (OpenVINO's PrePostProcessor; mean and std are the backbone's own).
- **Compiled-model cache**: compiling takes ~0.4 s on 2 cores, loading a compiled blob ~0.15 s,
  so compiled networks are kept in ``<model cache>-compiled`` beside the converted ones
  (OpenVINO's ``CACHE_DIR``; OpenVINO keys the blobs by the network, the options and the CPU).
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import Callable, Iterable, Iterator

import numpy as np

from ...base.errors import FeatxError

log = logging.getLogger(__name__)


def with_uint8_input(model, preprocess):
    """``model`` (float NCHW input, normalised) -> a copy taking uint8 NCHW and normalising it itself."""
    from openvino import Layout, Type  # optional extra
    from openvino.preprocess import PrePostProcessor

    m = model.clone()
    ppp = PrePostProcessor(m)
    ppp.input().tensor().set_element_type(Type.u8)
    ppp.input().model().set_layout(Layout("NCHW"))
    steps = ppp.input().preprocess().convert_element_type(Type.f32).scale(255.0)
    steps.mean([float(v) for v in preprocess.mean]).scale([float(v) for v in preprocess.std])
    return ppp.build()


def _as_array(x) -> np.ndarray:
    arr = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
    return np.ascontiguousarray(arr if arr.dtype == np.uint8 else arr.astype(np.float32, copy=False))


class _Slot:
    """One batch in flight: its input (kept alive while OpenVINO reads it) and, later, its output."""

    __slots__ = ("arr", "out", "error", "done")

    def __init__(self, arr: np.ndarray) -> None:
        self.arr = arr
        self.out: np.ndarray | None = None
        self.error: str = ""
        self.done = threading.Event()


def _store(request, slot: _Slot) -> None:
    """AsyncInferQueue callback: copy the output out of the request (it is reused for a later batch)."""
    try:
        slot.out = np.array(request.get_output_tensor(0).data, dtype=np.float32, copy=True).reshape(len(slot.arr), -1)
    except Exception as exc:  # noqa: BLE001 - raised again in the consumer's thread
        slot.error = f"{type(exc).__name__}: {exc}"
    slot.arr = None
    slot.done.set()


class OpenVinoNet:
    """``f(x)`` -> float32 features for one batch (uint8 or normalised float32 NCHW input);
    :meth:`run_many` for a stream of batches with ``requests`` of them in the network at once.

    ``compiled(kind)`` returns the compiled network for input kind "u8" or "f32" (compiled on
    first use and kept by the caller).
    """

    def __init__(self, compiled: Callable[[str], object], out_dim: int) -> None:
        self._compiled = compiled
        self.out_dim = out_dim
        self._sync: dict[str, object] = {}
        self._streams: dict[str, int] = {}

    def streams(self, kind: str) -> int:
        """Requests OpenVINO can run at once (its optimum for the hint: one per stream)."""
        if kind not in self._streams:
            try:
                self._streams[kind] = max(1, int(self._compiled(kind).get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
            except Exception:  # noqa: BLE001 - a property an older OpenVINO may not have
                self._streams[kind] = 1
        return self._streams[kind]

    def requests(self, kind: str) -> int:
        """Infer requests to keep in flight: one per stream, at least 2 (one runs while one is handed over)."""
        return max(2, self.streams(kind))

    def __call__(self, x) -> np.ndarray:
        """One batch, split over the streams (a single request would run on one stream's cores only)."""
        arr = _as_array(x)
        if len(arr) == 0:
            return np.zeros((0, self.out_dim), np.float32)
        kind = "u8" if arr.dtype == np.uint8 else "f32"
        n = min(len(arr), self.streams(kind))
        if n > 1:
            parts = np.array_split(arr, n)
            return np.concatenate([y for _, y in self.run_many(enumerate(parts))])
        if kind not in self._sync:
            self._sync[kind] = self._compiled(kind).create_infer_request()
        out = self._sync[kind].infer({0: arr}, share_inputs=True)[0]
        # The output buffer belongs to the request and is overwritten by the next batch.
        return np.array(out, dtype=np.float32, copy=True).reshape(len(arr), -1)

    def run_many(self, items: Iterable[tuple[object, object]]) -> Iterator[tuple[object, np.ndarray]]:
        """``(tag, batch)`` in -> ``(tag, features)`` out, in the same order, several batches in flight."""
        import openvino as ov  # optional extra

        queues: dict[str, object] = {}
        pending: collections.deque = collections.deque()
        try:
            yield from self._run(items, queues, pending, ov)
        finally:  # also when the consumer stops early: no request may still read a freed input
            for q in queues.values():
                q.wait_all()

    def _run(self, items, queues: dict, pending: collections.deque, ov) -> Iterator[tuple[object, np.ndarray]]:
        for tag, x in items:
            arr = _as_array(x)
            slot = _Slot(arr)
            if len(arr) == 0:
                slot.out, slot.arr = np.zeros((0, self.out_dim), np.float32), None
                slot.done.set()
            else:
                kind = "u8" if arr.dtype == np.uint8 else "f32"
                if kind not in queues:
                    queues[kind] = ov.AsyncInferQueue(self._compiled(kind), self.requests(kind))
                    queues[kind].set_callback(_store)
                queues[kind].start_async({0: arr}, userdata=slot, share_inputs=True)  # waits for a free request
            pending.append((tag, slot))
            while pending and pending[0][1].done.is_set():
                yield _finished(*pending.popleft())
        while pending:
            tag, slot = pending.popleft()
            slot.done.wait()
            yield _finished(tag, slot)


def _finished(tag, slot: _Slot) -> tuple[object, np.ndarray]:
    if slot.error:
        raise FeatxError(f"the OpenVINO network failed on a batch ({slot.error}); rerun with --runtime torch")
    return tag, slot.out
