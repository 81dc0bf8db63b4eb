"""Hostile and damaged inputs II (issue 24): caches that read other files, declared shapes, corruption,
image bombs, FIFOs, degenerate data, terminal escapes, sidecars that choose a download.

Every hostile file is built here, with h5py, skops' own writer and PIL.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

import featx
from featx.base.errors import FeatxError
from featx.cache.store import FeatureCache
from featx.cli import cli

from conftest import forge_head as _forge
from conftest import tiny_embed, write_image_folder

SECRET = b"root:x:0:0:SECRET-LINE:/root:/bin/bash\n" * 4


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A tiny cache (two views: features + parts) and its data folder."""
    tmp = tmp_path_factory.mktemp("hostile")
    root = write_image_folder(tmp / "data", classes=("cats", "dogs", "owls"), per_class=6)
    fc = tiny_embed(root, tmp / "cache")
    return fc, root, tmp


def _copy(fc: FeatureCache, tmp_path: Path) -> Path:
    path = tmp_path / fc.path.name
    shutil.copy(fc.path, path)
    return path


def _secret(tmp_path: Path) -> Path:
    p = tmp_path / "passwd"
    p.write_bytes(SECRET)
    return p


def _replace(path: Path, name: str, make) -> None:
    with h5py.File(path, "a") as f:
        del f[name]
        make(f)


# --------------------------------------------------------------------------- 1. files that read other files


def _external_storage(path: Path, secret: Path) -> None:
    _replace(path, "classes", lambda f: f.create_dataset("classes", shape=(3,), dtype="S32",
                                                         external=[(str(secret), 0, 96)]))


def _external_link(path: Path, secret: Path) -> None:
    other = secret.with_suffix(".h5")
    with h5py.File(other, "w") as g:
        g["secret"] = np.frombuffer(SECRET, dtype="S1")
    with h5py.File(path, "a") as f:
        f["failed/leak"] = h5py.ExternalLink(str(other), "/secret")


def _virtual(path: Path, secret: Path) -> None:
    other = secret.with_suffix(".vds.h5")
    with h5py.File(path, "r") as f:
        feats = f["features"][()]
    with h5py.File(other, "w") as g:
        g["x"] = feats
    layout = h5py.VirtualLayout(shape=feats.shape, dtype=feats.dtype)
    layout[:] = h5py.VirtualSource(str(other), "x", shape=feats.shape)
    _replace(path, "features", lambda f: f.create_virtual_dataset("features", layout))


def _soft_link(path: Path, secret: Path) -> None:
    _replace(path, "labels", lambda f: f.__setitem__("labels", h5py.SoftLink("/split")))


@pytest.mark.parametrize("make,named", [(_external_storage, "classes"), (_external_link, "failed/leak"),
                                        (_virtual, "features"), (_soft_link, "labels")])
def test_cache_that_reads_other_files_is_refused_naming_the_dataset(built, tmp_path, make, named):
    fc, _, _ = built
    path = _copy(fc, tmp_path)
    make(path, _secret(tmp_path))
    with pytest.raises(FeatxError, match=f"'{named}'"):
        FeatureCache(path)
    r = CliRunner().invoke(cli, ["info", "--failed", str(path)])
    assert r.exit_code == 2 and "SECRET-LINE" not in r.output and f"'{named}'" in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_chunk_file_that_reads_other_files_is_embedded_again(built, tmp_path, caplog):
    from featx.cache.store import PartsDir

    fc, root, tmp = built
    parts = PartsDir(tmp_path / "c.h5", {"x": 1})
    parts.ensure()
    from featx.cache.store import Chunk

    ch = Chunk(["a.png", "b.png"], np.ones((2, 4), np.float32), np.zeros(2, np.int64), np.zeros(2, np.int64))
    cf = parts.write_chunk(ch)
    assert set(parts.read_index()) == {"a.png", "b.png"}
    secret = _secret(tmp_path)
    with h5py.File(cf, "a") as f:
        del f["failed_reasons"]
        f.create_dataset("failed_reasons", shape=(0,), dtype="S8", external=[(str(secret), 0, 0)])
    with caplog.at_level("WARNING"):
        assert parts.read_index() == {}
    assert "another file" in caplog.text and cf.with_suffix(".damaged").exists()


