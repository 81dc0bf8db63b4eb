"""The checks of a skops head before anything in it is built (heads/saved/skops_guard.py): every array reference
counted against the unpack limit, a sidecar nested too deep refused, and an archive that holds no classifier refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from featx.base.errors import FeatxError

from conftest import forge_head as _forge


@pytest.fixture(scope="module")
def head(trained):
    """The kNN head ``featx.probe`` saved for the shared tiny cache (its sidecar is what the forgeries copy)."""
    return Path(trained[1]["heads"]["knn"]["model_path"])


def test_head_that_is_not_a_classifier_is_refused(head, tmp_path):
    import skops.io as sio
    from sklearn.preprocessing import StandardScaler

    from featx.heads.saved.persist import load_head

    forged = _forge(head, tmp_path, data=sio.dumps(StandardScaler().fit(np.eye(3))))
    with pytest.raises(FeatxError, match="not a classifier"):
        load_head(forged)


def test_skops_entries_shared_by_many_references_are_counted_each_time(head, tmp_path, monkeypatch):
    import io
    import zipfile

    import skops.io as sio
    from sklearn.linear_model import LogisticRegression

    import featx.heads.saved.persist as persist
    from featx.heads.saved.persist import load_head

    monkeypatch.setattr(persist, "MAX_UNPACKED_BYTES", 1 << 20)  # 1 GiB in real life
    est = LogisticRegression().fit(np.eye(4), [0, 1, 0, 1])
    est.extra_ = [np.full(10, i, np.float64) for i in range(20)]
    src = zipfile.ZipFile(io.BytesIO(sio.dumps(est)))
    schema = json.loads(src.read("schema.json"))
    refs = []

    def repoint(node):
        if isinstance(node, dict):
            if "file" in node:
                refs.append(node["file"])
                node["file"] = "big.npy"
            for v in node.values():
                repoint(v)
        elif isinstance(node, list):
            for v in node:
                repoint(v)

    repoint(schema)
    assert len(refs) >= 20
    big = io.BytesIO()
    np.save(big, np.zeros(600_000 // 8))  # 600 kB: under the limit once, far over it 20+ times
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("schema.json", json.dumps(schema))
        zf.writestr("big.npy", big.getvalue())
    data = out.getvalue()
    assert sum(i.file_size for i in zipfile.ZipFile(io.BytesIO(data)).infolist()) < 1 << 20
    forged = _forge(head, tmp_path, data=data)
    with pytest.raises(FeatxError, match="zip bomb"):
        load_head(forged)


def test_deeply_nested_sidecar_is_a_one_line_error(head, tmp_path):
    from featx.heads.saved.persist import load_head, sidecar_path

    forged = _forge(head, tmp_path)
    sidecar_path(forged).write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(FeatxError, match="unreadable"):
        load_head(forged)
