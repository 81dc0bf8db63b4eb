"""Which data root may featx read image files from?  Only one the user gave on this machine.

Why: a cache declares the folder its images came from (attribute ``root``), and the report
shows thumbnails of them.  A cache from a stranger declaring ``root="/"`` and a path such as
``home/me/private.jpg`` would otherwise put that file into ``report.html``.  ``featx embed DATA``
signs the root it was given with a key private to this user account (HMAC-SHA256, the key in
``~/.config/featx/local.key`` or ``$FEATX_KEY_FILE``); readers of image files use the cache's
root only when that signature verifies, so neither a foreign cache nor an edited ``root`` can
send featx to read files.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from pathlib import Path

log = logging.getLogger(__name__)

_PROCESS_KEY = secrets.token_bytes(32)  # when no key file can be kept: trusted within this process only


def key_file() -> Path:
    if os.environ.get("FEATX_KEY_FILE"):
        return Path(os.environ["FEATX_KEY_FILE"])
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "featx" / "local.key"


def _key() -> bytes:
    path = key_file()
    try:
        data = path.read_bytes()
        if len(data) >= 32:
            return data
    except OSError:
        pass
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_bytes(32))
            fh.flush()
            os.fsync(fh.fileno())
        return path.read_bytes()
    except FileExistsError:  # another process created it meanwhile
        return path.read_bytes()
    except OSError as exc:
        log.info("cannot keep a featx key in %s (%s): data roots are trusted within this process only", path, exc)
        return _PROCESS_KEY


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
