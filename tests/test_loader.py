"""Config files (config/loader.py): unknown keys, wrong types and bad YAML name the file and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import TINY_CPU as TINY
from conftest import assert_clean_error, run_cli


@pytest.mark.parametrize(
    "text, needles",
    [
        ("embed:\n  batchsize: 8\n", ["unknown key embed.batchsize", "batch_size"]),
        ("embed:\n  batch_size: lots\n", ["embed.batch_size", "lots"]),
        ("embed:\n  dtype: float64\n", ["embed.dtype"]),
        ("embedd:\n  batch_size: 8\n", ["unknown section 'embedd'", "embed"]),
        ("embed: [1, 2]\n", ["section 'embed' must be a mapping"]),
        ("embed:\n  batch_size: 8\n bad indent: [\n", ["not valid YAML"]),
    ],
    ids=["unknown-key", "wrong-type", "bad-choice", "unknown-section", "not-a-mapping", "bad-yaml"],
)
def test_bad_config_files(tiny_data: Path, tmp_path: Path, text: str, needles: list[str]) -> None:
    cfg = tmp_path / "my.yaml"
    cfg.write_text(text)
    res = run_cli("--config", cfg, "embed", tiny_data, "--cache-dir", tmp_path, *TINY)
    line = assert_clean_error(res, *needles)
    assert "my.yaml" in line  # names the file to fix
    assert_clean_error(run_cli("--config", tmp_path / "missing.yaml", "info"), "missing.yaml")
