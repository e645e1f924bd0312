"""The pure-PyTorch reference path: the specification of every op and the baseline of every benchmark.

The fused ops (``OPS``) exist with these signatures in every backend; the helpers below them are small
tensor algebra that no backend needs to replace.
"""
from .actnorm import actnorm_forward, actnorm_inverse, actnorm_logdet
from .conv1x1 import conv1x1, conv1x1_logdet, folded_lu_weight, lu_weight, lu_weight_inverse
from .coupling import (
    MASKS,
    SCALES,
    checkerboard,
    channel_layout,
    channel_split_sizes,
    conditioner_channels,
    coupling_condition,
    coupling_forward,
    coupling_inverse,
    transformed_channels,
)
from .gaussian import standard_normal_log_prob, standardize, unstandardize
from .squeeze import squeeze, unsqueeze

OPS = ("coupling_forward", "coupling_inverse", "actnorm_forward", "actnorm_inverse", "conv1x1", "folded_lu_weight")

__all__ = [
    "OPS", "MASKS", "SCALES",
    "actnorm_forward", "actnorm_inverse", "conv1x1", "coupling_forward", "coupling_inverse", "folded_lu_weight",
    "actnorm_logdet", "channel_layout", "channel_split_sizes", "checkerboard", "conditioner_channels", "conv1x1_logdet",
    "coupling_condition",
    "lu_weight", "lu_weight_inverse", "squeeze", "standard_normal_log_prob", "standardize",
    "transformed_channels", "unsqueeze", "unstandardize",
]
