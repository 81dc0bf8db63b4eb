"""``featx export-model``: a saved head and its backbone(s) as one ONNX graph that predicts what ``featx predict`` does.

The graph: input ``image`` (uint8, N x H x W x 3, resized and centre-cropped by the ``preprocess.py`` written
beside it) -> the backbone's scaling and normalisation -> the frozen network -> the head's feature view -> the
head (:mod:`featx.heads.saved.onnx_heads`) -> outputs ``probabilities`` (float32, N x classes) and ``label``
(int64, N: an index into the ``classes`` metadata).  Before the file is committed, up to ``verify`` images of
the head's cache run through onnxruntime and through ``featx predict``; any top-1 difference, or a probability
further than 1e-4, and nothing is written.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

try:  # the optional extra featx[deploy]
    import onnx
    import onnxruntime as ort
except ImportError:  # pragma: no cover - export_model names the extra to install
    onnx = ort = None

from ..base.errors import FeatxError
from ..base.io import CSV_ENCODING, atomic_write_bytes, write_json
from ..base.text import csv_value
from ..base.version import __version__
from ..cache.identity import CacheIdentity
from ..cache.multi import is_multi_view, open_cache, split_view
from ..config.settings import ExportModelSettings
from ..data.folders import is_image_name
from ..data.images import load_image
from ..embedding.export_net import ExportGraph, SetFeatures, view_features
from ..embedding.export_preprocess import preprocess_source
from ..embedding.extractor import resolve_weights
from ..embedding.networks.head_guard import check_head_backbone, no_downloads
from ..heads.estimators.scores import as_probabilities
from ..heads.saved.onnx_heads import head_net, reference_bytes
from ..heads.saved.persist import load_head
from .export_openvino import check_request, int8_model, ov_runner, save_ir, to_openvino
from .predict import predict

log = logging.getLogger(__name__)

TOLERANCE = 1e-4  # the largest |probability difference| to `featx predict` an export may have
OPSET = 18


@dataclass
class ExportModelResult:
    """What ``export_model`` wrote and how it checked it."""

    model: str
    preprocess: str
    size_mb: float
    head: str
    view: str
    classes: list[str]
    input_shape: list[Any]
    verified_images: int
    top1_agree: int
    max_abs_diff: float | None
    seconds: dict[str, float] = field(default_factory=dict)
    fmt: str = "onnx"
    int8: dict[str, Any] | None = None  # --quantize int8: the paired accuracy study (export_openvino.paired_study)

    def to_dict(self) -> dict:
        return asdict(self)

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)


def _weights(meta: dict, weights) -> dict[str, Any]:
    """{backbone: weights} that rebuild the head's backbone(s) (``weights`` given: for every member)."""
    fpd, source, view = meta.get("fingerprint_dict") or {}, meta.get("weights_source"), meta.get("view") or "final"
    if is_multi_view(view):
        members = fpd.get("members") or {}
        return {n: weights if weights is not None else resolve_weights(members.get(n, {}),
                                                                         (source or {}).get(n) if isinstance(source, dict) else None)
                for n in split_view(view)[1]}
    return {meta["backbone"]: weights if weights is not None else resolve_weights(fpd, source)}


def _features(meta: dict, weights) -> tuple[Any, Any]:
    """(features module, the Preprocess of its input) for the head's view."""
    view = meta.get("view") or "final"
    per = _weights(meta, weights)
    check_head_backbone(meta, weights=per if is_multi_view(view) else next(iter(per.values())),
                        head=str(meta.get("model_file", "?")))
    base = split_view(view)[0] if is_multi_view(view) else view
    with no_downloads():
        built = [view_features(name, base, weights=w) for name, w in per.items()]
    pres = {bb.name: bb.preprocess for _, bb in built}
    recipes = {(p.resize, p.crop, p.interpolation) for p in pres.values()}
    if len(recipes) > 1:
        raise FeatxError(
            f"export-model: the backbones of view {view!r} resize and crop differently "
            f"({', '.join(f'{n}: {p.describe()}' for n, p in pres.items())}), and the model takes one image input; "
            "export a head trained on one backbone's view (e.g. `featx probe --view final@NAME`)"
        )
    feats = SetFeatures([m for m, _ in built]) if is_multi_view(view) else built[0][0]
    return feats.eval(), built[0][1].preprocess


def _export_bytes(graph, crop: int) -> bytes:
    """The ONNX bytes of ``graph`` (torch's exporter), batch dimension dynamic."""
    import torch

    dummy = torch.zeros(2, crop, crop, 3, dtype=torch.uint8)
    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(graph, (dummy,), buf, input_names=["image"], output_names=["probabilities", "label"],
                          dynamic_axes={"image": {0: "batch"}, "probabilities": {0: "batch"}, "label": {0: "batch"}},
                          opset_version=OPSET, dynamo=False)
    return buf.getvalue()


