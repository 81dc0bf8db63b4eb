"""Metrics, tables and plots for probe results (no printing: the CLI prints what these return).

``compute_metrics`` gives the numbers a reader needs to trust a head (accuracy, balanced
accuracy, macro-F1, top-5 when there are more than 5 classes, per-class precision/recall and
the confusion matrix); ``markdown_table`` turns a probe result into one comparison table;
``plot_confusion`` draws the row-normalised confusion matrix; ``write_json`` writes results
atomically with numpy values converted.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .plots.mpl import pyplot

# Above this many classes the JSON keeps per-class numbers but not the full matrix.
MAX_JSON_MATRIX = 50
# Above this many classes the PNG shows the most-confused classes only.
MAX_PLOT_CLASSES = 30








def top_k_accuracy(y_true: np.ndarray, scores: np.ndarray, score_labels: Sequence[int], k: int = 5) -> float:
    """Share of rows whose true label is among the ``k`` highest-scoring labels."""
    labels = np.asarray(score_labels)
    k = min(k, scores.shape[1])
    top = labels[np.argsort(-scores, axis=1, kind="stable")[:, :k]]
    return float(np.mean((top == np.asarray(y_true)[:, None]).any(axis=1)))


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n: how far an accuracy on n images can be trusted."""
    if n <= 0:
        return (float("nan"), float("nan"))
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, mid - half), min(1.0, mid + half))


def compute_metrics(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    *,
    classes: Sequence[str],
    scores: np.ndarray | None = None,
    score_labels: Sequence[int] | None = None,
) -> dict:
    """Evaluation numbers for label indices ``y_true``/``y_pred`` into ``classes``.

    ``balanced_accuracy`` is the mean recall over classes present in ``y_true``; ``macro_f1``
    averages F1 over classes present in ``y_true`` or ``y_pred``; ``top5_accuracy`` is added
    when there are more than 5 classes and ``scores`` (columns = ``score_labels``) are given.
    ``confusion_full`` is a numpy array (rows: true class, columns: predicted class).
    """
    from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    n_cls = len(classes)
    labels = np.arange(n_cls)
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    support = cm.sum(axis=1)
    present = support > 0
    recall_all = np.divide(np.diag(cm), support, out=np.zeros(n_cls), where=present)
    prec, rec, f1, sup = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    used = np.union1d(np.unique(y_true), np.unique(y_pred))
    out: dict[str, Any] = {
        "n_eval": int(len(y_true)),
        "accuracy": float(np.mean(y_true == y_pred)) if len(y_true) else float("nan"),
        "accuracy_ci95": list(wilson_interval(int(np.sum(y_true == y_pred)), len(y_true))),
        "balanced_accuracy": float(recall_all[present].mean()) if present.any() else float("nan"),
        "macro_f1": float(f1_score(y_true, y_pred, labels=used, average="macro", zero_division=0)),
    }
    if n_cls > 5 and scores is not None:
        out["top5_accuracy"] = top_k_accuracy(y_true, np.asarray(scores), score_labels if score_labels is not None else labels)
    out["per_class"] = {
        c: {"precision": float(prec[i]), "recall": float(rec[i]), "f1": float(f1[i]), "support": int(sup[i])}
        for i, c in enumerate(classes)
    }
    if n_cls <= MAX_JSON_MATRIX:
        out["confusion_matrix"] = cm.tolist()
    out["confusion_full"] = cm
    return out


