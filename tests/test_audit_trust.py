"""The audit's report reads image files only under a root given on this machine (issue 31, item 1).

A cache whose ``root`` is not signed by `featx embed` here, and a stranger's run folder whose
``audit.json`` names a ``data_root``, must not make ``report.html`` embed local files.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("cleanlab")

from featx.cache.store import Chunk, FeatureCache, PartsDir, fingerprint_digest, write_final  # noqa: E402
from featx.config.settings import AuditSettings  # noqa: E402
from featx.data.folders import Sample  # noqa: E402
from featx.report.html import write_report  # noqa: E402
from featx.runs.audit import audit  # noqa: E402


def _secret(tmp: Path) -> Path:
    private = tmp / "victim" / "private" / "secret.jpg"
    private.parent.mkdir(parents=True)
    Image.new("RGB", (40, 30), (255, 0, 0)).save(private)
    return private


def _stranger_cache(path: Path, private: Path) -> FeatureCache:
    """A cache from elsewhere: root "/", every key the private file, and no signature of this machine."""
    rng = np.random.default_rng(0)
    n, dim = 60, 8
    y = np.arange(n) % 2
    X = (rng.normal(size=(n, dim)) + 3 * y[:, None]).astype(np.float32)
    split = ["train"] * 45 + ["test"] * 15
    key = str(private.relative_to("/"))
    keys = [key] * n
    fp = {"backbone": "synthetic", "dim": dim, "name": path.name}
    parts = PartsDir(path, fp)
    parts.ensure()
    samples = [Sample(path="/" + k, key=k, label=int(c), split=s) for k, c, s in zip(keys, y, split)]
    parts.write_chunk(Chunk(keys, X, np.zeros(n, np.int64), np.ones(n, np.int64)))
    write_final(path, samples=samples, classes=("a", "b"), index=parts.read_index(), dim=dim, dtype="float32",
                attrs={"fingerprint": fingerprint_digest(fp), "fingerprint_json": json.dumps(fp),
                       "backbone": "synthetic", "root": "/", "preprocess": "none", "root_mac": "0" * 64})
    parts.remove()
    return FeatureCache(path)


def test_an_unsigned_cache_root_gives_the_audit_report_no_local_file(tmp_path):
    private = _secret(tmp_path)
    fc = _stranger_cache(tmp_path / "c.h5", private)
    out = tmp_path / "run"
    res = audit(fc, AuditSettings(out_dir=str(out), folds=3, report=True))
    html = Path(res.report_path).read_text(encoding="utf-8")
    assert '<section id="audit">' in html
    assert "data:image/jpeg" not in html and not list(out.glob("thumbs/*.jpg"))
    doc = json.loads((out / "audit.json").read_text())
    assert doc["data_root"] == "" and doc["hashing"]["hashed"] == 0  # nothing hashed under "/" either


def test_a_strangers_audit_json_data_root_gives_the_report_no_local_file(tmp_path):
    private = _secret(tmp_path)
    run = tmp_path / "stranger_run"
    run.mkdir()
    (run / "audit.json").write_text(json.dumps({
        "featx_version": "0", "created": "x", "data_root": str(private.parent), "fingerprint": "f",
        "data_root_mac": "0" * 64, "counts": {"outliers": 1}, "settings": {"view": "final"}, "summary": "s"}))
    (run / "outliers.csv").write_text("path,split,label,score,knn_similarity\nsecret.jpg,train,a,9.0,0.1\n")
    (run / "label_issues.csv").write_text("path,split,given,suggested,score\nsecret.jpg,train,a,b,0.01\n")
    page = write_report(run).read_text(encoding="utf-8")
    assert "secret.jpg" in page  # the row is listed ...
    assert "data:image/jpeg" not in page and not list(run.glob("thumbs/*.jpg"))  # ... but the file is never read
