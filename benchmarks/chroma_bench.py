"""How far the GPU engine's features may move from the CPU's on 4:2:0 JPEGs, estimated on the CPU.

nvJPEG upsamples 4:2:0 chroma by nearest neighbour where libjpeg-turbo (Pillow, torchvision on the
CPU) uses its "fancy" triangle filter, and the GPU runs the network in bf16.  Without a GPU this
emulates both: the chroma planes of the CPU decode are brought back to half resolution (2x2 mean)
and upsampled by nearest neighbour; bf16 is CPU autocast.  Prints cosine min/mean against the fp32
features of the plain CPU decode.  ``benchmarks/gpu_smoke.sh`` measures the real thing on a GPU.

    python benchmarks/chroma_bench.py --dataset ../shared/data/flowers12 --images 240
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, print_table  # noqa: E402

# JFIF (full-range BT.601), as libjpeg.
_TO_YCC = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])


def nearest_chroma(rgb: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> the same image with its chroma at half resolution, nearest-neighbour upsampled."""
    h, w, _ = rgb.shape
    ycc = rgb.astype(np.float64) @ _TO_YCC.T
    ycc[..., 1:] += 128
    he, we = h + h % 2, w + w % 2
    c = np.pad(ycc[..., 1:], ((0, he - h), (0, we - w), (0, 0)), mode="edge")
    half = c.reshape(he // 2, 2, we // 2, 2, 2).mean((1, 3))
    ycc[..., 1:] = half.repeat(2, 0).repeat(2, 1)[:h, :w]
    ycc[..., 1:] -= 128
    out = ycc @ np.linalg.inv(_TO_YCC).T
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _is_420(path: Path) -> bool:
    from PIL import Image, JpegImagePlugin

    with Image.open(path) as im:
        return im.format == "JPEG" and JpegImagePlugin.get_sampling(im) == 2


def main() -> None:
    import torch
    import torchvision.io as tvio

    from featx.embedding.backbones import create_backbone
    from featx.embedding.engines.tensor_images import TensorPreprocess

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", required=True, help="a folder of JPEGs (searched recursively)")
    ap.add_argument("--images", type=int, default=240)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    a = ap.parse_args()
    paths = sorted(p for p in Path(a.dataset).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    paths = paths[:: max(1, len(paths) // a.images)][: a.images]
    n420 = sum(_is_420(p) for p in paths)
    bb = create_backbone(a.backbone)
    tp = TensorPreprocess(bb.preprocess, "cpu")
    model = bb.model.eval()
    ref, nn = [], []
    for p in paths:
        img = tvio.decode_jpeg(tvio.read_file(str(p)), mode=tvio.ImageReadMode.RGB)
        ref.append(img)
        nn.append(torch.from_numpy(nearest_chroma(img.permute(1, 2, 0).numpy())).permute(2, 0, 1).contiguous())

    def feats(imgs, bf16: bool) -> np.ndarray:
        out = []
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            for k in range(0, len(imgs), 32):
                out.append(model(tp(imgs[k : k + 32])).float().numpy())
        return np.concatenate(out).astype(np.float64)

    base = feats(ref, False)
    rows = []
    for name, imgs, bf16 in (("nearest chroma", nn, False), ("bf16", ref, True), ("both", nn, True)):
        f = feats(imgs, bf16)
        cos = (f * base).sum(1) / (np.linalg.norm(f, axis=1) * np.linalg.norm(base, axis=1))
        rows.append({"emulated": name, "images": len(paths), "4:2:0": n420, "cosine min": f"{cos.min():.5f}",
                     "cosine mean": f"{cos.mean():.5f}", "below 0.99": int((cos < 0.99).sum())})
    print_table(rows, list(rows[0]))
    print(machine())


if __name__ == "__main__":
    main()
