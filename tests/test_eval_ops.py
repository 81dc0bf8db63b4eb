"""The torchvision-free evaluation preprocessing gives torchvision v2's tensors bit for bit."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from featx.embedding.backbones import Preprocess
from featx.embedding.networks.eval_ops import center_crop, resized_size

T = pytest.importorskip("torchvision.transforms.v2")


def _torchvision(pre: Preprocess):
    interp = T.InterpolationMode.BICUBIC if pre.interpolation == "bicubic" else T.InterpolationMode.BILINEAR
    return T.Compose([T.PILToTensor(), T.Resize(pre.resize, interpolation=interp, antialias=True),
                      T.CenterCrop(pre.crop), T.ToDtype(torch.float32, scale=True), T.Normalize(pre.mean, pre.std)])


def _photo(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = (np.sin(xx / 7.0) + np.cos(yy / 5.0))[..., None] * 60 + 128
    arr = np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


@pytest.mark.parametrize("interp", ["bicubic", "bilinear"])
@pytest.mark.parametrize("size", [(224, 224), (500, 375), (375, 500), (64, 64), (256, 300), (1001, 97), (30, 20)])
def test_eval_transform_equals_torchvision(interp, size):
    pre = Preprocess(resize=256, crop=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                     interpolation=interp)
    img = _photo(*size, seed=size[0] * 7 + size[1])
    want = _torchvision(pre)(img)
    got = pre.pil_transform()(img)
    assert got.dtype == want.dtype == torch.float32 and got.shape == want.shape == (3, 224, 224)
    assert torch.equal(got, want)
    u8 = pre.uint8_transform()(img)
    assert u8.dtype == torch.uint8 and torch.equal(pre.normalize(torch.stack([u8]))[0], want)


def test_resize_rule_and_crop_padding():
    assert resized_size(375, 500, 256) == (256, 341)
    assert resized_size(500, 375, 256) == (341, 256)
    x = torch.ones(3, 10, 30, dtype=torch.uint8)
    y = center_crop(x, 16)
    assert y.shape == (3, 16, 16) and int(y.sum()) == 3 * 10 * 16  # 3 zero rows above, 3 below


@pytest.mark.slow
def test_embedding_path_does_not_import_torchvision():
    """Start-up: torchvision imports torch._dynamo (about a second on a small CPU)."""
    code = ("import sys; from featx.embedding.backbones import Preprocess; "
            "from PIL import Image; p = Preprocess(256, 224, (0.5,) * 3, (0.5,) * 3, 'bicubic'); "
            "p.pil_transform()(Image.new('RGB', (300, 200))); import featx.embedding.runner; "
            "print('torchvision' in sys.modules, 'torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
