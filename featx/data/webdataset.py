"""WebDataset shards (``shards/{train,test}-{000000..000099}.tar``, local or any fsspec URL) as samples.

A sample is the tar members that share a key (the member name up to the first dot of its base name, as in
webdataset itself): an image (``jpg``, ``png``, ``webp``, …) and its label (``cls``: an integer, or ``txt``:
a class name).  Discovery reads each shard's tar headers and labels once, streaming, and never extracts to
disk; an image is then read as a byte range of its shard (one ranged GET on object storage), so every
sample is addressable on its own and resume, incremental runs, ``--shard`` and Ray work unchanged.  The
image's key in the cache is its member name (``train/roses/0001.jpg``), so shards written from a folder keep
the folder's keys.  The split is ``--split NAME``, else a ``train``/``val``/``test`` part of the shard's
name, else ``train``.  Only uncompressed ``.tar`` shards can be read by range.
"""

from __future__ import annotations

import json
import logging
import os
import tarfile
from typing import Callable

from ..base.errors import FeatxError
from ..base.files import open_regular
from .folders import IMAGE_EXTENSIONS, SPLIT_NAMES, Dataset, Sample
from .inputs import class_sort_key, expand_braces, split_from_name  # noqa: F401 - expand_braces: the former home
from .remote import filesystem, is_url, refusal, stamp_of_info
from .splits import canonical_split

log = logging.getLogger(__name__)

IMAGE_EXTS = tuple(e.lstrip(".") for e in sorted(IMAGE_EXTENSIONS)) + ("ppm", "pgm")
_PREFERRED = ("jpg", "jpeg", "png", "webp")  # the image used when a sample has several
_READ_BLOCK = 8 * 1024 * 1024  # streaming block size for remote shards (headers are read in passing)
MAX_NAMES_BYTES = 16 << 20  # a classes.txt / classes.json (a million names fit)
MAX_HEADER_BYTES = 1 << 20  # a PAX header or GNU long name (a path is at most a few KB)
MAX_LABEL_BYTES = 1024  # a cls or txt member: a class number or name
_LONG_HEADERS = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
                 tarfile.GNUTYPE_LONGLINK)


class _BoundedTarInfo(tarfile.TarInfo):
    """A tar header whose extended header (PAX, GNU long name) is refused past :data:`MAX_HEADER_BYTES` before
    tarfile reads it whole (a 3 GB PAX header was a MemoryError)."""

    @classmethod
    def frombuf(cls, buf, encoding, errors):
        info = super().frombuf(buf, encoding, errors)
        if info.type in _LONG_HEADERS and info.size > MAX_HEADER_BYTES:
            raise tarfile.SubsequentHeaderError(
                f"an extended header (PAX or GNU long name) of {info.size} bytes, more than {MAX_HEADER_BYTES}")
        return info


def is_shard_pattern(text: str) -> bool:
    """Does the data argument name tar shards (``x.tar``, ``x-{000..009}.tar``, a comma-free list)?"""
    return text.endswith(".tar") or text.endswith((".tar.gz", ".tgz"))


def member_key(name: str) -> tuple[str, str]:
    """(sample key, extension) of a member name, as webdataset splits them."""
    d, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext.lower() if dot else ""


def _open(shard: str):
    """(binary file object, (stamp, size)) of a shard, or the one-line refusal."""
    if not is_url(shard):
        try:
            fh = open_regular(shard)  # a FIFO named like a shard never blocks the scan
            st = os.fstat(fh.fileno())
            return fh, (st.st_mtime_ns, st.st_size)
        except OSError as exc:
            raise FeatxError(f"shard {shard!r} cannot be read ({exc.strerror or exc}); check the pattern") from None
    fs, path = filesystem(shard)
    try:
        info = fs.info(path)
        return fs.open(path, "rb", block_size=_READ_BLOCK, cache_type="readahead"), stamp_of_info(info)
    except Exception as exc:  # noqa: BLE001 - every back-end has its own exceptions
        raise refusal(shard, exc) from None


def scan_shard(shard: str, skipped: list) -> tuple[int, list[tuple[str, str, int, int, str]]]:
    """The shard's stamp and (image member name, label text, offset, size, label kind) of every complete
    sample in it."""
    fh, (stamp, _) = _open(shard)
    groups: dict[str, dict] = {}
    order: list[str] = []
    with fh:
        try:
            with tarfile.open(fileobj=fh, mode="r:", tarinfo=_BoundedTarInfo) as tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    key, ext = member_key(m.name)
                    if key not in groups:
                        groups[key] = {}
                        order.append(key)
                    g = groups[key]
                    if ext in ("cls", "txt") and ext not in g and m.size > MAX_LABEL_BYTES:
                        skipped.append((f"{shard}:{m.name}", f"label member of {m.size} bytes (a label is a class "
                                                             f"number or name of at most {MAX_LABEL_BYTES} bytes)"))
                        g["oversized"] = True
                    elif ext in ("cls", "txt") and ext not in g:
                        raw = tf.extractfile(m).read()
                        g[ext] = raw.decode("utf-8", "replace").strip()
                    elif ext in IMAGE_EXTS:
                        g.setdefault("images", []).append((ext, m.name, m.offset_data, m.size))
        except (tarfile.TarError, OSError, EOFError) as exc:
            skipped.append((shard, f"damaged tar shard ({exc}); the samples before the damage are used"))
    return stamp, [r for key in order if (r := _sample(shard, key, groups[key], skipped))]


