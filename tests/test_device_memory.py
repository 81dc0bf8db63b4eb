"""GPU memory of the torch heads' batched C search, checked with a fake ``torch.cuda.mem_get_info``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from featx.heads.estimators import device_memory, torch_heads
from featx.heads.estimators.torch_heads import TorchLinearSVC, TorchLogisticRegression

CS = [0.01, 0.1, 1.0, 10.0, 100.0]


def _data(n=150, d=8, k=3):
    rng = np.random.default_rng(0)
    y = rng.integers(0, k, n)
    X = (rng.normal(0, 1, (k, d))[y] * 2 + rng.normal(0, 1.5, (n, d))).astype(np.float32)
    return X, y


def _recording_lbfgs(monkeypatch, fail_above: int | None = None) -> list:
    real = torch_heads.batched_lbfgs
    sizes = []

    def rec(fun, w0, **kw):
        sizes.append(w0.shape[0])
        if fail_above is not None and w0.shape[0] > fail_above:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 70.00 GiB")
        return real(fun, w0, **kw)

    monkeypatch.setattr(torch_heads, "batched_lbfgs", rec)
    return sizes


def test_group_size_follows_free_gpu_memory(fake_cuda):
    fake_cuda.free = 80 << 30
    assert device_memory.c_group_size(50_000, 2048, 100, 17, torch.device("cuda")) == 17
    # One ImageNet-1k fold: ~1M rows x 1000 classes -> a few C values at a time, not all 17 (~70 GB of logits).
    g = device_memory.c_group_size(1_000_000, 2048, 1000, 17, torch.device("cuda"))
    assert 1 <= g < 17
    assert device_memory.c_group_size(10**9, 2048, 1000, 17, torch.device("cuda")) == 1
    assert device_memory.c_group_size(10**9, 2048, 1000, 17, torch.device("cpu")) == 17


@pytest.mark.slow
def test_c_values_are_grouped_by_free_memory(monkeypatch):
    X, y = _data()
    want = TorchLogisticRegression(grid={"C": CS}, folds=3).fit(X, y)
    per_c = 4 * (device_memory.LOGIT_COPIES * len(X) * 3 + device_memory.HISTORY_COPIES * 9 * 3)
    monkeypatch.setattr(device_memory, "free_bytes", lambda dev: int(1.5 * per_c / device_memory.USE_FRACTION))
    sizes = _recording_lbfgs(monkeypatch)
    got = TorchLogisticRegression(grid={"C": CS}, folds=3).fit(X, y)
    assert max(sizes) == 2  # 5 C values in groups of at most 2 per fold (100 rows), 1 for the refit (150)
    assert got.best_params_ == want.best_params_
    np.testing.assert_allclose(got.cv_results_["mean_test_score"], want.cv_results_["mean_test_score"])
    np.testing.assert_allclose(got.coef_, want.coef_, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_out_of_memory_retries_with_fewer_c_values(monkeypatch, caplog):
    X, y = _data()
    want = TorchLinearSVC(grid={"C": CS}, folds=3).fit(X, y)
    sizes = _recording_lbfgs(monkeypatch, fail_above=1)
    with caplog.at_level("WARNING"):
        got = TorchLinearSVC(grid={"C": CS}, folds=3).fit(X, y)
    assert sizes[0] == 5 and 1 in sizes
    assert any("out of memory" in r.getMessage() for r in caplog.records)
    assert got.best_params_ == want.best_params_
    np.testing.assert_allclose(got.coef_, want.coef_, rtol=1e-4, atol=1e-5)


def _knn_data(n=300, d=16, k=4):
    rng = np.random.default_rng(1)
    y = rng.integers(0, k, n)
    return (rng.normal(0, 1, (k, d))[y] + rng.normal(0, 0.8, (n, d))).astype(np.float32), y


def test_knn_query_blocks_fit_the_free_memory_and_halve_on_out_of_memory(monkeypatch, caplog):
    from featx.heads.estimators.torch_heads import TorchKNN

    X, y = _knn_data()
    grid = {"n_neighbors": [1, 5, 15], "weights": ["uniform", "distance"]}
    want = TorchKNN(grid=grid, folds=3).fit(X, y)
    real_topk, blocks = torch.topk, []

    def topk(sim, k, **kw):
        blocks.append(sim.shape[0])
        if sim.shape[0] > 16:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 16.00 GiB")
        return real_topk(sim, k, **kw)

    # Free memory for 40 query rows against a 200-row CV training fold: blocks of 40, halved by
    # out-of-memory to 20 and then 10 (fewer for the 300 rows of the final head).
    monkeypatch.setattr(device_memory, "free_bytes", lambda dev: int(40 * 3 * 4 * 200 / device_memory.USE_FRACTION))
    monkeypatch.setattr(torch, "topk", topk)
    with caplog.at_level("WARNING"):
        got = TorchKNN(grid=grid, folds=3).fit(X, y)
        proba = got.predict_proba(X[:50])
    assert blocks[:3] == [40, 20, 10] and max(blocks) == 40
    assert "retrying 10 query rows at a time" in caplog.text
    assert got.best_params_ == want.best_params_
    np.testing.assert_allclose(got.cv_results_["mean_test_score"], want.cv_results_["mean_test_score"])
    np.testing.assert_allclose(proba, want.predict_proba(X[:50]))


def test_knn_blocks_off_cuda_stay_within_the_host_budget(monkeypatch):
    assert device_memory.block_rows(12 * 1_000_000, torch.device("cpu"), most=4096) == (256 << 20) // 12_000_000
    assert device_memory.block_rows(12, torch.device("cpu"), most=4096) == 4096
    assert device_memory.block_rows(10**12, torch.device("cpu"), most=4096) == 1
