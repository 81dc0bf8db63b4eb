"""Saved heads (heads/saved/persist.py): heads written before heads/ was split into sub-packages still load."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile

import numpy as np
import pytest

import featx
from featx.heads.saved.persist import LEGACY_MODULES, load_head

from conftest import tiny_embed, write_image_folder


def _as_older_featx_wrote_it(path, sidecar) -> None:
    """Rewrite the skops file's module names to where the classes lived before the split (and its sha256)."""
    src = zipfile.ZipFile(io.BytesIO(path.read_bytes()))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as out:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename.endswith(".json"):
                text = data.decode()
                for old, new in LEGACY_MODULES.items():
                    text = text.replace(f'"{new}"', f'"{old}"')
                data = text.encode()
            out.writestr(item, data)
    path.write_bytes(buf.getvalue())
    meta = json.loads(sidecar.read_text())
    meta["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    sidecar.write_text(json.dumps(meta))


@pytest.mark.parametrize("head", ["logreg", "knn_dino"])
def test_a_head_saved_under_the_old_module_names_loads_and_predicts_the_same(head, tmp_path):
    fc = tiny_embed(write_image_folder(tmp_path / "data", per_class=8), tmp_path / "cache")
    res = featx.probe(fc.path, head=head, folds=2, n_jobs=1, plots=False, out_dir=tmp_path / "run")
    path = tmp_path / "run" / f"{head}.skops"
    before, _ = load_head(path)
    _as_older_featx_wrote_it(path, tmp_path / "run" / f"{head}.json")
    assert any(old in path.read_bytes().decode("latin-1") for old in LEGACY_MODULES)
    after, meta = load_head(path)
    X = fc.features("val")
    assert np.array_equal(before.predict(X), after.predict(X))
    assert meta["head"] == head and res.heads[head]["model_path"] == str(path)
