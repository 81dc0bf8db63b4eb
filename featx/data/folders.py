"""Dataset discovery and robust image loading.

Discovery turns a folder (``root/<split>/<class>/file`` or ``root/<class>/file``) or a CSV
manifest (``path,label[,split]``) into a stably ordered list of samples.  Loading turns any
file Pillow can decode into an RGB image with EXIF orientation applied, or raises
:class:`ImageLoadError` with a reason that ends up in the cache's ``failed`` list.

Scraped and synced folders are messy, so nothing here may crash on one bad entry: unreadable
folders, symlink loops, broken links, non-UTF-8 names and stray files are skipped (and
reported in :attr:`Dataset.skipped`), and every decode failure becomes an ``ImageLoadError``.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from PIL import ImageFile

from ..base.choices import SPLITS
from ..base.errors import FeatxError
from ..base.files import check_regular
from . import guards
from .splits import canonical_split

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"}
)
SPLIT_NAMES = SPLITS
# Files that are never images and never worth a warning.
IGNORED_NAMES = frozenset({"thumbs.db", "desktop.ini", ".ds_store"})

# Truncated files must fail, not decode half an image silently.
ImageFile.LOAD_TRUNCATED_IMAGES = False




@dataclass(frozen=True)
class Sample:
    """One image: ``path`` is absolute, ``key`` is the path relative to the dataset root."""

    path: str
    key: str
    label: int
    split: str


@dataclass
class Dataset:
    """The discovered samples, class names and where they came from.

    ``skipped`` lists (path, reason) for entries discovery could not use (unreadable folders,
    symlink loops, images outside a class folder, manifest rows whose file is missing).
    """

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


def _oserror_text(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def _walk_images(folder: str, rel: str, skipped: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(absolute path, key) of every image below ``folder``, recursively, in name order.

    ``rel`` is ``folder`` relative to the dataset root (the key prefix).  Plain string joins
    instead of ``pathlib``: discovery of 100,000 files must take well under a second.  Hidden
    folders are skipped; a folder reached twice through symlinks is reported and skipped.
    Iterative (an explicit stack), so no folder depth can hit Python's recursion limit.
    """
    found: list[tuple[str, str]] = []
    seen_dirs: set[tuple[int, int]] = set()

    def entries_of(d: str, r: str):
        try:
            st = os.stat(d)
        except OSError as exc:
            skipped.append((d, f"cannot read folder: {_oserror_text(exc)}"))
            return None
        ident = (st.st_dev, st.st_ino)
        if ident in seen_dirs:
            skipped.append((d, "symlink loop or duplicate link (folder already visited)"))
            return None
        seen_dirs.add(ident)
        try:
            with os.scandir(d) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            skipped.append((d, f"cannot list folder: {_oserror_text(exc)}"))
            return None
        return iter(entries), r

    first = entries_of(folder, rel)
    stack = [first] if first else []
    while stack:
        it, r = stack[-1]
        for e in it:
            name = e.name
            if name.startswith("."):
                continue
            try:
                is_dir = e.is_dir()  # follows symlinks; a loop or broken link is not a dir
            except OSError:
                is_dir = False
            if is_dir:
                sub = entries_of(e.path, f"{r}/{name}")
                if sub:
                    stack.append(sub)
                    break  # descend now: files of a subfolder come at its place in name order
            elif is_image_name(name):
                why = guards.file_reason(e.path)  # FIFOs, sockets, devices are never opened
                if why:
                    skipped.append((e.path, why))
                else:
                    found.append((e.path, f"{r}/{name}"))
        else:
            stack.pop()
    return found


def class_name(folder_name: str) -> str:
    """The class name for a folder: the folder name, with undecodable bytes shown as ``\\xNN``.

    A Latin-1 folder name (``caf\\xe9``) is a valid path but not valid UTF-8; class names are
    stored as UTF-8 text in the cache and reports, paths are kept as raw bytes.
    """
    return folder_name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _visible_subdirs(folder: Path, skipped: list[tuple[str, str]]) -> list[Path]:
    try:
        entries = list(os.scandir(folder))
    except OSError as exc:
        skipped.append((str(folder), f"cannot list folder: {_oserror_text(exc)}"))
        return []
    out = []
    for e in entries:
        if e.name.startswith("."):
            continue
        try:
            if e.is_dir():
                out.append(Path(e.path))
        except OSError:
            continue
    return sorted(out, key=lambda p: p.name)


def _loose_images(folder: Path) -> list[Path]:
    try:
        return sorted(
            Path(e.path) for e in os.scandir(folder) if is_image_name(e.name) and not e.is_dir()
        )
    except OSError:
        return []


