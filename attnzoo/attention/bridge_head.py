"""The seed-002 network variant: a bridge from every stage to the classifier.

Seed 002 (Bagora, Sreeteja, Harini T K, Choudhary, Haque, "Enhanced Channel-Wise Attention
Based CNN", a course project) proposes, besides BA-Net's
per-block bridge (``bridge``), a network-level one: the global average pool of each
stage's output is taken, the descriptors are concatenated and a learnable linear layer
maps them to the width of the last stage, which the classifier then reads:

    z_s = GAP(X_s),  s = 1..S          (X_s: output of stage s, C_s channels)
    h   = W [z_1; ...; z_S] + b,       W: (C_1 + ... + C_S) -> C_S
    logits = FC(h)                     (the backbone's own classifier)

Interpretations: the paper says "each convolution layer"; we take one descriptor per stage
(the issue's reading, and the granularity at which channel counts change). It names no
activation between the linear layer and the classifier, so there is none: the two compose
to one linear map of the concatenated descriptors, which is what the paper describes. The
backbone's classifier is reused, so the head adds exactly (sum C_s) * C_S + C_S parameters.
"""

from __future__ import annotations

import torch
from torch import nn

from ..registry import register_attention


@register_attention("bridge_head", level="model")
class BridgeHead(nn.Module):
    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.name = f"{backbone.name}+bridge_head"
        self.in_chans = backbone.in_chans
        self.num_classes = backbone.num_classes
        channels = list(backbone.stage_channels)
        self.bridge = nn.Linear(sum(channels), channels[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net = self.backbone
        x = net.forward_stem(x)
        descriptors = []
        for i in range(len(net.stage_names)):
            x = net.forward_stage(i, x)
            descriptors.append(x.mean(dim=(2, 3)))
        return net.get_classifier()(self.bridge(torch.cat(descriptors, dim=1)))
