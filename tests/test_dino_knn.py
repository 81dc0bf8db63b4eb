"""DINO-style weighted kNN: a hand computation, scikit-learn conventions, the CV search."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV

from featx.base.errors import FeatxError
from featx.cache.views import l2_rows
from featx.heads.estimators.dino_knn import DINO_KNN_GRID, DinoKNNClassifier
from featx.heads.tuning.factory import create_head

# Four training rows on the unit circle (the first one given at length 3: cosine ignores scale).
X_TRAIN = np.array([[3.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0]])
Y_TRAIN = np.array(["ant", "bee", "bee", "ant"])


def test_matches_hand_computation():
    # Query [2, 0] -> [1, 0]; cosine similarities 1, 0, 0.6, -1.  Top 3: rows 0 (ant, 1.0),
    # 2 (bee, 0.6), 1 (bee, 0.0).  Votes with T = 0.5: ant e^2, bee e^1.2 + e^0.
    clf = DinoKNNClassifier(n_neighbors=3, temperature=0.5).fit(X_TRAIN, Y_TRAIN)
    ant, bee = math.exp(2.0), math.exp(1.2) + 1.0
    p = clf.predict_proba(np.array([[2.0, 0.0]]))
    assert list(clf.classes_) == ["ant", "bee"]
    np.testing.assert_allclose(p[0], [ant / (ant + bee), bee / (ant + bee)], rtol=1e-6)
    np.testing.assert_allclose(p[0, 0], 0.631048, atol=1e-6)
    assert clf.predict(np.array([[2.0, 0.0]]))[0] == "ant"


def test_temperature_changes_the_vote():
    # Same neighbours; a high temperature flattens the weights, so two bees outvote one ant.
    clf = DinoKNNClassifier(n_neighbors=3, temperature=10.0).fit(X_TRAIN, Y_TRAIN)
    ant, bee = math.exp(0.1), math.exp(0.06) + 1.0
    np.testing.assert_allclose(clf.predict_proba([[1.0, 0.0]])[0, 1], bee / (ant + bee), rtol=1e-6)
    assert clf.predict([[1.0, 0.0]])[0] == "bee"


def test_k_one_is_nearest_neighbour_and_k_is_capped():
    clf = DinoKNNClassifier(n_neighbors=1, temperature=0.07).fit(X_TRAIN, Y_TRAIN)
    q = np.array([[0.5, 0.9], [-2.0, 0.1]])
    assert list(clf.predict(q)) == ["bee", "ant"]
    np.testing.assert_array_equal(clf.predict_proba(q), [[0.0, 1.0], [1.0, 0.0]])
    # k larger than the training set: every row votes, no error.
    big = DinoKNNClassifier(n_neighbors=50, temperature=1.0).fit(X_TRAIN, Y_TRAIN)
    sims = np.array([1.0, 0.0, 0.6, -1.0])
    w = np.exp(sims)
    np.testing.assert_allclose(big.predict_proba([[1.0, 0.0]])[0, 0], (w[0] + w[3]) / w.sum(), rtol=1e-6)


def test_sklearn_conventions_and_bad_params():
    est = DinoKNNClassifier(n_neighbors=2, temperature=0.1)
    assert est.fit(X_TRAIN, Y_TRAIN) is est
    assert est.n_features_in_ == 2 and est.train_.shape == (4, 2)
    np.testing.assert_allclose(np.linalg.norm(est.train_, axis=1), 1.0, rtol=1e-6)
    c = clone(est)
    assert c.get_params() == {"n_neighbors": 2, "temperature": 0.1} and not hasattr(c, "train_")
    with pytest.raises(FeatxError, match="temperature"):
        DinoKNNClassifier(temperature=0).fit(X_TRAIN, Y_TRAIN)
    with pytest.raises(FeatxError, match="n_neighbors"):
        DinoKNNClassifier(n_neighbors=0).fit(X_TRAIN, Y_TRAIN)
    with pytest.raises(ValueError):
        est.predict(np.ones((1, 3)))  # wrong feature count


def test_l2_normalise_keeps_zero_rows():
    # The one L2 row normaliser (featx.cache.views.l2_rows), which the DINO kNN uses on float32 rows.
    out = l2_rows(np.array([[3.0, 4.0], [0.0, 0.0]]))
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0]])
    est = DinoKNNClassifier(n_neighbors=1).fit(np.array([[3.0, 4.0], [0.0, 0.0]]), [0, 1])
    assert est.train_.dtype == np.float32
    np.testing.assert_allclose(est.train_, [[0.6, 0.8], [0.0, 0.0]])


def test_search_picks_by_cv_on_training_rows():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16))
    y = np.repeat([0, 1, 2], 20)
    X = centres[y] + 0.3 * rng.normal(size=(60, 16))
    # The search every head has: create_head's (stratified, seeded folds; the DINO grid of the heads: config).
    search = create_head("knn_dino", folds=4, seed=1, n_jobs=None)
    assert isinstance(search, GridSearchCV)
    assert search.cv.get_n_splits(X, y) == 4
    search.fit(X, y)
    assert set(search.params_) == {"n_neighbors", "temperature"}
    assert search.params_["n_neighbors"] in DINO_KNN_GRID["n_neighbors"]
    assert len(search.cv_results_["params"]) == 6
    Xq = centres[[0, 1, 2]] + 0.3 * rng.normal(size=(3, 16))
    assert list(search.predict(Xq)) == [0, 1, 2]
    with pytest.raises(FeatxError, match="unknown parameter"):
        create_head("knn_dino", grid={"k": [1]})
