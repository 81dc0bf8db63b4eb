"""Device resolution (base/runtime.py): asking for CUDA where there is none is a one-line error."""

from __future__ import annotations

from pathlib import Path

from conftest import TINY_CPU as TINY
from conftest import assert_clean_error, run_cli


def test_cuda_requested_where_there_is_none(tiny_data: Path, tmp_path: Path, monkeypatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    res = run_cli("embed", tiny_data, "--cache-dir", tmp_path, *TINY, "--device", "cuda")
    assert_clean_error(res, "CUDA is not available", "--device cpu")
    res = run_cli("embed", tiny_data, "--cache-dir", tmp_path, *TINY, "--engine", "gpu", "--device", "cpu")
    assert_clean_error(res, "--engine gpu needs CUDA")
