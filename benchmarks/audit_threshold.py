"""Measure the near-duplicate threshold of ``featx audit`` (README, ACCURACY.md).

    python benchmarks/audit_threshold.py --data ../shared/data --cache-dir /tmp/audit/cache --work /tmp/audit/thr

For every shared data set: ``--per-set`` training images are copied three ways (as they are,
re-encoded as JPEG quality 80, resized to 90 %) into one folder, embedded with the default
backbone, and the cosine similarity of the final features of each copy to its original is
measured.  Against that: in the data set's own cache, the similarity of every image to its most
similar *other* image of the same class (distinct photos; the few true duplicates a set holds
are the top of this list).  Prints one table row per data set.
"""

from __future__ import annotations

import argparse
import glob
from pathlib import Path

import numpy as np
from PIL import Image

import featx
from featx.audit.finders import nearest_in_class

EXTS = {".jpg", ".jpeg", ".png"}


def _variants(src: Path, work: Path, per_set: int, seed: int) -> list[tuple[str, str]]:
    files = sorted(p for p in (src / "train").rglob("*") if p.suffix.lower() in EXTS)
    rng = np.random.default_rng(seed)
    pairs = []
    for i in rng.choice(len(files), size=min(per_set, len(files)), replace=False):
        p = files[int(i)]
        stem = f"{src.name}_{p.parent.name}_{p.stem}"
        d = work / "train" / src.name
        d.mkdir(parents=True, exist_ok=True)
        with Image.open(p) as im:
            im = im.convert("RGB")
            im.save(d / f"{stem}__orig.png")
            im.save(d / f"{stem}__q80.jpg", "JPEG", quality=80)
            w, h = im.size
            im.resize((round(0.9 * w), round(0.9 * h)), Image.Resampling.BICUBIC).save(d / f"{stem}__r90.jpg", "JPEG",
                                                                                        quality=95)
        pairs.append((f"{stem}__orig", src.name))
    return pairs


def _copy_sims(fc) -> dict[str, np.ndarray]:
    keys = fc.keys()
    X = fc.features()
    X = X / np.linalg.norm(X, axis=1, keepdims=True)
    pos = {Path(k).stem: i for i, k in enumerate(keys)}
    out: dict[str, list] = {}
    for k in keys:
        stem = Path(k).stem
        if not stem.endswith("__orig"):
            continue
        base, name = stem[: -len("__orig")], Path(k).parent.name
        for v in ("q80", "r90"):
            out.setdefault((name, v), []).append(float(X[pos[stem]] @ X[pos[f"{base}__{v}"]]))
    return {k: np.asarray(v) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--cache-dir", type=Path, default=Path("/tmp/audit/cache"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/audit/thr"))
    ap.add_argument("--per-set", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    sets = sorted(p for p in a.data.iterdir() if (p / "train").is_dir())
    if not (a.work / "train").is_dir():
        for s in sets:
            _variants(s, a.work, a.per_set, a.seed)
    fc = featx.embed(str(a.work), cache_dir=str(a.cache_dir), views="final", progress=False)
    copies = _copy_sims(fc)
    print("| data set | q80 copy: min / median | 90 % resize: min / median | copies >= 0.90 / 0.95 / 0.97 | "
          "distinct same-class nearest: median / 99th pct / max | images whose nearest is >= 0.90 / 0.95 / 0.97 |")
    print("|---|---|---|---|---|---|")
    for s in sets:
        found = [p for p in glob.glob(str(a.cache_dir / f"{s.name}-*.h5"))]
        q, r = copies[(s.name, "q80")], copies[(s.name, "r90")]
        near = ""
        if found:
            c = featx.FeatureCache(found[0])
            X, y = c.features(), c.labels()
            sim = nearest_in_class(X, y, np.arange(len(y)), k=1)
            near = (f"{np.median(sim):.3f} / {np.percentile(sim, 99):.3f} / {sim.max():.3f} | "
                    f"{int((sim >= .90).sum())} / {int((sim >= .95).sum())} / {int((sim >= .97).sum())} of {len(sim)}")
        both = np.concatenate([q, r])
        kept = " / ".join(f"{int((both >= t).sum())}" for t in (0.90, 0.95, 0.97)) + f" of {len(both)}"
        print(f"| {s.name} | {q.min():.3f} / {np.median(q):.3f} | {r.min():.3f} / {np.median(r):.3f} | {kept} | {near} |")


if __name__ == "__main__":
    main()
