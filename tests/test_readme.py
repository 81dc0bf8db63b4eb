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


# --------------------------------------------------------------------------- README versus code (issue 34, point 6)


def _readme() -> str:
    return " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())  # one line: wrapping never matters


class _Folds:
    def __init__(self, folds):
        self._f = __import__("numpy").asarray(folds, dtype=float)

    def folds(self):
        return self._f


def test_readme_view_rule_is_the_code_of_both_paths():
    """Repeated paired CV: the first candidate within s.e.(best − simplest, paired) of the best; one search per
    candidate: the first within the best's own fold s.e.  Catbreeds' case: multi2 within its own paired s.e. of the
    best, but not within the best-vs-simplest one, so multi3 is chosen, as the README now says."""
    import numpy as np

    from featx.heads.tuning import repeated_cv
    from featx.heads.tuning.selection import Candidate, best_index

    text = _readme()
    assert ("The choice is the first candidate, simplest first, whose mean score is within s.e. of the best one's, "
            "where s.e. is the standard error of the paired fold differences between the best and the simplest "
            "candidate.") in text
    assert "its own, smaller paired s.e. against the simplest does not decide" in text
    assert ("the first candidate whose mean score is within one standard error of the best one's, that s.e. being "
            "of the best candidate's fold scores (not paired)") in text
    assert "first (simplest) candidate within one standard error of the best" not in text  # the old, vague rule
    # repeated path: simplest (final), multi2, multi3 on the same 6 folds
    final = np.array([0.80, 0.70, 0.82, 0.72, 0.81, 0.71])
    multi3 = final + np.array([0.06, 0.07, 0.05, 0.06, 0.07, 0.05])  # beats final by 6 pt, tiny paired s.e.
    multi2 = multi3 - np.array([0.03, 0.00, 0.03, 0.00, 0.03, 0.00])  # 1.5 pt below multi3, noisier pairing
    run = type("Run", (), {"scored": [_Folds(final), _Folds(multi2), _Folds(multi3)]})()
    chosen, top, se = repeated_cv._Run.choose(run)
    d = multi3 - final
    assert top == 2 and se == pytest.approx(np.std(d, ddof=1) / np.sqrt(6))
    own_se = np.std(multi2 - final, ddof=1) / np.sqrt(6)
    assert multi3.mean() - multi2.mean() < own_se + 0.01 and multi3.mean() - multi2.mean() > se  # the catbreeds case
    assert chosen == 2
    run.scored[1] = _Folds(multi3 - 0.001)  # within the best-vs-simplest s.e.: the first such is chosen
    assert repeated_cv._Run.choose(run)[0] == 1
    # one search per candidate: within the best's own (unpaired) fold s.e.
    row = lambda score, se: Candidate("final", "none", 0, 8, score, se, {}, 0.0)  # noqa: E731
    assert best_index([row(0.80, 0.01), row(0.805, 0.02), row(0.83, 0.02)]) == 2
    assert best_index([row(0.80, 0.01), row(0.815, 0.02), row(0.83, 0.02)]) == 1
    assert best_index([row(0.815, 0.5), row(0.82, 0.01), row(0.83, 0.02)]) == 0


def test_readme_head_all_is_the_code():
    from featx.heads.tuning.grids import ALL_HEADS

    assert ALL_HEADS == ("logreg", "svm", "knn") and "knn_dino" not in ALL_HEADS
    assert f"all (= {','.join(ALL_HEADS)}: knn_dino only by name)" in _readme()


def test_readme_cache_and_runs_folders_are_the_code(tmp_path):
    from featx.base.writable import default_run_dir, staged_dir
    from featx.config.settings import EmbedSettings, ProbeSettings, ReportSettings

    text = _readme()
    assert "`cache/` and `runs/` are relative to the folder you run featx in" in text
    assert EmbedSettings().cache_dir == "cache" and ProbeSettings().cache_dir == "cache"
    assert ReportSettings().runs_dir == "runs" and not Path(default_run_dir("probe", "s", "k")).is_absolute()
    assert "`runs/<kind>-<cache stem>-<run key>`" in text
    assert default_run_dir("probe", "digits-1a2b__efficientnet_lite0__c3", "0123abcd") == \
        Path("runs/probe-digits-1a2b__efficientnet_lite0__c3-0123abcd")
    # "replaces the run folder whole when the run completes"
    assert "replaces the run folder whole when the run completes" in text
    target = tmp_path / "runs" / "probe-x-k"
    target.mkdir(parents=True)
    (target / "metrics.json").write_text("{}")
    (target / "old_head.skops").write_text("old")
    with staged_dir(target) as tmp:
        (tmp / "metrics.json").write_text('{"new": 1}')
        assert (target / "old_head.skops").is_file()  # the previous run stays until this one completes
    assert sorted(p.name for p in target.iterdir()) == ["metrics.json"]


def test_readme_compare_default_strategy_is_the_code():
    from featx.config.settings import CompareSettings
    from featx.runs.compare import parse_strategies

    assert CompareSettings().strategy == "all"
    assert parse_strategies(CompareSettings().strategy) == ["head", "partial", "full"]
    text = _readme()
    assert "--strategy all (default) = head, partial and full" in text
    assert "runs every strategy by default (`--strategy all`: `head`" in text


def test_readme_says_make_needs_the_registry_once_and_how_to_get_cpu_wheels():
    from packaging.specifiers import SpecifierSet

    text = _readme()
    assert "offline on a fresh machine" not in text
    assert "Both need the package registry (PyPI) once, to set up `.venv`" in text
    make = (ROOT / "Makefile").read_text(encoding="utf-8")
    pins = re.search(r"pip install -q (torch==\S+) (torchvision==\S+)", make)
    assert pins, "the Makefile's pinned torch install"
    assert f".venv/bin/pip install {pins.group(1)} {pins.group(2)} --index-url https://download.pytorch.org/whl/cpu" in text
    version = pins.group(1).split("==")[1]
    assert SpecifierSet(f"=={version}").contains(f"{version}+cpu")  # why `make` keeps the CPU wheels
    assert f"`{version}+cpu` matches `torch=={version}`" in text
