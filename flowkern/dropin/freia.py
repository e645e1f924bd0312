"""FrEIA's affine couplings, AllInOneBlock and ActNorm on flowkern's ops.

FrEIA's ``forward(x, c=[], rev=False, jac=True)`` maps x → z (``rev=True`` z → x) and returns ``((out,),
log_jac_det (N,))``, the log-det of the direction called; those conventions are kept. In flowkern's terms its
couplings are ``coupling_forward`` / ``coupling_inverse`` over ``h = [s | t]`` (``"halves"``), with its
clamps ``clamp · 0.636 · atan(s)`` → ``"atan"`` and ``clamp · tanh(s)`` → ``"exp"``, both with
``bound = clamp``; conditions only feed the subnetworks.
"""
import inspect
import math

import FrEIA.modules as Fm
import torch
from torch import nn
from FrEIA.modules import coupling_layers

from .. import functional
from . import rule
from ._common import as_image, glow_convolutions, has_hooks, like, run_glow_conditioner


def _clamp_scale(block):
    """The fused scale computing ``block``'s clamp, or None."""
    f = block.f_clamp
    if f is torch.tanh:
        return "exp"
    code = getattr(f, "__code__", None)
    if (code is not None and code.co_filename == inspect.getfile(coupling_layers) and 0.636 in code.co_consts
            and "atan" in code.co_names):
        return "atan"
    return None


def _why_not_coupling(block):
    """Why the fused coupling cannot compute ``block``, or None."""
    if block.split_len1 != (block.channels + 1) // 2:
        return (f"a split of {block.channels} channels into {block.split_len1} + {block.split_len2}: the fused "
                "coupling's channel mask splits at ceil(C/2)")
    if _clamp_scale(block) is None:
        return "a clamp activation other than FrEIA's 'ATAN' and 'TANH'"
    if not block.clamp > 0:
        return f"clamp {block.clamp}: the fused scales bound |log s| by a positive clamp"
    return None


def _run_subnet(subnet, condition):
    """``subnet(condition)``; a subnetwork that is exactly an ``nn.Sequential`` of Glow's conditioner (without
    hooks) runs in the fastest form measured for its shape, as flowkern's own conditioners do."""
    convolutions = glow_convolutions(subnet) if type(subnet) is nn.Sequential and not has_hooks(subnet) else None
    return subnet(condition) if convolutions is None else run_glow_conditioner(convolutions, condition)


class _Coupling:
    """One affine half-coupling of a FrEIA block as the fused op: channel ``parity`` 1 transforms the first
    ``split_len1`` channels given the rest, 0 the last ``split_len2`` given the first."""

    def _couple(self, image, x, subnet, parity, c, rev):
        """``image`` (N, C, H, W) the input ``x`` (N, C, ...) seen as an image → (output image, Σ log s of the
        x → z map)."""
        condition = like(image.split([self.split_len1, self.split_len2], dim=1)[parity], x)
        if self.conditional:
            condition = torch.cat([condition, *c], 1)
        h = as_image(_run_subnet(subnet, condition))
        op = functional.coupling_inverse if rev else functional.coupling_forward
        return op(image, h, "channel", parity, self._flowkern_scale, self.clamp, "halves")

    def flowkern_adopt(self):
        self._flowkern_scale = _clamp_scale(self)  # read once: torch.compile traces no inspection of code

    def flowkern_runs(self):
        return f"fused coupling ops (scale {_clamp_scale(self)!r}, bound {self.clamp})"


class GLOWCouplingBlock(_Coupling, Fm.GLOWCouplingBlock):
    """``FrEIA.modules.GLOWCouplingBlock``: its two half-couplings (the first half from ``subnet2`` of the
    second, then the second from ``subnet1`` of the new first) as two fused coupling ops."""

    def forward(self, x, c=[], rev=False, jac=True):
        v = x[0]
        image = as_image(v)
        if not rev:
            image, first = self._couple(image, v, self.subnet2, 1, c, rev)
            image, second = self._couple(image, v, self.subnet1, 0, c, rev)
            return (like(image, v),), first + second
        image, second = self._couple(image, v, self.subnet1, 0, c, rev)
        image, first = self._couple(image, v, self.subnet2, 1, c, rev)
        return (like(image, v),), -(first + second)


