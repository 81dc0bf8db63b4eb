"""A 2-D map of the cached embeddings: PCA to 50 dimensions, then t-SNE (or UMAP when installed).

Why: a reader sees at a glance whether classes form separate clusters (a linear probe will do
well), overlap (no head will), or whether the mistakes sit between two clusters.  Large caches
are subsampled per class (all misclassified evaluation rows kept); the coordinates are saved as
``embedmap.npz`` in the run folder, keyed by the cache fingerprint, so they are computed once.
"""

from __future__ import annotations

import io
import logging
import os
from importlib.util import find_spec
from pathlib import Path
from typing import Sequence

import numpy as np

from ...base.io import atomic_write_bytes
from ...cache.store import FeatureCache
from .mpl import pyplot

log = logging.getLogger(__name__)

LEGEND_PT = 13  # legend text: 18 px in the 640 px wide image, ~10 px where a phone shows it 352 px wide
MAP_INCHES = (6.4, 6.0)  # at 100 dpi: about the width report.html gives it on a laptop, so it is not shrunk there
MAX_POINTS = 2000  # t-SNE on 2,000 points takes seconds; beyond that a sample shows the same picture


def pick_rows(labels: np.ndarray, *, keep: Sequence[int] = (), max_points: int = MAX_POINTS, seed: int = 0) -> np.ndarray:
    """Row indices to draw: all when few, else a per-class proportional sample plus ``keep``."""
    n = len(labels)
    if n <= max_points:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    keep = np.asarray(sorted(set(int(k) for k in keep)), dtype=np.int64)[:max_points]
    budget = max_points - len(keep)
    rest = np.setdiff1d(np.arange(n), keep)
    chosen = []
    for c in np.unique(labels[rest]):
        rows = rest[labels[rest] == c]
        take = max(1, int(round(budget * len(rows) / len(rest))))
        chosen.append(rng.choice(rows, size=min(take, len(rows)), replace=False))
    picked = np.concatenate([keep] + chosen) if chosen else keep
    return np.unique(picked)  # rounding per class may add a few rows


def degenerate(Z: np.ndarray) -> bool:
    """True when the points (nearly) all coincide or are not finite: no 2-D map can show anything."""
    if not len(Z) or not np.isfinite(Z).all():
        return True
    spread = float(np.ptp(Z, axis=0).max()) if Z.size else 0.0
    return spread <= 1e-6 * max(1.0, float(np.abs(Z).max())) or len(np.unique(Z.round(6), axis=0)) < 3


def project(X: np.ndarray, *, method: str = "auto", seed: int = 0) -> tuple[np.ndarray, str]:
    """2-D coordinates of ``X`` and the method's name ("pca+tsne", "pca+umap", "pca", or "degenerate": no map)."""
    from sklearn.decomposition import PCA

    X = np.asarray(X, dtype=np.float32)
    n = len(X)
    k = int(min(50, X.shape[1], max(n - 1, 1)))
    Z = PCA(n_components=k, random_state=seed).fit_transform(X) if k >= 2 else np.c_[X[:, :1], np.zeros(n)]
    if degenerate(Z):  # t-SNE divides by the spread of its start: constant features crash it (signal 11)
        return np.zeros((n, 2), dtype=np.float32), "degenerate"
    if method == "auto":
        method = "umap" if find_spec("umap") is not None else "tsne"
    if n < 8 or method == "pca":  # t-SNE needs perplexity < n
        return np.asarray(Z[:, :2], dtype=np.float32), "pca"
    if method == "umap":
        import umap  # optional: only when installed

        xy = umap.UMAP(n_components=2, random_state=seed, n_neighbors=min(15, n - 1)).fit_transform(Z)
        return np.asarray(xy, dtype=np.float32), "pca+umap"
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    # One thread: at MAX_POINTS each t-SNE step is tiny, and OpenMP's spin-waiting made it 6-50x slower
    # on 2 busy cores (960 points: 209 s with all threads, 34 s with one, load 14).
    with threadpool_limits(1):
        xy = TSNE(n_components=2, perplexity=float(min(30.0, (n - 1) / 3.0)), init="pca", random_state=seed,
                  learning_rate="auto").fit_transform(Z)
    return np.asarray(xy, dtype=np.float32), "pca+tsne"


