"""End-to-end fine-tuning of the cache's backbone, on exactly the images the probe uses.

Why it exists: the linear probe answers "how good are the frozen features"; fine-tuning
answers "what does training the network itself buy, and at what cost".  To make the two
comparable, :func:`finetune` rebuilds the cache's own backbone (same weights, checked against
the cache fingerprint), puts a fresh linear classifier on it, and trains on the very rows
:func:`featx.data.train_eval_split` gives the probe; the validation slice is carved from those
training rows only, so the evaluation split is never seen before the end.

Strategies
    ``full``     every layer is trained.
    ``partial``  the last ``partial_blocks`` blocks (plus the layers after them, e.g. the
                 final 1x1 conv and its norm) are trained, the rest is frozen (blocks are found
                 generically, see :func:`featx.finetune.model.find_blocks`).
    ``head``     the backbone is frozen; only the linear layer is trained (the in-network
                 linear probe, with augmentation).
Frozen parts are kept in eval mode, so their BatchNorm statistics do not drift either.

Defaults (documented in ``configs/default.yaml`` too): AdamW (weight decay 0.05, none on
biases and norm weights), peak learning rate 3e-3 for the new linear layer and 0.1x that for
the backbone, linear warm-up over the first epoch (at most a fifth of all steps) then cosine
decay to zero, label smoothing 0.1, training augmentation = random resized crop (scale
0.25-1, the backbone's crop size and interpolation) + horizontal flip + the backbone's own
normalisation; evaluation uses the backbone's eval transform (``Preprocess.pil_transform``).
Early stopping (:mod:`featx.finetune.schedule`) watches the validation accuracy smoothed over
two epochs on a stratified 10% slice of the training rows, only once the learning rate has
annealed to half its peak (patience 3 epochs), and keeps the best judged epoch's weights; a
slice under ``min_val_images`` images runs the fixed schedule and keeps the last weights.

channels_last everywhere. On CUDA: bf16 autocast, pinned memory, non-blocking copies and DataLoader
workers.  On the CPU it runs in float32 (slowly) so tests can train one short epoch.

Crash safety (:mod:`featx.finetune.runs`, :mod:`featx.finetune.checkpoint`,
:mod:`featx.finetune.loop`): the run folder ``<out_dir>/finetune-<strategy>-<key>/`` is keyed
by every setting that changes the result; ``last.pt`` is written atomically at every epoch
end, every ``checkpoint_seconds`` within an epoch, and on Ctrl-C; rerunning the same command
resumes from it with the same data order (and, with ``num_workers=0``, the same augmentation
draws).  ``best.pt`` holds the kept weights; ``result.json`` the finished result (a rerun
reuses it unless ``overwrite``).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from ..base.errors import FeatxError
from ..base.io import write_json
from ..base.progress import format_duration
from ..base.runtime import default_num_workers, default_workers, keep_heap_buffers, resolve_device
from ..cache.store import FeatureCache
from ..cache.trust.roots import trusted_root
from ..data.splits import Split, carve_validation
from .checkpoint import load_best_weights, seed_everything
from .evaluate import metrics, predict
from .features import feature_loaders, plan_source, source_label
from .inputs import RowLoaders, train_transform
from .loop import LoopContext, Trainer, TrainState
from .model import apply_strategy, build_classifier, count_params, find_blocks, training_backbone
from .results import FinetuneResult
from .runs import RunDir, finished_result, open_run_dir, prepare_run_dir, run_key
from .schedule import EarlyStopping, StepPlan, lr_lambda
from .settings import STRATEGIES, FinetuneSettings, RunOptions

log = logging.getLogger(__name__)

__all__ = [
    "STRATEGIES", "FinetuneSettings", "RunOptions", "FinetuneResult", "TrainState", "finetune", "find_blocks",
    "apply_strategy", "carve_validation", "train_transform", "lr_lambda", "metrics",
]


@dataclass(frozen=True)
class SplitRows:
    """The probe's rows (train, eval) and the training rows cut into fit and validation."""

    labels: np.ndarray
    train: np.ndarray
    fit: np.ndarray
    val: np.ndarray
    eval: np.ndarray
    desc: dict


def split_rows(fc: FeatureCache, settings: FinetuneSettings, split: Split | None = None) -> SplitRows:
    """Exactly the probe's split (``split``, the run's own, or drawn the same way), plus the validation
    slice carved from its training rows."""
    labels = fc.labels()
    if split is None:
        split = Split.of(labels, fc.split_array(), test_size=settings.test_size, seed=settings.seed)
    split.check_matches(test_size=settings.test_size, seed=settings.seed, n_rows=len(labels), what="finetune")
    train_idx, eval_idx, desc = split.train, split.eval, dict(split.desc)
    fit_idx, val_idx = carve_validation(train_idx, labels, fraction=settings.val_fraction, seed=settings.seed)
    if len(fit_idx) == 0:
        raise FeatxError(f"cache {fc.path} has no training rows to fine-tune on; add images under train/<class>/")
    if fc.root and not trusted_root(fc.meta, what=f"fine-tuning on {fc.path.name}"):
        raise FeatxError(f"cache {fc.path} declares data root {fc.root!r} but was not embedded on this machine, so "
                         "featx does not read images from it; embed the images here with `featx embed DATA --overwrite`")
    paths = fc.paths()
    missing = [p for p in (paths[int(r)] for r in fit_idx[:5]) if not os.path.exists(p)]
    if missing:
        raise FeatxError(
            f"fine-tuning reads the images themselves, but {missing[0]!r} (from cache {fc.path}, root "
            f"{fc.root!r}) does not exist; run from the machine/folder where the dataset lives"
        )
    return SplitRows(labels=labels, train=train_idx, fit=fit_idx, val=val_idx, eval=eval_idx, desc=desc)


