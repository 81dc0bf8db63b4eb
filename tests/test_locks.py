"""Writer and shard locks (cache/locks.py): a second writer waits or fails fast with a message that says why."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from featx.base.errors import CacheLockedError
from featx.cache.locks import PartsLock, acquire_lock

from conftest import wait_for


def test_acquire_lock_fails_fast_while_another_process_writes(tmp_path: Path) -> None:
    cache = tmp_path / "c.h5"
    ready = tmp_path / "held"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from filelock import FileLock
        lock = FileLock({str(cache) + '.lock'!r}); lock.acquire()
        open({str(ready)!r}, "w").close()
        sys.stdin.read()
    """)], stdin=subprocess.PIPE)
    try:
        wait_for(lambda: ready.exists() or holder.poll() is not None, timeout=60, what="the lock holder")
        with pytest.raises(CacheLockedError, match="another featx process is writing .*--no-wait"):
            acquire_lock(cache, wait=False)
    finally:
        holder.communicate(b"", timeout=60)
    lock = acquire_lock(cache, wait=False)  # free again once the holder has gone
    assert lock.is_locked
    lock.release()


def test_acquire_lock_in_a_folder_that_cannot_hold_it_is_a_one_line_error(tmp_path: Path) -> None:
    from featx.base.errors import FeatxError

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(FeatxError, match="cannot create the lock file"):
        acquire_lock(blocker / "c.h5")


def test_shards_share_the_parts_lock_and_assembly_excludes_them(tmp_path: Path) -> None:
    cache = tmp_path / "c.h5"
    with PartsLock(cache).acquire(shared=True) as a, PartsLock(cache).acquire(shared=True, wait=False):
        assert a.path == Path(str(cache) + ".shards.lock") and a.path.exists()
        with pytest.raises(CacheLockedError, match="--shard run"):
            PartsLock(cache).acquire(shared=False, wait=False)  # assembling now would miss the shards' rows
    with PartsLock(cache).acquire(shared=False):
        with pytest.raises(CacheLockedError, match="another featx run is embedding into or assembling"):
            PartsLock(cache).acquire(shared=True, wait=False)
    PartsLock(cache).acquire(shared=False, wait=False).release()  # all released
