"""The GPU decode engine: JPEG bytes in, features out, with the CPU free to just read files.

On a many-core GPU box the plain PyTorch loop is bound by CPU JPEG decoding (~190 images/s per
core), far below what the network runs at.  This engine moves decoding to the device:

- DataLoader workers only read file bytes and parse the JPEG header (format, colour mode, size,
  EXIF orientation) — microseconds per file.  Anything the device decoder should not take
  (PNG/WebP/..., CMYK JPEGs, huge images, unreadable files) is decoded by the same worker
  with the ordinary PIL path (:func:`featx.data.load_or_blank`, the one loader),
  so it falls back transparently and broken files fail with the same reason as on the CPU.
- A producer thread decodes the batch's JPEGs in one ``torchvision.io.decode_jpeg`` call
  (nvJPEG on CUDA; libjpeg-turbo on the CPU), applies EXIF orientation, resizes/crops the
  images in same-size groups with the backbone's own :class:`~featx.embedding.backbones.Preprocess`
  (short-side resize with its interpolation and antialias, centre crop, normalise), on its
  own CUDA stream, while the main thread runs the network on the previous batch.
- The network runs in bf16 autocast with channels_last on CUDA; features are copied to pinned
  host memory asynchronously and handed out one batch later, so the GPU never waits for the
  HDF5 writer.  ``compile=True`` (or ``FEATX_COMPILE=1``) adds ``torch.compile``.

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

from ..base.runtime import worker_init
from ..data.images import load_or_blank

log = logging.getLogger(__name__)

JPEG_MAGIC = b"\xff\xd8\xff"
# Larger JPEGs go through the CPU path (PIL draft decoding is faster for them and a batch of
# them could exhaust device memory).
MAX_DEVICE_PIXELS = 40_000_000
# At most this many decoded pixels are alive per decode call (~400 MB of uint8 RGB).
DECODE_PIXEL_BUDGET = 1 << 27
_END = object()


# torchvision 0.29 deprecates its image codecs in favour of TorchCodec and warns on every
# call; decode_jpeg is still the maintained nvJPEG binding shipped with torch, so keep quiet.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)


def _quiet_torchvision_io():
    import torchvision.io as tvio

    return tvio


@dataclass
class _Item:
    """What a worker sends for one file: raw JPEG bytes, or an already prepared tensor."""

    index: int
    kind: str  # "jpeg", "tensor" or "fail"
    payload: object  # uint8 tensor of bytes / float tensor [3, crop, crop] / None
    error: str
    mtime_ns: int
    size: int
    orientation: int = 1
    path: str = ""


class _BytesDataset:
    """index -> :class:`_Item`.  Never raises: a bad file becomes kind "fail" with a reason."""

    def __init__(self, samples: Sequence, preprocess, *, max_pixels: int = MAX_DEVICE_PIXELS) -> None:
        self.samples = samples
        self.pre = preprocess
        self.max_pixels = max_pixels
        self._transform = None

    def __len__(self) -> int:
        return len(self.samples)

    def _cpu_item(self, i: int, path: str, mtime: int, size: int) -> _Item:
        """Decode on the CPU with the one PIL loader, as the CPU engine does."""
        if self._transform is None:
            self._transform = self.pre.pil_transform()
        x, err = load_or_blank(path, self._transform, crop=self.pre.crop, draft_size=self.pre.resize)
        if err:
            return _Item(i, "fail", None, err, mtime, size, 1, path)
        return _Item(i, "tensor", x, "", mtime, size, 1, path)

    def __getitem__(self, i: int) -> _Item:
        import torch
        from PIL import Image

        path = self.samples[i].path
        try:
            st = os.stat(path)
            mtime, size = st.st_mtime_ns, st.st_size
        except OSError:
            return self._cpu_item(i, path, 0, -1)  # load_or_blank words the reason
        try:
            with open(path, "rb") as fh:
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
        except Exception:  # noqa: BLE001 - the PIL path will give the reason
            return self._cpu_item(i, path, mtime, size)
        if (
            fmt != "JPEG"
            or mode not in ("RGB", "L")
            or w * h > min(self.max_pixels, Image.MAX_IMAGE_PIXELS or self.max_pixels)
        ):
            return self._cpu_item(i, path, mtime, size)
        if orientation not in range(1, 9):
            orientation = 1
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return _Item(i, "jpeg", buf, "", mtime, size, orientation, path)


def _collate_items(batch: list) -> list:
    return batch


def apply_exif_orientation(img, orientation: int):
    """Rotate/flip a [C, H, W] tensor the way ``PIL.ImageOps.exif_transpose`` does."""
    import torch

    if orientation == 2:
        return img.flip(-1)
    if orientation == 3:
        return img.flip(-1, -2)
    if orientation == 4:
        return img.flip(-2)
    if orientation == 5:
        return img.transpose(-1, -2)
    if orientation == 6:
        return torch.rot90(img, -1, dims=(-2, -1))
    if orientation == 7:
        return img.transpose(-1, -2).flip(-1, -2)
    if orientation == 8:
        return torch.rot90(img, 1, dims=(-2, -1))
    return img


class TensorPreprocess:
    """The backbone's :class:`~featx.embedding.backbones.Preprocess` on uint8 image tensors, batched.

    Mirrors ``Preprocess.pil_transform()`` step for step (uint8 resize of the short side with
    the same interpolation and antialias, centre crop, scale to [0, 1], normalise), so that a
    decoded image gives the same network input on either path.
    """

    def __init__(self, preprocess, device) -> None:
        import torch
        from torchvision.transforms import v2

        self.pre = preprocess
        self.interp = (
            v2.InterpolationMode.BICUBIC if preprocess.interpolation == "bicubic" else v2.InterpolationMode.BILINEAR
        )
        self.mean = torch.tensor(preprocess.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(preprocess.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)

    def __call__(self, imgs: list) -> "torch.Tensor":  # noqa: F821
        """uint8 [3, H, W] tensors (any sizes, same device) -> float32 [N, 3, crop, crop]."""
        import torch
        from torchvision.transforms.v2 import functional as TF

        crop = self.pre.crop
        out = [None] * len(imgs)
        groups: dict[tuple[int, int], list[int]] = {}
        for j, im in enumerate(imgs):
            groups.setdefault(tuple(im.shape[-2:]), []).append(j)
        for js in groups.values():
            x = torch.stack([imgs[j] for j in js]) if len(js) > 1 else imgs[js[0]].unsqueeze(0)
            x = TF.resize(x, [self.pre.resize], interpolation=self.interp, antialias=True)
            x = TF.center_crop(x, [crop, crop])
            for k, j in enumerate(js):
                out[j] = x[k]
        if not out:
            return torch.empty(0, 3, crop, crop, device=self.mean.device)
        x = torch.stack(out).float().div_(255.0)
        return x.sub_(self.mean).div_(self.std)


def decode_jpegs(datas: list, *, device, orientations: Sequence[int] | None = None) -> list:
    """Decode JPEG byte tensors to RGB uint8 [3, H, W] on ``device``; a failure is an exception
    object in its place (decoded in batches under a pixel budget, one by one after a batch error)."""
    tvio = _quiet_torchvision_io()
    out: list = [None] * len(datas)
    dev = str(device)

    def one(j):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                return tvio.decode_jpeg(datas[j], mode=tvio.ImageReadMode.RGB, device=dev)
        except Exception as exc:  # noqa: BLE001
            return exc

    groups: list[list[int]] = [[]]
    budget = 0
    for j, d in enumerate(datas):
        # ~10 pixels per compressed byte is a generous bound for photos.
        px = int(d.numel()) * 10
        if groups[-1] and budget + px > DECODE_PIXEL_BUDGET:
            groups.append([])
            budget = 0
        groups[-1].append(j)
        budget += px
    for js in groups:
        if not js:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                imgs = tvio.decode_jpeg([datas[j] for j in js], mode=tvio.ImageReadMode.RGB, device=dev)
            for j, im in zip(js, imgs):
                out[j] = im
        except Exception:  # noqa: BLE001 - find the culprit(s) one by one
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
    """Turns a list of :class:`_Item` into the network's input batch on the device."""

    def __init__(self, backbone, device) -> None:
        import torch

        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.tp = TensorPreprocess(backbone.preprocess, self.device)
        self.pre = backbone.preprocess
        self._pil_transform = None

    def _pil_fallback(self, it: _Item):
        """A JPEG the device could not decode: decode it with PIL like the CPU path."""
        if self._pil_transform is None:
            self._pil_transform = self.pre.pil_transform()
        x, err = load_or_blank(it.path, self._pil_transform, crop=self.pre.crop, draft_size=self.pre.resize)
        return (None, err) if err else (x, "")

    def __call__(self, items: list) -> _Prepared:
        import torch

        n = len(items)
        errs = [it.error for it in items]
        jpeg = [j for j, it in enumerate(items) if it.kind == "jpeg"]
        ready: dict[int, torch.Tensor] = {}  # position -> prepared float [3, crop, crop]
        if jpeg:
            dec = decode_jpegs(
                [items[j].payload for j in jpeg], device=self.device, orientations=[items[j].orientation for j in jpeg]
            )
            good = [(j, im) for j, im in zip(jpeg, dec) if not isinstance(im, Exception)]
            for j, im in zip(jpeg, dec):
                if isinstance(im, Exception):
                    log.debug("device decode failed for %s (%s); decoding it with PIL", items[j].path, im)
                    x, err = self._pil_fallback(items[j])
                    if x is None:
                        errs[j] = err
                    else:
                        ready[j] = x.to(self.device, non_blocking=True)
            if good:
                xs = self.tp([im for _, im in good])
                for (j, _), x in zip(good, xs):
                    ready[j] = x
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

    stream = torch.cuda.Stream(device=prep.device) if prep.cuda else None
    try:
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            with torch.inference_mode():
                for items in loader:
                    if stop.is_set():
                        break
                    p = prep(items)
                    if stream is not None:
                        p.event = torch.cuda.Event()
                        p.event.record(stream)
                    while not stop.is_set():
                        try:
                            q.put(p, timeout=0.5)
                            break
                        except queue.Full:
                            continue
    except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
        q.put(exc)
        return
    q.put(_END)


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
        collate_fn=_collate_items, pin_memory=False, **kwargs,
    )
    q: queue.Queue = queue.Queue(maxsize=max(1, prefetch_batches))
    stop = threading.Event()
    th = threading.Thread(target=_producer, args=(loader, prep, q, stop), name="featx-gpu-decode", daemon=True)
    th.start()
    pending = None  # (prepared, host features, event)
    try:
        while True:
            p = q.get()
            if p is _END:
                break
            if isinstance(p, BaseException):
                raise p
            host, ev = _forward_to_host(p, fwd, dev, backbone.out_dim)
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


def _forward_to_host(p: _Prepared, fwd, dev, dim: int) -> tuple:
    """Run the network on a prepared batch; on CUDA start an async copy to pinned host memory."""
    import torch  # heavy

    cuda = dev.type == "cuda"
    if cuda and p.event is not None:
        cur = torch.cuda.current_stream(dev)
        cur.wait_event(p.event)
        p.x.record_stream(cur)
    if not p.ok:
        return torch.zeros(0, dim), None
    y = fwd(p.x)
    if not cuda:
        return y, None
    host = torch.empty(y.shape, dtype=torch.float32, pin_memory=True)
    host.copy_(y, non_blocking=True)
    ev = torch.cuda.Event()
    ev.record()
    return host, ev


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
