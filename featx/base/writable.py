"""Output folders: checked writable before a run starts, so a long run never fails at its end."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import FeatxError
from .io import fsync_dir

log = logging.getLogger(__name__)


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


def run_key(*parts: Any) -> str:
    """Eight hex digits naming what a run read and the settings that change its results (its default folder)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:8]


def default_run_dir(kind: str, stem: str, key: str, runs_dir: str | os.PathLike = "runs") -> Path:
    """``runs/<kind>-<cache stem>-<run key>``: runs on other data or with other settings never share a folder."""
    return Path(runs_dir) / f"{kind}-{stem}-{key}"


def _fsync_tree(root: Path) -> None:
    for d, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(d, name), "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(root)


def _recover(target: Path) -> None:
    """A kill between the two renames of :func:`staged_dir` leaves only ``.NAME.old-*``: put it back."""
    if target.exists():
        return
    old = sorted(target.parent.glob(f".{target.name}.old-*"))
    if old:
        os.rename(old[-1], target)
        log.warning("restored %s from %s (a run was stopped while replacing it)", target, old[-1].name)


# A folder holding one of these was written by a featx run, and a new run may replace it whole.
RUN_MARKERS = ("metrics.json", "fewshot.json", "compare.json", "audit.json", "report.md")


def check_replaceable(target: Path, *, option: str) -> None:
    """Refuse to replace a folder that featx did not write (the user's own files would be lost)."""
    if not target.exists():
        return
    if not target.is_dir():
        raise FeatxError(f"{option} {str(target)!r} is a file, not a folder; pass a folder for the run's files")
    here = Path.cwd().resolve()
    if target.resolve() in (here, *here.parents, Path.home().resolve()):
        raise FeatxError(f"{option} {str(target)!r} is this folder, one above it or your home; pass a new folder "
                         "(a run's folder is replaced whole when the run completes)")
    names = [p.name for p in target.iterdir()]
    if names and not any(m in names for m in RUN_MARKERS):
        raise FeatxError(f"{option} {str(target)!r} holds files featx did not write (e.g. {sorted(names)[0]!r}); "
                         "pass a new or empty folder: a run's folder is replaced whole when the run completes")


@contextmanager
def staged_dir(target: str | os.PathLike, *, option: str = "--out-dir") -> Iterator[Path]:
    """A fresh temporary folder beside ``target`` to write a run into; it replaces ``target`` only when complete.

    Why: a run folder holds files that belong together (metrics.json and the heads it lists).  Writing
    into the old folder left an earlier run's heads beside a newer metrics.json, and a killed run left a
    mixture; now nothing from an earlier run survives, and a run stopped midway leaves the previous one
    intact (the temporary folder is removed, or ignored as a dot-folder if the process was killed).
    """
    target = Path(target)
    writable_dir(target.parent, option=option)
    _recover(target)
    check_replaceable(target, option=option)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    if target.exists():
        os.rename(target, old)
    os.rename(tmp, target)
    fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)
