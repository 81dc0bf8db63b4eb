"""The GPU decode engine: JPEG bytes in, features out, with the CPU free to just read files.

On a many-core GPU box the plain PyTorch loop is bound by CPU JPEG decoding (~190 images/s per
core), far below what the network runs at.  This engine moves decoding to the device:

- DataLoader workers only read file bytes and parse the JPEG header (format, colour mode, size,
  EXIF orientation) — microseconds per file.  Anything the device decoder should not take
  (PNG/WebP/..., CMYK JPEGs, huge images, unreadable files) is decoded by the same worker
  with the ordinary PIL path (:func:`featx.data.load_or_blank`, the one loader),
  so it falls back transparently and broken files fail with the same reason as on the CPU.
- A worker sends its batch as one byte buffer plus offsets (:mod:`featx.embedding.engines.gpu_batches`):
  one shared-memory descriptor per batch, not one per file.  Progressive JPEGs go to Pillow.
- A producer thread decodes the batch's JPEGs in ``torchvision.io.decode_jpeg`` calls
  (nvJPEG on CUDA; libjpeg-turbo on the CPU), applies EXIF orientation, resizes/crops the
  images in same-size groups with the backbone's own :class:`~featx.embedding.backbones.Preprocess`
  (short-side resize with its interpolation and antialias, centre crop, normalise), on its
  own CUDA stream (drained before every decode: pytorch/vision#9606), while the main thread runs
  the network on the previous batch.  Decoding and resizing go in pixel-bounded groups; on GPU
  out-of-memory a group is halved, and an image that does not fit alone is decoded by Pillow.
  Every thread that touches CUDA first selects the engine's device (``cuda:N`` with N >= 1).
- The network runs in bf16 autocast with channels_last on CUDA; features are copied to pinned
  host memory asynchronously and handed out one batch later, so the GPU never waits for the
  HDF5 writer.  Batches are padded to ``batch_size`` on CUDA so cudnn tunes one shape.
  ``compile=True`` (or ``FEATX_COMPILE=1``) adds ``torch.compile``.

Everything also runs with ``device="cpu"``: that is how the tests check that this path gives
the same features as the PIL path (cosine >= 0.99).
"""

from __future__ import annotations

import io
import logging
import os
import queue
import threading
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from ...base.cuda import device_scope, drain_stream, is_oom, record_event
from ...base.runtime import worker_init
from ...data import guards
from ...data.images import load_or_blank
from .gpu_batches import Item, pack_items, pixel_groups, unpack
from .tensor_images import TensorPreprocess, apply_exif_orientation

log = logging.getLogger(__name__)

JPEG_MAGIC = b"\xff\xd8\xff"
# Larger JPEGs go through the CPU path (PIL draft decoding is faster for them and a batch of
# them could exhaust device memory).
MAX_DEVICE_PIXELS = 40_000_000
# At most this many decoded pixels are alive per decode call (~400 MB of uint8 RGB).
DECODE_PIXEL_BUDGET = 1 << 27
_END = object()
_WARNED: list = []  # out-of-memory of the network: warned once per process


# torchvision 0.29 deprecates its image codecs in favour of TorchCodec and warns on every
# call; decode_jpeg is still the maintained nvJPEG binding shipped with torch, so keep quiet.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)


def _quiet_torchvision_io():
    import torchvision.io as tvio

    return tvio


