"""The run folder of a fine-tune: its key, its lock, and the reuse of a finished result.

Why: ``<out_dir>/finetune-<strategy>-<key>/`` is keyed by a digest of every setting that
changes the result (cache fingerprint, the rows of each split, strategy, hyper-parameters), so
the same command finds its own checkpoint and a different command never picks up a stale one;
a lock keeps two processes from training into the same folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock, Timeout

from ..base.errors import FeatxError
from ..base.io import json_default, write_json
from .checkpoint import CHECKPOINT_VERSION
from .settings import FinetuneSettings

log = logging.getLogger(__name__)


def digest(obj) -> str:
    """sha256 of ``obj`` as canonical JSON."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=json_default).encode()).hexdigest()


def rows_digest(keys: list[str], labels: np.ndarray, rows: np.ndarray) -> str:
    """sha256 over the (key, label) of each row, in order: the identity of a split."""
    h = hashlib.sha256()
    for r in rows:
        h.update(keys[int(r)].encode("utf-8", "surrogateescape"))
        h.update(b"\0")
        h.update(str(int(labels[int(r)])).encode())
        h.update(b"\n")
    return h.hexdigest()


def run_key(fc, settings: FinetuneSettings, labels: np.ndarray, rows: dict[str, np.ndarray],
            features: dict | None = None) -> tuple[str, dict]:
    """(key, the object it digests) for a fine-tune of cache ``fc`` on ``rows`` (fit, val, eval).

    ``features``: where the ``head`` strategy's features come from (:mod:`featx.finetune.features`);
    None for the networks trained on images, whose keys stay those of earlier versions.
    """
    keys = fc.keys()
    key_obj = {
        "settings": asdict(settings),
        "cache_fingerprint": fc.fingerprint,
        "classes": fc.classes,
        **{name: rows_digest(keys, labels, rows[name]) for name in ("fit", "val", "eval")},
        "version": CHECKPOINT_VERSION,
    }
    if features is not None:
        key_obj["features"] = features
    return digest(key_obj), key_obj


@dataclass(frozen=True)
class RunDir:
    """The files of one run folder."""

    path: Path

    @property
    def last(self) -> Path:
        return self.path / "last.pt"

    @property
    def best(self) -> Path:
        return self.path / "best.pt"

    @property
    def result(self) -> Path:
        return self.path / "result.json"


def open_run_dir(base: Path, strategy: str, key: str) -> tuple[RunDir, FileLock]:
    """Create the run folder and take its lock (refused while another process holds it)."""
    run = RunDir(base / f"finetune-{strategy}-{key[:10]}")
    run.path.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(run.path / "run.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise FeatxError(
            f"another process is fine-tuning with the same settings in {run.path}; wait for it to finish "
            "(rerunning this command afterwards reuses or resumes its result), or pass another --out-dir"
        ) from None
    return run, lock


def prepare_run_dir(run: RunDir, key_obj: dict, *, overwrite: bool) -> None:
    """Drop temporaries of a killed write (and everything, with ``overwrite``); record the settings."""
    for stale in run.path.glob(".*.tmp"):  # left by a kill during a checkpoint write
        stale.unlink(missing_ok=True)
    if overwrite:
        log.info("--overwrite: discarding the checkpoints and result in %s", run.path)
        for f in run.path.iterdir():
            if f.name != "run.lock":
                shutil.rmtree(f) if f.is_dir() else f.unlink(missing_ok=True)
    write_json(run.path / "settings.json", key_obj)


def finished_result(run: RunDir, key: str) -> dict | None:
    """The saved result of this very run (same key), or None."""
    if not run.result.exists():
        return None
    try:
        done = json.loads(run.result.read_text())
    except (OSError, ValueError):
        return None
    return done if isinstance(done, dict) and done.get("key") == key else None
