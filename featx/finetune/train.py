"""End-to-end fine-tuning of the cache's backbone, on exactly the images the probe uses.

Why it exists: the linear probe answers "how good are the frozen features"; fine-tuning
answers "what does training the network itself buy, and at what cost".  To make the two
comparable, :func:`finetune` rebuilds the cache's own backbone (same weights, checked against
the cache fingerprint), puts a fresh linear classifier on it, and trains on the very rows
:func:`featx.data.train_eval_split` gives the probe; the early-stopping validation slice is
carved from those training rows only, so the evaluation split is never seen before the end.

Strategies
    ``full``     every layer is trained.
    ``partial``  the last ``partial_blocks`` blocks (plus the layers after them, e.g. the
                 final 1x1 conv and its norm) are trained, the rest is frozen.  "Blocks" are
                 found generically (see :func:`find_blocks`): the children of the model's
                 ``blocks`` / ``stages`` / ``layers`` / ``features`` (timm, torchvision
                 EfficientNet/MobileNet/ConvNeXt) or ``encoder.layers`` (ViT) container, or
                 torchvision ResNet's ``layer1..layerN``; failing those, the top-level child
                 modules that have parameters.
    ``head``     the backbone is frozen; only the linear layer is trained (the in-network
                 linear probe, with augmentation).
Frozen parts are kept in eval mode, so their BatchNorm statistics do not drift either.

Defaults (documented in ``configs/default.yaml`` too): AdamW (weight decay 0.05, none on
biases and norm weights), peak learning rate 3e-3 for the new linear layer and 0.1x that for
the backbone, linear warm-up over the first epoch (at most a fifth of all steps) then cosine
decay to zero, label smoothing 0.1, training augmentation = random resized crop (scale
0.25-1, the backbone's crop size and interpolation) + horizontal flip + the backbone's own
normalisation; evaluation uses the backbone's eval transform (``Preprocess.pil_transform``).
Early stopping watches accuracy on a stratified 10% validation slice of the training rows
(patience 3 epochs); the best epoch's weights are kept and evaluated.

On CUDA: bf16 autocast, channels_last, pinned memory, non-blocking copies and DataLoader
workers.  On the CPU it runs in float32 (slowly) so tests can train one short epoch.

Crash safety: the run folder ``<out_dir>/finetune-<strategy>-<key>/`` is keyed by a digest of
every setting that changes the result (cache fingerprint, rows, strategy, hyper-parameters),
so the same command finds its own checkpoint and a different command never picks up a stale
one.  ``last.pt`` (model, optimiser, scheduler, epoch, step within the epoch, RNG states,
history) is written atomically at the end of every epoch, every ``checkpoint_seconds`` within
an epoch, and on Ctrl-C; rerunning the same command resumes from it with the same data order
(and, with ``num_workers=0``, the same augmentation draws, so it ends where an uninterrupted
run would; with workers, the workers' augmentation seeds differ after a resume).
``best.pt`` holds the best weights; ``result.json`` the finished result (a rerun reuses it
unless ``overwrite``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..base.errors import FeatxError
from ..base.io import atomic_commit, write_json
from ..base.runtime import default_num_workers, keep_heap_buffers, resolve_device, worker_init
from ..cache.store import FeatureCache
from ..data.images import load_or_blank
from ..data.splits import carve_validation, train_eval_split
from ..embedding.backbones import create_backbone

log = logging.getLogger(__name__)

STRATEGIES = ("full", "partial", "head")
CHECKPOINT_VERSION = 1
_BLOCK_CONTAINERS = ("blocks", "stages", "layers", "features", "encoder.layers", "encoder.layer", "trunk.blocks")


@dataclass(frozen=True)
class FinetuneSettings:
    """Every hyper-parameter that changes the trained model (part of the run's key)."""

    strategy: str = "full"
    epochs: int = 10
    batch_size: int = 32
    lr: float = 3e-3
    backbone_lr_scale: float = 0.1
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    partial_blocks: int = 2
    val_fraction: float = 0.1
    patience: int = 3
    min_scale: float = 0.25
    test_size: float = 0.2
    seed: int = 0

    def validate(self) -> None:
        if self.strategy not in STRATEGIES:
            raise FeatxError(f"--strategy {self.strategy!r}: expected one of {', '.join(STRATEGIES)}")
        checks = [
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.lr > 0, f"--lr must be > 0, got {self.lr}"),
            (self.backbone_lr_scale >= 0, f"--backbone-lr-scale must be >= 0, got {self.backbone_lr_scale}"),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}"),
            (self.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, got {self.warmup_epochs}"),
            (0 <= self.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {self.label_smoothing}"),
            (self.partial_blocks >= 1, f"--partial-blocks must be >= 1, got {self.partial_blocks}"),
            (0 <= self.val_fraction < 1, f"--val-fraction must be in [0, 1), got {self.val_fraction}"),
            (self.patience >= 1, f"--patience must be >= 1, got {self.patience}"),
            (0 < self.min_scale <= 1, f"--min-scale must be in (0, 1], got {self.min_scale}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise FeatxError(msg)


# --------------------------------------------------------------------------- model surgery


def _get_path(model, path: str):
    m = model
    for part in path.split("."):
        m = getattr(m, part, None)
        if m is None:
            return None
    return m


def _has_params(m) -> bool:
    return any(True for _ in m.parameters())


def find_blocks(model) -> tuple[list[tuple[str, object]], list[tuple[str, object]]]:
    """``(blocks, tail)``: the backbone's main sequence of blocks and the layers after it.

    ``partial`` trains the last N blocks plus the tail (e.g. EfficientNet's ``conv_head`` and
    ``bn2``), since a block is useless to train when the layers on top of it stay frozen.
    """
    from torch import nn

    top = [(n, m) for n, m in model.named_children()]

    def after(path: str) -> list[tuple[str, object]]:
        """Parameterised modules that come after ``path``: its later siblings at every level up."""
        parts = path.split(".")
        out: list[tuple[str, object]] = []
        for depth in range(len(parts), 0, -1):
            parent = _get_path(model, ".".join(parts[: depth - 1])) if depth > 1 else model
            prefix = ".".join(parts[: depth - 1])
            names = [n for n, _ in parent.named_children()]
            i = names.index(parts[depth - 1])
            out += [(f"{prefix}.{n}" if prefix else n, m) for n, m in list(parent.named_children())[i + 1 :] if _has_params(m)]
        return out

    for path in _BLOCK_CONTAINERS:
        seq = _get_path(model, path)
        if isinstance(seq, (nn.Sequential, nn.ModuleList)):
            blocks = [(f"{path}.{n}", m) for n, m in seq.named_children() if _has_params(m)]
            if len(blocks) >= 2:
                return blocks, after(path)
    layers = [(n, m) for n, m in top if n.startswith("layer") and n[5:].isdigit() and _has_params(m)]
    if len(layers) >= 2:  # torchvision ResNet / RegNet-like
        return layers, after(layers[-1][0])
    return [(n, m) for n, m in top if _has_params(m)], []


def apply_strategy(backbone_model, strategy: str, *, partial_blocks: int = 2) -> list[str]:
    """Set ``requires_grad`` on the backbone for ``strategy``; returns the trained module names."""
    for p in backbone_model.parameters():
        p.requires_grad_(strategy == "full")
    if strategy == "full":
        return ["(all)"]
    if strategy == "head":
        return []
    blocks, tail = find_blocks(backbone_model)
    chosen = blocks[-partial_blocks:] + tail
    for _, m in chosen:
        for p in m.parameters():
            p.requires_grad_(True)
    return [n for n, _ in chosen]


def frozen_roots(model) -> list:
    """The largest sub-modules whose parameters are all frozen (kept in eval mode)."""
    out: list = []

    def visit(m) -> None:
        params = list(m.parameters())
        if params and not any(p.requires_grad for p in params):
            out.append(m)
            return
        for c in m.children():
            visit(c)

    visit(model)
    return out


def _build_net(backbone, n_classes: int):
    from torch import nn

    class Classifier(nn.Module):
        """The cache's backbone with a new linear classifier on its pooled features."""

        def __init__(self) -> None:
            super().__init__()
            self.backbone = backbone.model
            self.head = nn.Linear(backbone.dim, n_classes)

        def forward(self, x):
            return self.head(self.backbone(x))

    return Classifier()


# --------------------------------------------------------------------------- data


class _Images:
    """Map-style dataset over (path, label) rows; a file that fails to load yields ok=False."""

    def __init__(self, paths: Sequence[str], labels: np.ndarray, rows: np.ndarray, transform, crop: int, draft: int):
        self.paths = paths
        self.labels = labels
        self.rows = np.asarray(rows, dtype=np.int64)
        self.transform = transform
        self.crop = crop
        self.draft = draft

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):

        r = int(self.rows[i])
        x, err = load_or_blank(self.paths[r], self.transform, crop=self.crop, draft_size=self.draft)
        if err:
            log.warning("skipping %s: %s", self.paths[r], err)
        return x, int(self.labels[r]), not err


def train_transform(pre, *, min_scale: float = 0.25):
    """Training augmentation built from the backbone's own preprocessing (size, interpolation, mean/std)."""
    import torch
    from torchvision.transforms import v2 as T

    interp = T.InterpolationMode.BICUBIC if pre.interpolation == "bicubic" else T.InterpolationMode.BILINEAR
    return T.Compose(
        [
            T.PILToTensor(),
            T.RandomResizedCrop(pre.crop, scale=(min_scale, 1.0), interpolation=interp, antialias=True),
            T.RandomHorizontalFlip(),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(pre.mean, pre.std),
        ]
    )


def _loader(ds, *, batch_size: int, num_workers: int, cuda: bool):
    from torch.utils.data import DataLoader

    kw: dict = {}
    if num_workers > 0:

        kw.update(prefetch_factor=4, worker_init_fn=worker_init, persistent_workers=False)
    return DataLoader(
        ds, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=cuda,
        **kw,
    )






# --------------------------------------------------------------------------- checkpoints






def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _rng_state(cuda: bool) -> dict:
    import torch

    name, keys, pos, has_gauss, gauss = np.random.get_state()
    st = {
        "torch": torch.get_rng_state(),
        "numpy": [name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(gauss)],
        "python": random.getstate(),
    }
    if cuda:
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict, cuda: bool) -> None:
    import torch

    torch.set_rng_state(st["torch"])
    name, keys, pos, has_gauss, gauss = st["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if cuda and "cuda" in st:
        try:
            torch.cuda.set_rng_state_all(st["cuda"])
        except RuntimeError:  # a different number of GPUs than when saved
            pass


def _seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- helpers


def _training_backbone(fc, weights):
    """Rebuild the cache's backbone and check it is the one that produced the cache."""

    name = fc.meta.get("backbone")
    if not name:
        raise FeatxError(f"cache {fc.path} does not record its backbone; rebuild it with `featx embed ... --overwrite`")
    if weights is None:
        src = str(fc.meta.get("weights_source", ""))
        if src == "random":
            weights = "random"
        elif src and os.path.isfile(src):
            weights = src
    bb = create_backbone(name, weights=weights)
    want = fc.fingerprint_dict
    got = bb.fingerprint()
    diff = [k for k in got if want.get(k) != got[k]]
    if diff:
        raise FeatxError(
            f"the backbone rebuilt for fine-tuning differs from the one that wrote cache {fc.path} "
            f"(different {', '.join(diff)}); pass --weights with the file the cache was embedded with "
            f"(cache records weights source {fc.meta.get('weights_source')!r})"
        )
    return bb


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=_json_default).encode()).hexdigest()


