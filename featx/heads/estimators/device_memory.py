"""Device memory of the torch heads: how many C values to train at once, how many kNN queries to
search at once, and retrying smaller.

Why: the batched L-BFGS holds logits of n x (C values) x K floats, several times over (scores,
probabilities, their gradient, a line-search candidate): for one ImageNet-1k fold with 17 C values
that is tens of GB; a kNN query block holds block x training-rows similarities.
:mod:`featx.heads.tuning.memory` budgets host RAM only; here the C values (:func:`c_group_size`) and the
query blocks (:func:`block_rows`; 256 MiB off CUDA) are cut to fit the device's free memory
(``torch.cuda.mem_get_info``), and a group or block that still runs out of memory is halved.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

from ...base.cuda import free_bytes, is_oom

log = logging.getLogger(__name__)

# n x K float32 tensors alive per C value during one objective evaluation (scores, probabilities or
# hinge, their gradient factor, a temporary) and L-BFGS state per C value (history of s and y).
LOGIT_COPIES = 6
HISTORY_COPIES = 2 * 10 + 8
# Share of the free memory the search may plan to use (the rest: fragmentation, the caller's data).
USE_FRACTION = 0.5


def c_group_size(n: int, d: int, k: int, n_c: int, dev) -> int:
    """How many C values to train at once on ``dev`` (all of them off CUDA)."""
    free = free_bytes(dev)
    if free is None:
        return n_c
    per_c = 4 * (LOGIT_COPIES * n * k + HISTORY_COPIES * (d + 1) * k)
    size = max(1, min(n_c, int(free * USE_FRACTION // per_c)))
    if size < n_c:
        log.info("GPU: %d of %d C values at a time (%.1f GiB free, %.2f GiB per C value)", size, n_c,
                 free / 2**30, per_c / 2**30)
    return size


# Host bytes one kNN block of similarities may take (off CUDA, where no free-memory figure exists).
HOST_BLOCK_BYTES = 256 << 20


def block_rows(bytes_per_row: int, dev, *, most: int) -> int:
    """Rows of a block whose temporaries take ``bytes_per_row`` each: within ``USE_FRACTION`` of the
    device's free memory on CUDA, ``HOST_BLOCK_BYTES`` elsewhere; at least 1, at most ``most``."""
    free = free_bytes(dev)
    budget = HOST_BLOCK_BYTES if free is None else free * USE_FRACTION
    return max(1, min(most, int(budget // max(1, bytes_per_row))))


def run_in_groups(run: Callable[[list], tuple], values: Sequence, size: int) -> list[tuple]:
    """``run(group)`` on consecutive groups of ``values`` of at most ``size``; a group that runs out
    of device memory is halved and retried (a single value that does not fit re-raises)."""
    out: list[tuple] = []
    todo = [list(values[a : a + size]) for a in range(0, len(values), max(1, size))]
    while todo:
        group = todo.pop(0)
        try:
            out.append(run(group))
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is retried
            if not is_oom(exc) or len(group) < 2:
                raise
            h = len(group) // 2
            log.warning("GPU out of memory training %d C values at once; retrying %d at a time", len(group), h)
            todo[:0] = [group[:h], group[h:]]
    return out
