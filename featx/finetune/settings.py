"""The fine-tune's two kinds of options: what changes the trained model, and how the run is done.

Why two dataclasses: :class:`FinetuneSettings` is hashed into the run's key (change one and a
new run folder is used), while :class:`RunOptions` (device, workers, output folder, ...) may
differ between the first run and its resume without making the checkpoint stale.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..base.errors import FeatxError
from ..config import defaults
from ..embedding.backbones import TRAIN_MIN_SCALE

STRATEGIES = ("full", "partial", "head")


# The one typed source of these defaults (shared with `featx compare`'s options).
_D = defaults("compare")


@dataclass(frozen=True)
class FinetuneSettings:
    """Every hyper-parameter that changes the trained model (part of the run's key)."""

    strategy: str = "full"
    epochs: int = _D.epochs
    batch_size: int = _D.batch_size
    lr: float = _D.lr
    backbone_lr_scale: float = _D.backbone_lr_scale
    weight_decay: float = _D.weight_decay
    warmup_epochs: float = _D.warmup_epochs
    label_smoothing: float = _D.label_smoothing
    partial_blocks: int = _D.partial_blocks
    val_fraction: float = _D.val_fraction
    patience: int = _D.patience
    min_scale: float = TRAIN_MIN_SCALE
    test_size: float = _D.test_size
    seed: int = _D.seed
    # A validation slice smaller than this is too noisy to stop on: the fixed schedule runs to
    # the end and its last weights are kept (see featx.finetune.schedule).
    min_val_images: int = _D.min_val_images

    @classmethod
    def coerce(cls, **values) -> "FinetuneSettings":
        """Build from loosely typed values (CLI strings, YAML numbers), cast to each field's type."""
        types = {"int": int, "float": float, "str": str}
        out = {}
        for name, value in values.items():
            field = cls.__dataclass_fields__.get(name)
            if field is None:
                raise FeatxError(f"unknown fine-tune setting {name!r}; expected one of {', '.join(cls.__dataclass_fields__)}")
            out[name] = types[str(field.type)](value)
        return cls(**out)

    def validate(self) -> None:
        """Raise :class:`FeatxError` naming the option and its allowed range."""
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
            (0 < self.min_scale <= 1, f"min_scale (the smallest crop of the training augmentation) must be in (0, 1], got {self.min_scale}"),
            (self.min_val_images >= 1, f"--min-val-images must be >= 1, got {self.min_val_images}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise FeatxError(msg)


@dataclass(frozen=True)
class RunOptions:
    """How a fine-tune runs (not part of its key: a resume may use other values)."""

    weights: str | os.PathLike | None = None
    device: str = _D.device
    num_workers: int | None = None
    out_dir: str | os.PathLike | None = None
    checkpoint_seconds: float = _D.checkpoint_seconds
    overwrite: bool = False
    progress: bool = True

    def validate(self) -> None:
        """Raise :class:`FeatxError` for a negative checkpoint interval or worker count."""
        if self.checkpoint_seconds is None or self.checkpoint_seconds < 0:
            raise FeatxError(f"checkpoint_seconds must be >= 0, got {self.checkpoint_seconds}")
        if self.num_workers is not None and int(self.num_workers) < 0:
            raise FeatxError(f"--workers must be >= 0, got {self.num_workers}")