def discover(root: str | os.PathLike, *, manifest: str | os.PathLike | None = None) -> Dataset:
    """Find every image under ``root`` (or listed in ``manifest``) with its class and split.

    Ordering is stable (split, class, relative path) so that caches and chunk boundaries are
    reproducible across runs and machines.
    """
    if manifest is not None:
        return _discover_manifest(Path(manifest))
    rootp = Path(root)
    if rootp.is_file() and rootp.suffix.lower() == ".csv":
        return _discover_manifest(rootp)
    rootp = _checked_root(rootp)
    skipped: list[tuple[str, str]] = []
    subdirs = _visible_subdirs(rootp, skipped)
    split_dirs = [d for d in subdirs if canonical_split(d.name)]
    if split_dirs:
        others = [d.name for d in subdirs if not canonical_split(d.name)]
        if others:
            log.warning("ignoring folders %s beside the split folders in %s", others, rootp)
        classes, samples = _split_layout(split_dirs, skipped)
        layout = "split"
    else:
        classes, samples = _flat_layout(rootp, subdirs, skipped)
        layout = "flat"
    if not samples:
        raise FeatxError(
            f"no images found in {str(rootp)!r}; expected <split>/<class>/image "
            f"(splits: {', '.join(SPLIT_NAMES)}) or <class>/image with extensions "
            f"{', '.join(sorted(IMAGE_EXTENSIONS))}"
        )
    for path, reason in skipped:
        log.warning("skipped %s: %s", path, reason)
    if len(classes) == 1:
        log.warning("only one class (%r) found in %s: a classifier needs at least two", classes[0], rootp)
    return Dataset(str(rootp), classes, samples, layout, skipped)


def _checked_root(rootp: Path) -> Path:
    """The dataset folder, resolved, or an error that says what to pass instead."""
    if not rootp.exists():
        raise FeatxError(f"dataset folder {str(rootp)!r} does not exist; pass an existing image folder")
    if rootp.is_file():
        raise FeatxError(
            f"{str(rootp)!r} is a file; pass a folder laid out as <split>/<class>/image or "
            "<class>/image, or a CSV manifest ending in .csv"
        )
    rootp = rootp.resolve()
    if not os.access(rootp, os.R_OK | os.X_OK):
        raise FeatxError(f"dataset folder {str(rootp)!r} is not readable; fix its permissions")
    return rootp


def _split_layout(split_dirs: list[Path], skipped: list[tuple[str, str]]) -> tuple[list[str], list[Sample]]:
    """``root/<split>/<class>/...``: classes are the union over splits, samples split by split."""
    per_split: dict[str, list[tuple[str, str, str]]] = {}
    class_splits: dict[str, set[str]] = {}
    for sd in split_dirs:
        split = canonical_split(sd.name)
        for cd in _visible_subdirs(sd, skipped):
            files = _walk_images(str(cd), f"{sd.name}/{cd.name}", skipped)
            cname = class_name(cd.name)
            if files:
                class_splits.setdefault(cname, set()).add(split)
            per_split.setdefault(split, []).extend((cname, p, k) for p, k in files)
        for p in _loose_images(sd):
            skipped.append((str(p), f"image directly in split folder {sd.name!r}, not in a class folder"))
    classes = sorted(class_splits)
    index = {c: i for i, c in enumerate(classes)}
    samples = [Sample(p, k, index[c], split) for split in SPLIT_NAMES for c, p, k in per_split.get(split, [])]
    if "train" in per_split:
        for c in classes:
            if "train" not in class_splits[c]:
                log.warning(
                    "class %r has images in %s but none in train: a head trained on train can never "
                    "predict it; add train/%s/ images or remove the class",
                    c, "/".join(sorted(class_splits[c])), c,
                )
    return classes, samples


def _flat_layout(rootp: Path, subdirs: list[Path], skipped: list[tuple[str, str]]) -> tuple[list[str], list[Sample]]:
    """``root/<class>/...``: every image is in the train split; empty class folders are not classes."""
    pending: list[tuple[str, list[tuple[str, str]]]] = []
    for cd in subdirs:
        files = _walk_images(str(cd), cd.name, skipped)
        if files:
            pending.append((class_name(cd.name), files))
    classes = [c for c, _ in pending]
    samples: list[Sample] = []
    for i, (_, files) in enumerate(pending):
        samples.extend(Sample(p, k, i, "train") for p, k in files)
    for p in _loose_images(rootp):
        skipped.append((str(p), "image directly in the dataset root, not in a class folder"))
    return classes, samples


def _discover_manifest(manifest: Path) -> Dataset:
    """Rows of a ``path,label[,split]`` CSV; relative paths are relative to the manifest itself."""
    check_regular(manifest, "manifest")
    if not manifest.is_file():
        raise FeatxError(f"manifest {str(manifest)!r} does not exist; pass a CSV with columns path,label[,split]")
    base = manifest.resolve().parent
    rows = _read_manifest_rows(manifest)
    skipped: list[tuple[str, str]] = []
    classes = sorted({lab for _, lab, _, _ in rows})
    samples = _manifest_samples(rows, {c: i for i, c in enumerate(classes)}, base, manifest, skipped)
    for path, reason in skipped:
        log.warning("skipped %s: %s", path, reason)
    _log_outside(samples, manifest, base)
    if not samples:
        raise FeatxError(
            f"manifest {str(manifest)!r} lists no existing images; paths are resolved relative to "
            f"{str(base)!r}"
        )
    # Labels used only by missing rows would be empty classes: keep only those with images.
    used = sorted({s.label for s in samples})
    if len(used) != len(classes):
        remap = {old: new for new, old in enumerate(used)}
        classes = [classes[i] for i in used]
        samples = [Sample(s.path, s.key, remap[s.label], s.split) for s in samples]
    return Dataset(str(base), classes, samples, "manifest", skipped)


