"""Saved heads (heads/saved/persist.py): skops heads load without trust, pickles need --trust and never run code
unasked, the allow-list follows types, a head and its sidecar must match, and heads written before heads/ was
split into sub-packages still load."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import skops.io as sio
from click.testing import CliRunner

import featx
from featx.base.errors import FeatxError
from featx.cli import cli
from featx.heads.saved.persist import LEGACY_MODULES, is_trusted_type, load_head, save_head, sidecar_path
from featx.runs.predict import predict

from conftest import RunsCode, tiny_embed, write_image_folder


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
@pytest.mark.slow
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


class Foreign:
    """A type no allow-list names; building it (``__setstate__``) writes ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __setstate__(self, state: dict) -> None:
        Path(state["marker"]).write_text("code ran")
        self.__dict__.update(state)

    def fit(self, X, y=None):  # enough of an estimator to sit in a Pipeline
        return self

    def transform(self, X):
        return X


def _forge_sidecar(head: Path, **fields) -> Path:
    """A sidecar that matches ``head`` byte for byte: what a stranger would send with it."""
    meta = {"format": "featx-head/1", "sha256": hashlib.sha256(head.read_bytes()).hexdigest(),
            "model_file": head.name, "head": "logreg", "classes": ["cats", "dogs", "owls"]}
    meta.update(fields)
    sidecar_path(head).write_text(json.dumps(meta))
    return sidecar_path(head)


@pytest.mark.slow
def test_probe_saves_skops_heads_that_load_without_trust(trained):
    fc, res = trained
    for name, h in res["heads"].items():
        path = Path(h["model_path"])
        assert path.suffix == ".skops" and zipfile.is_zipfile(path), name
        meta = json.loads(sidecar_path(path).read_text())
        assert meta["model_format"] == "skops" and meta["model_file"] == path.name
        est, meta = load_head(path)
        acc = (np.asarray(est.predict(fc.features("val"))) == fc.labels("val")).mean()
        assert acc == pytest.approx(h["accuracy"]), name
        assert load_head(sidecar_path(path))[1]["sha256"] == meta["sha256"]  # the sidecar names its head


@pytest.mark.slow
def test_joblib_head_needs_trust_and_then_predicts_the_same(trained, tmp_path, caplog):
    fc, res = trained
    est, meta = load_head(res["heads"]["svm"]["model_path"])
    sidecar = {k: meta[k] for k in ("head", "classes", "estimator_classes", "backbone", "fingerprint_dict", "dim")}
    jl = save_head(est, tmp_path / "svm.skops", sidecar=sidecar, format="joblib")
    assert jl.name == "svm.joblib" and json.loads(sidecar_path(jl).read_text())["model_format"] == "joblib"
    with pytest.raises(FeatxError) as err:
        load_head(jl)
    msg = str(err.value)
    assert "\n" not in msg and "is a pickle; pickles can run code: pass --trust" in msg and "featx probe (skops)" in msg
    with pytest.raises(FeatxError, match="is a pickle"):
        predict(jl, [str(fc.path)], out=tmp_path / "refused.csv")
    assert not (tmp_path / "refused.csv").exists()
    with caplog.at_level(logging.WARNING, logger="featx.heads.saved.persist"):
        est2, _ = load_head(jl, trust=True)
    assert "unpickling runs any code" in caplog.text
    X = fc.features("val")
    assert (np.asarray(est2.predict(X)) == np.asarray(est.predict(X))).all()
    a = predict(res["heads"]["svm"]["model_path"], [str(fc.path)], out=tmp_path / "skops.csv")
    b = predict(jl, [str(fc.path)], out=tmp_path / "joblib.csv", trust=True)
    assert a["folder_accuracy"] == b["folder_accuracy"] and a["counts"] == b["counts"]
    assert (tmp_path / "skops.csv").read_text().splitlines()[1:] == (tmp_path / "joblib.csv").read_text().splitlines()[1:]


