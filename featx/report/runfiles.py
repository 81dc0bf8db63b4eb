"""What a run folder holds: the probe's metrics.json, compare.json, fewshot.json, and the cache they name.

Why: the report (and the MLflow logger) are built from files on disk, never from objects in
memory, so ``featx report`` works on any run folder written before, also after a move.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ..base.errors import FeatxError
from ..cache.identity import same_source
from ..cache.multi import MultiCache
from ..cache.multi import open_cache as open_any_cache
from ..cache.store import FeatureCache

log = logging.getLogger(__name__)

RUN_FILES = ("metrics.json", "compare.json", "fewshot.json", "audit.json")


@dataclass
class RunFiles:
    """The JSON of one run folder; ``probe_dir`` is where metrics.json and the heads are."""

    run_dir: Path
    metrics: dict | None = None
    probe_dir: Path | None = None
    compare: dict | None = None
    fewshot: dict | None = None
    fewshot_dir: Path | None = None  # where fewshot.json was found: this folder, or a few-shot run of the same cache
    audit: dict | None = None  # featx audit / probe --audit

    @property
    def cache_info(self) -> dict:
        """The cache summary recorded by whichever stage ran (path, classes, root, splits...)."""
        for src in (self.metrics, self.compare, self.fewshot, self.audit):
            if src and isinstance(src.get("cache"), dict):
                return src["cache"]
        return {}

    def to_dict(self) -> dict:
        return {"run_dir": str(self.run_dir), "probe_dir": str(self.probe_dir) if self.probe_dir else None,
                "has_metrics": self.metrics is not None, "has_compare": self.compare is not None,
                "has_fewshot": self.fewshot is not None}


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise FeatxError(f"{path} is unreadable ({exc}); rerun the command that wrote it") from None
    if not isinstance(data, dict):
        raise FeatxError(f"{path} is not a featx result (expected a JSON object); rerun the command that wrote it")
    return data


def load_run(run_dir: str | os.PathLike) -> RunFiles:
    """Read a run folder written by ``featx probe``, ``compare`` or ``fewshot``."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FeatxError(f"run folder {str(run_dir)!r} does not exist; pass a folder under runs/ (or run `featx probe`)")
    run = RunFiles(run_dir=run_dir)
    run.compare = _read_json(run_dir / "compare.json")
    run.fewshot = _read_json(run_dir / "fewshot.json")
    run.fewshot_dir = run_dir if run.fewshot is not None else None
    run.audit = _read_json(run_dir / "audit.json")
    for d in (run_dir, run_dir / "probe"):
        m = _read_json(d / "metrics.json")
        if m is not None:
            run.metrics, run.probe_dir = m, d
            break
    if run.fewshot is None and run.metrics is not None:
        run.fewshot_dir = sibling_fewshot(run_dir, run.metrics)
        run.fewshot = _read_json(run.fewshot_dir / "fewshot.json") if run.fewshot_dir else None
    if run.metrics is None and run.compare is None and run.fewshot is None and run.audit is None:
        raise FeatxError(
            f"{run_dir} holds no featx results ({', '.join(RUN_FILES)}); pass a folder written by "
            "`featx probe`, `featx compare` or `featx fewshot`"
        )
    return run


def sibling_fewshot(run_dir: Path, record: dict | None) -> Path | None:
    """The newest few-shot run beside ``run_dir`` on the same cache as ``record`` (the probe's metrics.json):
    the same data *and* embedding settings (:func:`featx.cache.identity.same_source`).  A run that
    records no identity (older featx) is never joined, since its data cannot be told apart."""
    if not isinstance(record, dict) or not run_dir.parent.is_dir():
        return None
    found = []
    for sub in run_dir.parent.iterdir():
        f = sub / "fewshot.json"
        if sub != run_dir and f.is_file():
            try:
                doc = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if same_source(record, doc):
                found.append((f.stat().st_mtime, sub))
    return max(found)[1] if found else None


def find_run(runs_dir: str | os.PathLike = "runs") -> Path:
    """The run ``featx report`` means without RUN_DIR: the newest probe or compare run under ``runs_dir``.

    A few-shot run is not a report of its own when a probe or compare run exists: its curve joins the
    report of the probe on the same cache (:func:`sibling_fewshot`).  Only without any probe or compare
    run is the newest few-shot run the one.
    """
    d = Path(runs_dir)
    found = []
    if d.is_dir():
        for sub in d.iterdir():
            stamps = [(sub / f).stat().st_mtime for f in RUN_FILES if (sub / f).is_file()]
            stamps += [(sub / "probe" / "metrics.json").stat().st_mtime] if (sub / "probe" / "metrics.json").is_file() else []
            if stamps:
                probe_or_compare = any((sub / f).is_file() for f in ("metrics.json", "compare.json"))
                found.append((probe_or_compare, max(stamps), sub))
    if not found:
        raise FeatxError(f"no run folder in {str(d)!r}; run `featx probe` first, or pass RUN_DIR")
    return max(found)[2]


def open_cache(run: RunFiles, cache: FeatureCache | str | os.PathLike | None = None) -> FeatureCache | None:
    """The run's cache (``cache`` when given), or None with a log line when it is gone."""
    if isinstance(cache, (FeatureCache, MultiCache)):
        return cache
    path = cache if cache is not None else run.cache_info.get("path")
    if not path:
        return None
    try:
        fc = open_any_cache(path)  # a cache, or a set of several backbones' caches
    except FeatxError as exc:
        log.warning("report: the run's cache cannot be opened (%s); images, failures and the map are left out", exc)
        return None
    fp = (run.metrics or {}).get("fingerprint") or run.cache_info.get("fingerprint")
    if fp and fc.fingerprint != fp:
        log.warning("report: cache %s was rebuilt with other settings since this run; images and the map are left out", path)
        return None
    return fc
