"""Which solver a probe's linear heads use: in memory (the C path) or streamed over the cache's rows.

Why its own module: the choice needs only the memory estimate, and the probe makes it before any
head is built.
"""

from __future__ import annotations

import logging

from ...base.choices import SOLVERS
from ...base.errors import FeatxError
from .memory import available_bytes, probe_bytes

log = logging.getLogger(__name__)

# rows x features x classes above which the in-memory C search is slow on a few CPU cores: every
# L-BFGS step multiplies all three (100,000 x 1,280 x 1,000 walked C = 0.01 .. 0.03 in 10 min on 2 cores).
SLOW_IN_MEMORY = 2e10


def use_stream(solver: str, *, n_train: int, n_eval: int, dim: int, n_classes: int, linear: bool = True) -> bool:
    """Whether the probe streams its training rows: asked (``stream``), or ``auto`` and they do not fit.

    The test is :func:`featx.heads.tuning.memory.probe_bytes` (the in-memory search's estimate) against
    the memory this process may still use.  ``linear``: the probe trains logreg or the SVM, whose
    in-memory C search a large problem makes slow (a warning then names ``--solver stream``).
    """
    if solver not in SOLVERS:
        raise FeatxError(f"--solver {solver!r}: expected one of {', '.join(SOLVERS)}")
    if solver != "auto":
        return solver == "stream"
    avail = available_bytes()
    stream = avail is not None and probe_bytes(n_train, n_eval, dim, n_classes) > 0.9 * avail
    if linear and not stream and float(n_train) * dim * n_classes > SLOW_IN_MEMORY:
        log.warning("the in-memory C search on %s rows x %s features x %s classes can take hours on a few CPU "
                    "cores; --solver stream trains every C value in a few passes over the rows", f"{n_train:,}",
                    f"{dim:,}", f"{n_classes:,}")
    return stream
