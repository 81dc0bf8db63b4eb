"""Inputs that are not a plain folder (issue 21): WebDataset shards, Parquet tables and fsspec URLs give the
same cache as the folder they were made from; bad samples are recorded, bad inputs refused in one line."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

import featx
from featx.base.errors import FeatxError
from featx.cache.store import FeatureCache
from featx.data.folders import discover
from featx.data.sources import SourceOptions, discover_any, make_locator, parse_locator
from featx.data.webdataset import expand_braces, member_key, split_from_name

from conftest import TINY_KW, write_image_folder

TINY = dict(TINY_KW, batch_size=4, device="cpu", chunk_size=8)


def write_shards(folder: Path, out: Path, *, shards: int = 2, label: str = "cls") -> str:
    """WebDataset shards of a folder, ``shards`` per split (``train-000000.tar``...); returns the brace pattern."""
    ds = discover(folder)
    out.mkdir(parents=True, exist_ok=True)
    for split in ds.splits:
        rows = [s for s in ds.samples if s.split == split]
        for n, part in enumerate(np.array_split(np.arange(len(rows)), shards)):
            with tarfile.open(out / f"{split}-{n:06d}.tar", "w") as tf:
                for s in (rows[i] for i in part):
                    stem, ext = s.key.rsplit(".", 1)
                    text = str(s.label) if label == "cls" else ds.classes[s.label]
                    for name, data in ((f"{stem}.{ext}", Path(s.path).read_bytes()), (f"{stem}.{label}", text.encode())):
                        info = tarfile.TarInfo(name)
                        info.size = len(data)
                        tf.addfile(info, io.BytesIO(data))
    return str(out / f"{{{','.join(ds.splits)}}}-{{000000..{shards - 1:06d}}}.tar")


def write_parquet(folder: Path, out: Path, *, row_group_size: int = 5, hf: bool = True) -> Path:
    """A Parquet table of a folder: image {bytes, path} structs (Hugging Face layout) or plain bytes."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    ds = discover(folder)
    images = [{"bytes": Path(s.path).read_bytes(), "path": s.key} if hf else Path(s.path).read_bytes()
              for s in ds.samples]
    table = pa.table({"image": images, "label": [ds.classes[s.label] for s in ds.samples],
                      "split": [s.split for s in ds.samples]})
    pq.write_table(table, out, row_group_size=row_group_size)
    return out


def assert_same_rows(a: FeatureCache, b: FeatureCache, *, same_keys: bool = True) -> None:
    """Same images (by key), label numbers, splits, and features within 1e-5."""
    ka, kb = a.keys(), b.keys()
    if same_keys:
        assert sorted(ka) == sorted(kb)
        order = [kb.index(k) for k in ka]
    else:
        order = list(range(len(kb)))
    np.testing.assert_array_equal(a.labels(), b.labels()[order])
    np.testing.assert_array_equal(a.split_array(), b.split_array()[order])
    fa, fb = a.features(), b.features()[order]
    assert np.abs(fa - fb).max() < 1e-5


def test_brace_patterns_keys_and_split_names():
    assert expand_braces("s/{train,val}-{008..010}.tar") == [
        "s/train-008.tar", "s/train-009.tar", "s/train-010.tar", "s/val-008.tar", "s/val-009.tar", "s/val-010.tar"]
    assert expand_braces("a-{1..3}.tar") == ["a-1.tar", "a-2.tar", "a-3.tar"]
    assert member_key("train/roses/img.001.jpg") == ("train/roses/img", "001.jpg")
    assert split_from_name("s3://b/flowers-validation-0001.tar") == "val"
    assert split_from_name("shard-0001.tar") is None
    loc = make_locator("pq", "s3://b/t.parquet", 123, 45, 2, 7, "im|a:ge")
    assert parse_locator(loc).args == ("2", "7", "im|a:ge") and parse_locator(loc).url == "s3://b/t.parquet"


