"""The training loop: epochs of steps, validation, checkpoints, resume after a kill or Ctrl-C.

Why a :class:`TrainState` dataclass: everything that must survive a kill (epoch, step within
the epoch, history, best score, timings) lives in one typed object that is saved with the
model, optimiser, scheduler and RNG states in ``last.pt`` at every epoch end, every
``checkpoint_seconds`` within an epoch, and on Ctrl-C.  A resumed run draws the same data
order, so it ends where an uninterrupted run would.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ..base.progress import format_duration, progress_bar
from .checkpoint import CHECKPOINT_VERSION, atomic_torch_save, load_last, rng_state, set_rng_state
from .evaluate import predict
from .inputs import RowLoaders
from .model import Classifier, frozen_roots, param_groups
from .runs import RunDir
from .schedule import EarlyStopping, StepPlan, lr_lambda
from .settings import FinetuneSettings

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Progress of a fine-tune, saved in every checkpoint."""

    epoch: int = 0  # epochs finished
    step: int = 0  # steps finished within the current epoch
    history: list = field(default_factory=list)
    best_epoch: int | None = None
    best_val_acc: float = -1.0  # the best (smoothed) validation accuracy judged so far
    best_val_loss: float = float("inf")
    bad_epochs: int = 0
    stopped_early: bool = False
    elapsed: float = 0.0  # wall seconds of earlier runs, up to the checkpoint
    train_seconds: float = 0.0
    images_seen: int = 0
    loss_sum: float = 0.0
    loss_n: int = 0
    epoch_train_seconds: float = 0.0
    resumes: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainState":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass
class LoopContext:
    """What the loop works on: the network, its rows and loaders, the run folder and the clock."""

    net: Classifier
    settings: FinetuneSettings
    plan: StepPlan
    rule: EarlyStopping
    loaders: RowLoaders
    fit_idx: np.ndarray
    val_idx: np.ndarray
    run: RunDir
    key: str
    device: str
    checkpoint_seconds: float
    progress: bool
    started: float  # perf_counter() when the call began: setup counts towards the wall time too


