"""Reading run folders (report/runfiles.py): which files a run holds, which run ``featx report`` means, and which
few-shot run joins a probe's report (only one on the same data and embedding settings)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from featx.base.errors import FeatxError
from featx.report.runfiles import find_run, load_run, sibling_fewshot


def _ident(data: str, emb: str = "emb1") -> dict:
    return {"data": data, "embedding_settings": emb}


def _write(path: Path, doc: dict, mtime: float | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def test_load_run_reads_metrics_in_the_folder_or_its_probe_subfolder(tmp_path: Path) -> None:
    _write(tmp_path / "p" / "metrics.json", {"cache": {"path": "c.h5"}, "identity": _ident("d1")})
    run = load_run(tmp_path / "p")
    assert run.probe_dir == tmp_path / "p" and run.cache_info == {"path": "c.h5"} and run.fewshot is None
    _write(tmp_path / "c" / "compare.json", {"x": 1})
    _write(tmp_path / "c" / "probe" / "metrics.json", {"cache": {"path": "d.h5"}})
    run = load_run(tmp_path / "c")
    assert run.probe_dir == tmp_path / "c" / "probe" and run.compare == {"x": 1}
    assert run.to_dict()["has_compare"] and run.to_dict()["has_metrics"]


def test_load_run_errors_name_the_folder_or_file(tmp_path: Path) -> None:
    with pytest.raises(FeatxError, match="does not exist"):
        load_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FeatxError, match="holds no featx results"):
        load_run(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.json").write_text("{not json")
    with pytest.raises(FeatxError, match=r"metrics.json is unreadable .*rerun the command that wrote it"):
        load_run(tmp_path / "bad")
    _write(tmp_path / "list" / "metrics.json", [1, 2])  # type: ignore[arg-type]
    with pytest.raises(FeatxError, match="is not a featx result"):
        load_run(tmp_path / "list")


def test_only_a_fewshot_run_on_the_same_data_and_settings_joins_the_probe(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    probe = _write(runs / "probe-a" / "metrics.json", {"identity": _ident("flowers")}).parent
    _write(runs / "fs-other-data" / "fewshot.json", {"source": {"identity": _ident("cats")}}, mtime=3000)
    _write(runs / "fs-other-emb" / "fewshot.json", {"source": {"identity": _ident("flowers", "emb2")}}, mtime=3000)
    _write(runs / "fs-no-identity" / "fewshot.json", {"source": {}}, mtime=3000)
    (runs / "fs-broken").mkdir()
    (runs / "fs-broken" / "fewshot.json").write_text("{")
    assert sibling_fewshot(probe, json.loads((probe / "metrics.json").read_text())) is None
    _write(runs / "fs-old" / "fewshot.json", {"source": {"identity": _ident("flowers")}}, mtime=1000)
    _write(runs / "fs-new" / "fewshot.json", {"identity": _ident("flowers")}, mtime=2000)
    run = load_run(probe)
    assert run.fewshot_dir == runs / "fs-new" and run.fewshot == {"identity": _ident("flowers")}
    assert sibling_fewshot(probe, {"cache": {}}) is None  # a probe without an identity is never joined


def test_find_run_prefers_the_newest_probe_or_compare_run(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    with pytest.raises(FeatxError, match="no run folder in"):
        find_run(runs)
    _write(runs / "fs" / "fewshot.json", {}, mtime=1000)
    assert find_run(runs) == runs / "fs"  # only a few-shot run: that one
    _write(runs / "old-probe" / "metrics.json", {}, mtime=500)
    _write(runs / "newer-fs" / "fewshot.json", {}, mtime=3000)
    assert find_run(runs) == runs / "old-probe"  # a probe run wins over newer few-shot runs
    _write(runs / "cmp" / "compare.json", {}, mtime=900)
    assert find_run(runs) == runs / "cmp"
