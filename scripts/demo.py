"""`make demo`: the main job end to end on data that ships with a dependency.

Writes the first 900 of scikit-learn's digits (8x8 images) as an ImageFolder of PNGs under
``demo_data/digits/{train,val}/<digit>/``, then runs the featx command line on it as a user
would: embed with the offline default backbone (plus one augmented view of each training image),
probe every head, and a short fine-tune comparison (``--strategy head``: only a new linear layer
trains, on the cached augmented views; the network stays frozen, so no image passes through it
again).  Each step is a real `featx ...` command, echoed before it runs, with its wall and CPU
seconds.  After the set-up it takes about a minute on 2 cores (BENCHMARKS.md).
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
N_DIGITS = 500  # of 1,797: 50 per class, so the demo runs in about a minute on 2 cores (accuracy ~85-90 %)


def write_digits(root: Path) -> None:
    """The first N_DIGITS digits as 64x64 grey PNGs; every 5th image goes to val (about stratified: the digits
    cycle 0-9)."""
    from sklearn.datasets import load_digits

    if (root / "val").is_dir():
        return
    d = load_digits()
    for i, (img, label) in enumerate(zip(d.images[:N_DIGITS], d.target[:N_DIGITS])):
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
    stages = {"embed": run("embed", rel, "--train-views", "1")}
    run("info")
    # --train-views off: the probe trains on the plain rows (trying the augmented view too would double its
    # time here); the cache's augmented view is for the fine-tune below.
    stages["probe"] = run("probe", "--head", "all", "--train-views", "off", "--out-dir", str((OUT / "probe").relative_to(ROOT)))
    # The fine-tune against the probe, kept to seconds on a 2-core CPU: the `head` strategy trains a new
    # linear layer on the cache's augmented view of each training image (`embed --train-views 1` above), so
    # the network never runs again; the probe's logreg head only (every head was shown by the step above).
    # Same rows for both. `--strategy partial` / `full` (the network trains too) take minutes here.
    print("\nfine-tune: --strategy head is not end to end: only a new linear layer trains (about 13 k of 3.4 M "
          "parameters), a few epochs on the cached augmented view of each training image, without the probe's CV "
          "over C; expect it below the probe. --strategy partial/full train the network itself, in minutes on a CPU",
          flush=True)
    stages["compare"] = run(
        "compare", rel, "--finetune", "--strategy", "head", "--epochs", "6", "--batch-size", "32", "--lr", "0.03",
        "--head", "logreg", "--train-views", "off", "--out-dir", str((OUT / "compare").relative_to(ROOT)),
    )
    times = ", ".join(f"{k} {v:.0f} s" for k, v in stages.items())
    load = f", load average {os.getloadavg()[1]:.1f} over 5 min" if hasattr(os, "getloadavg") else ""
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s, {_child_cpu():.0f} CPU s{load} ({times}): reports "
          f"under {OUT.relative_to(ROOT)}/, cache under cache/")
    for name in ("probe", "compare"):
        page = OUT / name / "report.html"
        if page.is_file():
            print(f"open {page.relative_to(ROOT)} in a browser: the {name} report (heads, confusion, mistakes, map)")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
