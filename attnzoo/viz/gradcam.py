"""Grad-CAM at the output of a model's last stage, through the ``grad-cam`` package
(jacobgil/pytorch-grad-cam).

Grad-CAM (Selvaraju et al., ICCV 2017; the HAM paper's Fig. 5): for class c and the
feature map A (K channels) of a layer,
    alpha_k = 1/(h w) sum_ij dy_c / dA_k,ij          (channel weights: pooled gradients)
    L_c     = ReLU(sum_k alpha_k A_k)                (h x w, upsampled to the image)
Grad-CAM++ (Chattopadhyay et al., WACV 2018) weights each gradient position by the
closed-form alpha of its Eq. 19 instead of the plain mean.

The layer is the last stage of the backbone (``layer3`` of a CIFAR ResNet, ``layer4`` of
ResNet-50, ...): with ``placement="block"`` its output already went through every
attention module, and for ABN it is the perception branch's last stage. Pre-activation
nets (WRN, DenseNet) apply their final BN-ReLU after this output. The package scales every
map to [0, 1] on its own (min-max per image), so maps say *where*, not *how much*.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

METHODS = ("gradcam", "gradcam++")


def backbone_of(model: nn.Module) -> nn.Module:
    """The backbone of a model; model-level attentions (ABN, bridge_head) wrap one."""
    return getattr(model, "backbone", model)


def last_stage(model: nn.Module) -> nn.Module:
    net = backbone_of(model)
    names = getattr(net, "stage_names", ())
    if not names:
        raise ValueError(f"{type(net).__name__} has no stages to take Grad-CAM at")
    return getattr(net, names[-1])


def grad_cam(
    model: nn.Module,
    images: torch.Tensor,
    classes: Sequence[int],
    method: str = "gradcam",
) -> np.ndarray:
    """Heatmaps (N, H, W), float32 in [0, 1], of ``classes[i]`` for normalised ``images[i]``.

    ``images`` is (N, C, H, W) as the model reads it (normalised). The model is put in eval
    mode and its parameter gradients are overwritten.
    """
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if method not in METHODS:
        raise ValueError(f"unknown Grad-CAM method {method!r}; choose one of: {', '.join(METHODS)}")
    if len(classes) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(classes)} classes")
    kind = GradCAM if method == "gradcam" else GradCAMPlusPlus
    cam = kind(model=model, target_layers=[last_stage(model)])
    try:
        with torch.enable_grad():
            maps = cam(
                input_tensor=images.detach().float().contiguous(),
                targets=[ClassifierOutputTarget(int(c)) for c in classes],
            )
    finally:
        # Not ``with cam:``: the package's __exit__ swallows IndexErrors.
        cam.activations_and_grads.release()
        model.zero_grad(set_to_none=True)
    maps = np.nan_to_num(np.asarray(maps, dtype=np.float32), nan=0.0)
    return np.clip(maps, 0.0, 1.0)
