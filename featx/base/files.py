"""Regular files only: every file featx opens for reading goes through :func:`open_regular` or :func:`check_regular`.

Why: opening a FIFO for reading blocks until someone writes to it, so ``mkfifo p.h5; featx info p.h5`` (or a
FIFO as a config, a cache set, a saved head or the newest ``*.h5`` of a cache folder) would hang for ever.
Sockets and devices are refused for the same reason (a device can be endless: ``/dev/zero``).  The check
before an open that another library does itself (HDF5, pyarrow) is :func:`check_regular`; a read featx does
itself opens with ``O_NONBLOCK`` and looks at what it opened (:func:`open_regular`), so a file swapped for a
FIFO between a check and the open cannot hang it either.
"""

from __future__ import annotations

import errno
import os
import stat

from .errors import FeatxError

ONLY_REGULAR = "only regular files (and symlinks to them) are read"


class IrregularFileError(OSError):
    """The path is a FIFO, socket or device (or was replaced by one after it was listed)."""


def irregular_kind(path: str | os.PathLike) -> str | None:
    """What ``path`` (symlinks followed) is when it is neither a regular file nor a folder, else None
    (a missing file is the caller's concern)."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")


def check_regular(path: str | os.PathLike, what: str) -> None:
    """Raise FeatxError naming ``what`` (``cache``, ``--config``, ...) and ``path`` when it is a FIFO, socket or
    device; regular files, folders and missing paths pass (the caller says what is wrong with those)."""
    kind = irregular_kind(path)
    if kind:
        raise FeatxError(f"{what} {str(path)!r} is {kind}, not a regular file; {ONLY_REGULAR}: pass a regular file")


def open_regular(path: str | os.PathLike, refused: str = "not a regular file"):
    """Open ``path`` for reading in binary mode, refusing anything but a regular file at the open itself
    (IrregularFileError, an OSError whose text is ``refused: <kind>; only regular files ... are read``).

    ``O_NONBLOCK`` makes the open of a FIFO return at once, and ``fstat`` of the opened descriptor says what
    was opened; a socket cannot be opened at all (ENXIO) and is named as such.
    """
    flags = getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        f = open(path, "rb", opener=lambda p, fl: os.open(p, fl | flags))
    except OSError as exc:
        kind = irregular_kind(path) if exc.errno == errno.ENXIO else None
        if kind:
            raise IrregularFileError(f"{refused}: {kind}; {ONLY_REGULAR}") from None
        raise
    try:
        mode = os.fstat(f.fileno()).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory", str(path))
        if not stat.S_ISREG(mode):
            raise IrregularFileError(f"{refused}: {irregular_kind(path) or 'not a regular file'}; {ONLY_REGULAR}")
        return f  # its name is the path, as for a plain open(), so messages and Pillow see the path
    except BaseException:
        f.close()
        raise


def read_regular(path: str | os.PathLike, what: str, limit: int | None = None) -> bytes:
    """The bytes of the regular file ``path`` (at most ``limit + 1`` of them when a limit is given, so that the
    caller can tell a file over its bound); a FIFO, socket or device is a FeatxError naming ``what``.
    Other OSErrors (missing, unreadable) are raised as they are."""
    try:
        with open_regular(path) as fh:
            return fh.read() if limit is None else fh.read(limit + 1)
    except IrregularFileError as exc:
        raise FeatxError(f"{what} {str(path)!r} is {str(exc).split(': ', 1)[-1].split(';')[0]}, not a regular "
                         f"file; {ONLY_REGULAR}: pass a regular file") from None