def _with_metadata(data: bytes, props: dict[str, str]) -> bytes:
    model = onnx.load_from_string(data)
    del model.metadata_props[:]
    for k, v in props.items():
        model.metadata_props.add(key=k, value=v)
    model.producer_name, model.producer_version = "featx", __version__
    return model.SerializeToString()


def _identity(meta: dict) -> str:
    """The identity of the cache the head was trained on (JSON: digest, data, embedding settings), as its
    sidecar records it (:mod:`featx.cache.identity`); a head saved by an older featx: its embedding settings."""
    ident = CacheIdentity.from_record(meta)
    return json.dumps(ident.to_dict()) if ident is not None else str(meta.get("fingerprint") or "")


def _check_images(meta: dict, images, n: int) -> list[str]:
    """Up to ``n`` image files to verify on: ``images`` (a folder), else the evaluation images of the head's cache."""
    if images is not None:
        root = Path(images)
        if not root.is_dir():
            raise FeatxError(f"--images {images!r} is not a folder; pass a folder of images to verify on")
        found = sorted(str(p) for p in root.rglob("*") if p.is_file() and is_image_name(p.name))
    else:
        cache = meta.get("cache")
        try:
            fc = open_cache(cache)
        except (FeatxError, OSError, TypeError) as exc:
            raise FeatxError(f"export-model checks the model on the evaluation images of the head's cache {cache!r}, which "
                             f"cannot be opened ({exc}); pass --images FOLDER to check on other images") from None
        split = (meta.get("split") or {}).get("eval_split")
        found = fc.paths(split) if split in set(fc.splits) else fc.paths()
        found = [p for p in found if os.path.isfile(p)]
    if not found:
        raise FeatxError("export-model found no image to check the model on; pass --images FOLDER")
    pick = np.unique(np.linspace(0, len(found) - 1, min(n, len(found))).round().astype(int))
    return [found[i] for i in pick]


def _predicted(csv_path: str) -> dict[str, tuple[str, np.ndarray, bool]]:
    """{path: (predicted class, scores, scores are probabilities)} from a `featx predict` CSV."""
    out = {}
    with open(csv_path, newline="", **CSV_ENCODING) as fh:
        rows = [[csv_value(c) for c in r] for r in csv.reader(fh)]  # as written: see featx.base.io.write_csv
    head = rows[0]
    for r in rows[1:]:
        out[r[0]] = (r[1], np.asarray([float(v) for v in r[3:]], np.float64), head[3].startswith("p_"))
    return out