def test_pickle_that_would_run_code_is_never_executed(trained, tmp_path, caplog):
    fc, _ = trained
    marker = tmp_path / "pwned"
    evil = tmp_path / "head.joblib"
    evil.write_bytes(pickle.dumps(RunsCode(marker)))
    _forge_sidecar(evil, fingerprint_dict=fc.fingerprint_dict, backbone="tiny_cnn", dim=fc.dim)
    with pytest.raises(FeatxError, match="is a pickle; pickles can run code"):
        load_head(evil)
    with pytest.raises(FeatxError, match="is a pickle"):
        predict(evil, [str(fc.path)], out=tmp_path / "p.csv")
    # Named like a skops file, with a sidecar that says skops: the bytes decide, still a pickle.
    disguised = tmp_path / "disguised.skops"
    disguised.write_bytes(evil.read_bytes())
    _forge_sidecar(disguised, model_format="skops")
    with pytest.raises(FeatxError, match="is a pickle"):
        load_head(disguised)
    # --trust never skips the sidecar: a pickle without one, or not matching it, is not opened.
    _forge_sidecar(evil, sha256="0" * 64)
    with pytest.raises(FeatxError, match="NOT unpickled"):
        load_head(evil, trust=True)
    sidecar_path(evil).unlink()
    with pytest.raises(FeatxError, match="no sidecar"):
        load_head(evil, trust=True)
    assert not marker.exists()
    # The payload is live: trusting it runs it (which is exactly what --trust means).
    _forge_sidecar(evil)
    with caplog.at_level(logging.WARNING, logger="featx.heads.saved.persist"):
        load_head(evil, trust=True)
    assert marker.read_text() == "code ran" and "unpickling runs any code" in caplog.text
    marker.unlink()
    # The command line: one line, exit code 2, nothing run (last: the CLI reconfigures logging).
    r = CliRunner().invoke(cli, ["predict", "--head", str(evil), str(fc.path), "--out", str(tmp_path / "p.csv")])
    assert r.exit_code == 2 and "is a pickle; pickles can run code" in r.output
    assert len(r.output.strip().splitlines()) == 1 and not marker.exists()


def test_skops_file_naming_a_foreign_type_is_refused_naming_it(trained, tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer

    marker = tmp_path / "pwned"
    cases = {
        "Foreign": Pipeline([("evil", Foreign(marker)), ("clf", LogisticRegression())]),
        # A type skops trusts, holding a function it does not: os.system as the transform.
        "system": Pipeline([("f", FunctionTransformer(func=os.system)), ("clf", LogisticRegression())]),
    }
    for what, obj in cases.items():
        path = tmp_path / f"{what}.skops"
        path.write_bytes(sio.dumps(obj))
        _forge_sidecar(path)
        untrusted = sio.get_untrusted_types(file=path)
        named = [t for t in untrusted if t.endswith(what)]
        assert named, untrusted
        with pytest.raises(FeatxError, match="does not trust: .*" + named[0].replace(".", r"\.")):
            load_head(path)
        with pytest.raises(FeatxError, match="does not trust"):
            predict(path, [str(trained[0].path)], out=tmp_path / "p.csv")
    assert not marker.exists()
    # The Foreign payload is live: a loader trusting whatever the file names would run it.
    sio.load(tmp_path / "Foreign.skops", trusted=sio.get_untrusted_types(file=tmp_path / "Foreign.skops"))
    assert marker.exists()


def _torch_heads_are_estimators() -> bool:
    from sklearn.base import BaseEstimator

    from featx.heads.estimators import torch_heads

    return all(issubclass(getattr(torch_heads, n), BaseEstimator)
               for n in ("TorchLogisticRegression", "TorchLinearSVC", "TorchKNN"))


@pytest.mark.xfail(condition=not _torch_heads_are_estimators(), strict=True,
                   reason="torch heads are not yet sklearn BaseEstimator subclasses (the heads helper's refactor)")
@pytest.mark.parametrize("name", ["logreg", "svm", "knn"])
@pytest.mark.slow
def test_torch_heads_save_as_skops_with_arrays_only(name, tmp_path):
    from featx.heads.estimators.torch_heads import create_torch_head

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 20)
    X = (rng.normal(size=(60, 6)) + 3 * y[:, None]).astype(np.float32)
    est = create_torch_head(name, grid=None, folds=3, seed=0, device="cpu").fit(X, y)
    held = [type(v).__module__ for v in vars(est).values()]
    assert not any(m.startswith("torch") for m in held), held
    path = save_head(est, tmp_path / f"{name}.skops", sidecar={"head": name})
    assert not [t for t in sio.get_untrusted_types(file=path) if not t.startswith("featx.heads.")]
    again, _ = load_head(path)
    assert (np.asarray(again.predict(X)) == np.asarray(est.predict(X))).all()


