"""``featx export-model --format openvino [--quantize int8]``: the checked ONNX graph as OpenVINO IR.

The IR is converted from the very ONNX bytes that onnxruntime checked (``openvino.convert_model``), carries
the same metadata (rt_info ``featx/<key>``) and asks for float32 inference (rt_info ``runtime_options``), so a
CPU with bf16 does not round it.  ``--quantize int8`` quantises it with NNCF's post-training quantisation,
calibrated on training images of the head's cache; the head's own ops (``/head/...``: the linear layer, the
kNN similarities and their softmax) stay in float.  The int8 model is then compared, paired, with the float
IR on every evaluation image of the cache: accuracy of each, the images only one gets right, an exact
McNemar p-value, top-1 agreement and the largest probability difference; an accuracy drop above
``--max-accuracy-drop`` points is refused and nothing is written.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..base.errors import FeatxError
from ..cache.multi import open_cache
from ..data.images import load_image

log = logging.getLogger(__name__)

HEAD_SCOPE = "^/head/.*"  # node names the torch exporter gives the head module (kept in float by NNCF)
BATCH = 32


def _openvino():
    try:
        import openvino as ov
    except ImportError:
        raise FeatxError("export-model --format openvino needs openvino: pip install 'featx[openvino]'") from None
    return ov


def check_request(fmt: str, quantize: str, out: str) -> None:
    """Refuse, before any work, a combination of --format, --quantize and --out that cannot be written."""
    if fmt == "openvino":
        _openvino()
        if Path(out).suffix != ".xml":
            raise FeatxError(f"export-model --format openvino writes OpenVINO IR: --out {out!r} must end in .xml "
                             "(its weights go to the .bin beside it)")
    if quantize == "int8":
        if fmt != "openvino":
            raise FeatxError("export-model --quantize int8 writes an OpenVINO IR: add --format openvino "
                             "(and --out MODEL.xml)")
        try:
            import nncf  # noqa: F401
        except ImportError:
            raise FeatxError("export-model --quantize int8 needs NNCF: pip install 'featx[int8]'") from None


def to_openvino(onnx_bytes: bytes, props: dict[str, str]):
    """The ONNX graph as an ``openvino.Model``, with ``props`` in its rt_info and float32 inference asked."""
    ov = _openvino()
    with tempfile.TemporaryDirectory(prefix="featx-ov-") as tmp:
        path = Path(tmp) / "model.onnx"
        path.write_bytes(onnx_bytes)
        model = ov.convert_model(str(path))
    for k, v in props.items():
        model.set_rt_info(v, ["featx", k])
    model.set_rt_info("f32", ["runtime_options", "INFERENCE_PRECISION_HINT"])
    return model


def ov_runner(model) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """uint8 batch -> (probabilities, label) in OpenVINO's CPU runtime, compiled as a user compiles it."""
    compiled = _openvino().Core().compile_model(model, "CPU")
    probs, label = compiled.output("probabilities"), compiled.output("label")

    def run(x: np.ndarray):
        r = compiled(x)
        return r[probs], r[label]

    return run


def save_ir(model, out: Path) -> float:
    """Write ``out`` (.xml) and its .bin atomically (a temporary folder beside them, then renames); size in MB."""
    ov = _openvino()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".featx-ir-", dir=out.parent) as tmp:
        xml = Path(tmp) / out.name
        ov.save_model(model, str(xml), compress_to_fp16=False)
        os.replace(xml.with_suffix(".bin"), out.with_suffix(".bin"))
        os.replace(xml, out)
    return (out.stat().st_size + out.with_suffix(".bin").stat().st_size) / 2**20


def _spread(items: list, n: int) -> list:
    """Up to ``n`` of ``items``, evenly spaced (deterministic)."""
    if len(items) <= n:
        return list(items)
    return [items[i] for i in np.unique(np.linspace(0, len(items) - 1, n).round().astype(int))]


