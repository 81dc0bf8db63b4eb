"""Make a copy of a shared data set with known problems, for measuring ``featx audit`` (ACCURACY.md).

    python benchmarks/audit_plant.py ../shared/data/flowers12 /tmp/audit/flowers12 --flip 0.05 --plant 10

The copy (hard links where possible, so it costs no disk) gets:
  * ``--flip``: that share of the training images moved to another (seeded, random) class folder;
  * ``--plant``: that many test images copied into train/<their class>/, half re-encoded as JPEG
    quality 80, half resized to 90 % (JPEG quality 95).
``truth.json`` beside the copy lists every flipped and planted path (relative to the copy), so
``benchmarks/audit_measure.py`` can score the audit.  The original folder is never written.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def _images(root: Path, split: str) -> list[Path]:
    return sorted(p for p in (root / split).rglob("*") if p.is_file() and p.suffix.lower() in EXTS)


def _copy_tree(src: Path, dst: Path) -> None:
    def link(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, dst, copy_function=link)


def _flip(dst: Path, share: float, rng: np.random.Generator) -> list[dict]:
    train = _images(dst, "train")
    classes = sorted(p.name for p in (dst / "train").iterdir() if p.is_dir())
    n = int(round(share * len(train)))
    out = []
    for i in rng.choice(len(train), size=n, replace=False):
        p = train[int(i)]
        given = p.parent.name
        new = str(rng.choice([c for c in classes if c != given]))
        target = dst / "train" / new / f"flip_{given}_{p.name}"
        p.rename(target)
        out.append({"path": str(target.relative_to(dst)), "true": given, "given": new})
    return out


def _plant(dst: Path, n: int, rng: np.random.Generator) -> list[dict]:
    test = _images(dst, "test")
    out = []
    for j, i in enumerate(rng.choice(len(test), size=n, replace=False)):
        p = test[int(i)]
        kind = "jpeg_q80" if j < n // 2 else "resize_90"
        target = dst / "train" / p.parent.name / f"planted_{kind}_{p.stem}.jpg"
        with Image.open(p) as im:
            im = im.convert("RGB")
            if kind == "jpeg_q80":
                im.save(target, "JPEG", quality=80)
            else:
                w, h = im.size
                im.resize((max(1, round(0.9 * w)), max(1, round(0.9 * h))), Image.Resampling.BICUBIC).save(
                    target, "JPEG", quality=95)
        out.append({"path": str(target.relative_to(dst)), "source": str(p.relative_to(dst)), "kind": kind})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("--flip", type=float, default=0.05)
    ap.add_argument("--plant", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if a.dst.exists():
        raise SystemExit(f"{a.dst} exists; remove it or choose another folder")
    _copy_tree(a.src, a.dst)
    rng = np.random.default_rng(a.seed)
    truth = {"source": str(a.src), "seed": a.seed, "flipped": _flip(a.dst, a.flip, rng),
             "planted": _plant(a.dst, a.plant, rng)}
    (a.dst.parent / f"{a.dst.name}.truth.json").write_text(json.dumps(truth, indent=1))
    print(f"{a.dst}: {len(truth['flipped'])} labels flipped, {len(truth['planted'])} test images planted in train")


if __name__ == "__main__":
    main()
