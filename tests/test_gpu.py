"""The GPU decode engine, run on the CPU: same features as the PIL path, same failures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fake_cuda import FakeCuda
from PIL import Image

from featx.data import Sample, load_image
from featx.embedding.backbones import Preprocess, create_backbone
from featx.embedding.engines import gpu
from featx.embedding.engines.chunks import iter_chunks
from featx.embedding.engines.cpu import iter_cpu_batches
from featx.embedding.engines.gpu import (
    TensorPreprocess,
    _BytesDataset,
    _forward_to_host,
    _Prepared,
    _producer,
    apply_exif_orientation,
    decode_jpegs,
    iter_gpu_features,
)


def _photo(rng, w, h):
    """Smooth gradient + blobs + noise: JPEG-friendly like a photo."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx / w * 255, yy / h * 255, (xx + yy) / (w + h) * 255], -1)
    for _ in range(4):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(5, min(w, h) / 2)
        base[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
    return np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)


def _samples(paths):
    return [Sample(str(p), Path(p).name, 0, "train") for p in paths]


@pytest.fixture
def mixed_folder(tmp_path):
    """JPEGs of several sizes (RGB, grayscale, EXIF-rotated, CMYK) plus PNG, broken and empty files."""
    rng = np.random.default_rng(0)
    d = tmp_path / "imgs"
    d.mkdir()
    paths = []
    for i, (w, h) in enumerate([(64, 48), (48, 64), (120, 90), (37, 53), (64, 48), (200, 150)]):
        p = d / f"rgb{i}.jpg"
        Image.fromarray(_photo(rng, w, h)).save(p, quality=92)
        paths.append(p)
    p = d / "gray.jpg"
    Image.fromarray(_photo(rng, 60, 50)[..., 0]).save(p, quality=92)
    paths.append(p)
    p = d / "rot6.jpg"
    im = Image.fromarray(_photo(rng, 80, 40))
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(p, quality=92, exif=exif.tobytes())
    paths.append(p)
    p = d / "cmyk.jpg"
    Image.fromarray(_photo(rng, 50, 50)).convert("CMYK").save(p, quality=92)
    paths.append(p)
    p = d / "plain.png"
    Image.fromarray(_photo(rng, 70, 45)).save(p)
    paths.append(p)
    p = d / "truncated.jpg"
    good = d / "rgb2.jpg"
    p.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    paths.append(p)
    p = d / "empty.jpg"
    p.write_bytes(b"")
    paths.append(p)
    p = d / "text.jpg"
    p.write_bytes(b"\xff\xd8\xffnot really a jpeg at all" * 3)
    paths.append(p)
    return paths


def _cosine(a, b):
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("interp", ["bilinear", "bicubic"])
def test_tensor_preprocess_matches_pil_transform(interp):
    rng = np.random.default_rng(1)
    pre = Preprocess(resize=40, crop=32, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3), interpolation=interp)
    imgs = [_photo(rng, w, h) for w, h in [(90, 60), (60, 90), (90, 60), (41, 41)]]
    want = torch.stack([pre.pil_transform()(Image.fromarray(a)) for a in imgs])
    got = TensorPreprocess(pre, "cpu")([torch.from_numpy(a).permute(2, 0, 1).contiguous() for a in imgs])
    assert got.shape == want.shape == (4, 3, 32, 32)
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_like_pil(tmp_path, orientation):
    rng = np.random.default_rng(orientation)
    im = Image.fromarray(_photo(rng, 40, 24))
    exif = im.getexif()
    exif[0x0112] = orientation
    p = tmp_path / "o.jpg"
    im.save(p, quality=95, exif=exif.tobytes())
    ref = np.asarray(load_image(p))
    data = torch.from_numpy(np.fromfile(p, dtype=np.uint8))
    (dec,) = decode_jpegs([data], device="cpu", orientations=[orientation])
    got = dec.permute(1, 2, 0).numpy()
    assert got.shape == ref.shape
    assert np.abs(got.astype(int) - ref.astype(int)).mean() < 1.0
    assert apply_exif_orientation(torch.zeros(3, 2, 5), orientation).shape[-2:] == ((5, 2) if orientation >= 5 else (2, 5))


