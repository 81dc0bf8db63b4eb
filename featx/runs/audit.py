"""``featx audit``: what is wrong with a data set — label errors, duplicates, train/test leakage, outliers.

Reads a finished cache (and hashes the image files under the data root), runs the finders of
:mod:`featx.audit.finders` on the probe's split, folds and features, and writes
``label_issues.csv``, ``duplicates.csv``, ``outliers.csv`` and ``audit.json`` (and
``report.html``) into the run folder.  Nothing the audit decides about a training row depends
on an evaluation label: the training rows' probabilities are out-of-fold over training rows,
cleanlab judges training rows among training rows only, and the outlier yardstick is the
training rows'.  Evaluation rows are judged by a head trained on the training rows.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ..audit import finders
from ..base.errors import FeatxError
from ..base.io import CSV_ENCODING, atomic_write_bytes, sha256_file, write_json
from ..base.text import csv_row
from ..base.version import __version__
from ..base.writable import default_run_dir, run_key, staged_dir
from ..cache.multi import open_single_cache
from ..cache.store import FeatureCache
from ..cache.trust.roots import trusted_root
from ..config.settings import AuditSettings
from ..data.splits import Split
from ..heads.tuning.grids import resolve_grids
from ..report.thumbs import inside_root
from .publish import publish_run

log = logging.getLogger(__name__)

# When the median training image's 5 nearest images of its class are this close to the near-duplicate
# threshold (mean cosine >= threshold - DENSE_MARGIN), the features cannot tell copies from distinct images:
# measured 0.93 on neu_steel and 0.86 on medmnist6 (floods of false pairs) against 0.58-0.78 on the photo
# sets, whose pairs are mostly true copies (ACCURACY.md).  The near pairs are then called unreliable.
DENSE_MARGIN = 0.09


@dataclass
class AuditResult:
    """What ``audit.json`` holds; ``drop`` (row numbers for ``probe --drop-flagged``) stays in memory."""

    featx_version: str
    created: str
    cache: dict
    fingerprint: str
    settings: dict
    data_root: str
    identity: dict | None
    split: dict
    counts: dict
    hashing: dict
    logreg: dict
    seconds: dict
    files: dict
    summary: str = ""
    notes: list = field(default_factory=list)
    report_path: str | None = None
    drop: dict = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "drop"}


@dataclass
class _Data:
    """The cache's rows as the audit sees them: features, labels, keys, roles (train vs evaluation)."""

    X: np.ndarray
    y: np.ndarray
    keys: list[str]
    split: np.ndarray  # the split column of the CSVs: cache split, "holdout" for a drawn hold-out
    tr: np.ndarray
    ev: np.ndarray  # the probe's evaluation rows
    classes: list[str]
    split_desc: dict


def _read(fc: FeatureCache, s: AuditSettings, split: Split) -> _Data:
    labels, splits = fc.labels(), fc.split_array()
    tr, ev, desc = split.train, split.eval, split.desc
    shown = splits.astype(object).copy()
    if desc.get("kind") == "holdout":
        shown[ev] = "holdout"
    X = fc.features(None, view=s.view)
    return _Data(X, labels, fc.keys(), shown.astype(str), tr, ev, list(fc.classes), desc)