class _BytesDataset:
    """index -> :class:`Item`.  Never raises: a bad file becomes kind "fail" with a reason.

    Progressive JPEGs go to Pillow with the other files the device decoder should not take:
    nvJPEG decodes them one at a time with host-side Huffman decoding, under a global lock.
    """

    def __init__(self, samples: Sequence, preprocess, *, max_pixels: int = MAX_DEVICE_PIXELS) -> None:
        self.samples = samples
        self.pre = preprocess
        self.max_pixels = max_pixels
        self._transform = None

    def __len__(self) -> int:
        return len(self.samples)

    def _cpu_item(self, i: int, path: str, mtime: int, size: int) -> Item:
        """Decode on the CPU with the one PIL loader, as the CPU engine does."""
        if self._transform is None:
            self._transform = self.pre.pil_transform()
        x, err = load_or_blank(path, self._transform, crop=self.pre.crop, draft_size=self.pre.resize)
        if err:
            return Item(i, "fail", None, err, mtime, size, 1, path)
        return Item(i, "tensor", x, "", mtime, size, 1, path)

    def __getitem__(self, i: int) -> Item:
        import torch
        from PIL import Image

        path = self.samples[i].path
        try:
            st = os.stat(path)
            mtime, size = st.st_mtime_ns, st.st_size
        except OSError:
            return self._cpu_item(i, path, 0, -1)  # load_or_blank words the reason
        try:
            with guards.open_regular(path) as fh:  # a FIFO swapped in after discovery must not hang a worker
                data = fh.read()
        except OSError:
            return self._cpu_item(i, path, mtime, size)
        if not data.startswith(JPEG_MAGIC):
            return self._cpu_item(i, path, mtime, size)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(io.BytesIO(data)) as im:
                    fmt, mode, (w, h) = im.format, im.mode, im.size
                    orientation = int(im.getexif().get(0x0112, 1) or 1)
                    progressive = bool(im.info.get("progressive") or im.info.get("progression"))
        except Exception:  # noqa: BLE001 - the PIL path will give the reason
            return self._cpu_item(i, path, mtime, size)
        if (
            fmt != "JPEG"
            or progressive
            or mode not in ("RGB", "L")
            or w * h > min(self.max_pixels, Image.MAX_IMAGE_PIXELS or self.max_pixels)
            or guards.size_reason((w, h))  # the PIL loader words the reason
        ):
            return self._cpu_item(i, path, mtime, size)
        if orientation not in range(1, 9):
            orientation = 1
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return Item(i, "jpeg", buf, "", mtime, size, orientation, path, w * h)