def _rows_digest(keys: list[str], labels: np.ndarray, rows: np.ndarray) -> str:
    h = hashlib.sha256()
    for r in rows:
        h.update(keys[int(r)].encode("utf-8", "surrogateescape"))
        h.update(b"\0")
        h.update(str(int(labels[int(r)])).encode())
        h.update(b"\n")
    return h.hexdigest()


def _fmt_seconds(s: float) -> str:
    s = max(0.0, float(s))
    if s < 60:
        return f"{s:.0f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        span = max(1, total - warmup)
        t = min(1.0, (step - warmup) / span)
        return 0.5 * (1.0 + math.cos(math.pi * t))

    return f


def metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    """Accuracy, balanced accuracy and macro-F1: the same three numbers the probe reports."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    if len(y_true) == 0:
        return {"accuracy": float("nan"), "balanced_accuracy": float("nan"), "macro_f1": float("nan")}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "accuracy": float(accuracy_score(y_true, y_pred)),
            "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
            "macro_f1": float(f1_score(y_true, y_pred, average="macro")),
        }


def _predict(net, loader, device: str, cuda: bool, n_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(labels, predictions, ok mask, mean loss) over a loader, in eval mode."""
    import torch
    import torch.nn.functional as F

    net.eval()
    ys, ps, oks = [], [], []
    loss_sum, n = 0.0, 0
    with torch.inference_mode():
        for x, y, ok in loader:
            x = x.to(device, non_blocking=True)
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                logits = net(x)
            logits = logits.float().cpu()
            okm = ok.bool()
            if okm.any():
                loss_sum += float(F.cross_entropy(logits[okm], y[okm], reduction="sum"))
                n += int(okm.sum())
            ys.append(y.numpy())
            ps.append(logits.argmax(1).numpy())
            oks.append(okm.numpy())
    if not ys:
        return np.array([], np.int64), np.array([], np.int64), np.array([], bool), float("nan")
    return np.concatenate(ys), np.concatenate(ps), np.concatenate(oks), (loss_sum / n if n else float("nan"))


