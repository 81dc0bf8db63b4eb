"""Image decoding (data/images.py) seen through ``featx embed``: every kind of file a scraped folder holds is
embedded or recorded as failed with its path and reason, never a traceback.  CPU, ``tiny_cnn``, random weights."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featx.cache.store import FeatureCache

from conftest import TINY_CPU as TINY
from conftest import assert_clean_error, assert_ok, refuse_reading, rgb, run_cli

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
