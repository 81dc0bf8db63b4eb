"""Cache identity (data + embedding settings), the joins that use it, and the one rule for "newest" (issue 30)."""

from __future__ import annotations

import json
import logging
import os
import time

import pytest

import featx
from featx.cache.identity import CacheIdentity, data_digest, same_source
from featx.cache.multi import MultiCache, open_cache
from featx.cache.store import FeatureCache
from featx.embedding.multi import embed_backbones
from featx.report.html import write_report
from featx.report.runfiles import load_run

from conftest import tiny_embed, write_image_folder


def test_data_digest_changes_with_keys_labels_splits_and_classes():
    keys, y, s = ["a.png", "b.png"], [0, 1], ["train", "val"]
    base = data_digest(keys, y, s, ["cat", "dog"])
    assert base == data_digest(list(keys), list(y), list(s), ["cat", "dog"])
    assert base != data_digest(["a.png", "c.png"], y, s, ["cat", "dog"])
    assert base != data_digest(keys, [1, 0], s, ["cat", "dog"])
    assert base != data_digest(keys, y, ["train", "train"], ["cat", "dog"])
    assert base != data_digest(keys, y, s, ["cat", "owl"])


def test_two_data_sets_with_one_backbone_share_settings_not_identity(tmp_path):
    a = tiny_embed(write_image_folder(tmp_path / "flowers", classes=("rose", "tulip")), tmp_path / "cache")
    b = tiny_embed(write_image_folder(tmp_path / "cats", classes=("abyssinian", "bengal"), seed=1), tmp_path / "cache")
    assert a.embedding_settings == b.embedding_settings  # same backbone and preprocessing
    assert a.identity != b.identity and a.identity.data != b.identity.data
    assert a.summary()["identity"] == a.identity.to_dict()
    assert FeatureCache(a.path).identity == a.identity  # stable when read again
    assert same_source({"identity": a.identity.to_dict()}, {"cache": {"identity": a.identity.to_dict()}})
    assert not same_source({"identity": a.identity.to_dict()}, {"identity": b.identity.to_dict()})
    assert not same_source({"fingerprint": a.fingerprint}, {"fingerprint": a.fingerprint})  # old runs never join
    assert CacheIdentity.from_record({"identity": {"data": 1}}) is None


@pytest.mark.slow
def test_report_never_shows_another_data_sets_fewshot_curve(tmp_path, monkeypatch):
    """The reproduction of issue 30: few-shot on flowers, probe on cats, one --cache-dir, one runs/ folder."""
    monkeypatch.chdir(tmp_path)
    flowers = tiny_embed(write_image_folder(tmp_path / "flowers", classes=("rose", "tulip"), per_class=8), tmp_path / "cache")
    cats = tiny_embed(write_image_folder(tmp_path / "cats", classes=("abyssinian", "bengal"), per_class=8, seed=1),
                      tmp_path / "cache")
    featx.fewshot(flowers.path, shots="1,2", seeds=2, head="logreg", plot=False)
    probe = featx.probe(cats.path, head="logreg", folds=2, n_jobs=1, plots=False)
    run = load_run(probe.out_dir)
    assert run.fewshot is None and run.fewshot_dir is None  # today's code joined the flowers curve here
    html = write_report(probe.out_dir).read_text()
    assert "Few-shot" not in html and "rose" not in html

    # A few-shot run on the cats cache itself does join, and the report names the run and the cache.
    fs = featx.fewshot(cats.path, shots="1,2", seeds=2, head="logreg", plot=False)
    run = load_run(probe.out_dir)
    assert run.fewshot_dir is not None and str(run.fewshot_dir) == os.path.dirname(fs.json_path)
    html = write_report(probe.out_dir).read_text()
    assert f"From the few-shot run {run.fewshot_dir.name} on cache {cats.path.name}: the same data (data " \
        f"{cats.identity.data[:12]}" in html
    assert f"data <code>{cats.identity.data[:12]}</code>" in html


@pytest.mark.slow
def test_old_runs_without_identity_still_open_and_never_join(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fc = tiny_embed(write_image_folder(tmp_path / "d", per_class=8), tmp_path / "cache")
    probe = featx.probe(fc.path, head="logreg", folds=2, n_jobs=1, plots=False)
    fs = featx.fewshot(fc.path, shots="1", seeds=2, head="logreg", plot=False)
    for path in (probe.metrics_path, fs.json_path):  # as an older featx wrote them
        doc = json.loads(open(path).read())
        doc.pop("identity", None)
        doc.get("cache", {}).pop("identity", None)
        doc.get("source", {}).pop("identity", None)
        open(path, "w").write(json.dumps(doc))
    run = load_run(probe.out_dir)
    assert run.metrics is not None and run.fewshot is None
    assert "no data identity" in write_report(probe.out_dir).read_text()


@pytest.mark.slow
def test_newest_covers_caches_and_sets_and_the_summary_says_the_real_width(tmp_path, caplog):
    root = write_image_folder(tmp_path / "data", classes=("a", "b"), per_class=8)
    _, cs = embed_backbones(root, backbone="tiny_cnn,tiny_cnn_b", cache_dir=tmp_path / "cache",
                            weights="random", device="cpu", num_workers=0, progress=False, runtime="torch")
    with caplog.at_level(logging.INFO, logger="featx.cache.reader"):
        newest = open_cache(None, cache_dir=tmp_path / "cache")
    assert isinstance(newest, MultiCache) and newest.path == cs.path
    assert cs.path.name in caplog.text and ".h5 " not in caplog.text.split("using the newest cache")[-1]
    res = featx.probe(cache_dir=str(tmp_path / "cache"), head="logreg", folds=2, n_jobs=1, plots=False, save=False,
                      view="final@tiny_cnn+tiny_cnn_b", out_dir=str(tmp_path / "run"))
    width = cs.view_dim("final@tiny_cnn+tiny_cnn_b")
    assert width == sum(m.dim for m in cs.members.values()) > max(m.dim for m in cs.members.values())
    assert f"final@tiny_cnn+tiny_cnn_b: {width}-dim" in res.table
    assert res.heads["logreg"]["view_dim"] == width

    # A plain cache written after the set is the newest: the same rule, whichever kind is newer.
    time.sleep(0.05)
    single = tiny_embed(write_image_folder(tmp_path / "other", per_class=6), tmp_path / "cache")
    assert open_cache(None, cache_dir=tmp_path / "cache").path == single.path