def resolve_options(settings: FinetuneSettings | None, options: RunOptions | None, values: dict) -> tuple[FinetuneSettings, RunOptions]:
    """Settings and options from the dataclasses given, overridden field by field by ``values``."""
    s_names = {f.name for f in fields(FinetuneSettings)}
    o_names = {f.name for f in fields(RunOptions)}
    unknown = sorted(set(values) - s_names - o_names)
    if unknown:
        raise TypeError(f"finetune() got unexpected keyword argument(s) {', '.join(unknown)}")
    base = asdict(settings or FinetuneSettings())
    settings = FinetuneSettings.coerce(**(base | {k: v for k, v in values.items() if k in s_names}))
    options = RunOptions(**(asdict(options or RunOptions()) | {k: v for k, v in values.items() if k in o_names}))
    settings.validate()
    options.validate()
    return settings, options


def finetune(
    cache: FeatureCache | str | os.PathLike,
    *,
    settings: FinetuneSettings | None = None,
    options: RunOptions | None = None,
    split: Split | None = None,
    **values,
) -> FinetuneResult:
    """Fine-tune the backbone of ``cache`` with ``settings`` and evaluate it on the probe's split.

    ``cache`` is a :class:`featx.cache.FeatureCache` or a path to one; its images must still be
    on disk.  ``values`` override single fields of ``settings`` (:class:`FinetuneSettings`) or
    ``options`` (:class:`RunOptions`), e.g. ``finetune(fc, strategy="head", epochs=3)``.
    ``split``: the run's :class:`featx.data.splits.Split` (``featx compare`` hands the probe's); None draws
    the same split from ``test_size``/``seed``.
    Returns a :class:`FinetuneResult` (also ``result.json`` in the run folder).  Rerunning the
    same call resumes an interrupted run, or returns the finished result.
    """
    t_start = time.perf_counter()
    fc = cache if isinstance(cache, FeatureCache) else FeatureCache(cache)
    settings, options = resolve_options(settings, options, values)
    dev = resolve_device(options.device)
    if dev == "cpu":
        keep_heap_buffers()  # large activations would otherwise be page-faulted in every layer
    workers = default_num_workers(dev) if options.num_workers is None else int(options.num_workers)
    rows = split_rows(fc, settings, split)
    features = plan_source(fc, settings)  # the head strategy trains on features: where they come from
    key, key_obj = run_key(fc, settings, rows.labels, {"fit": rows.fit, "val": rows.val, "eval": rows.eval}, features)
    base = Path(options.out_dir) if options.out_dir is not None else Path("runs") / f"compare-{fc.path.stem}"
    run, lock = open_run_dir(base, settings.strategy, key)
    try:
        prepare_run_dir(run, key_obj, overwrite=options.overwrite)
        done = finished_result(run, key)
        if done is not None:
            log.info("finetune[%s]: finished result found in %s; reusing it (--overwrite to retrain)", settings.strategy, run.path)
            return FinetuneResult.from_dict(done | {"reused": True})
        job = _Job(fc=fc, settings=settings, options=options, rows=rows, run=run, key=key, device=dev, workers=workers,
                   features=features)
        return job.train_and_evaluate(t_start)
    finally:
        lock.release()


