"""benchmarks/gpu_smoke.sh --dry-run: the GPU machine's first script checks its own commands here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_smoke_dry_run_checks_its_commands_and_skips_cuda_steps(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_smoke.sh"), "--dry-run"], capture_output=True,
                       text=True, env=env, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    skipped = [ln for ln in out.splitlines() if ln.startswith("skip (dry run, no GPU): ")]
    # nvidia-smi, GPU embed, GPU-vs-CPU comparison, GPU probe, CUDA compare, three benchmarks: one line each
    assert len(skipped) == 8, skipped
    assert "cosine min 1.00000" in out and "== done" in out
    assert "FAILED" not in out
