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

import logging
import os
import re
import tarfile
from typing import Callable

from ..base.errors import FeatxError
from .folders import IMAGE_EXTENSIONS, SPLIT_NAMES, Dataset, Sample
from .remote import filesystem, is_url, refusal, stamp_of_info

log = logging.getLogger(__name__)

IMAGE_EXTS = tuple(e.lstrip(".") for e in sorted(IMAGE_EXTENSIONS)) + ("ppm", "pgm")
_PREFERRED = ("jpg", "jpeg", "png", "webp")  # the image used when a sample has several
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(\d+)\.\.(\d+)$")
_SPLIT_IN_NAME = re.compile(r"(?<![a-z])(train|val|valid|validation|test)(?![a-z])")
_SPLIT_ALIAS = {"valid": "val", "validation": "val"}
_READ_BLOCK = 8 * 1024 * 1024  # streaming block size for remote shards (headers are read in passing)


def is_shard_pattern(text: str) -> bool:
    """Does the data argument name tar shards (``x.tar``, ``x-{000..009}.tar``, a comma-free list)?"""
    return text.endswith(".tar") or text.endswith((".tar.gz", ".tgz"))


def expand_braces(pattern: str) -> list[str]:
    """webdataset's brace patterns: ``{000..099}`` (zero-padded ranges) and ``{a,b}`` alternatives, nested."""
    m = _BRACE.search(pattern)
    if not m:
        return [pattern]
    body, head, tail = m.group(1), pattern[: m.start()], pattern[m.end():]
    rng = _RANGE.match(body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    return [x for opt in options for x in expand_braces(head + opt + tail)]


def split_from_name(shard: str) -> str | None:
    m = _SPLIT_IN_NAME.findall(os.path.basename(shard).lower())
    return _SPLIT_ALIAS.get(m[-1], m[-1]) if m else None


def member_key(name: str) -> tuple[str, str]:
    """(sample key, extension) of a member name, as webdataset splits them."""
    d, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext.lower() if dot else ""


def _open(shard: str):
    """(binary file object, (stamp, size)) of a shard, or the one-line refusal."""
    if not is_url(shard):
        try:
            st = os.stat(shard)
            return open(shard, "rb"), (st.st_mtime_ns, st.st_size)
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
            with tarfile.open(fileobj=fh, mode="r:") as tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    key, ext = member_key(m.name)
                    if key not in groups:
                        groups[key] = {}
                        order.append(key)
                    g = groups[key]
                    if ext in ("cls", "txt") and ext not in g:
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
    if not images:
        skipped.append((f"{shard}:{key}", "sample without an image"))
        return None
    if not label:
        skipped.append((f"{shard}:{images[0][1]}", "sample without a label (no cls or txt member)"))
        return None
    _, name, offset, size = images[0]
    return name, label, offset, size, kind


def discover_shards(pattern: str, *, split: str | None, locator: Callable) -> Dataset:
    """Every sample of the shards ``pattern`` names, in shard order; refuses a shard that does not exist."""
    if pattern.endswith((".tar.gz", ".tgz")):
        raise FeatxError(f"{pattern}: compressed shards cannot be read image by image; repack them as plain .tar")
    if split is not None and split not in SPLIT_NAMES:
        raise FeatxError(f"--split {split!r}: expected one of {', '.join(SPLIT_NAMES)}")
    shards = expand_braces(pattern)
    skipped: list[tuple[str, str]] = []
    rows, seen = [], {}
    for shard in shards:
        shard_split = split or split_from_name(shard) or "train"
        url = shard if is_url(shard) else os.path.abspath(shard)
        stamp, found = scan_shard(shard, skipped)
        for name, label, offset, size, kind in found:
            if name in seen:
                skipped.append((f"{shard}:{name}", f"duplicate key (also in {seen[name]}); only the first is used"))
                continue
            seen[name] = shard
            rows.append((locator("rng", url, stamp, size, offset), name, label, kind, shard_split))
    if not rows:
        raise FeatxError(f"no labelled images found in the shards {pattern}; a sample needs an image member "
                         "(jpg, png, webp, ...) and a cls or txt label")
    for p, reason in skipped:
        log.warning("skipped %s: %s", p, reason)
    classes = sorted({r[2] for r in rows}, key=lambda c: (0, int(c), c) if c.lstrip("-").isdigit() else (1, 0, c))
    index = {c: i for i, c in enumerate(classes)}
    order = {s: i for i, s in enumerate(SPLIT_NAMES)}
    samples = [Sample(loc, name, index[label], sp) for loc, name, label, _, sp in rows]
    samples.sort(key=lambda s: order[s.split])  # stable: shard order within a split
    return Dataset(pattern, classes, samples, "webdataset", skipped)