def _sample(shard: str, key: str, g: dict, skipped: list):
    images = sorted(g.get("images", []), key=lambda t: _PREFERRED.index(t[0]) if t[0] in _PREFERRED else 99)
    label, kind = (g["cls"], "cls") if g.get("cls") else (g.get("txt", ""), "txt")
    if g.get("oversized"):  # its label member was refused (skipped, with the reason)
        return None
    if not images:
        skipped.append((f"{shard}:{key}", "sample without an image"))
        return None
    if not label:
        skipped.append((f"{shard}:{images[0][1]}", "sample without a label (no cls or txt member)"))
        return None
    _, name, offset, size = images[0]
    return name, label, offset, size, kind


def class_names_file(path: str) -> list[str]:
    """Class names from ``classes.txt`` (one per line, line i names class i) or ``classes.json`` (a list, or
    a mapping of names to numbers or numbers to names)."""
    try:
        if is_url(path):
            fs, p = filesystem(path)
            with fs.open(p, "rb") as fh:
                text = fh.read(MAX_NAMES_BYTES + 1).decode("utf-8-sig")
        else:
            with open_regular(path) as fh:
                text = fh.read(MAX_NAMES_BYTES + 1).decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise FeatxError(f"class names file {path!r} cannot be read ({exc}); pass a classes.txt or classes.json") from None
    if len(text) > MAX_NAMES_BYTES:
        raise FeatxError(f"class names file {path!r} is larger than {MAX_NAMES_BYTES >> 20} MiB; pass a classes.txt "
                         "with one class name a line")
    if not path.lower().endswith(".json"):
        return [line.strip() for line in text.splitlines() if line.strip()]
    try:
        data = json.loads(text)
        if isinstance(data, dict):
            pairs = [(int(v), str(k)) if not str(k).lstrip("-").isdigit() else (int(k), str(v))
                     for k, v in data.items()]
            data = [n for _, n in sorted(pairs)]
        return [str(n) for n in data]
    except (ValueError, TypeError) as exc:
        raise FeatxError(f"{path}: expected a JSON list of class names or a mapping name -> number ({exc})") from None


def _beside(shards: list[str]) -> list[str] | None:
    """The names in a classes.txt or classes.json in the folder of the first shard, if there is one."""
    folder = shards[0].rsplit("/", 1)[0] if "/" in shards[0] else "."
    for name in ("classes.txt", "classes.json"):
        path = f"{folder}/{name}"
        try:
            exists = filesystem(path)[0].exists(filesystem(path)[1]) if is_url(path) else os.path.isfile(path)
        except Exception:  # noqa: BLE001 - no names file then
            exists = False
        if exists:
            log.info("class names from %s", path)
            return class_names_file(path)
    return None


def _named(label: str, kind: str, names: list[str] | None, where: str) -> str:
    if names is None or kind != "cls":
        return label
    if class_sort_key(label)[0] != 0 or not 0 <= int(label) < len(names):  # ², 9 x 5000, -1: no class number
        raise FeatxError(f"{where}: class number {label[:40]!r} has no name in the class names file ({len(names)} "
                         "names); fix the file or --class-names")
    return names[int(label)]


def discover_shards(pattern, *, split: str | None, locator: Callable, root: str | None = None,
                    class_names: str | None = None) -> Dataset:
    """Every sample of the shards named (a pattern, or a list of (shard, split from its name)), in shard order."""
    files = [(f, split_from_name(f)) for f in expand_braces(pattern)] if isinstance(pattern, str) else list(pattern)
    if any(f.endswith((".tar.gz", ".tgz")) for f, _ in files):
        raise FeatxError(f"{files[0][0]}: compressed shards cannot be read image by image; repack them as plain .tar")
    if split is not None and canonical_split(split) is None:
        raise FeatxError(f"--split {split!r}: expected one of {', '.join(SPLIT_NAMES)}")
    names = class_names_file(class_names) if class_names else _beside([f for f, _ in files])
    skipped: list[tuple[str, str]] = []
    rows, seen = [], {}
    for shard, name_split in files:
        shard_split = canonical_split(split) if split else name_split or "train"
        url = shard if is_url(shard) else os.path.abspath(shard)
        stamp, found = scan_shard(shard, skipped)
        for name, label, offset, size, kind in found:
            key = name
            if key in seen and seen[key][1] != shard_split:  # splits written with the same keys (sample000000, ...)
                key = f"{shard_split}/{name}"
            if key in seen:
                skipped.append((f"{shard}:{name}", f"duplicate key (also in {seen[key][0]}); only the first is used"))
                continue
            seen[key] = (shard, shard_split)
            rows.append((locator("rng", url, stamp, size, offset), key, _named(label, kind, names, f"{shard}:{name}"),
                         kind, shard_split))
    where = pattern if isinstance(pattern, str) else " ".join(f for f, _ in files[:3])
    if not rows:
        raise FeatxError(f"no labelled images found in the shards {where}; a sample needs an image member "
                         "(jpg, png, webp, ...) and a cls or txt label")
    for p, reason in skipped:
        log.warning("skipped %s: %s", p, reason)
    present = {r[2] for r in rows}
    classes = sorted(present, key=class_sort_key)
    if names:
        classes = [c for c in dict.fromkeys(names) if c in present] + [c for c in classes if c not in names]
    index = {c: i for i, c in enumerate(classes)}
    order = {s: i for i, s in enumerate(SPLIT_NAMES)}
    samples = [Sample(loc, name, index[label], sp) for loc, name, label, _, sp in rows]
    samples.sort(key=lambda s: order[s.split])  # stable: shard order within a split
    return Dataset(root or (pattern if isinstance(pattern, str) else where), classes, samples, "webdataset", skipped)
