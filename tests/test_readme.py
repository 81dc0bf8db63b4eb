"""Every Python block of README.md runs, on generated images with the tiny test backbone, so it cannot drift."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import write_image_folder

ROOT = Path(__file__).resolve().parents[1]
# The README's examples name the default backbone; here the tiny random one stands in for it (offline, fast).
STAND_INS = {'"efficientnet_lite0"': '"tiny_cnn"'}


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_the_readme_has_python_examples():
    assert len(python_blocks((ROOT / "README.md").read_text(encoding="utf-8"))) >= 1


@pytest.mark.parametrize("index", range(len(python_blocks((ROOT / "README.md").read_text(encoding="utf-8")))))
@pytest.mark.slow
def test_readme_python_block_runs(index, tmp_path, monkeypatch, capsys):
    code = python_blocks((ROOT / "README.md").read_text(encoding="utf-8"))[index]
    for name, stand_in in STAND_INS.items():
        code = code.replace(name, stand_in)
    write_image_folder(tmp_path / "data", classes=("cats", "dogs", "owls"), per_class=8)  # data/<split>/<class>/
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"README.md python block {index + 1}", "exec"), {"__name__": "__readme__"})
    assert capsys.readouterr().out.strip()  # the examples print what they show


@pytest.mark.slow
def test_readme_serving_example_runs_without_torch(tmp_path):
    """The README's onnxruntime block serves an exported model in a process where torch cannot be imported."""
    import shutil
    import subprocess
    import sys

    pytest.importorskip("onnxruntime")
    import featx

    from conftest import make_tiny_cache

    code = re.findall(r"^```python serve\n(.*?)^```", (ROOT / "README.md").read_text(encoding="utf-8"), flags=re.S | re.M)
    assert len(code) == 1 and len(code[0].strip().splitlines()) <= 12
    fc = make_tiny_cache(tmp_path)
    featx.probe(fc, head="logreg", out_dir=tmp_path / "runs", quiet=True, report=False)
    serve = tmp_path / "serve"
    featx.export_model(tmp_path / "runs" / "logreg.skops", serve / "model.onnx", cache_dir=tmp_path / "cache", verify=4)
    shutil.copy(fc.paths("val")[0], serve / "image.jpg")
    prog = "import sys; sys.modules['torch'] = None\n" + code[0]
    r = subprocess.run([sys.executable, "-c", prog], cwd=serve, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    name, p = r.stdout.split()
    assert name == "cats" and 0 < float(p) <= 1  # the first val image is a cat
