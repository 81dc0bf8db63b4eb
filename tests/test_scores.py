"""Class scores of a fitted head (heads/estimators/scores.py): probabilities where a head has them, else decision values."""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.svm import LinearSVC

from featx.heads.estimators.scores import as_probabilities, scores_of, softmax_of_scores


def test_softmax_of_scores_rows_sum_to_one_and_keep_the_order() -> None:
    d = np.array([[1.0, 2.0, 3.0], [1000.0, 0.0, -1000.0]])  # large values do not overflow
    p = softmax_of_scores(d)
    assert np.allclose(p.sum(axis=1), 1) and (p.argmax(axis=1) == d.argmax(axis=1)).all() and np.isfinite(p).all()
    b = softmax_of_scores(np.array([-2.0, 0.0, 3.0]))  # binary decision values: two columns
    assert b.shape == (3, 2) and np.allclose(b[1], [0.5, 0.5]) and (b[:, 1] > 0.5).tolist() == [False, False, True]


def test_as_probabilities_keeps_probabilities_and_softmaxes_the_rest() -> None:
    p = np.array([[0.2, 0.8], [0.5, 0.5]])
    assert np.array_equal(as_probabilities(p), p)  # already probabilities: kept as they are
    s = np.array([[2.0, -1.0], [0.0, 3.0]])
    assert np.allclose(as_probabilities(s), softmax_of_scores(s))


def test_scores_of_prefers_probabilities_then_decision_values() -> None:
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 10)
    X = rng.normal(size=(30, 4)) + 3 * y[:, None]
    lr = LogisticRegression().fit(X, y)
    assert np.allclose(scores_of(lr, X), lr.predict_proba(X))
    svm = LinearSVC().fit(X, y)
    assert np.allclose(scores_of(svm, X), svm.decision_function(X))
    yb = (y > 0).astype(int)
    binary = LinearSVC().fit(X, yb)
    s = scores_of(binary, X)
    assert s.shape == (30, 2) and (s.argmax(axis=1) == binary.predict(X)).all()

    class OnlyPredicts:  # a head with neither probabilities nor decision values
        def predict(self, X):
            return np.zeros(len(X), int)

    assert scores_of(OnlyPredicts(), X) is None
