"""Checks made before any work (config/early.py and the option checks of embed): bad options and paths
that do not exist are one ``error:`` line that says what to fix."""

from __future__ import annotations

from pathlib import Path

import pytest

import conftest
from conftest import TINY_CPU as TINY
from conftest import assert_clean_error, run_cli


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--backbone", "efficientnet_lite"], ["unknown backbone 'efficientnet_lite'", "Did you mean efficientnet_lite0",
                                               "tiny_cnn", "resnet50"]),
        (["--backbone", "resnet5"], ["Did you mean resnet50"]),
        (["--batch-size", "0"], ["--batch-size must be a positive integer, got 0"]),
        (["--chunk-size", "-3"], ["--chunk-size must be a positive integer"]),
        (["--workers", "-1"], ["--workers must be >= 0"]),
        (["--limit", "0"], ["--limit must be a positive integer"]),
        (["--device", "tpu"], ["--device 'tpu'", "auto, cpu, cuda"]),
        (["--weights", "/nonexistent/w.pth"], ["--weights", "file not found"]),
    ],
    ids=["unknown-backbone", "close-match", "batch-size-0", "chunk-size", "workers", "limit", "device", "weights"],
)
def test_bad_embed_options(tiny_data: Path, tmp_path: Path, args: list[str], needles: list[str]) -> None:
    res = run_cli("embed", tiny_data, "--cache-dir", tmp_path, *conftest.TINY_CLI, *args)
    assert_clean_error(res, *needles)
    assert not list(tmp_path.glob("*.h5"))


def test_nonexistent_paths(tmp_path: Path) -> None:
    assert_clean_error(run_cli("embed", tmp_path / "nope", "--cache-dir", tmp_path, *TINY), "does not exist")
    assert_clean_error(run_cli("embed", "--manifest", tmp_path / "nope.csv", "--cache-dir", tmp_path, *TINY),
                       "does not exist", "path,label")
    assert_clean_error(run_cli("info", tmp_path / "nope.h5"), "does not exist", "featx embed")
    assert_clean_error(run_cli("info", "--cache-dir", tmp_path / "empty"), "no cache in")
