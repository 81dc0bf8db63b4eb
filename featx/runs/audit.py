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
from ..cache.trust.roots import sign_root, trusted_root
from ..config.settings import AuditSettings
from ..data.splits import Split
from ..heads.tuning.grids import resolve_grids
from ..heads.tuning.repeated_cv import choose_plain
from ..heads.tuning.rows import held_dim, load_rows
from ..heads.tuning.selection import candidates
from ..report.thumbs import inside_root
from .publish import publish_run

log = logging.getLogger(__name__)

# When the median training image's 5 nearest images of its class are this close to the near-duplicate
# threshold (mean cosine >= threshold - DENSE_MARGIN), the features cannot tell copies from distinct images:
# measured 0.93 on neu_steel and 0.86 on medmnist6 (floods of false pairs) against 0.58-0.78 on the photo
# sets, whose pairs are mostly true copies (ACCURACY.md).  The near pairs are then called unreliable.
DENSE_MARGIN = 0.09

# Repeats of the paired CV that chooses the view when --view is auto (the probe's default --cv-repeats).
VIEW_REPEATS = 3
# label_issues.csv: every row, worst first (issue 33); the first five columns as before.
LABEL_COLUMNS = ["path", "split", "given", "suggested", "score", "flagged", "rank", "confusable"]


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
    label_trust: dict = field(default_factory=dict)  # how far the label flags can be trusted (issue 33)
    data_root_mac: str = ""  # the report reads thumbnails under data_root only when this verifies (issue 31)
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
    Xn: np.ndarray  # the neighbour finders' features (duplicates, outliers): the final view unless --view was given


def _read(fc: FeatureCache, s: AuditSettings, split: Split, given_view: bool = True) -> _Data:
    labels, splits = fc.labels(), fc.split_array()
    tr, ev, desc = split.train, split.eval, split.desc
    shown = splits.astype(object).copy()
    if desc.get("kind") == "holdout":
        shown[ev] = "holdout"
    X = fc.features(None, view=s.view)
    # The neighbour finders read the final features, on which --near-threshold is calibrated, unless --view was given.
    Xn = X if s.view == "final" or given_view or "final" not in fc.views else fc.features(None, view="final")
    return _Data(X, labels, fc.keys(), shown.astype(str), tr, ev, list(fc.classes), desc, Xn)


def _audit_view(fc: FeatureCache, s: AuditSettings, split: Split) -> tuple[str, str]:
    """(the view the audit reads, how it was chosen): ``--view`` as given, else the probe's choice for logreg.

    ``auto``: the cache's only view, or among its views the one the probe's repeated paired CV
    (:func:`featx.heads.tuning.repeated_cv.choose_plain`, logreg's proxy, the probe's default
    repeats) chooses on these training rows; ``featx probe --audit`` passes the view its head chose.
    """
    if s.view != "auto":
        return s.view, "given"
    views = list(fc.views)
    if len(views) == 1:
        return views[0], "the cache's only view"
    cands = candidates("auto", "none", views, cache_name=fc.path.name)
    rows = load_rows(fc, split, max_train_rows=None, dim=held_dim(fc, cands), seed=s.seed)
    table, chosen, _ = choose_plain(rows, cands, head="logreg", folds=s.folds, repeats=VIEW_REPEATS, seed=s.seed)
    return table[chosen].view, f"repeated paired CV over {', '.join(views)} (the probe's choice for logreg)"


