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

import json
import logging
import math
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

from ..base.errors import FeatxError
from ..base.io import write_json
from ..cache.store import FeatureCache, find_cache
from ..data.splits import train_eval_split
from ..embedding.runner import embed
from ..heads.probing import probe
from .train import STRATEGIES, finetune as run_finetune

log = logging.getLogger(__name__)

STRATEGY_ORDER = ("head", "partial", "full")  # cheapest first


def _strategies(strategies) -> list[str]:

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
    return probe(fc, **kwargs)


def _probe_rows(probe_result: dict, fc) -> list[dict]:
    embed_s = fc.meta.get("embed_seconds")
    if embed_s is None:
        log.warning("cache %s does not record its embedding time; the probe's wall time leaves it out", fc.path)
        embed_s = 0.0
    embed_s = float(embed_s)
    load_s = float(probe_result.get("load_seconds") or 0.0)  # reading the features from the cache
    rows = []
    for name, h in (probe_result.get("heads") or {}).items():
        fit = float(h.get("fit_seconds") or 0.0)
        pred = float(h.get("predict_seconds") or 0.0)
        rows.append(
            {
                "method": f"probe-{name}",
                "kind": "probe",
                "head": name,
                "accuracy": float(h["accuracy"]),
                "balanced_accuracy": float(h["balanced_accuracy"]),
                "macro_f1": float(h["macro_f1"]),
                "wall_seconds": embed_s + load_s + fit + pred,
                "embed_seconds": embed_s,
                "load_seconds": load_s,
                "fit_seconds": fit,
                "predict_seconds": pred,
                "images_per_s": (len(fc) / embed_s) if embed_s > 0 else None,
                "peak_gpu_mem_bytes": h.get("peak_gpu_mem_bytes"),
                "params": h.get("params"),
            }
        )
    if not rows:
        raise FeatxError("the probe returned no heads; pass --head all (or a list such as logreg,svm)")
    return rows


def _finetune_row(r: dict) -> dict:
    keep = (
        "method", "kind", "strategy", "accuracy", "balanced_accuracy", "macro_f1", "wall_seconds", "train_seconds",
        "eval_seconds", "images_per_s", "peak_gpu_mem_bytes", "epochs_run", "best_epoch", "stopped_early",
        "resumed_from", "trainable_params", "total_params", "device", "run_dir", "reused",
    )
    return {k: r.get(k) for k in keep}


def _fmt_time(s) -> str:
    if s is None or (isinstance(s, float) and math.isnan(s)):
        return "n/a"
    s = float(s)
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(round(s % 60)):02d} s"
    return f"{int(s // 3600)} h {int(round(s % 3600 / 60)):02d} min"


def _fmt_mem(b) -> str:
    if b is None:
        return "n/a"
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"


