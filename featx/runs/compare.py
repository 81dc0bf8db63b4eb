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
from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

from ..config import defaults
from .publish import publish_run
from ..base.errors import FeatxError
from ..base.io import atomic_write_bytes, write_json
from ..cache.store import FeatureCache, find_cache
from ..data.splits import train_eval_split
from ..embedding.runner import embed
from ..heads.grids import KERNELS
from .probe import probe
from ..report.compare_chart import plot_chart
from ..finetune.results import CompareResult, FinetuneResult
from ..finetune.settings import STRATEGIES, FinetuneSettings, RunOptions
from ..report.compare_table import markdown_table
from ..finetune.train import finetune as run_finetune

log = logging.getLogger(__name__)

__all__ = ["compare", "CompareSettings", "CompareResult", "markdown_table", "plot_chart", "STRATEGY_ORDER"]

STRATEGY_ORDER = ("head", "partial", "full")  # cheapest first
NOTES = {
    "wall_seconds": "probe: embedding time of the cache + feature loading + head fit (search included) + predict; "
                    "fine-tune: model build + training + validation + evaluation, over resumed runs",
    "images_per_s": "probe: cache rows per second of embedding; fine-tune: training images per second of training",
    "peak_gpu_mem_bytes": "torch.cuda.max_memory_allocated during the fine-tune; n/a off CUDA",
}
_FT = FinetuneSettings()
_C = defaults("compare")  # the typed defaults of `featx compare`


@dataclass(frozen=True)
class CompareSettings:
    """Every option of :func:`compare` (the fine-tune's hyper-parameters default to :class:`FinetuneSettings`)."""

    backbone: str = _C.backbone
    weights: str | os.PathLike | None = None
    cache_dir: str | os.PathLike = _C.cache_dir
    cache: str | os.PathLike | None = None
    manifest: str | os.PathLike | None = None
    limit: int | None = None
    head: str | Sequence[str] = _C.head
    kernel: str = _C.kernel
    folds: int = _C.folds
    test_size: float = _FT.test_size
    seed: int = _FT.seed
    finetune: bool = False
    strategy: str | Sequence[str] = _C.strategy
    epochs: int = _FT.epochs
    batch_size: int = _FT.batch_size
    lr: float = _FT.lr
    backbone_lr_scale: float = _FT.backbone_lr_scale
    weight_decay: float = _FT.weight_decay
    warmup_epochs: float = _FT.warmup_epochs
    label_smoothing: float = _FT.label_smoothing
    partial_blocks: int = _FT.partial_blocks
    val_fraction: float = _FT.val_fraction
    patience: int = _FT.patience
    min_val_images: int = _FT.min_val_images
    device: str = _C.device
    num_workers: int | None = None
    n_jobs: int = _C.n_jobs
    grids: dict | None = None
    out_dir: str | os.PathLike | None = None
    checkpoint_seconds: float = _C.checkpoint_seconds
    overwrite: bool = False
    progress: bool = True

    def validate(self) -> list[str]:
        """Check the options before any work; returns the fine-tune strategies to run (cheapest first)."""
        if self.kernel not in KERNELS:
            raise FeatxError(f"--kernel {self.kernel!r}: expected one of {', '.join(KERNELS)}")
        return parse_strategies(self.strategy) if self.finetune else []

    def heads(self) -> str | list[str]:
        """``head`` as the probe takes it: "all", one name, or a list."""
        if isinstance(self.head, str) and self.head != "all" and "," in self.head:
            return [h.strip() for h in self.head.split(",") if h.strip()]
        return self.head

    def finetune_settings(self, strategy: str) -> FinetuneSettings:
        names = {f.name for f in fields(FinetuneSettings)} - {"strategy", "min_scale"}
        return FinetuneSettings.coerce(strategy=strategy, **{n: getattr(self, n) for n in names})

    def run_options(self, out_dir: Path) -> RunOptions:
        return RunOptions(weights=self.weights, device=self.device, num_workers=self.num_workers, out_dir=out_dir,
                          checkpoint_seconds=self.checkpoint_seconds, overwrite=self.overwrite, progress=self.progress)

    def to_dict(self, *, root, fc: FeatureCache, strategies: list[str], out_dir: Path) -> dict:
        """The settings as saved in ``compare.json`` (the keys it has always had, plus min_val_images)."""
        skip = ("cache_dir", "manifest", "grids", "checkpoint_seconds", "overwrite", "progress")
        d = {k: v for k, v in asdict(self).items() if k not in skip}
        return d | {
            "root": str(root) if root is not None else fc.root, "cache": str(fc.path), "backbone": fc.meta.get("backbone"),
            "weights": None if self.weights is None else str(self.weights), "finetune": bool(self.finetune),
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


def _run_probe(fc, **kwargs) -> dict:
    """The probe stage (a seam so tests can stand in a small result)."""
    result = probe(fc, **kwargs)
    return result.to_dict() if hasattr(result, "to_dict") else result


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
    "resumed_from", "trainable_params", "total_params", "device", "run_dir", "reused",
)


