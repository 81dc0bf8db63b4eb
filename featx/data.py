"""Dataset discovery and robust image loading.

Discovery turns a folder (``root/<split>/<class>/file`` or ``root/<class>/file``) or a CSV
manifest (``path,label[,split]``) into a stably ordered list of samples.  Loading turns any
file Pillow can decode into an RGB image with EXIF orientation applied, or raises
:class:`ImageLoadError` with a reason that ends up in the cache's ``failed`` list.
"""

from __future__ import annotations

import csv
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

from .errors import FeatxError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"}
)
SPLIT_NAMES = ("train", "val", "test")
# Files that are never images and never worth a warning.
IGNORED_NAMES = frozenset({"thumbs.db", "desktop.ini", ".ds_store"})

# Truncated files must fail, not decode half an image silently.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageLoadError(Exception):
    """An image could not be decoded; ``str(exc)`` is the reason recorded in the cache."""


@dataclass(frozen=True)
class Sample:
    """One image: ``path`` is absolute, ``key`` is the path relative to the dataset root."""

    path: str
    key: str
    label: int
    split: str


@dataclass
class Dataset:
    """The discovered samples, class names and where they came from."""

    root: str
    classes: list[str]
    samples: list[Sample]
    layout: str  # "split", "flat" or "manifest"
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def splits(self) -> list[str]:
        present = {s.split for s in self.samples}
        return [s for s in SPLIT_NAMES if s in present]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.samples:
            out[s.split] = out.get(s.split, 0) + 1
        return out


def is_image_name(name: str) -> bool:
    """True for a visible file whose extension is one Pillow decodes (any case)."""
    if name.startswith(".") or name.lower() in IGNORED_NAMES:
        return False
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _walk_images(folder: Path, skipped: list[tuple[str, str]]) -> list[Path]:
    """All image files below ``folder`` (recursively, hidden folders skipped), sorted."""
    found: list[Path] = []
    seen_dirs: set[tuple[int, int]] = set()

    def visit(d: Path) -> None:
        try:
            st = d.stat()
        except OSError as exc:
            skipped.append((str(d), f"cannot read folder: {exc.strerror or exc}"))
            return
        ident = (st.st_dev, st.st_ino)
        if ident in seen_dirs:  # symlink loop
            skipped.append((str(d), "symlink loop (folder already visited)"))
            return
        seen_dirs.add(ident)
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as exc:
            skipped.append((str(d), f"cannot list folder: {exc.strerror or exc}"))
            return
        for e in entries:
            if e.name.startswith("."):
                continue
            try:
                is_dir = e.is_dir()
            except OSError:
                is_dir = False
            if is_dir:
                visit(Path(e.path))
            elif is_image_name(e.name):
                found.append(Path(e.path))

    visit(folder)
    return found