def _preprocess_module(pre_path: Path):
    """The written preprocess.py, imported."""
    spec = importlib.util.spec_from_file_location("featx_export_preprocess", pre_path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _verify(runs: dict, pre_path: Path, head: str, paths: list[str], names: list[str], s, draft: int) -> dict:
    """Run the model in each runtime of ``runs`` ({name: batch -> (probabilities, label)}) and `featx predict`
    on ``paths``; refuse on any difference beyond tolerance."""
    mod = _preprocess_module(pre_path)
    with tempfile.TemporaryDirectory(prefix="featx-export-") as tmp:
        res = predict(head, paths, out=Path(tmp) / "check.csv", weights=s.weights, cache_dir=s.cache_dir,
                      device="cpu", progress=False, trust=s.trust, num_workers=0)
        ref = _predicted(res["csv"])
    worst, agree, n = 0.0, 0, 0
    for p in paths:
        key = os.path.abspath(p)
        if key not in ref:
            continue
        x = mod.preprocess(load_image(p, draft_size=draft))
        pred, scores, is_p = ref[key]
        want = scores if is_p else as_probabilities(scores[None])[0]
        n += 1
        for rt, run in runs.items():
            prob, label = run(x)
            worst = max(worst, float(np.abs(prob[0].astype(np.float64) - want).max()))
            if names[int(label[0])] != pred or worst > TOLERANCE:
                raise FeatxError(
                    f"export-model: the exported graph disagrees with `featx predict` on {p} ({rt}: "
                    f"{names[int(label[0])]}, featx predict: {pred}; largest probability difference {worst:.2e}, "
                    f"tolerance {TOLERANCE:g}); nothing was written. Please report it with the head's sidecar"
                )
        agree += 1
    if n == 0:
        raise FeatxError("export-model: `featx predict` could read none of the check images; pass --images FOLDER")
    return {"n": n, "agree": agree, "max_abs_diff": worst}


def _check(data: bytes, ov_model, pre_text: str, head: str, meta: dict, names: list[str], s, draft: int):
    """(verification, the model to write: ``ov_model`` or its int8 version, the int8 study): ``data`` and
    ``ov_model`` checked against `featx predict`, then quantised when ``s.quantize`` asks."""
    check, int8 = {"n": 0, "agree": 0, "max_abs_diff": None}, None
    with tempfile.TemporaryDirectory(prefix="featx-export-") as tmp:
        tmp_pre = Path(tmp) / "preprocess.py"
        tmp_pre.write_text(pre_text, encoding="utf-8")
        if s.verify > 0:
            sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
            runs = {"onnxruntime": lambda x: sess.run(["probabilities", "label"], {"image": x})}
            if ov_model is not None:
                runs["OpenVINO"] = ov_runner(ov_model)
            check = _verify(runs, tmp_pre, head, _check_images(meta, s.images, s.verify), names, s, draft)
        else:
            log.warning("export-model: --verify 0: the model was not checked against `featx predict`")
        if s.quantize == "int8":
            ov_model, int8 = int8_model(ov_model, meta, _preprocess_module(tmp_pre).preprocess, names, s, draft)
    return check, ov_model, int8


def export_model(head: str | os.PathLike, out: str | os.PathLike | None = None, *,
                 settings: ExportModelSettings | None = None, **overrides: Any) -> ExportModelResult:
    """Write ``out`` (one ONNX graph: uint8 images -> probabilities, label) and ``preprocess.py`` beside it.

    ``settings``/``overrides``: :class:`~featx.config.settings.ExportModelSettings` fields (``max_model_mb``,
    ``verify``, ``images``, ``weights``, ``cache_dir``, ``trust``).  Refuses (FeatxError, nothing written) a
    model over ``max_model_mb`` or one whose predictions on the check images differ from ``featx predict``.
    """
    s, _ = ExportModelSettings.with_overrides(settings, {**overrides, **({"out": str(out)} if out else {})},
                                              call="export_model")
    if not s.out:
        raise FeatxError("export-model needs --out FILE.onnx")
    if onnx is None or ort is None:
        raise FeatxError("export-model needs onnx and onnxruntime: pip install 'featx[deploy]'")
    check_request(s.fmt, s.quantize, s.out)
    t0 = time.perf_counter()
    est, meta = load_head(head, trust=s.trust)
    ref_mb = reference_bytes(est) / 2**20
    if ref_mb > s.max_model_mb:
        raise FeatxError(f"export-model: the {meta.get('head')} head carries {ref_mb:,.1f} MB of reference rows, over "
                         f"--max-model-mb {s.max_model_mb:g}; raise --max-model-mb or export a logreg/svm head")
    classes = list(meta.get("classes") or [])
    est_classes = list(meta.get("estimator_classes") or range(len(classes)))
    names = [classes[int(c)] if classes else str(c) for c in est_classes]
    feats, pre = _features(meta, s.weights)
    graph = ExportGraph(feats, head_net(est, len(names))).eval()
    data = _export_bytes(graph, pre.crop)
    t_export = time.perf_counter() - t0
    props = {
        "classes": json.dumps(names), "featx_version": __version__, "cache_identity": _identity(meta),
        "cache_fingerprint": str(meta.get("fingerprint") or ""), "head": str(meta.get("head")),
        "view": str(meta.get("view") or "final"), "backbone": str(meta.get("backbone")),
        "preprocessing": json.dumps({**pre.to_dict(), "input": "uint8 NHWC RGB, resized and centre-cropped by "
                                     "preprocess.py; scaled and normalised inside the graph",
                                     "decode": "JPEG draft at 2x the resize when the image is >= 4x (featx's loader)"}),
    }
    data = _with_metadata(data, props)
    size_mb = len(data) / 2**20
    if size_mb > s.max_model_mb:
        raise FeatxError(f"export-model: the model would be {size_mb:,.1f} MB, over --max-model-mb {s.max_model_mb:g}; "
                         "raise --max-model-mb")
    out_path = Path(s.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    pre_path = out_path.with_name("preprocess.py")
    pre_text = preprocess_source(pre)
    t1 = time.perf_counter()
    ov_model = to_openvino(data, props) if s.fmt == "openvino" else None
    check, ov_model, int8 = _check(data, ov_model, pre_text, str(head), meta, names, s, pre.resize)
    atomic_write_bytes(pre_path, pre_text.encode("utf-8"))
    if ov_model is None:
        atomic_write_bytes(out_path, data)
    else:
        size_mb = save_ir(ov_model, out_path)
    res = ExportModelResult(
        model=str(out_path), preprocess=str(pre_path), size_mb=size_mb, head=str(head), view=props["view"],
        classes=names, input_shape=["N", pre.crop, pre.crop, 3], verified_images=check["n"],
        top1_agree=check["agree"], max_abs_diff=check["max_abs_diff"],
        seconds={"export": t_export, "verify": time.perf_counter() - t1, "total": time.perf_counter() - t0},
        fmt=s.fmt, int8=int8,
    )
    write_json(out_path.with_suffix(".export.json"), res.to_dict())
    log.info("exported %s (%.1f MB); %d images checked against featx predict", out_path, size_mb, check["n"])
    return res
