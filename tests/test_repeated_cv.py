"""heads/tuning/repeated_cv.py: paired repeated CV on a shared-Gram proxy, successive halving."""

from __future__ import annotations

import numpy as np

from featx.cache.views import l2_rows
from featx.heads.tuning.repeated_cv import GramStore, Spec, choose, fold_plan, knn_scores, proxy_for, ridge_scores


def _data(n: int = 120, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    good = rng.normal(0, 1, (3, 8))[y] * 2 + rng.normal(0, 1, (n, 8))
    noise = rng.normal(0, 1, (n, 8))
    return y, good.astype(np.float32), noise.astype(np.float32)


def _spec(X, key):
    return Spec([((key,), 1.0, (0, X.shape[1]))], lambda: X)


def test_proxy_and_fold_plan():
    assert proxy_for("knn_dino") == "knn" and proxy_for("svm") == "ridge"
    y, _, _ = _data()
    plan = fold_plan(y, 3, 2, seed=0)
    assert len(plan) == 2 and all(len(r) == 3 for r in plan)
    for rep in plan:
        assert sorted(np.concatenate([va for _, va in rep]).tolist()) == list(range(len(y)))  # each row once per repeat
    assert not np.array_equal(plan[0][0][1], plan[1][0][1])  # another seed per repeat


def test_gram_blocks_are_shared_and_normalised():
    X = np.arange(12, dtype=np.float32).reshape(4, 3) + 1
    calls = []
    spec = Spec([(("a",), 1.0, (0, 2)), (("b",), 2.0, (2, 3))], lambda: calls.append(1) or X)
    store = GramStore()
    G = store.gram(spec)
    Za, Zb = l2_rows(X[:, :2]), l2_rows(X[:, 2:])
    np.testing.assert_allclose(G, Za @ Za.T + 2 * Zb @ Zb.T, rtol=1e-6)
    store.gram(Spec([(("a",), 1.0, (0, 2))], lambda: calls.append(1) or X))
    assert len(calls) == 1  # block "a" read once


def test_proxies_score_a_signal_above_noise():
    y, good, noise = _data()
    splits = fold_plan(y, 3, 1, seed=0)[0]
    store = GramStore()
    for scorer in (lambda G: knn_scores(G, y, splits), lambda G: ridge_scores(G, y, splits, seed=0)):
        g, n = scorer(store.gram(_spec(good, "g"))), scorer(store.gram(_spec(noise, "n")))
        assert g.shape[1] == 3 and g.max(0).mean() > 0.85 and n.max(0).mean() < 0.6


def test_choose_picks_the_signal_and_reports_paired_rows():
    y, good, noise = _data()
    ch = choose([_spec(noise, "n"), _spec(good, "g")], y, head="logreg", folds=3, repeats=2, seed=0)
    assert ch.chosen == 1 and ch.proxy == "ridge" and ch.repeats == 2 and ch.folds == 3
    assert ch.rows[1]["cv_score"] > ch.rows[0]["cv_score"] + 0.3
    assert ch.rows[1]["paired_margin"] == 0.0 and ch.rows[0]["paired_margin"] < 0
    assert ch.rows[1]["folds_scored"] == 6
    assert ch.to_dict()["method"].startswith("repeated stratified CV (2 x 3-fold, paired; proxy ridge)")


def test_choose_keeps_the_simplest_of_equals():
    y, good, _ = _data()
    ch = choose([_spec(good, "a"), _spec(good.copy(), "b")], y, head="knn", folds=3, repeats=1, seed=0)
    assert ch.chosen == 0 and ch.rows[0]["cv_score"] == ch.rows[1]["cv_score"]