def _csv(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(csv_row(r) for r in rows)  # names never run as formulas in a spreadsheet
    return atomic_write_bytes(path, buf.getvalue().encode(**CSV_ENCODING))  # file names byte for byte


# --------------------------------------------------------------------------- findings


def _label_findings(d: _Data, s: AuditSettings, grids: dict | None) -> tuple[list[list], dict, np.ndarray]:
    """(label_issues.csv rows worst first, logreg info, flagged training rows)."""
    resolved = resolve_grids(grids)
    Cs = resolved["logreg"]["C"]
    probs_tr, head = finders.out_of_fold_probabilities(
        d.X[d.tr], d.y[d.tr], folds=s.folds, seed=s.seed, Cs=Cs, max_iter=resolved["max_iter"],
        scoring=resolved["scoring"])
    cols = np.asarray(head.classes_)
    other = np.setdiff1d(np.arange(len(d.y)), d.tr)
    found = []
    for rows, probs in ((d.tr, probs_tr), (other, head.predict_proba(d.X[other]) if len(other) else None)):
        if probs is None:
            continue
        li = finders.label_issues(d.y[rows], probs, classes=cols)
        for p in li.flagged:
            found.append((li.quality[p], int(rows[p]), int(li.suggested[p])))
    found.sort()
    out = [[d.keys[r], d.split[r], d.classes[d.y[r]], d.classes[sug], f"{q:.6f}"] for q, r, sug in found]
    in_tr = np.zeros(len(d.y), bool)
    in_tr[d.tr] = True
    flagged_tr = np.array(sorted(r for _, r, _ in found if in_tr[r]), dtype=np.int64)
    info = {"C": head.best_params_["C"], "cv_score": head.best_score_, "cv_folds": head.n_splits_,
            "classes_scored": len(cols)}
    return out, info, flagged_tr


def _hashes(d: _Data, root: str) -> tuple[list[str | None], dict]:
    """sha256 of each row's file under ``root``; files outside it or unreadable are skipped and counted."""
    hashes: list[str | None] = []
    skipped: list[str] = []
    for key in d.keys:
        p = inside_root(root, key)
        h = None
        if p is not None:
            try:
                h = sha256_file(p)
            except OSError:
                pass
        if h is None:
            skipped.append(key)
        hashes.append(h)
    if skipped:
        log.warning("audit: %d of %d image files could not be read under %s (outside it, moved or unreadable); they "
                    "are left out of the exact-duplicate check", len(skipped), len(d.keys), root)
    return hashes, {"root": root, "hashed": len(d.keys) - len(skipped), "skipped": len(skipped),
                    "skipped_examples": skipped[:20]}


def _cosine(X: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    a, b = X[i].astype(np.float64), X[j].astype(np.float64)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(den > 0, (a * b).sum(1) / np.where(den > 0, den, 1), 0.0)


def _duplicate_findings(d: _Data, s: AuditSettings, hashes: list[str | None]) -> tuple[list[list], dict, np.ndarray]:
    """(duplicates.csv rows: cross-split first, then exact, then most similar; counts; leaked evaluation rows)."""
    pairs: dict[tuple[int, int], tuple[str, float]] = {}
    i, j, sim = finders.similar_pairs(d.X, threshold=s.near_threshold, block=s.block_rows, max_pairs=s.max_pairs,
                                      backend=s.backend)
    for a, b, v in zip(i.tolist(), j.tolist(), sim.tolist()):
        pairs[(a, b)] = ("near", v)
    for g in finders.hash_groups(hashes):
        gi, gj = np.triu_indices(len(g), 1)
        for a, b, v in zip(g[gi].tolist(), g[gj].tolist(), _cosine(d.X, g[gi], g[gj]).tolist()):
            pairs[(min(a, b), max(a, b))] = ("exact", v)
    train = np.zeros(len(d.y), bool)
    train[d.tr] = True
    ev = np.zeros(len(d.y), bool)
    ev[d.ev] = True
    rows, leaked = [], set()
    for (a, b), (kind, v) in pairs.items():
        cross = bool(d.split[a] != d.split[b])
        if train[a] != train[b]:
            leaked.update(r for r in (a, b) if ev[r])
        rows.append((not cross, kind != "exact", -v, a, b, kind))
    rows.sort()
    out = [[d.keys[a], d.keys[b], d.split[a], d.split[b], f"{-nv:.6f}", kind] for _, _, nv, a, b, kind in rows]
    counts = {"duplicate_pairs": len(out), "exact_pairs": sum(r[5] == "exact" for r in out),
              "near_pairs": sum(r[5] == "near" for r in out), "cross_split_pairs": sum(not r[0] for r in rows),
              "leaked_eval_rows": len(leaked)}
    return out, counts, np.array(sorted(leaked), dtype=np.int64)


def _outlier_findings(d: _Data, s: AuditSettings) -> tuple[list[list], list[str]]:
    """(outliers.csv rows, notes): the note when the classes are so tight that near pairs mean little."""
    sim = finders.nearest_in_class(d.X, d.y, d.tr, k=s.neighbours, block=s.block_rows)
    z = finders.outlier_scores(sim, d.y, d.tr)
    flagged = np.flatnonzero(np.nan_to_num(z, nan=-np.inf) >= s.outlier_z)
    flagged = flagged[np.argsort(-z[flagged], kind="stable")]
    typical = float(np.nanmedian(sim[d.tr])) if np.isfinite(sim[d.tr]).any() else 0.0
    notes = []
    if typical >= s.near_threshold - DENSE_MARGIN:
        notes.append(
            f"a typical training image's {s.neighbours} nearest images of its class have cosine {typical:.3f}, close "
            f"to --near-threshold {s.near_threshold}: these features put distinct images of this data set about as "
            "close as copies, so the near pairs (and the leakage they imply) are unreliable here; trust the exact "
            "pairs, or raise --near-threshold")
        log.warning("audit: %s", notes[-1])
    return [[d.keys[r], d.split[r], d.classes[d.y[r]], f"{z[r]:.3f}", f"{sim[r]:.6f}"] for r in flagged], notes


# --------------------------------------------------------------------------- the run


def _timed(seconds: dict, name: str, fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    seconds[name] = round(time.perf_counter() - t0, 3)
    return out


def _summary(counts: dict, report: str | None, out: Path) -> str:
    return (f"{counts['cross_split_pairs']} train/test duplicate pair(s) (evaluation accuracy may be inflated), "
            f"{counts['label_issues']} likely label error(s), {counts['outliers']} outlier(s); see "
            f"{report or out / 'audit.json'}")


def _check(s: AuditSettings) -> None:
    if not -1.0 <= s.near_threshold <= 1.0:
        raise FeatxError(f"--near-threshold {s.near_threshold}: a cosine similarity, between -1 and 1 (default 0.94)")
    for name in ("neighbours", "max_pairs", "block_rows"):
        if getattr(s, name) < 1:
            raise FeatxError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(s, name)}")
    if s.folds < 2:
        raise FeatxError(f"--folds must be at least 2, got {s.folds}")


def audit(cache: FeatureCache | str | os.PathLike | None = None, settings: AuditSettings | None = None, *,
          grids: dict | None = None, mlflow: bool = False, split: Split | None = None) -> AuditResult:
    """Audit a cache (default: the newest in ``settings.cache_dir``); writes the run folder, returns audit.json.

    ``settings``: :class:`featx.config.settings.AuditSettings` (defaults when None); ``grids``: the
    heads' grids (the logistic regression's C grid is the probe's); ``split``: the run's
    :class:`featx.data.splits.Split` (None: drawn from ``test_size``/``seed`` as the probe draws it).
    The folder is written whole (:func:`featx.base.writable.staged_dir`).
    """
    s = settings or AuditSettings()
    _check(s)
    fc = open_single_cache(cache, cache_dir=s.cache_dir, what="featx audit")
    split = split if split is not None else Split.of_cache(fc, test_size=s.test_size, seed=s.seed)
    split.check_matches(test_size=s.test_size, seed=s.seed, n_rows=len(fc), what="audit")
    key = run_key("audit", fc.identity.digest, {k: v for k, v in s.to_dict().items() if k not in ("out_dir", "report")})
    out = Path(s.out_dir) if s.out_dir else default_run_dir("audit", fc.path.stem, key)
    with staged_dir(out, option="--out-dir") as work:
        result = audit_into(fc, s, split, dirs=(work, out), grids=grids)
    if s.report or mlflow:
        result.report_path = publish_run(out, cache=fc, report=s.report, mlflow=mlflow)["report"]
        result.summary = _summary(result.counts, result.report_path, out)
        write_json(out / "audit.json", result.to_dict())
    log.debug("audit: %s", result.summary)  # the CLI prints it
    return result


def audit_into(fc: FeatureCache, s: AuditSettings, split: Split, *, dirs: tuple[Path, Path],
               grids: dict | None) -> AuditResult:
    """Find, write the CSVs and audit.json into ``dirs[0]`` (paths recorded as in ``dirs[1]``); no report."""
    work, out = dirs
    # Image files are read only under a root the user gave here (--data-root, or the root `featx embed` signed).
    root = s.data_root or trusted_root(fc.meta, what=f"hashing the images of {fc.path.name}")
    seconds: dict[str, float] = {}
    d = _timed(seconds, "read", _read, fc, s, split)
    labels_csv, logreg, flagged_tr = _timed(seconds, "label_issues", _label_findings, d, s, grids)
    hashes, hashing = _timed(seconds, "hash_files", _hashes, d, root)
    dup_csv, dup_counts, leaked = _timed(seconds, "duplicates", _duplicate_findings, d, s, hashes)
    out_csv, notes = _timed(seconds, "outliers", _outlier_findings, d, s)
    _csv(work / "label_issues.csv", ["path", "split", "given", "suggested", "score"], labels_csv)
    _csv(work / "duplicates.csv", ["path_a", "path_b", "split_a", "split_b", "similarity", "kind"], dup_csv)
    _csv(work / "outliers.csv", ["path", "split", "label", "score", "knn_similarity"], out_csv)
    files = {k: str(out / f"{k}.csv") for k in ("label_issues", "duplicates", "outliers")}
    n_tr_flag = len(flagged_tr)
    counts = {"rows": len(d.y), "train_rows": len(d.tr), "eval_rows": len(d.ev), "label_issues": len(labels_csv),
              "label_issues_train": n_tr_flag, "label_issues_eval": len(labels_csv) - n_tr_flag, **dup_counts,
              "outliers": len(out_csv)}
    result = AuditResult(
        featx_version=__version__, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        cache=fc.summary(), fingerprint=fc.fingerprint, settings=s.to_dict(), data_root=str(root),
        identity=fc.identity.to_dict(), split=dict(d.split_desc, n_train=len(d.tr), n_eval=len(d.ev)), counts=counts,
        hashing=hashing, logreg=logreg, seconds=seconds, files=files, notes=notes,
        drop={"labels": flagged_tr, "leakage": leaked})
    result.summary = _summary(counts, None, out)
    write_json(work / "audit.json", result.to_dict())
    return result


def audit_for_probe(fc: FeatureCache, settings: AuditSettings, *, out_dir: str | os.PathLike, split: Split,
                    folds: int, grids: dict | None) -> AuditResult:
    """The audit of a probe run: the probe's split, folds and seed, files into the probe's (finished) folder."""
    s = replace(settings, out_dir=str(out_dir), test_size=split.test_size, folds=folds, seed=split.seed, report=False)
    return audit_into(fc, s, split, dirs=(Path(out_dir), Path(out_dir)), grids=grids)