def decode_jpegs(datas: list, *, device, orientations: Sequence[int] | None = None,
                 pixels: Sequence[int] | None = None) -> list:
    """Decode JPEG byte tensors to RGB uint8 [3, H, W] on ``device``; a failure is an exception
    object in its place (decoded in batches under a pixel budget, one by one after a batch error).

    ``pixels``: each image's size from its header (default: ~10 pixels per compressed byte).
    On CUDA the caller's stream is drained before every decode (:func:`featx.base.cuda.drain_stream`).
    A device out-of-memory error of a batch is raised, for the caller to split the batch.
    """
    tvio = _quiet_torchvision_io()
    out: list = [None] * len(datas)
    dev = str(device)

    def call(arg):
        drain_stream(device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return tvio.decode_jpeg(arg, mode=tvio.ImageReadMode.RGB, device=dev)

    def one(j):
        try:
            return call(datas[j])
        except Exception as exc:  # noqa: BLE001
            return exc

    px = list(pixels) if pixels is not None else [int(d.numel()) * 10 for d in datas]
    for js in pixel_groups(px, DECODE_PIXEL_BUDGET):
        try:
            imgs = call([datas[j] for j in js])
            for j, im in zip(js, imgs):
                out[j] = im
        except Exception as exc:  # noqa: BLE001 - find the culprit(s) one by one
            if is_oom(exc):
                raise
            for j in js:
                out[j] = one(j)
    if orientations is not None:
        for j, o in enumerate(orientations):
            if o != 1 and not isinstance(out[j], Exception):
                out[j] = apply_exif_orientation(out[j], o)
    return out


@dataclass
class _Prepared:
    idx: list
    errs: list
    mts: list
    szs: list
    ok: list
    x: object  # float tensor [len(ok), 3, crop, crop] on the device
    event: object = None


class _Preparer:
    """Turns a list of :class:`Item` into the network's input batch on the device."""

    def __init__(self, backbone, device) -> None:
        import torch

        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.tp = TensorPreprocess(backbone.preprocess, self.device)
        self.pre = backbone.preprocess
        self._pil_transform = None
        self._oom_warned = False

    def _pil_fallback(self, it: Item):
        """A JPEG the device could not decode: decode it with PIL like the CPU path."""
        if self._pil_transform is None:
            self._pil_transform = self.pre.pil_transform()
        x, err = load_or_blank(it.path, self._pil_transform, crop=self.pre.crop, draft_size=self.pre.resize)
        return (None, err) if err else (x, "")

    def __call__(self, items: list) -> _Prepared:
        import torch

        n = len(items)
        errs = [it.error for it in items]
        ready: dict[int, torch.Tensor] = {}  # position -> prepared float [3, crop, crop]
        jpeg = [j for j, it in enumerate(items) if it.kind == "jpeg"]
        px = [_pixels(items[j]) for j in jpeg]
        # Decode and resize group by group: only one group's full-size images are alive at a time.
        for g in pixel_groups(px, DECODE_PIXEL_BUDGET):
            self._jpegs(items, [jpeg[k] for k in g], ready, errs)
        for j, it in enumerate(items):
            if it.kind == "tensor":
                ready[j] = it.payload.to(self.device, non_blocking=True)
            elif it.kind == "fail" and not errs[j]:
                errs[j] = "cannot decode"
        ok = [j for j in range(n) if j in ready and not errs[j]]
        crop = self.pre.crop
        x = torch.stack([ready[j] for j in ok]) if ok else torch.empty(0, 3, crop, crop, device=self.device)
        if self.cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        return _Prepared(
            [it.index for it in items], errs, [it.mtime_ns for it in items], [it.size for it in items], ok, x
        )

    def _jpegs(self, items: list, js: list, ready: dict, errs: list) -> None:
        """Decode + resize the JPEGs at positions ``js``; on device out-of-memory split them in
        halves, and decode an image that does not fit alone with Pillow (one warning per run)."""
        got = None
        try:
            got = self._decode_group(items, js)
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled here
            if not is_oom(exc):
                raise
            if not self._oom_warned:
                self._oom_warned = True
                log.warning("GPU out of memory preparing %d images (%s); splitting such batches, and decoding images "
                            "that do not fit alone with Pillow on the CPU", len(js), str(exc).splitlines()[0][:120])
        if got is None:  # retried outside the except block, whose traceback still holds the failed tensors
            if len(js) > 1:
                h = len(js) // 2
                self._jpegs(items, js[:h], ready, errs)
                self._jpegs(items, js[h:], ready, errs)
                return
            got = {js[0]: self._pil_fallback(items[js[0]])}
        for j, (x, err) in got.items():
            if x is None:
                errs[j] = err
            else:
                ready[j] = x.to(self.device, non_blocking=True)

    def _decode_group(self, items: list, js: list) -> dict:
        """position -> (prepared image or None, error) for the JPEGs at ``js``."""
        dec = decode_jpegs([items[j].payload for j in js], device=self.device,
                           orientations=[items[j].orientation for j in js],
                           pixels=[_pixels(items[j]) for j in js])
        got = {}
        good = [(j, im) for j, im in zip(js, dec) if not isinstance(im, Exception)]
        for j, im in zip(js, dec):
            if isinstance(im, Exception):
                log.debug("device decode failed for %s (%s); decoding it with PIL", items[j].path, im)
                got[j] = self._pil_fallback(items[j])
        if good:
            xs = self.tp([im for _, im in good])
            for (j, _), x in zip(good, xs):
                got[j] = (x, "")
        return got


def _pixels(it: Item) -> int:
    """Decoded size of a JPEG: from its header, else ~10 pixels per compressed byte (generous for photos)."""
    return it.pixels or 10 * int(it.payload.numel())


def _make_forward(backbone, device, *, compile: bool):
    """model(x) -> float32 features on the device: bf16 autocast + channels_last on CUDA."""
    import torch

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    model = backbone.model.to(dev).eval()
    if cuda:
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    if compile:
        try:
            model = torch.compile(model, dynamic=False)
        except Exception as exc:  # noqa: BLE001 - compile is an optimisation only
            log.warning("torch.compile failed (%s); running eagerly", exc)

    def f(x):
        with torch.inference_mode():
            if cuda:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    y = model(x)
            else:
                y = model(x)
            return y.float()

    return f


def _producer(loader, prep: _Preparer, q: "queue.Queue", stop: threading.Event) -> None:
    """Decode + preprocess batches on a side stream; hand them over through ``q``."""
    import torch

    try:
        # A new thread's current device is cuda:0: choose the engine's before touching CUDA.
        with device_scope(prep.device):
            stream = torch.cuda.Stream(device=prep.device) if prep.cuda else None
            with torch.cuda.stream(stream) if stream is not None else nullcontext(), torch.inference_mode():
                for batch in loader:
                    if stop.is_set():
                        break
                    p = prep(unpack(batch))
                    if stream is not None:
                        p.event = torch.cuda.Event()
                        p.event.record(stream)
                    _put(q, p, stop)
    except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
        q.put(exc)
        return
    q.put(_END)


def _put(q: "queue.Queue", p, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            q.put(p, timeout=0.5)
            return
        except queue.Full:
            continue


def iter_gpu_features(
    todo: Sequence,
    backbone,
    *,
    device: str,
    batch_size: int,
    num_workers: int,
    compile: bool | None = None,
    prefetch_batches: int = 2,
) -> Iterator[tuple[list, list, list, list, list, np.ndarray]]:
    """Yield ``(idx, errs, mts, szs, ok, feats)`` per batch, like the CPU stream of ``embed``.

    ``idx``: indices into ``todo``; ``errs``: "" or the failure reason per item; ``mts``/``szs``:
    the files' mtime_ns/size; ``ok``: the positions that succeeded; ``feats``: float32
    [len(ok), dim].  JPEGs are decoded on ``device`` (nvJPEG on CUDA); other files and
    JPEGs the device cannot take go through the PIL path transparently.
    """
    import torch  # heavy
    from torch.utils.data import DataLoader

    dev = torch.device(device)
    if compile is None:
        compile = os.environ.get("FEATX_COMPILE", "") not in ("", "0")
    prep = _Preparer(backbone, dev)
    fwd = _make_forward(backbone, dev, compile=compile)
    kwargs = {}
    if num_workers > 0:
        kwargs.update(prefetch_factor=4, worker_init_fn=worker_init)
    loader = DataLoader(
        _BytesDataset(todo, backbone.preprocess), batch_size=batch_size, shuffle=False, num_workers=num_workers,
        collate_fn=pack_items, pin_memory=False, **kwargs,
    )
    q: queue.Queue = queue.Queue(maxsize=max(1, prefetch_batches))
    stop = threading.Event()
    th = threading.Thread(target=_producer, args=(loader, prep, q, stop), name="featx-gpu-decode", daemon=True)
    th.start()
    # cudnn.benchmark and compile(dynamic=False) tune per input shape: every batch gets the same one.
    pad_to = batch_size if (prep.cuda or compile) else 0
    pending = None  # (prepared, host features, event)
    try:
        while True:
            p = q.get()
            if p is _END:
                break
            if isinstance(p, BaseException):
                raise p
            with device_scope(dev):
                host, ev = _forward_to_host(p, fwd, dev, backbone.out_dim, pad_to=pad_to)
            p.x = None
            if pending is not None:
                yield _finish(pending)
            pending = (p, host, ev)
        if pending is not None:
            yield _finish(pending)
    finally:
        stop.set()
        _drain(q)  # unblock the producer if it waits on a full queue, then let it wind down
        th.join(timeout=5)


def _forward_to_host(p: _Prepared, fwd, dev, dim: int, *, pad_to: int = 0) -> tuple:
    """Run the network on a prepared batch (padded with zero images to ``pad_to`` rows); on CUDA
    start an async copy to pinned host memory, with an event on ``dev``'s own current stream."""
    import torch  # heavy

    cuda = dev.type == "cuda"
    if cuda and p.event is not None:
        cur = torch.cuda.current_stream(dev)
        cur.wait_event(p.event)
        p.x.record_stream(cur)
    if not p.ok:
        return torch.zeros(0, dim), None
    x, n = p.x, p.x.shape[0]
    if pad_to > n:
        x = torch.cat([x, x.new_zeros((pad_to - n,) + tuple(x.shape[1:]))])
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
    y = _forward_split(fwd, x)[:n]
    if not cuda:
        return y, None
    host = torch.empty(y.shape, dtype=torch.float32, pin_memory=True)
    host.copy_(y, non_blocking=True)
    return host, record_event(dev)


def _forward_split(fwd, x):
    """``fwd(x)``; on device out-of-memory, the two halves one after the other (and so on)."""
    import torch  # heavy

    try:
        return fwd(x)
    except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled here
        if not is_oom(exc) or len(x) < 2:
            raise
    if not _WARNED:
        _WARNED.append("forward")
        log.warning("GPU out of memory running the network on %d images; running such batches in halves", len(x))
    h = len(x) // 2
    return torch.cat([_forward_split(fwd, x[:h]), _forward_split(fwd, x[h:])])


def _drain(q: "queue.Queue") -> None:
    try:
        while True:
            q.get_nowait()
    except queue.Empty:
        pass


def _finish(pending) -> tuple:
    p, host, ev = pending
    if ev is not None:
        ev.synchronize()
    feats = host.numpy().astype(np.float32, copy=True)  # own memory: the caller keeps it
    return p.idx, p.errs, p.mts, p.szs, p.ok, feats
