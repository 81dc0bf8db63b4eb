"""Issue 35, item 4: int8 post-training quantisation (NNCF) of the exported model, its accuracy change, paired.

    .venv/bin/python benchmarks/export_int8.py [--sets flowers12,dtd10,...] [--work /tmp/x35] [--json out.json]

For each shared set: embed it with the default backbone (efficientnet_lite0), probe logreg (reusing
export_equality.py's runs under --work when they are there, else `--view final` to save the view search), then `featx.export_model(..., fmt="openvino",
quantize="int8", max_accuracy_drop=100, verify=0)` (a drop is measured, not refused; the float
graph's equality with `featx predict` is export_equality.py's check): NNCF calibrates on up to
300 training images and the float IR and the int8 IR are compared on every evaluation image.  The table:
accuracy of each, the change in points, the images only one model gets right, the exact McNemar p-value,
top-1 agreement, the largest probability difference, the int8 IR's size, and whether the default
--max-accuracy-drop 1 would refuse it.  No timings: speed is export_bench.py's job, on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETS = "flowers12,dtd10,hymenoptera_data,rsscn7,neu_steel,medmnist6"


def study(data: Path, work: Path) -> dict:
    import featx

    head = work / "runs" / data.name / "all" / "logreg.skops"
    if not head.is_file():
        head = work / "runs" / data.name / "logreg" / "logreg.skops"
        if not head.is_file():
            fc = featx.embed(data, cache_dir=work / "cache", progress=False)
            featx.probe(fc, head="logreg", view="final", out_dir=head.parent, quiet=True, report=False)
    t = time.perf_counter()
    res = featx.export_model(head, work / "int8" / data.name / "model.xml", fmt="openvino", quantize="int8",
                             max_accuracy_drop=100, verify=0, cache_dir=work / "cache")
    row = {"set": data.name, "view": res.view, "int8_mb": round(res.size_mb, 2),
           "seconds": round(time.perf_counter() - t, 1), **res.int8}
    row["refused_at_1pt"] = row["change_pts"] < -1.0
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--sets", default=SETS)
    ap.add_argument("--work", default="/tmp/x35")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    rows = [study(Path(a.data) / name, Path(a.work)) for name in a.sets.split(",")]
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))
    print("\n| set | eval images | float acc | int8 acc | change (pts) | lost / gained | McNemar p | top-1 agree "
          "| max abs dp | int8 IR MB | refused at 1 pt |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['set']} | {r['images']} | {100 * r['float_accuracy']:.1f}% | {100 * r['int8_accuracy']:.1f}% | "
              f"{r['change_pts']:+.1f} | {r['float_only_right']} / {r['int8_only_right']} | {r['mcnemar_p']:.2f} | "
              f"{100 * r['top1_agreement']:.1f}% | {r['max_abs_dp']:.3f} | {r['int8_mb']} | "
              f"{'yes' if r['refused_at_1pt'] else 'no'} |")


if __name__ == "__main__":
    main()
