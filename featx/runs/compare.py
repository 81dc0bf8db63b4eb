"""``featx compare``: the linear probe's heads against end-to-end fine-tuning, one report.

Why: after a probe, the next question is whether training the whole network is worth it on
this data.  :func:`compare` embeds (or reuses) the cache, runs the probe heads, optionally
fine-tunes the same backbone with each strategy on exactly the same train/evaluation rows
(:func:`featx.data.train_eval_split` with the same ``test_size``/``seed``), and writes one
table (``compare.md`` and ``compare.json``) plus a chart of accuracy against wall time
(``compare.png``) into ``runs/compare-<cache stem>/`` (or ``out_dir``).

How the columns are counted, so that the comparison is fair:

- **wall time**: probe = the cache's total embedding time (``embed_seconds`` recorded in the
  cache, resumed runs included) + reading the features + the head's fit (hyper-parameter
  search included) + predict;
  fine-tune = everything the fine-tune took (model build, training, validation, evaluation),
  summed over resumed runs.
- **images/s**: the throughput of each method's network stage: probe = cache rows embedded per
  second of embedding; fine-tune = training images (passes) per second of training.
- **peak GPU memory**: ``torch.cuda.max_memory_allocated`` during the fine-tune (CUDA only);
  the probe's is shown only when the probe reports one.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..base.choices import KERNELS
from ..base.errors import FeatxError
from ..base.io import atomic_write_bytes, write_json
from ..base.writable import default_run_dir, run_key
from ..cache.store import FeatureCache, find_cache
from ..config import CompareSettings, ProbeSettings
from ..data.splits import Split
from ..embedding.runner import embed
from ..finetune.results import CompareResult, FinetuneResult
from ..finetune.settings import STRATEGIES, FinetuneSettings, RunOptions
from ..finetune.train import finetune as run_finetune
from ..report.compare_table import markdown_table
from ..report.plots.compare_chart import plot_chart
from .probe import probe
from .publish import publish_run

log = logging.getLogger(__name__)

__all__ = ["compare", "CompareSettings", "CompareResult", "markdown_table", "plot_chart", "STRATEGY_ORDER"]

STRATEGY_ORDER = ("head", "partial", "full")  # cheapest first
NOTES = {
    "wall_seconds": "probe: embedding time of the cache + feature loading + head fit (search included) + predict; "
                    "fine-tune: model build + training + validation + evaluation, over resumed runs",
    "images_per_s": "probe: cache rows per second of embedding; fine-tune: training images per second of training",
    "peak_gpu_mem_bytes": "torch.cuda.max_memory_allocated during the fine-tune; n/a off CUDA",
}


# compare.json's "settings": the library's names of the options, in the order the file has always had.
_SAVED = ("backbone", "weights", "cache", "limit", "head", "kernel", "folds", "test_size", "seed", "finetune",
          "strategy", "epochs", "batch_size", "lr", "backbone_lr_scale", "weight_decay", "warmup_epochs",
          "label_smoothing", "partial_blocks", "val_fraction", "patience", "min_val_images", "device", "num_workers",
          "n_jobs", "out_dir")


def check_settings(cfg: CompareSettings) -> list[str]:
    """Check the options before any work; returns the fine-tune strategies to run (cheapest first)."""
    if cfg.kernel not in KERNELS:
        raise FeatxError(f"--kernel {cfg.kernel!r}: expected one of {', '.join(KERNELS)}")
    return parse_strategies(cfg.strategy) if cfg.finetune else []


def probe_heads(cfg: CompareSettings) -> str | list[str]:
    """``head`` as the probe takes it: "all", one name, or a list."""
    if isinstance(cfg.head, str) and cfg.head != "all" and "," in cfg.head:
        return [h.strip() for h in cfg.head.split(",") if h.strip()]
    return cfg.head


def finetune_settings(cfg: CompareSettings, strategy: str) -> FinetuneSettings:
    names = {f.name for f in fields(FinetuneSettings)} - {"strategy", "min_scale"}
    return FinetuneSettings.coerce(strategy=strategy, **{n: getattr(cfg, n) for n in names})


def run_options(cfg: CompareSettings, out_dir: Path, *, progress: bool) -> RunOptions:
    return RunOptions(weights=cfg.weights, device=cfg.device, num_workers=cfg.workers, out_dir=out_dir,
                      checkpoint_seconds=cfg.checkpoint_seconds, overwrite=cfg.overwrite, progress=progress)


def settings_dict(cfg: CompareSettings, *, root, fc: FeatureCache, strategies: list[str], out_dir: Path) -> dict:
    """The settings as saved in ``compare.json`` (the keys it has always had, plus min_val_images)."""
    lib = cfg.library_kwargs()
    d = {k: lib[k] for k in _SAVED}
    return d | {
        "root": str(root) if root is not None else fc.root, "cache": str(fc.path), "backbone": fc.meta.get("backbone"),
        "weights": None if cfg.weights is None else str(cfg.weights), "finetune": bool(cfg.finetune),
        "strategy": strategies, "out_dir": str(out_dir),
    }


def parse_strategies(strategies) -> list[str]:
    """``"all"``, a comma list or a sequence of strategy names, validated and deduplicated."""
    if strategies is None or strategies == "all":
        return list(STRATEGY_ORDER)
    if isinstance(strategies, str):
        strategies = [s.strip() for s in strategies.split(",") if s.strip()]
    out: list[str] = []
    for s in strategies:
        if s == "all":
            return list(STRATEGY_ORDER)
        if s not in STRATEGIES:
            raise FeatxError(f"--strategy {s!r}: expected one of {', '.join(STRATEGIES)} or all")
        if s not in out:
            out.append(s)
    if not out:
        raise FeatxError("--strategy: give at least one of full, partial, head (or all)")
    return out


def probe_rows(probe_result: dict, fc: FeatureCache) -> list[dict]:
    """One table row per probe head; its wall time includes embedding the cache."""
    embed_s = fc.meta.get("embed_seconds")
    if not embed_s:  # None, or 0 for a cache assembled from --shard or Ray chunks embedded elsewhere
        log.warning("cache %s does not record its embedding time (assembled from shards?); the probe's wall time "
                    "leaves it out", fc.path)
        embed_s = 0.0
    embed_s = float(embed_s)
    load_s = float(probe_result.get("load_seconds") or 0.0)  # reading the features from the cache
    rows = []
    for name, h in (probe_result.get("heads") or {}).items():
        fit = float(h.get("fit_seconds") or 0.0)
        pred = float(h.get("predict_seconds") or 0.0)
        rows.append(
            {
                "method": f"probe-{name}", "kind": "probe", "head": name, "accuracy": float(h["accuracy"]),
                "balanced_accuracy": float(h["balanced_accuracy"]), "macro_f1": float(h["macro_f1"]),
                "wall_seconds": embed_s + load_s + fit + pred, "embed_seconds": embed_s, "load_seconds": load_s,
                "fit_seconds": fit, "predict_seconds": pred,
                "images_per_s": (len(fc) / embed_s) if embed_s > 0 else None,
                "peak_gpu_mem_bytes": h.get("peak_gpu_mem_bytes"), "params": h.get("params"),
                "view": h.get("view"), "norm": h.get("norm"), "train_views": h.get("train_views"),
            }
        )
    if not rows:
        raise FeatxError("the probe returned no heads; pass --head all (or a list such as logreg,svm)")
    return rows


FINETUNE_ROW_KEYS = (
    "method", "kind", "strategy", "accuracy", "balanced_accuracy", "macro_f1", "wall_seconds", "train_seconds",
    "eval_seconds", "images_per_s", "peak_gpu_mem_bytes", "epochs_run", "best_epoch", "stopped_early",
    "resumed_from", "trainable_params", "total_params", "device", "run_dir", "reused", "features",
)


def finetune_row(r: FinetuneResult) -> dict:
    """The table row of one fine-tune."""
    return {k: r.get(k) for k in FINETUNE_ROW_KEYS}


def open_cache(root, cfg: CompareSettings, *, progress: bool = True) -> FeatureCache:
    """DATA's cache (embedded or reused), else the given cache, else the newest in ``cache_dir``."""
    if root is None and cfg.manifest is None:
        return FeatureCache(find_cache(cfg.cache_path, cache_dir=cfg.cache_dir))
    return embed(
        root, backbone=cfg.backbone, weights=cfg.weights, cache_dir=cfg.cache_dir, cache=cfg.cache_path,
        manifest=cfg.manifest, device=cfg.device, limit=cfg.limit, progress=progress,
    )


