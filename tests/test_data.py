"""Discovery (both folder layouts and CSV manifests) and image loading (featx/data.py).

Everything is generated here, in tmp_path: tiny images of every format Pillow decodes, in
every mode that shows up in scraped folders.
"""

from __future__ import annotations

import io
import logging
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featx.data import (
    IMAGE_EXTENSIONS,
    Dataset,
    ImageLoadError,
    Sample,
    discover,
    is_image_name,
    load_image,
    train_eval_split,
)
from featx.errors import FeatxError

FORMATS = {  # extension -> Pillow format
    ".jpg": "JPEG", ".jpeg": "JPEG", ".jpe": "JPEG", ".jfif": "JPEG", ".png": "PNG", ".gif": "GIF",
    ".bmp": "BMP", ".webp": "WEBP", ".tif": "TIFF", ".tiff": "TIFF",
}


def rgb_image(seed: int = 0, size: tuple[int, int] = (40, 30)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def save(path: Path, seed: int = 0, size: tuple[int, int] = (40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb_image(seed, size).save(path, format=FORMATS[path.suffix.lower()])
    return path


# --------------------------------------------------------------------------- discovery: folders


def test_split_layout(tmp_path: Path) -> None:
    for split, n in (("train", 3), ("val", 2)):
        for cls in ("bees", "ants"):
            for i in range(n):
                save(tmp_path / split / cls / f"{i}.jpg", seed=i)
    ds = discover(tmp_path)
    assert isinstance(ds, Dataset) and ds.layout == "split"
    assert ds.classes == ["ants", "bees"]
    assert ds.counts() == {"train": 6, "val": 4}
    assert ds.splits == ["train", "val"]
    # split, then class, then name
    assert [s.key for s in ds.samples] == [
        f"{sp}/{c}/{i}.jpg" for sp, n in (("train", 3), ("val", 2)) for c in ("ants", "bees") for i in range(n)
    ]
    for s in ds.samples:
        assert isinstance(s, Sample)
        assert os.path.isabs(s.path) and Path(s.path).is_file()
        assert s.label == ds.classes.index(s.key.split("/")[1])
        assert s.split == s.key.split("/")[0]


def test_flat_layout_with_nested_folders(tmp_path: Path) -> None:
    save(tmp_path / "dog" / "b.png")
    save(tmp_path / "dog" / "a.png")
    save(tmp_path / "dog" / "sub" / "c.png")  # nested folders belong to their class
    save(tmp_path / "cat" / "x.jpg")
    ds = discover(tmp_path)
    assert ds.layout == "flat"
    assert ds.classes == ["cat", "dog"]
    assert [s.key for s in ds.samples] == ["cat/x.jpg", "dog/a.png", "dog/b.png", "dog/sub/c.png"]
    assert {s.split for s in ds.samples} == {"train"}
    assert [s.label for s in ds.samples] == [0, 1, 1, 1]


def test_ordering_is_stable_and_independent_of_creation_order(tmp_path: Path) -> None:
    names = [f"img_{i:03d}.png" for i in range(40)]
    a, b = tmp_path / "a", tmp_path / "b"
    for root, order in ((a, names), (b, random.Random(1).sample(names, len(names)))):
        for n in order:
            save(root / "train" / ("x" if int(n[4:7]) % 2 else "y") / n)
    ka = [s.key for s in discover(a).samples]
    kb = [s.key for s in discover(b).samples]
    assert ka == kb == [s.key for s in discover(a).samples]
    assert ka == sorted(ka, key=lambda k: (k.split("/")[1], k))


def test_every_extension_in_any_case_is_discovered_and_decoded(tmp_path: Path) -> None:
    exts = sorted(FORMATS)
    assert set(exts) == set(IMAGE_EXTENSIONS)
    expected = []
    for i, ext in enumerate(exts):
        for variant in (ext, ext.upper(), ext[:2].upper() + ext[2:]):
            name = f"f{i}_{variant.strip('.')}{variant}"
            save(tmp_path / "c" / name, seed=i)
            expected.append(f"c/{name}")
    ds = discover(tmp_path)
    assert sorted(s.key for s in ds.samples) == sorted(expected)
    for s in ds.samples:
        im = load_image(s.path)
        assert im.mode == "RGB" and im.size == (40, 30), s.key


def test_hidden_and_non_image_files_are_ignored(tmp_path: Path) -> None:
    save(tmp_path / "c" / "real.jpg")
    (tmp_path / "c" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (tmp_path / "c" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (tmp_path / "c" / "desktop.ini").write_text("[.ShellClassInfo]")
    (tmp_path / "c" / "notes.txt").write_text("hello")
    (tmp_path / "c" / "labels.csv").write_text("a,b")
    save(tmp_path / "c" / ".hidden.jpg")
    save(tmp_path / "c" / ".thumbnails" / "t.jpg")
    save(tmp_path / ".git" / "x.jpg")  # hidden class folder
    ds = discover(tmp_path)
    assert [s.key for s in ds.samples] == ["c/real.jpg"]
    assert ds.classes == ["c"]
    assert not is_image_name("Thumbs.db") and not is_image_name(".DS_Store") and is_image_name("A.JPEG")


def test_space_and_non_utf8_names(tmp_path: Path) -> None:
    if sys.platform == "darwin":
        pytest.skip("macOS file systems refuse non-UTF-8 names")
    save(tmp_path / "my class" / "with space.jpg", seed=1)
    raw = os.fsencode(tmp_path / "my class") + b"/caf\xe9.jpg"  # Latin-1 name, invalid UTF-8
    rgb_image(2).save(raw, format="JPEG")
    ds = discover(tmp_path)
    keys = [s.key for s in ds.samples]
    assert "my class/with space.jpg" in keys
    odd = [s for s in ds.samples if s.key != "my class/with space.jpg"]
    assert len(odd) == 1 and os.fsencode(odd[0].path) == raw
    assert load_image(odd[0].path).size == (40, 30)
    # A bad file with such a name gets a reason that is valid UTF-8 (it is stored in the cache).
    bad = os.fsencode(tmp_path / "my class") + b"/\xff\xfe.jpg"
    with open(bad, "wb") as fh:
        fh.write(b"not an image")
    with pytest.raises(ImageLoadError) as ei:
        load_image(os.fsdecode(bad))
    str(ei.value).encode("utf-8")


def test_non_utf8_class_folder_gets_a_printable_class_name(tmp_path: Path) -> None:
    if sys.platform == "darwin":
        pytest.skip("macOS file systems refuse non-UTF-8 names")
    for layout in ("flat", "split"):
        base = os.fsencode(tmp_path / layout) + (b"/train" if layout == "split" else b"")
        os.makedirs(base + b"/caf\xe9")
        os.makedirs(base + b"/plain")
        rgb_image(0).save(base + b"/caf\xe9/1.png", format="PNG")
        rgb_image(1).save(base + b"/plain/2.png", format="PNG")
        ds = discover(tmp_path / layout)
        assert ds.classes == ["caf\\xe9", "plain"]
        "".join(ds.classes).encode("utf-8")  # storable as UTF-8 text
        assert os.path.isfile(ds.samples[0].path)  # the path itself keeps the raw bytes


def test_images_outside_class_folders_are_reported(tmp_path: Path, caplog) -> None:
    save(tmp_path / "train" / "a" / "1.jpg")
    save(tmp_path / "train" / "loose.jpg")
    ds = discover(tmp_path)
    assert [s.key for s in ds.samples] == ["train/a/1.jpg"]
    assert any(p.endswith("loose.jpg") and "not in a class folder" in r for p, r in ds.skipped)
    flat = tmp_path / "flat"
    save(flat / "a" / "1.jpg")
    save(flat / "stray.png")
    ds = discover(flat)
    assert any(p.endswith("stray.png") and "dataset root" in r for p, r in ds.skipped)


def test_symlinked_folder_loop_is_reported_not_followed_forever(tmp_path: Path) -> None:
    save(tmp_path / "a" / "1.jpg")
    os.symlink(tmp_path / "a", tmp_path / "a" / "again")
    ds = discover(tmp_path)
    assert [s.key for s in ds.samples] == ["a/1.jpg"]
    assert any("symlink loop" in r for _, r in ds.skipped)


def test_unreadable_folder_is_skipped_with_reason(tmp_path: Path, monkeypatch) -> None:
    save(tmp_path / "a" / "1.jpg")
    save(tmp_path / "b" / "locked" / "2.jpg")
    save(tmp_path / "b" / "3.jpg")
    locked = str(tmp_path / "b" / "locked")
    real = os.scandir

    def scandir(p="."):
        if os.fspath(p) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return real(p)

    monkeypatch.setattr(os, "scandir", scandir)  # chmod 000 does not stop root, so simulate it
    ds = discover(tmp_path)
    assert [s.key for s in ds.samples] == ["a/1.jpg", "b/3.jpg"]
    assert (locked, "cannot list folder: Permission denied") in ds.skipped


def test_discovery_errors_say_what_to_fix(tmp_path: Path) -> None:
    with pytest.raises(FeatxError, match="does not exist"):
        discover(tmp_path / "nope")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(FeatxError, match="is a file"):
        discover(tmp_path / "file.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FeatxError, match="no images found"):
        discover(tmp_path / "empty")
    (tmp_path / "textonly" / "c").mkdir(parents=True)
    (tmp_path / "textonly" / "c" / "a.txt").write_text("x")
    with pytest.raises(FeatxError, match="no images found"):
        discover(tmp_path / "textonly")


def test_class_only_in_val_is_kept_and_warned(tmp_path: Path, caplog) -> None:
    save(tmp_path / "train" / "a" / "1.jpg")
    save(tmp_path / "train" / "b" / "1.jpg")
    save(tmp_path / "val" / "a" / "2.jpg")
    save(tmp_path / "val" / "c" / "3.jpg")
    with caplog.at_level(logging.WARNING, logger="featx"):
        ds = discover(tmp_path)
    assert ds.classes == ["a", "b", "c"]
    assert [(s.key, s.label) for s in ds.samples if s.split == "val"] == [("val/a/2.jpg", 0), ("val/c/3.jpg", 2)]
    assert any("'c'" in r.getMessage() and "none in train" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- discovery: manifests


def _manifest_fixture(tmp_path: Path) -> Path:
    save(tmp_path / "imgs" / "a1.jpg", 1)
    save(tmp_path / "imgs" / "b1.png", 2)
    save(tmp_path / "elsewhere" / "a2.jpg", 3)
    save(tmp_path / "abs" / "b2.jpg", 4)
    (tmp_path / "lists").mkdir()
    m = tmp_path / "lists" / "data.csv"
    m.write_text(
        "path,label,split\n"
        "../imgs/b1.png,bee,train\n"
        "../imgs/a1.jpg,ant,train\n"
        f"{tmp_path / 'abs' / 'b2.jpg'},bee,VAL\n"
        "../elsewhere/a2.jpg,ant,\n"
        "../imgs/missing.jpg,ant,train\n"
        "\n"
        "../imgs/a1.jpg,ant,train\n",
        encoding="utf-8",
    )
    return m


def test_manifest_paths_are_relative_to_the_manifest(tmp_path: Path, monkeypatch, caplog) -> None:
    m = _manifest_fixture(tmp_path)
    monkeypatch.chdir(tmp_path / "abs")  # the working directory must not matter
    with caplog.at_level(logging.WARNING, logger="featx"):
        ds = discover(None, manifest=m)
    assert ds.layout == "manifest" and ds.classes == ["ant", "bee"]
    got = [(Path(s.path).resolve(), s.label, s.split) for s in ds.samples]
    assert got == [
        ((tmp_path / "elsewhere" / "a2.jpg").resolve(), 0, "train"),  # empty split -> train
        ((tmp_path / "imgs" / "a1.jpg").resolve(), 0, "train"),
        ((tmp_path / "imgs" / "b1.png").resolve(), 1, "train"),
        ((tmp_path / "abs" / "b2.jpg").resolve(), 1, "val"),
    ]
    # Missing files are reported with the manifest line, duplicates too; nothing crashes.
    reasons = dict(ds.skipped)
    missing = str(m.parent / "../imgs/missing.jpg")
    assert reasons[missing] == "listed in data.csv line 6 but missing"
    assert any("duplicate of line 3" in r for r in reasons.values())
    assert "missing.jpg" in caplog.text
    # A .csv given as the dataset path is a manifest too.
    assert [s.key for s in discover(m).samples] == [s.key for s in ds.samples]


def test_manifest_without_split_column_and_with_bom(tmp_path: Path) -> None:
    save(tmp_path / "x.jpg")
    save(tmp_path / "y.jpg")
    m = tmp_path / "m.csv"
    m.write_bytes("\ufeffPath,Label\nx.jpg,one\ny.jpg,two\n".encode("utf-8"))  # Excel's BOM
    ds = discover(None, manifest=m)
    assert [(s.key, s.label, s.split) for s in ds.samples] == [("x.jpg", 0, "train"), ("y.jpg", 1, "train")]


def test_manifest_with_only_missing_rows_for_a_class_drops_that_class(tmp_path: Path) -> None:
    save(tmp_path / "x.jpg")
    m = tmp_path / "m.csv"
    m.write_text("path,label\nx.jpg,b\ngone.jpg,a\n")
    ds = discover(None, manifest=m)
    assert ds.classes == ["b"] and ds.samples[0].label == 0


@pytest.mark.parametrize(
    "content, match",
    [
        (b"", "is empty"),
        (b"file,class\na.jpg,x\n", "header naming columns path,label"),
        (b"path,label,split\na.jpg,x,holdout\n", r"m.csv:2: split 'holdout' is not one of"),
        (b"path,label\n\xff\xfe\x00garbage,x\n", "not UTF-8"),
        (b"path,label,split\na.jpg\n", "m.csv:2: expected columns"),
        (b"path,label\n,x\n", "empty path or label"),
        (b"path,label\nnothere.jpg,x\n", "lists no existing images"),
    ],
)
def test_bad_manifests_raise_clear_errors(tmp_path: Path, content: bytes, match: str) -> None:
    save(tmp_path / "a.jpg")
    m = tmp_path / "m.csv"
    m.write_bytes(content)
    with pytest.raises(FeatxError, match=match):
        discover(None, manifest=m)


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(FeatxError, match="does not exist"):
        discover(None, manifest=tmp_path / "nope.csv")


# --------------------------------------------------------------------------- loading


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path) -> None:
    p = tmp_path / "cmyk.jpg"
    rgb_image(1).convert("CMYK").save(p)
    assert Image.open(p).mode == "CMYK"
    im = load_image(p)
    assert im.mode == "RGB" and im.size == (40, 30)


def test_16bit_png_keeps_its_contrast(tmp_path: Path) -> None:
    p = tmp_path / "g16.png"
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (8, 1))
    Image.fromarray(ramp).save(p)
    assert Image.open(p).mode.startswith("I")
    arr = np.asarray(load_image(p))
    assert arr.shape == (8, 64, 3) and arr.dtype == np.uint8
    assert arr[0, 0, 0] == 0 and arr[0, -1, 0] == 255 and (np.diff(arr[0, :, 0].astype(int)) >= 0).all()


def test_grayscale_png(tmp_path: Path) -> None:
    p = tmp_path / "g.png"
    Image.fromarray(np.full((5, 7), 100, np.uint8)).save(p)
    arr = np.asarray(load_image(p))
    assert arr.shape == (5, 7, 3) and (arr == 100).all()


def test_palette_png_with_transparency_is_composited_on_white(tmp_path: Path) -> None:
    p = tmp_path / "pal.png"
    im = Image.new("P", (4, 4), 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    im.putpixel((1, 1), 1)
    im.save(p, transparency=0)
    arr = np.asarray(load_image(p))
    assert tuple(arr[0, 0]) == (255, 255, 255)  # transparent black -> white background
    assert tuple(arr[1, 1]) == (255, 0, 0)


def test_rgba_and_la_images(tmp_path: Path) -> None:
    p = tmp_path / "rgba.png"
    a = np.zeros((2, 2, 4), np.uint8)
    a[0, 0] = (10, 20, 30, 255)
    Image.fromarray(a, "RGBA").save(p)
    arr = np.asarray(load_image(p))
    assert tuple(arr[0, 0]) == (10, 20, 30) and tuple(arr[1, 1]) == (255, 255, 255)
    p2 = tmp_path / "la.png"
    Image.new("LA", (3, 3), (50, 255)).save(p2)
    assert tuple(np.asarray(load_image(p2))[0, 0]) == (50, 50, 50)


def test_animated_gif_gives_its_first_frame(tmp_path: Path) -> None:
    p = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (6, 6), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=40, loop=0)
    assert getattr(Image.open(p), "n_frames", 1) == 3
    arr = np.asarray(load_image(p))
    assert arr.shape == (6, 6, 3) and tuple(arr[3, 3]) == (255, 0, 0)


@pytest.mark.parametrize("orientation, size", [(1, (40, 20)), (3, (40, 20)), (6, (20, 40)), (8, (20, 40))])
def test_exif_orientation_is_applied(tmp_path: Path, orientation: int, size: tuple[int, int]) -> None:
    p = tmp_path / f"o{orientation}.jpg"
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = 255  # left half white
    im = Image.fromarray(a)
    ex = im.getexif()
    ex[0x0112] = orientation
    im.save(p, exif=ex, quality=95)
    out = load_image(p)
    assert out.size == size
    arr = np.asarray(out).mean(axis=2)
    if orientation == 1:
        assert arr[:, :15].mean() > 200 and arr[:, 25:].mean() < 50
    if orientation == 3:  # rotated 180: white moves to the right
        assert arr[:, 25:].mean() > 200 and arr[:, :15].mean() < 50
    if orientation == 6:  # rotate 90 clockwise to display: left half -> top half
        assert arr[:15].mean() > 200 and arr[25:].mean() < 50
    if orientation == 8:
        assert arr[25:].mean() > 200 and arr[:15].mean() < 50


def test_draft_decoding_keeps_the_short_side(tmp_path: Path) -> None:
    p = tmp_path / "big.jpg"
    rgb_image(3, (1200, 900)).save(p)
    im = load_image(p, draft_size=200)
    # Scaled while decoding, but the short side stays >= 2x the target so the final resize antialiases.
    assert min(im.size) >= 400 and im.size[0] < 1200
    assert load_image(p).size == (1200, 900)


def _bomb(tmp_path: Path, factor: float) -> Path:
    n = int(Image.MAX_IMAGE_PIXELS * factor)
    w = 20000
    p = tmp_path / f"bomb{factor}.png"
    Image.new("1", (w, n // w + 1)).save(p)  # a few KB on disk, huge when decoded
    return p


def _zero(d: Path) -> Path:
    (d / "zero.jpg").write_bytes(b"")
    return d / "zero.jpg"


def _html(d: Path) -> Path:
    (d / "page.jpg").write_text("<html><body>Not found</body></html>")
    return d / "page.jpg"


def _folder(d: Path) -> Path:
    (d / "dir.jpg").mkdir()
    return d / "dir.jpg"


@pytest.mark.parametrize(
    "make, reason",
    [(_zero, "empty file (0 bytes)"), (_html, "not an image Pillow can decode"), (_folder, "is a directory")],
    ids=["zero-bytes", "html-as-jpg", "directory"],
)
def test_unusable_files_raise_image_load_error(tmp_path: Path, make, reason: str) -> None:
    p = make(tmp_path)
    with pytest.raises(ImageLoadError) as ei:
        load_image(p)
    assert str(ei.value) == reason


def test_truncated_jpeg(tmp_path: Path) -> None:
    buf = io.BytesIO()
    rgb_image(0, (300, 300)).save(buf, "JPEG")
    p = tmp_path / "cut.jpg"
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageLoadError, match="truncated"):
        load_image(p)


@pytest.mark.parametrize("factor", [1.1, 2.1], ids=["above-limit", "above-twice-limit"])
@pytest.mark.slow
def test_decompression_bomb(tmp_path: Path, factor: float) -> None:
    with pytest.raises(ImageLoadError, match="decompression-bomb limit"):
        load_image(_bomb(tmp_path, factor))


def test_broken_symlink_and_symlink_loop(tmp_path: Path) -> None:
    os.symlink(tmp_path / "gone.jpg", tmp_path / "broken.jpg")
    os.symlink("b.jpg", tmp_path / "a.jpg")
    os.symlink("a.jpg", tmp_path / "b.jpg")
    with pytest.raises(ImageLoadError, match="broken symlink"):
        load_image(tmp_path / "broken.jpg")
    with pytest.raises(ImageLoadError, match="symlink loop"):
        load_image(tmp_path / "a.jpg")


def test_permission_denied(tmp_path: Path, monkeypatch) -> None:
    p = save(tmp_path / "locked.jpg")
    if os.geteuid() != 0:  # the real thing where it can be done
        p.chmod(0)
        try:
            with pytest.raises(ImageLoadError, match="permission denied"):
                load_image(p)
        finally:
            p.chmod(0o644)

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied", str(p))

    monkeypatch.setattr(Image, "open", denied)
    with pytest.raises(ImageLoadError, match="permission denied"):
        load_image(p)


def test_decoder_bugs_become_image_load_errors(tmp_path: Path, monkeypatch) -> None:
    p = save(tmp_path / "x.png")

    def boom(*a, **k):
        raise IndexError("tuple index out of range")

    monkeypatch.setattr(Image, "open", boom)
    with pytest.raises(ImageLoadError, match="IndexError"):
        load_image(p)


def test_damaged_exif_does_not_lose_the_image(tmp_path: Path, monkeypatch) -> None:
    p = save(tmp_path / "x.jpg")
    from PIL import ImageOps

    def bad_exif(im):
        raise SyntaxError("corrupt EXIF")

    monkeypatch.setattr(ImageOps, "exif_transpose", bad_exif)
    assert load_image(p).size == (40, 30)


# --------------------------------------------------------------------------- train/eval split


def test_split_uses_val_when_present() -> None:
    labels = np.array([0, 1, 0, 1, 0, 1])
    splits = np.array(["train"] * 4 + ["val"] * 2)
    tr, ev, info = train_eval_split(labels, splits)
    assert tr.tolist() == [0, 1, 2, 3] and ev.tolist() == [4, 5] and info["eval_split"] == "val"


def test_holdout_is_stratified_and_seeded() -> None:
    labels = np.repeat([0, 1, 2], 10)
    splits = np.array(["train"] * 30)
    tr, ev, info = train_eval_split(labels, splits, test_size=0.2, seed=3)
    assert info["stratified"] and len(ev) == 6 and np.bincount(labels[ev]).tolist() == [2, 2, 2]
    assert set(tr) | set(ev) == set(range(30)) and not set(tr) & set(ev)
    tr2, ev2, _ = train_eval_split(labels, splits, test_size=0.2, seed=3)
    assert (tr == tr2).all() and (ev == ev2).all()


def test_holdout_with_a_one_image_class_keeps_it_in_training() -> None:
    labels = np.array([0] * 9 + [1] + [2] * 3)
    for seed in range(10):
        tr, ev, info = train_eval_split(labels, np.array(["train"] * 13), test_size=0.2, seed=seed)
        assert not info["stratified"] and sorted(tr.tolist() + ev.tolist()) == list(range(13))
        assert 9 in tr and set(labels[tr]) == {0, 1, 2} and len(ev) == 3
    tr2, ev2, _ = train_eval_split(labels, np.array(["train"] * 13), test_size=0.2, seed=9)
    assert (tr == tr2).all() and (ev == ev2).all()


def test_holdout_with_too_few_images_per_class_for_stratifying() -> None:
    labels = np.array([0, 0, 1, 1, 2, 2, 3, 3])  # 2 per class, but 2 eval rows < 4 classes
    tr, ev, info = train_eval_split(labels, np.array(["train"] * 8), test_size=0.2)
    assert not info["stratified"] and len(ev) == 2 and set(labels[tr]) == {0, 1, 2, 3}


def test_split_errors() -> None:
    with pytest.raises(FeatxError, match="no 'train' split"):
        train_eval_split(np.array([0, 1]), np.array(["val", "val"]))
    with pytest.raises(FeatxError, match="at least 2"):
        train_eval_split(np.array([0]), np.array(["train"]))
    with pytest.raises(FeatxError, match="every class has a single training image"):
        train_eval_split(np.array([0, 1, 2]), np.array(["train"] * 3))
    with pytest.raises(FeatxError, match="test-size"):
        train_eval_split(np.array([0, 1]), np.array(["train", "train"]), test_size=1.5)
