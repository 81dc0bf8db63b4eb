"""The structure rules of ARCHITECTURE.md hold for featx, and the checker really catches violations."""

from __future__ import annotations

import importlib.util
import subprocess
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


@pytest.mark.slow
def test_featx_follows_the_rules():
    # In a fresh interpreter: after a test has caught a RecursionError (hostile nested JSON), CPython 3.11.7's
    # ast.parse can fail with "AST constructor recursion depth mismatch" (fixed in later CPython releases).
    code = ("import sys; sys.path.insert(0, 'scripts'); import check_structure as c; "
            "from pathlib import Path; p = c.check(Path('featx')); print('\\n'.join(p)); sys.exit(1 if p else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "", r.stdout + r.stderr


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
                                     "featx.finetune", "featx.report", "featx.runs"])
def test_every_export_resolves(package):
    mod = importlib.import_module(package)
    for name in mod.__all__:
        assert getattr(mod, name) is not None, f"{package}.{name}"


@pytest.mark.parametrize("files, expected", [
    # a stage importing the stage above it, at module top or inside a function
    ({"heads/__init__.py": "", "heads/a.py": "from ..report import b\n", "report/__init__.py": "", "report/b.py": ""},
     "featx.heads imports featx.report.b"),
    ({"heads/__init__.py": "", "heads/a.py": "def f():\n    from ..runs import b\n    return b\n",
      "runs/__init__.py": "", "runs/b.py": ""}, "featx.heads imports featx.runs.b"),
    # two packages of one rank do not import each other either
    ({"embedding/__init__.py": "", "embedding/a.py": "from ..heads import b\n", "heads/__init__.py": "", "heads/b.py": ""},
     "featx.embedding imports featx.heads.b"),
    ({"newpkg/__init__.py": ""}, "package 'newpkg' is not in PACKAGE_ORDER"),
])
def test_package_order_is_caught(tmp_path, files, expected):
    root = _package(tmp_path, {"__init__.py": "", **files})
    assert any(expected in p for p in check_structure.check(root))


def test_lower_package_imports_are_allowed(tmp_path):
    root = _package(tmp_path, {"__init__.py": "", "base/__init__.py": "", "base/x.py": "",
                               "runs/__init__.py": "", "runs/a.py": "from ..base import x\n"})
    assert check_structure.check(root) == []


def test_wide_signature_and_long_module_are_caught(tmp_path):
    args = ", ".join(f"a{i}" for i in range(check_structure.MAX_PARAMS + 1))
    long_body = "x = 1\n" * (check_structure.MAX_MODULE_LINES + 1)
    root = _package(tmp_path, {"__init__.py": "", "a.py": f"def wide({args}):\n    return a0\n", "b.py": long_body})
    problems = check_structure.check(root)
    assert any("wide takes 11 parameters" in p for p in problems)
    assert any("b.py:1: module is 501 lines" in p for p in problems)


def test_ruff_passes():
    """The lint rules of pyproject.toml ([tool.ruff]) hold for the whole repository (also run by `make test`)."""
    import shutil
    import subprocess

    ruff = shutil.which("ruff") or shutil.which("ruff", path=str(Path(sys.executable).parent))
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    r = subprocess.run([ruff, "check", "--no-cache", str(ROOT)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