def _vlen_array_attr(f: h5py.File) -> None:
    # 10,000 variable-length strings that could all point at one large heap object: refused by shape.
    f.attrs.create("notes", data=np.array(["x" * 100] * 10_000, dtype=object), dtype=h5py.string_dtype())


def _huge_attr(f: h5py.File) -> None:
    f.attrs.create("blob", data=np.void(b"\0" * (2 << 20)))  # one 2 MiB scalar


def _huge_vlen_attr(f: h5py.File) -> None:
    f.attrs["note"] = "x" * (3 << 20)  # one 3 MiB variable-length string: HDF5 reports its pointer's 16 bytes


def _add_attr(path: Path, make) -> None:
    """Copy ``path`` into a file whose root may hold large (dense) attributes, then add one."""
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(path, "r") as src, h5py.File(tmp, "w", libver="latest") as dst:
        for name in src:
            src.copy(name, dst)
        dst.attrs.update(src.attrs)
        make(dst)
    tmp.replace(path)


@pytest.mark.parametrize("make,says", [(_vlen_array_attr, "attribute 'notes' of '/' is an array of shape (10000,)"),
                                       (_huge_attr, "attribute 'blob' of '/' stores 2097152 bytes"),
                                       (_huge_vlen_attr, "attribute 'note' of '/' stores 3145728 bytes")])
def test_attributes_are_checked_before_they_are_read(built, tmp_path, make, says):
    fc, _, _ = built
    path = _copy(fc, tmp_path)
    _add_attr(path, make)
    with pytest.raises(FeatxError, match=re.escape(says)):
        FeatureCache(path)
    r = CliRunner().invoke(cli, ["info", str(path)])
    assert r.exit_code == 2 and says in r.output and "Traceback" not in r.output
    from featx.cache.store import Chunk, PartsDir

    parts = PartsDir(tmp_path / "c.h5", {"x": 1})
    parts.ensure()
    cf = parts.write_chunk(Chunk(["a.png"], np.ones((1, 4), np.float32), np.zeros(1, np.int64), np.zeros(1, np.int64)))
    _add_attr(cf, make)
    assert parts.total_seconds() == 0.0 and parts.read_index() == {}  # the chunk is embedded again


# --------------------------------------------------------------------------- 5. declared shapes


def test_declared_shapes_must_be_backed_by_the_file(built, tmp_path):
    fc, _, _ = built
    path = _copy(fc, tmp_path)
    _replace(path, "features", lambda f: f.create_dataset("features", shape=(10**9, 1280), dtype="f4",
                                                          chunks=(1024, 1280)))
    assert path.stat().st_size < 1 << 20
    for argv in (["info", str(path)], ["probe", str(path), "--out-dir", str(tmp_path / "run")],
                 ["export", str(path), "--out", str(tmp_path / "x.npy"), "--format", "npy"]):
        r = CliRunner().invoke(cli, argv)
        assert r.exit_code == 2, (argv, r.output)
        assert "'features' declares shape (1000000000, 1280)" in r.output, r.output
        assert "Traceback" not in r.output


@pytest.mark.parametrize("key,value,says", [
    ("labels", lambda n, w: np.arange(n) * 100, "outside the 3 classes"),
    ("split", lambda n, w: np.full(n, 99, np.uint8), "name no split"),
    ("split", lambda n, w: np.resize([0, 1], n).astype(np.uint8), "not contiguous"),
    ("classes", lambda n, w: np.arange(3), "non-text class names"),
    ("features", lambda n, w: np.full((n, w), b"x", dtype="S4"), "not a 2-D array of floats"),
])
def test_inconsistent_row_datasets_are_one_line_errors(built, tmp_path, key, value, says):
    fc, _, _ = built
    path = _copy(fc, tmp_path)
    with h5py.File(path, "a") as f:
        n, w = f["features"].shape
        del f[key]
        f[key] = value(n, w)
    with pytest.raises(FeatxError, match=says):
        FeatureCache(path)
    r = CliRunner().invoke(cli, ["info", str(path)])
    assert r.exit_code == 2 and says in r.output and "Traceback" not in r.output


def test_bad_fingerprint_json_is_a_one_line_error(built, tmp_path):
    fc, _, _ = built
    path = _copy(fc, tmp_path)
    with h5py.File(path, "a") as f:
        f.attrs["fingerprint_json"] = "[" * 100000
    with pytest.raises(FeatxError, match="fingerprint_json"):
        FeatureCache(path)