class AffineCouplingOneSided(_Coupling, Fm.AffineCouplingOneSided):
    """``FrEIA.modules.AffineCouplingOneSided``: the second part from ``subnet`` of the first, one fused op."""

    def forward(self, x, c=[], rev=False, jac=True):
        v = x[0]
        out, logdet = self._couple(as_image(v), v, self.subnet, 0, c, rev)
        return (like(out, v),), -logdet if rev else logdet


def _coupling_rule(subclass):
    @rule(subclass)
    def check(module):
        why = _why_not_coupling(module)
        return (None, why) if why else (subclass, subclass.flowkern_runs(module))
    return check


class AllInOneBlock(Fm.AllInOneBlock):
    """``FrEIA.modules.AllInOneBlock`` with a hard or soft fixed permutation: the coupling (``a = 0.1·subnet``,
    ``log s = clamp·tanh(a_s)``, shift ``a_t``) as one fused coupling op, and the global affine and the
    permutation as one 1×1 convolution, ``W·(y·scale + offset) = (W·diag(scale))·y + W·offset``. The 0.1 on
    the subnetwork's output is one multiply, as in FrEIA."""

    def flowkern_adopt(self):
        pass

    def flowkern_runs(self):
        return (f"a fused coupling op (scale 'exp', bound {self.clamp}), then the global affine and the "
                "permutation as one 1×1 convolution")

    def forward(self, x, c=[], rev=False, jac=True):
        v = x[0]
        image = as_image(v)
        channels = image.shape[1]
        scale = self.global_scale_activation(self.global_scale).view(channels)
        per_pixel = torch.log(scale).sum()
        if rev:
            inverse = self.w_perm_inv.view(channels, channels)
            image = functional.conv1x1(image, inverse / scale[:, None], -self.global_offset.view(channels) / scale)
        condition = like(image.split(self.splits, dim=1)[0], v)
        if self.conditional:
            condition = torch.cat([condition, *c], 1)
        h = as_image(_run_subnet(self.subnet, condition)) * 0.1
        op = functional.coupling_inverse if rev else functional.coupling_forward
        image, logdet = op(image, h, "channel", 0, "exp", self.clamp, "halves")
        if not rev:
            weight = self.w_perm.view(channels, channels)
            image = functional.conv1x1(image, weight * scale, weight @ self.global_offset.view(channels))
        logdet = logdet + per_pixel * (image.shape[2] * image.shape[3])
        return (like(image, v),), -logdet if rev else logdet


@rule(AllInOneBlock)
def _all_in_one(module):
    if module.householder:
        return None, "learned Householder reflections: its permutation changes with its parameters"
    if module.GIN:
        return None, "a GIN block (volume-preserving): the fused coupling has no mean-subtracted scale"
    if module.reverse_pre_permute:
        return None, "reverse_permutation=True: a permutation before the coupling"
    if not module.clamp > 0:
        return None, f"affine_clamping {module.clamp}: the fused scale bounds |log s| by a positive clamp"
    return AllInOneBlock, AllInOneBlock.flowkern_runs(module)


class ActNorm(Fm.ActNorm):
    """``FrEIA.modules.ActNorm`` by the fused ActNorm op: x → z ``x·e^scale + bias``, z → x
    ``(z − bias)·e^−scale``, log-det ``±Σ scale·prod(spatial dims)`` per sample; its initialisation (on the
    first batch in either direction, with FrEIA's estimator) unchanged."""

    def flowkern_adopt(self):
        pass

    def flowkern_runs(self):
        return "the fused ActNorm op"

    def forward(self, x, rev=False, jac=True):
        if self.init_on_next_batch:
            self._initialize_with_data(x[0])
        v = x[0]
        image = as_image(v)
        op = functional.actnorm_inverse if rev else functional.actnorm_forward
        out = like(op(image, self.scale.view(-1), self.bias.view(-1))[0], v)
        logdet = (self.scale.sum() * math.prod(self.dims_in[1:])).repeat(v.shape[0])
        return [out], -logdet if rev else logdet


@rule(ActNorm)
def _actnorm(module):
    return ActNorm, ActNorm.flowkern_runs(module)


RULES = {
    Fm.ActNorm: _actnorm,
    Fm.GLOWCouplingBlock: _coupling_rule(GLOWCouplingBlock),
    Fm.AffineCouplingOneSided: _coupling_rule(AffineCouplingOneSided),
    Fm.RNVPCouplingBlock: lambda module: (None, "separate s and t subnetworks: the fused coupling reads raw and "
                                                "shift from one h"),
    Fm.AllInOneBlock: _all_in_one,
}
