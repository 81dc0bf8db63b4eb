"""The evaluation preprocessing in plain torch, without importing torchvision.

``import torchvision`` imports ``torch._dynamo`` (through ``torchvision.ops``): about a second
of start-up on a small CPU, more than the network needs for a few hundred images. These ops
give bit-identical tensors to the torchvision v2 pipeline they replace (``PILToTensor``,
``Resize(short side, antialias=True)``, ``CenterCrop``, ``ToDtype(float32, scale=True)``,
``Normalize``; checked in tests/test_eval_ops.py), split in two halves:

- :class:`Uint8Transform`: PIL image -> uint8 ``[3, crop, crop]`` (decode workers; a quarter of
  the bytes of a float image to pass between processes);
- :func:`normalize`: uint8 batch -> normalised float32 batch (the torch runtime; the OpenVINO
  runtime does this step inside its compiled network instead).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def pil_to_uint8(img) -> torch.Tensor:
    """PIL RGB -> uint8 ``[3, H, W]`` with channels-last strides (as torchvision's pil_to_tensor)."""
    arr = np.array(img, copy=True)
    t = torch.as_tensor(arr).view(img.size[1], img.size[0], len(img.getbands()))
    return t.permute((2, 0, 1))


def resized_size(h: int, w: int, size: int) -> tuple[int, int]:
    """Short side to ``size``, long side scaled and truncated (torchvision's rule)."""
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    return (new_long, new_short) if w <= h else (new_short, new_long)


def resize_uint8(img: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """Antialiased resize of a uint8 ``[C, H, W]`` image, short side to ``size``."""
    c, h, w = img.shape
    nh, nw = resized_size(h, w, size)
    if (nh, nw) == (h, w) or img.numel() == 0:
        return img
    x = img.reshape(-1, c, h, w)
    strides = x.stride()
    if x.is_contiguous(memory_format=torch.channels_last) and x.numel() != strides[0]:
        # torchvision's restriding: keeps the output channels_last (and the uint8 kernel's path)
        x = x.as_strided((1, c, h, w), (x.numel(),) + tuple(strides[1:]))
    native = mode == "bicubic" or torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    if not native:
        x = x.to(torch.float32)
    y = torch.nn.functional.interpolate(x, size=[nh, nw], mode=mode, align_corners=False, antialias=True)
    if not native:
        y = y.round_().to(torch.uint8)
    return y.reshape(c, nh, nw)


def center_crop(img: torch.Tensor, crop: int) -> torch.Tensor:
    """Centre ``crop x crop`` window, zero-padded where the image is smaller (torchvision's rule)."""
    h, w = img.shape[-2:]
    if crop > h or crop > w:
        pad = [(crop - w) // 2 if crop > w else 0, (crop - w + 1) // 2 if crop > w else 0,
               (crop - h) // 2 if crop > h else 0, (crop - h + 1) // 2 if crop > h else 0]
        img = torch.nn.functional.pad(img, pad, value=0.0)
        h, w = img.shape[-2:]
        if (h, w) == (crop, crop):
            return img
    top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
    return img[..., top : top + crop, left : left + crop]


@dataclass(frozen=True)
class Uint8Transform:
    """PIL RGB image -> uint8 ``[3, crop, crop]``: resize the short side, centre crop."""

    resize: int
    crop: int
    interpolation: str = "bilinear"

    def __call__(self, img) -> torch.Tensor:
        return center_crop(resize_uint8(pil_to_uint8(img), self.resize, self.interpolation), self.crop)


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 ``[..., 3, H, W]`` -> float32 ``(x / 255 - mean) / std`` (float input: taken as already in [0, 1])."""
    if x.dtype == torch.uint8:
        x = x.to(torch.float32).mul_(1.0 / 255)
    m = torch.as_tensor(mean, dtype=x.dtype).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype).view(-1, 1, 1)
    return x.sub(m).div_(s)


@dataclass(frozen=True)
class EvalTransform:
    """PIL RGB image -> normalised float32 ``[3, crop, crop]`` (``Preprocess.pil_transform``)."""

    uint8: Uint8Transform
    mean: tuple
    std: tuple

    def __call__(self, img) -> torch.Tensor:
        return normalize(self.uint8(img), self.mean, self.std)