def finetune_row(r: FinetuneResult) -> dict:
    """The table row of one fine-tune."""
    return {k: r.get(k) for k in FINETUNE_ROW_KEYS}


def open_cache(root, cfg: CompareSettings) -> FeatureCache:
    """DATA's cache (embedded or reused), else the given cache, else the newest in ``cache_dir``."""
    if root is None and cfg.manifest is None:
        return FeatureCache(find_cache(cfg.cache, cache_dir=cfg.cache_dir))
    return embed(
        root, backbone=cfg.backbone, weights=cfg.weights, cache_dir=cfg.cache_dir, cache=cfg.cache,
        manifest=cfg.manifest, device=cfg.device, limit=cfg.limit, progress=cfg.progress,
    )


def compare(root: str | os.PathLike | None = None, *, settings: CompareSettings | None = None, report: bool = False,
            mlflow: bool = False, **values) -> CompareResult:
    """Compare the probe heads (and, with ``finetune=True``, each fine-tune ``strategy``).

    Give the dataset ``root`` (embedded into ``cache_dir``, or reused in seconds when the cache
    is complete), an existing ``cache`` file, or neither (the newest cache in ``cache_dir``).
    ``values`` override single fields of ``settings`` (:class:`CompareSettings`).  Returns a
    :class:`CompareResult` (also ``compare.json``): ``rows`` (one per method), ``table``
    (Markdown), ``paths`` (json, markdown, chart), ``split``, ``settings`` and the full
    ``probe`` / ``finetune`` results.  ``report`` also writes ``report.html``; ``mlflow`` logs the run.
    """
    t0 = time.perf_counter()
    unknown = sorted(set(values) - {f.name for f in fields(CompareSettings)})
    if unknown:
        raise TypeError(f"compare() got unexpected keyword argument(s) {', '.join(unknown)}")
    cfg = replace(settings or CompareSettings(), **values)
    strategies = cfg.validate()
    fc = open_cache(root, cfg)
    train_idx, eval_idx, split_desc = train_eval_split(fc.labels(), fc.split_array(), test_size=cfg.test_size, seed=cfg.seed)
    base = Path(cfg.out_dir) if cfg.out_dir is not None else Path("runs") / f"compare-{fc.path.stem}"
    base.mkdir(parents=True, exist_ok=True)

    log.info("compare: probe heads %s on %s (%d train / %d eval rows)", cfg.heads(), fc.path.name, len(train_idx), len(eval_idx))
    probe_result = _run_probe(
        fc, head=cfg.heads(), kernel=cfg.kernel, test_size=cfg.test_size, folds=cfg.folds, seed=cfg.seed,
        device=cfg.device, n_jobs=cfg.n_jobs, grids=cfg.grids, out_dir=base / "probe", save=True,
    )
    rows = probe_rows(probe_result, fc)
    n_eval_probe = probe_result.get("n_eval") or (probe_result.get("split") or {}).get("n_eval")
    if n_eval_probe is not None and int(n_eval_probe) != len(eval_idx):
        log.warning("the probe evaluated %s rows but the shared split has %d; the comparison may be unfair",
                    n_eval_probe, len(eval_idx))
    ft_results: dict[str, FinetuneResult] = {}
    for s in strategies:
        ft_results[s] = run_finetune(fc, settings=cfg.finetune_settings(s), options=cfg.run_options(base))
        rows.append(finetune_row(ft_results[s]))
    split = split_desc | {"n_train": int(len(train_idx)), "n_eval": int(len(eval_idx))}
    result = CompareResult(
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        cache={k: v for k, v in fc.summary().items() if k not in ("classes",)} | {"classes": fc.classes},
        split=split, settings=cfg.to_dict(root=root, fc=fc, strategies=strategies, out_dir=base), rows=rows,
        best=max(rows, key=lambda r: (-1 if math.isnan(r["accuracy"]) else r["accuracy"], -r["wall_seconds"]))["method"],
        table=markdown_table(rows), notes=dict(NOTES), probe=probe_result, finetune=ft_results, seconds=0.0, paths={},
    )
    write_compare_files(result, fc, base, started=t0)
    if report or mlflow:
        result.paths["report"] = publish_run(base, cache=fc, report=report, mlflow=mlflow)["report"]
    return result


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