def _fmt(v: Any, nd: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _fmt_params(p: dict) -> str:
    parts = []
    for k, v in p.items():
        parts.append(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}")
    return ", ".join(parts)


def probed_widths(heads: dict, cache: dict) -> str:
    """What the heads were trained on and its real width: ``final@a+b: 2560-dim`` (a view per head may differ)."""
    widths = {str(h.get("view") or "final"): h.get("view_dim") for h in heads.values() if h.get("view_dim")}
    if not widths:  # a run written before view_dim was recorded
        return f"{cache.get('dim')}-dim"
    return ", ".join(f"{v}: {d}-dim" for v, d in widths.items())


def markdown_table(result: dict) -> str:
    """One Markdown table comparing the heads of a probe result, with a line of context."""
    heads = result.get("heads", {})
    top5 = any("top5_accuracy" in h for h in heads.values())
    views = any(h.get("view") for h in heads.values())
    cols = ["head"] + (["view", "norm"] if views else []) + ["accuracy", "95% CI", "balanced acc", "macro-F1"] + (
        ["top-5"] if top5 else []) + ["CV score", "chosen hyperparameters", "fit s", "predict s"]
    text = ("head", "view", "norm", "chosen hyperparameters")
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" if c in text else "---:" for c in cols) + "|"]
    for name, h in heads.items():
        ci = h.get("accuracy_ci95") or [None, None]
        ci_s = f"{ci[0]:.3f}-{ci[1]:.3f}" if None not in ci and all(math.isfinite(v) for v in ci) else "-"
        aug = f" + {h['train_views']} aug." if h.get("train_views") else ""
        row = [name] + ([str(h.get("view") or "final") + aug, str(h.get("norm") or "none")] if views else []) + [
            _fmt(h.get("accuracy")), ci_s, _fmt(h.get("balanced_accuracy")), _fmt(h.get("macro_f1"))]
        if top5:
            row.append(_fmt(h.get("top5_accuracy")))
        row += [_fmt(h.get("cv_score")), _fmt_params(h.get("params", {})), _fmt(h.get("fit_seconds"), 2),
                _fmt(h.get("predict_seconds"), 3)]
        lines.append("| " + " | ".join(row) + " |")
    split = result.get("split", {})
    cache = result.get("cache", {})
    cv = result.get("cv", {})
    ctx = (
        f"{cache.get('backbone')} features ({probed_widths(heads, cache)}, embedding settings "
        f"{str(cache.get('fingerprint'))[:10]}), "
        f"{len(cache.get('classes', []))} classes; trained on {split.get('n_train')} rows "
        f"({selection_note(heads, cv)}), evaluated on {split.get('n_eval')} rows of {split.get('eval_split')}"
    )
    if split.get("kind") == "holdout":
        ctx += f" (stratified hold-out, test_size={split.get('test_size')}, seed={split.get('seed')})"
    return "\n".join(lines) + "\n\n" + ctx + "." + view_tables(heads)


def selection_note(heads: dict, cv: dict) -> str:
    """How the hyperparameters were chosen, on training rows only: k-fold CV, or what each streamed head used.

    Why: a streamed head on a large cache chooses C (or k) on a held-out slice of the training rows,
    not by the probe's k-fold CV; the report must not say CV for it."""
    own = {name: h["selection"] for name, h in heads.items() if h.get("selection")}
    if not own:
        return f"{cv.get('used')}-fold CV on training rows only"
    parts = [f"{name}: {sel}" for name, sel in own.items()]
    rest = [name for name in heads if name not in own]
    if rest:
        parts.append(f"{', '.join(rest)}: {cv.get('used')}-fold CV")
    return "chosen on training rows only; " + "; ".join(parts)


def is_chosen(candidate: dict, head: dict) -> bool:
    """Is this row of a head's ``views`` table the (view, norm, augmented views) the head uses?"""
    mine = (candidate["view"], candidate["norm"], candidate.get("train_views", 0))
    return mine == (head.get("view"), head.get("norm"), head.get("train_views", 0))


def view_tables(heads: dict) -> str:
    """CV score of every (view, norm) each head tried (training rows only), the chosen one marked."""
    rows = [(name, c) for name, h in heads.items() if len(h.get("views") or []) > 1 for c in h["views"]]
    if not rows:
        return ""
    lines = ["", "", "CV score per feature view (training rows only; the evaluation split was not used to choose). "
             "Chosen: the first row within one standard error of the best CV score.",
             "", "| head | view | norm | aug. views | dim | CV score | ± s.e. | chosen hyperparameters | fit s |",
             "|---|---|---|---:|---:|---:|---:|---|---:|"]
    paired = any(c.get("paired_margin") is not None for _, c in rows)
    if paired:  # repeated paired CV (featx.heads.tuning.repeated_cv): the margin of every row to the choice
        lines[2] = ("CV score per feature view (training rows only; the evaluation split was not used to choose), "
                    "repeated and paired: the simplest row is kept unless the best beats it by more than the "
                    "standard error of their paired fold differences (± s.e.: of each row's difference to the first).")
        lines[4] += " margin to chosen ± s.e. |"
        lines[5] += "---:|"
    for name, c in rows:
        h = heads[name]
        mark = " **← chosen**" if is_chosen(c, h) else ""
        margin = ""
        if paired:
            margin = (f" {100 * c['paired_margin']:+.2f} ± {100 * c['paired_se']:.2f} pt"
                      f"{' (dropped after repeat 1)' if c.get('dropped_after_repeat') else ''} |"
                      if c.get("paired_margin") is not None else " |")
        lines.append(f"| {name} | {c['view']} | {c['norm']} | {c.get('train_views', 0)} | {c['dim']} | "
                     f"{_fmt(c['cv_score'])}{mark} | {_fmt(c.get('cv_std_err'))} | "
                     f"{_fmt_params(c.get('params', {}))} | {_fmt(c.get('fit_seconds'), 2)} |{margin}")
    return "\n".join(lines)


def _most_confused(cm: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` classes involved in the most errors (for big confusion matrices)."""
    off = cm.copy()
    np.fill_diagonal(off, 0)
    errors = off.sum(axis=0) + off.sum(axis=1)
    return np.sort(np.argsort(-errors, kind="stable")[:k])


def plot_confusion(
    cm: np.ndarray,
    classes: Sequence[str],
    path: str | os.PathLike,
    *,
    title: str = "",
    max_classes: int = MAX_PLOT_CLASSES,
) -> Path:
    """Save the confusion matrix, normalised per row (true class), as a PNG.

    Cells show the share of each true class predicted as each class (and the count when the
    matrix is small); with more than ``max_classes`` classes only the most-confused are drawn.
    """
    plt = pyplot()

    cm = np.asarray(cm)
    idx = np.arange(len(classes))
    note = ""
    if len(classes) > max_classes:
        idx = _most_confused(cm, max_classes)
        note = f" ({max_classes} most-confused of {len(classes)} classes)"
    sub = cm[np.ix_(idx, idx)]
    rows = cm[idx].sum(axis=1, keepdims=True)
    norm = np.divide(sub, rows, out=np.zeros(sub.shape, dtype=float), where=rows > 0)
    names = [str(classes[i]) for i in idx]
    n = len(names)
    size = max(4.0, min(16.0, 1.0 + 0.45 * n))
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    fs = 10 if n <= 12 else 8  # cells are ~0.45 inch whatever n, so 8 pt always fits
    ax.set_xticklabels(names, rotation=45 if n > 3 else 0, ha="right" if n > 3 else "center", fontsize=fs)
    ax.set_yticklabels([f"{c} (n={int(r)})" for c, r in zip(names, rows[:, 0])], fontsize=fs)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if n <= 15:
        for i in range(n):
            for j in range(n):
                v = norm[i, j]
                txt = f"{v:.2f}\n({int(sub[i, j])})" if n <= 8 else f"{v:.2f}"
                ax.text(j, i, txt, ha="center", va="center", fontsize=fs,
                        color="white" if v > 0.5 else "black")
    ax.set_title((title + note) if title else "confusion matrix" + note, fontsize=10, wrap=True)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")  # the wrapped title is laid out only when drawn
    plt.close(fig)
    return path
