"""Stage 5, fine-tune: train the network end to end on the probe's splits, and compare the two."""

from ..base.lazy import lazy_exports

_EXPORTS = {
    "compare": "comparison",
    "STRATEGIES": "train",
    "finetune": "train",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
