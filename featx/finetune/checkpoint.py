"""Checkpoints of a fine-tune: written atomically, read back with every random state.

Why: a kill at any instant must leave either the previous checkpoint or the new one, and a
resumed run must draw the same data order and (with ``num_workers=0``) the same augmentations
as a run that was never interrupted, so that it ends at the same weights.
"""

from __future__ import annotations

import logging
import os
import random
import uuid
from pathlib import Path

import numpy as np
import torch

from ..base.errors import FeatxError
from ..base.io import atomic_commit

log = logging.getLogger(__name__)

# 2: early stopping judged on a smoothed score in the anneal only (older checkpoints start over).
CHECKPOINT_VERSION = 2


def atomic_torch_save(obj, path: Path) -> None:
    """``torch.save`` to a temporary name, fsync, rename; a full disk is a FeatxError with the fix."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        torch.save(obj, tmp)
        atomic_commit(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise FeatxError(
            f"could not write checkpoint {path} ({exc.strerror or exc}); free disk space or pass another "
            "--out-dir, then rerun the same command to resume from the previous checkpoint"
        ) from exc


def rng_state(cuda: bool) -> dict:
    """torch, numpy and Python RNG states as tensors and plain values (``weights_only`` loadable)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    st = {
        "torch": torch.get_rng_state(),
        "numpy": [name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(gauss)],
        "python": random.getstate(),
    }
    if cuda:
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict, cuda: bool) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(st["torch"])
    name, keys, pos, has_gauss, gauss = st["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if cuda and "cuda" in st:
        try:
            torch.cuda.set_rng_state_all(st["cuda"])
        except RuntimeError:  # a different number of GPUs than when saved
            pass


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def load_last(path: Path, key: str) -> dict | None:
    """The checkpoint at ``path`` if it belongs to the run ``key``; a damaged one is set aside."""
    if not path.exists():
        return None
    try:
        # On the CPU: RNG states must stay CPU tensors; load_state_dict moves the rest to the device.
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a damaged checkpoint (only possible from outside)
        log.warning("checkpoint %s is unreadable (%s); starting over", path, exc)
        os.replace(path, path.with_suffix(".damaged"))
        return None
    if ck.get("key") != key:
        log.warning("checkpoint %s belongs to other settings; starting over", path)
        return None
    return ck


def load_best_weights(net: torch.nn.Module, path: Path) -> None:
    """Put the kept (best) weights back into ``net`` before the final evaluation."""
    if path.exists():
        best = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(best["model"])
