"""The learning-rate schedule and the early-stopping rule that respects it.

Why they live together: with warm-up then cosine decay, the weights only settle once the
learning rate has come down.  Judging the run on a noisy validation slice while the learning
rate is still near its peak stopped a 10-epoch fine-tune at epoch 5 (best at epoch 2) when a
plain fixed schedule did better (ACCURACY.md).  So:

- an epoch is judged only once the learning rate at its end has fallen to half the peak or
  below (the anneal), and on the validation accuracy averaged over the last ``SMOOTH_EPOCHS``
  epochs (validation loss breaks ties), so early stopping never ends a run before its anneal;
- a validation slice smaller than ``min_val_images`` is too noisy to judge at all: the fixed
  schedule runs to the end and its last weights are kept.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

SMOOTH_EPOCHS = 2
ANNEAL_LR_FRACTION = 0.5


def lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    """Multiplier of the peak LR at ``step``: linear warm-up over ``warmup`` steps, then cosine to zero at ``total``."""

    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        span = max(1, total - warmup)
        t = min(1.0, (step - warmup) / span)
        return 0.5 * (1.0 + math.cos(math.pi * t))

    return f


@dataclass(frozen=True)
class StepPlan:
    """Steps of the schedule: every image every epoch, except a last batch of one (BatchNorm cannot train on it)."""

    images_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int

    @classmethod
    def make(cls, n_fit: int, *, batch_size: int, epochs: int, warmup_epochs: float) -> "StepPlan":
        n_epoch = n_fit - (1 if n_fit % batch_size == 1 and n_fit > 1 else 0)
        steps = max(1, math.ceil(n_epoch / batch_size))
        total = steps * epochs
        warmup = min(int(round(warmup_epochs * steps)), total // 5)
        return cls(images_per_epoch=n_epoch, steps_per_epoch=steps, total_steps=total, warmup_steps=warmup)

    def lr_factor_after(self, epoch: int) -> float:
        """The LR multiplier once ``epoch`` (1-based) has finished."""
        return lr_lambda(self.warmup_steps, self.total_steps)(epoch * self.steps_per_epoch)


@dataclass(frozen=True)
class EarlyStopping:
    """When to keep an epoch's weights and when to stop (see the module docstring)."""

    mode: str  # "val": judged on the smoothed validation score; "fixed": all epochs, last weights kept
    patience: int
    first_judged_epoch: int
    smooth: int = SMOOTH_EPOCHS
    n_val: int = 0

    @classmethod
    def plan(cls, plan: StepPlan, *, epochs: int, patience: int, n_val: int, min_val_images: int) -> "EarlyStopping":
        """The rule for a run of ``epochs`` with ``n_val`` validation images."""
        if n_val == 0 or n_val < min_val_images:
            return cls(mode="fixed", patience=patience, first_judged_epoch=epochs, n_val=n_val)
        first = next(e for e in range(1, epochs + 1) if plan.lr_factor_after(e) <= ANNEAL_LR_FRACTION + 1e-12)
        return cls(mode="val", patience=patience, first_judged_epoch=first, n_val=n_val)

    def score(self, history: list[dict]) -> tuple[float, float]:
        """(mean validation accuracy, mean validation loss) over the last ``smooth`` epochs of ``history``."""
        recent = history[-self.smooth :]
        acc = [h["val_accuracy"] for h in recent if h["val_accuracy"] is not None and not math.isnan(h["val_accuracy"])]
        loss = [h["val_loss"] for h in recent if h["val_loss"] is not None and not math.isnan(h["val_loss"])]
        return (sum(acc) / len(acc) if acc else -1.0), (sum(loss) / len(loss) if loss else float("inf"))

    def judge(self, history: list[dict], *, best: tuple[float, float], bad_epochs: int, epochs: int) -> tuple[bool, int, bool]:
        """(keep these weights as the best, the new count of epochs without improvement, stop now).

        ``history`` ends with the epoch just finished; ``best`` is the best (accuracy, loss) so far.
        """
        epoch = len(history)
        if self.mode == "fixed":
            return True, 0, False
        if epoch < self.first_judged_epoch:
            return False, 0, False
        acc, loss = self.score(history)
        improved = acc > best[0] or (acc == best[0] and loss < best[1])
        bad = 0 if improved else bad_epochs + 1
        return improved, bad, (bad >= self.patience and epoch < epochs)

    def to_dict(self) -> dict:
        return asdict(self)