class Trainer:
    """Runs the epochs of one fine-tune on a :class:`LoopContext`, keeping :class:`TrainState`."""

    def __init__(self, ctx: LoopContext) -> None:
        self.ctx = ctx
        s, dev = ctx.settings, ctx.device
        self.cuda = dev.startswith("cuda")
        self.frozen = frozen_roots(ctx.net)  # kept in eval mode while training
        self.opt = torch.optim.AdamW(param_groups(ctx.net, s), lr=s.lr, fused=self.cuda or None)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(ctx.plan.warmup_steps, ctx.plan.total_steps))
        self.criterion = torch.nn.CrossEntropyLoss(label_smoothing=s.label_smoothing)
        self.state = TrainState()
        self.base_elapsed = 0.0
        self.pending_rng: dict | None = None
        # The running loss stays on the device: reading it every step would sync CUDA each step.
        self.loss_acc = torch.zeros((), device=dev)
        self.val_loader = ctx.loaders.evaluation(ctx.val_idx) if len(ctx.val_idx) else None

    def resume(self) -> dict | None:
        """Continue from ``last.pt`` when it belongs to this run; returns where it resumed, or None."""
        ck = load_last(self.ctx.run.last, self.ctx.key)
        if ck is None:
            return None
        self.ctx.net.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])
        self.state = TrainState.from_dict(ck["state"])
        self.base_elapsed = float(self.state.elapsed)
        # Restored where the original run saved it: at an epoch end before the next epoch's
        # loader starts, mid-epoch after it started (it draws one seed when it does).
        self.pending_rng = ck["rng"]
        if self.state.step == 0:
            set_rng_state(self.pending_rng, self.cuda)
            self.pending_rng = None
        at = {"epoch": int(self.state.epoch), "step": int(self.state.step)}
        self.state.resumes = list(self.state.resumes) + [at]
        log.info(
            "finetune[%s]: resuming from %s (epoch %d, step %d of %d)", self.ctx.settings.strategy, self.ctx.run.last,
            self.state.epoch + 1, self.state.step, self.ctx.plan.steps_per_epoch,
        )
        return at

    def wall_seconds(self) -> float:
        """This run from its start, plus the runs before a resume."""
        return self.base_elapsed + (time.perf_counter() - self.ctx.started)

    def save_last(self) -> None:
        self.state.loss_sum += float(self.loss_acc)
        self.loss_acc.zero_()
        self.state.elapsed = self.wall_seconds()
        atomic_torch_save(
            {
                "version": CHECKPOINT_VERSION, "key": self.ctx.key, "model": self.ctx.net.state_dict(),
                "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "state": self.state.to_dict(), "rng": rng_state(self.cuda),
            },
            self.ctx.run.last,
        )

    def fit(self) -> None:
        """Train until the last epoch or an early stop; Ctrl-C saves a checkpoint, then re-raises."""
        try:
            while self.state.epoch < self.ctx.settings.epochs and not self.state.stopped_early:
                self.run_epoch(int(self.state.epoch))
                self.finish_epoch(int(self.state.epoch))
                self.save_last()
        except KeyboardInterrupt:
            # Keep everything up to the last finished step; the same command resumes from here.
            try:
                self.save_last()
                log.warning("finetune[%s]: interrupted; checkpoint saved to %s", self.ctx.settings.strategy, self.ctx.run.last)
            except Exception:  # noqa: BLE001 - never mask the interrupt
                pass
            raise

    def epoch_rows(self, epoch: int) -> np.ndarray:
        """This epoch's training rows still to do: a seeded order, so a resume can skip the done steps."""
        s = self.ctx.settings
        g = torch.Generator().manual_seed(s.seed * 1_000_003 + epoch)
        order = self.ctx.fit_idx[torch.randperm(len(self.ctx.fit_idx), generator=g).numpy()]
        order = order[: self.ctx.plan.images_per_epoch]
        return order[int(self.state.step) * s.batch_size :]

    def set_train_mode(self) -> None:
        self.ctx.net.train()
        for m in self.frozen:
            m.eval()

    def run_epoch(self, epoch: int) -> None:
        """The steps of one epoch (from the saved step when resuming), with intra-epoch checkpoints."""
        ctx, st = self.ctx, self.state
        loader = ctx.loaders.train(self.epoch_rows(epoch), epoch=epoch)
        self.set_train_mode()
        t_ep = t_ck = time.perf_counter()
        getattr(loader, "prepare", lambda: None)()  # a head run on features embeds its view here, before the bar
        bar = progress_bar(
            total=ctx.plan.steps_per_epoch, initial=st.step, unit="step", disable=not ctx.progress, leave=False,
            desc=f"finetune[{ctx.settings.strategy}] epoch {epoch + 1}/{ctx.settings.epochs}",
        )
        try:
            batches = iter(loader)
            if self.pending_rng is not None:
                set_rng_state(self.pending_rng, self.cuda)
                self.pending_rng = None
            for x, y, ok in batches:
                self.train_step(x, y, ok)
                bar.update(1)
                now = time.perf_counter()
                if ctx.checkpoint_seconds and now - t_ck >= ctx.checkpoint_seconds and st.step < ctx.plan.steps_per_epoch:
                    st.epoch_train_seconds += now - t_ep
                    st.train_seconds += now - t_ep
                    self.save_last()
                    t_ck = t_ep = time.perf_counter()
        finally:
            bar.close()
        if self.cuda:
            torch.cuda.synchronize(ctx.device)  # honest epoch times and images/s
        now = time.perf_counter()
        st.epoch_train_seconds += now - t_ep
        st.train_seconds += now - t_ep

    def train_step(self, x: torch.Tensor, y: torch.Tensor, ok: torch.Tensor) -> None:
        """One optimiser step on the images that loaded (a batch with none counts as a step)."""
        st = self.state
        okm = ok.bool()
        if not okm.all():
            x, y = x[okm], y[okm]
        if len(y) == 0:  # the whole batch failed to load: count the step, train nothing
            st.step += 1
            return
        x = x.to(self.ctx.device, non_blocking=True)
        y = y.to(self.ctx.device, non_blocking=True)
        if x.ndim == 4:  # images (feature rows are 2-d)
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.cuda):
            logits = self.ctx.net(x)
        loss = self.criterion(logits.float(), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        st.step += 1
        st.images_seen += int(len(y))
        self.loss_acc += loss.detach() * len(y)
        st.loss_n += int(len(y))

    def validate(self) -> tuple[float, float]:
        """(accuracy, mean loss) on the validation slice; NaN without one."""
        if self.val_loader is None:
            return float("nan"), float("nan")
        yv, pv, okv, val_loss = predict(self.ctx.net, self.val_loader, self.ctx.device, self.cuda)
        return (float((yv[okv] == pv[okv]).mean()) if okv.any() else float("nan")), val_loss

    def finish_epoch(self, epoch: int) -> None:
        """Validate, record the epoch, keep the best weights and maybe stop early."""
        ctx, st = self.ctx, self.state
        st.loss_sum += float(self.loss_acc)
        self.loss_acc.zero_()
        train_loss = st.loss_sum / st.loss_n if st.loss_n else float("nan")
        val_acc, val_loss = self.validate()
        ips = (st.loss_n / st.epoch_train_seconds) if st.epoch_train_seconds > 0 else 0.0
        st.history.append(
            {"epoch": epoch + 1, "train_loss": train_loss, "val_accuracy": val_acc, "val_loss": val_loss,
             "images_per_s": ips, "seconds": st.epoch_train_seconds, "lr": float(self.opt.param_groups[0]["lr"])}
        )
        improved, st.bad_epochs, stop = ctx.rule.judge(
            st.history, best=(st.best_val_acc, st.best_val_loss), bad_epochs=st.bad_epochs, epochs=ctx.settings.epochs,
        )
        if improved:
            st.best_epoch = epoch + 1
            st.best_val_acc, st.best_val_loss = ctx.rule.score(st.history) if ctx.rule.mode == "val" else (val_acc, val_loss)
            atomic_torch_save({"key": ctx.key, "epoch": epoch + 1, "model": ctx.net.state_dict()}, ctx.run.best)
        mean_ep = sum(h["seconds"] for h in st.history) / len(st.history)
        log.info(
            "finetune[%s] epoch %d/%d  train loss %.4f  val acc %s  %.1f images/s  ETA %s%s",
            ctx.settings.strategy, epoch + 1, ctx.settings.epochs, train_loss,
            f"{val_acc:.4f}" if not math.isnan(val_acc) else "n/a", ips,
            format_duration(mean_ep * (ctx.settings.epochs - epoch - 1)),
            "  *best*" if improved and ctx.rule.mode == "val" else "",
        )
        st.epoch, st.step, st.loss_sum, st.loss_n, st.epoch_train_seconds = epoch + 1, 0, 0.0, 0, 0.0
        if stop:
            st.stopped_early = True
            log.info(
                "finetune[%s]: early stop, no improvement of the smoothed val accuracy for %d epochs (best epoch %d)",
                ctx.settings.strategy, ctx.settings.patience, st.best_epoch,
            )