def _fmt_pct(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def markdown_table(rows: Sequence[dict]) -> str:
    """The comparison as a Markdown table (the terminal output and ``compare.md``)."""
    probes = [r["accuracy"] for r in rows if r["kind"] == "probe" and not math.isnan(r["accuracy"])]
    best_probe = max(probes) if probes else None
    head = ["method", "accuracy", "vs best probe", "balanced acc.", "macro-F1", "wall time", "images/s", "peak GPU mem"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in rows:
        delta = "" if best_probe is None or math.isnan(r["accuracy"]) else f"{100 * (r['accuracy'] - best_probe):+.1f} pts"
        ips = r.get("images_per_s")
        cells = [
            r["method"] + (" (reused)" if r.get("reused") else ""),
            _fmt_pct(r["accuracy"]),
            delta,
            _fmt_pct(r["balanced_accuracy"]),
            _fmt_pct(r["macro_f1"]),
            _fmt_time(r["wall_seconds"]),
            "n/a" if ips is None else f"{ips:.1f}",
            _fmt_mem(r.get("peak_gpu_mem_bytes")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _place_labels(fig, ax, pts: Sequence[dict]) -> None:
    """Label each point with its method and accuracy, trying offsets until labels do not overlap."""
    renderer = fig.canvas.get_renderer()
    placed = []
    leg = ax.get_legend()
    if leg is not None:
        e = leg.get_window_extent(renderer)
        placed.append((e.x0, e.y0, e.x1, e.y1))
    marker_boxes = []
    for r in pts:
        x, y = ax.transData.transform((r["wall_seconds"], 100 * r["accuracy"]))
        marker_boxes.append((x - 6, y - 6, x + 6, y + 6))
    offsets = [(8, 5, "left"), (8, -13, "left"), (-8, 5, "right"), (-8, -13, "right"),
               (8, 17, "left"), (8, -25, "left"), (-8, 17, "right"), (-8, -25, "right"), (8, 29, "left")]
    axbox = ax.get_window_extent(renderer)

    def overlaps(b, others) -> bool:
        return any(b[0] < o[2] and o[0] < b[2] and b[1] < o[3] and o[1] < b[3] for o in others)

    for r in sorted(pts, key=lambda r: (-r["accuracy"], r["wall_seconds"])):
        text = f"{r['method']} {100 * r['accuracy']:.1f}%"
        xy = (r["wall_seconds"], 100 * r["accuracy"])
        ann = None
        for dx, dy, ha in offsets:
            if ann is not None:
                ann.remove()
            ann = ax.annotate(text, xy, textcoords="offset points", xytext=(dx, dy), fontsize=9, ha=ha)
            e = ann.get_window_extent(renderer)
            b = (e.x0, e.y0, e.x1, e.y1)
            inside = e.x0 >= axbox.x0 and e.x1 <= axbox.x1 and e.y0 >= axbox.y0 and e.y1 <= axbox.y1
            if inside and not overlaps(b, placed) and not overlaps(b, marker_boxes):
                break
        placed.append(b)


def plot_chart(rows: Sequence[dict], path: str | os.PathLike, *, title: str) -> Path:
    """Accuracy against wall time, one labelled point per method; written to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    pts = [r for r in rows if r["wall_seconds"] and not math.isnan(r["accuracy"])]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    styles = {"probe": ("o", "#1f77b4", "probe on cached embeddings (time: embed + fit)"), "finetune": ("s", "#d62728", "fine-tune end to end (time: all epochs + eval)")}
    for kind, (marker, color, label) in styles.items():
        sel = [r for r in pts if r["kind"] == kind]
        if sel:
            ax.scatter([r["wall_seconds"] for r in sel], [100 * r["accuracy"] for r in sel], s=70, marker=marker,
                       color=color, label=label, zorder=3, edgecolors="black", linewidths=0.6)
    if pts:
        times = [r["wall_seconds"] for r in pts]
        accs = [100 * r["accuracy"] for r in pts]
        if max(times) / max(min(times), 1e-9) > 20:
            ax.set_xscale("log")
        lo, hi = min(accs), max(accs)
        pad = max(2.0, 0.15 * (hi - lo))
        ax.set_ylim(max(0.0, lo - pad), min(100.0, hi + pad) + (1.0 if hi + pad >= 100 else 0.0))
        ax.set_xlim(min(times) * (0.5 if ax.get_xscale() == "log" else 0.0), max(times) * (2.0 if ax.get_xscale() == "log" else 1.25))
    ax.set_xlabel("wall time (seconds" + (", log scale" if ax.get_xscale() == "log" else "") + ")")
    ax.set_ylabel("evaluation accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(loc="best", fontsize=9, framealpha=0.9)
    fig.tight_layout()
    _place_labels(fig, ax, pts)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def compare(
    root: str | os.PathLike | None = None,
    *,
    backbone: str = "efficientnet_lite0",
    weights: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike = "cache",
    cache: str | os.PathLike | None = None,
    manifest: str | os.PathLike | None = None,
    limit: int | None = None,
    head: str | Sequence[str] = "all",
    kernel: str = "linear",
    folds: int = 5,
    test_size: float = 0.2,
    seed: int = 0,
    finetune: bool = False,
    strategy: str | Sequence[str] = "all",
    epochs: int = 10,
    batch_size: int = 32,
    lr: float = 3e-3,
    backbone_lr_scale: float = 0.1,
    weight_decay: float = 0.05,
    warmup_epochs: float = 1.0,
    label_smoothing: float = 0.1,
    partial_blocks: int = 2,
    val_fraction: float = 0.1,
    patience: int = 3,
    device: str = "auto",
    num_workers: int | None = None,
    n_jobs: int = -1,
    grids: dict | None = None,
    out_dir: str | os.PathLike | None = None,
    checkpoint_seconds: float = 600.0,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Compare the probe heads (and, with ``finetune=True``, each fine-tune ``strategy``).

    Give the dataset ``root`` (embedded into ``cache_dir``, or reused in seconds when the cache
    is complete), an existing ``cache`` file, or neither (the newest cache in ``cache_dir``).  Returns a plain dict (also ``compare.json``):
    ``rows`` (one per method), ``table`` (Markdown), ``paths`` (json, markdown, chart),
    ``split``, ``settings`` and the full ``probe`` / ``finetune`` results.
    """

    t0 = time.perf_counter()
    strategies = _strategies(strategy) if finetune else []
    if root is None and manifest is None:

        # No DATA: the given cache, else the newest one in cache_dir (as `featx probe` does).
        fc = FeatureCache(find_cache(cache, cache_dir=cache_dir))
    else:

        fc = embed(
            root, backbone=backbone, weights=weights, cache_dir=cache_dir, cache=cache, manifest=manifest,
            device=device, limit=limit, progress=progress,
        )
    train_idx, eval_idx, split_desc = train_eval_split(fc.labels(), fc.split_array(), test_size=test_size, seed=seed)
    base = Path(out_dir) if out_dir is not None else Path("runs") / f"compare-{fc.path.stem}"
    base.mkdir(parents=True, exist_ok=True)
    settings = {
        "root": str(root) if root is not None else fc.root, "cache": str(fc.path), "backbone": fc.meta.get("backbone"),
        "weights": None if weights is None else str(weights), "limit": limit, "head": head, "kernel": kernel,
        "folds": folds, "test_size": test_size, "seed": seed, "finetune": bool(finetune), "strategy": strategies,
        "epochs": epochs, "batch_size": batch_size, "lr": lr, "backbone_lr_scale": backbone_lr_scale,
        "weight_decay": weight_decay, "warmup_epochs": warmup_epochs, "label_smoothing": label_smoothing,
        "partial_blocks": partial_blocks, "val_fraction": val_fraction, "patience": patience, "device": device,
        "num_workers": num_workers, "n_jobs": n_jobs, "out_dir": str(base),
    }

    # -- the probe
    heads_arg = head
    if isinstance(head, str) and head != "all" and "," in head:
        heads_arg = [h.strip() for h in head.split(",") if h.strip()]
    log.info("compare: probe heads %s on %s (%d train / %d eval rows)", heads_arg, fc.path.name, len(train_idx), len(eval_idx))
    probe_result = _run_probe(
        fc, head=heads_arg, kernel=kernel, test_size=test_size, folds=folds, seed=seed, device=device,
        n_jobs=n_jobs, grids=grids, out_dir=base / "probe", save=True,
    )
    rows = _probe_rows(probe_result, fc)
    n_eval_probe = probe_result.get("n_eval") or (probe_result.get("split") or {}).get("n_eval")
    if n_eval_probe is not None and int(n_eval_probe) != len(eval_idx):
        log.warning("the probe evaluated %s rows but the shared split has %d; the comparison may be unfair",
                    n_eval_probe, len(eval_idx))

    # -- the fine-tunes
    ft_results: dict[str, dict] = {}
    if strategies:

        for s in strategies:
            r = run_finetune(
                fc, strategy=s, epochs=epochs, batch_size=batch_size, lr=lr, backbone_lr_scale=backbone_lr_scale,
                weight_decay=weight_decay, warmup_epochs=warmup_epochs, label_smoothing=label_smoothing,
                partial_blocks=partial_blocks, val_fraction=val_fraction, patience=patience, test_size=test_size,
                seed=seed, weights=weights, device=device, num_workers=num_workers, out_dir=base,
                checkpoint_seconds=checkpoint_seconds, overwrite=overwrite, progress=progress,
            )
            ft_results[s] = r
            rows.append(_finetune_row(r))

    table = markdown_table(rows)
    n_eval = len(eval_idx)
    dataset = Path(fc.root).name or fc.path.stem
    title = (
        f"{dataset}: accuracy vs wall time - {fc.meta.get('backbone')}, "
        f"{n_eval} evaluation images ({split_desc.get('eval_split')})"
    )
    chart = plot_chart(rows, base / "compare.png", title=title)
    best = max(rows, key=lambda r: (-1 if math.isnan(r["accuracy"]) else r["accuracy"], -r["wall_seconds"]))
    result = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cache": {k: v for k, v in fc.summary().items() if k not in ("classes",)} | {"classes": fc.classes},
        "split": split_desc | {"n_train": int(len(train_idx)), "n_eval": int(n_eval)},
        "settings": settings,
        "rows": rows,
        "best": best["method"],
        "table": table,
        "notes": {
            "wall_seconds": "probe: embedding time of the cache + feature loading + head fit (search included) + predict; "
                            "fine-tune: model build + training + validation + evaluation, over resumed runs",
            "images_per_s": "probe: cache rows per second of embedding; fine-tune: training images per second of training",
            "peak_gpu_mem_bytes": "torch.cuda.max_memory_allocated during the fine-tune; n/a off CUDA",
        },
        "probe": probe_result,
        "finetune": ft_results,
        "seconds": time.perf_counter() - t0,
        "paths": {"json": str(base / "compare.json"), "markdown": str(base / "compare.md"), "chart": str(chart)},
    }

    md = f"# featx compare: {dataset}\n\n{title}\n\n{table}\n"
    tmp = base / ".compare.md.tmp"
    tmp.write_text(md)
    os.replace(tmp, base / "compare.md")
    write_json(base / "compare.json", result)
    log.info("compare: wrote %s, %s and %s", result["paths"]["markdown"], result["paths"]["json"], chart)
    return result


def _json_safe(obj):  # used by the CLI's --json
    return json.loads(json.dumps(obj, default=str))
