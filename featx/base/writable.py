"""Output folders: checked writable before a run starts, so a long run never fails at its end."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import FeatxError


def writable_dir(path: str | os.PathLike, *, option: str) -> Path:
    """``path`` created if needed and proven writable (a temporary file written and removed), or a FeatxError."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=p, prefix=".featx-write-test-"):
            pass
    except OSError as exc:
        raise FeatxError(f"{option} {str(p)!r}: cannot write there ({exc.strerror or type(exc).__name__}); "
                         f"pass a writable folder with {option}") from None
    return p
