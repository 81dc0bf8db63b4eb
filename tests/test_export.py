"""featx.cache.export: Parquet / npy / CSV round trips, metadata, streaming in constant memory."""

from __future__ import annotations

import csv
import json
import tracemalloc

import numpy as np
import pytest

from featx.base.errors import FeatxError
from featx.cache.export import export_cache
from featx.cache.store import Chunk, FeatureCache, PartsDir, fingerprint_digest, write_final
from featx.data.folders import Sample

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

CLASSES = ("ants", "bees, wild", "çà")


def synthetic_cache(path, n: int, dim: int, *, seed: int = 0) -> FeatureCache:
    """A finished cache of ``n`` random rows (70% train, then val), written through the real store."""
    rng = np.random.default_rng(seed)
    fp = {"backbone": "synthetic", "dim": dim, "seed": seed}
    parts = PartsDir(path, fp)
    parts.ensure()
    samples = []
    for i in range(n):
        split = "train" if i < int(0.7 * n) else "val"
        label = i % len(CLASSES)
        name = f"img_{i:06d}.png" if i % 7 else f"odd name, #{i} ü.png"
        samples.append(Sample(path=f"/data/{split}/{CLASSES[label]}/{name}", key=f"{split}/{CLASSES[label]}/{name}",
                              label=label, split=split))
    feats = rng.normal(size=(n, dim)).astype(np.float32)
    for a in range(0, n, 4000):
        b = min(n, a + 4000)
        parts.write_chunk(Chunk([s.key for s in samples[a:b]], feats[a:b], np.zeros(b - a, np.int64), np.ones(b - a, np.int64)))
    write_final(path, samples=samples, classes=CLASSES, index=parts.read_index(), dim=dim, dtype="float32",
                attrs={"fingerprint": fingerprint_digest(fp), "fingerprint_json": json.dumps(fp), "backbone": "synthetic",
                       "root": "/data", "preprocess": "none"})
    parts.remove()
    return FeatureCache(path)


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory):
    return synthetic_cache(tmp_path_factory.mktemp("exp") / "c.h5", 50, 6)


def test_parquet_round_trip_with_metadata(small_cache, tmp_path):
    fc = small_cache
    res = export_cache(fc, fmt="parquet", out=tmp_path / "x.parquet", chunk_rows=16)
    assert res["rows"] == 50 and res["dim"] == 6
    t = pq.read_table(tmp_path / "x.parquet")
    assert t.num_rows == len(fc) == 50
    assert t.column_names == ["path", "label", "label_index", "split", "features"]
    assert t.column("path").to_pylist() == fc.keys()
    assert t.column("label").to_pylist() == [fc.classes[i] for i in fc.labels()]
    assert t.column("split").to_pylist() == fc.split_array().tolist()
    feats = np.asarray(t.column("features").combine_chunks().flatten()).reshape(-1, 6)
    np.testing.assert_array_equal(feats, fc.features())
    assert pa.types.is_fixed_size_list(t.schema.field("features").type)
    meta = pq.read_schema(tmp_path / "x.parquet").metadata
    assert meta[b"featx.backbone"] == b"synthetic"
    assert json.loads(meta[b"featx.classes"]) == list(CLASSES)
    assert meta[b"featx.fingerprint"].decode() == fc.fingerprint
    assert pq.ParquetFile(tmp_path / "x.parquet").metadata.num_row_groups == 4  # 50 rows in blocks of 16


def test_npy_and_csv_round_trip(small_cache, tmp_path):
    fc = small_cache
    res = export_cache(fc, fmt="npy", out=tmp_path / "x.npy", chunk_rows=7)
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), fc.features())
    rows = list(csv.DictReader(open(tmp_path / "x.rows.csv", encoding="utf-8")))
    assert [r["path"] for r in rows] == fc.keys() and [r["split"] for r in rows] == fc.split_array().tolist()
    assert json.loads(json.loads((tmp_path / "x.meta.json").read_text())["classes"]) == list(CLASSES)
    assert len(res["files"]) == 3
    export_cache(fc, fmt="csv", out=tmp_path / "x.csv", chunk_rows=7)
    with open(tmp_path / "x.csv", encoding="utf-8") as fh:
        r = list(csv.reader(fh))
    assert r[0][:4] == ["path", "label", "label_index", "split"] and len(r[0]) == 4 + 6 and len(r) == 51
    got = np.asarray([[float(v) for v in row[4:]] for row in r[1:]], dtype=np.float32)
    np.testing.assert_allclose(got, fc.features(), rtol=1e-6)
    assert [row[1] for row in r[1:]] == [fc.classes[i] for i in fc.labels()]


@pytest.mark.slow
def test_export_streams_in_constant_memory(tmp_path):
    fc = synthetic_cache(tmp_path / "big.h5", 20000, 128, seed=1)  # 10 MB of features
    tracemalloc.start()
    try:
        export_cache(fc, fmt="npy", out=tmp_path / "big.npy", chunk_rows=1000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3_000_000, f"peak {peak} bytes: the export holds more than a few blocks"
    np.testing.assert_array_equal(np.load(tmp_path / "big.npy", mmap_mode="r")[12345], fc.features()[12345])


def test_export_errors(small_cache, tmp_path):
    with pytest.raises(FeatxError, match="--format 'xlsx'"):
        export_cache(small_cache, fmt="xlsx", out=tmp_path / "x.xlsx")
    with pytest.raises(FeatxError, match="is a folder"):
        export_cache(small_cache, fmt="csv", out=tmp_path)
    with pytest.raises(FeatxError, match="--view"):
        export_cache(small_cache, fmt="csv", out=tmp_path / "v.csv", view="multi")
    assert not list(tmp_path.glob(".*tmp"))
