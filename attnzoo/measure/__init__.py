"""Measuring models: parameters, MACs/FLOPs, memory and latency."""

from .profile import ModelSpec, count_flops, count_params, format_profile, profile

__all__ = ["ModelSpec", "count_flops", "count_params", "format_profile", "profile"]
