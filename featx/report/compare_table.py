"""The comparison as a Markdown table (the terminal output and ``compare.md``)."""

from __future__ import annotations

import math
from typing import Sequence

from ..base.progress import format_duration


def fmt_time(s) -> str:
    if s is None or (isinstance(s, float) and math.isnan(s)):
        return "n/a"
    return format_duration(s, decimals=1)


def fmt_mem(b) -> str:
    if b is None:
        return "n/a"
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"


def fmt_pct(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _view_note(r: dict) -> str:
    """`` [multi2 + 8 aug.]`` for a probe on another feature view than the final features."""
    view, aug = r.get("view") or "final", r.get("train_views") or 0
    if view == "final" and not aug:
        return ""
    return f" [{view}{f' + {aug} aug.' if aug else ''}]"


# What each fine-tune strategy trains (featx.finetune.model): the words every output uses for it.
STRATEGY_WORDS = {
    "full": "end to end: every layer of the network trains",
    "partial": "the last blocks of the network and a new linear layer train",
    "head": "head only: a new linear layer on the frozen network's features (the network does not train)",
}
STRATEGY_SHORT = {"full": "end to end", "partial": "last blocks + new layer", "head": "new linear layer only, network frozen"}


def params_text(r: dict) -> str:
    """``15,372 of 3.39 M parameters trained`` from a fine-tune row (empty when it does not say)."""
    tp, total = r.get("trainable_params"), r.get("total_params")
    if not isinstance(tp, int) or not isinstance(total, int) or total <= 0:
        return ""
    return f"{tp:,} of {total / 1e6:.2f} M parameters trained"


def strategy_note(rows: Sequence[dict]) -> str:
    """What each fine-tune trained, e.g. ``finetune-head: head only: a new linear layer ... (15,372 of 3.39 M
    parameters trained)``; empty without fine-tunes.  A head-only fine-tune is not "end to end"."""
    said = []
    for r in rows:
        if r.get("kind") != "finetune" or not r.get("strategy"):  # rows that do not say are left out
            continue
        what = STRATEGY_WORDS.get(str(r.get("strategy")), f"strategy {r.get('strategy')}")
        extra = params_text(r)
        said.append(f"{r['method']}: {what}" + (f" ({extra})" if extra else ""))
    return f"What each fine-tune trained: {'; '.join(said)}." if said else ""


def finetune_label(rows: Sequence[dict]) -> str:
    """The chart legend's words for the fine-tune points: their one strategy, or "see each label"."""
    kinds = {str(r.get("strategy")) for r in rows if r.get("kind") == "finetune"}
    what = STRATEGY_SHORT.get(next(iter(kinds)), "fine-tune") if len(kinds) == 1 else "strategy in each label"
    return f"fine-tune, {what} (time: all epochs + eval)"


def features_note(rows: Sequence[dict]) -> str:
    """Which features each fine-tune trained on (``features`` of its row), e.g.
    ``finetune-head: cache train views (K=8)``; empty when no row says."""
    said = [f"{r['method']}: {r['features']}" for r in rows if r.get("kind") == "finetune" and r.get("features")]
    return f"Fine-tune features: {'; '.join(said)}." if said else ""


def markdown_table(rows: Sequence[dict]) -> str:
    """The comparison as a Markdown table (the terminal output and ``compare.md``), then what each fine-tune
    trained (:func:`strategy_note`) and which features it trained on (:func:`features_note`) when the rows say."""
    probes = [r["accuracy"] for r in rows if r["kind"] == "probe" and not math.isnan(r["accuracy"])]
    best_probe = max(probes) if probes else None
    head = ["method", "accuracy", "vs best probe", "balanced acc.", "macro-F1", "wall time", "images/s", "peak GPU mem"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in rows:
        delta = "" if best_probe is None or math.isnan(r["accuracy"]) else f"{100 * (r['accuracy'] - best_probe):+.1f} pts"
        ips = r.get("images_per_s")
        cells = [
            r["method"] + _view_note(r) + (" (reused)" if r.get("reused") else ""),
            fmt_pct(r["accuracy"]),
            delta,
            fmt_pct(r["balanced_accuracy"]),
            fmt_pct(r["macro_f1"]),
            fmt_time(r["wall_seconds"]),
            "n/a" if ips is None else f"{ips:.1f}",
            fmt_mem(r.get("peak_gpu_mem_bytes")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [n for n in (strategy_note(rows), features_note(rows)) if n]
    return "\n".join(lines + (["", *notes] if notes else []))
