"""Fine-tuning: each strategy trains what it should, same splits as the probe, kill/Ctrl-C resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import featx
from featx.data import train_eval_split
from featx.embedding.backbones import create_backbone
from featx.errors import FeatxError
from featx.finetune.train import (
    STRATEGIES,
    apply_strategy,
    carve_validation,
    find_blocks,
    finetune,
    lr_lambda,
    train_transform,
)

from conftest import TINY_KW, fault_env, tiny_embed, write_image_folder

TINY_EMBED = dict(TINY_KW, batch_size=8)
TINY_FT = dict(epochs=1, batch_size=8, num_workers=0, progress=False, device="cpu")


@pytest.fixture
def tiny_cache(tmp_path):
    data = write_image_folder(tmp_path / "data", per_class=12)  # train 24, val 24
    return tiny_embed(data, tmp_path / "cache", batch_size=8)


def _backbone_state(model_state: dict) -> dict:
    return {k[len("backbone."):]: v for k, v in model_state.items() if k.startswith("backbone.")}


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.slow
def test_each_strategy_trains_exactly_its_layers(tiny_cache, tmp_path, strategy):
    out = tmp_path / "runs"
    r = finetune(tiny_cache, strategy=strategy, out_dir=out, **TINY_FT)

    # Same rows as the probe: the eval split is the dataset's val split, train is carved for early stopping.
    train_idx, eval_idx, desc = train_eval_split(tiny_cache.labels(), tiny_cache.split_array())
    assert r["n_eval"] == len(eval_idx) == 24 and r["split"] == desc
    assert r["n_train"] + r["n_val"] == len(train_idx) and r["n_val"] >= 2
    assert r["n_eval"] == 24 and r["n_eval_failed"] == 0
    assert r["epochs_run"] == 1 and r["best_epoch"] == 1 and len(r["history"]) == 1
    assert np.isfinite(r["history"][0]["train_loss"]) and r["images_per_s"] > 0 and r["wall_seconds"] > 0
    assert r["peak_gpu_mem_bytes"] is None and r["device"] == "cpu"
    run_dir = Path(r["run_dir"])
    assert json.loads((run_dir / "result.json").read_text())["accuracy"] == r["accuracy"]
    assert not list(run_dir.glob(".*.tmp")), "no temporary files left behind"

    # Compare the kept weights with the untouched backbone.
    best = torch.load(run_dir / "best.pt", weights_only=True)["model"]
    after = _backbone_state(best)
    before = create_backbone("tiny_cnn", weights="random").model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    first, last = "blocks.0.weight", "blocks.9.weight"  # first and last conv of TinyCNN
    if strategy == "full":
        assert first in changed and last in changed
    elif strategy == "partial":  # last 2 blocks with parameters: blocks.9 (conv) and blocks.10 (its BN)
        assert first not in changed and last in changed
        assert all(k.startswith(("blocks.9.", "blocks.10.")) for k in changed), changed
    else:  # head: backbone untouched, BN running statistics included (frozen parts stay in eval mode)
        assert changed == set()
    assert best["head.weight"].shape == (2, 32)


@pytest.mark.slow
def test_rerun_reuses_finished_result_and_other_settings_start_fresh(tiny_cache, tmp_path):
    out = tmp_path / "runs"
    a = finetune(tiny_cache, strategy="head", out_dir=out, **TINY_FT)
    b = finetune(tiny_cache, strategy="head", out_dir=out, **TINY_FT)
    assert b["reused"] is True and b["accuracy"] == a["accuracy"] and b["run_dir"] == a["run_dir"]
    c = finetune(tiny_cache, strategy="head", out_dir=out, lr=1e-2, **TINY_FT)
    assert c["reused"] is False and c["run_dir"] != a["run_dir"]
    d = finetune(tiny_cache, strategy="head", out_dir=out, overwrite=True, **TINY_FT)
    assert d["reused"] is False and d["run_dir"] == a["run_dir"]


def test_finetune_refuses_bad_options(tiny_cache, tmp_path):
    with pytest.raises(FeatxError, match="--strategy"):
        finetune(tiny_cache, strategy="everything", out_dir=tmp_path)
    with pytest.raises(FeatxError, match="--epochs"):
        finetune(tiny_cache, epochs=0, out_dir=tmp_path)
    with pytest.raises(FeatxError, match="--val-fraction"):
        finetune(tiny_cache, val_fraction=1.5, out_dir=tmp_path)


def test_validation_slice_is_stratified_subset_of_train():
    labels = np.array([0] * 30 + [1] * 10 + [2] * 20)
    train = np.arange(50)
    fit, val = carve_validation(train, labels, fraction=0.2, seed=0)
    assert set(fit) | set(val) == set(train) and not set(fit) & set(val)
    assert len(val) == 10 and set(labels[val]) == {0, 1, 2}
    fit2, val2 = carve_validation(train, labels, fraction=0.2, seed=0)
    assert np.array_equal(val, val2)
    fit0, val0 = carve_validation(train, labels, fraction=0.0, seed=0)
    assert len(val0) == 0 and len(fit0) == 50


def test_partial_finds_blocks_in_common_architectures():
    import timm
    import torchvision

    eff = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    blocks, tail = find_blocks(eff)
    assert [n for n, _ in blocks][-2:] == ["blocks.5", "blocks.6"]
    assert [n for n, _ in tail] == ["conv_head", "bn2"]
    trained = apply_strategy(eff, "partial", partial_blocks=2)
    assert trained == ["blocks.5", "blocks.6", "conv_head", "bn2"]
    assert not eff.conv_stem.weight.requires_grad and eff.blocks[6][0].conv_pw.weight.requires_grad

    res = torchvision.models.resnet18(weights=None)
    res.fc = torch.nn.Identity()
    blocks, tail = find_blocks(res)
    assert [n for n, _ in blocks] == ["layer1", "layer2", "layer3", "layer4"] and tail == []
    assert apply_strategy(res, "partial", partial_blocks=1) == ["layer4"]
    assert apply_strategy(res, "head") == [] and not any(p.requires_grad for p in res.parameters())


def test_training_augmentation_uses_the_backbones_preprocessing():
    from PIL import Image

    pre = create_backbone("tiny_cnn", weights="random").preprocess
    tf = train_transform(pre)
    img = Image.fromarray(np.full((50, 70, 3), 128, np.uint8))
    x = tf(img)
    assert x.shape == (3, pre.crop, pre.crop)
    expected = (128 / 255 - pre.mean[0]) / pre.std[0]  # the backbone's own mean/std, not ImageNet's
    assert torch.allclose(x, torch.full_like(x, expected), atol=1e-2)


_SCRIPT = textwrap.dedent(
    """
    import json, logging, sys
    logging.basicConfig(level=logging.INFO)
    from featx.cache.store import FeatureCache
    from featx.finetune.train import finetune
    r = finetune(FeatureCache(sys.argv[1]), strategy="full", epochs=2, batch_size=4, num_workers=0,
                 device="cpu", out_dir=sys.argv[2], checkpoint_seconds=0.3, progress=False)
    print(json.dumps({k: r[k] for k in ("resumed_from", "epochs_run", "accuracy", "macro_f1", "history")}))
    """
)


def _start(tmp_path, cache_path, out, delay: str):
    script = tmp_path / "ft.py"
    script.write_text(_SCRIPT)
    env = dict(fault_env(FEATX_TEST_STEP_DELAY=delay), OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, str(script), str(cache_path), str(out)], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _wait_for(path_glob, out: Path, proc, timeout=300):  # generous: CI machines may be shared
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = list(out.glob(path_glob))
        if found:
            return found[0]
        if proc.poll() is not None:
            raise AssertionError(f"finished before the kill: {proc.stderr.read()}")
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


@pytest.mark.slow
def test_killed_finetune_resumes_from_its_checkpoint(tiny_cache, tmp_path):
    out = tmp_path / "runs"
    proc = _start(tmp_path, tiny_cache.path, out, delay="0.4")  # ~5 steps per epoch, 0.4 s each
    last = _wait_for("finetune-full-*/last.pt", out, proc)
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = torch.load(last, weights_only=True)["state"]
    assert saved["epoch"] < 2, "the kill must land before the end"
    at = {"epoch": saved["epoch"], "step": saved["step"]}

    done = subprocess.run(
        [sys.executable, str(tmp_path / "ft.py"), str(tiny_cache.path), str(out)],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert done.returncode == 0, done.stderr
    assert "resuming from" in done.stderr
    r = json.loads(done.stdout.strip().splitlines()[-1])
    assert r["resumed_from"] == at
    assert r["epochs_run"] == 2 and [h["epoch"] for h in r["history"]] == [1, 2]

    # Same data order, optimiser state and (workers=0) augmentation draws: it ends where a run
    # that was never interrupted ends.
    clean = subprocess.run(
        [sys.executable, str(tmp_path / "ft.py"), str(tiny_cache.path), str(tmp_path / "clean")],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert clean.returncode == 0, clean.stderr
    c = json.loads(clean.stdout.strip().splitlines()[-1])
    assert c["resumed_from"] is None
    assert [h["train_loss"] for h in r["history"]] == pytest.approx([h["train_loss"] for h in c["history"]], rel=1e-5)
    assert (r["accuracy"], r["macro_f1"]) == (c["accuracy"], c["macro_f1"])


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_stops(tiny_cache, tmp_path):
    out = tmp_path / "runs"
    proc = _start(tmp_path, tiny_cache.path, out, delay="0.4")
    _wait_for("finetune-full-*/last.pt", out, proc)  # inside the training loop
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "KeyboardInterrupt" in err
    assert "interrupted; checkpoint saved" in err
    run_dir = next(out.glob("finetune-full-*"))
    st = torch.load(run_dir / "last.pt", weights_only=True)["state"]
    assert st["epoch"] * 100 + st["step"] > 0
    assert not list(run_dir.glob(".*.tmp")) and not (run_dir / "result.json").exists()


def test_a_second_process_with_the_same_settings_is_refused(tiny_cache, tmp_path):
    from filelock import FileLock

    out = tmp_path / "runs"
    r = finetune(tiny_cache, strategy="head", out_dir=out, **TINY_FT)
    held = FileLock(str(Path(r["run_dir"]) / "run.lock"))
    held.acquire()
    try:
        with pytest.raises(FeatxError, match="another process is fine-tuning"):
            finetune(tiny_cache, strategy="head", out_dir=out, **TINY_FT)
    finally:
        held.release()
    assert finetune(tiny_cache, strategy="head", out_dir=out, **TINY_FT)["reused"] is True


def test_learning_rate_warms_up_then_decays_to_zero():
    f = lr_lambda(warmup=4, total=20)
    ramp = [f(s) for s in range(4)]
    assert ramp == [0.25, 0.5, 0.75, 1.0]
    decay = [f(s) for s in range(4, 20)]
    assert decay[0] == 1.0 and all(a >= b for a, b in zip(decay, decay[1:])) and decay[-1] < 0.02
    assert lr_lambda(warmup=0, total=1)(0) == 1.0


def test_images_broken_after_embedding_are_skipped_not_fatal(tiny_cache, tmp_path, caplog):
    paths = tiny_cache.paths()
    split = tiny_cache.split_array()
    bad_train = paths[int(np.flatnonzero(split == "train")[0])]
    bad_eval = paths[int(np.flatnonzero(split == "val")[0])]
    for p in (bad_train, bad_eval):
        Path(p).write_bytes(b"not an image any more")
    with caplog.at_level("WARNING", logger="featx"):
        r = finetune(tiny_cache, strategy="head", out_dir=tmp_path / "runs", **TINY_FT)
    assert r["n_eval_failed"] == 1 and r["n_eval"] == 23
    assert any(bad_eval in m for m in caplog.messages)


@pytest.mark.slow
def test_fine_tuned_head_learns_separable_data_well_above_chance(tmp_path):
    # Red vs green images: a linear layer on the frozen random tiny_cnn separates them easily.
    data = write_image_folder(tmp_path / "data", per_class=16)
    fc = featx.embed(data, cache_dir=tmp_path / "cache", **TINY_EMBED)
    r = finetune(fc, strategy="head", epochs=6, lr=0.05, batch_size=8, num_workers=0, progress=False, device="cpu",
                 out_dir=tmp_path / "runs")
    assert r["n_eval"] == 32
    assert r["accuracy"] >= 0.9 and r["macro_f1"] >= 0.9  # chance is 0.5
    assert r["history"][-1]["train_loss"] < r["history"][0]["train_loss"]


def test_result_is_a_dataclass_whose_json_keeps_the_keys(tiny_cache, tmp_path):
    from featx.finetune import FinetuneResult

    r = finetune(tiny_cache, settings=featx.finetune.FinetuneSettings(strategy="head", epochs=1, batch_size=8),
                 options=featx.finetune.RunOptions(num_workers=0, progress=False, device="cpu", out_dir=tmp_path))
    assert isinstance(r, FinetuneResult)
    saved = json.loads((Path(r.run_dir) / "result.json").read_text())
    keys = {"method", "kind", "strategy", "accuracy", "balanced_accuracy", "macro_f1", "eval_loss", "wall_seconds",
            "train_seconds", "eval_seconds", "images_per_s", "peak_gpu_mem_bytes", "device", "backbone", "epochs_run",
            "best_epoch", "best_val_accuracy", "stopped_early", "resumed_from", "resumes", "history", "n_train",
            "n_val", "n_eval", "n_eval_failed", "trained_modules", "trainable_params", "total_params", "settings",
            "split", "cache", "run_dir", "checkpoint", "key", "reused"}
    assert keys <= set(saved) and keys <= set(r.to_dict())
    assert saved["accuracy"] == r.accuracy == r["accuracy"] and saved["method"] == "finetune-head"
    with pytest.raises(TypeError, match="nonsense"):
        finetune(tiny_cache, nonsense=1, out_dir=tmp_path)


def _history(accs):
    return [{"epoch": i + 1, "val_accuracy": a, "val_loss": 1.0} for i, a in enumerate(accs)]


def test_early_stopping_never_stops_before_the_anneal():
    from featx.finetune.schedule import EarlyStopping, StepPlan

    # Issue 12: 10 epochs, best val accuracy at epoch 2 then a plateau; the LR is still near its peak at epoch 5.
    plan = StepPlan.make(540, batch_size=32, epochs=10, warmup_epochs=1.0)
    rule = EarlyStopping.plan(plan, epochs=10, patience=3, n_val=200, min_val_images=100)
    assert rule.mode == "val"
    assert plan.lr_factor_after(rule.first_judged_epoch) <= 0.5 < plan.lr_factor_after(rule.first_judged_epoch - 1)
    accs = [0.5, 0.9, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6]
    best, bad, stopped_at, kept = (-1.0, float("inf")), 0, None, None
    for e in range(1, 11):
        improved, bad, stop = rule.judge(_history(accs[:e]), best=best, bad_epochs=bad, epochs=10)
        if improved:
            best, kept = rule.score(_history(accs[:e])), e
        if stop:
            stopped_at = e
            break
    assert kept >= rule.first_judged_epoch >= 6, "epochs before the anneal are never kept"
    assert stopped_at is None or stopped_at >= rule.first_judged_epoch + rule.patience - 1
    # Judged on the score smoothed over two epochs: a one-epoch spike does not win.
    assert rule.score(_history([0.5, 0.9])) == (pytest.approx(0.7), 1.0)


@pytest.mark.slow
def test_small_validation_slice_runs_the_fixed_schedule(tiny_cache, tmp_path):
    from featx.finetune.schedule import EarlyStopping, StepPlan

    plan = StepPlan.make(540, batch_size=32, epochs=10, warmup_epochs=1.0)
    rule = EarlyStopping.plan(plan, epochs=10, patience=1, n_val=60, min_val_images=100)
    assert rule.mode == "fixed"
    assert all(rule.judge(_history([0.9, 0.1, 0.1][:e]), best=(0.9, 1.0), bad_epochs=0, epochs=10) == (True, 0, False)
               for e in (1, 2, 3))
    # End to end: patience 1 and a 3-image slice; all epochs run and the last weights are kept.
    r = finetune(tiny_cache, strategy="head", out_dir=tmp_path, patience=1, **TINY_FT | {"epochs": 3})
    assert r["n_val"] < 100 and r["early_stopping"]["mode"] == "fixed"
    assert r["epochs_run"] == 3 and r["best_epoch"] == 3 and not r["stopped_early"]
    # With the threshold lowered, the same slice is judged, and only from the anneal on.
    v = finetune(tiny_cache, strategy="head", out_dir=tmp_path, patience=1, min_val_images=1, **TINY_FT | {"epochs": 3})
    assert v["early_stopping"]["mode"] == "val" and v["best_epoch"] >= v["early_stopping"]["first_judged_epoch"] >= 2
