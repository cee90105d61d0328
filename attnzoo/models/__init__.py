"""Backbones. Each file registers its models under their short names."""

from .cifar_resnet import BasicBlock, CifarResNet

__all__ = ["BasicBlock", "CifarResNet"]
