"""Reliability: bad inputs, bad datasets, bad options, killed and interrupted runs,
concurrent runs and damaged files.  Every case ends in a correct result or a one-line
``error: ...`` that says what to fix, never a traceback, and finished work is never lost.

Fast cases only; ``scripts/fault_inject.py`` runs the 20+ random SIGKILL trials and the
100,000-file discovery timing.  Everything runs on the CPU with ``tiny_cnn`` and random weights.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import featx
import featx.base.io
from featx.cache.store import FeatureCache
from featx.data import discover

import conftest

# Pinned to the CPU: runs are compared with atol 1e-5, which bf16 autocast on CUDA would not meet.
TINY = [*conftest.TINY_CLI, "--device", "cpu"]
TINY_KW = dict(conftest.TINY_KW, batch_size=4, device="cpu")


# --------------------------------------------------------------------------- helpers


def rgb(seed: int, size: tuple[int, int] = (40, 30)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def small_dataset(root: Path, *, classes=("a", "b"), per_class: int = 12, val: int = 0, seed: int = 0) -> Path:
    for ci, c in enumerate(classes):
        for i in range(per_class):
            p = root / "train" / c / f"{i:03d}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            rgb(seed + 1000 * ci + i, (24, 20)).save(p)
        for i in range(val):
            p = root / "val" / c / f"{i:03d}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            rgb(seed + 5000 + 1000 * ci + i, (24, 20)).save(p)
    return root


def run_cli(*args, env: dict | None = None):
    """Invoke the CLI in-process; the root logger is restored afterwards (the CLI installs a handler)."""
    from featx.cli import cli

    root, flog = logging.getLogger(), logging.getLogger("featx")
    saved = (root.handlers[:], root.level, flog.level)
    try:
        return CliRunner().invoke(cli, [str(a) for a in args], env=env)
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        flog.setLevel(saved[2])


def assert_ok(res) -> None:
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "Traceback" not in res.output


def assert_clean_error(res, *needles: str) -> str:
    """Exit 2, no traceback, one ``error:`` line containing every needle; returns that line."""
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        import traceback

        pytest.fail("uncaught exception:\n" + "".join(traceback.format_exception(res.exception)))
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, res.output
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    return lines[0]


def assert_same_cache(a: Path, b: Path) -> None:
    """Same rows in the same order, same labels/splits/classes/failures, features within 1e-5."""
    fa, fb = FeatureCache(a), FeatureCache(b)
    assert fa.keys() == fb.keys()
    assert fa.classes == fb.classes
    assert (fa.labels() == fb.labels()).all()
    assert (fa.split_array() == fb.split_array()).all()
    assert fa.failed == fb.failed
    assert fa.fingerprint == fb.fingerprint
    np.testing.assert_allclose(fa.features(), fb.features(), atol=1e-5)


def no_leftovers(cache: Path) -> None:
    assert cache.is_file()
    assert not Path(str(cache) + ".parts").exists()
    assert not list(cache.parent.glob("*.tmp")), list(cache.parent.glob("*.tmp"))


def embed_cmd(data: Path, cache: Path, *extra: str, chunk: int = 4, batch: int = 2) -> list[str]:
    return [sys.executable, "-m", "featx.cli", "embed", str(data), "--cache", str(cache), *TINY,
            "--batch-size", str(batch), "--chunk-size", str(chunk), "--quiet", *extra]


def parts_chunks(cache: Path) -> list[Path]:
    return sorted(Path(str(cache) + ".parts").glob("chunk-*.h5"))


def wait_for(cond, timeout: float = 120, what: str = "condition") -> None:
    deadline = time.time() + timeout
    while not cond():
        if time.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def clean_reference(data: Path, tmp_path: Path, name: str = "clean.h5") -> Path:
    out = tmp_path / name
    featx.embed(data, cache=out, **TINY_KW)
    return out


# --------------------------------------------------------------------------- bad inputs

EXPECTED_BAD = {  # file -> substring of the recorded reason
    "train/bad/truncated.jpg": "truncated image",
    "train/bad/zero.jpg": "empty file (0 bytes)",
    "train/bad/page.jpg": "not an image Pillow can decode",
    "train/bad/bomb.png": "decompression-bomb limit",
    "train/bad/locked.jpg": "permission denied",
    "train/bad/broken_link.jpg": "broken symlink",
    "train/bad/loop_a.jpg": "symlink loop",
    "train/bad/loop_b.jpg": "symlink loop",
}


def make_bad_input_folder(root: Path) -> tuple[list[str], Path]:
    """Every kind of file a scraped folder holds; returns (keys that must embed, the unreadable file)."""
    good, bad = root / "train" / "good", root / "train" / "bad"
    good.mkdir(parents=True)
    bad.mkdir(parents=True)
    ok: list[str] = []

    def keep(p: Path) -> None:
        ok.append(p.relative_to(root).as_posix())

    rgb(1).convert("CMYK").save(good / "cmyk.jpg")
    keep(good / "cmyk.jpg")
    Image.fromarray((np.arange(1200).reshape(30, 40) * 50).astype(np.uint16)).save(good / "gray16.png")
    keep(good / "gray16.png")
    rgb(2).convert("L").save(good / "gray8.png")
    keep(good / "gray8.png")
    rgb(3).convert("P", palette=Image.Palette.ADAPTIVE).save(good / "palette_t.png", transparency=0)
    keep(good / "palette_t.png")
    frames = [rgb(10 + i) for i in range(3)]
    frames[0].save(good / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    keep(good / "anim.gif")
    raw = rgb(4, (40, 20))
    ex = raw.getexif()
    ex[0x0112] = 6
    raw.save(good / "exif6.png", exif=ex)  # PNG: lossless, so the rotation check below is exact
    keep(good / "exif6.png")
    raw.transpose(Image.Transpose.ROTATE_270).save(good / "exif6_rotated_by_hand.png")
    keep(good / "exif6_rotated_by_hand.png")
    raw.save(good / "exif6_ignored.png")
    keep(good / "exif6_ignored.png")
    rgb(5).save(good / "with space.jpg")
    keep(good / "with space.jpg")
    latin1 = os.fsencode(good) + b"/caf\xe9.jpg"  # not valid UTF-8
    rgb(6).save(latin1, format="JPEG")
    ok.append(os.fsdecode(os.fsencode("train/good/") + b"caf\xe9.jpg"))
    latin1_class = os.fsencode(root / "train") + b"/na\xefve"  # a class folder named in Latin-1
    os.mkdir(latin1_class)
    rgb(13).save(latin1_class + b"/x.png", format="PNG")
    ok.append(os.fsdecode(b"train/na\xefve/x.png"))
    for ext, fmt in (("JPG", "JPEG"), ("Jpeg", "JPEG"), ("PNG", "PNG"), ("bmp", "BMP"), ("WEBP", "WEBP"),
                     ("tif", "TIFF"), ("TIFF", "TIFF"), ("gif", "GIF")):
        rgb(7).save(good / f"ext_{ext}.{ext}", format=fmt)
        keep(good / f"ext_{ext}.{ext}")
    # never images: ignored silently
    (good / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (good / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (good / "notes.txt").write_text("not an image")
    rgb(8).save(good / ".hidden.jpg")
    # bad ones: each must be reported with its path and reason
    buf = io.BytesIO()
    rgb(9, (300, 300)).save(buf, "JPEG")
    (bad / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (bad / "zero.jpg").write_bytes(b"")
    (bad / "page.jpg").write_text("<!DOCTYPE html><html><body>403 Forbidden</body></html>")
    w = 20000
    Image.new("1", (w, int(Image.MAX_IMAGE_PIXELS * 1.05) // w + 1)).save(bad / "bomb.png")
    rgb(11).save(bad / "locked.jpg")
    (bad / "locked.jpg").chmod(0)
    os.symlink(bad / "deleted-target.jpg", bad / "broken_link.jpg")
    os.symlink("loop_b.jpg", bad / "loop_a.jpg")
    os.symlink("loop_a.jpg", bad / "loop_b.jpg")
    p = root / "val" / "good" / "v.png"
    p.parent.mkdir(parents=True)
    rgb(12).save(p)
    keep(p)
    return ok, bad / "locked.jpg"


def refuse_reading(monkeypatch, path: Path) -> None:
    """Make Pillow refuse ``path`` as a permission error (root would read a chmod-000 file)."""
    real_open = Image.open

    def guarded(fp, *a, **k):
        name = getattr(fp, "name", fp)  # featx opens the file itself and hands Pillow the file object
        if isinstance(name, (str, bytes, os.PathLike)) and os.fsdecode(name) == str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(fp, *a, **k)

    monkeypatch.setattr(Image, "open", guarded)


@pytest.mark.slow
def test_bad_inputs_are_reported_and_good_ones_all_embedded(tmp_path: Path, monkeypatch) -> None:
    data = tmp_path / "scraped"
    ok, locked = make_bad_input_folder(data)
    if os.geteuid() == 0:  # root reads chmod-000 files; simulate the refusal for that one file
        refuse_reading(monkeypatch, locked)
    cache = tmp_path / "c.h5"
    res = run_cli("embed", data, "--cache", cache, *TINY, "--batch-size", "4", "--chunk-size", "8", "-q")
    assert_ok(res)
    fc = FeatureCache(cache)
    assert sorted(fc.keys()) == sorted(ok)  # every good file, nothing hidden or non-image
    assert fc.classes == ["bad", "good", "na\\xefve"]  # undecodable bytes shown, not fatal
    failed = dict(fc.failed)
    assert set(failed) == set(EXPECTED_BAD)
    for key, why in EXPECTED_BAD.items():
        assert why in failed[key], (key, failed[key])
        assert f"failed: {key}: {failed[key]}" in res.output  # path and reason shown to the user
        failed[key].encode("utf-8")
    # EXIF orientation is applied: same features as the image rotated by hand, not as the raw one.
    keys = fc.keys()
    X = fc.features()
    row = {k: X[i] for i, k in enumerate(keys)}
    np.testing.assert_allclose(row["train/good/exif6.png"], row["train/good/exif6_rotated_by_hand.png"], atol=1e-5)
    assert not np.allclose(row["train/good/exif6.png"], row["train/good/exif6_ignored.png"], atol=1e-3)
    # `featx info --failed` lists every bad file; --strict turns failures into an error (cache kept).
    info = run_cli("info", cache, "--failed")
    assert_ok(info)
    for key in EXPECTED_BAD:
        assert f"failed: {key}: " in info.output
    strict = run_cli("embed", data, "--cache", cache, *TINY, "--strict", "-q")
    assert_clean_error(strict, "--strict", f"{len(EXPECTED_BAD)} image(s)")
    assert "nothing to embed" in strict.output  # failures are remembered, not retried every run
    # Fixing a bad file is noticed: it is embedded on the next run and leaves the failed list.
    rgb(20).save(data / "train" / "bad" / "zero.jpg")
    res = run_cli("embed", data, "--cache", cache, *TINY, "-q", "--json")
    assert_ok(res)
    run = json.loads(res.output[res.output.index("{"):])["run"]
    assert run["embedded"] == 1 and run["failed_new"] == 0
    fc = FeatureCache(cache)
    assert "train/bad/zero.jpg" in fc.keys() and "train/bad/zero.jpg" not in dict(fc.failed)


@pytest.mark.slow
def test_fixing_permissions_of_a_failed_file_is_noticed(tmp_path: Path, monkeypatch) -> None:
    data = small_dataset(tmp_path / "d", per_class=3)
    locked = data / "train" / "a" / "001.png"
    refuse_reading(monkeypatch, locked)
    cache = tmp_path / "c.h5"
    assert_ok(run_cli("embed", data, "--cache", cache, *TINY, "-q"))
    assert dict(FeatureCache(cache).failed) == {"train/a/001.png": "permission denied (cannot read the file)"}
    monkeypatch.undo()
    os.chmod(locked, 0o600)  # what the user does to fix it: ctime changes, mtime and size do not
    assert_ok(run_cli("embed", data, "--cache", cache, *TINY, "-q"))
    assert "train/a/001.png" in FeatureCache(cache).keys()


# --------------------------------------------------------------------------- bad datasets


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


def _only_val(root: Path) -> Path:
    small_dataset(root, per_class=3)
    (root / "train").rename(root / "val")
    return root


def _singles(root: Path) -> Path:
    return small_dataset(root, classes=("a", "b", "c"), per_class=1)


def _one_single(root: Path) -> Path:
    small_dataset(root, classes=("a", "b"), per_class=6)
    (root / "train" / "lonely").mkdir()
    rgb(5).save(root / "train" / "lonely" / "x.png")
    return root


def _ghost_val(root: Path) -> Path:
    small_dataset(root, classes=("a", "b"), per_class=6, val=2)
    (root / "val" / "ghost").mkdir()
    rgb(6).save(root / "val" / "ghost" / "x.png")
    return root


@pytest.mark.parametrize(
    "make, error",
    [
        (lambda r: small_dataset(r, classes=("only",), per_class=6), "needs at least 2"),
        (_singles, "every class has a single training image"),
        (_only_val, "no 'train' split"),
        (_one_single, None),
        (_ghost_val, None),
    ],
    ids=["one-class", "one-image-per-class", "no-train-split", "class-with-one-image", "val-class-not-in-train"],
)
@pytest.mark.slow
def test_bad_datasets_end_to_end_through_the_probe(tmp_path: Path, make, error: str | None) -> None:
    """Embedding always works; the probe either trains or says what to add."""
    data = make(tmp_path / "d")
    cache = tmp_path / "c.h5"
    assert_ok(run_cli("embed", data, "--cache", cache, *TINY, "-q"))
    res = run_cli("probe", cache, "--head", "logreg", "--n-jobs", "1", "--out-dir", tmp_path / "out")
    if error:
        assert_clean_error(res, error)
    else:
        assert_ok(res)
        assert (tmp_path / "out" / "metrics.json").is_file()


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


# --------------------------------------------------------------------------- bad options


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return small_dataset(tmp_path_factory.mktemp("opts") / "d", per_class=3)


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--backbone", "efficientnet_lite"], ["unknown backbone 'efficientnet_lite'", "Did you mean efficientnet_lite0",
                                               "tiny_cnn", "resnet50"]),
        (["--backbone", "resnet5"], ["Did you mean resnet50"]),
        (["--batch-size", "0"], ["--batch-size must be a positive integer, got 0"]),
        (["--chunk-size", "-3"], ["--chunk-size must be a positive integer"]),
        (["--workers", "-1"], ["--workers must be >= 0"]),
        (["--limit", "0"], ["--limit must be a positive integer"]),
        (["--device", "tpu"], ["--device 'tpu'", "auto, cpu, cuda"]),
        (["--weights", "/nonexistent/w.pth"], ["--weights", "file not found"]),
    ],
    ids=["unknown-backbone", "close-match", "batch-size-0", "chunk-size", "workers", "limit", "device", "weights"],
)
def test_bad_embed_options(tiny_data: Path, tmp_path: Path, args: list[str], needles: list[str]) -> None:
    res = run_cli("embed", tiny_data, "--cache-dir", tmp_path, *conftest.TINY_CLI, *args)
    assert_clean_error(res, *needles)
    assert not list(tmp_path.glob("*.h5"))


def test_cuda_requested_where_there_is_none(tiny_data: Path, tmp_path: Path, monkeypatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    res = run_cli("embed", tiny_data, "--cache-dir", tmp_path, *TINY, "--device", "cuda")
    assert_clean_error(res, "CUDA is not available", "--device cpu")
    res = run_cli("embed", tiny_data, "--cache-dir", tmp_path, *TINY, "--engine", "gpu", "--device", "cpu")
    assert_clean_error(res, "--engine gpu needs CUDA")


@pytest.mark.skipif(not (sys.platform.startswith("linux") and os.path.isdir("/sys/kernel")), reason="needs Linux /proc, /sys")
@pytest.mark.parametrize("where", [["--cache-dir", "/proc/featx-cache"], ["--cache", "/sys/featx-test.h5"]],
                         ids=["cache-dir-cannot-be-created", "cache-not-writable"])
def test_unwritable_cache_location_is_a_clear_error(tiny_data: Path, where: list[str]) -> None:
    # /proc and /sys refuse new files even to root, unlike a chmod-ed folder.
    assert_clean_error(run_cli("embed", tiny_data, *where, *TINY, "-q"), where[0])


def test_nonexistent_paths(tmp_path: Path) -> None:
    assert_clean_error(run_cli("embed", tmp_path / "nope", "--cache-dir", tmp_path, *TINY), "does not exist")
    assert_clean_error(run_cli("embed", "--manifest", tmp_path / "nope.csv", "--cache-dir", tmp_path, *TINY),
                       "does not exist", "path,label")
    assert_clean_error(run_cli("info", tmp_path / "nope.h5"), "does not exist", "featx embed")
    assert_clean_error(run_cli("info", "--cache-dir", tmp_path / "empty"), "no cache in")


@pytest.mark.parametrize(
    "text, needles",
    [
        ("embed:\n  batchsize: 8\n", ["unknown key embed.batchsize", "batch_size"]),
        ("embed:\n  batch_size: lots\n", ["embed.batch_size", "lots"]),
        ("embed:\n  dtype: float64\n", ["embed.dtype"]),
        ("embedd:\n  batch_size: 8\n", ["unknown section 'embedd'", "embed"]),
        ("embed: [1, 2]\n", ["section 'embed' must be a mapping"]),
        ("embed:\n  batch_size: 8\n bad indent: [\n", ["not valid YAML"]),
    ],
    ids=["unknown-key", "wrong-type", "bad-choice", "unknown-section", "not-a-mapping", "bad-yaml"],
)
def test_bad_config_files(tiny_data: Path, tmp_path: Path, text: str, needles: list[str]) -> None:
    cfg = tmp_path / "my.yaml"
    cfg.write_text(text)
    res = run_cli("--config", cfg, "embed", tiny_data, "--cache-dir", tmp_path, *TINY)
    line = assert_clean_error(res, *needles)
    assert "my.yaml" in line  # names the file to fix
    assert_clean_error(run_cli("--config", tmp_path / "missing.yaml", "info"), "missing.yaml")


# --------------------------------------------------------------------------- killed and interrupted runs


@pytest.fixture(scope="module")
def kill_data(tmp_path_factory) -> tuple[Path, Path]:
    """A 28-image dataset with two bad files and its uninterrupted reference cache."""
    base = tmp_path_factory.mktemp("kill")
    data = small_dataset(base / "d", per_class=10, val=2)
    (data / "train" / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    (data / "train" / "b" / "empty.png").write_bytes(b"")
    return data, clean_reference(data, base)


def committed_rows(cache: Path) -> int:
    """Images (embedded or failed) in the committed chunk files of ``cache``'s .parts folder."""
    n = 0
    for cf in parts_chunks(cache):
        with h5py.File(cf, "r") as f:
            n += len(f["paths"]) + len(f["failed_paths"])
    return n


