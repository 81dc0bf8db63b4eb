"""Score ``featx audit`` on a copy made by ``benchmarks/audit_plant.py`` (ACCURACY.md).

    python benchmarks/audit_measure.py /tmp/audit/flowers12x --cache-dir /tmp/audit/cache --out /tmp/audit/runs

Embeds the copy (``--views final``; reused when cached), runs ``featx probe --audit
--drop-flagged leakage,labels`` with the given heads, and prints: recall of the flipped
labels in the top 2 x flipped rows of label_issues.csv and precision in the top "flipped"
rows (over all rows, and over the training rows only), how many planted copies are found as
cross-split pairs of duplicates.csv (with their similarity), the accuracy with and without
--drop-flagged, and the audit's seconds per stage.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import featx
from featx.config.settings import AuditSettings
from featx.runs.audit_probe import probe_audited


def _csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _label_scores(rows: list[dict], flipped: set[str]) -> dict:
    n = len(flipped)
    out = {}
    for name, rs in (("all rows", rows), ("training rows", [r for r in rows if r["split"] == "train"])):
        top2, top1 = [r["path"] for r in rs[: 2 * n]], [r["path"] for r in rs[:n]]
        out[name] = {"recall@2n": sum(p in flipped for p in top2) / n, "precision@n": sum(p in flipped for p in top1) / n,
                     "flagged": len(rs), "flipped_flagged": sum(r["path"] in flipped for r in rs)}
    return out


def _planted(rows: list[dict], planted: list[dict]) -> list[dict]:
    out = []
    for p in planted:
        hit = [r for r in rows if {r["path_a"], r["path_b"]} == {p["path"], p["source"]} and r["split_a"] != r["split_b"]]
        out.append({"path": p["path"], "kind": p["kind"], "found": bool(hit),
                    "similarity": float(hit[0]["similarity"]) if hit else None,
                    "pair_kind": hit[0]["kind"] if hit else None})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("copy", type=Path)
    ap.add_argument("--cache-dir", type=Path, default=Path("/tmp/audit/cache"))
    ap.add_argument("--out", type=Path, default=Path("/tmp/audit/runs"))
    ap.add_argument("--head", default="logreg,svm")
    a = ap.parse_args()
    truth = json.loads((a.copy.parent / f"{a.copy.name}.truth.json").read_text())
    fc = featx.embed(str(a.copy), cache_dir=str(a.cache_dir), views="final", progress=False)
    out = a.out / f"measure-{a.copy.name}"
    t0 = time.perf_counter()
    res = probe_audited(fc, {"head": a.head, "out_dir": str(out), "device": "cpu", "n_jobs": 1, "save": False},
                        audit_settings=AuditSettings(), drop_flagged="leakage,labels", report=True)
    wall = time.perf_counter() - t0
    flipped = {f["path"] for f in truth["flipped"]}
    labels = _label_scores(_csv(out / "label_issues.csv"), flipped)
    planted = _planted(_csv(out / "duplicates.csv"), truth["planted"])
    print(f"## {a.copy.name}: {len(flipped)} labels flipped, {len(planted)} planted copies")
    for name, s in labels.items():
        print(f"label issues ({name}): recall in top {2 * len(flipped)} = {s['recall@2n']:.3f}, precision in top "
              f"{len(flipped)} = {s['precision@n']:.3f}; {s['flipped_flagged']} of {len(flipped)} flipped among "
              f"{s['flagged']} flagged")
    found = sum(p["found"] for p in planted)
    print(f"planted copies found as cross-split pairs: {found} of {len(planted)}")
    for p in planted:
        print(f"  {p['kind']:<9} {p['path']}: {p['pair_kind'] or 'NOT FOUND'} {p['similarity'] or ''}")
    print(res["drop_flagged"]["table"])
    aud = res["audit"]
    print(f"audit counts: {json.dumps(aud['counts'])}")
    print(f"audit seconds: {json.dumps(aud['seconds'])}; probe + audit + second probe + report: {wall:.1f}s")
    print(f"report: {res.get('report_path')}")


if __name__ == "__main__":
    main()
