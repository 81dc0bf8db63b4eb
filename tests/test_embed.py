"""Embedding into the cache: contents, reuse, incremental updates, kill-and-resume."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

import featx
from featx.cache.store import FeatureCache
from featx.errors import CacheMismatchError, FeatxError

from conftest import TINY_CLI, TINY_KW, fault_env, kill_mid_run, write_image_folder

# Pinned to the CPU: with device="auto" these tests would take the GPU path on a GPU host
# (its own variants are in tests/test_embed_cuda.py).
TINY = dict(TINY_KW, batch_size=4, device="cpu")


def test_embed_writes_a_self_describing_cache(image_folder, tmp_path):
    fc = featx.embed(image_folder, cache_dir=tmp_path / "cache", **TINY)
    assert isinstance(fc, FeatureCache)
    assert len(fc) == 24 and fc.splits == ["train", "val"]
    assert fc.classes == ["cats", "dogs"]
    X, y = fc.features("train"), fc.labels("train")
    assert X.shape == (12, 32) and X.dtype == np.float32
    assert list(y) == [0] * 6 + [1] * 6
    assert fc.keys("val")[0] == "val/cats/img_000.png"
    assert os.path.isfile(fc.paths("val")[0])
    meta = fc.meta
    for attr in ("backbone", "weights_sha256", "preprocess", "feature_dim", "dtype", "featx_version",
                 "torch_version", "created", "fingerprint"):
        assert attr in meta, attr
    assert meta["backbone"] == "tiny_cnn" and meta["feature_dim"] == 32
    assert fc.path.parent == tmp_path / "cache" and fc.path.name.startswith("data-")
    assert not Path(str(fc.path) + ".parts").exists()
    # Features really separate the two colour classes (not zeros, not constant).
    assert np.linalg.norm(X[:6].mean(0) - X[6:].mean(0)) > 1e-3


def test_rerun_reuses_everything_and_is_identical(image_folder, tmp_path):
    a = featx.embed(image_folder, cache_dir=tmp_path / "c", **TINY)
    Xa = a.features()
    b = featx.embed(image_folder, cache_dir=tmp_path / "c", **TINY)
    assert b.stats.embedded == 0 and b.stats.reused == 24 and not b.stats.rebuilt
    np.testing.assert_array_equal(Xa, b.features())


def test_added_images_are_embedded_incrementally_and_removed_ones_dropped(image_folder, tmp_path):
    a = featx.embed(image_folder, cache_dir=tmp_path / "c", **TINY)
    before = dict(zip(a.keys(), a.features()))
    new = image_folder / "train" / "cats" / "zz_new.png"
    Image.new("RGB", (40, 30), (10, 200, 30)).save(new)
    (image_folder / "val" / "dogs" / "img_000.png").unlink()
    b = featx.embed(image_folder, cache_dir=tmp_path / "c", **TINY)
    assert b.stats.embedded == 1 and b.stats.reused == 23
    keys = b.keys()
    assert "train/cats/zz_new.png" in keys and "val/dogs/img_000.png" not in keys
    assert len(b) == 24
    for k, x in zip(keys, b.features()):
        if k in before:
            np.testing.assert_allclose(x, before[k], atol=1e-6)


def test_changed_image_is_embedded_again(image_folder, tmp_path):
    featx.embed(image_folder, cache_dir=tmp_path / "c", **TINY)
    f = image_folder / "train" / "dogs" / "img_001.png"
    Image.new("RGB", (40, 30), (255, 255, 255)).save(f)
    b = featx.embed(image_folder, cache_dir=tmp_path / "c", **TINY)
    assert b.stats.embedded == 1


@pytest.mark.slow
def test_mismatched_cache_is_refused_and_overwrite_rebuilds(image_folder, tmp_path):
    target = tmp_path / "my.h5"
    featx.embed(image_folder, cache=target, **TINY)
    with pytest.raises(CacheMismatchError) as ei:
        featx.embed(image_folder, cache=target, **{**TINY, "backbone": "timm:resnet18"})
    assert "--overwrite" in str(ei.value) and "backbone" in str(ei.value)
    with pytest.raises(CacheMismatchError):
        featx.embed(image_folder, cache=target, dtype="float16", **TINY)
    fc = featx.embed(image_folder, cache=target, dtype="float16", overwrite=True, **TINY)
    assert fc.meta["dtype"] == "float16"
    with h5py.File(target) as f:
        assert f["features"].dtype == np.float16


def test_float16_cache_is_close_to_float32(image_folder, tmp_path):
    a = featx.embed(image_folder, cache_dir=tmp_path / "a", **TINY).features()
    b = featx.embed(image_folder, cache_dir=tmp_path / "b", dtype="float16", **TINY).features()
    np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-3)


def test_flat_layout_and_manifest(tmp_path):
    flat = write_image_folder(tmp_path / "flat", splits=(), classes=("a", "b", "c"), per_class=3)
    fc = featx.embed(flat, cache_dir=tmp_path / "c", **TINY)
    assert fc.splits == ["train"] and fc.classes == ["a", "b", "c"] and len(fc) == 9
    man = tmp_path / "list.csv"
    man.write_text("path,label,split\nflat/a/img_000.png,x,train\nflat/b/img_001.png,y,val\n")
    fm = featx.embed(None, manifest=man, cache_dir=tmp_path / "c", **TINY)
    assert fm.classes == ["x", "y"] and fm.splits == ["train", "val"]


def test_limit_keeps_a_balanced_subset_in_its_own_cache(image_folder, tmp_path):
    fc = featx.embed(image_folder, cache_dir=tmp_path / "c", limit=4, **TINY)
    assert len(fc.labels("train")) == 4 and sorted(fc.labels("train")) == [0, 0, 1, 1]
    assert "limit4" in fc.path.name


def test_bad_options_are_clear_errors(image_folder, tmp_path):
    with pytest.raises(FeatxError, match="--batch-size"):
        featx.embed(image_folder, cache_dir=tmp_path, **{**TINY, "batch_size": 0})
    with pytest.raises(FeatxError, match="does not exist"):
        featx.embed(tmp_path / "missing", cache_dir=tmp_path, **TINY)


def _embed_cmd(data, cache, chunk=4):
    return [sys.executable, "-m", "featx.cli", "embed", str(data), "--cache", str(cache), *TINY_CLI,
            "--batch-size", "2", "--chunk-size", str(chunk), "--quiet", "--device", "cpu"]


@pytest.mark.slow
def test_killed_run_resumes_and_equals_a_clean_run(tmp_path):
    data = write_image_folder(tmp_path / "data", per_class=10)
    clean = featx.embed(data, cache=tmp_path / "clean.h5", **TINY)
    cache = tmp_path / "killed.h5"
    env = fault_env(FEATX_TEST_CHUNK_DELAY="0.3")
    parts = kill_mid_run(_embed_cmd(data, cache), env, cache)
    committed = len(list(parts.glob("chunk-*.h5")))
    assert committed >= 2 and not cache.exists(), "the kill must land mid-run"
    done = subprocess.run(_embed_cmd(data, cache), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    resumed = FeatureCache(cache)
    assert resumed.keys() == clean.keys()
    np.testing.assert_allclose(resumed.features(), clean.features(), atol=1e-5)
    assert not parts.exists()
    assert not list(tmp_path.glob("*.tmp"))
