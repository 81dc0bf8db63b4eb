"""Weights of a backbone: read a local state-dict file, load it strictly, fingerprint a model's parameters."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from ...base.errors import FeatxError
from ...base.files import check_regular


def sha256_state(model: nn.Module) -> str:
    """A fingerprint of the model's parameters and buffers (names, shapes and values)."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        t = v.detach().cpu().contiguous()
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


def load_state_file(path: str) -> dict:
    p = Path(path)
    check_regular(p, "--weights")  # a FIFO or device would block torch.load for ever
    if not p.is_file():
        raise FeatxError(f"--weights {path!r}: file not found; pass a local state-dict file (.pth/.pt/.safetensors)")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p))
        else:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure here is a bad file
        raise FeatxError(f"--weights {path!r}: cannot read a state dict from it ({exc})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise FeatxError(f"--weights {path!r}: expected a state dict of tensors")
    return sd


def load_into(model: nn.Module, sd: dict, *, source: str, name: str, drop_prefixes=()) -> None:
    """Load ``sd`` strictly (classifier keys may be absent or extra); refuse anything else."""
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    target = model.state_dict()
    extra = [k for k in sd if k not in target and not k.startswith(drop_prefixes)]
    missing = [k for k in target if k not in sd]
    wrong = [k for k in sd if k in target and tuple(sd[k].shape) != tuple(target[k].shape)]
    if extra or missing or wrong:
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if extra:
            detail.append(f"{len(extra)} unexpected (e.g. {extra[:3]})")
        if wrong:
            detail.append(
                f"{len(wrong)} with wrong shapes (e.g. {wrong[0]}: file {tuple(sd[wrong[0]].shape)} "
                f"vs model {tuple(target[wrong[0]].shape)})"
            )
        raise FeatxError(
            f"weights {source!r} do not fit backbone {name!r}: " + "; ".join(detail)
            + ". Pass weights saved from the same architecture, or choose the matching --backbone."
        )
    model.load_state_dict({k: v for k, v in sd.items() if k in target}, strict=True)
