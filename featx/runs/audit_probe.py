"""``featx probe --audit`` and ``--drop-flagged``: the audit inside a probe run, and what its findings cost.

``--drop-flagged leakage,labels`` probes a second time, leaving out the training rows whose
labels the audit flags (``labels``) and the evaluation rows that have a duplicate among the
training rows (``leakage``), and puts both results side by side (``drop_flagged.json``, the
report, the terminal).  Only rows of the cache are left out: no image file is deleted, moved or
written.  Without these options ``featx probe`` runs exactly as before.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ..base.errors import FeatxError
from ..base.io import write_json
from ..cache.multi import open_single_cache
from ..cache.store import FeatureCache
from ..config.settings import AuditSettings, ProbeSettings
from ..data.splits import Split
from .audit import audit_for_probe
from .probe import ProbeResult, probe
from .publish import publish_run

log = logging.getLogger(__name__)

DROP_KINDS = ("leakage", "labels")
DROP_NAME = "drop_flagged.json"


def parse_drop(text: str | None) -> list[str]:
    """``"leakage,labels"`` -> ["leakage", "labels"]; a clear error for anything else."""
    if text is None:
        return []
    kinds = [k.strip() for k in str(text).split(",") if k.strip()]
    bad = [k for k in kinds if k not in DROP_KINDS]
    if not kinds or bad:
        raise FeatxError(f"--drop-flagged {text!r}: expected leakage, labels or leakage,labels")
    return list(dict.fromkeys(kinds))


def _side_by_side(base: ProbeResult, dropped: ProbeResult, exclude: dict, kinds: list[str]) -> dict[str, Any]:
    heads = {}
    lines = ["| head | accuracy, all rows | accuracy, flagged rows left out | change |", "|---|---|---|---|"]
    for name, h in base["heads"].items():
        d = dropped["heads"][name]
        heads[name] = {"accuracy": h["accuracy"], "accuracy_ci95": h.get("accuracy_ci95"),
                       "accuracy_dropped": d["accuracy"], "accuracy_dropped_ci95": d.get("accuracy_ci95"),
                       "n_train": base["split"]["n_train"], "n_eval": base["split"]["n_eval"],
                       "n_train_dropped": dropped["split"]["n_train"], "n_eval_dropped": dropped["split"]["n_eval"]}
        lines.append(f"| {name} | {h['accuracy']:.4f} (n={base['split']['n_eval']}) | {d['accuracy']:.4f} "
                     f"(n={dropped['split']['n_eval']}) | {100 * (d['accuracy'] - h['accuracy']):+.1f} points |")
    return {"kinds": kinds, "dropped_train_rows": int(len(exclude["train"])), "dropped_eval_rows": int(len(exclude["eval"])),
            "heads": heads, "table": "\n".join(lines), "run_dir": dropped["out_dir"],
            "note": "Only rows of the cache were left out; no image file was deleted, moved or written."}


def probe_audited(cache: FeatureCache | str | os.PathLike | None, settings: ProbeSettings, *,
                  grids: dict | None = None, audit_settings: AuditSettings | None = None) -> ProbeResult:
    """``featx probe --audit [--drop-flagged KINDS]``: the probe, then the audit into its folder, then the report.

    ``settings``: the probe's options (its result is the same as without the audit).  With
    ``settings.drop_flagged`` a second probe without the flagged rows is written to
    ``<run>/drop-flagged/`` and compared in ``drop_flagged.json`` (also ``result["drop_flagged"]``).
    """
    kinds = parse_drop(settings.drop_flagged)
    s = replace(settings, mlflow=False)
    fc = open_single_cache(cache, cache_dir=s.cache_dir, what="featx probe --audit")
    split = Split.of_cache(fc, test_size=s.test_size, seed=s.seed)  # one split: the probe's, the audit's, the re-probe's
    result = probe(fc, settings=s, grids=grids, report=False, split=split)
    out = Path(result.out_dir)
    a_s = audit_settings or AuditSettings()
    if a_s.view == "auto":  # the audit reads the view the probe's head chose (logreg's, else the first head's)
        heads = result["heads"]
        a_s = replace(a_s, view=(heads.get("logreg") or next(iter(heads.values())))["view"])
    aud = audit_for_probe(fc, a_s, out_dir=out, split=split, folds=s.folds, grids=grids, chosen=a_s is not audit_settings)
    result.audit = aud.to_dict()
    if kinds:
        empty = np.zeros(0, np.int64)
        exclude = {"train": aud.drop["labels"] if "labels" in kinds else empty,
                   "eval": aud.drop["leakage"] if "leakage" in kinds else empty}
        dropped = probe(fc, settings=replace(s, out_dir=str(out / "drop-flagged")), grids=grids, save=False,
                        plots=False, report=False, exclude_rows=exclude, split=split)
        result.drop_flagged = _side_by_side(result, dropped, exclude, kinds)
        write_json(out / DROP_NAME, result.drop_flagged)
    if settings.report or settings.mlflow:
        result.report_path = publish_run(out, cache=fc, report=settings.report, mlflow=settings.mlflow)["report"]
        write_json(out / "metrics.json", result.to_dict())
    return result
