"""The fine-tune's learning-rate schedule and early-stopping rule (finetune/schedule.py)."""

from __future__ import annotations

import math

import pytest

from featx.finetune.schedule import ANNEAL_LR_FRACTION, EarlyStopping, StepPlan, lr_lambda


def test_lr_warms_up_linearly_then_decays_by_cosine_to_zero() -> None:
    f = lr_lambda(4, 20)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0 and f(12) == pytest.approx(0.5) and f(20) == pytest.approx(0.0) and f(99) == pytest.approx(0.0)
    assert all(f(s) >= f(s + 1) for s in range(4, 20))
    assert lr_lambda(0, 10)(0) == 1.0


def test_step_plan_drops_a_last_batch_of_one_and_caps_warmup() -> None:
    p = StepPlan.make(33, batch_size=8, epochs=10, warmup_epochs=1)
    assert (p.images_per_epoch, p.steps_per_epoch, p.total_steps, p.warmup_steps) == (32, 4, 40, 4)
    q = StepPlan.make(34, batch_size=8, epochs=2, warmup_epochs=5)
    assert q.images_per_epoch == 34 and q.steps_per_epoch == 5 and q.warmup_steps == 10 // 5  # a fifth at most
    assert StepPlan.make(1, batch_size=8, epochs=3, warmup_epochs=0).steps_per_epoch == 1
    assert p.lr_factor_after(10) == pytest.approx(0.0)


def _hist(*accs):
    return [{"val_accuracy": a, "val_loss": 1 - a if a is not None else None} for a in accs]


def test_early_stopping_waits_for_the_anneal_and_judges_smoothed_scores() -> None:
    plan = StepPlan.make(80, batch_size=8, epochs=10, warmup_epochs=1)
    rule = EarlyStopping.plan(plan, epochs=10, patience=2, n_val=200, min_val_images=100)
    assert rule.mode == "val"
    first = rule.first_judged_epoch
    assert plan.lr_factor_after(first) <= ANNEAL_LR_FRACTION < plan.lr_factor_after(first - 1)
    assert rule.judge(_hist(*[0.9] * (first - 1)), best=(-1.0, math.inf), bad_epochs=0, epochs=10) == (False, 0, False)
    h = _hist(*[0.5] * (first - 1), 0.7)
    assert rule.score(h) == pytest.approx((0.6, 0.4))  # mean of the last two epochs
    keep, bad, stop = rule.judge(h, best=(-1.0, math.inf), bad_epochs=0, epochs=10)
    assert keep and bad == 0 and not stop
    keep, bad, stop = rule.judge(h + _hist(0.5), best=(0.6, 0.4), bad_epochs=1, epochs=10)  # (0.6, 0.4) again: no better
    assert (keep, bad, stop) == (False, 2, True)
    assert rule.judge(_hist(*[0.1] * 10), best=(0.9, 0.1), bad_epochs=5, epochs=10)[2] is False  # never after the last
    assert rule.score(_hist(None, float("nan"))) == (-1.0, math.inf)


def test_a_small_validation_slice_runs_the_fixed_schedule_and_keeps_the_last_weights() -> None:
    plan = StepPlan.make(80, batch_size=8, epochs=5, warmup_epochs=1)
    rule = EarlyStopping.plan(plan, epochs=5, patience=1, n_val=20, min_val_images=100)
    assert rule.to_dict() == {"mode": "fixed", "patience": 1, "first_judged_epoch": 5, "smooth": 2, "n_val": 20}
    assert rule.judge(_hist(0.9, 0.1), best=(0.9, 0.1), bad_epochs=3, epochs=5) == (True, 0, False)