def _log_outside(samples: list[Sample], manifest: Path, base: Path) -> None:
    """Rows outside the manifest's folder are allowed (shared image stores) but never silently."""
    outside = [s for s in samples if Path(s.key).is_absolute()]
    if outside:
        # A manifest of absolute paths only (e.g. the file list `featx predict` writes for itself) is a
        # deliberate list: nothing to tell the user.  A mix of both is worth a warning.
        level = logging.DEBUG if len(outside) == len(samples) else logging.WARNING
        log.log(level, "%d row(s) of %s point outside its folder %s (e.g. %s); they are read from there as listed",
                    len(outside), manifest.name, base, outside[0].path)


def _read_manifest_rows(manifest: Path) -> list[tuple[str, str, str, int]]:
    """(path, label, split, line number) of every non-empty row, or an error naming the line to fix."""
    try:
        # utf-8-sig: spreadsheet programs save a byte-order mark before the header.
        with io.TextIOWrapper(guards.open_regular(manifest), encoding="utf-8-sig", newline="") as fh:
            return parse_manifest(fh, manifest)  # open_regular: a FIFO as the manifest never blocks
    except UnicodeDecodeError as exc:
        raise FeatxError(
            f"manifest {str(manifest)!r} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8"
        ) from None
    except csv.Error as exc:
        raise FeatxError(f"manifest {str(manifest)!r} is not a valid CSV ({exc})") from None
    except OSError as exc:
        raise FeatxError(f"manifest {str(manifest)!r}: cannot read it ({_oserror_text(exc)})") from None


def parse_manifest(fh, manifest) -> list[tuple[str, str, str, int]]:
    """(path, label, split, line number) of every non-empty row of an open CSV text (a file or a URL's)."""
    reader = csv.reader(fh)
    header = next(reader, None)
    if header is None:
        raise FeatxError(f"manifest {str(manifest)!r} is empty; it needs a header path,label[,split]")
    cols = [h.strip().lower() for h in header]
    if "path" not in cols or "label" not in cols:
        raise FeatxError(
            f"manifest {str(manifest)!r} must start with a header naming columns path,label[,split]; "
            f"got {header}"
        )
    where = (cols.index("path"), cols.index("label"), cols.index("split") if "split" in cols else None)
    rows = []
    for row in reader:
        if row and any(c.strip() for c in row):
            rows.append(_manifest_row(row, where, header, manifest, reader.line_num))
    return rows


def _manifest_row(row: list[str], where: tuple, header: list[str], manifest: Path, lineno: int) -> tuple:
    """One CSV row as (path, label, split, line number), checked."""
    ip, il, isp = where
    try:
        p, lab = row[ip].strip(), row[il].strip()
    except IndexError:
        raise FeatxError(f"{manifest}:{lineno}: expected columns {','.join(header)}, got {','.join(row)}") from None
    raw = row[isp].strip() if isp is not None and isp < len(row) else ""
    sp = canonical_split(raw or "train")
    if sp is None:
        raise FeatxError(f"{manifest}:{lineno}: split {raw!r} is not one of {', '.join(SPLIT_NAMES)} (or training, "
                         "valid, validation, testing); fix that row")
    if not p or not lab:
        raise FeatxError(f"{manifest}:{lineno}: empty path or label; fix or delete that row")
    return p, lab, sp, lineno


def _manifest_samples(rows: list[tuple], index: dict[str, int], base: Path, manifest: Path,
                      skipped: list[tuple[str, str]]) -> list[Sample]:
    """Samples for the rows whose file exists (first listing wins), ordered by split, label, key."""
    samples = []
    seen: dict[str, int] = {}
    for p, lab, sp, lineno in rows:
        full = Path(p) if os.path.isabs(p) else base / p
        where = f"listed in {manifest.name} line {lineno}"
        if not full.exists():
            why = "broken symlink" if full.is_symlink() else "missing"
            skipped.append((str(full), f"{where} but {why}"))
            continue
        if full.is_dir():
            skipped.append((str(full), f"{where} but is a folder, not an image"))
            continue
        if guards.file_reason(full):
            skipped.append((str(full), f"{where} but is {guards.file_reason(full)}"))
            continue
        try:
            key = full.resolve().relative_to(base).as_posix()
        except ValueError:  # outside the manifest's folder: keep the absolute path as the key
            key = full.resolve().as_posix()
        if key in seen:
            skipped.append((str(full), f"{where} is a duplicate of line {seen[key]}; only the first is used"))
            continue
        seen[key] = lineno
        samples.append(Sample(str(full), key, index[lab], sp))
    order = {s: i for i, s in enumerate(SPLIT_NAMES)}
    samples.sort(key=lambda s: (order[s.split], s.label, s.key))
    return samples
