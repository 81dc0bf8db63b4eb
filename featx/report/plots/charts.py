"""Charts of the report: fine-tune vs probe accuracy with 95 % intervals, and the few-shot curve.

Why whiskers: on 398 evaluation images a 95 % interval is about ±2.4 points, so two methods a
point apart are not told apart; the chart must say so before anyone reads the table.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Any, Sequence

from ...base.io import atomic_write_bytes
from ..metrics import wilson_interval
from .mpl import pyplot


def _mpl_text(s: Any) -> str:
    return str(s).replace("$", r"\$")


def compare_intervals(rows: Sequence[dict], n_eval: int | None) -> list[dict]:
    """Rows of compare.json with ``ci95`` (Wilson, from accuracy x ``n_eval``) added; NaN rows dropped."""
    out = []
    for r in rows:
        acc = r.get("accuracy")
        if acc is None or not math.isfinite(float(acc)):
            continue
        ci = r.get("accuracy_ci95")
        if not ci and n_eval:
            ci = list(wilson_interval(int(round(float(acc) * n_eval)), int(n_eval)))
        out.append(dict(r, ci95=ci))
    return out


def plot_compare_ci(rows: Sequence[dict], path: str | os.PathLike, *, title: str = "") -> Path:
    """One horizontal line per method: accuracy (dot) and its 95 % interval (whiskers)."""
    plt = pyplot()
    rows = list(rows)
    fig, ax = plt.subplots(figsize=(8, 0.9 + 0.45 * max(len(rows), 1)), dpi=100)
    colors = {"probe": "#1f77b4", "finetune": "#d62728"}
    for y, r in enumerate(rows):
        acc = 100 * float(r["accuracy"])
        c = colors.get(r.get("kind"), "#555555")
        ci = r.get("ci95")
        if ci and None not in ci:
            ax.errorbar(acc, y, xerr=[[acc - 100 * ci[0]], [100 * ci[1] - acc]], fmt="o", color=c, ecolor=c,
                        capsize=4, markersize=7, markeredgecolor="black", markeredgewidth=0.6)
        else:
            ax.plot(acc, y, "o", color=c)
        ax.annotate(f"{acc:.1f}%", (acc, y), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([_mpl_text(r.get("method", "?")) for r in rows], fontsize=9)
    ax.set_ylim(len(rows) - 0.5, -0.9)  # first row on top, with room for its value label under the title
    ax.set_xlabel("evaluation accuracy (%), whiskers: 95% Wilson interval")
    ax.grid(True, axis="x", alpha=0.3)
    return _save(fig, ax, path, title)


def _point(d: dict) -> tuple[float, float | None, float | None] | None:
    mean = next((d[k] for k in ("mean", "accuracy_mean", "accuracy") if isinstance(d.get(k), (int, float))), None)
    if mean is None:
        return None
    ci = next((d[k] for k in ("ci95", "accuracy_ci95", "ci") if isinstance(d.get(k), (list, tuple)) and len(d[k]) == 2), None)
    lo, hi = (ci if ci and None not in ci else (None, None))
    return float(mean), lo, hi


def fewshot_series(data: dict) -> dict[str, list[tuple[int, float, float | None, float | None]]]:
    """``{head: [(shots, mean, ci_lo, ci_hi), ...]}`` from fewshot.json, whichever of its layouts.

    Accepted: a list of rows (``rows``/``results``/``points``) with head, shots and mean/ci95; or
    ``heads``/``curves`` mapping head -> {shots: {mean, ci95}} or head -> [rows].
    """
    series: dict[str, list] = {}

    def add(head: str, shots: Any, d: Any) -> None:
        p = _point(d) if isinstance(d, dict) else (float(d), None, None) if isinstance(d, (int, float)) else None
        try:
            k = int(shots)
        except (TypeError, ValueError):
            return
        if p is not None:
            series.setdefault(str(head), []).append((k, *p))

    for key in ("rows", "results", "points"):
        for r in data.get(key) or []:
            if isinstance(r, dict):
                add(r.get("head", "head"), r.get("shots", r.get("k")), r)
    for key in ("heads", "curves"):
        for head, v in (data.get(key) or {}).items():
            if isinstance(v, dict):
                inner = v.get("shots") if isinstance(v.get("shots"), (dict, list)) else v
                items = inner.items() if isinstance(inner, dict) else ((r.get("shots", r.get("k")), r) for r in inner)
                for shots, d in items:
                    add(head, shots, d)
            elif isinstance(v, list):
                for r in v:
                    if isinstance(r, dict):
                        add(head, r.get("shots", r.get("k")), r)
    return {h: sorted(pts) for h, pts in series.items()}


def plot_fewshot(series: dict, path: str | os.PathLike, *, title: str = "", n_seeds: int | None = None) -> Path:
    """Accuracy against shots per class, one line per head, its 95 % interval as a band (log x axis).

    ``series``: :func:`fewshot_series`.  One shot count: points side by side with interval whiskers
    (a band needs two).  ``n_seeds``: said in the title, with what the band shows.
    """
    plt = pyplot()
    allk = sorted({p[0] for pts in series.values() for p in pts})
    single = len(allk) == 1
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for i, (head, pts) in enumerate(series.items()):
        ks, mean = [p[0] for p in pts], [100 * p[1] for p in pts]
        has_ci = all(p[2] is not None and p[3] is not None for p in pts)
        if single:
            x = [k * (1 + 0.04 * (i - (len(series) - 1) / 2)) for k in ks]
            err = [[m - 100 * p[2] for m, p in zip(mean, pts)], [100 * p[3] - m for m, p in zip(mean, pts)]] if has_ci else None
            ax.errorbar(x, mean, yerr=err, marker="o", capsize=4, linestyle="none", label=_mpl_text(head))
            continue
        ax.plot(ks, mean, "o-", label=_mpl_text(head))
        if has_ci:
            ax.fill_between(ks, [100 * p[2] for p in pts], [100 * p[3] for p in pts], alpha=0.2)
    if not single:
        ax.set_xscale("log")
    ax.set_xticks(allk)
    ax.set_xticklabels([str(k) for k in allk])
    ax.minorticks_off()
    ax.set_xlabel("training images per class (shots)")
    ax.set_ylabel("accuracy on the evaluation split (%)")
    ax.grid(True, alpha=0.3)
    if single:  # the points spread across the plot: the legend goes below it
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=min(3, len(series)), fontsize=8)
    else:
        ax.legend(loc="lower right", fontsize=9)
    if n_seeds is not None:
        what = "whiskers" if single else "band"
        title = f"{title}\nfew-shot accuracy, mean of {n_seeds} seed(s), {what} = 95% CI".lstrip()
    return _save(fig, ax, path, title, fontsize=9 if n_seeds is not None else 10)


def _save(fig, ax, path: str | os.PathLike, title: str, *, fontsize: int = 10) -> Path:
    """Title, lay out and write the figure atomically (a killed run never leaves half a PNG)."""
    plt = pyplot()
    if title:
        ax.set_title(_mpl_text(title), fontsize=fontsize)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())