# --------------------------------------------------------------------------- 8. silent corruption


def _corrupt_features(path: Path, dataset: str = "features", row: int = 1) -> None:
    """Overwrite bytes of one feature row in place, as a bad disk would (h5py finds the offset)."""
    with h5py.File(path, "r") as f:
        d = f[dataset]
        off = d.id.get_offset() if d.chunks is None else d.id.get_chunk_info(0).byte_offset
        width = d.shape[1] * d.dtype.itemsize
    with open(path, "r+b") as fh:
        fh.seek(off + row * width)
        fh.write(np.full(d.shape[1], 2.4e38, np.float32).astype(d.dtype).tobytes())


@pytest.mark.slow
def test_corrupted_finished_cache_is_reported_and_healed_by_a_rerun(built, tmp_path, caplog):
    fc, root, _ = built
    cache_dir = tmp_path / "cache"
    fc2 = tiny_embed(root, cache_dir)
    good = fc2.features()
    _corrupt_features(fc2.path)
    with caplog.at_level("WARNING", logger="featx.cache.trust.integrity"):
        FeatureCache(fc2.path).features()
    assert "rows 1 of dataset 'features' do not match their checksums" in caplog.text and "featx embed" in caplog.text
    r = CliRunner().invoke(cli, ["probe", str(fc2.path), "--out-dir", str(tmp_path / "run"), "--head", "knn"])
    assert "is damaged: rows 1 of dataset 'features'" in r.output, r.output
    r = CliRunner().invoke(cli, ["verify", str(fc2.path)])
    assert r.exit_code == 2 and "damaged" in r.output and "features rows 1 do not match" in r.output
    # The rerun notices, embeds the damaged rows again and ends with the undamaged cache.
    fc3 = tiny_embed(root, cache_dir)
    assert fc3.stats.embedded > 0
    np.testing.assert_allclose(fc3.features(), good, atol=1e-5)
    r = CliRunner().invoke(cli, ["verify", str(fc3.path)])
    assert r.exit_code == 0 and "checksums  verified" in r.output, r.output


@pytest.mark.slow
def test_corrupted_chunk_is_embedded_again(built, tmp_path, monkeypatch):
    from featx.embedding import runner

    fc, root, _ = built
    cache_dir = tmp_path / "cache"
    kept = {}
    monkeypatch.setattr(runner.PartsDir, "remove", lambda self: kept.setdefault("dir", self.dir))
    fc2 = tiny_embed(root, cache_dir, chunk_size=8)
    good = fc2.features()
    chunks = sorted(kept["dir"].glob("chunk-*.h5"))
    assert len(chunks) > 1
    _corrupt_features(chunks[0], row=0)
    fc2.path.unlink()  # as if killed before the final file: the chunks are all there is
    monkeypatch.undo()
    fc3 = tiny_embed(root, cache_dir, chunk_size=8)
    assert 0 < fc3.stats.embedded < len(good) and not list(kept["dir"].parent.glob("*.parts"))
    np.testing.assert_allclose(fc3.features(), good, atol=1e-5)


def test_caches_without_checksums_open_and_verify_says_so(built, tmp_path):
    fc, _, _ = built
    path = _copy(fc, tmp_path)
    with h5py.File(path, "a") as f:
        del f["checksums"]
    np.testing.assert_allclose(FeatureCache(path).features(), fc.features())
    r = CliRunner().invoke(cli, ["verify", str(path)])
    assert r.exit_code == 0 and "not verified" in r.output, r.output


# --------------------------------------------------------------------------- 3, 7. image bombs and FIFOs


@pytest.fixture
def alarm():
    """A hang becomes a failure (a FIFO opened for reading blocks until someone writes to it)."""
    import signal

    def boom(*_):
        raise TimeoutError("blocked: featx opened something that never answers")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def test_tall_png_and_fifo_are_recorded_not_fatal(tmp_path, alarm):
    from PIL import Image

    from featx.data.folders import discover
    from featx.data.images import ImageLoadError, load_image

    root = write_image_folder(tmp_path / "data", classes=("cats", "dogs"), per_class=4)
    tall = root / "train" / "cats" / "tall.png"
    Image.new("RGB", (1, 100000)).save(tall)
    assert tall.stat().st_size < 2000
    fifo = root / "train" / "dogs" / "pipe.jpg"
    os.mkfifo(fifo)
    (root / "train" / "dogs" / "link.jpg").symlink_to(fifo)
    with pytest.raises(ImageLoadError, match="aspect ratio"):
        load_image(tall)
    with pytest.raises(ImageLoadError, match="FIFO"):
        load_image(fifo)
    ds = discover(root)
    skipped = dict(ds.skipped)
    assert "FIFO" in skipped[str(fifo)] and "FIFO" in skipped[str(fifo.with_name("link.jpg"))]
    fc = tiny_embed(root, tmp_path / "cache")
    failed = dict(fc.failed)
    assert "aspect ratio" in failed["train/cats/tall.png"] and len(fc) == 16


