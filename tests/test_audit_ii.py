"""Audit II (issue 33): calibrated ranking of every row, trust wording, split names, the approximate duplicate index."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("cleanlab")

from featx.audit import finders  # noqa: E402
from featx.runs.audit import _eval_name, _summary  # noqa: E402


def _blobs(n: int, k: int, dim: int, spread: float, seed: int = 0, flip: float = 0.05):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim)) * spread
    y = np.arange(n) % k
    X = (centres[y] + rng.normal(size=(n, dim))).astype(np.float32)
    flipped = rng.choice(n, size=int(flip * n), replace=False)
    noisy = y.copy()
    noisy[flipped] = (y[flipped] + 1 + rng.integers(0, k - 1, size=len(flipped))) % k
    return X, noisy, flipped


def test_every_row_is_ranked_and_the_flips_lead():
    X, y, flipped = _blobs(400, 4, 16, spread=2.5)
    rk = finders.rank_label_issues(X, y, folds=3, seed=0, Cs=(0.01, 0.1, 1.0, 10.0))
    assert sorted(rk.order.tolist()) == list(range(len(y)))  # every row, once
    q = rk.quality[rk.order]
    assert np.all(np.diff(q) >= 0)  # worst first
    k = len(flipped)
    assert len(set(rk.order[:2 * k].tolist()) & set(flipped.tolist())) / k >= 0.9
    assert 0.05 < rk.temperature < 20 and rk.flagged_mask.sum() >= k // 2
    trust = finders.label_trust(y, rk)
    assert trust["reliable"] and trust["wording"] == "likely label errors"
    assert trust["noise_rate"] == pytest.approx(0.05, abs=0.04)


def test_a_weak_probe_makes_the_flags_for_review():
    """Classes the features barely separate (a 'catbreeds' stand-in): the flags are confusions, not errors."""
    X, y, _ = _blobs(400, 4, 16, spread=0.35, seed=1)
    rk = finders.rank_label_issues(X, y, folds=3, seed=0, Cs=(0.01, 0.1, 1.0))
    trust = finders.label_trust(y, rk)
    assert rk.accuracy < finders.MIN_ACCURACY
    assert not trust["reliable"] and trust["wording"] == "for review"
    assert "accuracy" in trust["why"] and "for review" in trust["note"]
    counts = {"cross_split_pairs": 0, "label_issues": trust["flags"], "outliers": 0}
    line = _summary(counts, None, Path("run"), eval_name="val", trust=trust)
    assert "label(s) for review" in line and "likely label error" not in line


def test_split_names_follow_the_data():
    counts = {"cross_split_pairs": 2, "label_issues": 1, "outliers": 0}
    assert _eval_name({"kind": "split", "eval_split": "val"}) == "val"
    assert _eval_name({"kind": "holdout", "eval_split": "train (held out)"}) == "holdout"
    line = _summary(counts, None, Path("run"), eval_name=_eval_name({"kind": "split", "eval_split": "val"}))
    assert line.startswith("2 train/val duplicate pair(s)") and "train/test" not in line
    assert "1 likely label error(s)" in line


def test_approximate_pairs_find_the_exact_pairs():
    pytest.importorskip("faiss")
    rng = np.random.default_rng(4)
    X = rng.normal(size=(3000, 24)).astype(np.float32)
    src = rng.choice(3000, size=40, replace=False)
    dst = rng.choice(np.setdiff1d(np.arange(3000), src), size=40, replace=False)
    X[dst] = X[src] + 0.05 * rng.normal(size=(40, 24)).astype(np.float32)
    ei, ej, es = finders.similar_pairs(X, threshold=0.95, block=500, approximate=False)
    ai, aj, as_ = finders.similar_pairs(X, threshold=0.95, block=500, approximate=True)
    exact, approx = set(zip(ei.tolist(), ej.tolist())), set(zip(ai.tolist(), aj.tolist()))
    assert len(exact) >= 40 and exact == approx  # each pair once, i < j, none missed at this size
    assert all(i < j for i, j in approx) and len(approx) == len(ai)
    assert np.allclose(np.sort(es), np.sort(as_), atol=1e-5)
