"""ARCHITECTURE.md names every module under featx/, and nothing else: its module list is checked against the tree."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "ARCHITECTURE.md"
START, END = "<!-- modules:start -->", "<!-- modules:end -->"
# One module a line: `featx/<path>.py — what it holds` (an em dash between path and description).
LINE = re.compile(r"^(featx/[\w/]+\.py) — (\S.*)$")


def documented_modules(text: str) -> tuple[list[str], list[str]]:
    """(paths in the order listed, lines that are neither a module line, a `#` heading, blank nor a fence)."""
    assert START in text and END in text, f"ARCHITECTURE.md has lost its {START} ... {END} markers"
    block = text.split(START, 1)[1].split(END, 1)[0]
    paths, bad = [], []
    for line in block.splitlines():
        line = line.rstrip()
        if not line or line.startswith("#") or line.startswith("```"):
            continue
        m = LINE.match(line)
        if m:
            paths.append(m.group(1))
        else:
            bad.append(line)
    return paths, bad


def tree_modules() -> set[str]:
    return {p.relative_to(ROOT).as_posix() for p in (ROOT / "featx").rglob("*.py") if "__pycache__" not in p.parts}


def test_every_line_of_the_module_list_is_a_module_with_a_description():
    paths, bad = documented_modules(DOC.read_text(encoding="utf-8"))
    assert not bad, "lines of ARCHITECTURE.md's module list not of the form `featx/<path>.py — <what it holds>`:\n" + \
        "\n".join(bad)
    dup = sorted({p for p in paths if paths.count(p) > 1})
    assert not dup, f"listed more than once in ARCHITECTURE.md: {dup}"


def test_module_list_matches_the_tree():
    listed = set(documented_modules(DOC.read_text(encoding="utf-8"))[0])
    actual = tree_modules()
    missing = sorted(actual - listed)
    extra = sorted(listed - actual)
    msg = []
    if missing:
        msg.append("modules under featx/ that ARCHITECTURE.md does not list (add a line `featx/... — what it holds`):\n  "
                   + "\n  ".join(missing))
    if extra:
        msg.append("modules ARCHITECTURE.md lists that do not exist (remove or rename the line):\n  " + "\n  ".join(extra))
    assert not msg, "\n".join(msg)


def test_the_package_order_is_stated_as_the_structure_check_enforces_it():
    text = DOC.read_text(encoding="utf-8")
    assert "base < config, data, cache < embedding, heads < audit, finetune, report < runs < cli" in text
