"""Which data root may featx read image files from?  Only one the user gave on this machine.

Why: a cache declares the folder its images came from (attribute ``root``), and the report
shows thumbnails of them.  A cache from a stranger declaring ``root="/"`` and a path such as
``home/me/private.jpg`` would otherwise put that file into ``report.html``.  ``featx embed DATA``
signs the root it was given with a key private to this user account (HMAC-SHA256, the key in
``~/.config/featx/local.key`` or ``$FEATX_KEY_FILE``); readers of image files use the cache's
root only when that signature verifies, so neither a foreign cache nor an edited ``root`` can
send featx to read files.  The key is used only when nobody else can know or choose it: a regular
file of at least 32 bytes, yours, readable by you alone, in a folder of yours; it is written whole
or not at all (a full disk leaves no empty key that anyone could sign with).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import stat
from pathlib import Path

from ...base.io import fsync_dir

log = logging.getLogger(__name__)

_PROCESS_KEY = secrets.token_bytes(32)  # when no key file can be kept: trusted within this process only


def key_file() -> Path:
    if os.environ.get("FEATX_KEY_FILE"):
        return Path(os.environ["FEATX_KEY_FILE"])
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "featx" / "local.key"


KEY_BYTES = 32
_WARNED: set[str] = set()


class _Unsafe(Exception):
    """The key file exists but must not be used (the message says why)."""


def _read_key(path: Path) -> bytes | None:
    """The bytes of the key file, None when there is none; _Unsafe when another user could know or choose it.

    The file (symlinks followed) must be a regular file that this user owns and no one else may read,
    in a folder this user owns that others cannot write: a planted ``~/.config/featx`` (a link to another
    user's folder holding a world-readable key) is refused, as is a symbolic link that points nowhere.
    """
    me = os.geteuid() if hasattr(os, "geteuid") else None
    try:
        folder = os.stat(path.parent)
    except FileNotFoundError:
        return None
    if me is not None and folder.st_uid != me:
        raise _Unsafe(f"its folder {path.parent} belongs to another user (uid {folder.st_uid})")
    if me is not None and folder.st_mode & stat.S_IWOTH:
        raise _Unsafe(f"everyone may write its folder {path.parent}")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        if os.path.lexists(path):
            raise _Unsafe("it is a symbolic link to nothing") from None
        return None
    except OSError as exc:
        raise _Unsafe(f"it cannot be read ({exc.strerror or exc})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _Unsafe("it is not a regular file")
        if me is not None and st.st_uid != me:
            raise _Unsafe(f"it belongs to another user (uid {st.st_uid})")
        if me is not None and st.st_mode & 0o077:
            raise _Unsafe(f"others may read it (mode {stat.S_IMODE(st.st_mode):o}, expected 600)")
        return os.read(fd, 4096)
    finally:
        os.close(fd)


def _write_key(path: Path, *, replace: bool) -> None:
    """A new random key at ``path``, complete or not at all (a full disk leaves no empty key behind).

    Written under a temporary name and then linked into place, so two processes creating it at once
    agree on one key (the second link fails and both read the first); ``replace`` swaps out a short file.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_bytes(KEY_BYTES))
            fh.flush()
            os.fsync(fh.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass  # another process made one meanwhile: both use it
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def _key() -> bytes:
    """This user's signing key: read, made when missing, remade when short; else a key for this process only."""
    path = key_file()
    try:
        data = _read_key(path)
        if data is not None and len(data) >= KEY_BYTES:
            return data
        if data is not None:
            log.warning("the featx key %s is %d bytes long, not %d (a full disk when it was made?); a new one replaces "
                        "it, and caches signed with it are trusted again once embedded again", path, len(data),
                        KEY_BYTES)
        _write_key(path, replace=data is not None)
        data = _read_key(path)
        if data is not None and len(data) >= KEY_BYTES:
            return data
        raise OSError(f"it holds {len(data or b'')} bytes after it was written")
    except _Unsafe as exc:
        _warn_once(path, f"the featx key {path} is not used: {exc}. Data roots are trusted within this process only; "
                         f"remove it (or the folder link) so that featx makes a new one, or set FEATX_KEY_FILE to a "
                         "file of your own")
    except OSError as exc:
        _warn_once(path, f"cannot keep a featx key in {path} ({exc.strerror or exc}): data roots are trusted within "
                         "this process only", level=logging.INFO)
    return _PROCESS_KEY


def _warn_once(path: Path, message: str, *, level: int = logging.WARNING) -> None:
    if f"{path}\0{message}" not in _WARNED:
        _WARNED.add(f"{path}\0{message}")
        log.log(level, "%s", message)


def sign_root(root: str, fingerprint: str) -> str:
    """The signature ``featx embed`` stores beside the data root it was given (attribute ``root_mac``)."""
    msg = f"featx-root/1\0{root}\0{fingerprint}".encode("utf-8", "surrogateescape")
    return hmac.new(_key(), msg, hashlib.sha256).hexdigest()


def trusted_root(meta: dict, *, what: str) -> str:
    """The cache's data root when ``featx embed`` on this machine gave it, else "" (and a warning saying why)."""
    root, mac = str(meta.get("root") or ""), meta.get("root_mac")
    if not root:
        return ""
    if isinstance(mac, str) and hmac.compare_digest(mac, sign_root(root, str(meta.get("fingerprint", "")))):
        return root
    log.warning("%s: the cache declares data root %s, but it was not written by `featx embed` on this machine for "
                "this user (or the root was edited), so no image file is read from it; embed the images here "
                "(`featx embed DATA --overwrite`) to use them", what, root)
    return ""