def test_worker_routes_files(mixed_folder):
    pre = Preprocess(resize=36, crop=32, mean=(0.5,) * 3, std=(0.25,) * 3)
    ds = _BytesDataset(_samples(mixed_folder), pre)
    kinds = {Path(ds[i].path).name: ds[i].kind for i in range(len(ds))}
    assert kinds["rgb0.jpg"] == kinds["gray.jpg"] == kinds["rot6.jpg"] == "jpeg"
    assert kinds["cmyk.jpg"] == kinds["plain.png"] == "tensor"  # decoded by PIL in the worker
    assert kinds["empty.jpg"] == kinds["text.jpg"] == "fail"
    assert ds[mixed_folder.index(next(p for p in mixed_folder if p.name == "rot6.jpg"))].orientation == 6


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.slow
def test_engine_matches_pil_path_and_fails_alike(mixed_folder, workers):
    bb = create_backbone("tiny_cnn")
    todo = _samples(mixed_folder)
    got = {}
    errs_gpu = {}
    for idx, errs, mts, szs, ok, feats in iter_gpu_features(todo, bb, device="cpu", batch_size=5, num_workers=workers):
        assert feats.dtype == np.float32 and feats.shape == (len(ok), bb.dim)
        assert len(idx) == len(errs) == len(mts) == len(szs)
        for k, j in enumerate(ok):
            got[idx[j]] = feats[k]
        for j, e in enumerate(errs):
            if e:
                errs_gpu[idx[j]] = e
        for j in range(len(idx)):
            assert szs[j] == (Path(todo[idx[j]].path).stat().st_size)
    ref, errs_cpu = {}, {}
    with torch.inference_mode():
        for idx, x, errs, mts, szs in iter_cpu_batches(todo, bb, batch_size=5, num_workers=0, pin=False, draft=False):
            y = bb.model(x).numpy()
            for j, i in enumerate(idx):
                if errs[j]:
                    errs_cpu[i] = errs[j]
                else:
                    ref[i] = y[j]
    assert set(got) | set(errs_gpu) == set(range(len(todo)))
    assert errs_gpu == errs_cpu  # same files fail, with the same reasons
    assert {todo[i].key for i in errs_gpu} == {"truncated.jpg", "empty.jpg", "text.jpg"}
    assert set(got) == set(ref)
    cos = [_cosine(got[i], ref[i]) for i in ref]
    assert min(cos) >= 0.999, cos


def test_embed_chunks_with_gpu_engine(mixed_folder):
    bb = create_backbone("tiny_cnn")
    todo = _samples(mixed_folder)
    chunks = list(iter_chunks(todo, bb, device="cpu", batch_size=4, num_workers=0, chunk_size=6,
                                dtype="float16", progress=False, engine="gpu"))
    keys = [k for c in chunks for k in c.keys]
    failed = [f[0] for c in chunks for f in c.failed]
    assert sorted(keys + failed) == sorted(s.key for s in todo)
    assert all(c.features.dtype == np.float16 and len(c.features) == len(c.keys) for c in chunks)


@pytest.mark.slow
def test_real_photos_match_cpu_path(hymenoptera):
    """Real JPEGs with the default backbone: the engine's features match the PIL path's."""
    from featx.data import discover

    todo = discover(hymenoptera).samples[::12]
    bb = create_backbone("efficientnet_lite0")
    got = {}
    for idx, errs, mts, szs, ok, feats in iter_gpu_features(todo, bb, device="cpu", batch_size=16, num_workers=1):
        assert not any(errs)
        for k, j in enumerate(ok):
            got[idx[j]] = feats[k]
    for draft, floor in ((False, 0.999), (True, 0.98)):
        ref = {}
        with torch.inference_mode():
            for idx, x, errs, mts, szs in iter_cpu_batches(todo, bb, batch_size=16, num_workers=1, pin=False, draft=draft):
                y = bb.model(x).numpy()
                ref.update({i: y[j] for j, i in enumerate(idx)})
        cos = np.array([_cosine(got[i], ref[i]) for i in ref])
        # Against the full-resolution PIL decode the features are the same; against PIL's
        # draft (DCT-scaled) decoding of large JPEGs they differ a little (see BENCHMARKS.md).
        assert cos.min() >= floor and cos.mean() >= 0.999, (draft, cos.min(), cos.mean())


