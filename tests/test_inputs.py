"""Files written by the libraries people use (datasets, webdataset, pyarrow) give the folder's features exactly.

Every test makes its own small images; each format is written by its own library, embedded with the tiny
backbone, and compared with the folder run split by split (same rows, labels, class names, max |delta| = 0).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import featx
from featx.base.errors import FeatxError
from featx.cache.store import FeatureCache
from featx.cli import cli
from featx.data.inputs import expand_braces, expand_inputs, readable_root, split_from_name
from featx.data.sources import SourceOptions, discover_any, dominant_failure
from featx.data.splits import canonical_split

from conftest import TINY_CLI, TINY_KW, write_image_folder

datasets = pytest.importorskip("datasets", reason="the test extra's datasets is not installed")
wds = pytest.importorskip("webdataset", reason="the test extra's webdataset is not installed")
pa = pytest.importorskip("pyarrow")

CLASSES = ("cats", "dogs", "owls")
KW = dict(TINY_KW, batch_size=8, device="cpu")
OPTS = SourceOptions("image", "label", 4)


def _rows(root: Path, split: str):
    for ci, c in enumerate(CLASSES):
        for f in sorted(os.listdir(root / split / c)):
            yield str(root / split / c / f), ci, c, f


def _hf(root: Path, split: str):
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASSES))})
    r = list(_rows(root, split))
    return datasets.Dataset.from_dict({"image": [p for p, *_ in r], "label": [lab for _, lab, *_ in r]},
                                      features=feats)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A folder (train 3 x 5, test 3 x 3) and the same images written by datasets, pyarrow and webdataset."""
    import pyarrow.dataset as pads

    out = tmp_path_factory.mktemp("written")
    root = write_image_folder(out / "data", splits=("train", "test"), classes=CLASSES, per_class=5)
    for c in CLASSES:  # unequal split sizes
        for f in sorted(os.listdir(root / "test" / c))[3:]:
            os.remove(root / "test" / c / f)
    hf = {sp: _hf(root, sp) for sp in ("train", "test")}
    (out / "hfpq").mkdir()
    for sp, d in hf.items():  # path-only cells, relative to the table's folder
        d.to_parquet(str(out / "hfpq" / f"{sp}.parquet"))
    datasets.DatasetDict(hf).save_to_disk(str(out / "hfdisk"))
    (out / "hub" / "data").mkdir(parents=True)
    for sp, d in hf.items():  # the Hub's layout, bytes embedded, written by pyarrow's dataset writer
        tab = d.with_format("arrow")[:]
        paths = tab.column("image").combine_chunks().field("path").to_pylist()
        cells = pa.array([{"bytes": Path(p).read_bytes(), "path": os.path.basename(p)} for p in paths],
                         type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
        t = pa.table({"image": cells, "label": tab.column("label")}).replace_schema_metadata(tab.schema.metadata)
        n = 2 if sp == "train" else 1
        pads.write_dataset(t, str(out / "hub" / "data"), format="parquet", max_rows_per_group=4,
                           basename_template=f"{sp}-{{i}}-of-{n:05d}.parquet", max_rows_per_file=-(-t.num_rows // n),
                           existing_data_behavior="overwrite_or_ignore")
    (out / "wds").mkdir()
    for sp, maxcount in (("train", 6), ("test", 100)):  # 3 train shards, 1 test shard; keys repeat across splits
        with wds.ShardWriter(str(out / "wds" / f"{sp}-%06d.tar"), maxcount=maxcount, verbose=0) as w:
            for i, (p, lab, _, _) in enumerate(_rows(root, sp)):
                w.write({"__key__": f"sample{i:06d}", "png": Path(p).read_bytes(), "cls": lab})
    (out / "wds" / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return out


@pytest.fixture(scope="module")
def folder_cache(written, tmp_path_factory):
    return featx.embed(written / "data", cache_dir=tmp_path_factory.mktemp("fc"), **KW)


def _same_as_folder(fc, ref, *, key_of):
    """Rows, labels, class names and features of ``fc`` equal the folder cache's, split by split."""
    assert fc.classes == ref.classes
    assert fc.splits == ref.splits
    for sp in ref.splits:
        ref_keys = ref.keys(sp)
        mine = {key_of(k, fc, sp, i): i for i, k in enumerate(fc.keys(sp))}
        assert sorted(mine) == sorted(ref_keys), sp
        order = [mine[k] for k in ref_keys]
        assert np.array_equal(fc.labels(sp)[order], ref.labels(sp))
        assert np.abs(fc.features(sp)[order] - ref.features(sp)).max() == 0


def _by_index(fc_keys_per_split):
    """Key mapping for formats whose keys are not the folder's: the i-th row of a split in write order."""
    return lambda k, fc, sp, i: fc_keys_per_split[sp][i]


def _write_order(written, sp):
    return [f"{sp}/{c}/{f}" for _, _, c, f in _rows(written / "data", sp)]


@pytest.mark.slow
def test_path_only_parquet_of_datasets_reads_the_files(written, folder_cache, tmp_path):
    fc = featx.embed([str(written / "hfpq" / "train.parquet"), str(written / "hfpq" / "test.parquet")],
                     cache_dir=tmp_path, **KW)
    assert not fc.failed and len(fc) == len(folder_cache)
    _same_as_folder(fc, folder_cache, key_of=lambda k, *a: k)  # keys: paths under the images' common folder


def test_path_only_cells_relative_to_data_root(written, tmp_path):
    import pyarrow.parquet as pq

    rel = {sp: _hf(written / "data", sp) for sp in ("train", "test")}
    for sp, d in rel.items():
        tab = d.with_format("arrow")[:]
        paths = [os.path.relpath(p, written / "data") for p in tab.column("image").combine_chunks().field("path").to_pylist()]
        cells = pa.array([{"bytes": None, "path": p} for p in paths],
                         type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
        pq.write_table(pa.table({"image": cells, "label": tab.column("label")}).replace_schema_metadata(
            tab.schema.metadata), tmp_path / f"{sp}.parquet")
    with pytest.raises(FeatxError, match="missing"):
        discover_any([str(tmp_path / "train.parquet")], options=OPTS)
    ds = discover_any(str(tmp_path / "*.parquet"), options=SourceOptions("image", "label", 4,
                                                                        data_root=str(written / "data")))
    assert ds.root == str(written / "data") and ds.samples[0].key == "train/cats/img_000.png"
    assert ds.counts() == {"train": 15, "test": 9}


def test_save_to_disk_folder(written, folder_cache, tmp_path):
    fc = featx.embed(str(written / "hfdisk"), cache_dir=tmp_path, **KW)
    keys = {sp: _write_order(written, sp) for sp in ("train", "test")}
    _same_as_folder(fc, folder_cache, key_of=_by_index(keys))


def test_hub_parquet_layout_written_by_pyarrow(written, folder_cache, tmp_path):
    ds = discover_any(str(written / "hub"), options=OPTS)
    assert ds.classes == list(CLASSES) and ds.counts() == {"train": 15, "test": 9}
    fc = featx.embed(str(written / "hub"), cache_dir=tmp_path, **KW)
    keys = {sp: _write_order(written, sp) for sp in ("train", "test")}
    _same_as_folder(fc, folder_cache, key_of=_by_index(keys))


def test_shardwriter_shards_with_unequal_counts_as_the_readme_says(written, folder_cache, tmp_path):
    shards = written / "wds"
    assert len(list(shards.glob("train-*.tar"))) == 3 and len(list(shards.glob("test-*.tar"))) == 1
    args = ["embed", f"{shards}/train-{{000000..000002}}.tar", f"{shards}/test-000000.tar",
            "--cache-dir", str(tmp_path), *TINY_CLI, "--device", "cpu", "-q"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    fc = FeatureCache(next(tmp_path.glob("*.h5")))
    assert fc.path.name.startswith("train-test-")  # short and readable
    keys = {sp: _write_order(written, sp) for sp in ("train", "test")}
    _same_as_folder(fc, folder_cache, key_of=_by_index(keys))
    # a glob and a nested brace pattern name the same shards, each once
    for pattern in (f"{shards}/*.tar", f"{shards}/{{train-{{000000..000002}},test-000000}}.tar"):
        ds = discover_any(pattern, options=OPTS)
        assert not ds.skipped and ds.counts() == {"train": 15, "test": 9} and ds.classes == list(CLASSES)


def test_class_names_option_and_refusals(written, tmp_path):
    names = tmp_path / "names.json"
    names.write_text('{"a": 0, "b": 1, "c": 2}')
    ds = discover_any(str(written / "wds" / "*.tar"),
                      options=SourceOptions("image", "label", 4, class_names=str(names)))
    assert ds.classes == ["a", "b", "c"]
    with pytest.raises(FeatxError, match="--class-names"):
        discover_any(str(written / "data"), options=SourceOptions("image", "label", 4, class_names=str(names)))
    with pytest.raises(FeatxError, match="all be Parquet"):
        discover_any([str(written / "hfpq" / "train.parquet"), str(written / "wds" / "test-000000.tar")],
                     options=OPTS)


def test_all_failed_embed_exits_non_zero_and_nothing_is_reused(written, tmp_path):
    import pyarrow.parquet as pq

    t = pq.read_table(written / "hub" / "data" / "test-0-of-00001.parquet")
    cells = pa.array([{"bytes": b"not an image", "path": f"x{i}.png"} for i in range(t.num_rows)],
                     type=t.schema.field("image").type)
    pq.write_table(t.set_column(0, "image", cells), tmp_path / "bad.parquet")
    args = ["embed", str(tmp_path / "bad.parquet"), "--cache-dir", str(tmp_path / "c"), *TINY_CLI, "--device", "cpu",
            "-q"]
    for _ in range(2):  # the rerun too: failed rows are not "reused"
        r = CliRunner().invoke(cli, args)
        assert r.exit_code != 0
        assert "none of the 9 images could be embedded" in r.output and "reused" not in r.output


def test_helpers():
    assert expand_braces("{a-{0..2},a-1}.tar") == ["a-0.tar", "a-1.tar", "a-2.tar"]
    assert split_from_name("data/train-00000-of-00002.parquet") == "train"
    assert split_from_name("x-training.parquet") == "train" and split_from_name("x-testing.tar") == "test"
    assert canonical_split(" Validation ") == "val" and canonical_split("dev") is None
    assert readable_root(["s/{a,b}-{0..1}.tar"], ["s/a-0.tar", "s/b-1.tar"]).endswith("/s/a+b")
    assert dominant_failure([("a", "cannot identify image file '/x/a.jpg'")], 0).startswith("none of the 1")
    assert dominant_failure([("a", "bad (x)")], 3) is None
    with pytest.raises(FeatxError, match="no file matches"):
        expand_inputs(["/nonexistent/*.parquet"])


def test_split_aliases_for_folders_and_manifests(tmp_path):
    root = write_image_folder(tmp_path / "d", splits=("training", "validation"), per_class=2)
    from featx.data.folders import discover

    assert discover(root).counts() == {"train": 4, "val": 4}
    (tmp_path / "m.csv").write_text("path,label,split\nd/training/cats/img_000.png,cats,Training\n"
                                    "d/validation/dogs/img_000.png,dogs,testing\n")
    assert discover(tmp_path, manifest=tmp_path / "m.csv").counts() == {"train": 1, "test": 1}
