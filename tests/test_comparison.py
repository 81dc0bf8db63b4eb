"""featx compare: probe heads vs fine-tuning in one table, JSON and chart, from library and CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import featx
import featx.runs.compare as comparison
from featx.cli import cli
from featx.data import train_eval_split
from featx.errors import FeatxError
from featx.report.compare_table import markdown_table

from conftest import TINY_BACKBONE, write_image_folder

TINY = dict(TINY_BACKBONE, device="cpu", progress=False)
FT = dict(epochs=1, batch_size=8, num_workers=0)


# A real tiny probe: two heads, 2-fold CV, one job.
PROBE = dict(head="logreg,knn", folds=2, n_jobs=1)


def _spy(monkeypatch) -> dict:
    """Record the Split object handed to the probe and to each fine-tune (both sides must get the same one)."""
    seen: dict = {"probe": [], "finetune": []}
    real_probe, real_ft = comparison.probe, comparison.run_finetune

    def probe(fc, **kw):
        seen["probe"].append(kw)
        return real_probe(fc, **kw)

    def finetune(fc, **kw):
        seen["finetune"].append(kw)
        return real_ft(fc, **kw)

    monkeypatch.setattr(comparison, "probe", probe)
    monkeypatch.setattr(comparison, "run_finetune", finetune)
    return seen


@pytest.fixture
def data(tmp_path):
    return write_image_folder(tmp_path / "data", per_class=12)  # train 24, val 24


@pytest.mark.slow
def test_compare_with_finetune_writes_table_json_and_chart(data, tmp_path, monkeypatch):
    seen = _spy(monkeypatch)
    out = tmp_path / "cmp"
    r = featx.compare(data, cache_dir=tmp_path / "cache", finetune=True, strategy="head,partial", out_dir=out,
                      seed=3, test_size=0.3, **PROBE, **TINY, **FT)

    # One split object, handed to the probe and to every fine-tune; the probe ran with the same split settings.
    split = seen["probe"][0]["split"]
    assert all(kw["split"] is split for kw in seen["finetune"]) and len(seen["finetune"]) == 2
    assert seen["probe"][0]["settings"].seed == 3 and seen["probe"][0]["settings"].test_size == 0.3
    assert r["probe"]["settings"]["seed"] == 3 and r["probe"]["settings"]["test_size"] == 0.3
    methods = [row["method"] for row in r["rows"]]
    assert methods == ["probe-logreg", "probe-knn", "finetune-head", "finetune-partial"]
    fc = featx.FeatureCache(r["cache"]["path"])
    embed_s = float(fc.meta["embed_seconds"])
    logreg, head = r["rows"][0], r["probe"]["heads"]["logreg"]
    assert logreg["wall_seconds"] == pytest.approx(  # embedding counted for the probe
        embed_s + r["probe"]["load_seconds"] + head["fit_seconds"] + head["predict_seconds"])
    assert logreg["images_per_s"] == pytest.approx(len(fc) / embed_s)
    _, eval_idx, _ = train_eval_split(fc.labels(), fc.split_array(), test_size=0.3, seed=3)
    assert r["split"]["n_eval"] == len(eval_idx) == r["probe"]["split"]["n_eval"]
    for row in r["rows"][2:]:
        assert 0 <= row["accuracy"] <= 1 and row["wall_seconds"] > 0 and row["images_per_s"] > 0
        assert row["peak_gpu_mem_bytes"] is None
        assert r["finetune"][row["strategy"]]["n_eval"] == len(eval_idx)
    best = next(row for row in r["rows"] if row["method"] == r["best"])
    assert best["accuracy"] == max(row["accuracy"] for row in r["rows"])

    # Files: the same dict as JSON, the Markdown table, a real PNG.
    saved = json.loads(Path(r["paths"]["json"]).read_text())
    assert [row["method"] for row in saved["rows"]] == methods and saved["settings"]["strategy"] == ["head", "partial"]
    md = Path(r["paths"]["markdown"]).read_text()
    acc = f"{100 * head['accuracy']:.1f}%"
    assert f"| probe-logreg | {acc} |" in md and "finetune-partial" in md
    with Image.open(r["paths"]["chart"]) as im:
        assert im.format == "PNG" and im.size[0] >= 600 and im.size[1] >= 400
        assert len(np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)) > 10  # not blank

    # A rerun reuses the finished fine-tunes (and the cache) instead of training again.
    again = featx.compare(data, cache_dir=tmp_path / "cache", finetune=True, strategy="head,partial", out_dir=out,
                          seed=3, test_size=0.3, **PROBE, **TINY, **FT)
    assert all(row["reused"] for row in again["rows"][2:])
    assert [row["accuracy"] for row in again["rows"]] == [row["accuracy"] for row in r["rows"]]


@pytest.mark.slow
def test_compare_passes_the_users_probe_settings(data, tmp_path):
    r = featx.compare(data, cache_dir=tmp_path / "cache", out_dir=tmp_path / "cmp", view="final", norm="l2",
                      solver="stream", cv_repeats=1, stream_epochs=2, head="logreg", folds=2, n_jobs=1, **TINY)
    ps = r["probe"]["settings"]
    assert (ps["view"], ps["norm"], ps["solver"], ps["cv_repeats"]) == ("final", "l2", "stream", 1)
    assert r["probe"]["heads"]["logreg"]["solver"] == "stream" and r["probe"]["heads"]["logreg"]["norm"] == "l2"


@pytest.mark.slow
def test_compare_without_finetune_lists_probe_heads_only(data, tmp_path):
    r = featx.compare(data, cache_dir=tmp_path / "cache", out_dir=tmp_path / "cmp", **PROBE, **TINY)
    assert [row["kind"] for row in r["rows"]] == ["probe", "probe"] and r["finetune"] == {}
    assert Path(r["paths"]["chart"]).is_file()
    # An existing cache can be compared without the dataset argument.
    r2 = featx.compare(cache=r["cache"]["path"], out_dir=tmp_path / "cmp2", progress=False, **PROBE)
    assert [row["method"] for row in r2["rows"]] == ["probe-logreg", "probe-knn"]


def test_bad_strategy_is_a_clear_error(data, tmp_path):
    with pytest.raises(FeatxError, match="--strategy 'fastest'"):
        featx.compare(data, cache_dir=tmp_path / "cache", finetune=True, strategy="fastest", **TINY)
    with pytest.raises(FeatxError, match="featx embed DATA"):
        featx.compare(cache_dir=tmp_path / "no-caches-here")


@pytest.mark.slow
def test_bad_kernel_is_refused_before_any_work(data, tmp_path):
    # As `featx probe --kernel` does: checked before embedding, whatever the heads.
    with pytest.raises(FeatxError, match="--kernel 'poly': expected one of linear, rbf"):
        featx.compare(data, cache_dir=tmp_path / "cache", kernel="poly", head="logreg", **TINY)
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").glob("*.h5"))
    r = featx.compare(data, cache_dir=tmp_path / "cache", kernel="rbf", out_dir=tmp_path / "cmp",
                      head="svm", folds=2, n_jobs=1, **TINY)
    assert r["settings"]["kernel"] == "rbf" and r["probe"]["heads"]["svm"]["params"]["kernel"] == "rbf"


def test_markdown_table_formats_every_column():
    rows = [
        {"method": "probe-svm", "kind": "probe", "accuracy": 0.8, "balanced_accuracy": 0.75, "macro_f1": 0.7,
         "wall_seconds": 30.0, "images_per_s": 100.0, "peak_gpu_mem_bytes": None},
        {"method": "finetune-full", "kind": "finetune", "accuracy": 0.9, "balanced_accuracy": 0.9, "macro_f1": 0.9,
         "wall_seconds": 3725.0, "images_per_s": 512.3, "peak_gpu_mem_bytes": 3 * 2**30, "reused": True},
    ]
    t = markdown_table(rows).splitlines()
    assert t[0].startswith("| method | accuracy | vs best probe |") and len(t) == 4
    assert t[2] == "| probe-svm | 80.0% | +0.0 pts | 75.0% | 70.0% | 30.0 s | 100.0 | n/a |"
    assert t[3] == "| finetune-full (reused) | 90.0% | +10.0 pts | 90.0% | 90.0% | 1 h 02 min | 512.3 | 3.00 GiB |"
    rows[0].update(view="multi2", train_views=8)  # a probe on another feature view says which
    assert markdown_table(rows).splitlines()[2].startswith("| probe-svm [multi2 + 8 aug.] | 80.0% |")


@pytest.mark.slow
def test_cli_compare_finetune_prints_the_table(data, tmp_path):
    out = tmp_path / "cmp"
    res = CliRunner().invoke(cli, [
        "compare", str(data), "--backbone", "tiny_cnn", "--weights", "random", "--cache-dir", str(tmp_path / "cache"),
        "--finetune", "--strategy", "head", "--epochs", "1", "--limit", "8", "--batch-size", "4", "--workers", "0",
        "--device", "cpu", "--out-dir", str(out), "--quiet", "--head", "logreg,knn", "--folds", "2", "--n-jobs", "1",
    ])
    assert res.exit_code == 0, res.output
    assert "| finetune-head |" in res.output and "| probe-logreg |" in res.output
    assert (out / "compare.json").is_file() and (out / "compare.png").is_file()
    saved = json.loads((out / "compare.json").read_text())
    assert saved["split"]["n_eval"] == 8 and saved["settings"]["limit"] == 8  # --limit 8 per split

    bad = CliRunner().invoke(cli, ["compare", str(data), "--finetune", "--strategy", "nope", "--backbone", "tiny_cnn",
                                   "--weights", "random", "--cache-dir", str(tmp_path / "cache"), "--quiet"])
    assert bad.exit_code == 2 and "--strategy 'nope'" in bad.output


@pytest.mark.slow
def test_compare_with_the_real_probe(data, tmp_path):
    r = featx.compare(data, cache_dir=tmp_path / "cache", head="logreg", folds=2, finetune=True, strategy="head",
                      out_dir=tmp_path / "cmp", n_jobs=1, **TINY, **FT)
    assert [row["method"] for row in r["rows"]] == ["probe-logreg", "finetune-head"]
    assert r["probe"]["split"]["n_eval"] == r["finetune"]["head"]["n_eval"] == r["split"]["n_eval"]
    assert r["rows"][0]["wall_seconds"] >= r["rows"][0]["embed_seconds"] > 0


def test_chart_of_accuracies_near_100_has_no_tick_above_100(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from featx.report.plots.compare_chart import plot_chart

    ticks = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (ticks.extend(fig.axes[0].get_yticks()),
                                                                 save(fig, *a, **k)))
    rows = [dict(method="probe-logreg", kind="probe", accuracy=0.993, wall_seconds=23.5),
            dict(method="finetune-head", kind="finetune", accuracy=0.991, wall_seconds=134.0)]
    assert plot_chart(rows, tmp_path / "c.png", title="t").stat().st_size > 0
    assert ticks and max(ticks) == 100.0  # room above 100 % for the labels, but no 100.5 % tick
