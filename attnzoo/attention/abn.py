"""ABN: Attention Branch Network (Fukui, Hirakawa, Yamashita, Fujiyoshi, CVPR 2019).

The backbone is cut before its last stage. The first stages are the feature extractor
g(x). An *attention branch* on g(x) gives class scores and an attention map M(x). A
*perception branch* (the last stage and the classifier) reads g(x) re-weighted by M:

    attention branch: A = ReLU(BN(conv1x1_{C->K}(BN(stage'(g(x))))))   K = number of classes
                      attention logits = GAP(conv1x1_{K->K}(A))
                      M(x) = sigmoid(BN(conv_{K->1}(A)))                (N, 1, h, w)
    perception input: g'(x) = (1 + M(x)) * g(x)                        (Eq. 2)
    training loss:    L = L_att + L_per, both cross-entropy             (Eq. 1)

``stage'`` is a fresh copy of the backbone's last stage with stride 1, so M keeps the
resolution of g(x) (the official ResNet code does this; for a CIFAR ResNet, g(x) is the
16x16 output of stage 2).

Interpretations:
- The paper makes M with a 1x1 convolution; the official code uses a 3x3 one. We follow
  the paper (``map_kernel_size=1``); ``map_kernel_size=3`` gives the code's layout. GAM's
  Table 2 settles which one it compared with: its ABN rows, 21.61M (ResNet-18) and 43.58M
  (ResNet-50), are the 3x3 layout (21,607,266 and 43,584,866; the 1x1 gives 21,599,266 and
  43,576,866, 21.60M and 43.58M), so those spec rows set ``map_kernel_size: 3``
  (attnzoo/experiments/gam_table2.yaml).
- The BN before the 1x1 conv and the ReLU after its BN follow the official code (the paper's
  figure shows the same order).
- Inference uses the perception branch's logits only, as in the paper.

Interface: in training mode the model returns ``(perception_logits, attention_logits)``
and the training loop sums the cross-entropy of each (``attnzoo.train.loss``); in eval
mode it returns the perception logits, so evaluation, profiling and Grad-CAM see an
ordinary classifier. ``forward_maps(x)`` returns all three outputs, M included.
"""

from __future__ import annotations

import torch
from torch import nn

from ..registry import register_attention


@register_attention("abn", level="model")
class AttentionBranchNetwork(nn.Module):
    def __init__(self, backbone: nn.Module, map_kernel_size: int = 1) -> None:
        super().__init__()
        if map_kernel_size not in (1, 3):
            raise ValueError(f"map_kernel_size must be 1 or 3, got {map_kernel_size!r}")
        if len(backbone.stage_names) < 2:
            raise ValueError(f"abn needs a backbone with two or more stages, not {backbone.name}")
        self.backbone = backbone
        self.name = f"{backbone.name}+abn"
        self.in_chans = backbone.in_chans
        self.num_classes = k = backbone.num_classes
        self.split = len(backbone.stage_names) - 1
        channels = backbone.stage_channels[-1]
        self.branch = backbone.make_stage(self.split, stride=1)
        self.branch_bn = nn.BatchNorm2d(channels)
        self.class_maps = nn.Conv2d(channels, k, 1, bias=False)
        self.class_bn = nn.BatchNorm2d(k)
        self.relu = nn.ReLU(inplace=True)
        self.class_conv = nn.Conv2d(k, k, 1, bias=False)
        pad = map_kernel_size // 2
        self.map_conv = nn.Conv2d(k, 1, map_kernel_size, padding=pad, bias=False)
        self.map_bn = nn.BatchNorm2d(1)
        for m in (self.class_maps, self.class_conv, self.map_conv):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_maps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Perception logits, attention logits and the attention map M (N, 1, h, w)."""
        net = self.backbone
        x = net.forward_stem(x)
        for i in range(self.split):
            x = net.forward_stage(i, x)
        a = self.branch_bn(self.branch(x))
        a = self.relu(self.class_bn(self.class_maps(a)))
        attention_logits = self.class_conv(a).mean(dim=(2, 3))
        m = torch.sigmoid(self.map_bn(self.map_conv(a)))
        x = x * (1 + m)
        for i in range(self.split, len(net.stage_names)):
            x = net.forward_stage(i, x)
        return {
            "logits": net.forward_head(x),
            "attention_logits": attention_logits,
            "attention_map": m,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        out = self.forward_maps(x)
        if self.training:
            return out["logits"], out["attention_logits"]
        return out["logits"]
