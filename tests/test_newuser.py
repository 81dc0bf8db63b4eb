"""What a new user met in a first hour with featx, each checked so it cannot come back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import featx
from featx.base.errors import FeatxError
from featx.cli import cli
from featx.config import read_config

from conftest import TINY_CLI, make_tiny_cache, write_image_folder

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return make_tiny_cache(tmp_path_factory.mktemp("newuser"), views="final")


def test_unknown_config_key_lists_only_the_keys_featx_config_shows(tmp_path):
    cfg = tmp_path / "my.yaml"
    cfg.write_text("probe:\n  kernal: rbf\n")
    with pytest.raises(FeatxError) as info:
        read_config(cfg)
    msg = str(info.value)
    assert "unknown key probe.kernal" in msg and "did you mean 'kernel'" in msg and "head, " in msg
    for hidden in ("as_json", "out_dir", "quiet"):  # per-run switches, not shown by `featx config`
        assert hidden not in msg
    shown = CliRunner().invoke(cli, ["config", "probe"]).output
    assert "as_json" not in shown and "kernel" in shown


def test_export_prints_a_summary_not_json_unless_asked(cache, tmp_path):
    out = tmp_path / "x.npy"
    r = CliRunner().invoke(cli, ["export", str(cache.path), "--format", "npy", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert not r.output.lstrip().startswith("{") and f"{len(cache)} rows" in r.output and str(out) in r.output
    r = CliRunner().invoke(cli, ["export", str(cache.path), "--format", "npy", "--out", str(out), "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["rows"] == len(cache)


@pytest.mark.slow
def test_fewshot_says_what_the_brackets_are(cache, tmp_path):
    r = CliRunner().invoke(cli, ["fewshot", str(cache.path), "--shots", "1,2", "--seeds", "2", "--head", "knn",
                                 "--out-dir", str(tmp_path / "fs"), "--no-report", "-q"])
    assert r.exit_code == 0, r.output
    assert "[" in r.output and "95% confidence interval" in r.output and "2 seeds" in r.output


def _featx(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The featx program as a user runs it (its log lines go to stderr)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "featx.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_predict_on_a_plain_folder_says_nothing_about_its_internal_file_list(cache, tmp_path):
    res = featx.probe(cache, head="logreg", folds=2, n_jobs=1, device="cpu", out_dir=tmp_path / "run", plots=False)
    write_image_folder(tmp_path / "photos", splits=(), classes=("cats",), per_class=3)  # photos/cats/*.png
    r = _featx("predict", "--head", res.heads["logreg"]["model_path"], "photos", "--workers", "0", "--device", "cpu",
               cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "predicted 3 images" in r.stdout
    assert "point outside" not in r.stderr and ".csv" not in r.stderr, r.stderr


@pytest.mark.slow
def test_embed_prints_its_final_progress_line_once(tmp_path):
    write_image_folder(tmp_path / "data", per_class=3)
    r = _featx("embed", "data", "--cache-dir", "cache", *TINY_CLI, "--batch-size", "4", "--device", "cpu",
               cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("embed: 12/12")]
    assert len(lines) == 1 and "done in" in lines[0], r.stderr


class _Rows:
    """Training rows of one view, as heads.selection.select reads them."""

    def training(self, view, k, *, folds, seed):
        rng = np.random.default_rng(0)
        y = np.repeat([0, 1], 20)
        return rng.normal(size=(40, 4)) + y[:, None], y, folds


def test_probe_logs_each_fit_once_and_says_when_it_refits(monkeypatch, caplog):
    import logging

    from featx.heads.tuning import selection

    # The one-standard-error choice moves back to a candidate whose fit was already dropped: it is refitted.
    picks = iter([0, 1, 1, 0])
    monkeypatch.setattr(selection, "best_index", lambda table: next(picks))
    plan = selection.SearchPlan(name="logreg", kernel="linear", grid={"C": [0.1, 1.0]}, scoring="accuracy",
                                max_iter=200, folds=2, folds_used=2, seed=0, n_jobs=1, device="cpu",
                                candidates=(("final", "none", 0), ("final", "l2", 0), ("final", "power", 0)))
    with caplog.at_level(logging.INFO, logger="featx.heads.tuning.selection"):
        sel = selection.select(_Rows(), plan)
    msgs = [r.getMessage() for r in caplog.records]
    for norm in ("none", "l2", "power"):
        assert sum(m.startswith("fitting logreg") and f"norm {norm}" in m for m in msgs) == 1, msgs
    assert sum(m.startswith("refitting the chosen logreg") and "norm none" in m for m in msgs) == 1, msgs
    assert sel.chosen == 0 and sel.row.norm == "none"


@pytest.mark.slow
def test_report_after_fewshot_is_the_probes_with_the_curve(cache, tmp_path):
    runs = tmp_path / "runs"
    featx.probe(cache, head="logreg", folds=2, n_jobs=1, device="cpu", out_dir=runs / "probe-x", plots=False,
                save=False)
    featx.fewshot(cache, shots="1,2", seeds=2, heads="knn", out_dir=runs / "fewshot-x", plot=False)  # the newest run
    r = CliRunner().invoke(cli, ["report", "--runs-dir", str(runs)])
    assert r.exit_code == 0, r.output
    assert str(runs / "probe-x" / "report.html") in r.output and "newest probe or compare run" in r.output
    page = (runs / "probe-x" / "report.html").read_text()
    assert 'id="fewshot"' in page and "fewshot-x" in page


@pytest.mark.slow
def test_library_probe_writes_the_report_like_the_cli_when_given_its_settings(cache, tmp_path):
    from featx.config import ProbeSettings

    kw = dict(head="knn", folds=2, n_jobs=1, device="cpu")
    plain = featx.probe(cache, out_dir=tmp_path / "lib", plots=False, **kw)
    assert plain.report_path is None and not (tmp_path / "lib" / "report.html").exists()
    like_cli = featx.probe(cache, settings=ProbeSettings(out_dir=str(tmp_path / "cli"), **kw), plots=False)
    assert like_cli.report_path and (tmp_path / "cli" / "report.html").is_file()
    readme = (ROOT / "README.md").read_text()
    assert "The library writes `report.html` only when asked" in readme  # and says why


def test_lock_files_left_after_a_run_are_explained(cache):
    assert Path(str(cache.path) + ".lock").exists()  # kept on purpose: see the README
    readme = (ROOT / "README.md").read_text()
    assert "`NAME.h5.lock`" in readme and "stay after a run on purpose" in readme


def test_a_folder_named_featx_beside_a_script_fails_as_the_readme_says(tmp_path):
    """Issue 34 point 5: a script beside a folder named featx (the clone, one folder up) imports that folder as a
    namespace package under the editable install; featx's own code never runs then, so the README says what
    happens and what to do."""
    (tmp_path / "featx").mkdir()
    (tmp_path / "script.py").write_text("import featx\nprint(list(featx.__path__))\nfeatx.embed\n")
    r = subprocess.run([sys.executable, "script.py"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    assert "**A folder named `featx` next to your script**" in readme
    assert "`print(featx.__path__)` names the folder" in readme
    if r.returncode == 0:  # a regular (non-editable) install: the package wins over the folder
        assert str(tmp_path / "featx") not in r.stdout
        return
    assert "module 'featx' has no attribute 'embed'" in r.stderr
    assert 'with "module \'featx\' has no attribute \'embed\'"' in readme
    assert str(tmp_path / "featx") in r.stdout  # what the README's check shows
