"""A probe candidate fitted on streamed training rows: :func:`fit_streamed` and :func:`stream_candidates`.

The streamed heads themselves are :class:`~featx.heads.stream.linear_head.StreamingLinearHead` (logreg and
the linear SVM, every C in one pass) and :class:`~featx.heads.stream.knn.StreamingKNN`, built by the one
head factory (:func:`featx.heads.tuning.factory.create_head` with ``solver="stream"``).  Heads saved
before they moved name ``featx.heads.stream.linear.StreamingLinearHead``: it stays importable here.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from ..tuning.factory import create_head
from ..tuning.rows import TrainingRows
from ..tuning.selection import Candidate, SearchPlan, fold_std_err, with_norm
from .linear_head import StreamingLinearHead  # noqa: F401 - saved heads name it here (LEGACY_MODULES)
from .source import CacheSource

log = logging.getLogger(__name__)


def stream_candidates(cands: list[tuple[str, str, int]]) -> list[tuple[str, str, int]]:
    """The (view, norm, augmented views) candidates a streamed probe scores: the plain rows only."""
    plain = list(dict.fromkeys((v, n, 0) for v, n, _ in cands))
    if len(plain) < len(cands):
        log.warning("streaming: the augmented training views are not used (--train-views off)")
    return plain


def fit_streamed(rows: TrainingRows, cand: tuple[str, str, int], plan: SearchPlan, *, refit: bool = False):
    """(fitted head, its streaming search, Candidate row) of one (view, norm) on streamed training rows.

    :func:`featx.heads.tuning.selection.fit_candidate`'s contract for ``select(..., fit=fit_streamed)``; ``rows``
    holds the cache (``fc``), the training rows' cache row numbers (``tr``) and labels (``y_tr``).
    """
    view, norm, _ = cand
    inner = create_head(plan.name, kernel=plan.kernel, grid=plan.grid, folds=plan.folds, seed=plan.seed,
                        device=plan.device, scoring=plan.scoring, solver="stream", epochs=plan.stream_epochs)
    log.info("%s streamed %s on %d rows of view %s, norm %s", "refitting the chosen" if refit else "fitting",
             plan.name, len(rows.tr), view, norm)
    t0 = time.perf_counter()
    inner.fit(CacheSource(rows.fc, rows.tr, view=view, norm=norm), rows.y_tr)
    est = with_norm(inner, norm)
    if est is not inner:  # the normalisation was applied while reading: fit its (stateless) step alone
        est.steps[0][1].fit(np.zeros((1, inner.n_features_in_), np.float32))
    row = Candidate(view, norm, 0, int(inner.n_features_in_), float(inner.best_score_), fold_std_err(inner),
                    dict(inner.params_), time.perf_counter() - t0)
    return est, inner, row
