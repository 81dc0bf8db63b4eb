"""Weights files (embedding/networks/weights.py): only regular files are read (issue 31: a FIFO blocked torch.load)."""

from __future__ import annotations

import os

import pytest
import torch

from featx.base.errors import FeatxError
from featx.embedding.networks.weights import load_state_file


def test_a_fifo_as_weights_is_refused_at_once(tmp_path):
    fifo = tmp_path / "w.pth"
    os.mkfifo(fifo)
    with pytest.raises(FeatxError, match=r"--weights .*w\.pth.* is a FIFO"):
        load_state_file(str(fifo))


def test_a_state_dict_file_loads_and_a_missing_one_is_named(tmp_path):
    path = tmp_path / "w.pth"
    torch.save({"a": torch.ones(2)}, path)
    assert torch.equal(load_state_file(str(path))["a"], torch.ones(2))
    with pytest.raises(FeatxError, match="file not found"):
        load_state_file(str(tmp_path / "missing.pth"))
