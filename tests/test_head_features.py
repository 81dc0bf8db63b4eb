"""`--strategy head` on features: the frozen trunk runs once per image and view (or not at all), never per step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import featx
from featx.embedding.engines import augment
from featx.embedding.networks.stages import TinyCNN
from featx.finetune import features as head_features
from featx.finetune import train as ft_train
from featx.finetune.loop import Trainer
from featx.finetune.train import finetune

from conftest import TINY_BACKBONE, tiny_embed, write_image_folder

FT = dict(strategy="head", batch_size=8, num_workers=0, progress=False, device="cpu")


@pytest.fixture
def data(tmp_path):
    return write_image_folder(tmp_path / "data", per_class=16)  # red vs green: train 32, val 32


@pytest.fixture
def trunk_calls(monkeypatch):
    """Images through the network: TinyCNN.forward calls and the samples handed to the embedding engine."""
    seen = {"forward": 0, "keys": []}
    forward = TinyCNN.forward

    def counted_forward(self, x):
        seen["forward"] += 1
        return forward(self, x)

    batches = head_features.feature_batches

    def counted_batches(todo, *a, **kw):
        seen["keys"] += [s.key for s in todo]
        return batches(todo, *a, **kw)

    monkeypatch.setattr(TinyCNN, "forward", counted_forward)
    monkeypatch.setattr(head_features, "feature_batches", counted_batches)
    return seen


@pytest.mark.slow
def test_cached_train_views_train_the_head_without_any_network_pass(data, tmp_path, trunk_calls):
    fc = tiny_embed(data, tmp_path / "cache", batch_size=8, train_views=3)
    trunk_calls["forward"] = 0  # the embedding above ran the network; the fine-tune must not
    r = finetune(fc, epochs=5, lr=0.05, out_dir=tmp_path / "runs", **FT)
    assert r.features == "cache train views (K=3)"
    assert trunk_calls == {"forward": 0, "keys": []}
    assert r.epochs_run == 5 and r.n_eval == 32 and r.accuracy >= 0.9
    best = torch.load(Path(r.run_dir) / "best.pt", weights_only=True)["model"]
    assert best["head.weight"].shape == (2, 32) and "backbone.blocks.0.weight" in best  # same checkpoint layout


@pytest.mark.slow
def test_without_cached_views_each_epoch_embeds_each_image_once(data, tmp_path, trunk_calls):
    fc = tiny_embed(data, tmp_path / "cache", batch_size=8)
    trunk_calls["keys"].clear()
    r = finetune(fc, epochs=4, lr=0.05, out_dir=tmp_path / "runs", **FT)
    assert r.features == "embedded once per epoch"
    keys = trunk_calls["keys"]
    assert len(keys) == len(set(keys)), "no image or view is embedded twice"
    fit_keys = {k for k in keys if augment.is_aug(k)}
    assert len(fit_keys) == r.n_train * 4  # every training image, once per epoch, in that epoch's view
    assert {augment.parse(k)[1] for k in fit_keys} == {0, 1, 2, 3}
    assert len(keys) == len(fit_keys), "validation and evaluation read the cache's features of unchanged files"
    assert r.accuracy >= 0.9 and r.history[-1]["train_loss"] < r.history[0]["train_loss"]


@pytest.mark.slow
def test_each_epochs_view_is_embedded_before_its_step_bar_starts(data, tmp_path, trunk_calls, monkeypatch):
    """The bar's rate and ETA time the steps only: embedding a view inside its first step read 0.1 step/s, 7 min."""
    from featx.finetune import loop

    made_before_bar = []
    bar = loop.progress_bar

    def recording_bar(*a, **kw):
        made_before_bar.append(len(trunk_calls["keys"]))
        return bar(*a, **kw)

    monkeypatch.setattr(loop, "progress_bar", recording_bar)
    fc = tiny_embed(data, tmp_path / "cache", batch_size=8)
    trunk_calls["keys"].clear()
    r = finetune(fc, epochs=2, lr=0.05, out_dir=tmp_path / "runs", **FT)
    assert made_before_bar == [r.n_train, 2 * r.n_train]


@pytest.mark.slow
def test_a_file_changed_since_embedding_is_embedded_again_for_evaluation(data, tmp_path, trunk_calls):
    fc = tiny_embed(data, tmp_path / "cache", batch_size=8)
    changed = fc.paths("val")[0]
    Path(changed).write_bytes(Path(fc.paths("val")[1]).read_bytes())  # another image now, same name
    trunk_calls["keys"].clear()
    r = finetune(fc, epochs=1, out_dir=tmp_path / "runs", **FT)
    assert [k for k in trunk_calls["keys"] if not augment.is_aug(k)] == [fc.keys("val")[0]]
    assert r.n_eval == 32 and r.n_eval_failed == 0


@pytest.mark.slow
def test_embedded_views_are_the_views_the_cache_would_store(data, tmp_path):
    # Epoch e trains on augmented view e in both paths: the same features, so the same losses.
    plain = tiny_embed(data, tmp_path / "c0", batch_size=8)
    cached = tiny_embed(data, tmp_path / "c3", batch_size=8, train_views=3)
    a = finetune(plain, epochs=3, lr=0.05, out_dir=tmp_path / "ra", **FT)
    b = finetune(cached, epochs=3, lr=0.05, out_dir=tmp_path / "rb", **FT)
    assert (a.features, b.features) == ("embedded once per epoch", "cache train views (K=3)")
    assert [h["train_loss"] for h in a.history] == pytest.approx([h["train_loss"] for h in b.history], rel=1e-3)
    assert a.accuracy == b.accuracy


