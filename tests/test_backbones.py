"""Backbone registry: every entry builds with the right feature size; weights are checked."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from featx.embedding.backbones import create_backbone, efficientnet_lite0_imagenet, list_backbones
from featx.errors import FeatxError

EXPECTED_DIMS = {
    "efficientnet_lite0": 1280,
    "resnet18": 512,
    "resnet50": 2048,
    "efficientnet_b0": 1280,
    "convnext_tiny": 768,
    "mobilenet_v3_large": 960,
    "tiny_cnn": 32,
    "timm:resnet18": 512,
}


@pytest.mark.parametrize("name", sorted(EXPECTED_DIMS))
@pytest.mark.slow
def test_each_backbone_builds_with_its_feature_dim(name):
    bb = create_backbone(name, weights="random")
    assert bb.dim == EXPECTED_DIMS[name]
    x = torch.randn(2, 3, bb.preprocess.crop, bb.preprocess.crop)
    with torch.inference_mode():
        y = bb.model(x)
    assert tuple(y.shape) == (2, bb.dim)
    assert torch.isfinite(y).all()
    assert not any(p.requires_grad for p in bb.model.parameters())


def test_registry_lists_the_documented_backbones():
    names = set(list_backbones())
    assert {"efficientnet_lite0", "resnet18", "resnet50", "efficientnet_b0", "convnext_tiny", "mobilenet_v3_large"} <= names


def test_random_weights_are_reproducible():
    a = create_backbone("tiny_cnn", weights="random")
    b = create_backbone("tiny_cnn", weights="random")
    assert a.weights_sha256 == b.weights_sha256


def test_unknown_backbone_suggests_close_matches():
    with pytest.raises(FeatxError) as ei:
        create_backbone("resnet_18")
    msg = str(ei.value)
    assert "resnet18" in msg and "Valid:" in msg


def test_unknown_timm_model_is_a_clear_error():
    with pytest.raises(FeatxError, match="unknown timm model"):
        create_backbone("timm:resnet_eighteen", weights="random")


@pytest.mark.slow
def test_weights_file_that_does_not_fit_is_refused(tmp_path):
    other = create_backbone("resnet18", weights="random")
    f = tmp_path / "resnet18.pth"
    torch.save(other.model.state_dict(), f)
    with pytest.raises(FeatxError, match="do not fit backbone 'tiny_cnn'"):
        create_backbone("tiny_cnn", weights=str(f))
    with pytest.raises(FeatxError, match="do not fit backbone 'efficientnet_lite0'"):
        create_backbone("efficientnet_lite0", weights=str(f))


def test_local_weights_file_loads_and_is_fingerprinted(tmp_path):
    src = create_backbone("tiny_cnn", weights="random")
    sd = {k: v + 0.5 if v.is_floating_point() else v for k, v in src.model.state_dict().items()}
    f = tmp_path / "tiny.pth"
    torch.save(sd, f)
    bb = create_backbone("tiny_cnn", weights=str(f))
    assert bb.weights_source == str(f)
    assert bb.weights_sha256 != src.weights_sha256
    for k, v in bb.model.state_dict().items():
        assert torch.equal(v, sd[k])


def test_missing_weights_file_names_the_option(tmp_path):
    with pytest.raises(FeatxError, match="--weights"):
        create_backbone("resnet18", weights=str(tmp_path / "nope.pth"))


def test_offline_without_cached_weights_names_both_ways_out(monkeypatch):
    import torchvision.models

    def no_network(*a, **k):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(torchvision.models, "get_model", no_network)
    with pytest.raises(FeatxError) as ei:
        create_backbone("resnet18")
    msg = str(ei.value)
    assert "--weights" in msg and "efficientnet_lite0" in msg


def test_preprocessing_comes_from_the_backbone():
    lite = create_backbone("efficientnet_lite0", weights="random").preprocess
    r18 = create_backbone("resnet18", weights="random").preprocess
    assert lite.mean == (0.5, 0.5, 0.5) and lite.std == (0.5, 0.5, 0.5)
    assert r18.mean != lite.mean
    assert lite.describe() != r18.describe()


@pytest.mark.slow
def test_offline_default_weights_recognise_ants_and_bees(hymenoptera):
    """The shipped ImageNet weights must classify real ant/bee photos as ImageNet ant (310) / bee (309)."""
    from featx.data import load_image

    model, source, sha = efficientnet_lite0_imagenet()
    assert sha and source.endswith(".pth")
    pre = create_backbone("efficientnet_lite0").preprocess
    tf = pre.pil_transform()
    files = [(p, 310) for p in sorted((hymenoptera / "val" / "ants").glob("*.jpg"))[:12]]
    files += [(p, 309) for p in sorted((hymenoptera / "val" / "bees").glob("*.jpg"))[:12]]
    x = torch.stack([tf(load_image(p)) for p, _ in files])
    with torch.inference_mode():
        pred = model.eval()(x).argmax(1).numpy()
    truth = np.array([t for _, t in files])
    acc = float((pred == truth).mean())
    # Chance among 1000 classes is 0.1%; the right mapping gets about 79%.
    assert acc >= 0.5, f"only {acc:.0%} of ant/bee photos recognised: weights mapped wrongly?"
