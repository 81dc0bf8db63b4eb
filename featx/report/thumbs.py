"""Small JPEG thumbnails of data set images, made once, never from outside the data set root.

Why: the report shows misclassified images; a 96 px JPEG is ~3 kB, so 60 of them keep the
page light, and ``thumbs/`` in the run folder keeps them for the next report.  A path that
resolves outside the data set root (``../``, an absolute manifest path elsewhere, a symlink
leading out) is refused: a shared data folder must not make the report embed other files.
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import os
from pathlib import Path

from PIL import Image, ImageOps

from ..base.io import atomic_write_bytes
from ..data.guards import file_reason

log = logging.getLogger(__name__)

THUMB_PX = 96
THUMB_QUALITY = 80


def inside_root(root: str | os.PathLike, key: str) -> Path | None:
    """The resolved image path for ``key`` if it lies inside ``root`` (symlinks followed), else None."""
    if not root:
        return None
    base = Path(root).resolve()
    try:
        p = (base / key).resolve()  # an absolute key replaces base: checked like any other
    except (OSError, RuntimeError, ValueError):  # symlink loops, NUL bytes
        return None
    return p if p.is_relative_to(base) and p != base else None


def _thumb_name(key: str, src: Path, px: int) -> str:
    try:
        st = src.stat()
        stamp = f"{st.st_mtime_ns}:{st.st_size}"
    except OSError:
        stamp = "?"
    return hashlib.sha256(f"{key}\0{stamp}\0{px}".encode("utf-8", "surrogateescape")).hexdigest()[:20] + ".jpg"


def make_thumbnail(root: str | os.PathLike, key: str, thumbs_dir: str | os.PathLike, *, px: int = THUMB_PX) -> Path | None:
    """``thumbs_dir/<hash>.jpg`` for image ``key`` under ``root``; None (and a log line) when refused or unreadable.

    The name hashes the key, the file's mtime and size, so an edited image gets a new thumbnail
    and an unchanged one is never decoded twice.
    """
    src = inside_root(root, key)
    if src is None:
        log.warning("report: %r is outside the data set root %s; no thumbnail", key, root)
        return None
    out = Path(thumbs_dir) / _thumb_name(key, src, px)
    if out.is_file():
        return out
    why = file_reason(src)
    if why:
        log.warning("report: no thumbnail of %s (%s)", src, why)
        return None
    try:
        with Image.open(src) as im:
            im.draft("RGB", (px * 2, px * 2))  # JPEG: decode at reduced size, much faster
            im = ImageOps.exif_transpose(im).convert("RGB")
            im.thumbnail((px, px), Image.Resampling.LANCZOS)
            out.parent.mkdir(parents=True, exist_ok=True)
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=THUMB_QUALITY, optimize=True)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        log.warning("report: cannot make a thumbnail of %s (%s)", src, exc)
        return None
    atomic_write_bytes(out, buf.getvalue())
    return out


def data_uri(path: str | os.PathLike, mime: str | None = None) -> str:
    """The file as a ``data:`` URI, so that report.html is one self-contained file."""
    p = Path(path)
    if mime is None:
        mime = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml"}.get(
            p.suffix.lower(), "application/octet-stream")
    return f"data:{mime};base64," + base64.b64encode(p.read_bytes()).decode("ascii")
