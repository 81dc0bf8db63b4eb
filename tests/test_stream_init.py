"""heads/stream/init.py: the streamed linear heads' warm start."""

from __future__ import annotations

import numpy as np
import pytest

from featx.heads.stream.init import (
    CALIBRATION_ROWS,
    calibration_rows,
    class_sums,
    hinge_scaled,
    lda,
    softmax_temperature,
)


def test_calibration_rows_are_a_seeded_ordered_sample():
    rows = np.arange(10_000)
    a = calibration_rows(rows, seed=3)
    assert len(a) == CALIBRATION_ROWS and np.all(np.diff(a) > 0)
    assert np.array_equal(a, calibration_rows(rows, seed=3)) and not np.array_equal(a, calibration_rows(rows, seed=4))
    assert a.max() > 9000  # across the rows, not the first ones
    assert np.array_equal(calibration_rows(rows[:50], seed=0), rows[:50])


def test_class_sums_equal_a_loop():
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(40, 3)).astype(np.float32), rng.integers(0, 4, 40)
    want = np.stack([X[y == c].sum(0) for c in range(5)])
    np.testing.assert_allclose(class_sums(X, y, 5), want, rtol=1e-5, atol=1e-5)


def test_lda_separates_gaussian_classes():
    rng = np.random.default_rng(1)
    means = np.array([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]])
    y = np.repeat([0, 1, 2], 200)
    X = means[y] + rng.normal(size=(600, 2))
    mean, scale = X.mean(0), X.std(0)
    W, b = lda(class_sums(X, y, 3), np.bincount(y).astype(float), X.T @ X, mean, scale)
    pred = (((X - mean) / scale) @ W + b).argmax(1)
    assert W.shape == (2, 3) and b.shape == (3,)
    assert np.mean(pred == y) > 0.95


def test_hinge_scaling_puts_the_winner_near_plus_one():
    rng = np.random.default_rng(2)
    Z = np.c_[rng.normal(size=(300, 3)), np.ones(300)]
    W, b = rng.normal(size=(3, 4)), rng.normal(size=4)
    W2, b2 = hinge_scaled(W, b, Z)
    s = Z[:, :-1] @ W2 + b2
    top2 = np.sort(s, 1)[:, -2:]
    assert np.median(top2[:, 1] - top2[:, 0]) == pytest.approx(2.0)  # the winner 1 above the midpoint, runner-up 1 below
    assert np.median(top2.mean(1)) == pytest.approx(0.0, abs=1e-9)
    assert np.array_equal((Z[:, :-1] @ W + b).argmax(1), s.argmax(1))  # the same predictions
    W0, b0 = hinge_scaled(W, b, Z[:0])
    assert not W0.any() and not b0.any()


def test_softmax_temperature_undoes_overconfident_scores():
    rng = np.random.default_rng(0)
    scores = rng.normal(0, 1, (4000, 5))
    p = np.exp(scores) / np.exp(scores).sum(1, keepdims=True)
    y = np.array([rng.choice(5, p=row) for row in p])
    assert softmax_temperature(20 * scores, y) == pytest.approx(1 / 20, rel=0.15)
    assert softmax_temperature(scores[:0], y[:0]) == 1.0
