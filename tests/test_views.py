"""Feature views: extraction per backbone family, the cache's views, CV selection on training rows."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
import torch

from featx.base.errors import FeatxError
from featx.cache.store import FeatureCache
from featx.cache.views import available_views, compose, parts_for
from featx.embedding.backbones import create_backbone
from featx.embedding.runner import embed
from featx.heads.tuning.selection import FeatureNorm, candidates
from featx.runs.probe import probe

from conftest import TINY_BACKBONE, TINY_KW, write_image_folder

# One registered backbone per family: featx's own, timm (efficientnet_lite0, timm:<name>), torchvision.
FAMILIES = ["tiny_cnn", "efficientnet_lite0", "timm:resnet18", "resnet18"]


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.slow
def test_view_parts_for_every_backbone_family(name):
    plain = create_backbone(name, weights="random")
    bb = create_backbone(name, weights="random", views="final,stages,gem", tta="flip")
    widths = dict(bb.layout)
    assert list(widths)[:4] == ["features", "stage1", "stage2", "gem"]
    assert widths["features"] == plain.dim == bb.dim and bb.out_dim == sum(widths.values())
    c = bb.preprocess.crop
    x = torch.randn(2, 3, c, c)
    with torch.inference_mode():
        y, ref, mirrored = bb.model(x), plain.model(x), plain.model(x.flip(-1))
    cols = dict(zip(widths, torch.split(y, list(widths.values()), dim=1)))
    # The final part is the plain backbone's features; the flip part averages image and mirror.
    torch.testing.assert_close(cols["features"], ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(cols["flip_features"], (ref + mirrored) / 2, atol=1e-5, rtol=1e-4)
    assert widths["stage1"] < widths["stage2"] or name == "tiny_cnn"  # stages widen towards the end
    assert bb.fingerprint()["views"] == "final,stages,gem" and bb.fingerprint()["tta"] == "flip"
    assert "views" not in plain.fingerprint()  # plain caches keep the fingerprint they always had


def test_bad_view_options_name_the_choices():
    with pytest.raises(FeatxError, match="unknown part.*final, stages, gem"):
        create_backbone("tiny_cnn", weights="random", views="final,layers")
    with pytest.raises(FeatxError, match="--tta 'mirror'"):
        create_backbone("tiny_cnn", weights="random", tta="mirror")
    assert parts_for("multi3+flip") == ("final,stages", "flip") and parts_for("gem") == ("final,gem", "none")


@pytest.fixture(scope="module")
def view_caches(tmp_path_factory):
    root = write_image_folder(tmp_path_factory.mktemp("views") / "data", classes=("a", "b", "c"), per_class=8)
    kw = dict(TINY_KW, device="cpu", runtime="torch")
    cdir = root.parent / "cache"
    rich = embed(root, cache_dir=cdir, views="final,stages,gem", tta="flip", **kw)
    plain = embed(root, cache_dir=cdir, views="final", **kw)
    return rich, plain


@pytest.mark.slow
def test_cache_stores_views_and_old_style_caches_still_read(view_caches):
    rich, plain = view_caches
    assert rich.path != plain.path  # views are part of the fingerprint, so of the file name
    assert plain.views == ["final"] and "views" not in plain.fingerprint_dict
    assert rich.views == ["final", "multi2", "multi3", "gem", "final+flip", "multi2+flip", "multi3+flip", "gem+flip"]
    np.testing.assert_array_equal(rich.features("train"), plain.features("train"))
    with h5py.File(rich.path, "r") as f:
        s1, s2, fin = (f[k][()][: len(rich.labels("train"))] for k in ("parts/stage1", "parts/stage2", "features"))
    l2 = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(rich.features("train", view="multi3"), np.hstack([l2(s1), l2(s2), l2(fin)]), atol=1e-6)
    assert rich.view_dim("multi3") == s1.shape[1] + s2.shape[1] + fin.shape[1]
    blocks = np.vstack(list(rich.iter_features("train", rows=5, view="multi2+flip")))
    np.testing.assert_array_equal(blocks, rich.features("train", view="multi2+flip"))
    with pytest.raises(FeatxError, match=r"view .multi3. is not in cache .*\(it has: final\)"):
        plain.features("train", view="multi3")


def test_compose_and_available_views():
    parts = {"features": np.array([[3.0, 4.0]]), "stage2": np.array([[0.0, 2.0]])}
    assert available_views(parts) == ["final", "multi2"]
    np.testing.assert_allclose(compose("multi2", parts.__getitem__), [[0, 1, 0.6, 0.8]])
    np.testing.assert_array_equal(compose("final", parts.__getitem__), parts["features"])  # final is never rescaled


def test_feature_norms_and_candidates():
    X = np.array([[4.0, -9.0], [0.0, 0.0]])
    np.testing.assert_allclose(FeatureNorm("l2").fit(X).transform(X), [[4 / 97**0.5, -9 / 97**0.5], [0, 0]], atol=1e-6)
    np.testing.assert_allclose(FeatureNorm("power").fit(X).transform(X)[0], [2 / 13**0.5, -3 / 13**0.5], atol=1e-6)
    assert candidates("auto", "auto", ["final", "multi3"], cache_name="c") == [("final", "none", 0), ("multi3", "none", 0)]
    assert candidates("final", "none,power", ["final"], cache_name="c", train_views="auto", stored_views=4) == [
        ("final", "none", 0), ("final", "none", 4), ("final", "power", 0), ("final", "power", 4)]
    with pytest.raises(FeatxError, match="--view gem: cache c has the views final, multi3"):
        candidates("gem", "auto", ["final", "multi3"], cache_name="c")
    with pytest.raises(FeatxError, match="--norm zca"):
        candidates("auto", "zca", ["final"], cache_name="c")


def test_choice_is_the_first_candidate_within_one_standard_error():
    from featx.heads.tuning.selection import Candidate, best_index

    row = lambda score, se: Candidate("final", "none", 0, 4, score, se, {}, 0.0)  # noqa: E731
    assert best_index([row(0.90, 0.02), row(0.91, 0.02), row(0.95, 0.01)]) == 2  # 0.90, 0.91 < 0.95 - 0.01
    assert best_index([row(0.90, 0.02), row(0.91, 0.02), row(0.92, 0.03)]) == 0  # 0.90 >= 0.92 - 0.03
    assert best_index([row(float("nan"), 0.0), row(0.5, float("nan"))]) == 1


@pytest.mark.slow
def test_probe_reports_the_view_table_and_forced_view(view_caches, tmp_path):
    rich, _ = view_caches
    res = probe(rich, head="logreg,knn", out_dir=tmp_path / "auto", view="final,multi3+flip", norm="none,l2",
                n_jobs=1, plots=False)
    for h in res["heads"].values():
        assert [(c["view"], c["norm"]) for c in h["views"]] == [
            ("final", "none"), ("final", "l2"), ("multi3+flip", "none"), ("multi3+flip", "l2")]
        assert all(c["train_views"] == 0 for c in h["views"])
        top = max(h["views"], key=lambda c: c["cv_score"])
        first = [c for c in h["views"] if c["cv_score"] >= top["cv_score"] - top["cv_std_err"]][0]
        assert (first["view"], first["norm"], first["cv_score"]) == (h["view"], h["norm"], h["cv_score"])
        assert h["view_choice"].startswith("cv")
    assert "CV score per feature view" in res.table
    forced = probe(rich, head="logreg", out_dir=tmp_path / "forced", view="multi2", norm="power", n_jobs=1, plots=False)
    h = forced["heads"]["logreg"]
    assert (h["view"], h["norm"], h["view_choice"]) == ("multi2", "power", "given")
    sidecar = json.loads((tmp_path / "forced" / "logreg.json").read_text())
    assert sidecar["view"] == "multi2" and sidecar["dim"] == rich.view_dim("multi2")


@pytest.mark.slow
def test_selection_never_reads_the_evaluation_rows(view_caches, tmp_path):
    """Replacing every evaluation row of every part with noise changes no CV score and no choice."""
    rich, _ = view_caches
    noisy = tmp_path / "noisy.h5"
    shutil.copy(rich.path, noisy)
    n_train = len(rich.labels("train"))
    rng = np.random.default_rng(1)
    with h5py.File(noisy, "r+") as f:
        for name in ["features"] + [f"parts/{k}" for k in f["parts"]]:
            d = f[name]
            d[n_train:] = rng.normal(size=(d.shape[0] - n_train, d.shape[1])).astype(d.dtype)
    kw = dict(head="logreg,knn", n_jobs=1, plots=False, save=False, norm="none,power")
    a = probe(rich, out_dir=tmp_path / "a", **kw)
    b = probe(FeatureCache(noisy), out_dir=tmp_path / "b", **kw)
    for name in a["heads"]:
        ta = [(c["view"], c["norm"], c["cv_score"], c["params"]) for c in a["heads"][name]["views"]]
        tb = [(c["view"], c["norm"], c["cv_score"], c["params"]) for c in b["heads"][name]["views"]]
        assert ta == tb and len(ta) == 16  # 8 views x (none, power)
        assert (a["heads"][name]["view"], a["heads"][name]["norm"]) == (b["heads"][name]["view"], b["heads"][name]["norm"])


@pytest.mark.slow
def test_predict_applies_the_heads_view_to_new_images(view_caches, tmp_path):
    from featx.runs.predict import predict

    rich, _ = view_caches
    res = probe(rich, head="logreg", out_dir=tmp_path / "run", view="multi3+flip", n_jobs=1, plots=False)
    model = res["heads"]["logreg"]["model_path"]
    on_cache = predict(model, [str(rich.path)], out=tmp_path / "cache.csv", progress=False)
    on_files = predict(model, rich.paths(), out=tmp_path / "files.csv", cache_dir=tmp_path / "c", device="cpu",
                       num_workers=0, progress=False)
    assert on_files["n_images"] == on_cache["n_images"] == len(rich)
    assert on_files["counts"] == on_cache["counts"]


# --------------------------------------------------------------------------- augmented training views


@pytest.mark.slow
def test_train_views_are_stored_seeded_and_dropped_when_not_asked(tmp_path):
    root = write_image_folder(tmp_path / "data", classes=("a", "b"), per_class=5)
    (root / "train" / "a" / "broken.png").write_bytes(b"not an image")
    kw = dict(TINY_BACKBONE, device="cpu", progress=False, runtime="torch", views="final")
    fc = embed(root, cache_dir=tmp_path / "c1", train_views=2, num_workers=0, **kw)
    n_train = len(fc.labels("train"))
    X, src = fc.augmented()
    assert fc.train_views == 2 and X.shape == (2 * n_train, fc.dim)
    assert np.array_equal(np.sort(src), np.repeat(np.arange(n_train), 2))  # train rows only, each twice
    assert [k for k, _ in fc.failed] == ["train/a/broken.png"]  # its views are not listed as failures
    assert not np.allclose(X[0], fc.features("train")[src[0]])  # a crop, not the plain image
    rerun = embed(root, cache_dir=tmp_path / "c1", train_views=2, num_workers=0, **kw)
    assert rerun.stats.embedded == 0 and not rerun.stats.rebuilt  # the broken image's views are not retried
    # Seeded per image and view: another process layout and chunking give the same rows.
    again = embed(root, cache_dir=tmp_path / "c2", train_views=2, num_workers=2, chunk_size=3, **kw)
    np.testing.assert_allclose(again.augmented()[0], X, atol=1e-5)
    # Not asked (compare, a plain `featx embed`): the finished views are kept, nothing is rebuilt.
    kept = embed(root, cache_dir=tmp_path / "c1", num_workers=0, **kw)
    assert kept.train_views == 2 and kept.stats.embedded == 0 and not kept.stats.rebuilt
    plain = embed(root, cache_dir=tmp_path / "c1", train_views=0, num_workers=0, **kw)  # 0 removes them
    assert plain.path == fc.path and plain.stats.embedded == 0 and plain.train_views == 0 and plain.stats.rebuilt
    assert plain.augmented()[0].shape == (0, fc.dim)


def test_grouped_view_folds_keep_every_view_of_a_validation_image_out():
    from featx.heads.tuning.cv import GroupedViewFolds, cv_splits

    y = np.repeat([0, 1, 2], 6)
    src = np.repeat(np.arange(18), 3)  # 3 views per image
    yy = np.concatenate([y, y[src]])
    grouped = cv_splits(yy, GroupedViewFolds(3, random_state=0, n_plain=18, source=src))
    for (tr, va), (ptr, pva) in zip(grouped, cv_splits(y, 3, 0)):
        assert np.array_equal(va, pva) and va.max() < 18  # validation: the same plain rows
        views_of = set(18 + np.flatnonzero(np.isin(src, va)))
        assert not views_of & set(tr) and set(ptr) <= set(tr)
        assert len(tr) == len(ptr) * 4


@pytest.mark.slow
def test_probe_trains_on_views_only_when_the_cache_has_them(tmp_path):
    root = write_image_folder(tmp_path / "data", classes=("a", "b", "c"), per_class=6)
    kw = dict(TINY_KW, device="cpu", runtime="torch")
    fc = embed(root, cache_dir=tmp_path / "c", train_views=2, views="final", **kw)
    res = probe(fc, head="logreg", out_dir=tmp_path / "on", train_views="on", n_jobs=1, plots=False)
    h = res["heads"]["logreg"]
    assert h["train_views"] == 2 and [c["train_views"] for c in h["views"]] == [2]
    auto = probe(fc, head="logreg", out_dir=tmp_path / "auto", view="final", norm="none", n_jobs=1, plots=False)
    assert [c["train_views"] for c in auto["heads"]["logreg"]["views"]] == [0, 2]
    # Several views: chosen on the plain rows first, then trained with the augmented views (one costly fit).
    staged = probe(fc, head="knn", out_dir=tmp_path / "st", norm="none,l2", train_views="on", n_jobs=1, plots=False)
    h = staged["heads"]["knn"]
    table = [(c["view"], c["norm"], c["train_views"]) for c in h["views"]]
    assert table[:2] == [("final", "none", 0), ("final", "l2", 0)] and len(table) == 3
    best_plain = max(h["views"][:2], key=lambda c: c["cv_score"])  # first within one s.e., here of two
    assert table[2][2] == 2 and (h["view"], h["norm"], h["train_views"]) == table[2]
    assert table[2][:2] in [(c["view"], c["norm"]) for c in h["views"][:2]] and best_plain["view"] == "final"
    bare = embed(root, cache_dir=tmp_path / "c", views="final", train_views=0, **kw)  # 0 removes the views
    with pytest.raises(FeatxError, match="stores no augmented views.*--train-views 8"):
        probe(bare, head="logreg", out_dir=tmp_path / "x", train_views="on", n_jobs=1, plots=False)


@pytest.mark.slow
def test_fewshot_draws_one_curve_per_view_on_the_same_draws(view_caches, tmp_path):
    from featx.runs.fewshot import fewshot

    rich, _ = view_caches
    res = fewshot(rich, shots=(1, 2), seeds=2, heads="logreg", view="final,multi3", out_dir=tmp_path, plot=False)
    assert list(res.heads) == ["logreg@final", "logreg@multi3"]
    assert res.heads["logreg@final"]["2"]["n_train"] == res.heads["logreg@multi3"]["2"]["n_train"] == [6, 6]
    alone = fewshot(rich, shots=(1, 2), seeds=2, heads="logreg", view="multi3", out_dir=tmp_path / "b", plot=False)
    assert alone.heads["logreg"]["2"]["per_seed"] == res.heads["logreg@multi3"]["2"]["per_seed"]


@pytest.mark.slow
def test_report_lists_the_views_each_head_tried(view_caches, tmp_path):
    rich, _ = view_caches
    res = probe(rich, head="knn", view="final,multi3", norm="none", out_dir=tmp_path, n_jobs=1, report=True)
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert res.report_path and "Feature views tried (2 candidates: 1 fit of the heads, 1 proxy score)" in page
    assert "multi3" in page


def test_gpu_engine_sends_augmented_views_through_the_cpu_decoder(monkeypatch):
    """On CUDA the GPU decoder gets the plain images only; augmented views keep their positions."""
    from featx.data.folders import Sample
    from featx.embedding.engines import augment
    from featx.embedding.engines import chunks as engine

    todo = [Sample(f"/x/{i}.jpg", f"{i}.jpg", 0, "train") for i in range(3)]
    todo = augment.add_train_views(todo, 2)  # 3 plain, then 6 views
    seen = {}

    def fake(name):
        def stream(samples, backbone, **kw):
            seen[name] = [s.key for s in samples]
            yield list(range(len(samples))), [""] * len(samples), [0] * len(samples), [0] * len(samples), [], None
        return stream

    monkeypatch.setattr(engine, "iter_gpu_features", fake("gpu"))
    monkeypatch.setattr(engine, "_cpu_stream", fake("cpu"))
    batches = list(engine.feature_batches(todo, None, device="cuda", batch_size=4, num_workers=0, engine="gpu"))
    assert seen["gpu"] == ["0.jpg", "1.jpg", "2.jpg"] and all(augment.is_aug(k) for k in seen["cpu"])
    assert [b[0] for b in batches] == [[0, 1, 2], [3, 4, 5, 6, 7, 8]]
    assert augment.parse(todo[4].key) == ("0.jpg", 1)


@pytest.mark.slow
def test_augmented_rows_read_in_blocks_equal_a_whole_read(tmp_path):
    root = write_image_folder(tmp_path / "data", classes=("a", "b"), per_class=4)
    fc = embed(root, cache_dir=tmp_path / "c", **TINY_KW, device="cpu", runtime="torch", train_views=3)
    X, src = fc.augmented(view="multi3")
    Xb, srcb = fc.augmented(view="multi3", block_rows=5)
    np.testing.assert_array_equal(X, Xb) and np.testing.assert_array_equal(src, srcb)
    some = np.array([1, 4])
    Xs, ss = fc.augmented(some, view="multi3", block_rows=5)
    assert sorted(set(ss)) == [1, 4] and len(ss) == 6
    np.testing.assert_array_equal(Xs, X[np.isin(src, some)])


@pytest.mark.parametrize("fmt", ["npy", "parquet", "csv"])
def test_export_writes_the_chosen_view(view_caches, tmp_path, fmt):
    from featx.cache.export import export_cache

    rich, plain = view_caches
    res = export_cache(rich, fmt=fmt, out=tmp_path / f"x.{fmt}", view="multi3+flip", chunk_rows=7)
    assert res["dim"] == rich.view_dim("multi3+flip") and res["view"] == "multi3+flip"
    if fmt == "npy":
        np.testing.assert_allclose(np.load(tmp_path / "x.npy"), rich.features(view="multi3+flip"), atol=1e-6)
    with pytest.raises(FeatxError, match=r"view 'multi3' is not in cache .*\(it has: final\)"):
        export_cache(plain, fmt=fmt, out=tmp_path / f"y.{fmt}", view="multi3")