# Keywords of compare() that are not options of `featx compare`, with their library defaults.
_EXTRAS = {"grids": None, "progress": True, "report": None}


def compare(root: str | os.PathLike | None = None, *, settings: CompareSettings | None = None,
            **overrides: Any) -> CompareResult:
    """Compare the probe heads (and, with ``finetune=True``, each fine-tune ``strategy``).

    Give the dataset ``root`` (embedded into ``cache_dir``, or reused in seconds when the cache
    is complete), an existing ``cache`` file, or neither (the newest cache in ``cache_dir``).
    ``settings``: the options of ``featx compare`` (:class:`featx.config.CompareSettings`); keyword
    ``overrides`` replace single fields (``cache`` and ``num_workers`` name ``cache_path`` and
    ``workers``); an unknown name is a TypeError.  Library-only keywords: ``grids``, ``progress``
    and ``report`` (default: what a ``settings`` object says, else none, as :func:`featx.probe`).
    Returns a :class:`CompareResult` (also ``compare.json``): ``rows`` (one per method), ``table``
    (Markdown), ``paths`` (json, markdown, chart), ``split``, ``settings`` and the full
    ``probe`` / ``finetune`` results.  ``mlflow`` logs the run.
    """
    t0 = time.perf_counter()
    cfg, x = CompareSettings.with_overrides(settings, overrides, call="compare", extras=_EXTRAS)
    report = x["report"] if x["report"] is not None else (settings is not None and cfg.report)
    strategies = check_settings(cfg)
    fc = open_cache(root, cfg, progress=x["progress"])
    split = Split.of_cache(fc, test_size=cfg.test_size, seed=cfg.seed)  # the one split of both sides
    base = Path(cfg.out_dir) if cfg.out_dir is not None else default_run_dir("compare", fc.path.stem, compare_run_key(fc, cfg, split))
    base.mkdir(parents=True, exist_ok=True)
    log.info("compare: probe heads %s on %s (%d train / %d eval rows)", probe_heads(cfg), fc.path.name,
             len(split.train), len(split.eval))
    probe_result = probe(fc, settings=probe_settings(cfg, base / "probe"), grids=x["grids"], save=True, split=split)
    rows = probe_rows(probe_result.to_dict(), fc)
    ft_results: dict[str, FinetuneResult] = {}
    for s in strategies:
        ft_results[s] = run_finetune(fc, settings=finetune_settings(cfg, s), split=split,
                                     options=run_options(cfg, base, progress=x["progress"]))
        rows.append(finetune_row(ft_results[s]))
    result = CompareResult(
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        cache={k: v for k, v in fc.summary().items() if k not in ("classes",)} | {"classes": fc.classes},
        split=split.to_dict(), settings=settings_dict(cfg, root=root, fc=fc, strategies=strategies, out_dir=base),
        rows=rows, table=markdown_table(rows), notes=dict(NOTES), probe=probe_result.to_dict(), finetune=ft_results,
        best=max(rows, key=lambda r: (-1 if math.isnan(r["accuracy"]) else r["accuracy"], -r["wall_seconds"]))["method"],
        seconds=0.0, paths={},
    )
    write_compare_files(result, fc, base, started=t0)
    if report or cfg.mlflow:
        result.paths["report"] = publish_run(base, cache=fc, report=report, mlflow=cfg.mlflow)["report"]
    return result


