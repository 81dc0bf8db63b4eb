"""Folder and manifest discovery (data/folders.py): empty, one-class, lopsided and very large folders, and
manifests, through ``featx embed`` and ``discover``.  CPU, ``tiny_cnn``, random weights."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest

import featx
from featx.cache.store import FeatureCache
from featx.data import discover
from featx.runs.predict import predict

from conftest import TINY_CPU as TINY
from conftest import assert_clean_error, assert_ok, rgb, run_cli, small_dataset, tiny_embed, write_image_folder


def test_empty_folder_and_folder_without_images(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert_clean_error(run_cli("embed", tmp_path / "empty", "--cache-dir", tmp_path / "c", *TINY), "no images found")
    (tmp_path / "junk" / "cls").mkdir(parents=True)
    (tmp_path / "junk" / "cls" / "readme.txt").write_text("x")
    (tmp_path / "junk" / "cls" / ".DS_Store").write_bytes(b"x")
    assert_clean_error(run_cli("embed", tmp_path / "junk", "--cache-dir", tmp_path / "c", *TINY), "no images found")


@pytest.mark.slow
def test_one_class_only_embeds_and_warns(tmp_path: Path) -> None:
    data = small_dataset(tmp_path / "d", classes=("only",), per_class=5)
    res = run_cli("embed", data, "--cache", tmp_path / "c.h5", *TINY)
    assert_ok(res)
    assert "only one class" in res.output
    fc = FeatureCache(tmp_path / "c.h5")
    assert fc.classes == ["only"] and len(fc) == 5


@pytest.mark.slow
def test_class_with_one_image_and_class_missing_from_train(tmp_path: Path) -> None:
    data = small_dataset(tmp_path / "d", classes=("a", "b"), per_class=4, val=2)
    (data / "train" / "single").mkdir()
    rgb(99).save(data / "train" / "single" / "one.png")
    (data / "val" / "ghost").mkdir()
    rgb(98).save(data / "val" / "ghost" / "g.png")
    res = run_cli("embed", data, "--cache", tmp_path / "c.h5", *TINY)
    assert_ok(res)
    assert "'ghost' has images in val but none in train" in res.output
    fc = FeatureCache(tmp_path / "c.h5")
    assert fc.classes == ["a", "b", "ghost", "single"]
    assert fc.summary()["splits"] == {"train": 9, "val": 5}
    assert sorted(fc.labels("val").tolist()) == [0, 0, 1, 1, 2]
    assert fc.labels("train").tolist().count(3) == 1
    from featx.data import train_eval_split

    tr, ev, info = train_eval_split(fc.labels(), fc.split_array())
    assert len(tr) == 9 and len(ev) == 5 and info["eval_split"] == "val"


@pytest.mark.slow
def test_thousands_of_classes(tmp_path: Path) -> None:
    data = tmp_path / "many"
    n = 1500
    img = rgb(0, (8, 8))
    for i in range(n):
        d = data / f"class_{i:04d}"
        d.mkdir(parents=True)
        img.save(d / "x.png")
    res = run_cli("embed", data, "--cache", tmp_path / "c.h5", *TINY, "--batch-size", "256", "--chunk-size", "512", "-q")
    assert_ok(res)
    assert f"classes    {n}: class_0000" in res.output and f"({n} in all)" in res.output
    fc = FeatureCache(tmp_path / "c.h5")
    assert len(fc.classes) == n and fc.labels().tolist() == list(range(n))


@pytest.mark.slow
def test_five_thousand_files_in_one_folder_discovery(tmp_path: Path) -> None:
    d = tmp_path / "flat" / "cls"
    d.mkdir(parents=True)
    n = 5000
    names = [f"img{i:05d}.jpg" for i in np.random.default_rng(0).permutation(n)]
    for name in names:  # discovery does not open files, so empty ones will do here
        (d / name).touch()
    t0 = time.perf_counter()
    ds = discover(tmp_path / "flat")
    dt = time.perf_counter() - t0
    print(f"discovery of {n} files: {dt * 1000:.0f} ms")  # timing is reported, not asserted
    assert [s.key for s in ds.samples] == [f"cls/img{i:05d}.jpg" for i in range(n)]


@pytest.mark.slow
def test_manifest_paths_relative_to_manifest_and_missing_reported(tmp_path: Path, monkeypatch) -> None:
    data = small_dataset(tmp_path / "imgs", per_class=3)
    lists = tmp_path / "lists"
    lists.mkdir()
    rows = ["path,label,split"]
    for p in sorted(data.rglob("*.png")):
        rows.append(f"{os.path.relpath(p, lists)},{p.parent.name},train")
    rows.append("../imgs/train/a/vanished.png,a,train")
    (lists / "m.csv").write_text("\n".join(rows) + "\n")
    monkeypatch.chdir(tmp_path / "imgs")  # the working directory must not matter
    res = run_cli("embed", "--manifest", lists / "m.csv", "--cache", tmp_path / "c.h5", *TINY)
    assert_ok(res)
    assert "vanished.png" in res.output and "line 8 but missing" in res.output
    fc = FeatureCache(tmp_path / "c.h5")
    assert len(fc) == 6 and fc.classes == ["a", "b"]


def _snapshot(root: Path) -> dict:
    """name -> (size, mtime_ns, sha256) of every file below ``root`` (links not followed)."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for fn in files:
            p = Path(dirpath) / fn
            st = p.lstat()
            data = p.read_bytes() if p.is_file() else b""
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns, hashlib.sha256(data).hexdigest())
    return out


