"""Cheap checks before an image file is opened or decoded: what a hostile folder could hang or bloat.

Why: opening a FIFO named ``pipe.jpg`` blocks forever, and a 467-byte PNG of 1 x 100,000 pixels
passes Pillow's decompression-bomb limit but resizes (short side to the network's input size)
into a tensor of many gigabytes.  Both are answered with a reason before any byte is decoded,
and the file is recorded as failed (or skipped by discovery), never fatal.
"""

from __future__ import annotations

import os

from PIL import Image

from ..base import files
from ..base.files import ONLY_REGULAR, IrregularFileError, irregular_kind  # noqa: F401 - IrregularFileError: its former home

MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485  # Pillow's own bomb limit: decoded pixels of one image
MAX_ASPECT = 100  # long side / short side; a 224 px short side then resizes to at most 22,400 px


def file_reason(path: str | os.PathLike) -> str | None:
    """Why ``path`` (symlinks followed) is not a regular file, or None (missing files are the caller's concern)."""
    kind = irregular_kind(path)
    return f"not an image file: {kind}; {ONLY_REGULAR}" if kind else None


def open_regular(path: str | os.PathLike):
    """Open ``path`` for reading in binary mode, refusing anything but a regular file at the open itself.

    Why: a check before the open (:func:`file_reason`) leaves a moment in which the file can be
    replaced by a FIFO, whose blocking open would hang a worker forever (:func:`featx.base.files.open_regular`:
    ``O_NONBLOCK``, then ``fstat`` of what was opened).
    """
    return files.open_regular(path, refused="not an image file")


def size_reason(size: tuple[int, int]) -> str | None:
    """Why an image of ``size`` (from its header, before decoding) must not be decoded, or None."""
    w, h = int(size[0]), int(size[1])
    if w < 1 or h < 1:
        return f"image has no pixels ({w} x {h})"
    if w * h > MAX_PIXELS:
        return f"image too large: {w} x {h} pixels is more than {MAX_PIXELS} (decoded-pixel limit)"
    if max(w, h) > MAX_ASPECT * min(w, h):
        return (f"image shape {w} x {h} has an aspect ratio beyond {MAX_ASPECT}:1 (resizing it would make a huge "
                "tensor)")
    return None
