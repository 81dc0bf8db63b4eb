"""Hostile and damaged inputs III (issue 31, items 2, 3, 7, 8 and their tracebacks): the signing key, manifests
in buckets, CSV injection, the streamed kNN head's cache, bounds, a full disk.  Every crafted file is built here."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import hmac
import json
import logging
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

import featx
from featx.base.errors import FeatxError
from featx.cli import cli

from conftest import TINY_KW, make_tiny_cache, tiny_embed, write_image_folder

REPO = Path(__file__).resolve().parents[1]
TINY = dict(TINY_KW, batch_size=8, device="cpu")
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


@contextlib.contextmanager
def file_size_limit(n_bytes: int):
    """A full disk, as the OS gives it: every write past ``n_bytes`` of one file fails (EFBIG) in this process."""
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    prev = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, prev)


def _limited(n_bytes: int):
    """preexec_fn of a subprocess on a 'full disk' (see file_size_limit)."""
    def set_limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return set_limit


# --------------------------------------------------------------------------- 2. the signing key


def _mac(key: bytes, root: str, fp: str) -> str:
    return hmac.new(key, f"featx-root/1\0{root}\0{fp}".encode(), hashlib.sha256).hexdigest()


@pytest.fixture
def roots(monkeypatch):
    from featx.cache.trust import roots

    monkeypatch.setattr(roots, "_WARNED", set(), raising=False)
    return roots


def test_a_full_disk_while_the_key_is_made_leaves_no_empty_key(tmp_path, monkeypatch, roots):
    key = tmp_path / "cfg" / "local.key"
    env = {**os.environ, "FEATX_KEY_FILE": str(key), "PYTHONPATH": str(REPO)}
    code = "from featx.cache.trust.roots import sign_root; print(sign_root('/', 'fp'))"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
                       preexec_fn=_limited(8))  # the 32-byte key cannot be written
    assert r.returncode == 0, r.stderr
    assert not key.exists() and not [p.name for p in key.parent.iterdir()], "no empty key, no temporary file"
    assert r.stdout.strip() != _mac(b"", "/", "fp")
    # With space again, a key is made; a short one left by an older featx is replaced, never used.
    monkeypatch.setenv("FEATX_KEY_FILE", str(key))
    for left in (b"", b"short"):
        key.write_bytes(left)
        key.chmod(0o600)
        sig = roots.sign_root("/", "fp")
        assert sig != _mac(left, "/", "fp")
        assert len(key.read_bytes()) == 32 and stat.S_IMODE(key.stat().st_mode) == 0o600
        assert sig == _mac(key.read_bytes(), "/", "fp")


def test_a_planted_config_folder_or_key_of_another_user_is_not_used(tmp_path, monkeypatch, roots, caplog):
    other = tmp_path / "theirs"
    other.mkdir()
    planted = b"k" * 32
    (other / "local.key").write_bytes(planted)
    (other / "local.key").chmod(0o644)
    if os.geteuid() == 0:  # a real other user's folder and key
        os.chown(other, 65534, 65534)
        os.chown(other / "local.key", 65534, 65534)
    else:  # the files are ours: featx is told it runs as someone else
        monkeypatch.setattr(os, "geteuid", lambda: os.getuid() + 1)
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    (cfg / "featx").symlink_to(other)  # ~/.config/featx -> a folder another user owns
    monkeypatch.delenv("FEATX_KEY_FILE", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(cfg))
    with caplog.at_level(logging.WARNING, logger="featx"):
        sig = roots.sign_root("/", "fp")
    assert sig != _mac(planted, "/", "fp") and sig == roots.sign_root("/", "fp")  # a key of this process only
    assert "is not used" in caplog.text and "another user" in caplog.text and str(cfg / "featx") in caplog.text
    assert (other / "local.key").read_bytes() == planted


@pytest.mark.slow
def test_a_key_others_may_read_or_a_dangling_link_is_refused_without_a_traceback(tmp_path, monkeypatch, roots,
                                                                                 caplog):
    key = tmp_path / "cfg" / "local.key"
    key.parent.mkdir()
    monkeypatch.setenv("FEATX_KEY_FILE", str(key))
    key.write_bytes(b"r" * 32)
    key.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="featx"):
        assert roots.sign_root("/", "fp") != _mac(b"r" * 32, "/", "fp")
    assert "others may read it" in caplog.text
    key.unlink()
    key.symlink_to(tmp_path / "nowhere")
    with caplog.at_level(logging.WARNING, logger="featx"):
        sig = roots.sign_root("/", "fp")  # was a FileNotFoundError traceback
    assert len(sig) == 64 and "symbolic link to nothing" in caplog.text
    assert not (tmp_path / "nowhere").exists(), "the link is never followed to create a key"
    r = CliRunner().invoke(cli, ["embed", str(write_image_folder(tmp_path / "data", per_class=2)), "--cache",
                                 str(tmp_path / "c.h5"), "--backbone", "tiny_cnn", "--weights", "random",
                                 "--workers", "0", "--device", "cpu", "-q"])
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output


# --------------------------------------------------------------------------- 3. manifests in buckets


@pytest.fixture
def memfs():
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    yield fs
    for top in ("/evil", "/other", "/tmp", "/home"):
        if fs.exists(top):
            fs.rm(top, recursive=True)


def test_a_manifest_in_a_bucket_reads_only_its_own_bucket(tmp_path, memfs):
    from featx.data.sources import SourceOptions, discover_any

    folder = write_image_folder(tmp_path / "data", splits=(), per_class=2)
    for p in sorted(folder.rglob("*.png")):
        memfs.pipe(f"/evil/data/{p.relative_to(folder).as_posix()}", p.read_bytes())
        memfs.pipe(f"/other/data/{p.relative_to(folder).as_posix()}", p.read_bytes())
    secret = tmp_path / "private" / "secret.png"
    secret.parent.mkdir()
    shutil.copy(next(folder.rglob("*.png")), secret)
    memfs.pipe(str(secret), b"exists")  # the store has a bucket named like the local folder: the old check passed
    rows = ["path,label", "data/cats/img_000.png,cats", "data/dogs/img_000.png,dogs",
            f"file://{secret},cats", "memory://other/data/cats/img_001.png,cats",
            f"memory://evil/data/dogs/img_001.png::file://{secret},dogs", f"{secret},dogs"]
    memfs.pipe("/evil/list.csv", ("\n".join(rows) + "\n").encode())
    ds = discover_any(None, manifest="memory://evil/list.csv", options=SourceOptions("image", "label", 1))
    used = [s.key for s in ds.samples]
    assert sorted(used) == ["data/cats/img_000.png", "data/dogs/img_000.png"], used
    why = dict(ds.skipped)
    assert "another kind of store (file://" in why[f"file://{secret}"]
    assert "--allow-other-buckets" in why["memory://other/data/cats/img_001.png"]
    assert "another kind of store" in why[f"memory://evil/data/dogs/img_001.png::file://{secret}"]
    fc = featx.embed(manifest="memory://evil/list.csv", cache=tmp_path / "c.h5", **TINY)
    assert sorted(fc.keys()) == used and not any("secret" in k for k in fc.keys())
    ds = discover_any(None, manifest="memory://evil/list.csv",
                      options=SourceOptions("image", "label", 1, allow_other_buckets=True))
    assert "memory://other/data/cats/img_001.png" in [s.key for s in ds.samples]
    assert not any("secret" in s.key for s in ds.samples)


def test_a_file_url_row_naming_a_fifo_never_blocks(tmp_path):
    from featx.data import remote
    from featx.data.sources import SourceOptions, discover_any

    folder = write_image_folder(tmp_path / "data", splits=(), per_class=2)
    os.mkfifo(folder / "cats" / "pipe.png")
    rows = ["path,label", "cats/img_000.png,cats", "dogs/img_000.png,dogs", "cats/pipe.png,cats",
            f"file://{folder}/cats/pipe.png,cats"]
    (folder / "list.csv").write_text("\n".join(rows) + "\n")
    ds = discover_any(None, manifest=f"file://{folder}/list.csv", options=SourceOptions("image", "label", 1))
    assert sorted(s.key for s in ds.samples) == ["cats/img_000.png", "dogs/img_000.png"]
    assert all("not a regular file" in why for p, why in ds.skipped if p.endswith("pipe.png"))
    got: list = []
    reader = threading.Thread(target=lambda: got.append(remote.read_one(f"file://{folder}/cats/pipe.png")), daemon=True)
    reader.start()  # a FIFO swapped in after discovery: the read itself refuses it
    reader.join(10)
    assert got and got[0][0] is None and "FIFO" in got[0][1], "the read of a FIFO blocked"


# --------------------------------------------------------------------------- 7. CSV injection


EVIL_CLASSES = ('=HYPERLINK("http:evil")', "+SUM(1)", "@cmd")
LATIN1 = b"caf\xe9.png"


def _cells(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as fh:
        return [c for row in csv.reader(fh) for c in row]


def _assert_no_formula(path: Path) -> None:
    from featx.base.text import _PLAIN_NUMBER

    bad = [c for c in _cells(path) if c[:1] in FORMULA_START and not _PLAIN_NUMBER.fullmatch(c)]
    assert not bad, (path.name, bad[:5])


@pytest.fixture(scope="module")
def evil(tmp_path_factory):
    """A data set whose class and file names a spreadsheet would run, and a Latin-1 file name in val/."""
    tmp = tmp_path_factory.mktemp("evil")
    root = write_image_folder(tmp / "data", classes=EVIL_CLASSES, per_class=6)
    shutil.copy(root / "train" / EVIL_CLASSES[0] / "img_000.png", root / "train" / EVIL_CLASSES[0] / "-2+3.png")
    shutil.copy(root / "val" / EVIL_CLASSES[1] / "img_000.png", os.path.join(os.fsencode(root / "val" / EVIL_CLASSES[1]),
                                                                             LATIN1))
    return tmp, tiny_embed(root, tmp / "cache")


def test_csv_cells_that_would_run_as_formulas_are_written_as_text():
    from featx.base.text import csv_cell, csv_value

    for v in ['=HYPERLINK("http://x","y")', "+SUM(1)", "-2+3", "@cmd", "\t=1", "\r=1", "'quoted", "\uff1d1+1"]:
        assert csv_cell(v) == "'" + v and csv_value(csv_cell(v)) == v
    for v in ["cats", "-0.25", "1e-05", "+3", "", 7, -2.5]:
        assert csv_cell(v) == v


@pytest.mark.slow
def test_names_a_spreadsheet_would_run_never_reach_a_csv_as_formulas(evil, tmp_path):
    from featx.base.io import read_csv
    from featx.config.settings import AuditSettings
    from featx.report.predictions import read_predictions
    from featx.runs.audit import audit

    _, fc = evil
    run = tmp_path / "run"
    res = featx.probe(fc, head="knn", out_dir=run, n_jobs=1, device="cpu", plots=False, folds=2)
    audit(fc, AuditSettings(out_dir=str(tmp_path / "audit"), report=False, folds=2))
    pred = run / "predictions_knn.csv"
    _assert_no_formula(pred)
    for name in ("label_issues.csv", "duplicates.csv", "outliers.csv"):
        _assert_no_formula(tmp_path / "audit" / name)
    assert {"'+SUM(1)", "'@cmd"} <= set(_cells(pred)) and "'-2+3.png" not in _cells(pred)  # a train file
    audit_cells = [c for n in ("label_issues.csv", "duplicates.csv", "outliers.csv") for c in _cells(tmp_path / "audit" / n)]
    assert any(c.startswith(("'=HYPERLINK", "'+SUM", "'@cmd", "train/'")) for c in audit_cells) or len(audit_cells) < 20
    back = read_predictions(pred)  # the values written come back (the report shows and finds the right files)
    assert {p.true for p in back} <= set(EVIL_CLASSES) and any(p.true == EVIL_CLASSES[1] for p in back)
    assert any(p.path == os.fsdecode(b"val/+SUM(1)/" + LATIN1) for p in back)
    flagged = read_csv(tmp_path / "audit" / "outliers.csv")
    assert {r["label"] for r in flagged} <= set(EVIL_CLASSES)
    for fmt in ("csv", "npy"):
        out = featx.export_cache(fc, fmt=fmt, out=tmp_path / f"e.{fmt}")
        _assert_no_formula(Path(out["files"][-2] if fmt == "npy" else out["out"]))
    head = res["heads"]["knn"]["model_path"]
    p = featx.predict(head, str(fc.path), out=tmp_path / "p.csv", progress=False)
    _assert_no_formula(Path(p["csv"]))
    assert any(c.startswith("'=HYPERLINK") for c in _cells(Path(p["csv"])))


def test_a_latin1_file_name_is_written_byte_for_byte(evil, tmp_path):
    from featx.report.predictions import make_predictions, read_predictions, write_predictions

    _, fc = evil
    key = os.fsdecode(b"val/x/" + LATIN1)
    preds = make_predictions(rows=[0], keys=[key], splits=["val"], y_true=[0], y_pred=[1], classes=list(EVIL_CLASSES))
    path = write_predictions(tmp_path / "predictions_knn.csv", preds)  # was a UnicodeEncodeError
    assert LATIN1 in path.read_bytes() and b"'=HYPERLINK" in path.read_bytes()
    assert read_predictions(path)[0].path == key and read_predictions(path)[0].true == EVIL_CLASSES[0]


@pytest.mark.slow
def test_predict_on_a_folder_with_a_latin1_name_writes_its_csv(evil, tmp_path):
    tmp, fc = evil
    run = tmp_path / "run"
    res = featx.probe(fc, head="logreg", out_dir=run, n_jobs=1, device="cpu", plots=False, folds=2)
    folder = tmp / "data" / "val" / EVIL_CLASSES[1]
    r = CliRunner().invoke(cli, ["predict", "--head", res["heads"]["logreg"]["model_path"], str(folder), "--out",
                                 str(tmp_path / "p.csv"), "--device", "cpu", "--workers", "0",
                                 "--cache-dir", str(tmp_path / "pc")])
    assert r.exit_code == 0, r.output  # was a UnicodeEncodeError: the name is listed as failed, with the fix
    assert "caf\\xe9.png" in r.output or "caf" in r.output and "file name is not UTF-8" in r.output, r.output
    with open(tmp_path / "p.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 6


# --------------------------------------------------------------------------- 8. smaller breaks


@pytest.mark.slow
def test_a_streamed_knn_head_finds_its_cache_from_any_folder_and_needs_its_identity(tmp_path, monkeypatch):
    from featx.heads.saved.persist import load_head
    from featx.heads.stream import knn as stream_knn

    monkeypatch.setattr(stream_knn, "HOLD_BYTES", 0)  # the head refers to its cache
    made = make_tiny_cache(tmp_path / "a", per_class=5)
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(made.path, work / "c.h5")
    monkeypatch.chdir(work)
    res = featx.probe("c.h5", head="knn", solver="stream", out_dir="run", n_jobs=1, device="cpu", plots=False,
                      view="final")
    est, _ = load_head(work / res["heads"]["knn"]["model_path"])
    assert Path(est.reference_["cache"]).is_absolute() and est.reference_["identity"]
    X = made.features("val", view="final")
    monkeypatch.chdir(tmp_path)  # featx predict from another folder
    first = est.predict(X)
    assert len(first) == len(X)
    # Another data set embedded with the same settings: same fingerprint, other rows.
    other = make_tiny_cache(tmp_path / "b", per_class=5, classes=("ants", "bees", "wasps"))
    assert other.fingerprint == made.fingerprint
    shutil.copy(other.path, work / "c.h5")
    est, _ = load_head(work / res["heads"]["knn"]["model_path"])
    with pytest.raises(FeatxError, match="rows or embedding settings have changed.*re-create the head"):
        est.predict(X + 1)
    old = dict(est.reference_)
    old.pop("identity")
    est.reference_ = old
    shutil.copy(made.path, work / "c.h5")
    with pytest.raises(FeatxError, match="older featx.*identity"):
        est.predict(X + 2)


def test_a_config_file_larger_than_any_config_is_refused_at_once(tmp_path):
    cfg = tmp_path / "big.yaml"
    cfg.write_text("probe:\n  head: \"" + "x" * (20 << 20) + "\"\n")
    t0 = time.perf_counter()
    r = CliRunner().invoke(cli, ["--config", str(cfg), "config", "probe"])
    assert time.perf_counter() - t0 < 5
    assert r.exit_code == 2 and "larger than 256 KiB" in r.output and str(cfg) in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1


@pytest.mark.slow
def test_export_leaves_out_nan_rows_of_a_damaged_cache_and_says_so(tiny_cache, tmp_path, caplog):
    import pyarrow.parquet as pq  # noqa: F401 - the parquet extra

    path = tmp_path / "c.h5"
    shutil.copy(tiny_cache.path, path)
    with h5py.File(path, "a") as f:
        f["features"][3] = np.nan
        f["features"][7, 2] = np.inf
        del f["checksums"]
    keys = tiny_cache.keys()
    for fmt in ("csv", "npy", "parquet"):
        with caplog.at_level(logging.WARNING, logger="featx"):
            res = featx.export_cache(str(path), fmt=fmt, out=tmp_path / f"e.{fmt}", chunk_rows=4)
        assert res["rows"] == len(keys) - 2 and res["left_out"] == [keys[3], keys[7]]
        assert "NaN/inf features and were left out" in caplog.text and "featx verify" in caplog.text
        caplog.clear()
    assert np.load(tmp_path / "e.npy").shape == (len(keys) - 2, tiny_cache.dim)
    assert np.isfinite(np.load(tmp_path / "e.npy")).all()
    with open(tmp_path / "e.rows.csv", newline="") as fh:
        assert [r["path"] for r in csv.DictReader(fh)] == [k for i, k in enumerate(keys) if i not in (3, 7)]
    with open(tmp_path / "e.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == len(keys) - 2
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_matplotlib_never_writes_raw_control_characters_of_a_class_name():
    import io

    from featx.report.plots.mpl import pyplot

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        plt = pyplot()
        fig, ax = plt.subplots()
        ax.set_title("dogs\x1b]0;pwned\x07\x1b[2J")
        ax.set_xticks([0, 1], ["cats\x1b[31m", "ok"])
        fig.savefig(io.BytesIO(), format="png")
        plt.close(fig)
    raw = [str(w.message) for w in seen if any(c in str(w.message) for c in "\x1b\x07")]
    assert not raw, raw


def _cache_set(tmp_path: Path, doc) -> Path:
    p = tmp_path / "s__a+b.multi.json"
    p.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return p


@pytest.mark.parametrize("doc,says", [
    ({"members": []}, "empty"),
    ({"members": [{"backbone": "a", "cache": 5, "fingerprint": "x"}]}, "member 0 is not a mapping"),
    ({"members": [{"backbone": 5, "cache": "a.h5", "fingerprint": "x"}]}, "member 0 is not a mapping"),
    ({"members": [5]}, "member 0 is not a mapping"),
    ({"members": [{"backbone": "a", "cache": "a.h5", "fingerprint": "x"}] * 2}, "named twice"),
    ({"featx_multi_cache": 1}, "no \"members\" list"),
    ([1, 2], "no \"members\" list"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ({"members": [{"backbone": f"b{i}", "cache": f"m{i}.h5", "fingerprint": "x"} for i in range(10_000)]},
     "10000 members; a set holds at most 16"),
    ("\xff\xfe not json", "cannot be read"),
])
def test_a_malformed_cache_set_file_is_one_line(tmp_path, doc, says):
    path = _cache_set(tmp_path, doc)
    t0 = time.perf_counter()
    r = CliRunner().invoke(cli, ["info", str(path)])
    assert time.perf_counter() - t0 < 5
    assert r.exit_code == 2 and says in r.output and "cache set" in r.output and "featx embed" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and r.exception is None or isinstance(r.exception, SystemExit)


def test_train_views_beyond_any_use_are_refused_before_any_work(tmp_path):
    from featx.embedding.engines import augment

    with pytest.raises(FeatxError, match="at most 100 views per training image"):
        augment.check_train_views(100_000_000)
    data = write_image_folder(tmp_path / "data", per_class=2)
    t0 = time.perf_counter()
    r = CliRunner().invoke(cli, ["embed", str(data), "--train-views", "100000000", "--backbone", "tiny_cnn",
                                 "--weights", "random", "--workers", "0", "--cache", str(tmp_path / "c.h5")])
    assert r.exit_code == 2 and "--train-views 100000000" in r.output and time.perf_counter() - t0 < 10, r.output
    assert not (tmp_path / "c.h5").exists()


# --------------------------------------------------------------------------- a full disk during featx audit


@pytest.mark.slow
def test_a_full_disk_during_the_audit_is_one_line_and_leaves_nothing(tiny_cache, tmp_path):
    out = tmp_path / "audit"
    with file_size_limit(64):  # the first CSV cannot be written
        r = CliRunner().invoke(cli, ["audit", str(tiny_cache.path), "--out-dir", str(out), "--folds", "2"])
    assert r.exit_code == 2, (r.output, r.exception)
    last = r.output.strip().splitlines()[-1]  # after the audit's own notes, if any
    assert last.startswith("error: cannot write") and ".csv (File too large)" in last and "free disk space" in last
    assert r.output.count("error:") == 1 and "Traceback" not in r.output, r.output
    assert not out.exists() and not list(tmp_path.iterdir()), "no staged folder or temporary file is left"


def test_a_full_disk_while_the_embedding_map_is_saved_leaves_no_temporary_file(tiny_cache, tmp_path, caplog):
    from featx.report.plots import embedmap

    with file_size_limit(256), caplog.at_level(logging.WARNING, logger="featx"):
        coords = embedmap.map_coordinates(tiny_cache, tmp_path)  # was an OSError and a stray .embedmap.tmp.npz
    assert coords["xy"].shape == (len(tiny_cache), 2) and "were not saved" in caplog.text
    assert not list(tmp_path.iterdir())
    with file_size_limit(256), pytest.raises(FeatxError, match="cannot write .*report_map.png.*free disk space"):
        embedmap.plot_map(coords, tiny_cache.labels(), tiny_cache.classes, tmp_path / "report_map.png")
    assert not list(tmp_path.iterdir())