@pytest.mark.slow
def test_webdataset_shards_equal_the_folder(tmp_path):
    folder = write_image_folder(tmp_path / "data", per_class=6)
    ref = featx.embed(folder, cache=tmp_path / "folder.h5", **TINY)
    pattern = write_shards(folder, tmp_path / "shards")
    fc = featx.embed(pattern, cache=tmp_path / "wds.h5", **TINY)
    assert fc.meta["layout"] == "webdataset" and fc.splits == ["train", "val"]
    assert fc.classes == ["0", "1"]  # cls labels are the class numbers
    assert_same_rows(fc, ref)
    again = featx.embed(pattern, cache=tmp_path / "wds.h5", **TINY)
    assert again.stats.embedded == 0 and again.stats.reused == len(ref)


def test_webdataset_txt_labels_split_option_and_bad_samples(tmp_path):
    folder = write_image_folder(tmp_path / "data", splits=(), per_class=4)
    pattern = write_shards(folder, tmp_path / "shards", label="txt", shards=1)
    shard = expand_braces(pattern)[0]
    with tarfile.open(shard, "a") as tf:  # a truncated image, an image without label, a label without image
        for name, data in (("cats/bad.png", b"\x89PNG\r\n\x1a\n trunc"), ("cats/bad.txt", b"cats"),
                           ("cats/nolabel.png", b"x"), ("cats/noimage.txt", b"cats")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    ds = discover_any(shard, options=SourceOptions("image", "label", 1, split="test"))
    assert {s.split for s in ds.samples} == {"test"} and ds.classes == ["cats", "dogs"]
    assert {r for _, r in ds.skipped} == {"sample without a label (no cls or txt member)", "sample without an image"}
    fc = featx.embed(shard, cache=tmp_path / "wds.h5", **TINY)
    assert [k for k, _ in fc.failed] == ["cats/bad.png"] and len(fc) == 8


@pytest.mark.parametrize("hf", [True, False])
def test_parquet_table_equals_the_folder(tmp_path, hf):
    folder = write_image_folder(tmp_path / "data", per_class=6)
    ref = featx.embed(folder, cache=tmp_path / "folder.h5", **TINY)
    table = write_parquet(folder, tmp_path / "data.parquet", hf=hf)
    fc = featx.embed(table, cache=tmp_path / "pq.h5", split_column="split", **TINY)
    assert fc.meta["layout"] == "parquet" and fc.classes == ref.classes
    assert_same_rows(fc, ref, same_keys=hf)  # keys: the structs' paths, else row numbers
    if not hf:
        assert fc.keys()[0] == "row-000000"


def test_parquet_bad_cells_are_recorded_and_bad_columns_refused(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    folder = write_image_folder(tmp_path / "data", splits=(), per_class=3)
    good = [Path(s.path).read_bytes() for s in discover(folder).samples]
    table = pa.table({"img": good + [b"not an image", None, good[0]], "y": ["a"] * 3 + ["b"] * 3 + ["a", "b", None]})
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=4)
    fc = featx.embed(tmp_path / "t.parquet", cache=tmp_path / "t.h5", image_column="img", label_column="y", **TINY)
    assert dict(fc.failed) == {"row-000006": "not an image Pillow can decode",
                               "row-000007": "sample without an image (empty cell)"}
    assert len(fc) == 6  # the row without a label is skipped at discovery
    with pytest.raises(FeatxError, match=r"has no column 'image' \(--image-column\); its columns are img, y"):
        featx.embed(tmp_path / "t.parquet", cache=tmp_path / "u.h5", label_column="y", **TINY)
    with pytest.raises(FeatxError, match="does not exist"):
        featx.embed(tmp_path / "missing.parquet", cache=tmp_path / "v.h5", **TINY)


@pytest.mark.slow
def test_file_url_root_equals_the_folder(tmp_path):
    pytest.importorskip("fsspec")
    folder = write_image_folder(tmp_path / "data", per_class=4)
    ref = featx.embed(folder, cache=tmp_path / "folder.h5", **TINY)
    fc = featx.embed(f"file://{folder}", cache=tmp_path / "url.h5", **TINY)
    assert fc.keys() == ref.keys() and fc.classes == ref.classes
    np.testing.assert_allclose(fc.features(), ref.features(), atol=1e-5)
    with pytest.raises(FeatxError, match="does not exist; check the bucket and path"):
        featx.embed(f"file://{tmp_path}/nothing", cache=tmp_path / "x.h5", **TINY)