def _split_rows(meta: dict) -> tuple[list[str], list[str], list[str]]:
    """(training paths, evaluation paths, evaluation class names) of the head's cache, as its sidecar splits it."""
    try:
        fc = open_cache(meta.get("cache"))
    except (FeatxError, OSError, TypeError) as exc:
        raise FeatxError(f"export-model --quantize int8 calibrates and checks on the head's cache "
                         f"{meta.get('cache')!r}, which cannot be opened ({exc}); pass --cache-dir or re-probe") from None
    split = meta.get("split") or {}
    ev, tr = split.get("eval_split"), split.get("train_split")
    if ev not in set(fc.splits):
        raise FeatxError(f"export-model --quantize int8 checks accuracy on the evaluation split of the head's cache, "
                         f"and {fc.path} has none named in the head's sidecar ({ev!r}); probe a cache with a "
                         "train/ and a val/ (or test/) folder")
    train = fc.paths(tr) if tr in set(fc.splits) else [p for s in fc.splits if s != ev for p in fc.paths(s)]
    truth = [fc.classes[int(i)] for i in fc.labels(ev)]
    return train, fc.paths(ev), truth


def _batches(paths: list[str], prep: Callable, draft: int):
    for a in range(0, len(paths), BATCH):
        yield np.concatenate([prep(load_image(p, draft_size=draft)) for p in paths[a:a + BATCH]])


def mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value of ``b`` and ``c`` discordant pairs (binomial, p = 1/2)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_study(float_run, int8_run, batches, truth: list[str], names: list[str]) -> dict[str, Any]:
    """Accuracy of the float and the int8 model on the same images, and how they differ."""
    fl, q, worst = [], [], 0.0
    for x in batches:
        (pf, lf), (pq, lq) = float_run(x), int8_run(x)
        fl += [names[int(i)] for i in lf]
        q += [names[int(i)] for i in lq]
        worst = max(worst, float(np.abs(pf.astype(np.float64) - pq).max()))
    ok_f = np.asarray([a == t for a, t in zip(fl, truth)])
    ok_q = np.asarray([a == t for a, t in zip(q, truth)])
    b, c = int((ok_q & ~ok_f).sum()), int((ok_f & ~ok_q).sum())
    return {"images": len(truth), "float_accuracy": float(ok_f.mean()), "int8_accuracy": float(ok_q.mean()),
            "change_pts": 100 * float(ok_q.mean() - ok_f.mean()), "int8_only_right": b, "float_only_right": c,
            "mcnemar_p": mcnemar_p(b, c), "top1_agreement": float(np.mean([a == b_ for a, b_ in zip(fl, q)])),
            "max_abs_dp": worst}


def int8_model(model, meta: dict, prep: Callable, names: list[str], s, draft: int) -> tuple[Any, dict[str, Any]]:
    """(the int8 model, its paired study against ``model``); refused past ``s.max_accuracy_drop`` points."""
    import nncf

    train, paths, truth = _split_rows(meta)
    calib = _spread(train, s.calibration)
    if not calib:
        raise FeatxError("export-model --quantize int8 found no training image in the head's cache to calibrate on")
    log.info("int8: calibrating on %d training images, then checking on %d evaluation images", len(calib), len(paths))
    data = nncf.Dataset([x[i:i + 1] for x in _batches(calib, prep, draft) for i in range(len(x))])
    float_run = ov_runner(model)  # compiled before NNCF touches anything
    qmodel = nncf.quantize(model, data, subset_size=len(calib),
                           ignored_scope=nncf.IgnoredScope(patterns=[HEAD_SCOPE], validate=False))
    qmodel.set_rt_info(f"int8 (NNCF post-training, {len(calib)} training images)", ["featx", "quantize"])
    study = paired_study(float_run, ov_runner(qmodel), _batches(paths, prep, draft), truth, names)
    study["calibration_images"] = len(calib)
    if -study["change_pts"] > s.max_accuracy_drop:
        raise FeatxError(
            f"export-model --quantize int8: accuracy on the {study['images']} evaluation images falls from "
            f"{100 * study['float_accuracy']:.1f}% to {100 * study['int8_accuracy']:.1f}% "
            f"({study['change_pts']:+.1f} pts, over --max-accuracy-drop {s.max_accuracy_drop:g}); nothing was "
            "written. Export the float model (leave out --quantize) or raise --max-accuracy-drop"
        )
    return qmodel, study
