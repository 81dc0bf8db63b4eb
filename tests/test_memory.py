"""The probe's memory policy (heads/tuning/memory.py): the estimate, the rows that fit, the refusal and the subset."""

from __future__ import annotations

import numpy as np
import pytest

import featx.heads.tuning.memory as memory
from featx.base.errors import FeatxError


def test_rows_that_fit_is_the_largest_n_train_whose_estimate_fits() -> None:
    avail = 2 << 30
    n = memory.rows_that_fit(avail, n_eval=1000, dim=768, n_classes=10)
    assert memory.probe_bytes(n, 1000, 768, 10) <= avail < memory.probe_bytes(n + 1, 1000, 768, 10)
    assert memory.rows_that_fit(1 << 20, n_eval=1000, dim=768, n_classes=10) == 0


def test_check_memory_refuses_naming_the_memory_and_a_max_train_rows_that_fits(monkeypatch) -> None:
    monkeypatch.setattr(memory, "available_bytes", lambda: 1 << 30)
    with pytest.raises(FeatxError) as err:
        memory.check_memory(2_000_000, 1000, 768, 10, cache_name="big.h5")
    msg = str(err.value)
    assert "probing cache big.h5 needs about" in msg and "only 1.00 GiB is available" in msg
    rows = int(msg.split("--max-train-rows ")[1].split()[0])
    assert memory.probe_bytes(rows, 1000, 768, 10) <= 1 << 30 and rows == memory._round_down(rows)
    ok = memory.check_memory(1000, 100, 768, 10, cache_name="small.h5")
    assert ok == {"needed_bytes": memory.probe_bytes(1000, 100, 768, 10), "available_bytes": 1 << 30}
    monkeypatch.setattr(memory, "available_bytes", lambda: None)  # unknown: never refused
    assert memory.check_memory(10**9, 0, 4096, 10, cache_name="x")["available_bytes"] is None


def test_available_bytes_is_known_on_linux() -> None:
    avail = memory.available_bytes()
    assert avail is None or avail > 0
    assert memory.address_space_bytes() >= 0


def test_stratified_subset_keeps_every_class_in_proportion_and_is_seeded() -> None:
    y = np.array([0] * 900 + [1] * 90 + [2] * 10)
    rows = np.arange(1000) + 5000
    sub = memory.stratified_subset(rows, y, 100, seed=0)
    counts = np.bincount(y[sub - 5000])
    assert counts.tolist() == [90, 9, 1] and (np.diff(sub) > 0).all()
    assert (memory.stratified_subset(rows, y, 100, seed=0) == sub).all()
    assert not (memory.stratified_subset(rows, y, 100, seed=1) == sub).all()
    assert memory.stratified_subset(rows, y, 5000, seed=0) is rows  # under the budget: unchanged
    with pytest.raises(FeatxError, match="--max-train-rows must be at least 1"):
        memory.stratified_subset(rows, y, 0, seed=0)
