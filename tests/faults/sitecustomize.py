"""Fault injection for the kill-and-resume tests, kept out of featx itself.

A test that starts featx in another process (a subprocess, or Ray workers) puts this folder first on
its PYTHONPATH (``conftest.fault_env``); Python imports this module at start-up, and it patches featx
only when one of these variables is set:

- ``FEATX_TEST_CHUNK_DELAY=S``: sleep S seconds after each committed chunk file (a run to kill mid-way);
- ``FEATX_TEST_STEP_DELAY=S``: sleep S seconds after each fine-tune training step;
- ``FEATX_TEST_RAY_KILL=PATH``: the first process to rename PATH kills itself with SIGKILL after embedding a
  chunk and before committing it, once per arming (a Ray actor dying mid-chunk).
"""

from __future__ import annotations

import functools
import os
import signal
import time


def _after(cls, name: str, seconds: float) -> None:
    orig = getattr(cls, name)

    @functools.wraps(orig)
    def slowed(*args, **kwargs):
        out = orig(*args, **kwargs)
        time.sleep(seconds)
        return out

    setattr(cls, name, slowed)


def _kill_before_commit(cls, armed: str) -> None:
    orig = cls.write_chunk

    @functools.wraps(orig)
    def write_chunk(self, chunk, **kwargs):
        try:
            os.rename(armed, armed + ".fired")  # atomic: one process wins
        except OSError:
            return orig(self, chunk, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)

    cls.write_chunk = write_chunk


def _install() -> None:
    chunk_delay = float(os.environ.get("FEATX_TEST_CHUNK_DELAY") or 0)
    step_delay = float(os.environ.get("FEATX_TEST_STEP_DELAY") or 0)
    ray_kill = os.environ.get("FEATX_TEST_RAY_KILL")
    if chunk_delay or ray_kill:
        from featx.cache.parts import PartsDir

        if chunk_delay:
            _after(PartsDir, "write_chunk", chunk_delay)
        if ray_kill:
            _kill_before_commit(PartsDir, ray_kill)
    if step_delay:
        from featx.finetune.loop import Trainer

        _after(Trainer, "train_step", step_delay)


_install()