@pytest.mark.slow
def test_fast_head_matches_the_trunk_every_step(data, tmp_path, monkeypatch):
    fc = tiny_embed(data, tmp_path / "cache", batch_size=8)
    fast = finetune(fc, epochs=6, lr=0.05, out_dir=tmp_path / "fast", **FT)
    monkeypatch.setattr(ft_train, "plan_source", lambda fc, settings: None)  # the path before features
    slow = finetune(fc, epochs=6, lr=0.05, out_dir=tmp_path / "slow", **FT)
    assert slow.features == "trunk every step" and fast.features == "embedded once per epoch"
    assert fast.accuracy >= 0.9 and slow.accuracy >= 0.9 and abs(fast.accuracy - slow.accuracy) <= 2 / 32
    assert Path(fast.run_dir).name != Path(slow.run_dir).name, "the run key changes with the feature source"


@pytest.mark.slow
def test_interrupted_head_run_resumes_and_ends_like_an_uninterrupted_one(data, tmp_path, monkeypatch):
    fc = tiny_embed(data, tmp_path / "cache", batch_size=8)
    clean = finetune(fc, epochs=4, lr=0.05, out_dir=tmp_path / "clean", **FT)
    run_epoch = Trainer.run_epoch

    def ctrl_c_in_epoch_3(self, epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        return run_epoch(self, epoch)

    monkeypatch.setattr(Trainer, "run_epoch", ctrl_c_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        finetune(fc, epochs=4, lr=0.05, out_dir=tmp_path / "cut", **FT)
    monkeypatch.setattr(Trainer, "run_epoch", run_epoch)
    r = finetune(fc, epochs=4, lr=0.05, out_dir=tmp_path / "cut", **FT)
    assert r.resumed_from == {"epoch": 2, "step": 0} and r.epochs_run == 4
    assert [h["train_loss"] for h in r.history] == pytest.approx([h["train_loss"] for h in clean.history], rel=1e-5)
    assert (r.accuracy, r.macro_f1) == (clean.accuracy, clean.macro_f1)


@pytest.mark.slow
def test_a_run_killed_while_embedding_a_view_resumes_that_view_where_it_stopped(data, tmp_path, monkeypatch):
    fc = tiny_embed(data, tmp_path / "cache", batch_size=8)
    clean = finetune(fc, epochs=3, lr=0.05, out_dir=tmp_path / "clean", **FT)
    batches, seen = head_features.feature_batches, []

    def small_batches_then_ctrl_c(todo, *a, **kw):
        for i, b in enumerate(batches(todo, *a, **{**kw, "batch_size": 4})):
            seen.extend(todo[j].key for j in b[0])
            yield b
            if kill and augment.parse(todo[0].key)[1] == 1 and i == 1:  # two batches into epoch 2's view
                raise KeyboardInterrupt

    monkeypatch.setattr(head_features, "feature_batches", small_batches_then_ctrl_c)
    kill = True
    with pytest.raises(KeyboardInterrupt):
        finetune(fc, epochs=3, lr=0.05, out_dir=tmp_path / "cut", checkpoint_seconds=1e-6, **FT)
    assert len(list((tmp_path / "cut").glob("finetune-head-*/view-0001.npz"))) == 1
    kill, seen[:] = False, []
    r = finetune(fc, epochs=3, lr=0.05, out_dir=tmp_path / "cut", checkpoint_seconds=1e-6, **FT)
    view1 = [k for k in seen if augment.parse(k)[1] == 1]
    assert len(view1) == r.n_train - 8, "the 8 images embedded before the kill are not embedded again"
    assert r.resumed_from == {"epoch": 1, "step": 0} and r.epochs_run == 3
    assert [h["train_loss"] for h in r.history] == pytest.approx([h["train_loss"] for h in clean.history], rel=1e-5)
    assert not list(Path(r.run_dir).glob("view-*.npz")), "the finished run keeps no embedded views"


@pytest.mark.slow
def test_compare_report_names_the_feature_source(data, tmp_path):
    out = tmp_path / "cmp"
    r = featx.compare(data, cache_dir=tmp_path / "cache", **TINY_BACKBONE, head="logreg",
                      folds=2, n_jobs=1, finetune=True, strategy="head", epochs=2, batch_size=8, workers=0,
                      device="cpu", out_dir=out, progress=False, report=True)
    note = "Fine-tune features: finetune-head: embedded once per epoch."
    assert r["rows"][-1]["features"] == "embedded once per epoch"
    assert note in r["table"] and note in (out / "compare.md").read_text()
    saved = json.loads((out / "compare.json").read_text())
    assert saved["rows"][-1]["features"] == saved["finetune"]["head"]["features"] == "embedded once per epoch"
    assert note in (out / "report.html").read_text()


def test_older_results_read_back_as_the_trunk_every_step(tmp_path):
    from featx.finetune.results import FinetuneResult

    saved = {f: None for f in FinetuneResult.__dataclass_fields__ if f not in ("reused", "early_stopping", "features")}
    assert FinetuneResult.from_dict(saved).features == "trunk every step"


def test_views_are_embedded_in_the_caches_precision():
    from types import SimpleNamespace

    bf16 = SimpleNamespace(fingerprint_dict={"backbone": "x", "precision": "bf16-openvino"})
    fp32 = SimpleNamespace(fingerprint_dict={"backbone": "x"})
    assert head_features.cache_runtime(bf16, "cpu") == "openvino-bf16"
    assert head_features.cache_runtime(bf16, "cuda:0") == "auto"  # OpenVINO runs on the CPU only
    assert head_features.cache_runtime(fp32, "cpu") == "auto"