def test_file_swapped_for_a_fifo_after_discovery_never_blocks_a_reader(tmp_path, alarm, monkeypatch):
    """Both readers (the PIL loader and the device engine's byte reader) refuse a FIFO at the open itself."""
    from PIL import Image

    from featx.data import guards
    from featx.data.images import ImageLoadError, load_image
    from featx.embedding.backbones import Preprocess
    from featx.embedding.engines.gpu import _BytesDataset

    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    monkeypatch.setattr(guards, "file_reason", lambda path: None)  # the moment between the check and the open
    with pytest.raises(ImageLoadError, match="not an image file"):
        load_image(fifo)
    monkeypatch.undo()
    tall = tmp_path / "tall.jpg"
    Image.new("RGB", (8, 1600)).save(tall)  # 12,800 pixels, but 200:1
    samples = [type("S", (), {"path": str(p)})() for p in (fifo, tall)]
    ds = _BytesDataset(samples, Preprocess(resize=36, crop=32, mean=(0.5,) * 3, std=(0.25,) * 3))
    items = [ds[0], ds[1]]
    assert [it.kind for it in items] == ["fail", "fail"]
    assert "FIFO" in items[0].error and "aspect ratio" in items[1].error


def test_file_swapped_for_a_socket_after_discovery_is_named_as_a_socket(tmp_path, monkeypatch):
    import socket

    from featx.data import guards
    from featx.data.images import ImageLoadError, load_image

    path = tmp_path / "sock.jpg"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        real, calls = guards.file_reason, []

        def first_check_passes(p):  # the check before the open saw the regular file; the open meets the socket
            calls.append(p)
            return None if len(calls) == 1 else real(p)

        monkeypatch.setattr(guards, "file_reason", first_check_passes)
        with pytest.raises(ImageLoadError, match="not an image file: a socket"):
            load_image(path)


def test_manifest_row_naming_a_fifo_is_skipped(tmp_path, alarm):
    from featx.data.folders import discover

    root = write_image_folder(tmp_path / "m", splits=(), classes=("a", "b"), per_class=2)
    os.mkfifo(root / "a" / "pipe.png")
    rows = ["path,label", "a/pipe.png,a"] + [f"{c}/img_00{i}.png,{c}" for c in ("a", "b") for i in range(2)]
    (root / "list.csv").write_text("\n".join(rows) + "\n")
    ds = discover(None, manifest=root / "list.csv")
    assert len(ds) == 4 and "FIFO" in ds.skipped[0][1]


# --------------------------------------------------------------------------- 9. degenerate data


