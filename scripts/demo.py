"""`make demo`: the main job end to end on data that ships with a dependency.

Writes scikit-learn's digits (1,797 8x8 images) as an ImageFolder of PNGs under
``demo_data/digits/{train,val}/<digit>/``, then runs the featx command line on it as a user
would: embed with the offline default backbone, probe every head, and a short fine-tune
comparison (``--strategy head``: a linear layer on the frozen network's features of augmented views).
Each step is a real `featx ...` command, echoed before it runs, with its wall and CPU seconds.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "demo_data" / "digits"
OUT = ROOT / "demo_out"


def write_digits(root: Path) -> None:
    """Digits as 64x64 grey PNGs; every 5th image goes to val (stratified by construction)."""
    from sklearn.datasets import load_digits

    if (root / "val").is_dir():
        return
    d = load_digits()
    for i, (img, label) in enumerate(zip(d.images, d.target)):
        split = "val" if i % 5 == 0 else "train"
        folder = root / split / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        arr = (255 - img * (255 / 16)).astype(np.uint8)  # dark digit on white, like a scan
        Image.fromarray(arr, mode="L").resize((64, 64), Image.Resampling.NEAREST).save(folder / f"{i:04d}.png")


def _child_cpu() -> float:
    """CPU seconds of the finished child processes (0 where the platform has no ``resource``)."""
    try:
        import resource
    except ImportError:
        return 0.0
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run(*args: str) -> float:
    """Run one `featx` command as a user would; returns (and prints) its wall time in seconds.

    The CPU seconds printed beside it (the command and its workers) tell a busy machine from a slow step.
    """
    cmd = [str(Path(sys.executable).with_name("featx")), *args]
    print(f"\n$ featx {shlex.join(args)}", flush=True)
    t0, c0 = time.perf_counter(), _child_cpu()
    subprocess.run(cmd, check=True, cwd=ROOT)
    seconds = time.perf_counter() - t0
    print(f"[{args[0]}: {seconds:.1f} s, {_child_cpu() - c0:.1f} CPU s]", flush=True)
    return seconds


def main() -> None:
    t0 = time.perf_counter()
    write_digits(DATA)
    print(f"wrote scikit-learn's digits as an image folder: {DATA.relative_to(ROOT)}/{{train,val}}/<digit>/*.png")
    rel = str(DATA.relative_to(ROOT))
    stages = {"embed": run("embed", rel)}
    run("info")
    stages["probe"] = run("probe", "--head", "all", "--out-dir", str((OUT / "probe").relative_to(ROOT)))
    # The fine-tune against the probe, kept to seconds on a 2-core CPU: 300 images per split and
    # the `head` strategy: a new linear layer trained on the frozen backbone's features of
    # augmented views (random crop + flip), each epoch's view embedded once, 4 epochs at a higher
    # peak LR; the probe's logreg head only (every head was shown by the step above). Same rows
    # for both. `--strategy partial` (the last blocks train too) takes minutes here.
    print("\nfine-tune: --strategy head trains a new linear layer on the frozen network's features of augmented "
          "views (each epoch's view embedded once); --strategy partial/full train the network itself, in minutes "
          "on a CPU", flush=True)
    stages["compare"] = run(
        "compare", rel, "--finetune", "--strategy", "head", "--epochs", "4", "--batch-size", "16", "--lr", "0.03",
        "--head", "logreg", "--limit", "300", "--out-dir", str((OUT / "compare").relative_to(ROOT)),
    )
    times = ", ".join(f"{k} {v:.0f} s" for k, v in stages.items())
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s ({times}): reports under {OUT.relative_to(ROOT)}/, "
          "cache under cache/")
    for name in ("probe", "compare"):
        page = OUT / name / "report.html"
        if page.is_file():
            print(f"open {page.relative_to(ROOT)} in a browser: the {name} report (mistakes, confusion, map)")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
