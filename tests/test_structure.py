"""The structure rules of ARCHITECTURE.md hold for featx, and the checker really catches violations."""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("check_structure", ROOT / "scripts" / "check_structure.py")
check_structure = importlib.util.module_from_spec(_spec)
sys.modules["check_structure"] = check_structure  # dataclasses look their module up there
_spec.loader.exec_module(check_structure)


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "featx"
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text))
    return root


def test_featx_follows_the_rules():
    assert check_structure.check(ROOT / "featx") == []


def test_long_function_is_caught(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(check_structure.MAX_LINES))
    root = _package(tmp_path, {"__init__.py": "", "a.py": f"def long():\n{body}\n"})
    problems = check_structure.check(root)
    assert len(problems) == 1 and "long is 81 lines" in problems[0]


def test_cycle_through_a_function_level_import_is_caught(tmp_path):
    root = _package(tmp_path, {
        "__init__.py": "",
        "a.py": "from . import b\n",
        "b.py": "def f():\n    from .a import g\n    return g\n",
    })
    problems = check_structure.check(root)
    assert any("import cycle" in p and "featx.a <-> featx.b" in p for p in problems)
    assert any("function-level import of featx.a" in p for p in problems)


@pytest.mark.parametrize("files, expected", [
    ({"a.py": "from .b import _hidden\n", "b.py": "_hidden = 1\n"}, "private name _hidden"),
    ({"base/__init__.py": "", "base/x.py": "from ..a import y\n", "a.py": "y = 1\n"}, "the base layer imports featx.a"),
    ({"a.py": "def f():\n    import json\n    return json\n"}, "function-level import of json"),
])
def test_import_rules_are_caught(tmp_path, files, expected):
    root = _package(tmp_path, {"__init__.py": "", **files})
    assert any(expected in p for p in check_structure.check(root))


def test_heavy_lazy_import_is_allowed(tmp_path):
    root = _package(tmp_path, {"__init__.py": "", "a.py": "def f():\n    import torch  # heavy\n    return torch\n"})
    assert check_structure.check(root) == []


@pytest.mark.parametrize("package", ["featx", "featx.data", "featx.embedding", "featx.cache", "featx.heads",
                                     "featx.finetune", "featx.report"])
def test_every_export_resolves(package):
    mod = importlib.import_module(package)
    for name in mod.__all__:
        assert getattr(mod, name) is not None, f"{package}.{name}"
