"""Memory the probe needs, memory this process may use, and a stratified row budget.

Why: a cache whose training features do not fit in RAM must end in a clear message naming the
memory needed and ``max_train_rows`` that fits, never in a MemoryError or the OOM killer.
psutil is not a dependency: Linux's /proc/meminfo and ``RLIMIT_AS`` are read directly.
"""

from __future__ import annotations

import math
import resource

import numpy as np

from ...base.errors import FeatxError

# Bytes of working memory per byte of float32 training features, on top of the features
# themselves: the C-path heads hold one standardised copy (a fold's or the refit's) at a time,
# the kNN search a normalised copy, its fold slices and the fitted rows (~3x).
WORK_FACTOR = 4.0
# Interpreter, libraries and their allocations that are not features (numpy, sklearn, h5py).
BASE_BYTES = 64 << 20


def available_bytes() -> int | None:
    """Bytes this process can still allocate: MemAvailable, capped by RLIMIT_AS headroom; None if unknown."""
    limits = []
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    limits.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        limits.append(max(0, soft - address_space_bytes()))
    return min(limits) if limits else None


def address_space_bytes() -> int:
    """This process's virtual size (what RLIMIT_AS counts)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def probe_bytes(n_train: int, n_eval: int, dim: int, n_classes: int) -> int:
    """Estimated peak bytes of a probe: float32 features + CV/solver working copies + scores."""
    feats = 4 * dim * (n_train + n_eval)
    scores = 8 * n_classes * (n_train + n_eval) * 4
    return int(BASE_BYTES + feats + WORK_FACTOR * 4 * dim * n_train + scores)


def rows_that_fit(available: int, n_eval: int, dim: int, n_classes: int) -> int:
    """The largest number of training rows whose :func:`probe_bytes` fits in ``available``."""
    per_row = 4 * dim * (1 + WORK_FACTOR) + 32 * n_classes
    fixed = BASE_BYTES + (4 * dim + 32 * n_classes) * n_eval
    return max(0, int((available - fixed) // per_row))


def check_memory(n_train: int, n_eval: int, dim: int, n_classes: int, *, cache_name: str) -> dict:
    """Refuse, before reading anything, a probe that would not fit in memory.

    Returns ``{"needed_bytes", "available_bytes"}`` for the log; raises FeatxError naming the
    memory needed and a ``--max-train-rows`` value that fits.
    """
    need = probe_bytes(n_train, n_eval, dim, n_classes)
    avail = available_bytes()
    if avail is not None and need > avail:
        fit = rows_that_fit(int(avail * 0.9), n_eval, dim, n_classes)
        hint = (
            f"pass --max-train-rows {_round_down(fit)} to featx probe (max_train_rows=) to train on a stratified, "
            "seeded subset of the training rows, or free memory" if fit >= 2 * n_classes else
            "free memory or use a machine with more (even the evaluation rows barely fit)"
        )
        raise FeatxError(
            f"probing cache {cache_name} needs about {_gib(need)} of memory ({n_train:,} training rows x {dim} "
            f"float32 features, with cross-validation copies) but only {_gib(avail)} is available: {hint}"
        )
    return {"needed_bytes": need, "available_bytes": avail}


def _gib(b: float) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"


def _round_down(n: int) -> int:
    """Two significant digits, rounded down (a round number that still fits)."""
    if n < 100:
        return n
    p = 10 ** (int(math.log10(n)) - 1)
    return (n // p) * p


def stratified_subset(rows: np.ndarray, y: np.ndarray, max_rows: int, *, seed: int) -> np.ndarray:
    """At most ``max_rows`` of ``rows``, each class kept in proportion (at least one row each), seeded."""
    if max_rows < 1:
        raise FeatxError(f"--max-train-rows must be at least 1, got {max_rows}")
    if len(rows) <= max_rows:
        return rows
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(y, return_counts=True)
    want = np.maximum(1, np.floor(counts * max_rows / len(rows))).astype(int)
    keep = [rng.choice(np.flatnonzero(y == c), size=min(k, n), replace=False) for c, k, n in zip(classes, want, counts)]
    return np.sort(rows[np.concatenate(keep)])