# --------------------------------------------------------------------------- main entry


def finetune(
    cache,
    *,
    strategy: str = "full",
    epochs: int = 10,
    batch_size: int = 32,
    lr: float = 3e-3,
    backbone_lr_scale: float = 0.1,
    weight_decay: float = 0.05,
    warmup_epochs: float = 1.0,
    label_smoothing: float = 0.1,
    partial_blocks: int = 2,
    val_fraction: float = 0.1,
    patience: int = 3,
    min_scale: float = 0.25,
    test_size: float = 0.2,
    seed: int = 0,
    weights: str | os.PathLike | None = None,
    device: str = "auto",
    num_workers: int | None = None,
    out_dir: str | os.PathLike | None = None,
    checkpoint_seconds: float = 600.0,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Fine-tune the backbone of ``cache`` with ``strategy`` and evaluate it on the probe's split.

    ``cache`` is a :class:`featx.cache.FeatureCache` or a path to one; its images must still be
    on disk.  Returns a plain dict (also saved as ``result.json`` in the run folder) with
    ``accuracy``, ``balanced_accuracy``, ``macro_f1``, ``wall_seconds``, ``images_per_s``,
    ``peak_gpu_mem_bytes`` (CUDA only), the per-epoch ``history`` and the settings.
    Rerunning the same call resumes an interrupted run, or returns the finished result.
    """
    import torch


    t_start = time.perf_counter()
    fc = cache if isinstance(cache, FeatureCache) else FeatureCache(cache)
    settings = FinetuneSettings(
        strategy=strategy, epochs=int(epochs), batch_size=int(batch_size), lr=float(lr),
        backbone_lr_scale=float(backbone_lr_scale), weight_decay=float(weight_decay),
        warmup_epochs=float(warmup_epochs), label_smoothing=float(label_smoothing),
        partial_blocks=int(partial_blocks), val_fraction=float(val_fraction), patience=int(patience),
        min_scale=float(min_scale), test_size=float(test_size), seed=int(seed),
    )
    settings.validate()
    if checkpoint_seconds is None or checkpoint_seconds < 0:
        raise FeatxError(f"checkpoint_seconds must be >= 0, got {checkpoint_seconds}")
    dev = resolve_device(device)
    cuda = dev.startswith("cuda")
    if dev == "cpu":

        keep_heap_buffers()  # large activations would otherwise be page-faulted in every layer
    workers = default_num_workers(dev) if num_workers is None else int(num_workers)
    if workers < 0:
        raise FeatxError(f"--workers must be >= 0, got {num_workers}")

    # -- the probe's rows, exactly
    labels = fc.labels()
    train_idx, eval_idx, split_desc = train_eval_split(labels, fc.split_array(), test_size=settings.test_size, seed=settings.seed)
    fit_idx, val_idx = carve_validation(train_idx, labels, fraction=settings.val_fraction, seed=settings.seed)
    if len(fit_idx) == 0:
        raise FeatxError(f"cache {fc.path} has no training rows to fine-tune on; add images under train/<class>/")
    n_classes = len(fc.classes)
    keys = fc.keys()
    paths = fc.paths()
    missing = [p for p in (paths[int(r)] for r in fit_idx[:5]) if not os.path.exists(p)]
    if missing:
        raise FeatxError(
            f"fine-tuning reads the images themselves, but {missing[0]!r} (from cache {fc.path}, root "
            f"{fc.root!r}) does not exist; run from the machine/folder where the dataset lives"
        )

    key_obj = {
        "settings": asdict(settings),
        "cache_fingerprint": fc.fingerprint,
        "classes": fc.classes,
        "fit": _rows_digest(keys, labels, fit_idx),
        "val": _rows_digest(keys, labels, val_idx),
        "eval": _rows_digest(keys, labels, eval_idx),
        "version": CHECKPOINT_VERSION,
    }
    key = _digest(key_obj)
    base = Path(out_dir) if out_dir is not None else Path("runs") / f"compare-{fc.path.stem}"
    run_dir = base / f"finetune-{settings.strategy}-{key[:10]}"
    run_dir.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock, Timeout

    lock = FileLock(str(run_dir / "run.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise FeatxError(
            f"another process is fine-tuning with the same settings in {run_dir}; wait for it to finish "
            "(rerunning this command afterwards reuses or resumes its result), or pass another --out-dir"
        ) from None
    try:
        for stale in run_dir.glob(".*.tmp"):  # left by a kill during a checkpoint write
            stale.unlink(missing_ok=True)
        if overwrite:
            log.info("--overwrite: discarding the checkpoints and result in %s", run_dir)
            for f in run_dir.iterdir():
                if f.name != "run.lock":
                    shutil.rmtree(f) if f.is_dir() else f.unlink(missing_ok=True)
        last_p, best_p, result_p = run_dir / "last.pt", run_dir / "best.pt", run_dir / "result.json"
        write_json(run_dir / "settings.json", key_obj)

        if result_p.exists():
            try:
                done = json.loads(result_p.read_text())
            except (OSError, ValueError):
                done = None
            if done and done.get("key") == key:
                log.info("finetune[%s]: finished result found in %s; reusing it (--overwrite to retrain)", settings.strategy, run_dir)
                done["reused"] = True
                return done

        # -- model
        _seed_everything(settings.seed)
        bb = _training_backbone(fc, weights)
        trained_modules = apply_strategy(bb.model, settings.strategy, partial_blocks=settings.partial_blocks)
        if settings.backbone_lr_scale == 0:  # a zero backbone LR means: do not train (nor drift) the backbone
            for p in bb.model.parameters():
                p.requires_grad_(False)
        net = _build_net(bb, n_classes)
        frozen = frozen_roots(net)  # kept in eval mode while training
        net.to(dev)
        if cuda:
            net = net.to(memory_format=torch.channels_last)
            torch.backends.cudnn.benchmark = True
            torch.cuda.reset_peak_memory_stats(dev)
        head_params = list(net.head.parameters())
        bb_params = [p for p in net.backbone.parameters() if p.requires_grad]
        n_trainable = sum(p.numel() for p in head_params + bb_params)
        n_total = sum(p.numel() for p in net.parameters())

        def groups(params, lr_):
            decay = [p for p in params if p.ndim > 1]
            no_decay = [p for p in params if p.ndim <= 1]
            out = []
            if decay:
                out.append({"params": decay, "lr": lr_, "weight_decay": settings.weight_decay})
            if no_decay:
                out.append({"params": no_decay, "lr": lr_, "weight_decay": 0.0})
            return out

        param_groups = groups(head_params, settings.lr)
        if bb_params:
            param_groups += groups(bb_params, settings.lr * settings.backbone_lr_scale)
        opt = torch.optim.AdamW(param_groups, lr=settings.lr, fused=cuda or None)
        # Every image every epoch, except a last batch of one (BatchNorm cannot train on a single image).
        n_epoch = len(fit_idx) - (1 if len(fit_idx) % settings.batch_size == 1 and len(fit_idx) > 1 else 0)
        steps_per_epoch = max(1, math.ceil(n_epoch / settings.batch_size))
        total_steps = steps_per_epoch * settings.epochs
        warmup = min(int(round(settings.warmup_epochs * steps_per_epoch)), total_steps // 5)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(warmup, total_steps))
        criterion = torch.nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing)

        pre = bb.preprocess
        eval_tf = pre.pil_transform()
        train_tf = train_transform(pre, min_scale=settings.min_scale)

        # -- state (fresh or resumed)
        state = {
            "epoch": 0, "step": 0, "history": [], "best_epoch": None, "best_val_acc": -1.0, "best_val_loss": float("inf"),
            "bad_epochs": 0, "stopped_early": False, "elapsed": 0.0, "train_seconds": 0.0, "images_seen": 0,
            "loss_sum": 0.0, "loss_n": 0, "epoch_train_seconds": 0.0, "resumes": [],
        }
        resumed_from = None
        pending_rng = None
        if last_p.exists():
            try:
                # On the CPU: RNG states must stay CPU tensors; load_state_dict moves the rest to the device.
                ck = torch.load(last_p, map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001 - a damaged checkpoint (only possible from outside)
                log.warning("checkpoint %s is unreadable (%s); starting over", last_p, exc)
                os.replace(last_p, last_p.with_suffix(".damaged"))
                ck = None
            if ck is not None and ck.get("key") == key:
                net.load_state_dict(ck["model"])
                opt.load_state_dict(ck["optimizer"])
                sched.load_state_dict(ck["scheduler"])
                state.update(ck["state"])
                # Restored where the original run saved it: at an epoch end before the next
                # epoch's loader starts, mid-epoch after it started (it draws one seed when it does).
                pending_rng = ck["rng"]
                if int(state["step"]) == 0:
                    _set_rng_state(pending_rng, cuda)
                    pending_rng = None
                resumed_from = {"epoch": int(state["epoch"]), "step": int(state["step"])}
                state["resumes"] = list(state.get("resumes", [])) + [resumed_from]
                log.info(
                    "finetune[%s]: resuming from %s (epoch %d, step %d of %d)",
                    settings.strategy, last_p, state["epoch"] + 1, state["step"], steps_per_epoch,
                )
            elif ck is not None:
                log.warning("checkpoint %s belongs to other settings; starting over", last_p)

        run_t0 = t_start  # setup (model build, split) counts towards the wall time too
        base_elapsed = float(state["elapsed"])

        # The running loss stays on the device: reading it every step would sync CUDA each step.
        loss_acc = torch.zeros((), device=dev)

        def flush_loss() -> None:
            state["loss_sum"] += float(loss_acc)
            loss_acc.zero_()

        def save_last() -> None:
            flush_loss()
            state["elapsed"] = base_elapsed + (time.perf_counter() - run_t0)
            _atomic_torch_save(
                {
                    "version": CHECKPOINT_VERSION, "key": key, "model": net.state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "state": dict(state), "rng": _rng_state(cuda),
                },
                last_p,
            )

        def set_train_mode() -> None:
            net.train()
            for m in frozen:
                m.eval()

        val_loader = None
        if len(val_idx):
            val_loader = _loader(
                _Images(paths, labels, val_idx, eval_tf, pre.crop, pre.resize),
                batch_size=settings.batch_size * 2, num_workers=workers, cuda=cuda,
            )
        delay = float(os.environ.get("FEATX_TEST_STEP_DELAY", "0") or 0)  # fault-injection tests only
        log.info(
            "finetune[%s]: %s on %s, %d train / %d val / %d eval images, %d classes, %d of %d parameters trained%s",
            settings.strategy, bb.name, dev, len(fit_idx), len(val_idx), len(eval_idx), n_classes, n_trainable, n_total,
            f" (modules {', '.join(trained_modules)})" if settings.strategy == "partial" else "",
        )

        from tqdm.auto import tqdm

        try:
            while state["epoch"] < settings.epochs and not state["stopped_early"]:
                epoch = int(state["epoch"])
                g = torch.Generator().manual_seed(settings.seed * 1_000_003 + epoch)
                order = fit_idx[torch.randperm(len(fit_idx), generator=g).numpy()]
                order = order[:n_epoch]
                start_step = int(state["step"])
                todo = order[start_step * settings.batch_size :]
                loader = _loader(
                    _Images(paths, labels, todo, train_tf, pre.crop, pre.resize),
                    batch_size=settings.batch_size, num_workers=workers, cuda=cuda,
                )
                set_train_mode()
                t_ep = time.perf_counter()
                t_ck = t_ep
                bar = tqdm(
                    total=steps_per_epoch, initial=start_step, unit="step", disable=not progress, leave=False,
                    dynamic_ncols=True, desc=f"finetune[{settings.strategy}] epoch {epoch + 1}/{settings.epochs}",
                )
                try:
                    batches = iter(loader)
                    if pending_rng is not None:
                        _set_rng_state(pending_rng, cuda)
                        pending_rng = None
                    for x, y, ok in batches:
                        okm = ok.bool()
                        if not okm.all():
                            x, y = x[okm], y[okm]
                        if len(y) == 0:  # the whole batch failed to load: count the step, train nothing
                            state["step"] += 1
                            bar.update(1)
                            continue
                        x = x.to(dev, non_blocking=True)
                        y = y.to(dev, non_blocking=True)
                        if cuda:
                            x = x.contiguous(memory_format=torch.channels_last)
                        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                            logits = net(x)
                        loss = criterion(logits.float(), y)
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                        sched.step()
                        state["step"] += 1
                        state["images_seen"] += int(len(y))
                        loss_acc += loss.detach() * len(y)
                        state["loss_n"] += int(len(y))
                        bar.update(1)
                        if delay:
                            time.sleep(delay)
                        now = time.perf_counter()
                        if checkpoint_seconds and now - t_ck >= checkpoint_seconds and state["step"] < steps_per_epoch:
                            state["epoch_train_seconds"] += now - t_ep
                            state["train_seconds"] += now - t_ep
                            t_ep = now
                            save_last()
                            t_ck = time.perf_counter()
                            t_ep = t_ck
                finally:
                    bar.close()
                if cuda:
                    torch.cuda.synchronize(dev)  # honest epoch times and images/s
                now = time.perf_counter()
                state["epoch_train_seconds"] += now - t_ep
                state["train_seconds"] += now - t_ep
                # -- end of epoch: validate, keep the best, maybe stop
                flush_loss()
                train_loss = state["loss_sum"] / state["loss_n"] if state["loss_n"] else float("nan")
                val_acc, val_loss = float("nan"), float("nan")
                if val_loader is not None:
                    yv, pv, okv, val_loss = _predict(net, val_loader, dev, cuda, n_classes)
                    val_acc = float((yv[okv] == pv[okv]).mean()) if okv.any() else float("nan")
                improved = val_loader is None or (
                    val_acc > state["best_val_acc"]
                    or (val_acc == state["best_val_acc"] and val_loss < state["best_val_loss"])
                )
                if improved:
                    state["best_epoch"] = epoch + 1
                    state["best_val_acc"] = val_acc if val_loader is not None else -1.0
                    state["best_val_loss"] = val_loss if val_loader is not None else float("inf")
                    state["bad_epochs"] = 0
                    _atomic_torch_save({"key": key, "epoch": epoch + 1, "model": net.state_dict()}, best_p)
                else:
                    state["bad_epochs"] += 1
                ep_seconds = state["epoch_train_seconds"]
                ips = (state["loss_n"] / ep_seconds) if ep_seconds > 0 else 0.0
                state["history"].append(
                    {"epoch": epoch + 1, "train_loss": train_loss, "val_accuracy": val_acc, "val_loss": val_loss,
                     "images_per_s": ips, "seconds": ep_seconds, "lr": float(opt.param_groups[0]["lr"])}
                )
                done_epochs = len(state["history"])
                mean_ep = sum(h["seconds"] for h in state["history"]) / done_epochs
                eta = mean_ep * (settings.epochs - epoch - 1)
                log.info(
                    "finetune[%s] epoch %d/%d  train loss %.4f  val acc %s  %.1f images/s  ETA %s%s",
                    settings.strategy, epoch + 1, settings.epochs, train_loss,
                    f"{val_acc:.4f}" if not math.isnan(val_acc) else "n/a", ips, _fmt_seconds(eta),
                    "  *best*" if improved and val_loader is not None else "",
                )
                state.update(epoch=epoch + 1, step=0, loss_sum=0.0, loss_n=0, epoch_train_seconds=0.0)
                if val_loader is not None and state["bad_epochs"] >= settings.patience and state["epoch"] < settings.epochs:
                    state["stopped_early"] = True
                    log.info(
                        "finetune[%s]: early stop, no val improvement for %d epochs (best epoch %d)",
                        settings.strategy, settings.patience, state["best_epoch"],
                    )
                save_last()
        except KeyboardInterrupt:
            # Keep everything up to the last finished step; the same command resumes from here.
            try:
                save_last()
                log.warning("finetune[%s]: interrupted; checkpoint saved to %s", settings.strategy, last_p)
            except Exception:  # noqa: BLE001 - never mask the interrupt
                pass
            raise

        # -- evaluate the best weights on the probe's evaluation rows
        if best_p.exists():
            best = torch.load(best_p, map_location="cpu", weights_only=True)
            net.load_state_dict(best["model"])
        t_eval = time.perf_counter()
        eval_loader = _loader(
            _Images(paths, labels, eval_idx, eval_tf, pre.crop, pre.resize),
            batch_size=settings.batch_size * 2, num_workers=workers, cuda=cuda,
        )
        ye, pe, oke, eval_loss = _predict(net, eval_loader, dev, cuda, n_classes)
        eval_seconds = time.perf_counter() - t_eval
        if (~oke).any():
            log.warning("finetune[%s]: %d evaluation images failed to load and are left out", settings.strategy, int((~oke).sum()))
        m = metrics(ye[oke], pe[oke])
        peak = int(torch.cuda.max_memory_allocated(dev)) if cuda else None
        wall = base_elapsed + (time.perf_counter() - run_t0)  # this run from its start, plus earlier runs
        result = {
            "method": f"finetune-{settings.strategy}",
            "kind": "finetune",
            "strategy": settings.strategy,
            **m,
            "eval_loss": eval_loss,
            "wall_seconds": wall,
            "train_seconds": state["train_seconds"],
            "eval_seconds": eval_seconds,
            "images_per_s": (state["images_seen"] / state["train_seconds"]) if state["train_seconds"] > 0 else 0.0,
            "peak_gpu_mem_bytes": peak,
            "device": dev,
            "backbone": bb.name,
            "epochs_run": len(state["history"]),
            "best_epoch": state["best_epoch"],
            "best_val_accuracy": state["best_val_acc"] if val_loader is not None else None,
            "stopped_early": bool(state["stopped_early"]),
            "resumed_from": state["resumes"][0] if state["resumes"] else None,
            "resumes": state["resumes"],
            "history": state["history"],
            "n_train": int(len(fit_idx)),
            "n_val": int(len(val_idx)),
            "n_eval": int(oke.sum()),
            "n_eval_failed": int((~oke).sum()),
            "trained_modules": trained_modules,
            "trainable_params": int(n_trainable),
            "total_params": int(n_total),
            "settings": asdict(settings),
            "split": split_desc,
            "cache": str(fc.path),
            "run_dir": str(run_dir),
            "checkpoint": str(best_p),
            "key": key,
            "reused": False,
        }
        write_json(result_p, result)
        log.info(
            "finetune[%s]: eval accuracy %.4f, balanced %.4f, macro-F1 %.4f (%d images), %s in all",
            settings.strategy, m["accuracy"], m["balanced_accuracy"], m["macro_f1"], int(oke.sum()), _fmt_seconds(wall),
        )
        return result
    finally:
        lock.release()


def _atomic_torch_save(obj, path: Path) -> None:
    import torch

    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        torch.save(obj, tmp)
        atomic_commit(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise FeatxError(
            f"could not write checkpoint {path} ({exc.strerror or exc}); free disk space or pass another "
            "--out-dir, then rerun the same command to resume from the previous checkpoint"
        ) from exc
