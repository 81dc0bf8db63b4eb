"""Run folders: written to a temporary folder and swapped in whole, named by what they read (issue 30)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

import featx
import featx.runs.probe as probe_mod
from featx.base.errors import FeatxError
from featx.base.writable import run_key, staged_dir

from conftest import TINY_CPU as TINY
from conftest import assert_clean_error, run_cli, tiny_embed, write_image_folder


def test_staged_dir_replaces_the_whole_folder_or_nothing(tmp_path):
    target = tmp_path / "run"
    with staged_dir(target) as work:
        (work / "metrics.json").write_text("{}")
        (work / "svm.skops").write_text("old head")
    assert sorted(p.name for p in target.iterdir()) == ["metrics.json", "svm.skops"]
    with pytest.raises(RuntimeError):
        with staged_dir(target) as work:
            (work / "metrics.json").write_text('{"new": 1}')
            raise RuntimeError("killed midway")
    assert (target / "svm.skops").read_text() == "old head"  # the previous run is intact
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no temporary folder left
    with staged_dir(target) as work:
        (work / "metrics.json").write_text('{"new": 2}')
    assert [p.name for p in target.iterdir()] == ["metrics.json"]  # nothing of the earlier run survives


def test_staged_dir_refuses_a_folder_featx_did_not_write(tmp_path, monkeypatch):
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "chapter1.tex").write_text("precious")
    with pytest.raises(FeatxError, match="holds files featx did not write"):
        with staged_dir(mine):
            pass
    assert (mine / "chapter1.tex").read_text() == "precious"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FeatxError, match="this folder"):
        with staged_dir(Path(".")):
            pass


def test_run_key_names_inputs_and_settings():
    assert run_key("probe", "abc", {"head": "svm"}) == run_key("probe", "abc", {"head": "svm"})
    assert run_key("probe", "abc", {"head": "svm"}) != run_key("probe", "abc", {"head": "logreg"})
    assert run_key("probe", "abc", {"head": "svm"}) != run_key("probe", "abd", {"head": "svm"})


@pytest.fixture
def cache(tmp_path):
    return tiny_embed(write_image_folder(tmp_path / "data", per_class=8), tmp_path / "cache")


@pytest.mark.slow
def test_a_narrower_probe_leaves_no_stale_heads(cache, tmp_path):
    """The reproduction of issue 30: `probe --head logreg` after `--head all` into the same folder."""
    out = tmp_path / "run"
    featx.probe(cache.path, head="logreg,svm,knn", folds=2, n_jobs=1, out_dir=out)
    assert {"svm.skops", "knn.skops", "confusion_svm.png"} <= {p.name for p in out.iterdir()}
    res = featx.probe(cache.path, head="logreg", folds=2, n_jobs=1, out_dir=out)
    names = {p.name for p in out.iterdir()}
    assert "svm.skops" not in names and "knn.skops" not in names and "confusion_svm.png" not in names
    assert {"logreg.skops", "logreg.json", "metrics.json", "report.md"} <= names
    assert res.heads["logreg"]["model_path"] == str(out / "logreg.skops")  # paths name the final folder
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run.")]


@pytest.mark.slow
def test_probe_killed_midway_keeps_the_previous_run(cache, tmp_path, monkeypatch):
    out = tmp_path / "run"
    featx.probe(cache.path, head="logreg", folds=2, n_jobs=1, out_dir=out)
    before = (out / "metrics.json").read_bytes()

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(probe_mod, "_run_head", boom)
    with pytest.raises(KeyboardInterrupt):
        featx.probe(cache.path, head="logreg,knn", folds=2, n_jobs=1, out_dir=out)
    assert (out / "metrics.json").read_bytes() == before and (out / "logreg.skops").is_file()


@pytest.mark.slow
def test_default_folders_differ_by_data_and_settings(cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = featx.probe(cache.path, head="logreg", folds=2, n_jobs=1, plots=False)
    b = featx.probe(cache.path, head="all", folds=2, n_jobs=1, plots=False)
    again = featx.probe(cache.path, head="logreg", folds=2, n_jobs=4, plots=False)  # n_jobs: not a result
    assert a.out_dir != b.out_dir and a.out_dir == again.out_dir
    assert Path(a.out_dir).name.startswith(f"probe-{cache.path.stem}-") and a.run_key in a.out_dir
    f1 = featx.fewshot(cache.path, shots="1,2", seeds=2, head="logreg", plot=False)
    f2 = featx.fewshot(cache.path, shots="1,2", seeds=3, head="logreg", plot=False)
    assert Path(f1.json_path).parent != Path(f2.json_path).parent  # the second no longer overwrites the first
    assert Path(f1.json_path).is_file() and Path(f2.json_path).is_file()


@pytest.mark.skipif(not (sys.platform.startswith("linux") and os.path.isdir("/sys/kernel")), reason="needs Linux /proc, /sys")
@pytest.mark.parametrize("where", [["--cache-dir", "/proc/featx-cache"], ["--cache", "/sys/featx-test.h5"]],
                         ids=["cache-dir-cannot-be-created", "cache-not-writable"])
def test_unwritable_cache_location_is_a_clear_error(tiny_data: Path, where: list[str]) -> None:
    # /proc and /sys refuse new files even to root, unlike a chmod-ed folder.
    assert_clean_error(run_cli("embed", tiny_data, *where, *TINY, "-q"), where[0])