@pytest.mark.parametrize("when", ["before-first-chunk", "twice"])  # more in scripts/fault_inject.py
@pytest.mark.slow
def test_sigkill_then_rerun_gives_the_identical_cache(kill_data, tmp_path: Path, when: str) -> None:
    data, clean = kill_data
    cache = tmp_path / "k.h5"
    env = conftest.fault_env(FEATX_TEST_CHUNK_DELAY="0.15")
    kills = 2 if when == "twice" else 1
    for k in range(kills):
        proc = subprocess.Popen(embed_cmd(data, cache), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        if when == "before-first-chunk":
            # Killed once the run has planned and opened its work folder, while it embeds.
            meta = Path(str(cache) + ".parts") / "meta.json"
            wait_for(lambda: meta.exists() or proc.poll() is not None, what="the work folder")  # noqa: B023 - called within the iteration
        else:
            n = len(parts_chunks(cache))
            wait_for(lambda: len(parts_chunks(cache)) > n or proc.poll() is not None, what="a committed chunk")  # noqa: B023 - called within the iteration
            time.sleep(0.05 + 0.1 * k)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert not cache.exists(), "killed before the final write: no finished cache"
        assert Path(str(cache) + ".lock").exists() and (Path(str(cache) + ".parts") / "meta.json").exists()
    committed = committed_rows(cache)
    assert committed < len(FeatureCache(clean)) + len(FeatureCache(clean).failed)
    done = subprocess.run(embed_cmd(data, cache, "--json"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    run = json.loads(done.stdout)["run"]
    # Exactly what was committed before the kill is reused; everything else is embedded now.
    assert run["reused"] == committed
    assert run["embedded"] + run["failed_new"] == run["total"] - committed
    assert_same_cache(cache, clean)
    no_leftovers(cache)


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_says_how_to_resume(kill_data, tmp_path: Path) -> None:
    data, clean = kill_data
    cache = tmp_path / "i.h5"
    env = conftest.fault_env(FEATX_TEST_CHUNK_DELAY="0.3")
    # Two DataLoader workers, and SIGINT to the whole process group, as a terminal's Ctrl-C does.
    proc = subprocess.Popen(embed_cmd(data, cache, "--workers", "2"), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # live even under nohup
    wait_for(lambda: len(parts_chunks(cache)) >= 1 or proc.poll() is not None, what="a committed chunk")
    assert proc.poll() is None, "run ended before it could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert "interrupted" in err and "rerun the same command to resume" in err
    assert not cache.exists() and parts_chunks(cache), "committed chunks are kept"
    n_parts = len(parts_chunks(cache))
    done = subprocess.run(embed_cmd(data, cache, "--json"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    run = json.loads(done.stdout)["run"]
    assert run["reused"] >= 2 * n_parts  # batch 2 per chunk at least: the interrupted work was reused
    assert_same_cache(cache, clean)
    no_leftovers(cache)


@pytest.mark.slow
def test_sigterm_stops_cleanly_and_says_how_to_resume(kill_data, tmp_path: Path) -> None:
    data, clean = kill_data
    cache = tmp_path / "t.h5"
    env = conftest.fault_env(FEATX_TEST_CHUNK_DELAY="0.3")
    proc = subprocess.Popen(embed_cmd(data, cache), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: len(parts_chunks(cache)) >= 1 or proc.poll() is not None, what="a committed chunk")
    assert proc.poll() is None, "run ended before it could be terminated"
    proc.terminate()  # SIGTERM, as `kill` and job schedulers send
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "Traceback" not in err and "terminated (SIGTERM)" in err and "rerun the same command to resume" in err
    assert not cache.exists() and parts_chunks(cache), "committed chunks are kept"
    done = subprocess.run(embed_cmd(data, cache), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert_same_cache(cache, clean)
    no_leftovers(cache)


def _parts_only(data: Path, cache: Path, monkeypatch) -> None:
    """Leave ``cache`` as a run killed right before its final write: all chunks, no final file."""
    import featx.cache.parts as fcache  # chunk files and the finished cache both commit through it

    real = fcache.atomic_commit

    def fail_final(tmp, final):
        if Path(final) == cache:
            raise KeyboardInterrupt  # stands in for the kill
        return real(tmp, final)

    monkeypatch.setattr(fcache, "atomic_commit", fail_final)
    with pytest.raises(KeyboardInterrupt):
        featx.embed(data, cache=cache, chunk_size=4, **TINY_KW)
    monkeypatch.setattr(fcache, "atomic_commit", real)
    assert not cache.exists() and parts_chunks(cache)


@pytest.mark.slow
def test_kill_during_final_write_leaves_a_partial_tmp_that_is_ignored(kill_data, tmp_path: Path, monkeypatch) -> None:
    data, clean = kill_data
    cache = tmp_path / "f.h5"
    _parts_only(data, cache, monkeypatch)
    Path(str(cache) + ".tmp").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)  # half-written final file
    assert_ok(run_cli("embed", data, "--cache", cache, *TINY, "-q"))
    assert_same_cache(cache, clean)
    no_leftovers(cache)


@pytest.mark.slow
def test_kill_between_final_rename_and_parts_removal(kill_data, tmp_path: Path, monkeypatch) -> None:
    data, clean = kill_data
    cache = tmp_path / "r.h5"
    _parts_only(data, cache, monkeypatch)
    saved = tmp_path / "parts-copy"
    shutil.copytree(str(cache) + ".parts", saved)
    assert_ok(run_cli("embed", data, "--cache", cache, *TINY, "-q"))
    shutil.copytree(saved, str(cache) + ".parts")  # both the final file and the parts exist
    res = run_cli("embed", data, "--cache", cache, *TINY, "-q", "--json")
    assert_ok(res)
    assert json.loads(res.output[res.output.index("{"):])["run"]["embedded"] == 0
    assert_same_cache(cache, clean)
    no_leftovers(cache)


# --------------------------------------------------------------------------- concurrent runs


@pytest.mark.slow
def test_concurrent_writers_wait_or_fail_fast_and_readers_keep_reading(tmp_path: Path) -> None:
    data = small_dataset(tmp_path / "d", per_class=4)
    other = tmp_path / "other.h5"  # a complete cache of another dataset, read during the run
    featx.embed(small_dataset(tmp_path / "o", per_class=6, val=2, seed=7), cache=other, **TINY_KW)
    cache = tmp_path / "shared.h5"
    featx.embed(data, cache=cache, **TINY_KW)  # version 1: 8 images
    for c in ("a", "b"):
        for i in range(4, 10):
            rgb(300 + i + (50 if c == "b" else 0), (24, 20)).save(data / "train" / c / f"{i:03d}.png")
    env = conftest.fault_env(FEATX_TEST_CHUNK_DELAY="0.2")
    a = subprocess.Popen(embed_cmd(data, cache), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    waiter_err = tmp_path / "waiter.err"
    waiter = None
    try:
        wait_for(lambda: len(parts_chunks(cache)) >= 1 or a.poll() is not None, what="the first writer's chunk")
        assert a.poll() is None
        a.send_signal(signal.SIGSTOP)  # freeze the first writer mid-run, holding the lock
        fast = subprocess.run(embed_cmd(data, cache, "--no-wait"), capture_output=True, text=True, timeout=120)
        assert fast.returncode == 2, fast.stderr
        assert "Traceback" not in fast.stderr
        assert "another featx process is writing" in fast.stderr and "--no-wait" in fast.stderr
        with open(waiter_err, "w") as fh:
            waiter = subprocess.Popen(embed_cmd(data, cache, "--json"), stdout=subprocess.PIPE, stderr=fh, text=True)
        wait_for(lambda: "waiting" in waiter_err.read_text() or waiter.poll() is not None, what="the second writer")
        assert waiter.poll() is None, waiter_err.read_text()
        # Readers: another complete cache, and the previous complete version of the one being rebuilt.
        res = run_cli("info", other)
        assert_ok(res)
        assert "rows       16 " in res.output
        assert FeatureCache(other).features().shape == (16, 32)
        res = run_cli("probe", other, "--head", "knn", "--n-jobs", "1", "--out-dir", tmp_path / "probe-out")
        assert_ok(res)
        assert (tmp_path / "probe-out" / "metrics.json").is_file()
        res = run_cli("info", cache)
        assert_ok(res)
        assert "rows       8 " in res.output
    finally:
        a.send_signal(signal.SIGCONT)
    assert a.wait(timeout=300) == 0
    out, _ = waiter.communicate(timeout=300)
    assert waiter.returncode == 0, waiter_err.read_text()
    assert json.loads(out)["run"]["embedded"] == 0  # it found the work done by the first writer
    assert_same_cache(cache, clean_reference(data, tmp_path))
    no_leftovers(cache)


# --------------------------------------------------------------------------- damaged files


@pytest.fixture
def built(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(data, cache, pristine copy of the cache)."""
    data = small_dataset(tmp_path / "d", per_class=4, val=1)
    cache = tmp_path / "c.h5"
    featx.embed(data, cache=cache, **TINY_KW)
    pristine = tmp_path / "pristine.h5"
    shutil.copy(cache, pristine)
    return data, cache, pristine


def _garbage(cache: Path) -> None:
    cache.write_bytes(os.urandom(4096))


def _truncated(cache: Path) -> None:
    with open(cache, "r+b") as fh:
        fh.truncate(cache.stat().st_size // 2)


def _zeroed_tail(cache: Path) -> None:
    with open(cache, "r+b") as fh:
        fh.seek(cache.stat().st_size // 3)
        fh.write(b"\0" * (cache.stat().st_size // 3))


def _old_layout(cache: Path) -> None:
    with h5py.File(cache, "r+") as f:
        f.attrs["featx_cache_layout"] = 0


def _not_featx(cache: Path) -> None:
    cache.unlink()
    with h5py.File(cache, "w") as f:
        f.create_dataset("x", data=np.arange(3))


@pytest.mark.parametrize(
    "damage",
    [_garbage, _truncated, _zeroed_tail, _old_layout, _not_featx],
    ids=["garbage", "truncated", "zeroed-middle", "older-layout", "other-hdf5"],
)
@pytest.mark.slow
def test_damaged_cache_is_detected_and_overwrite_rebuilds(built, damage) -> None:
    data, cache, pristine = built
    damage(cache)
    res = run_cli("embed", data, "--cache", cache, *TINY, "-q")
    assert_clean_error(res, str(cache), "--overwrite")
    assert_clean_error(run_cli("info", cache), "--overwrite")
    res = run_cli("embed", data, "--cache", cache, *TINY, "-q", "--overwrite")
    assert_ok(res)
    assert_same_cache(cache, pristine)
    no_leftovers(cache)


def _drop_dataset(cache: Path) -> None:
    with h5py.File(cache, "r+") as f:
        del f["paths"]


def _drop_failed_group(cache: Path) -> None:
    with h5py.File(cache, "r+") as f:
        del f["failed"]


@pytest.mark.parametrize("damage", [_drop_dataset, _drop_failed_group], ids=["missing-paths", "missing-failed"])
@pytest.mark.slow
def test_partly_damaged_cache_is_detected(built, damage) -> None:
    data, cache, pristine = built
    damage(cache)
    assert_clean_error(run_cli("embed", data, "--cache", cache, *TINY, "-q"), "--overwrite")
    assert_clean_error(run_cli("info", cache), "--overwrite")
    assert_ok(run_cli("embed", data, "--cache", cache, *TINY, "-q", "--overwrite"))
    assert_same_cache(cache, pristine)


@pytest.mark.slow
def test_damaged_chunk_file_is_set_aside_and_redone(kill_data, tmp_path: Path, monkeypatch) -> None:
    data, clean = kill_data
    cache = tmp_path / "p.h5"
    _parts_only(data, cache, monkeypatch)
    chunks = parts_chunks(cache)
    chunks[1].write_bytes(b"garbage" * 10)
    res = run_cli("embed", data, "--cache", cache, *TINY, "--json")
    assert_ok(res)
    assert "unreadable" in res.output
    run = json.loads(res.output[res.output.index("{"):res.output.rindex("}") + 1])["run"]
    assert 0 < run["embedded"] + run["failed_new"] <= 8 and run["reused"] > 0
    assert_same_cache(cache, clean)
    no_leftovers(cache)


@pytest.mark.slow
def test_damaged_parts_metadata_is_a_clear_error(kill_data, tmp_path: Path, monkeypatch) -> None:
    data, clean = kill_data
    cache = tmp_path / "m.h5"
    _parts_only(data, cache, monkeypatch)
    (Path(str(cache) + ".parts") / "meta.json").write_text("{not json")
    assert_clean_error(run_cli("embed", data, "--cache", cache, *TINY, "-q"), "--overwrite")
    assert_ok(run_cli("embed", data, "--cache", cache, *TINY, "-q", "--overwrite"))
    assert_same_cache(cache, clean)


def _enospc_on(monkeypatch, nth_chunk: int | None = None, final: Path | None = None) -> None:
    import featx.cache.parts as fcache  # chunk files and the finished cache both commit through it

    real = fcache.atomic_commit
    count = {"chunks": 0}

    def commit(tmp, dest):
        if Path(dest).name.startswith("chunk-"):
            count["chunks"] += 1
            if count["chunks"] == nth_chunk:
                raise OSError(errno.ENOSPC, "No space left on device")
        if final is not None and Path(dest) == final:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tmp, dest)

    monkeypatch.setattr(fcache, "atomic_commit", commit)
    monkeypatch.setattr(featx.base.io, "atomic_commit", commit)  # chunk files are written as bytes through base.io


@pytest.mark.slow
def test_disk_full_while_committing_a_chunk(kill_data, tmp_path: Path, monkeypatch) -> None:
    data, clean = kill_data
    cache = tmp_path / "full.h5"
    _enospc_on(monkeypatch, nth_chunk=3)
    res = run_cli("embed", data, "--cache", cache, *TINY, "--batch-size", "2", "--chunk-size", "4", "-q")
    assert_clean_error(res, "No space left on device", "rerun the same command")
    monkeypatch.undo()
    assert len(parts_chunks(cache)) == 2 and not cache.exists()  # finished chunks are kept
    assert not list(Path(str(cache) + ".parts").glob(".*.tmp"))
    res = run_cli("embed", data, "--cache", cache, *TINY, "-q", "--json")
    assert_ok(res)
    assert json.loads(res.output[res.output.index("{"):])["run"]["reused"] == 8
    assert_same_cache(cache, clean)
    no_leftovers(cache)


@pytest.mark.slow
def test_disk_full_while_writing_the_final_file(kill_data, tmp_path: Path, monkeypatch) -> None:
    data, clean = kill_data
    cache = tmp_path / "full.h5"
    featx.embed(data, cache=cache, **TINY_KW)
    before = FeatureCache(cache).keys()
    rgb(77, (24, 20)).save(data.parent / "extra.png")
    extra = data / "train" / "a" / "zz_extra.png"
    shutil.copy(data.parent / "extra.png", extra)
    try:
        _enospc_on(monkeypatch, final=cache)
        res = run_cli("embed", data, "--cache", cache, *TINY, "-q")
        assert_clean_error(res, "No space left on device", ".parts", "rerun")
        monkeypatch.undo()
        assert FeatureCache(cache).keys() == before  # the previous complete version is untouched
        assert parts_chunks(cache) and not list(tmp_path.glob("*.tmp"))
        assert_ok(run_cli("embed", data, "--cache", cache, *TINY, "-q"))
        assert "train/a/zz_extra.png" in FeatureCache(cache).keys()
        no_leftovers(cache)
    finally:
        extra.unlink()


def test_disk_full_before_the_first_chunk(tiny_data: Path, tmp_path: Path, monkeypatch) -> None:
    import featx.cache.parts as fcache  # chunk files and the finished cache both commit through it

    real = fcache.atomic_commit

    def commit(tmp, dest):
        if Path(dest).name == "meta.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tmp, dest)

    monkeypatch.setattr(fcache, "atomic_commit", commit)
    res = run_cli("embed", tiny_data, "--cache", tmp_path / "c.h5", *TINY, "-q")
    assert_clean_error(res, "No space left on device")


def _run_with_file_size_limit(cmd: list[str], limit: int) -> subprocess.CompletedProcess:
    def limit_writes() -> None:  # the file system "fills up" at `limit` bytes per file
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, preexec_fn=limit_writes)


@pytest.fixture(scope="module")
def real_full_disk(kill_data, tmp_path_factory):
    """A real write failure inside HDF5 (EFBIG from RLIMIT_FSIZE) while the final file is written."""
    data, clean = kill_data
    base = tmp_path_factory.mktemp("efbig")
    cache = base / "c.h5"
    limit = int(clean.stat().st_size * 0.7)  # chunk files are small, the final file is not
    res = _run_with_file_size_limit(embed_cmd(data, cache, chunk=4, batch=2), limit)
    res.leftover_tmp = list(base.glob("*.tmp"))
    return data, clean, cache, res


@pytest.mark.slow
def test_real_write_failure_keeps_every_chunk(real_full_disk) -> None:
    data, clean, cache, res = real_full_disk
    assert res.returncode != 0 and not cache.exists()
    assert len(parts_chunks(cache)) >= 5, "all chunks were committed before the final write failed"
    done = subprocess.run(embed_cmd(data, cache, "--json"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["run"]["embedded"] == 0  # nothing had to be embedded again
    assert_same_cache(cache, clean)
    no_leftovers(cache)


@pytest.mark.slow
def test_real_write_failure_is_a_clear_error(real_full_disk) -> None:
    data, clean, cache, res = real_full_disk
    assert "Traceback" not in res.stderr
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith("error: could not write")
    assert not res.leftover_tmp
