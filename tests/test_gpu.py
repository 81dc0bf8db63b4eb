"""The GPU decode engine, run on the CPU: same features as the PIL path, same failures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from featx.data import Sample, load_image
from featx.embedding.backbones import Preprocess, create_backbone
from featx.embedding.cpu import iter_cpu_batches
from featx.embedding.engine import iter_chunks
from featx.embedding.gpu import TensorPreprocess, _BytesDataset, apply_exif_orientation, decode_jpegs, iter_gpu_features


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
