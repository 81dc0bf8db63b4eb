"""Backbone cards: a warm OpenVINO run starts without building (or importing) the torch network."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from featx.base.errors import FeatxError
from featx.embedding.backbones import create_backbone
from featx.embedding.runner import embed
from featx.embedding.runtimes import cards
from featx.embedding.runtimes import forward as runtimes

from conftest import TINY_KW

needs_openvino = pytest.mark.skipif(not runtimes.openvino_available(), reason="openvino is not installed")
pytestmark = pytest.mark.usefixtures("fresh_openvino")




def _no_build(*_a, **_k):
    raise AssertionError("built the torch network although its card is kept")


@needs_openvino
@pytest.mark.slow
def test_second_openvino_run_uses_the_card_and_gives_the_same_cache(image_folder, tmp_path, monkeypatch):
    kw = dict(TINY_KW, batch_size=5, device="cpu", runtime="openvino")
    first = embed(image_folder, cache_dir=tmp_path / "a", **kw)
    assert list((tmp_path / "ov-cache-compiled" / "cards").glob("backbone-*.json"))
    monkeypatch.setattr(runtimes, "_COMPILED", {})
    monkeypatch.setattr(cards, "create_backbone", _no_build)
    second = embed(image_folder, cache_dir=tmp_path / "b", **kw)
    assert second.meta["fingerprint"] == first.meta["fingerprint"] and second.keys() == first.keys()
    np.testing.assert_array_equal(second.features(), first.features())
    # torch needs the network: no card is used (and the build is what the patched factory refuses)
    with pytest.raises(AssertionError, match="built the torch network"):
        embed(image_folder, cache_dir=tmp_path / "c", **{**kw, "runtime": "torch"})


def test_card_key_follows_what_the_backbone_is_built_from(tmp_path):
    w = tmp_path / "w.pt"
    w.write_bytes(b"one")
    k = cards.card_key("resnet18", str(w), "final", "none")
    assert k == cards.card_key("resnet18", str(w), "final", "none")
    assert k != cards.card_key("resnet18", str(w), "final,stages", "none")
    assert k != cards.card_key("resnet50", str(w), "final", "none")
    w.write_bytes(b"other")  # another size (and mtime): another card
    assert k != cards.card_key("resnet18", str(w), "final", "none")
    assert cards.card_key("resnet18", str(tmp_path / "missing.pt"), "final", "none") is None
    assert cards.card_key("not_registered", None, "final", "none") is None


def test_no_card_for_a_builder_registered_outside_featx(monkeypatch):
    from featx.embedding.networks.registry import REGISTRY

    monkeypatch.setitem(REGISTRY._builders, "mine", lambda w: create_backbone("tiny_cnn", weights="random"))
    assert cards.card_key("mine", "random", "final", "none") is None
    assert cards.card_key("tiny_cnn", "random", "final", "none") is not None


@pytest.mark.slow
def test_lazy_backbone_builds_on_use_and_refuses_a_wrong_card():
    bb = create_backbone("tiny_cnn", weights="random", views="final,stages")
    card = cards.to_card(bb)
    card["preprocess"] = bb.preprocess
    lazy = cards.LazyBackbone(card, lambda: create_backbone("tiny_cnn", weights="random", views="final,stages"))
    assert lazy.fingerprint() == bb.fingerprint() and lazy.layout == bb.layout and lazy.out_dim == bb.out_dim
    assert lazy.model_type == bb.model_type == "ViewNet"
    x = torch.zeros(2, 3, bb.preprocess.crop, bb.preprocess.crop)
    with torch.inference_mode():
        assert torch.equal(lazy.model(x), bb.model(x))
    wrong = cards.LazyBackbone({**card, "weights_sha256": "other"}, lambda: create_backbone("tiny_cnn", weights="random",
                                                                                            views="final,stages"))
    with pytest.raises(FeatxError, match="not the one its card describes"):
        _ = wrong.model