# --------------------------------------------------------------------------- CUDA, with fakes
# (issue 25: what would break the first time this engine meets a GPU; no GPU needed here)


def _no_pinning(monkeypatch):
    """torch.empty(pin_memory=True) needs a driver; the tests only check where things run."""
    real = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, pin_memory=False, **k: real(*a, **k))


def test_features_event_is_recorded_on_the_engines_device(fake_cuda, monkeypatch):
    """On cuda:1 the copy-done event must be recorded on cuda:1's stream, not cuda:0's."""
    _no_pinning(monkeypatch)
    p = _Prepared([0, 1], ["", ""], [0, 0], [1, 1], [0, 1], torch.randn(2, 3, 4, 4))
    host, ev = _forward_to_host(p, lambda x: x.flatten(1), torch.device("cuda:1"), 48)
    assert host.shape == (2, 48)
    assert ev.stream is not None and str(ev.stream.device) == "cuda:1"


def test_producer_thread_selects_the_engines_device(fake_cuda):
    """A new thread starts on cuda:0: the decode thread must select cuda:1 before its stream."""
    import queue
    import threading

    class Prep:
        cuda, device = True, torch.device("cuda:1")

        def __call__(self, items):
            return _Prepared([0], [""], [0], [1], [0], torch.zeros(1, 3, 2, 2))

    q, stop = queue.Queue(), threading.Event()
    th = threading.Thread(target=_producer, args=([[object()]], Prep(), q, stop), name="decode")
    th.start()
    th.join(10)
    assert isinstance(q.get_nowait(), _Prepared)
    devices = [e for e in fake_cuda.log if e[0] == "device"]
    assert devices and devices[0][1:] == ("cuda:1", "decode")
    assert fake_cuda.log.index(devices[0]) < fake_cuda.log.index(("stream", "cuda:1"))


def test_stream_is_drained_before_every_nvjpeg_decode(fake_cuda, monkeypatch, mixed_folder):
    """pytorch/vision#9606: nvJPEG writes its outputs without waiting for the caller's stream."""
    tvio = gpu._quiet_torchvision_io()
    real = tvio.decode_jpeg
    calls = {"n": 0}

    def fake_decode(data, mode, device):
        calls["n"] += 1
        fake_cuda.log.append(("decode", str(device)))
        if isinstance(data, list) and calls["n"] == 1:
            raise RuntimeError("one bad file in the batch")  # then decoded one by one
        return real(data, mode=mode, device="cpu")

    monkeypatch.setattr(tvio, "decode_jpeg", fake_decode)
    datas = [torch.from_numpy(np.fromfile(p, dtype=np.uint8)) for p in mixed_folder if p.name.startswith("rgb")]
    out = decode_jpegs(datas, device=torch.device("cuda:1"))
    assert all(isinstance(o, torch.Tensor) for o in out)
    log = [e for e in fake_cuda.log if e[0] in ("sync", "decode")]
    decodes = [i for i, e in enumerate(log) if e[0] == "decode"]
    assert len(decodes) == 1 + len(datas)
    assert all(i > 0 and log[i - 1] == ("sync", "cuda:1") for i in decodes)


def test_progressive_jpegs_go_to_pillow(tmp_path):
    """nvJPEG decodes progressive JPEGs one at a time on the host, under a lock: Pillow workers do it."""
    rng = np.random.default_rng(3)
    p = tmp_path / "prog.jpg"
    Image.fromarray(_photo(rng, 64, 48)).save(p, quality=90, progressive=True)
    b = tmp_path / "base.jpg"
    Image.fromarray(_photo(rng, 64, 48)).save(b, quality=90)
    ds = _BytesDataset(_samples([p, b]), Preprocess(resize=36, crop=32, mean=(0.5,) * 3, std=(0.25,) * 3))
    assert ds[0].kind == "tensor" and ds[1].kind == "jpeg"


def _features(todo, bb, **kw):
    got = {}
    for idx, errs, mts, szs, ok, feats in iter_gpu_features(todo, bb, device="cpu", num_workers=0, **kw):
        for k, j in enumerate(ok):
            got[idx[j]] = feats[k]
    return got


