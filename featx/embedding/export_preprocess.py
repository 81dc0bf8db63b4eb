"""``preprocess.py``, written beside an exported model: featx's evaluation resize and centre crop in numpy + Pillow.

The same arithmetic as :func:`featx.embedding.networks.eval_ops.resize_uint8` (torch's antialiased uint8
kernel: float filter weights rounded to int16 at a precision chosen from the largest weight, a horizontal
then a vertical pass, each rounded to uint8) and :func:`~featx.embedding.networks.eval_ops.center_crop`,
so the file gives the graph bit-identical input (checked in tests/test_export_model.py and on the shared sets).
The sums run in float64 through BLAS: every term is an integer below 2**23 and a row has at most a few thousand,
so each sum is an exact integer far below 2**53, the same as the int64 sum, many times faster.
"""

from __future__ import annotations

TEMPLATE = '''"""featx's resize + centre crop for model.onnx: PIL image -> uint8 [1, H, W, 3] (numpy + Pillow only)."""
import numpy as np
from PIL import Image
RESIZE, CROP, INTERPOLATION = {resize}, {crop}, "{interpolation}"

def _weights(n_in, n_out):
    s = n_in / n_out
    support, c, j = (2.0 if INTERPOLATION == "bicubic" else 1.0) * max(s, 1.0), (np.arange(n_out)[:, None] + 0.5) * s, np.arange(n_in)
    x = np.abs((j[None, :] - c + 0.5) / max(s, 1.0))
    w = (np.where(x < 1, (1.5 * x - 2.5) * x * x + 1, np.where(x < 2, ((-0.5 * x + 2.5) * x - 4) * x + 2, 0))
         if INTERPOLATION == "bicubic" else np.maximum(0.0, 1 - x))
    w = np.where((j >= np.maximum((c - support + 0.5).astype(int), 0)) & (j < (c + support + 0.5).astype(int)), w, 0.0)
    w /= w.sum(1, keepdims=True)
    p = next((p for p in range(22) if int(0.5 + w.max() * (1 << (p + 1))) >= 1 << 15), 22)
    return (w * (1 << p) + np.where(w < 0, -0.5, 0.5)).astype(np.int16).astype(np.int64), p

def _resample(a, n_out, axis):
    w, p = _weights(a.shape[axis], n_out)
    out = (np.tensordot(w.astype(float), np.moveaxis(a, axis, 0).astype(float), axes=1).astype(np.int64) + (1 << (p - 1))) >> p
    return np.moveaxis(np.clip(out, 0, 255).astype(np.uint8), 0, axis)

def preprocess(image: Image.Image) -> np.ndarray:
    a = np.asarray(image.convert("RGB"), dtype=np.uint8)
    h, w = a.shape[:2]
    nh, nw = (int(RESIZE * h / w), RESIZE) if w <= h else (RESIZE, int(RESIZE * w / h))
    a = _resample(_resample(a, nw, 1), nh, 0) if (nh, nw) != (h, w) else a
    ph, pw = max(CROP - nh, 0), max(CROP - nw, 0)
    a = np.pad(a, ((ph // 2, (ph + 1) // 2), (pw // 2, (pw + 1) // 2), (0, 0)))
    top, left = int(round((a.shape[0] - CROP) / 2.0)), int(round((a.shape[1] - CROP) / 2.0))
    return np.ascontiguousarray(a[None, top:top + CROP, left:left + CROP])
'''


def preprocess_source(pre) -> str:
    """The text of ``preprocess.py`` for a backbone's :class:`~featx.embedding.networks.registry.Preprocess`."""
    return TEMPLATE.format(resize=int(pre.resize), crop=int(pre.crop), interpolation=str(pre.interpolation))