def _outside_manifest(tmp_path: Path) -> Path:
    outside = write_image_folder(tmp_path / "outside", splits=(), classes=("cats", "dogs"), per_class=2)
    inside = write_image_folder(tmp_path / "m" / "imgs", splits=(), classes=("cats", "dogs"), per_class=2)
    rows = ["path,label"] + [f"imgs/{c}/img_00{i}.png,{c}" for c in ("cats", "dogs") for i in range(2)]
    rows += ["../outside/cats/img_000.png,cats", f"{outside / 'dogs' / 'img_001.png'},dogs"]
    manifest = tmp_path / "m" / "list.csv"
    manifest.write_text("\n".join(rows) + "\n")
    assert inside.is_dir()
    return manifest


def test_manifest_paths_outside_its_folder_are_allowed(tmp_path):
    ds = discover(None, manifest=_outside_manifest(tmp_path))
    assert len(ds) == 6
    keys = [s.key for s in ds.samples]
    assert str((tmp_path / "outside" / "cats" / "img_000.png").resolve()) in keys
    assert "imgs/cats/img_000.png" in keys


def test_manifest_paths_outside_its_folder_are_logged(tmp_path, caplog):
    manifest = _outside_manifest(tmp_path)
    with caplog.at_level(logging.INFO, logger="featx.data.folders"):
        discover(None, manifest=manifest)
    lines = [r for r in caplog.records if "outside" in r.getMessage() and r.levelno >= logging.WARNING]
    assert lines and "list.csv" in lines[0].getMessage() and "2" in lines[0].getMessage()


@pytest.mark.slow
def test_symlinks_out_of_the_data_folder_are_read_never_written(tmp_path):
    outside = write_image_folder(tmp_path / "outside", splits=(), classes=("linked_dir", "files"), per_class=3, seed=1)
    root = write_image_folder(tmp_path / "data", classes=("cats", "dogs"), per_class=3)
    (root / "train" / "cats" / "link.png").symlink_to(outside / "files" / "img_000.png")
    (root / "train" / "dogs" / "more").symlink_to(outside / "linked_dir", target_is_directory=True)
    before_out, before_data = _snapshot(outside), _snapshot(root)
    fc = tiny_embed(root, tmp_path / "cache")
    keys = fc.keys("train")
    assert "train/cats/link.png" in keys and {f"train/dogs/more/img_00{i}.png" for i in range(3)} <= set(keys)
    assert not fc.failed
    # Embedding again (the incremental path) and predicting on the folder write nothing there either.
    tiny_embed(root, tmp_path / "cache")
    res = featx.probe(fc, head="knn", out_dir=tmp_path / "run", n_jobs=1, device="cpu", folds=2, plots=False)
    predict(res["heads"]["knn"]["model_path"], [str(root)], out=tmp_path / "p.csv", cache_dir=tmp_path / "pc",
            progress=False, num_workers=0)
    assert _snapshot(outside) == before_out and _snapshot(root) == before_data
    assert (root / "train" / "cats" / "link.png").is_symlink()
