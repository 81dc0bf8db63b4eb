"""heads/tuning/selection.py: the candidates, the one-standard-error rule, the normalisations, select()."""

from __future__ import annotations

import numpy as np
import pytest

from featx.base.errors import FeatxError
from featx.heads.tuning.selection import (
    Candidate,
    FeatureNorm,
    SearchPlan,
    best_index,
    candidates,
    fold_std_err,
    plain_and_augmented,
    select,
    with_norm,
)


def _cand(score: float, se: float, view: str = "final") -> Candidate:
    return Candidate(view, "none", 0, 4, score, se, {}, 0.0)


def test_auto_candidates_are_every_view_without_normalisation_simplest_first():
    assert candidates("auto", "auto", ["final", "multi2"], cache_name="c") == [("final", "none", 0), ("multi2", "none", 0)]
    got = candidates("final", "none,l2", ["final"], cache_name="c", train_views="auto", stored_views=3)
    assert got == [("final", "none", 0), ("final", "none", 3), ("final", "l2", 0), ("final", "l2", 3)]
    with pytest.raises(FeatxError, match="cache c has the views final"):
        candidates("gem", "auto", ["final"], cache_name="c")
    with pytest.raises(FeatxError, match="--norm cube"):
        candidates("final", "cube", ["final"], cache_name="c")
    with pytest.raises(FeatxError, match="stores no augmented views"):
        candidates("final", "none", ["final"], cache_name="c", train_views="on")


def test_one_standard_error_rule_prefers_the_simpler_candidate():
    assert best_index([_cand(0.80, 0.02), _cand(0.81, 0.02)]) == 0  # within one s.e. of the best: the first
    assert best_index([_cand(0.80, 0.005), _cand(0.81, 0.005)]) == 1
    assert best_index([_cand(float("nan"), 0.0), _cand(0.5, 0.0)]) == 1  # NaN never wins


def test_plain_and_augmented_stages():
    assert plain_and_augmented([("final", "none", 0), ("final", "none", 4)]) == ([("final", "none", 0)], [4], False)
    assert plain_and_augmented([("final", "none", 4)]) == ([], [4], True)  # forced, nothing to choose on plain rows


def test_feature_norms_and_with_norm():
    X = np.array([[4.0, -9.0], [0.0, 0.0]], np.float32)
    np.testing.assert_allclose(FeatureNorm("l2").fit(X).transform(X), [[4 / 97**0.5, -9 / 97**0.5], [0, 0]], rtol=1e-6)
    np.testing.assert_allclose(FeatureNorm("power").fit(X).transform(X), [[2 / 13**0.5, -3 / 13**0.5], [0, 0]],
                               rtol=1e-6)
    assert FeatureNorm("none").fit(X).transform(X) is not None and with_norm("est", "none") == "est"
    assert [n for n, _ in with_norm(FeatureNorm(), "l2").steps] == ["norm", "head"]
    with pytest.raises(FeatxError, match="--norm 'cube'"):
        FeatureNorm("cube").fit(X)


def test_fold_std_err_of_a_search():
    class Search:
        best_index_ = 1
        cv_results_ = {"mean_test_score": [0.5, 0.7], "split0_test_score": [0.5, 0.6], "split1_test_score": [0.5, 0.8]}

    assert fold_std_err(Search()) == pytest.approx(np.std([0.6, 0.8], ddof=1) / np.sqrt(2))
    assert np.isnan(fold_std_err(object()))


def test_select_scores_every_candidate_on_the_training_rows_and_keeps_the_choice():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 30)
    signal = rng.normal(0, 1, (3, 6))[y] * 3
    views = {"final": signal + rng.normal(0, 1, (90, 6)), "noise": rng.normal(0, 1, (90, 6))}

    class Rows:
        def training(self, view, train_views, *, folds, seed):
            return views[view].astype(np.float32), y, folds

    plan = SearchPlan(name="logreg", kernel="linear", grid={"C": [0.1, 1.0]}, scoring="accuracy", max_iter=500,
                      folds=3, folds_used=3, seed=0, n_jobs=1, device="cpu",
                      candidates=(("noise", "none", 0), ("final", "none", 0)))
    sel = select(Rows(), plan)
    assert [r.view for r in sel.table] == ["noise", "final"]
    assert sel.row.view == "final" and sel.row.cv_score > 0.9 > sel.table[0].cv_score
    assert sel.est.predict(views["final"][:3].astype(np.float32)).tolist() == y[:3].tolist()