def map_coordinates(fc: FeatureCache, run_dir: str | os.PathLike, *, keep: Sequence[int] = (),
                    max_points: int = MAX_POINTS, seed: int = 0) -> dict:
    """``{"rows", "xy", "method"}`` for ``fc``, read from ``run_dir/embedmap.npz`` when it fits."""
    path = Path(run_dir) / "embedmap.npz"
    labels = fc.labels()
    rows = pick_rows(labels, keep=keep, max_points=max_points, seed=seed)
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["fingerprint"]) == fc.fingerprint and int(z["n"]) == len(fc) and set(keep) <= set(z["rows"].tolist()):
                    return {"rows": z["rows"], "xy": z["xy"], "method": str(z["method"])}
        except (OSError, KeyError, ValueError) as exc:
            log.info("report: recomputing the embedding map (%s)", exc)
    feats = np.concatenate([b for b in fc.iter_features(rows=16384)]) if len(rows) == len(fc) else None
    if feats is None:
        feats = np.empty((len(rows), fc.dim), dtype=np.float32)
        pos = 0
        for block in fc.iter_features(rows=16384):
            sel = rows[(rows >= pos) & (rows < pos + len(block))]
            feats[np.searchsorted(rows, sel)] = block[sel - pos]
            pos += len(block)
    ok = np.isfinite(feats).all(axis=1)
    rows, feats = rows[ok], feats[ok]
    xy, method = project(feats, seed=seed)
    buf = io.BytesIO()
    np.savez(buf, rows=rows, xy=xy, method=method, fingerprint=fc.fingerprint, n=len(fc))
    try:  # only a saved computation: a full disk leaves no temporary file and costs the next report the time
        atomic_write_bytes(path, buf.getvalue())
    except OSError as exc:
        log.warning("report: the embedding map's coordinates were not saved (%s)", exc)
    return {"rows": rows, "xy": xy, "method": method}


def _mpl_text(s: str) -> str:
    """Class names as plain text in matplotlib (a ``$`` would start mathtext)."""
    return str(s).replace("$", r"\$")


def plot_map(coords: dict, labels: np.ndarray, classes: Sequence[str], path: str | os.PathLike, *,
             eval_rows: Sequence[int] = (), wrong_rows: Sequence[int] = (), title: str = "") -> Path:
    """Scatter the map, one colour per class; evaluation rows ringed, misclassified ones crossed."""
    plt = pyplot()

    rows, xy = np.asarray(coords["rows"]), np.asarray(coords["xy"])
    lab = np.asarray(labels)[rows]
    n_cls = len(classes)
    if n_cls <= 20:  # tab20's strong shades first, its light ones only past 10 classes
        colors = plt.get_cmap("tab20")(np.r_[np.arange(0, 20, 2), np.arange(1, 20, 2)][:n_cls])
    else:
        colors = plt.get_cmap("turbo")(np.linspace(0, 1, n_cls))
    fig, ax = plt.subplots(figsize=MAP_INCHES, dpi=100)
    is_eval = np.isin(rows, np.asarray(eval_rows, dtype=np.int64))
    size = 9 if len(rows) > 1000 else 16
    for c in range(n_cls):
        sel = lab == c
        if not sel.any():
            continue
        ax.scatter(xy[sel & ~is_eval, 0], xy[sel & ~is_eval, 1], s=size, color=colors[c], alpha=0.55, linewidths=0,
                   label=_mpl_text(classes[c]) if n_cls <= 20 else None)
        ax.scatter(xy[sel & is_eval, 0], xy[sel & is_eval, 1], s=size * 1.8, color=colors[c], alpha=0.9,
                   edgecolors="black", linewidths=0.4)
    wrong = np.isin(rows, np.asarray(wrong_rows, dtype=np.int64))
    if wrong.any():
        ax.scatter(xy[wrong, 0], xy[wrong, 1], s=70, marker="x", color="black", linewidths=1.6,
                   label=f"misclassified ({int(wrong.sum())})")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(_mpl_text(title), fontsize=12)
    fig.tight_layout()
    extra = []
    if n_cls <= 20 or wrong.any():  # below the map, in columns: the text stays big enough to read on a phone
        labels = [str(c) for c in classes] if n_cls <= 20 else []
        longest = max([len(s) for s in labels] + [len("misclassified (000)")])
        ncol = max(1, min(4, 52 // (longest + 5), len(labels) + int(wrong.any())))
        leg = ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.01), fontsize=LEGEND_PT, frameon=False,
                        markerscale=2, ncol=ncol, columnspacing=1.2, handletextpad=0.3)
        leg.set_in_layout(False)  # the map keeps its size; the legend's rows are added below it when saved
        extra.append(leg)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight", bbox_extra_artists=extra)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())  # complete or absent; a full disk is one line naming it
