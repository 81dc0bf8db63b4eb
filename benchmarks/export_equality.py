"""Issue 35, "done when": the exported model predicts what `featx predict` does on every evaluation image.

    .venv/bin/python benchmarks/export_equality.py [--sets flowers12,dtd10,hymenoptera_data] [--work /tmp/x35]
        [--formats onnx,openvino] [--json out.json]   (rows already in out.json are kept, not rerun)

For each shared set: embed it with the default backbone (efficientnet_lite0), probe logreg, svm and knn
(`--head all`) and knn_dino, and embed it with the two tiny backbones (the only offline pair that resizes and
crops alike) for a cache-set head (logreg on final@tiny_cnn+tiny_cnn_b).  Each head is exported
(`featx.export_model` with --verify 0: its own check covers a subset of what follows), then every
evaluation image of the head's cache goes through preprocess.py + onnxruntime (and the OpenVINO IR through
OpenVINO's runtime) at batch 32 and through `featx.predict`; the table gives top-1 agreement and the largest
|probability difference| per head and format.  Prints a Markdown table (and --json the rows).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TINY_SET = "tiny_cnn,tiny_cnn_b"


def _heads(data: Path, work: Path) -> dict[str, Path]:
    """{label: head file} for one data set: the default backbone's four heads and a cache-set head."""
    import featx
    from featx.embedding.multi import embed_backbones

    name = data.name
    fc = featx.embed(data, cache_dir=work / "cache", progress=False)
    runs = work / "runs" / name
    if not (runs / "all" / "knn.skops").is_file():
        featx.probe(fc, head="all", out_dir=runs / "all", quiet=True, report=False)
    if not (runs / "dino" / "knn_dino.skops").is_file():
        featx.probe(fc, head="knn_dino", out_dir=runs / "dino", quiet=True, report=False)
    if not (runs / "set" / "logreg.skops").is_file():
        _, cs = embed_backbones(data, backbone=TINY_SET, cache_dir=work / "cache", progress=False)
        featx.probe(cs, head="logreg", view="final@tiny_cnn+tiny_cnn_b", out_dir=runs / "set", quiet=True,
                    report=False)
    return {"logreg": runs / "all" / "logreg.skops", "svm": runs / "all" / "svm.skops",
            "knn": runs / "all" / "knn.skops", "knn_dino": runs / "dino" / "knn_dino.skops",
            "set logreg (tiny_cnn+tiny_cnn_b)": runs / "set" / "logreg.skops"}


def _eval_paths(head: Path) -> tuple[list[str], str]:
    """Every evaluation image of the head's cache (the split its sidecar names) and that split's name."""
    from featx.cache.multi import open_cache
    from featx.heads.saved.persist import load_head

    _, meta = load_head(head)
    fc = open_cache(meta["cache"])
    split = (meta.get("split") or {}).get("eval_split")
    return (fc.paths(split) if split in set(fc.splits) else fc.paths()), str(split)


def _reference(head: Path, paths: list[str], work: Path) -> dict[str, tuple[str, np.ndarray]]:
    """{path: (class, probabilities)} from `featx predict` (SVM scores turned into probabilities as the graph does)."""
    import featx
    from featx.heads.estimators.scores import as_probabilities

    out = work / "predict" / f"{head.parent.parent.name}-{head.parent.name}-{head.stem}.csv"
    featx.predict(head, paths, out=out, cache_dir=work / "cache", device="cpu", progress=False, num_workers=0)
    with open(out, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    is_p = rows[0][3].startswith("p_")
    ref = {}
    for r in rows[1:]:
        s = np.asarray([float(v) for v in r[3:]], np.float64)
        ref[r[0]] = (r[1], s if is_p else as_probabilities(s[None])[0])
    return ref


def _runner(model: str, fmt: str):
    """A function: uint8 batch -> (probabilities, label), in onnxruntime or OpenVINO's runtime."""
    if fmt == "onnx":
        import onnxruntime as ort

        sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        return lambda x: sess.run(["probabilities", "label"], {"image": x})
    import openvino as ov

    compiled = ov.Core().compile_model(model, "CPU")
    return lambda x: (lambda r: (r["probabilities"], r["label"]))(compiled(x))


def _compare(model: str, fmt: str, classes: list[str], paths: list[str], ref: dict) -> dict:
    from featx.data.images import load_image

    spec = importlib.util.spec_from_file_location("pp", Path(model).with_name("preprocess.py"))
    pp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pp)
    run = _runner(model, fmt)
    paths = [os.path.abspath(p) for p in paths if os.path.abspath(p) in ref]
    agree, worst = 0, 0.0
    for a in range(0, len(paths), 32):
        batch = paths[a:a + 32]
        prob, label = run(np.concatenate([pp.preprocess(load_image(p, draft_size=pp.RESIZE)) for p in batch]))
        for p, pr, lab in zip(batch, prob, label):
            agree += int(classes[int(lab)] == ref[p][0])
            worst = max(worst, float(np.abs(pr.astype(np.float64) - ref[p][1]).max()))
    return {"images": len(paths), "top1_agree": agree, "max_abs_diff": worst}


def check_set(data: Path, work: Path, formats: list[str], done: list[dict]) -> list[dict]:
    """The rows of one data set (those already in ``done``, from an earlier --json, are kept, not rerun)."""
    import featx

    rows = []
    for label, head in _heads(data, work).items():
        todo = [f for f in formats if not any((r["set"], r["head"], r["format"]) == (data.name, label, f) for r in done)]
        rows += [r for r in done if (r["set"], r["head"]) == (data.name, label) and r["format"] in formats]
        if not todo:
            continue
        paths, split = _eval_paths(head)
        ref = _reference(head, paths, work)
        for fmt in todo:
            ext = ".onnx" if fmt == "onnx" else ".xml"
            out = work / "models" / data.name / head.parent.name / f"{head.stem}{ext}"
            t = time.perf_counter()
            res = featx.export_model(head, out, cache_dir=work / "cache", fmt=fmt, verify=0)  # checked below, on all
            row = {"set": data.name, "head": label, "view": res.view, "format": fmt, "split": split,
                   "export_s": round(time.perf_counter() - t, 1), "size_mb": round(res.size_mb, 2),
                   **_compare(res.model, fmt, res.classes, paths, ref)}
            row["equal"] = row["top1_agree"] == row["images"] == len(paths) and row["max_abs_diff"] <= 1e-4
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--sets", default="flowers12,dtd10,hymenoptera_data")
    ap.add_argument("--work", default="/tmp/x35")
    ap.add_argument("--formats", default="onnx,openvino")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    done = json.loads(Path(a.json).read_text()) if a.json and Path(a.json).is_file() else []
    rows = []
    for name in a.sets.split(","):
        rows += check_set(Path(a.data) / name, Path(a.work), a.formats.split(","), done)
        if a.json:
            Path(a.json).write_text(json.dumps(rows + [r for r in done if r not in rows], indent=2))
    print("\n| set | head | view | format | eval images | top-1 identical | max abs dp | equal |")
    print("|---|---|---|---|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['set']} | {r['head']} | {r['view']} | {r['format']} | {r['images']} | {r['top1_agree']} | "
              f"{r['max_abs_diff']:.1e} | {'yes' if r['equal'] else 'NO'} |")


if __name__ == "__main__":
    main()
