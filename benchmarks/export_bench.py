"""featx export-model on flowers12: onnxruntime CPU images/s (batch 32) against `featx predict`, model size, peak memory.

    .venv/bin/python benchmarks/export_bench.py [--data ../shared/data/flowers12] [--work /tmp/export_bench]

Embeds flowers12 with efficientnet_lite0, probes logreg, exports it (checked against `featx predict` on 64
evaluation images), then times, on the test split (240 images): `featx predict` (a fresh predict cache, so the
network runs) and onnxruntime on preprocess.py's arrays at batch 32 (decode + resize included in both).
Peak memory: ru_maxrss of a child process running each.  Then (unless --skip-openvino) the same head as
OpenVINO IR and as NNCF int8 IR (`--quantize int8`, its paired accuracy change included), timed alike in
OpenVINO's runtime.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ORT_CHILD = r"""
import importlib.util, json, resource, sys, time
import numpy as np, onnxruntime as ort
from featx.data.images import load_image
model, paths = sys.argv[1], json.loads(open(sys.argv[2]).read())
spec = importlib.util.spec_from_file_location("pp", model.rsplit("/", 1)[0] + "/preprocess.py")
pp = importlib.util.module_from_spec(spec); spec.loader.exec_module(pp)
sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
t = time.perf_counter()
for a in range(0, len(paths), 32):
    x = np.concatenate([pp.preprocess(load_image(p, draft_size=pp.RESIZE)) for p in paths[a:a + 32]])
    sess.run(["probabilities", "label"], {"image": x})
dt = time.perf_counter() - t
print(json.dumps({"seconds": dt, "images_per_s": len(paths) / dt, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

OV_CHILD = ORT_CHILD.replace("import numpy as np, onnxruntime as ort", "import numpy as np, openvino as ov").replace(
    'sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])',
    'sess = ov.Core().compile_model(model, "CPU")').replace('sess.run(["probabilities", "label"], {"image": x})', "sess(x)")

PREDICT_CHILD = r"""
import json, resource, sys, time
import featx
head, paths, cache = sys.argv[1], json.loads(open(sys.argv[2]).read()), sys.argv[3]
t = time.perf_counter()
featx.predict(head, paths, out=cache + "/bench.csv", cache_dir=cache, progress=False, batch_size=32)
dt = time.perf_counter() - t
print(json.dumps({"seconds": dt, "images_per_s": len(paths) / dt, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _child(code: str, *args: str) -> dict:
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "flowers12"))
    ap.add_argument("--work", default="/tmp/export_bench")
    ap.add_argument("--skip-openvino", action="store_true", help="leave out the OpenVINO IR and int8 timings")
    a = ap.parse_args()
    import featx

    work = Path(a.work)
    fc = featx.embed(a.data, cache_dir=work / "cache", progress=False)
    featx.probe(fc, head="logreg", out_dir=work / "runs", quiet=True, report=False)
    t = time.perf_counter()
    res = featx.export_model(work / "runs" / "logreg.skops", work / "model" / "model.onnx", cache_dir=work / "cache")
    export_s = time.perf_counter() - t
    paths = fc.paths("test")
    (work / "paths.json").write_text(json.dumps(paths))
    ort_r = _child(ORT_CHILD, res.model, str(work / "paths.json"))
    pred_dir = work / f"predict-{time.time_ns()}"  # fresh: the network runs
    pred_r = _child(PREDICT_CHILD, str(work / "runs" / "logreg.skops"), str(work / "paths.json"), str(pred_dir))
    out = {"images": len(paths), "model_mb": round(res.size_mb, 2), "export_seconds": round(export_s, 1),
           "verified": res.verified_images, "max_abs_diff": res.max_abs_diff,
           "onnxruntime": ort_r, "featx_predict": pred_r}
    if not a.skip_openvino:  # the IR (float) and its NNCF int8 version, each timed the same way in OpenVINO's runtime
        head = work / "runs" / "logreg.skops"
        ir = featx.export_model(head, work / "ir" / "model.xml", fmt="openvino", cache_dir=work / "cache")
        q = featx.export_model(head, work / "int8" / "model.xml", fmt="openvino", quantize="int8", verify=0,
                               cache_dir=work / "cache")
        out["openvino_fp32"] = {"model_mb": round(ir.size_mb, 2), **_child(OV_CHILD, ir.model, str(work / "paths.json"))}
        out["openvino_int8"] = {"model_mb": round(q.size_mb, 2), **_child(OV_CHILD, q.model, str(work / "paths.json")),
                                "accuracy": q.int8}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
