"""The network being fine-tuned: the cache's own backbone, which layers train, and the optimiser.

Why: the comparison with the probe is only fair when the fine-tune starts from exactly the
network that wrote the cache (checked against the cache fingerprint), and when ``partial``
trains a well-defined set of layers whatever the architecture (see :func:`find_blocks`).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..base.errors import FeatxError
from ..embedding.backbones import create_backbone
from .settings import FinetuneSettings

BLOCK_CONTAINERS = ("blocks", "stages", "layers", "features", "encoder.layers", "encoder.layer", "trunk.blocks")


def get_path(model: nn.Module, path: str) -> nn.Module | None:
    """The sub-module at dotted ``path``, or None."""
    m = model
    for part in path.split("."):
        m = getattr(m, part, None)
        if m is None:
            return None
    return m


def has_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters())


def modules_after(model: nn.Module, path: str) -> list[tuple[str, nn.Module]]:
    """Parameterised modules that come after ``path``: its later siblings at every level up."""
    parts = path.split(".")
    out: list[tuple[str, nn.Module]] = []
    for depth in range(len(parts), 0, -1):
        parent = get_path(model, ".".join(parts[: depth - 1])) if depth > 1 else model
        prefix = ".".join(parts[: depth - 1])
        names = [n for n, _ in parent.named_children()]
        i = names.index(parts[depth - 1])
        out += [(f"{prefix}.{n}" if prefix else n, m) for n, m in list(parent.named_children())[i + 1 :] if has_params(m)]
    return out


def find_blocks(model: nn.Module) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, nn.Module]]]:
    """``(blocks, tail)``: the backbone's main sequence of blocks and the layers after it.

    ``partial`` trains the last N blocks plus the tail (e.g. EfficientNet's ``conv_head`` and
    ``bn2``), since a block is useless to train when the layers on top of it stay frozen.
    Blocks are the children of the model's ``blocks`` / ``stages`` / ``layers`` / ``features``
    (timm, torchvision EfficientNet/MobileNet/ConvNeXt) or ``encoder.layers`` (ViT) container,
    or torchvision ResNet's ``layer1..layerN``; failing those, the top-level children with
    parameters.
    """
    top = list(model.named_children())
    for path in BLOCK_CONTAINERS:
        seq = get_path(model, path)
        if isinstance(seq, (nn.Sequential, nn.ModuleList)):
            blocks = [(f"{path}.{n}", m) for n, m in seq.named_children() if has_params(m)]
            if len(blocks) >= 2:
                return blocks, modules_after(model, path)
    layers = [(n, m) for n, m in top if n.startswith("layer") and n[5:].isdigit() and has_params(m)]
    if len(layers) >= 2:  # torchvision ResNet / RegNet-like
        return layers, modules_after(model, layers[-1][0])
    return [(n, m) for n, m in top if has_params(m)], []


def apply_strategy(backbone_model: nn.Module, strategy: str, *, partial_blocks: int = 2) -> list[str]:
    """Set ``requires_grad`` on the backbone for ``strategy``; returns the trained module names."""
    for p in backbone_model.parameters():
        p.requires_grad_(strategy == "full")
    if strategy == "full":
        return ["(all)"]
    if strategy == "head":
        return []
    blocks, tail = find_blocks(backbone_model)
    chosen = blocks[-partial_blocks:] + tail
    for _, m in chosen:
        for p in m.parameters():
            p.requires_grad_(True)
    return [n for n, _ in chosen]


def frozen_roots(model: nn.Module) -> list[nn.Module]:
    """The largest sub-modules whose parameters are all frozen (kept in eval mode)."""
    out: list[nn.Module] = []

    def visit(m: nn.Module) -> None:
        params = list(m.parameters())
        if params and not any(p.requires_grad for p in params):
            out.append(m)
            return
        for c in m.children():
            visit(c)

    visit(model)
    return out


class Classifier(nn.Module):
    """The cache's backbone with a new linear classifier on its pooled features.

    ``features_in``: the inputs are already the frozen backbone's features (the ``head``
    strategy on embedded views, :mod:`featx.finetune.features`), so only the linear layer runs;
    the state dict keeps the backbone, so checkpoints look the same either way.
    """

    def __init__(self, backbone_model: nn.Module, dim: int, n_classes: int) -> None:
        super().__init__()
        self.backbone = backbone_model
        self.head = nn.Linear(dim, n_classes)
        self.features_in = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x if self.features_in else self.backbone(x))


def training_backbone(fc, weights: str | os.PathLike | None):
    """Rebuild the cache's backbone and check it is the one that produced the cache."""
    name = fc.meta.get("backbone")
    if not name:
        raise FeatxError(f"cache {fc.path} does not record its backbone; rebuild it with `featx embed ... --overwrite`")
    if weights is None:
        src = str(fc.meta.get("weights_source", ""))
        if src == "random":
            weights = "random"
        elif src and os.path.isfile(src):
            weights = src
    bb = create_backbone(name, weights=weights)
    want = fc.fingerprint_dict
    got = bb.fingerprint()
    diff = [k for k in got if want.get(k) != got[k]]
    if diff:
        raise FeatxError(
            f"the backbone rebuilt for fine-tuning differs from the one that wrote cache {fc.path} "
            f"(different {', '.join(diff)}); pass --weights with the file the cache was embedded with "
            f"(cache records weights source {fc.meta.get('weights_source')!r})"
        )
    return bb


def build_classifier(bb, n_classes: int, settings: FinetuneSettings) -> tuple[Classifier, list[str]]:
    """The network to train, with ``requires_grad`` set for the strategy; and the trained module names."""
    trained_modules = apply_strategy(bb.model, settings.strategy, partial_blocks=settings.partial_blocks)
    if settings.backbone_lr_scale == 0:  # a zero backbone LR means: do not train (nor drift) the backbone
        for p in bb.model.parameters():
            p.requires_grad_(False)
    return Classifier(bb.model, bb.dim, n_classes), trained_modules


def param_groups(net: Classifier, settings: FinetuneSettings) -> list[dict]:
    """AdamW groups: the head at ``lr``, the trained backbone at ``lr * backbone_lr_scale``; no decay on 1-d params."""

    def groups(params: list, lr: float) -> list[dict]:
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        out = []
        if decay:
            out.append({"params": decay, "lr": lr, "weight_decay": settings.weight_decay})
        if no_decay:
            out.append({"params": no_decay, "lr": lr, "weight_decay": 0.0})
        return out

    bb_params = [p for p in net.backbone.parameters() if p.requires_grad]
    return groups(list(net.head.parameters()), settings.lr) + groups(bb_params, settings.lr * settings.backbone_lr_scale)


def count_params(net: Classifier) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in net.parameters())
