"""The pure-PyTorch reference path: the specification of every op and the baseline of every benchmark.

The fused ops (``OPS``) exist with these signatures in every backend; the helpers below them are small
tensor algebra that no backend needs to replace.
"""
from .actnorm import actnorm_forward, actnorm_inverse, actnorm_logdet, fold_actnorms, fold_actnorms_backward
from .conv1x1 import (
    conv1x1,
    conv1x1_logdet,
    folded_lu_weight,
    folded_lu_weight_inverse,
    lu_weight,
    lu_weight_inverse,
)
from .coupling import (
    LAYOUTS,
    MASKS,
    SCALES,
    checkerboard,
    channel_split_sizes,
    conditioner_channels,
    coupling_backward,
    coupling_condition,
    coupling_forward,
    coupling_inverse,
    h_planes,
    split_h,
    transformed_channels,
    transformed_range,
)
from .gaussian import standard_normal_log_prob, standardize, unstandardize
from .squeeze import squeeze, unsqueeze

OPS = ("coupling_forward", "coupling_inverse", "actnorm_forward", "actnorm_inverse", "conv1x1", "folded_lu_weight",
       "folded_lu_weight_inverse", "fold_actnorms")
# The backward of an op, called as the backend that ran the op computes it, by autograd nodes that hold the op
# inside them and differentiate it by hand (flowkern.nn.glow_coupling): every backend defines these too.
BACKWARD_OPS = ("coupling_backward", "fold_actnorms_backward")

__all__ = [
    "OPS", "BACKWARD_OPS", "LAYOUTS", "MASKS", "SCALES",
    "actnorm_forward", "actnorm_inverse", "conv1x1", "coupling_backward", "coupling_forward", "coupling_inverse",
    "fold_actnorms", "fold_actnorms_backward", "folded_lu_weight", "folded_lu_weight_inverse",
    "actnorm_logdet", "channel_split_sizes", "checkerboard", "conditioner_channels", "conv1x1_logdet",
    "coupling_condition", "h_planes", "split_h",
    "lu_weight", "lu_weight_inverse", "squeeze", "standard_normal_log_prob", "standardize",
    "transformed_channels", "transformed_range", "unsqueeze", "unstandardize",
]
