"""Predictions of the fine-tuned network and the three numbers the probe reports too."""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score


def metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    """Accuracy, balanced accuracy and macro-F1: the same three numbers the probe reports."""
    if len(y_true) == 0:
        return {"accuracy": float("nan"), "balanced_accuracy": float("nan"), "macro_f1": float("nan")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "accuracy": float(accuracy_score(y_true, y_pred)),
            "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
            "macro_f1": float(f1_score(y_true, y_pred, average="macro")),
        }


def predict(net: torch.nn.Module, loader, device: str, cuda: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(labels, predictions, ok mask, mean loss) over a loader, in eval mode."""
    net.eval()
    ys, ps, oks = [], [], []
    loss_sum, n = 0.0, 0
    with torch.inference_mode():
        for x, y, ok in loader:
            x = x.to(device, non_blocking=True)
            if x.ndim == 4:  # images (feature rows are 2-d)
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                logits = net(x)
            logits = logits.float().cpu()
            okm = ok.bool()
            if okm.any():
                loss_sum += float(F.cross_entropy(logits[okm], y[okm], reduction="sum"))
                n += int(okm.sum())
            ys.append(y.numpy())
            ps.append(logits.argmax(1).numpy())
            oks.append(okm.numpy())
    if not ys:
        return np.array([], np.int64), np.array([], np.int64), np.array([], bool), float("nan")
    return np.concatenate(ys), np.concatenate(ps), np.concatenate(oks), (loss_sum / n if n else float("nan"))
