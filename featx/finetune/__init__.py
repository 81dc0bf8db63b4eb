"""Stage 5, fine-tune: train the network end to end on exactly the probe's splits.

Modules: settings (the options), model (backbone + new head, which layers train), inputs
(images, augmentation, loaders), schedule (LR schedule and early stopping), checkpoint and runs
(crash-safe run folders), loop (the training loop and its TrainState), evaluate, train (the
public ``finetune``).  ``compare`` (probe vs fine-tune) is a run: :mod:`featx.runs.compare`.
"""

from ..base.lazy import lazy_exports

_EXPORTS = {
    "CompareResult": "results",
    "STRATEGIES": "settings",
    "FinetuneSettings": "settings",
    "RunOptions": "settings",
    "FinetuneResult": "results",
    "TrainState": "loop",
    "finetune": "train",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