def _csv(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(csv_row(r) for r in rows)  # names never run as formulas in a spreadsheet
    return atomic_write_bytes(path, buf.getvalue().encode(**CSV_ENCODING))  # file names byte for byte


# --------------------------------------------------------------------------- findings


def _label_findings(d: _Data, s: AuditSettings, grids: dict | None) -> tuple[list[list], dict, np.ndarray]:
    """(label_issues.csv rows: every row ranked, worst first; logreg and trust info; flagged training rows).

    Training rows are ranked by out-of-fold probabilities over training rows only
    (:func:`featx.audit.finders.rank_label_issues`, C by out-of-fold log-loss); evaluation rows by
    the same model refitted on all training rows.  Flags are cleanlab's, per part.
    """
    resolved = resolve_grids(grids)
    rk = finders.rank_label_issues(d.X[d.tr], d.y[d.tr], folds=s.folds, seed=s.seed, Cs=resolved["logreg"]["C"],
                                   max_iter=resolved["max_iter"], scoring=resolved["scoring"])
    trust = finders.label_trust(d.y[d.tr], rk)
    other = np.setdiff1d(np.arange(len(d.y)), d.tr)
    flagged, quality, suggested = np.zeros(len(d.y), bool), np.full(len(d.y), np.nan), np.asarray(d.y).copy()
    flagged[d.tr], quality[d.tr], suggested[d.tr] = rk.flagged_mask, rk.quality, rk.suggested
    if len(other):
        probs = rk.probabilities(d.X[other])
        li = finders.label_issues(d.y[other], probs, classes=rk.classes)
        flagged[other[li.flagged]] = True
        quality[other], suggested[other] = li.quality, li.suggested
    conf_pairs = trust.pop("_pairs")
    rows = np.argsort(np.nan_to_num(quality, nan=np.inf), kind="stable")
    is_tr = np.zeros(len(d.y), bool)
    is_tr[d.tr] = True
    ranks = np.zeros(len(d.y), np.int64)  # the rank among the rows of its own part: training rows, evaluation rows
    for part in (is_tr[rows], ~is_tr[rows]):
        ranks[rows[part]] = np.arange(1, int(part.sum()) + 1)
    out = []
    for r in rows.tolist():
        rank = int(ranks[r])
        g, sug = int(d.y[r]), int(suggested[r])
        q = f"{quality[r]:.6f}" if np.isfinite(quality[r]) else ""
        out.append([d.keys[r], d.split[r], d.classes[g], d.classes[sug], q, int(flagged[r]), rank,
                    int(bool(flagged[r]) and (g, sug) in conf_pairs)])
    flagged_tr = np.flatnonzero(flagged[d.tr])
    info = {"C": rk.C, "cv_score": rk.head.best_score_, "cv_folds": rk.head.n_splits_, "classes_scored": len(rk.classes),
            "temperature": round(rk.temperature, 4), "cv_log_loss": round(rk.log_loss, 4), "trust": trust}
    return out, info, np.sort(d.tr[flagged_tr]).astype(np.int64)


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
    i, j, sim = finders.similar_pairs(d.Xn, threshold=s.near_threshold, block=s.block_rows, max_pairs=s.max_pairs,
                                      backend=s.backend)
    for a, b, v in zip(i.tolist(), j.tolist(), sim.tolist()):
        pairs[(a, b)] = ("near", v)
    for g in finders.hash_groups(hashes):
        gi, gj = np.triu_indices(len(g), 1)
        for a, b, v in zip(g[gi].tolist(), g[gj].tolist(), _cosine(d.Xn, g[gi], g[gj]).tolist()):
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
    sim = finders.nearest_in_class(d.Xn, d.y, d.tr, k=s.neighbours, block=s.block_rows)
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


def _summary(counts: dict, report: str | None, out: Path, *, eval_name: str = "test", trust: dict | None = None) -> str:
    """The terminal line: the split names of the data, and the label wording the evidence allows (issue 33)."""
    trust = trust or {}
    labels = (f"{counts['label_issues']} likely label error(s)" if trust.get("reliable", True) else
              f"{counts['label_issues']} label(s) for review (not likely errors: {trust.get('why', 'weak probe')})")
    return (f"{counts['cross_split_pairs']} train/{eval_name} duplicate pair(s) (evaluation accuracy may be "
            f"inflated), {labels}, {counts['outliers']} outlier(s); see {report or out / 'audit.json'}")


def _eval_name(split_desc: dict) -> str:
    """The evaluation split as the data names it ("val" stays "val"; a drawn hold-out is "holdout")."""
    return "holdout" if split_desc.get("kind") == "holdout" else str(split_desc.get("eval_split") or "test")


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
        result.summary = _summary(result.counts, result.report_path, out, eval_name=_eval_name(result.split),
                                  trust=result.logreg.get("trust"))
        write_json(out / "audit.json", result.to_dict())
    log.debug("audit: %s", result.summary)  # the CLI prints it
    return result


def audit_into(fc: FeatureCache, s: AuditSettings, split: Split, *, dirs: tuple[Path, Path],
               grids: dict | None, chosen: bool = False) -> AuditResult:
    """Find, write the CSVs and audit.json into ``dirs[0]`` (paths recorded as in ``dirs[1]``); no report."""
    work, out = dirs
    # Image files are read only under a root the user gave here (--data-root, or the root `featx embed` signed).
    root = s.data_root or trusted_root(fc.meta, what=f"hashing the images of {fc.path.name}")
    seconds: dict[str, float] = {}
    view, view_how = _timed(seconds, "view", _audit_view, fc, s, split)
    view_how = "the probe's head's choice" if chosen else view_how
    asked, s = s, replace(s, view=view)
    d = _timed(seconds, "read", _read, fc, s, split, view_how == "given")
    labels_csv, logreg, flagged_tr = _timed(seconds, "label_issues", _label_findings, d, s, grids)
    hashes, hashing = _timed(seconds, "hash_files", _hashes, d, root)
    dup_csv, dup_counts, leaked = _timed(seconds, "duplicates", _duplicate_findings, d, s, hashes)
    out_csv, notes = _timed(seconds, "outliers", _outlier_findings, d, s)
    _csv(work / "label_issues.csv", LABEL_COLUMNS, labels_csv)
    _csv(work / "duplicates.csv", ["path_a", "path_b", "split_a", "split_b", "similarity", "kind"], dup_csv)
    _csv(work / "outliers.csv", ["path", "split", "label", "score", "knn_similarity"], out_csv)
    files = {k: str(out / f"{k}.csv") for k in ("label_issues", "duplicates", "outliers")}
    n_tr_flag = len(flagged_tr)
    n_flag = sum(r[5] for r in labels_csv)
    counts = {"rows": len(d.y), "train_rows": len(d.tr), "eval_rows": len(d.ev), "label_issues": n_flag,
              "label_issues_train": n_tr_flag, "label_issues_eval": n_flag - n_tr_flag, "labels_ranked": len(labels_csv),
              **dup_counts, "outliers": len(out_csv)}
    logreg["view"], logreg["view_choice"] = view, view_how
    logreg["neighbours_view"] = view if d.Xn is d.X else "final"
    trust = logreg["trust"]
    if not trust["reliable"]:
        notes.insert(0, trust["note"])
        log.warning("audit: %s", trust["note"])
    result = AuditResult(
        featx_version=__version__, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        cache=fc.summary(), fingerprint=fc.fingerprint, settings=asked.to_dict(), data_root=str(root),
        identity=fc.identity.to_dict(), split=dict(d.split_desc, n_train=len(d.tr), n_eval=len(d.ev)), counts=counts,
        hashing=hashing, logreg=logreg, seconds=seconds, files=files, notes=notes,
        drop={"labels": flagged_tr, "leakage": leaked}, label_trust={k: v for k, v in trust.items() if k != "note"},
        data_root_mac=sign_root(str(root), fc.fingerprint) if root else "")
    result.summary = _summary(counts, None, out, eval_name=_eval_name(d.split_desc), trust=trust)
    write_json(work / "audit.json", result.to_dict())
    return result


def audit_for_probe(fc: FeatureCache, settings: AuditSettings, *, out_dir: str | os.PathLike, split: Split,
                    folds: int, grids: dict | None, chosen: bool = False) -> AuditResult:
    """The audit of a probe run: the probe's split, folds and seed, files into the probe's (finished) folder.

    ``chosen``: ``settings.view`` is the view the probe's head chose (not one the user gave)."""
    s = replace(settings, out_dir=str(out_dir), test_size=split.test_size, folds=folds, seed=split.seed, report=False)
    return audit_into(fc, s, split, dirs=(Path(out_dir), Path(out_dir)), grids=grids, chosen=chosen)
