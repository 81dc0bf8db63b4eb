"""The embedding run (embedding/runner.py): what it plans, reuses and embeds again.  CPU, ``tiny_cnn``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from featx.cache.store import FeatureCache

from conftest import TINY_CPU as TINY
from conftest import assert_ok, refuse_reading, run_cli, small_dataset


@pytest.mark.slow
def test_fixing_permissions_of_a_failed_file_is_noticed(tmp_path: Path, monkeypatch) -> None:
    data = small_dataset(tmp_path / "d", per_class=3)
    locked = data / "train" / "a" / "001.png"
    refuse_reading(monkeypatch, locked)
    cache = tmp_path / "c.h5"
    assert_ok(run_cli("embed", data, "--cache", cache, *TINY, "-q"))
    assert dict(FeatureCache(cache).failed) == {"train/a/001.png": "permission denied (cannot read the file)"}
    monkeypatch.undo()
    os.chmod(locked, 0o600)  # what the user does to fix it: ctime changes, mtime and size do not
    assert_ok(run_cli("embed", data, "--cache", cache, *TINY, "-q"))
    assert "train/a/001.png" in FeatureCache(cache).keys()