def test_skops_zip_bomb_is_refused_before_unpacking(tmp_path, monkeypatch):
    import featx.heads.saved.persist as persist

    monkeypatch.setattr(persist, "MAX_UNPACKED_BYTES", 1 << 20)  # 1 GiB in real life; 1 MiB keeps the test small
    path = tmp_path / "bomb.skops"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("schema.json", b" " * (20 << 20))  # 20 MB of spaces, ~20 KB compressed
    assert path.stat().st_size * 100 < 20 << 20
    _forge_sidecar(path)
    with pytest.raises(FeatxError, match="zip bomb"):
        load_head(path)


def test_allow_list_follows_types_not_names():
    for name in (
        "featx.heads.tuning.factory.HeadSearch", "featx.heads.tuning.factory.AdaptiveStratifiedKFold",
        "sklearn.metrics._scorer._Scorer", "sklearn.metrics._classification.accuracy_score",
        "sklearn.calibration._CalibratedClassifier", "sklearn.calibration._SigmoidCalibration",
    ):
        assert is_trusted_type(name), name
    for name in (
        "builtins.eval", "builtins.exec", "posix.system", "os.system", "subprocess.Popen", "test_persist.Foreign",
        "featx.heads.saved.persist.Path",  # pathlib.Path re-exported in featx.heads: not a featx head type
        "featx.heads.saved.persist.load_head",  # a featx.heads function, not an estimator
        "featx.heads.tuning.factory.np.ndarray", "featx.heads.tuning.factory.HeadSearch.__base__",
        "featx.heads.no_such_module.Head", "featx.base.errors.FeatxError",
        "sklearn.datasets.fetch_openml", "sklearn.utils._testing.TempMemmap", "sklearn.metrics.os.system",
        "featx.heads.tuning.factory.HeadSearch;import os", "",
    ):
        assert not is_trusted_type(name), name


def test_sidecar_and_file_must_match(trained, tmp_path):
    _, res = trained
    src = Path(res["heads"]["logreg"]["model_path"]).parent
    run = tmp_path / "run"
    shutil.copytree(src, run)
    svm, knn = run / "svm.skops", run / "knn.skops"
    data = bytearray(svm.read_bytes())
    data[len(data) // 2] ^= 0xFF
    svm.write_bytes(bytes(data))
    with pytest.raises(FeatxError, match="does not match the sha256 in svm.json.*NOT unpickled or loaded"):
        load_head(svm)
    shutil.copy(run / "knn.json", run / "svm.json")  # another head's sidecar
    with pytest.raises(FeatxError, match="sidecar svm.json describes 'knn.skops', not 'svm.skops'"):
        load_head(svm)
    # A sidecar cannot send the loader to a file outside its folder.
    meta = json.loads((run / "knn.json").read_text())
    (tmp_path / "outside.skops").write_bytes(knn.read_bytes())
    (run / "knn.json").write_text(json.dumps(dict(meta, model_file="../outside.skops")))
    knn.unlink()
    with pytest.raises(FeatxError, match="does not exist"):
        load_head(run / "knn.json")
    (run / "logreg.json").write_text("{not json")
    with pytest.raises(FeatxError, match="unreadable"):
        load_head(run / "logreg.skops")
    (run / "logreg.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(FeatxError, match="is not a featx head sidecar"):
        load_head(run / "logreg.skops")


def test_head_for_another_backbone_is_refused(trained, tmp_path):
    fc, res = trained
    head = tmp_path / "svm.skops"
    shutil.copy(res["heads"]["svm"]["model_path"], head)
    meta = json.loads(sidecar_path(res["heads"]["svm"]["model_path"]).read_text())
    other = dict(meta["fingerprint_dict"], backbone="resnet18")
    sidecar_path(head).write_text(json.dumps(dict(meta, model_file=head.name, fingerprint_dict=other)))
    with pytest.raises(FeatxError, match="does not fit cache.*backbone: head trained on 'resnet18'"):
        predict(head, [str(fc.path)], out=tmp_path / "p.csv")
    sidecar_path(head).write_text(json.dumps(dict(meta, model_file=head.name, dim=fc.dim + 1)))
    with pytest.raises(FeatxError, match=f"feature dimension: head expects {fc.dim + 1}"):
        predict(head, [str(fc.path)], out=tmp_path / "p.csv")
    assert not (tmp_path / "p.csv").exists()


def test_types_skops_does_not_trust_stay_untrusted():
    from featx.heads.saved.persist import is_trusted_type

    assert not is_trusted_type("sklearn.metrics._dist_metrics.MahalanobisDistance32")
    assert not is_trusted_type("sklearn.metrics._dist_metrics.DistanceMetric")
    assert not is_trusted_type("sklearn.utils._bunch.Bunch")