# The probe's settings that `featx compare` passes through as the user set them.
PROBE_PASSED = ("kernel", "folds", "test_size", "seed", "device", "n_jobs", "view", "norm", "train_views",
                "cv_repeats", "max_train_rows", "solver", "stream_epochs", "cache_dir")


def probe_settings(cfg: CompareSettings, out_dir: Path) -> ProbeSettings:
    """The probe inside compare: the user's probe settings, its heads, its folder under the compare run's."""
    return ProbeSettings(head=probe_heads(cfg), out_dir=str(out_dir), report=False,
                                **{n: getattr(cfg, n) for n in PROBE_PASSED})


def compare_run_key(fc, cfg: CompareSettings, split: Split) -> str:
    """What the compare reads and every setting that changes its results (names its default folder)."""
    doc = {k: v for k, v in asdict(cfg).items() if k not in ("out_dir", "report", "mlflow", "quiet", "as_json",
                                                              "n_jobs", "workers", "overwrite", "checkpoint_seconds")}
    return run_key("compare", fc.identity.digest, doc, split.to_dict())


def write_compare_files(result: CompareResult, fc: FeatureCache, base: Path, *, started: float) -> None:
    """``compare.png``, ``compare.md`` and ``compare.json`` into ``base`` (paths recorded in ``result``)."""
    dataset = Path(fc.root).name or fc.path.stem
    title = (
        f"{dataset}: accuracy vs wall time - {fc.meta.get('backbone')}, "
        f"{result.split['n_eval']} evaluation images ({result.split.get('eval_split')})"
    )
    chart = plot_chart(result.rows, base / "compare.png", title=title)
    result.paths = {"json": str(base / "compare.json"), "markdown": str(base / "compare.md"), "chart": str(chart)}
    result.seconds = time.perf_counter() - started
    atomic_write_bytes(base / "compare.md", f"# featx compare: {dataset}\n\n{title}\n\n{result.table}\n".encode())
    write_json(base / "compare.json", result.to_dict())
    log.info("compare: wrote %s, %s and %s", result.paths["markdown"], result.paths["json"], chart)