@dataclass
class _Job:
    """One fine-tune after its run folder is locked: build, train, evaluate, save."""

    fc: FeatureCache
    settings: FinetuneSettings
    options: RunOptions
    rows: SplitRows
    run: RunDir
    key: str
    device: str
    workers: int
    features: dict | None = None  # featx.finetune.features.plan_source; None: the trunk runs every step

    def loaders(self, bb, cuda: bool):
        """Image loaders (the trunk runs every step), or feature rows for the ``head`` strategy."""
        s = self.settings
        if self.features is None:
            return RowLoaders(self.fc.paths(), self.rows.labels, bb.preprocess, min_scale=s.min_scale,
                              batch_size=s.batch_size, num_workers=self.workers, cuda=cuda)
        # An embedding pass, not a training loop: the embedding's decode workers unless --workers was given.
        workers = default_workers() if self.options.num_workers is None else self.workers
        return feature_loaders(self.fc, self.features, bb, self.rows.fit, self.rows.labels, batch_size=s.batch_size,
                               device=self.device, num_workers=workers, store=self.run.path,
                               every=float(self.options.checkpoint_seconds))

    def build(self, started: float) -> tuple[Trainer, dict]:
        """The network on its device and the trainer around it; plus facts for the result."""
        s, dev, cuda = self.settings, self.device, self.device.startswith("cuda")
        seed_everything(s.seed)
        bb = training_backbone(self.fc, self.options.weights)
        net, trained_modules = build_classifier(bb, len(self.fc.classes), s)
        # channels_last on the CPU too: 1.2-1.5x faster training and evaluation steps there (oneDNN).
        net = net.to(dev).to(memory_format=torch.channels_last)
        net.features_in = self.features is not None
        if cuda:
            torch.backends.cudnn.benchmark = True
            torch.cuda.reset_peak_memory_stats(dev)
        plan = StepPlan.make(len(self.rows.fit), batch_size=s.batch_size, epochs=s.epochs, warmup_epochs=s.warmup_epochs)
        rule = EarlyStopping.plan(plan, epochs=s.epochs, patience=s.patience, n_val=len(self.rows.val),
                                  min_val_images=s.min_val_images)
        loaders = self.loaders(bb, cuda)
        ctx = LoopContext(net=net, settings=s, plan=plan, rule=rule, loaders=loaders, fit_idx=self.rows.fit,
                          val_idx=self.rows.val, run=self.run, key=self.key, device=dev,
                          checkpoint_seconds=float(self.options.checkpoint_seconds), progress=self.options.progress,
                          started=started)
        n_trainable, n_total = count_params(net)
        facts = {"backbone": bb.name, "trained_modules": trained_modules, "trainable_params": int(n_trainable),
                 "total_params": int(n_total), "features": source_label(self.features)}
        log.info(
            "finetune[%s]: %s on %s (features: %s), %d train / %d val / %d eval images, %d classes, %d of %d parameters "
            "trained%s; early stopping: %s",
            s.strategy, bb.name, dev, facts["features"], len(self.rows.fit), len(self.rows.val), len(self.rows.eval), len(self.fc.classes),
            n_trainable, n_total, f" (modules {', '.join(trained_modules)})" if s.strategy == "partial" else "",
            "off (fixed schedule, last weights kept)" if rule.mode == "fixed"
            else f"from epoch {rule.first_judged_epoch} on the smoothed val accuracy",
        )
        return Trainer(ctx), facts

    def train_and_evaluate(self, started: float) -> FinetuneResult:
        trainer, facts = self.build(started)
        trainer.resume()
        trainer.fit()
        load_best_weights(trainer.ctx.net, self.run.best)
        t_eval = time.perf_counter()
        loader = trainer.ctx.loaders.evaluation(self.rows.eval)
        ye, pe, oke, eval_loss = predict(trainer.ctx.net, loader, self.device, trainer.cuda)
        eval_seconds = time.perf_counter() - t_eval
        if (~oke).any():
            log.warning("finetune[%s]: %d evaluation images failed to load and are left out", self.settings.strategy, int((~oke).sum()))
        result = self.result(trainer, facts, metrics(ye[oke], pe[oke]), eval_loss=eval_loss, eval_seconds=eval_seconds,
                             n_eval=int(oke.sum()), n_failed=int((~oke).sum()))
        write_json(self.run.result, result.to_dict())
        for part in self.run.path.glob("view-*.npz"):  # a resume's partly embedded view (featx.finetune.features)
            part.unlink(missing_ok=True)
        log.info(
            "finetune[%s]: eval accuracy %.4f, balanced %.4f, macro-F1 %.4f (%d images), %s in all",
            self.settings.strategy, result.accuracy, result.balanced_accuracy, result.macro_f1, result.n_eval,
            format_duration(result.wall_seconds),
        )
        return result

    def result(self, trainer: Trainer, facts: dict, m: dict, *, eval_loss: float, eval_seconds: float, n_eval: int,
               n_failed: int) -> FinetuneResult:
        st, s, cuda = trainer.state, self.settings, trainer.cuda
        has_val = trainer.val_loader is not None
        return FinetuneResult(
            method=f"finetune-{s.strategy}", kind="finetune", strategy=s.strategy, **m, eval_loss=eval_loss,
            wall_seconds=trainer.wall_seconds(), train_seconds=st.train_seconds, eval_seconds=eval_seconds,
            images_per_s=(st.images_seen / st.train_seconds) if st.train_seconds > 0 else 0.0,
            peak_gpu_mem_bytes=int(torch.cuda.max_memory_allocated(self.device)) if cuda else None,
            device=self.device, epochs_run=len(st.history), best_epoch=st.best_epoch,
            best_val_accuracy=st.best_val_acc if has_val else None, stopped_early=bool(st.stopped_early),
            resumed_from=st.resumes[0] if st.resumes else None, resumes=st.resumes, history=st.history,
            n_train=int(len(self.rows.fit)), n_val=int(len(self.rows.val)), n_eval=n_eval, n_eval_failed=n_failed,
            settings=asdict(s), split=self.rows.desc, cache=str(self.fc.path), run_dir=str(self.run.path),
            checkpoint=str(self.run.best), key=self.key, reused=False, early_stopping=trainer.ctx.rule.to_dict(),
            **facts,
        )
