"""The command line: one-line errors with fixes, config handling, embed/info output."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from featx.cli import cli

from conftest import TINY_CLI

# Pinned to the CPU: with --device auto these tests would take the GPU path on a GPU host
# (its own variants are in tests/test_embed_cuda.py).
TINY = [*TINY_CLI, "--batch-size", "4", "--quiet", "--device", "cpu"]


@pytest.fixture
def runner():
    return CliRunner()


@pytest.mark.slow
def test_embed_then_info(runner, image_folder, tmp_path):
    cache_dir = tmp_path / "cache"
    r = runner.invoke(cli, ["embed", str(image_folder), "--cache-dir", str(cache_dir), *TINY])
    assert r.exit_code == 0, r.output
    assert "rows       24 (train 12, val 12)" in r.output
    assert "embedded 24" in r.output
    r2 = runner.invoke(cli, ["embed", str(image_folder), "--cache-dir", str(cache_dir), *TINY])
    assert "nothing to embed" in r2.output
    r3 = runner.invoke(cli, ["info", "--cache-dir", str(cache_dir), "--json"])
    assert r3.exit_code == 0, r3.output
    summary = json.loads(r3.output)
    assert summary["rows"] == 24 and summary["classes"] == ["cats", "dogs"] and summary["backbone"] == "tiny_cnn"


def test_errors_are_one_line_with_a_fix(runner, tmp_path, image_folder):
    r = runner.invoke(cli, ["embed", str(tmp_path / "nope"), *TINY])
    assert r.exit_code == 2 and r.output.startswith("error: ") and "does not exist" in r.output
    assert "Traceback" not in r.output
    r = runner.invoke(cli, ["embed", str(image_folder), "--backbone", "resnet_50", "--quiet"])
    assert r.exit_code == 2 and "resnet50" in r.output
    r = runner.invoke(cli, ["embed", str(image_folder), "--cache-dir", str(tmp_path), *TINY, "--batch-size", "0"])
    assert r.exit_code == 2 and "--batch-size" in r.output
    r = runner.invoke(cli, ["embed", str(image_folder), *TINY, "--device", "cuda:99"])
    assert r.exit_code == 2 and "--device" in r.output
    r = runner.invoke(cli, ["info", "--cache-dir", str(tmp_path / "empty")])
    assert r.exit_code == 2 and "featx embed" in r.output


def test_config_overrides_defaults_and_rejects_unknown_keys(runner, tmp_path, image_folder):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("embed:\n  backbone: tiny_cnn\n  weights: random\n  workers: 0\n  dtype: float16\n  device: cpu\n")
    r = runner.invoke(cli, ["--config", str(cfg), "embed", str(image_folder), "--cache-dir", str(tmp_path / "c"), "--quiet"])
    assert r.exit_code == 0, r.output
    assert "32 x float16" in r.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("embed:\n  batchsize: 3\n")
    r = runner.invoke(cli, ["--config", str(bad), "embed", str(image_folder)])
    assert r.exit_code == 2 and "unknown key embed.batchsize" in r.output and "batch_size" in r.output
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("embed:\n  batch_size: lots\n")
    r = runner.invoke(cli, ["--config", str(wrong), "embed", str(image_folder)])
    assert r.exit_code == 2 and "embed.batch_size" in r.output
    r = runner.invoke(cli, ["--config", str(tmp_path / "missing.yaml"), "info"])
    assert r.exit_code == 2 and "--config" in r.output


# --------------------------------------------------------------------------- refused before torch loads (issue 34)

_EARLY = """import json, resource, sys
from featx.cli import main
out = []
for args in json.loads(sys.argv[1]):
    try:
        main(args)
    except SystemExit as exc:
        out.append(exc.code)
    print("\\n", file=sys.stderr)
heavy = [m for m in ("torch", "torchvision", "sklearn", "h5py", "scipy") if m in sys.modules]
cpu = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"codes": out, "cpu": cpu.ru_utime + cpu.ru_stime, "heavy": heavy}))
"""

_REFUSED = [
    (["embed", "/no/such/dir"], "dataset folder '/no/such/dir' does not exist; pass an existing image folder"),
    (["embed", "/no/such/dir", "/no/other.parquet"], "does not exist"),
    (["embed", "--manifest", "/no/list.csv"], "manifest '/no/list.csv' does not exist"),
    (["embed", ".", "--batch-size", "0"], "--batch-size must be a positive integer"),
    (["embed", ".", "--weights", "/no/w.pth"], "--weights '/no/w.pth': file not found"),
    (["probe", "/no/c.h5"], "cache '/no/c.h5' does not exist"),
    (["probe", "--cache-dir", "empty"], "no cache in 'empty'"),
    (["predict", "--head", "/no/h.skops", "x.jpg"], "head file '/no/h.skops' does not exist"),
    (["report", "/no/run"], "run folder '/no/run' does not exist"),
    (["compare", "/no/data", "--finetune"], "dataset folder '/no/data' does not exist"),
    (["export-model", "--head", "/no/h.skops", "--out", "m.onnx"], "head file '/no/h.skops' does not exist"),
]


def test_bad_paths_and_sizes_are_refused_before_torch_loads(tmp_path):
    """`featx embed /no/such/dir` and every other path or size check answer with exit 2 and the library's words,
    without importing torch, h5py or scikit-learn.

    Measured as the process's own CPU seconds (all eleven commands in one process: ~0.3 s here); wall time on a
    loaded 2-core machine is mostly waiting for a core, so it is not what the test measures."""
    import subprocess
    import sys

    (tmp_path / "empty").mkdir()
    r = subprocess.run([sys.executable, "-c", _EARLY, json.dumps([a for a, _ in _REFUSED])], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    res = json.loads(r.stdout)
    messages = r.stderr.split("\n\n")
    assert res["codes"] == [2] * len(_REFUSED), r.stderr
    for (args, words), msg in zip(_REFUSED, messages):
        assert msg.strip().startswith("error: ") and words in msg, (args, msg)
    assert res["heavy"] == [], f"imported before the checks: {res['heavy']}"
    assert res["cpu"] < 1.0
