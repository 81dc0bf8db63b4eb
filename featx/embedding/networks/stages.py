"""Stage nets: modules returning (pooled features, [two stage maps], final map) of a backbone, for the views."""

from __future__ import annotations

import torch
from torch import nn

from ...base.errors import FeatxError


class TimmStages(nn.Module):
    """A timm model's last two stages before its final map, the final map and the pooled features."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        info = list(model.feature_info)
        last = len(info) - 1
        if int(info[-1]["num_chs"]) == int(model.num_features):  # the last stage *is* the final map
            last -= 1
        self.indices = [i for i in (last - 1, last) if i >= 0]

    def forward(self, x: torch.Tensor):
        fmap, stages = self.model.forward_intermediates(x, indices=self.indices)
        return self.model.forward_head(fmap), stages, fmap


def timm_stage_net(model: nn.Module) -> nn.Module:
    if not hasattr(model, "forward_intermediates") or not hasattr(model, "feature_info"):
        raise FeatxError(f"timm model {type(model).__name__} has no forward_intermediates; embed with --views final")
    return TimmStages(model)


class GraphStages(nn.Module):
    """torchvision: a feature-extractor graph returning two stage outputs, the final map and the output."""

    def __init__(self, model: nn.Module, stages: tuple[str, str], fmap: str) -> None:
        super().__init__()
        from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

        out = get_graph_node_names(model)[1][-1]
        nodes = {stages[0]: "s1", stages[1]: "s2", fmap: "fmap", out: "out"}
        self.graph = create_feature_extractor(model, return_nodes=nodes)

    def forward(self, x: torch.Tensor):
        d = self.graph(x)
        return d["out"], [d["s1"], d["s2"]], d["fmap"]


# torchvision name -> (the two stages before the final map, the final map), by module name.
TORCHVISION_STAGES = {
    "resnet18": (("layer2", "layer3"), "layer4"),
    "resnet50": (("layer2", "layer3"), "layer4"),
    "efficientnet_b0": (("features.5", "features.7"), "features.8"),
    "convnext_tiny": (("features.3", "features.5"), "features.7"),
    "mobilenet_v3_large": (("features.12", "features.15"), "features.16"),
}


class TinyCNN(nn.Module):
    """Four conv layers and global pooling: fast enough for unit tests on a CPU."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        chans = [3, 8, 16, 32, dim]
        layers: list[nn.Module] = []
        for a, b in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(a, b, 3, stride=2, padding=1), nn.BatchNorm2d(b), nn.ReLU(inplace=True)]
        self.blocks = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.blocks(x)).flatten(1)


class TinyStages(nn.Module):
    """TinyCNN's second and third block outputs, its final map and pooled features."""

    def __init__(self, model: TinyCNN) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        maps = []
        for i, layer in enumerate(self.model.blocks):
            x = layer(x)
            if i in (5, 8):  # after the ReLU of blocks 2 and 3
                maps.append(x)
        return self.model.pool(x).flatten(1), maps, x
