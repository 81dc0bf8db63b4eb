"""Per-image predictions for runs that did not save them: the saved head applied to the cache again.

Why: runs written before ``predictions_<head>.csv`` existed (or by a probe that does not write
it) still deserve the misclassified-images section.  The head is loaded through
:func:`featx.heads.saved.persist.load_head` (checksum verified), the evaluation rows are rebuilt
with the run's ``test_size``/``seed`` exactly as the probe drew them, and the result is
written beside the run's JSON so it is computed only once.
"""

from __future__ import annotations

import inspect
import logging
import os
from pathlib import Path

import numpy as np

from ..base.errors import FeatxError
from ..cache.multi import open_cache
from ..cache.store import FeatureCache
from ..data.splits import train_eval_split
from ..heads.saved.persist import load_head
from .predictions import Prediction, make_predictions, predictions_path, write_predictions

log = logging.getLogger(__name__)


def _model_file(entry: dict, run_dir: Path) -> Path | None:
    """The head file, also when the run folder was moved (then it is looked up beside the JSON)."""
    mp = entry.get("model_path")
    if not mp:
        return None
    p = Path(mp)
    if p.is_file():
        return p
    moved = run_dir / p.name
    return moved if moved.is_file() else None


def eval_features(fc: FeatureCache, rows: np.ndarray, *, view: str | None = None) -> np.ndarray:
    """Features of global ``rows`` (read split by split, never the whole cache at once)."""
    kw = {}
    if view:
        if "view" not in inspect.signature(fc.features).parameters:
            raise FeatxError(f"the head was trained on view {view!r} but this featx reads no views from {fc.path.name}")
        kw["view"] = view
    splits = fc.split_array()
    out: np.ndarray | None = None
    for name in fc.splits:
        in_split = np.flatnonzero(splits == name)
        mask = np.isin(rows, in_split)
        if not mask.any():
            continue
        block = fc.features(name, **kw)
        if out is None:
            out = np.empty((len(rows), block.shape[1]), dtype=np.float32)
        out[mask] = block[rows[mask] - int(in_split[0])]
    return out if out is not None else np.empty((0, fc.dim), dtype=np.float32)


def recompute_predictions(metrics: dict, head: str, *, run_dir: str | os.PathLike,
                          cache: FeatureCache | None = None) -> list[Prediction]:
    """Apply the run's saved ``head`` to its evaluation rows; writes ``predictions_<head>.csv``."""
    run_dir = Path(run_dir)
    entry = (metrics.get("heads") or {}).get(head) or {}
    model = _model_file(entry, run_dir)
    if model is None:
        raise FeatxError(f"run {run_dir} saved no {head} head (probe ran with --no-save); rerun `featx probe`")
    fc = cache if cache is not None else open_cache((metrics.get("cache") or {}).get("path", ""))
    if metrics.get("fingerprint") and fc.fingerprint != metrics["fingerprint"]:
        raise FeatxError(f"cache {fc.path} is not the one run {run_dir} was trained on (fingerprint differs)")
    est, sidecar = load_head(model)
    settings = metrics.get("settings") or {}
    labels, splits = fc.labels(), fc.split_array()
    _, ev, _ = train_eval_split(labels, splits, test_size=float(settings.get("test_size", 0.2)),
                                seed=int(settings.get("seed", 0)))
    X = eval_features(fc, ev, view=entry.get("view") or sidecar.get("view"))
    ok = np.isfinite(X).all(axis=1)  # the probe leaves NaN/inf rows out too
    ev, X = ev[ok], X[ok]
    pred = np.asarray(est.predict(X))
    scores = np.asarray(est.predict_proba(X)) if hasattr(est, "predict_proba") else None
    keys = fc.keys()
    preds = make_predictions(
        rows=ev, keys=[keys[i] for i in ev], splits=splits[ev], y_true=labels[ev], y_pred=pred, classes=fc.classes,
        scores=scores, score_labels=getattr(est, "classes_", None),
    )
    write_predictions(predictions_path(run_dir, head), preds)
    log.info("report: recomputed %d %s predictions from %s", len(preds), head, model.name)
    return preds
