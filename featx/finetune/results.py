"""Typed results of ``finetune`` and ``compare``; ``to_dict()`` gives the JSON files' keys.

Why the item access: callers written against the earlier plain-dict results
(``result["accuracy"]``, ``result.get("best_epoch")``) keep working unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from ..base.records import ItemAccess  # noqa: F401 - re-exported


@dataclass
class FinetuneResult(ItemAccess):
    """One fine-tune, evaluated on the probe's evaluation rows (``result.json`` in its run folder)."""

    method: str
    kind: str
    strategy: str
    accuracy: float
    balanced_accuracy: float
    macro_f1: float
    eval_loss: float
    wall_seconds: float
    train_seconds: float
    eval_seconds: float
    images_per_s: float
    peak_gpu_mem_bytes: int | None
    device: str
    backbone: str
    epochs_run: int
    best_epoch: int | None
    best_val_accuracy: float | None
    stopped_early: bool
    resumed_from: dict | None
    resumes: list
    history: list
    n_train: int
    n_val: int
    n_eval: int
    n_eval_failed: int
    trained_modules: list
    trainable_params: int
    total_params: int
    settings: dict
    split: dict
    cache: str
    run_dir: str
    checkpoint: str
    key: str
    reused: bool = False
    early_stopping: dict = field(default_factory=dict)
    # Where the head strategy's features came from (featx.finetune.features): "cache train views (K=8)",
    # "embedded once per epoch", or "trunk every step" (the strategies that train the backbone, older results).
    features: str = "trunk every step"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FinetuneResult":
        """From a saved ``result.json`` (unknown keys ignored, missing optional ones defaulted)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class CompareResult(ItemAccess):
    """The probe heads and fine-tunes side by side (``compare.json``)."""

    created: str
    cache: dict
    split: dict
    settings: dict
    rows: list[dict]
    best: str
    table: str
    notes: dict
    probe: dict
    finetune: dict[str, FinetuneResult]
    seconds: float
    paths: dict

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["finetune"] = {k: v.to_dict() for k, v in self.finetune.items()}
        return d