@pytest.mark.slow
def test_constant_features_give_a_report_with_a_note_not_a_crash(built, tmp_path):
    import subprocess
    import sys

    fc, _, _ = built
    path = _copy(fc, tmp_path)
    with h5py.File(path, "a") as f:
        for name in ("features", *[f"parts/{k}" for k in f.get("parts", {})]):
            f[name][...] = 1.0
        del f["checksums"]  # as a cache written before checksums (the values are what is degenerate here)
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(Path(featx.__file__).parents[1]))
    r = subprocess.run([sys.executable, "-m", "featx.cli", "probe", str(path), "--head", "logreg", "--view", "final",
                        "--out-dir", str(run)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert (run / "metrics.json").is_file()
    html = (run / "report.html").read_text(encoding="utf-8")
    section = html[html.find("<section id=\"map\">"):][:600]
    assert "No map" in section and "(nearly) all coincide" in section, section


# --------------------------------------------------------------------------- 4, 11 and the sidecar: saved heads


@pytest.fixture(scope="module")
def head(built):
    fc, root, tmp = built
    res = featx.probe(fc, head="knn", out_dir=tmp / "run", n_jobs=1, device="cpu", folds=2, plots=False)
    return Path(res["heads"]["knn"]["model_path"])


@pytest.mark.slow
def test_sidecar_cannot_choose_what_predict_builds_or_downloads(built, head, tmp_path, monkeypatch):
    import socket

    from featx.embedding import extractor
    from featx.runs.predict import predict

    fc, root, _ = built
    connects = []
    monkeypatch.setattr(socket.socket, "connect", lambda self, addr: connects.append(addr))
    monkeypatch.setattr(extractor, "create_backbone", lambda *a, **k: (_ for _ in ()).throw(AssertionError("built")))
    evil = _forge(head, tmp_path, backbone="timm:hf-hub:attacker/evil-model")
    with pytest.raises(FeatxError, match="not a backbone featx builds.*nothing was downloaded"):
        predict(evil, [str(root / "val")], out=tmp_path / "p.csv", cache_dir=tmp_path / "pc", progress=False,
                num_workers=0)
    other = _forge(head, tmp_path, backbone="resnet18")  # a real name, but not what the head was trained on
    with pytest.raises(FeatxError, match="was trained on 'tiny_cnn'"):
        predict(other, [str(root / "val")], out=tmp_path / "p.csv", cache_dir=tmp_path / "pc", progress=False,
                num_workers=0)
    assert not connects and not (tmp_path / "p.csv").exists()


def test_no_downloads_while_a_heads_backbone_is_built(monkeypatch):
    import torch.hub

    from featx.embedding.networks.head_guard import no_downloads

    with no_downloads():
        assert os.environ["HF_HUB_OFFLINE"] == "1"
        with pytest.raises(Exception, match="does not download"):
            torch.hub.download_url_to_file("https://example.invalid/w.pth", "/nonexistent")
    assert torch.hub.download_url_to_file.__name__ == "download_url_to_file"


@pytest.mark.parametrize("field,value", [("classes", 3), ("estimator_classes", ["0", "1"]), ("fingerprint_dict", [1]),
                                         ("view", 7), ("estimator_classes", [0, 99])])
def test_sidecar_fields_of_the_wrong_type_are_one_line_errors(built, head, tmp_path, field, value):
    fc, _, _ = built
    forged = _forge(head, tmp_path, **{field: value})
    r = CliRunner().invoke(cli, ["predict", "--head", str(forged), str(fc.path), "--out", str(tmp_path / "p.csv")])
    assert r.exit_code == 2 and (f"'{field}'" in r.output or "estimator_classes index" in r.output), r.output
    assert len(r.output.strip().splitlines()) == 1


# --------------------------------------------------------------------------- 6. config files


BILLION_LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(8)) + "probe:\n  head: *i\n"


@pytest.mark.parametrize("content,says", [
    (BILLION_LAUGHS.encode(), "aliases"),
    (b"probe: " + b"[" * 100000 + b"]" * 100000 + b"\n", "nested too deeply"),
    (b"probe:\n  head: caf\xe9\n", "not UTF-8"),
    (b"probe:\n  head: !!python/object/apply:os.system ['echo pwned']\n", "not valid YAML"),
    (b"probe:\n  head: [" + b"1, " * 5000 + b"1]\n", "is not a valid"),
])
@pytest.mark.slow
def test_hostile_config_files_are_one_line_errors(tmp_path, content, says):
    import time

    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(content)
    t0 = time.perf_counter()
    r = CliRunner().invoke(cli, ["--config", str(cfg), "config", "probe"])
    assert r.exit_code == 2 and says in r.output, r.output[-500:]
    assert len(r.output.strip().splitlines()) == 1 and len(r.output) < 600
    assert time.perf_counter() - t0 < 20  # no expansion: refused before anything grows


# --------------------------------------------------------------------------- NaN features reach no head


@pytest.mark.slow
def test_nan_features_are_named_and_never_reach_a_head(built, head, tmp_path, caplog):
    import csv

    fc, _, _ = built
    path = _copy(fc, tmp_path)
    with h5py.File(path, "a") as f:
        f["features"][0] = np.nan
        del f["checksums"]
    with caplog.at_level("WARNING", logger="featx.heads.tuning.rows"):
        featx.probe(str(path), head="knn", out_dir=tmp_path / "o", n_jobs=1, device="cpu", plots=False, save=False)
    assert "cache rows 0" in caplog.text
    out = tmp_path / "p.csv"  # last: the CLI reconfigures logging
    r = CliRunner().invoke(cli, ["predict", "--head", str(head), str(path), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "NaN/inf features: not predicted" in r.output and fc.keys()[0] in r.output
    assert len(list(csv.DictReader(out.open()))) == len(fc) - 1


# --------------------------------------------------------------------------- 2. the data root rule


def _flip_labels(path: Path) -> None:
    """Evaluation labels moved to the next class: every evaluation image is a mistake (and gets a thumbnail)."""
    with h5py.File(path, "a") as f:
        y, val = f["labels"][()], f["split"][()] == 1
        y[val] = (y[val] + 1) % len(f["classes"])
        f["labels"][...] = y


@pytest.mark.slow
def test_a_cache_cannot_make_the_report_read_files_outside_a_root_given_here(built, tmp_path, monkeypatch):
    from PIL import Image

    fc, root, _ = built
    private = tmp_path / "private" / "secret.png"
    private.parent.mkdir()
    Image.new("RGB", (40, 30), (255, 0, 0)).save(private)
    (tmp_path / "mine").mkdir()
    legit = _copy(fc, tmp_path / "mine")
    _flip_labels(legit)
    res = featx.probe(str(legit), head="knn", out_dir=tmp_path / "run2", n_jobs=1, device="cpu", folds=2, plots=False,
                      report=True)
    assert "data:image/jpeg" in Path(res["report_path"]).read_text(encoding="utf-8")
    # A stranger's cache: root "/" and evaluation paths that are private files of this machine.
    path = _copy(fc, tmp_path)
    _flip_labels(path)
    with h5py.File(path, "a") as f:
        f.attrs["root"] = "/"
        keys = np.empty(f["paths"].shape[0], dtype=object)
        for i in range(len(keys)):
            keys[i] = np.frombuffer(os.fsencode(str(private.relative_to("/"))), np.uint8)
        del f["paths"]
        f.create_dataset("paths", data=keys, dtype=h5py.vlen_dtype(np.dtype("uint8")))
    run = tmp_path / "run"
    res = featx.probe(str(path), head="knn", out_dir=run, n_jobs=1, device="cpu", folds=2, plots=False, report=True)
    html = Path(res["report_path"]).read_text(encoding="utf-8")
    assert "data:image/jpeg" not in html and not list((run / "thumbs").glob("*.jpg"))
    from featx.cache.trust.roots import sign_root

    assert fc.meta["root_mac"] == sign_root(fc.root, fc.fingerprint)
    # Another user's key (or an edited root) does not verify.
    monkeypatch.setenv("FEATX_KEY_FILE", str(tmp_path / "other.key"))
    assert sign_root(fc.root, fc.fingerprint) != fc.meta["root_mac"]


# --------------------------------------------------------------------------- 10. terminal escapes


def test_control_characters_from_files_are_escaped_in_everything_printed(built, tmp_path):
    fc, root, _ = built
    evil = "evil\x1b]0;pwned\x07\x1b[2J\r\u202e.png"
    (root.parent / "bad").mkdir(exist_ok=True)
    data = write_image_folder(tmp_path / "data", classes=("cats", "dogs\x1b[31m"), per_class=3)
    (data / "train" / "cats" / evil).write_bytes(b"not an image")
    fc2 = tiny_embed(data, tmp_path / "cache")
    with h5py.File(fc2.path, "a") as f:
        f.attrs["preprocess"] = "resize\x1b]0;title\x07"
    r = CliRunner().invoke(cli, ["info", "--failed", str(fc2.path)])
    assert r.exit_code == 0, r.output
    for raw in ("\x1b", "\x07", "\r", "\u202e"):
        assert raw not in r.output, repr(r.output)
    # (off a terminal click drops plain colour/clear sequences itself; what remains is escaped)
    assert "evil\\x1b]0;pwned\\x07" in r.output and "\\x0d\\u202e.png" in r.output
    assert "resize\\x1b]0;title\\x07" in r.output
    # Error messages and log lines too.
    r = CliRunner().invoke(cli, ["info", str(tmp_path / "no\x1b[2Jcache.h5")])
    assert r.exit_code == 2 and "\x1b" not in r.output and "no\\x1b[2Jcache.h5" in r.output


def test_log_lines_escape_control_characters():
    import logging

    from featx.base.text import EscapingFormatter, escape_controls

    rec = logging.LogRecord("featx", logging.WARNING, __file__, 1, "skipped %s", ("a\x1b[2Jb",), None)
    assert EscapingFormatter("%(message)s").format(rec) == "skipped a\\x1b[2Jb"
    assert escape_controls("a\x1b[31mb\tc\nd\x9b") == "a\\x1b[31mb\tc\nd\\x9b"


# --------------------------------------------------------------------------- one-line errors


def test_probe_out_dir_that_cannot_be_written_is_a_one_line_error(built, tmp_path):
    fc, _, _ = built
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    targets = [blocker / "run"] + ([Path("/proc/featx-out")] if Path("/proc/self").exists() else [])
    if os.geteuid() != 0:  # root writes into read-only folders anyway
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        targets.append(ro)
    for out in targets:
        r = CliRunner().invoke(cli, ["probe", str(fc.path), "--head", "knn", "--out-dir", str(out)])
        assert r.exit_code == 2 and "--out-dir" in r.output and "cannot write there" in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1


# --------------------------------------------------------------------------- the README's promises


SECURITY_TESTS = {
    "Caches": ["test_reader.py::test_cache_attributes_are_only_read_as_plain_values",
               "test_reader.py::test_cache_module_never_decodes_code",
               "test_hostile.py::test_cache_that_reads_other_files_is_refused_naming_the_dataset",
               "test_hostile.py::test_declared_shapes_must_be_backed_by_the_file",
               "test_hostile.py::test_attributes_are_checked_before_they_are_read",
               "test_hostile.py::test_inconsistent_row_datasets_are_one_line_errors",
               "test_hostile.py::test_chunk_file_that_reads_other_files_is_embedded_again",
               "test_hostile_inputs.py::test_a_shared_heap_bomb_in_a_dataset_is_refused_before_it_is_read",
               "test_hostile_inputs.py::test_verify_reads_everything_a_probe_reads_under_seeded_metadata_corruption"],
    "Only regular files": ["test_hostile_inputs.py::test_fifos_wherever_featx_opens_a_file_are_refused_never_opened"],
    "Tar and table sizes": [
        "test_hostile_inputs.py::test_a_huge_tar_extended_header_is_refused_unread_and_the_samples_before_it_kept",
        "test_hostile_inputs.py::test_tar_members_and_objects_above_the_image_bound_are_failed_never_read",
        "test_hostile_inputs.py::test_a_parquet_cell_above_the_image_bound_is_failed_and_the_good_rows_embed"],
    "Labels": ["test_hostile_inputs.py::test_a_classlabel_of_minus_one_is_an_unlabelled_row_left_out",
               "test_hostile_inputs.py::test_odd_webdataset_labels_are_class_names_or_one_line_refusals"],
    "Stopping": ["test_hostile_inputs.py::test_sigterm_to_the_process_group_during_embed_is_one_line_and_resumes"],
    "Damage": ["test_hostile.py::test_corrupted_finished_cache_is_reported_and_healed_by_a_rerun",
               "test_hostile_inputs.py::test_verify_reads_everything_a_probe_reads_under_seeded_metadata_corruption",
               "test_hostile.py::test_corrupted_chunk_is_embedded_again",
               "test_hostile.py::test_caches_without_checksums_open_and_verify_says_so",
               "test_hostile.py::test_nan_features_are_named_and_never_reach_a_head",
               "test_hostile_iii.py::test_export_leaves_out_nan_rows_of_a_damaged_cache_and_says_so"],
    "Heads saved as skops": ["test_persist.py::test_skops_file_naming_a_foreign_type_is_refused_naming_it",
                             "test_persist.py::test_allow_list_follows_types_not_names",
                             "test_persist.py::test_skops_zip_bomb_is_refused_before_unpacking",
                             "test_persist.py::test_types_skops_does_not_trust_stay_untrusted",
                             "test_skops_guard.py::test_skops_entries_shared_by_many_references_are_counted_each_time",
                             "test_hostile.py::test_sidecar_fields_of_the_wrong_type_are_one_line_errors",
                             "test_skops_guard.py::test_head_that_is_not_a_classifier_is_refused"],
    "A head never chooses a download": ["test_hostile.py::test_sidecar_cannot_choose_what_predict_builds_or_downloads",
                                        "test_hostile.py::test_no_downloads_while_a_heads_backbone_is_built"],
    "Reports": ["test_report_html.py::test_report_has_every_section_and_no_network_or_script",
                "test_report_html.py::test_class_names_are_escaped"],
    "Data root rule": ["test_hostile.py::test_a_cache_cannot_make_the_report_read_files_outside_a_root_given_here",
                       "test_hostile_iii.py::test_a_full_disk_while_the_key_is_made_leaves_no_empty_key",
                       "test_hostile_iii.py::test_a_planted_config_folder_or_key_of_another_user_is_not_used",
                       "test_hostile_iii.py::test_a_key_others_may_read_or_a_dangling_link_is_refused_without_a_traceback"],
    "Manifests in buckets": ["test_hostile_iii.py::test_a_manifest_in_a_bucket_reads_only_its_own_bucket",
                             "test_hostile_iii.py::test_a_file_url_row_naming_a_fifo_never_blocks"],
    "Streamed kNN heads": ["test_hostile_iii.py::test_a_streamed_knn_head_finds_its_cache_from_any_folder_and_needs_its_identity"],
    "Bounds": ["test_hostile_iii.py::test_a_malformed_cache_set_file_is_one_line",
               "test_hostile_inputs.py::test_a_brace_pattern_of_a_billion_names_is_refused_at_once",
               "test_hostile_iii.py::test_train_views_beyond_any_use_are_refused_before_any_work"],
    "CSV files": ["test_hostile_iii.py::test_csv_cells_that_would_run_as_formulas_are_written_as_text",
                  "test_hostile_iii.py::test_names_a_spreadsheet_would_run_never_reach_a_csv_as_formulas",
                  "test_hostile_iii.py::test_a_latin1_file_name_is_written_byte_for_byte"],
    "A full disk": ["test_hostile_iii.py::test_a_full_disk_during_the_audit_is_one_line_and_leaves_nothing",
                    "test_hostile_iii.py::test_a_full_disk_while_the_embedding_map_is_saved_leaves_no_temporary_file",
                    "test_hostile_iii.py::test_a_full_disk_while_the_key_is_made_leaves_no_empty_key"],
    "Data folders": ["test_hostile.py::test_tall_png_and_fifo_are_recorded_not_fatal",
                     "test_hostile.py::test_file_swapped_for_a_fifo_after_discovery_never_blocks_a_reader",
                     "test_hostile.py::test_manifest_row_naming_a_fifo_is_skipped"],
    "Config files": ["test_hostile.py::test_hostile_config_files_are_one_line_errors",
                     "test_hostile_iii.py::test_a_config_file_larger_than_any_config_is_refused_at_once"],
    "Terminal": ["test_hostile.py::test_control_characters_from_files_are_escaped_in_everything_printed",
                 "test_hostile.py::test_log_lines_escape_control_characters",
                 "test_hostile_iii.py::test_predict_on_a_folder_with_a_latin1_name_writes_its_csv",
                 "test_hostile_iii.py::test_matplotlib_never_writes_raw_control_characters_of_a_class_name"],
    "Not safe: joblib heads": ["test_persist.py::test_pickle_that_would_run_code_is_never_executed",
                               "test_persist.py::test_joblib_head_needs_trust_and_then_predicts_the_same"],
    "featx never writes into a data folder": ["test_folders.py::test_symlinks_out_of_the_data_folder_are_read_never_written",
                                              "test_folders.py::test_manifest_paths_outside_its_folder_are_logged"],
}


def test_readme_security_statements_each_have_tests():
    """Every statement of the README's Security section names the tests that keep it true, and they exist."""
    import re

    here = Path(__file__).parent
    readme = (here.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Security\n", 1)[1].split("\n## ", 1)[0]
    bullets = re.findall(r"^- \*\*(.+?)\*\*", section, flags=re.M)
    assert bullets and {b.split(" (")[0] for b in bullets} | {"Not safe: joblib heads", "featx never writes into a data folder"} \
        == set(SECURITY_TESTS), bullets
    assert "Not safe: joblib heads" in section and "featx never writes into a data folder" in section
    for statement, tests in SECURITY_TESTS.items():
        for t in tests:
            file, name = t.split("::")
            assert f"def {name}(" in (here / file).read_text(encoding="utf-8"), (statement, t)
