"""Locks of a cache: ``NAME.h5.lock`` (one writer) and ``NAME.h5.shards.lock`` (shards vs assembly).

The lock files stay after a run: removing a lock file while another process waits on it would let two
writers hold "the" lock at once (each on a different file), so they are left in place, empty.
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

from ..base.errors import CacheLockedError, FeatxError
from .parts import why

log = logging.getLogger(__name__)


def acquire_lock(path: Path, *, wait: bool = True):
    """Hold ``path.lock`` while writing; a second writer waits, or fails fast with ``wait=False``."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(path) + ".lock")
    try:
        lock.acquire(timeout=0)
        return lock
    except Timeout:
        if not wait:
            raise CacheLockedError(
                f"another featx process is writing {path}; wait for it to finish, or drop --no-wait to wait "
                "for it automatically"
            ) from None
    except OSError as exc:  # after Timeout, which is an OSError too
        raise FeatxError(
            f"cannot create the lock file {path}.lock ({why(exc)}); pass a writable --cache-dir or --cache"
        ) from None
    log.warning("another featx process is writing %s; waiting for it to finish", path)
    lock.acquire()
    return lock


class PartsLock:
    """``NAME.h5.shards.lock``: ``--shard`` runs hold it shared while they add chunk files; a run
    that assembles the finished cache (or removes ``.parts``) holds it exclusively.

    So shards run side by side on one or many machines (``flock`` works across NFS clients),
    while a cache is never assembled from a ``.parts`` folder that a shard is still filling:
    it would lack that shard's rows.  The writer lock (:func:`acquire_lock`) stays separate:
    a shard never holds it, so it never blocks another shard.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(str(path) + ".shards.lock")
        self.cache = Path(path)
        self._fd: int | None = None

    def acquire(self, *, shared: bool, wait: bool = True) -> "PartsLock":
        """Take the lock; when it is busy, wait with a log line that says why, or raise with ``wait=False``."""
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise FeatxError(
                f"cannot create the lock file {self.path} ({why(exc)}); pass a writable --cache-dir or --cache"
            ) from None
        mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        try:
            fcntl.flock(self._fd, mode | fcntl.LOCK_NB)
            return self
        except BlockingIOError:
            pass
        if shared:
            busy = (f"another featx run is embedding into or assembling {self.cache}; this shard "
                    "continues when it has finished")
            fix = "wait for that run to finish, or drop --no-wait to wait for it automatically"
        else:
            busy = (f"--shard run(s) are still adding chunks to {self.cache}.parts; assembling the cache now "
                    "would leave out their images, so this run waits for them to finish")
            fix = "rerun after every --shard run has finished, or drop --no-wait to wait for them"
        if not wait:
            self.release()
            raise CacheLockedError(f"{busy.split(';')[0]}; {fix}")
        log.warning("%s", busy)
        fcntl.flock(self._fd, mode)
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> "PartsLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
