"""Cheap checks before an image file is opened or decoded: what a hostile folder could hang or bloat.

Why: opening a FIFO named ``pipe.jpg`` blocks forever, and a 467-byte PNG of 1 x 100,000 pixels
passes Pillow's decompression-bomb limit but resizes (short side to the network's input size)
into a tensor of many gigabytes.  Both are answered with a reason before any byte is decoded,
and the file is recorded as failed (or skipped by discovery), never fatal.
"""

from __future__ import annotations

import errno
import os
import stat

from PIL import Image

MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485  # Pillow's own bomb limit: decoded pixels of one image
MAX_ASPECT = 100  # long side / short side; a 224 px short side then resizes to at most 22,400 px


def file_reason(path: str | os.PathLike) -> str | None:
    """Why ``path`` (symlinks followed) is not a regular file, or None (missing files are the caller's concern)."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
    return f"not an image file: {kind}; only regular files (and symlinks to them) are read"


class IrregularFileError(OSError):
    """The path was a regular file when it was listed, and is something else when it is opened."""


def open_regular(path: str | os.PathLike):
    """Open ``path`` for reading in binary mode, refusing anything but a regular file at the open itself.

    Why: a check before the open (:func:`file_reason`) leaves a moment in which the file can be
    replaced by a FIFO, whose blocking open would hang a worker forever.  ``O_NONBLOCK`` makes
    that open return at once, and ``fstat`` of the opened descriptor says what was opened.
    """
    flags = getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        f = open(path, "rb", opener=lambda p, fl: os.open(p, fl | flags))
    except OSError as exc:  # a socket cannot be opened at all (ENXIO): say what it is, as for a FIFO
        why = file_reason(path) if exc.errno == errno.ENXIO else None
        if why:
            raise IrregularFileError(why) from None
        raise
    try:
        mode = os.fstat(f.fileno()).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory", str(path))
        if not stat.S_ISREG(mode):
            raise IrregularFileError(file_reason(path) or "not an image file: not a regular file")
        return f  # its name is the path, as for a plain open(), so messages and Pillow see the path
    except BaseException:
        f.close()
        raise


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
