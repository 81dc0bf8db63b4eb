"""FeatureExtractor: sklearn pipelines on image paths, API checks, bad images, cache mode."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.utils import estimator_checks as ec

import featx
from featx.embedding.extractor import FeatureExtractor, embed_files
from featx.errors import FeatxError

from conftest import TINY_KW, write_image_folder


@pytest.fixture(scope="module")
def paths_labels(tmp_path_factory):
    root = write_image_folder(tmp_path_factory.mktemp("fx") / "data", classes=("red", "green"), per_class=6)
    out = {}
    for split in ("train", "val"):
        files = sorted((root / split).glob("*/*.png"))
        out[split] = ([str(f) for f in files], np.array([f.parent.name for f in files]))
    return out


def _fx(**kw):
    return FeatureExtractor("tiny_cnn", weights="random", device="cpu", num_workers=0, **kw)


def test_pipeline_on_paths(paths_labels):
    (Xtr, ytr), (Xva, yva) = paths_labels["train"], paths_labels["val"]
    clf = make_pipeline(_fx(), LogisticRegression(max_iter=1000)).fit(Xtr, ytr)
    assert clf.score(Xva, yva) >= 0.9
    F = clf[0].transform(Xva)
    assert F.shape == (len(Xva), 32) and F.dtype == np.float32 and np.isfinite(F).all()
    assert list(clf[0].get_feature_names_out()[:2]) == ["tiny_cnn_0", "tiny_cnn_1"]
    # Pickled without the network, rebuilt on use with the same features.
    again = pickle.loads(pickle.dumps(clf))
    assert "backbone_" not in again[0].__dict__
    np.testing.assert_allclose(again[0].transform(Xva), F, rtol=1e-5, atol=1e-6)


def test_features_match_the_embed_cache(paths_labels, tmp_path):
    from featx.cache.store import FeatureCache

    root = Path(paths_labels["train"][0][0]).parents[2]
    fc = featx.embed(root, cache_dir=tmp_path, **TINY_KW)
    F = _fx().fit().transform(fc.paths("val"))
    np.testing.assert_allclose(F, fc.features("val"), rtol=1e-4, atol=1e-5)
    # Cache mode goes through featx.embed and gives the same numbers.
    G = _fx(cache_dir=str(tmp_path / "fxcache")).fit().transform(fc.paths("val"))
    np.testing.assert_allclose(G, F, rtol=1e-4, atol=1e-5)
    (cache_file,) = [p for p in (tmp_path / "fxcache").iterdir() if p.suffix == ".h5"]
    stored = FeatureCache(cache_file)
    assert len(stored) == len(fc.paths("val")) and not stored.failed
    np.testing.assert_allclose(stored.features(), G, rtol=1e-6, atol=1e-7)
    # A second transform of the same files reads the cache: the file is not rebuilt.
    before = cache_file.stat().st_mtime_ns
    H = _fx(cache_dir=str(tmp_path / "fxcache")).fit().transform(fc.paths("val"))
    np.testing.assert_array_equal(H, G)
    assert cache_file.stat().st_mtime_ns == before


def test_bad_images_raise_or_become_nan(paths_labels, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\x00" * 10)
    X = paths_labels["val"][0][:2] + [str(bad)]
    with pytest.raises(FeatxError, match="bad.jpg.*on_error='nan'"):
        _fx().fit().transform(X)
    F = _fx(on_error="nan").fit().transform(X)
    assert np.isfinite(F[:2]).all() and np.isnan(F[2]).all()
    res = embed_files(X, backbone="tiny_cnn", weights="random", device="cpu")
    assert res["ok"] == [0, 1] and res["failed"][0][0] == str(bad)


def test_input_validation(paths_labels):
    fx = _fx().fit()
    with pytest.raises(ValueError, match="list of image paths"):
        fx.transform(paths_labels["val"][0][0])
    with pytest.raises(ValueError, match="image paths"):
        fx.transform(np.zeros((3, 4)))
    assert fx.transform(np.array(paths_labels["val"][0][:2])[:, None]).shape == (2, 32)
    assert fx.transform([]).shape == (0, 32)
    with pytest.raises(ValueError, match="on_error"):
        _fx(on_error="skip").fit()


@pytest.mark.parametrize(
    "check",
    [
        ec.check_estimator_cloneable,
        ec.check_estimator_repr,
        ec.check_estimator_tags_renamed,
        ec.check_valid_tag_types,
        ec.check_no_attributes_set_in_init,
        ec.check_do_not_raise_errors_in_init_or_set_params,
        ec.check_mixin_order,
        ec.check_get_params_invariance,
        ec.check_set_params,
        ec.check_parameters_default_constructible,
    ],
    ids=lambda c: c.__name__,
)
def test_sklearn_api_checks_that_apply(check):
    # The data-driven checks feed numeric 2-D arrays, which are not image paths; the tags say so
    # (two_d_array=False, string=True) and check_estimator skips them.
    check("FeatureExtractor", FeatureExtractor())


def test_tags_and_unfitted():
    from sklearn.exceptions import NotFittedError
    from sklearn.utils import get_tags

    tags = get_tags(FeatureExtractor())
    assert tags.input_tags.string and not tags.input_tags.two_d_array
    with pytest.raises(NotFittedError):
        FeatureExtractor().transform(["x.jpg"])
    c = clone(_fx(batch_size=7))
    assert c.batch_size == 7 and not hasattr(c, "fingerprint_")
    assert featx.FeatureExtractor is FeatureExtractor