def test_out_of_memory_halves_the_group_then_uses_pillow(mixed_folder, monkeypatch, caplog):
    """A GPU OOM while resizing must not end the run: smaller groups, then Pillow for an image
    that does not fit alone, with one warning."""
    bb = create_backbone("tiny_cnn")
    todo = _samples(mixed_folder)
    want = _features(todo, bb, batch_size=16)
    real = gpu.TensorPreprocess.__call__
    sizes = []

    def tight(self, imgs):
        sizes.append(len(imgs))
        if len(imgs) > 2 or any(tuple(im.shape[-2:]) == (150, 200) for im in imgs):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(self, imgs)

    monkeypatch.setattr(gpu.TensorPreprocess, "__call__", tight)
    with caplog.at_level("WARNING", logger="featx.embedding.engines.gpu"):
        got = _features(todo, bb, batch_size=16)
    assert set(got) == set(want)
    assert min(_cosine(got[i], want[i]) for i in want) >= 0.98  # the 200x150 one by Pillow (draft decode)
    assert max(sizes) > 2 and 1 in sizes
    assert len([r for r in caplog.records if "out of memory" in r.getMessage()]) == 1


def test_decoded_pixels_alive_are_bounded(mixed_folder, monkeypatch):
    """Decode and resize go group by group under the pixel budget, not the whole batch at once."""
    bb = create_backbone("tiny_cnn")
    monkeypatch.setattr(gpu, "DECODE_PIXEL_BUDGET", 2 * 64 * 48)
    real = gpu.TensorPreprocess.__call__
    alive = []
    monkeypatch.setattr(gpu.TensorPreprocess, "__call__",
                        lambda self, imgs: alive.append([im.shape[-2] * im.shape[-1] for im in imgs]) or real(self, imgs))
    _features(_samples(mixed_folder), bb, batch_size=16)
    assert all(sum(a) <= 2 * 64 * 48 or len(a) == 1 for a in alive), alive


def test_batches_are_padded_to_one_shape(mixed_folder, monkeypatch):
    """cudnn.benchmark and compile(dynamic=False) tune per shape: failed images must not make new ones."""
    bb = create_backbone("tiny_cnn")
    todo = _samples(mixed_folder)
    want = _features(todo, bb, batch_size=4)  # the third batch has 2 good images, the last none
    shapes = []
    real = gpu._make_forward

    def recording(backbone, device, *, compile):
        f = real(backbone, device, compile=False)
        return lambda x: shapes.append(tuple(x.shape)) or f(x)

    monkeypatch.setattr(gpu, "_make_forward", recording)
    got = _features(todo, bb, batch_size=4, compile=True)
    assert len(shapes) == 3 and {s[0] for s in shapes} == {4}
    assert set(got) == set(want) and all(np.allclose(got[i], want[i], atol=1e-5) for i in want)


def test_network_out_of_memory_runs_halves():
    p = _Prepared(list(range(6)), [""] * 6, [0] * 6, [1] * 6, list(range(6)), torch.randn(6, 3, 4, 4))

    def fwd(x):
        if len(x) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return x.flatten(1) * 2

    host, ev = _forward_to_host(p, fwd, torch.device("cpu"), 48)
    assert torch.equal(host, p.x.flatten(1) * 2) and ev is None


def test_padded_cuda_batch_stays_on_its_device_in_channels_last(monkeypatch):
    """Device check with FakeTensorMode (cuda:1 tensors without a GPU): the padding rows are made on
    the batch's device and the padded batch is channels_last, as cudnn's tuned kernels expect."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    seen = []
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.empty(3, 3, 8, 8, device="cuda:1").contiguous(memory_format=torch.channels_last)
        p = _Prepared([0, 1, 2], [""] * 3, [0] * 3, [1] * 3, [0, 1, 2], x)
        FakeCuda(monkeypatch)  # after the fake tensors exist: FakeTensorMode asks the real torch.cuda

        def fwd(t):
            seen.append((tuple(t.shape), str(t.device), t.is_contiguous(memory_format=torch.channels_last)))
            return t.flatten(1)[:, :5]

        host, ev = _forward_to_host(p, fwd, torch.device("cuda:1"), 5, pad_to=4)
        assert tuple(host.shape) == (3, 5)
    assert seen == [((4, 3, 8, 8), "cuda:1", True)]
    assert str(ev.stream.device) == "cuda:1"
