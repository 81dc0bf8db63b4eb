"""Apply a saved head to image files: embed them with the head's backbone, write a CSV."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..base.errors import FeatxError
from ..base.io import write_csv, write_json
from ..cache.multi import MULTI_SUFFIX, is_multi_view, open_cache, split_view
from ..data.folders import is_image_name
from ..embedding.extractor import embed_files, resolve_weights
from ..embedding.networks.head_guard import check_head_backbone, no_downloads
from ..heads.estimators.scores import scores_of
from ..heads.saved.persist import check_head_compatible, load_head

log = logging.getLogger(__name__)


def _collect_inputs(inputs: Iterable[str | os.PathLike]) -> list[tuple[str, str]]:
    """(absolute path, folder class) for every image file given or found below given folders."""

    out: list[tuple[str, str]] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            for dirpath, dirnames, filenames in os.walk(p, followlinks=False):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for fn in sorted(filenames):
                    if is_image_name(fn):
                        out.append((os.path.abspath(os.path.join(dirpath, fn)), os.path.basename(dirpath)))
        elif p.exists() or p.is_symlink():
            out.append((os.path.abspath(p), p.parent.name))
        else:
            raise FeatxError(f"{str(p)!r} does not exist; pass image files or folders of images")
    return list(dict.fromkeys(out))


def _embed_inputs(inputs: list, meta: dict, *, weights, cache_dir, device, batch_size, num_workers, progress):
    """(features, paths, folder names, failed) of the images in ``inputs``, embedded with the head's backbone."""
    items = _collect_inputs(inputs)
    if not items:
        raise FeatxError(f"no image files found in {', '.join(map(str, inputs))}")
    w = weights if weights is not None else _weights(meta)
    check_head_backbone(meta, weights=w, head=str(meta.get("model_file", "?")))  # before anything is built
    with no_downloads():
        emb = embed_files(
            [p for p, _ in items], backbone=meta["backbone"], weights=w, cache_dir=Path(cache_dir) / "predict",
            device=device, batch_size=batch_size, num_workers=num_workers, progress=progress, view=meta.get("view"),
            check=lambda fp, dim: check_head_compatible(_for_view(meta), fp, dim=dim, what=f"backbone {meta['backbone']} as built here"),
        )
    ok = emb["ok"]
    return emb["features"], [items[i][0] for i in ok], [items[i][1] for i in ok], emb["failed"]


def _weights(meta: dict):
    """The weights that rebuild the head's backbone(s): one value, or {member: weights} for a cache set."""
    fpd, source = meta.get("fingerprint_dict") or {}, meta.get("weights_source")
    if "members" in fpd and isinstance(source, dict):
        return {n: resolve_weights(fp, source.get(n)) for n, fp in fpd["members"].items()}
    return resolve_weights(fpd, source)


def _for_view(meta: dict) -> dict:
    """The sidecar with only the set members its view reads: a head on ``VIEW@A`` of a set ``A+B`` embeds
    new images with A alone, so only A's fingerprint is compared."""
    fpd, view = meta.get("fingerprint_dict") or {}, meta.get("view")
    if not isinstance(fpd.get("members"), dict) or not is_multi_view(view):
        return meta
    names = split_view(view)[1]
    return {**meta, "fingerprint_dict": {"members": {n: fpd["members"][n] for n in names if n in fpd["members"]}}}


def _write_csv(path: Path, header: list[str], rows: Iterable[list]) -> None:
    """Atomically; names never run as formulas, file names byte for byte (:func:`featx.base.io.write_csv`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_csv(path, header, rows)


def predict(
    head: str | os.PathLike,
    inputs: Sequence[str | os.PathLike] | str | os.PathLike,
    *,
    out: str | os.PathLike | None = None,
    weights: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike = "cache",
    device: str = "auto",
    batch_size: int = 64,
    num_workers: int | None = None,
    progress: bool = True,
    trust: bool = False,
) -> dict:
    """Apply a saved head to images (files/folders) or to a featx cache (.h5); write a CSV.

    Images are embedded with the head's backbone via :func:`featx.embedding.runner.embed` into a cache
    under ``cache_dir/predict/`` (so a rerun is instant).  The CSV has ``path``, ``predicted``,
    ``folder`` (the parent folder name) and one ``p_<class>`` column per class.  Images that
    cannot be decoded are listed in the result (``failed``), not fatal.  A head trained on
    another backbone, weights or preprocessing is refused.  ``head`` is a ``.skops`` file (safe
    to load from anyone) or a joblib pickle, which can run code and is loaded only with
    ``trust=True`` (``featx predict --trust``).
    """

    est, meta = load_head(head, trust=trust)
    classes: list[str] = list(meta.get("classes") or [])
    est_classes = np.asarray(meta.get("estimator_classes") or getattr(est, "classes_", range(len(classes))))
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    inputs = list(inputs)
    if not inputs:
        raise FeatxError("pass image files or folders (or a .h5 cache) to predict on")
    failed: list[tuple[str, str]] = []
    if len(inputs) == 1 and str(inputs[0]).endswith((".h5", MULTI_SUFFIX)) and Path(inputs[0]).is_file():
        fc = open_cache(inputs[0])
        view = meta.get("view")
        check_head_compatible(meta, fc.fingerprint_dict, dim=fc.view_dim(view), what=f"cache {fc.path.name}")
        X = fc.features(view=view)
        paths = fc.paths()
        folder = [fc.classes[i] for i in fc.labels()]
        failed = list(fc.failed)
    else:
        X, paths, folder, failed = _embed_inputs(
            inputs, meta, weights=weights, cache_dir=cache_dir, device=device, batch_size=batch_size,
            num_workers=num_workers, progress=progress,
        )
    finite = np.isfinite(X).all(axis=1) if len(X) else np.ones(0, bool)
    if not finite.all():  # never handed to a head: listed as failed, naming the image
        failed += [(p, "NaN/inf features: not predicted (`featx verify` checks a cache)") for p, ok in zip(paths, finite) if not ok]
        X, paths, folder = X[finite], [p for p, ok in zip(paths, finite) if ok], [c for c, ok in zip(folder, finite) if ok]
    t0 = time.perf_counter()
    pred = np.asarray(est.predict(X)) if len(X) else np.zeros(0, dtype=int)
    scores = scores_of(est, X) if len(X) else np.zeros((0, len(est_classes)))
    pred_s = time.perf_counter() - t0
    score_kind = "p" if hasattr(est, "predict_proba") else "score"
    names = [classes[int(c)] if classes else str(c) for c in est_classes]
    pred_names = [classes[int(c)] if classes else str(c) for c in pred]
    out_path = Path(out) if out is not None else Path("runs") / f"predict-{Path(head).stem}.csv"
    _write_csv(out_path, ["path", "predicted", "folder"] + [f"{score_kind}_{n}" for n in names],
               ([p, pred_names[i], folder[i]] + [f"{v:.6g}" for v in scores[i]] for i, p in enumerate(paths)))
    known = [i for i, f in enumerate(folder) if f in classes]
    acc = float(np.mean([pred_names[i] == folder[i] for i in known])) if known else None
    res = {
        "head": str(head),
        "head_name": meta.get("head"),
        "backbone": meta.get("backbone"),
        "csv": str(out_path),
        "n_images": len(paths),
        "n_failed": len(failed),
        "failed": [{"path": p, "reason": r} for p, r in failed],
        "counts": {n: int(sum(1 for q in pred_names if q == n)) for n in names},
        "n_with_folder_class": len(known),
        "folder_accuracy": acc,
        "predict_seconds": pred_s,
    }
    write_json(out_path.with_suffix(".json"), res)
    return res