def _visible_subdirs(folder: Path) -> list[Path]:
    return sorted(
        (p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: p.name,
    )


def discover(root: str | os.PathLike, *, manifest: str | os.PathLike | None = None) -> Dataset:
    """Find every image under ``root`` (or listed in ``manifest``) with its class and split.

    Ordering is stable (split, class, relative path) so that caches and chunk boundaries are
    reproducible across runs and machines.
    """
    if manifest is not None:
        return _discover_manifest(Path(manifest))
    rootp = Path(root)
    if not rootp.exists():
        raise FeatxError(f"dataset folder {str(rootp)!r} does not exist; pass an existing image folder")
    if rootp.is_file():
        if rootp.suffix.lower() == ".csv":
            return _discover_manifest(rootp)
        raise FeatxError(
            f"{str(rootp)!r} is a file; pass a folder laid out as <split>/<class>/image or "
            "<class>/image, or a CSV manifest ending in .csv"
        )
    rootp = rootp.resolve()
    skipped: list[tuple[str, str]] = []
    subdirs = _visible_subdirs(rootp)
    split_dirs = [d for d in subdirs if d.name.lower() in SPLIT_NAMES]
    if split_dirs:
        others = [d.name for d in subdirs if d.name.lower() not in SPLIT_NAMES]
        if others:
            log.warning("ignoring folders %s beside the split folders in %s", others, rootp)
        per_split: dict[str, list[tuple[str, Path]]] = {}
        class_names: set[str] = set()
        for sd in split_dirs:
            split = sd.name.lower()
            for cd in _visible_subdirs(sd):
                files = _walk_images(cd, skipped)
                if files:
                    class_names.add(cd.name)
                per_split.setdefault(split, []).extend((cd.name, f) for f in files)
            loose = [p for p in sd.iterdir() if p.is_file() and is_image_name(p.name)]
            for p in loose:
                skipped.append((str(p), f"image directly in split folder {sd.name!r}, not in a class folder"))
        classes = sorted(class_names)
        index = {c: i for i, c in enumerate(classes)}
        samples = [
            Sample(str(f), f.relative_to(rootp).as_posix(), index[c], split)
            for split in SPLIT_NAMES
            for c, f in per_split.get(split, [])
        ]
        layout = "split"
    else:
        classes = []
        samples = []
        pending: list[tuple[str, list[Path]]] = []
        for cd in subdirs:
            files = _walk_images(cd, skipped)
            if files:
                pending.append((cd.name, files))
        classes = [c for c, _ in pending]
        for i, (_, files) in enumerate(pending):
            samples.extend(Sample(str(f), f.relative_to(rootp).as_posix(), i, "train") for f in files)
        loose = [p for p in rootp.iterdir() if p.is_file() and is_image_name(p.name)]
        for p in loose:
            skipped.append((str(p), "image directly in the dataset root, not in a class folder"))
        layout = "flat"
    if not samples:
        raise FeatxError(
            f"no images found in {str(rootp)!r}; expected <split>/<class>/image "
            f"(splits: {', '.join(SPLIT_NAMES)}) or <class>/image with extensions "
            f"{', '.join(sorted(IMAGE_EXTENSIONS))}"
        )
    for path, reason in skipped:
        log.warning("skipped %s: %s", path, reason)
    return Dataset(str(rootp), classes, samples, layout, skipped)


def _discover_manifest(manifest: Path) -> Dataset:
    if not manifest.is_file():
        raise FeatxError(f"manifest {str(manifest)!r} does not exist; pass a CSV with columns path,label[,split]")
    base = manifest.resolve().parent
    rows: list[tuple[str, str, str, int]] = []
    with open(manifest, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            raise FeatxError(f"manifest {str(manifest)!r} is empty; it needs a header path,label[,split]")
        cols = [h.strip().lower() for h in header]
        if "path" not in cols or "label" not in cols:
            raise FeatxError(
                f"manifest {str(manifest)!r} must start with a header naming columns path,label[,split]; got {header}"
            )
        ip, il = cols.index("path"), cols.index("label")
        isp = cols.index("split") if "split" in cols else None
        for lineno, row in enumerate(reader, start=2):
            if not row or all(not c.strip() for c in row):
                continue
            try:
                p, lab = row[ip].strip(), row[il].strip()
                sp = row[isp].strip().lower() if isp is not None and isp < len(row) else "train"
            except IndexError:
                raise FeatxError(f"{manifest}:{lineno}: expected columns {header}, got {row}") from None
            if sp not in SPLIT_NAMES:
                raise FeatxError(f"{manifest}:{lineno}: split {sp!r} is not one of {', '.join(SPLIT_NAMES)}")
            rows.append((p, lab, sp or "train", lineno))
    skipped: list[tuple[str, str]] = []
    classes = sorted({lab for _, lab, _, _ in rows})
    index = {c: i for i, c in enumerate(classes)}
    samples = []
    for p, lab, sp, lineno in rows:
        full = (base / p) if not os.path.isabs(p) else Path(p)
        if not full.exists():
            skipped.append((str(full), f"listed in {manifest.name} line {lineno} but missing"))
            continue
        try:
            key = full.resolve().relative_to(base).as_posix()
        except ValueError:
            key = full.resolve().as_posix()
        samples.append(Sample(str(full), key, index[lab], sp))
    order = {s: i for i, s in enumerate(SPLIT_NAMES)}
    samples.sort(key=lambda s: (order[s.split], s.label, s.key))
    for path, reason in skipped:
        log.warning("skipped %s: %s", path, reason)
    if not samples:
        raise FeatxError(f"manifest {str(manifest)!r} lists no existing images")
    return Dataset(str(base), classes, samples, "manifest", skipped)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB, keeping 16-bit and float images' contrast."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = (0.0, 65535.0) if img.mode.startswith("I;16") else (float(arr.min()), float(arr.max()))
        if img.mode == "I" and hi <= 65535 and lo >= 0:
            lo, hi = 0.0, 65535.0 if hi > 255 else 255.0
        scale = (hi - lo) or 1.0
        arr8 = np.clip((arr - lo) / scale * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if img.mode in ("P", "PA") and "transparency" in img.info or img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(path: str | os.PathLike, *, draft_size: int | None = None) -> Image.Image:
    """Decode ``path`` to an RGB image (first frame, EXIF-rotated).

    ``draft_size`` lets the JPEG decoder scale down by 1/2, 1/4 or 1/8 while decoding when the
    image is at least twice that size, which makes CPU decoding of large photos several
    times faster; the result is still at least ``draft_size`` on its short side.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if draft_size and im.format == "JPEG":
                    # Ask for a scale that keeps the short side >= draft_size.
                    w, h = im.size
                    scale = min(w, h) / float(draft_size)
                    if scale >= 2:
                        im.draft("RGB", (max(1, int(w / scale)), max(1, int(h / scale))))
                im.seek(0)
                im.load()
                im = ImageOps.exif_transpose(im)
                return _to_rgb(im)
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(f"image too large (decompression-bomb limit): {exc}") from None
    except Image.DecompressionBombWarning as exc:
        raise ImageLoadError(f"image too large (decompression-bomb limit): {exc}") from None
    except FileNotFoundError:
        raise ImageLoadError("file not found (broken symlink or removed while running)") from None
    except PermissionError:
        raise ImageLoadError("permission denied") from None
    except IsADirectoryError:
        raise ImageLoadError("is a directory") from None
    except OSError as exc:
        if os.path.exists(path) and os.path.getsize(path) == 0:
            raise ImageLoadError("empty file (0 bytes)") from None
        msg = str(exc)
        if "cannot identify image file" in msg:
            raise ImageLoadError("not an image Pillow can decode") from None
        if "truncated" in msg.lower():
            raise ImageLoadError(f"truncated image: {msg}") from None
        raise ImageLoadError(f"cannot decode: {msg}") from None
    except (ValueError, SyntaxError, EOFError, Image.UnidentifiedImageError) as exc:
        raise ImageLoadError(f"cannot decode: {exc}") from None


def train_eval_split(
    labels: np.ndarray,
    splits: np.ndarray,
    *,
    test_size: float = 0.2,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Row indices (train, eval) shared by the probe and the fine-tune, plus a description.

    The evaluation split is the dataset's ``val`` split when it has one, else ``test``; only
    when neither exists is a stratified hold-out of ``test_size`` drawn from ``train`` with
    ``seed`` (classes too small to stratify fall back to a plain seeded shuffle).
    """
    labels = np.asarray(labels)
    splits = np.asarray(splits)
    train = np.flatnonzero(splits == "train")
    for name in ("val", "test"):
        ev = np.flatnonzero(splits == name)
        if len(ev):
            if not len(train):
                raise FeatxError(f"the dataset has a {name!r} split but no 'train' split to train on; add train/<class>/ images")
            return train, ev, {"kind": "split", "eval_split": name, "train_split": "train"}
    if not 0 < test_size < 1:
        raise FeatxError(f"--test-size must be between 0 and 1, got {test_size}")
    from sklearn.model_selection import train_test_split

    counts = np.bincount(labels[train]) if len(train) else np.array([])
    n_eval = int(np.ceil(test_size * len(train)))
    stratify = labels[train] if len(counts) and counts[counts > 0].min() >= 2 and n_eval >= (counts > 0).sum() else None
    if stratify is None:
        log.warning("some classes have fewer than 2 images: the hold-out split is not stratified")
    tr, ev = train_test_split(train, test_size=test_size, random_state=seed, stratify=stratify)
    return (
        np.sort(tr),
        np.sort(ev),
        {"kind": "holdout", "eval_split": "train (held out)", "test_size": test_size, "seed": seed,
         "stratified": stratify is not None},
    )
