"""``compare.png``: accuracy against wall time, one labelled point per method.

Why a chart: the question compare answers is "how many points does fine-tuning buy, for how
much time"; a scatter of both, labels placed so they never overlap, shows it at a glance.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

from ..compare_table import finetune_label
from .mpl import pyplot


def place_labels(fig, ax, pts: Sequence[dict]) -> None:
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
    plt = pyplot()

    pts = [r for r in rows if r["wall_seconds"] and not math.isnan(r["accuracy"])]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    styles = {"probe": ("o", "#1f77b4", "probe on cached embeddings (time: embed + fit)"),
              "finetune": ("s", "#d62728", finetune_label(pts))}
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
        bottom, top = ax.get_ylim()  # the room above 100 % is for labels: no tick says 100.5 %
        ax.set_yticks([t for t in ax.get_yticks() if bottom <= t <= min(top, 100.0)])
        ax.set_xlim(min(times) * (0.5 if ax.get_xscale() == "log" else 0.0), max(times) * (2.0 if ax.get_xscale() == "log" else 1.25))
    ax.set_xlabel("wall time (seconds" + (", log scale" if ax.get_xscale() == "log" else "") + ")")
    ax.set_ylabel("evaluation accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(loc="best", fontsize=9, framealpha=0.9)
    fig.tight_layout()
    place_labels(fig, ax, pts)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path
