"""Per-image predictions of a head on the evaluation rows: ``predictions_<head>.csv`` in the run folder.

Why: the report shows *which* images a head gets wrong, with what confidence; metrics.json only
has counts.  :func:`write_predictions` is what ``probe`` calls once per head (one line, no
dependency on the report), :func:`read_predictions` what the report reads.  Columns:

``row`` (global row of the cache), ``path`` (relative to the data set root, as in the cache),
``split``, ``true`` and ``pred`` (class names), ``confidence`` (probability of the predicted
class, empty when the head gives no scores), ``p_true`` (probability of the true class).
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..base.io import CSV_ENCODING, read_csv, write_csv
from ..heads.estimators.scores import as_probabilities

COLUMNS = ("row", "path", "split", "true", "pred", "confidence", "p_true")


def predictions_path(run_dir: str | os.PathLike, head: str) -> Path:
    return Path(run_dir) / f"predictions_{head}.csv"


@dataclass
class Prediction:
    """One evaluation image as the head saw it."""

    row: int
    path: str
    split: str
    true: str
    pred: str
    confidence: float | None
    p_true: float | None

    @property
    def correct(self) -> bool:
        return self.true == self.pred

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in COLUMNS}


def make_predictions(
    *,
    rows: Sequence[int],
    keys: Sequence[str],
    splits: Sequence[str],
    y_true: Sequence[int],
    y_pred: Sequence[int],
    classes: Sequence[str],
    scores: np.ndarray | None = None,
    score_labels: Sequence[int] | None = None,
) -> list[Prediction]:
    """One :class:`Prediction` per evaluation row; ``scores`` columns are the labels ``score_labels``."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    probs = col_of = None
    if scores is not None and len(y_true):
        probs = as_probabilities(scores)
        labels = list(score_labels) if score_labels is not None else list(range(probs.shape[1]))
        col_of = {int(lab): j for j, lab in enumerate(labels)}
    out = []
    for i in range(len(y_true)):
        conf = p_true = None
        if probs is not None:
            jp, jt = col_of.get(int(y_pred[i])), col_of.get(int(y_true[i]))
            conf = float(probs[i, jp]) if jp is not None else None
            p_true = float(probs[i, jt]) if jt is not None else 0.0
        out.append(Prediction(int(rows[i]), str(keys[i]), str(splits[i]), str(classes[int(y_true[i])]),
                              str(classes[int(y_pred[i])]), conf, p_true))
    return out


def write_predictions(path: str | os.PathLike, predictions: Sequence[Prediction]) -> Path:
    """Write the CSV atomically (a report never reads half a file); names and paths are written as
    :func:`featx.base.io.write_csv` writes them (never a formula, file names byte for byte)."""
    return write_csv(path, COLUMNS, ([p.row, p.path, p.split, p.true, p.pred,
                                      "" if p.confidence is None else f"{p.confidence:.6f}",
                                      "" if p.p_true is None else f"{p.p_true:.6f}"] for p in predictions))


def _opt_float(s: str) -> float | None:
    if s in ("", None):
        return None
    v = float(s)
    return v if math.isfinite(v) else None


def read_predictions(path: str | os.PathLike) -> list[Prediction]:
    """Read a predictions CSV written by :func:`write_predictions` (extra columns are ignored)."""
    with open(path, newline="", **CSV_ENCODING) as fh:
        header = csv.DictReader(fh).fieldnames or []
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise ValueError(f"{path}: missing columns {', '.join(missing)}")
    return [Prediction(int(r["row"]), r["path"], r["split"], r["true"], r["pred"], _opt_float(r["confidence"]),
                       _opt_float(r["p_true"])) for r in read_csv(path)]


def worst_first(predictions: Sequence[Prediction], *, limit: int | None = None) -> list[Prediction]:
    """The misclassified rows, most confidently wrong first (then by path, for a stable order)."""
    wrong = [p for p in predictions if not p.correct]
    wrong.sort(key=lambda p: (-(p.confidence if p.confidence is not None else 0.0),
                              p.p_true if p.p_true is not None else 1.0, p.path))
    return wrong if limit is None else wrong[:limit]
