"""FrEIA's affine couplings and ActNorm on flowkern's ops.

FrEIA's ``forward(x, c=[], rev=False, jac=True)`` maps x → z (``rev=True`` z → x) and returns ``((out,),
log_jac_det (N,))``, the log-det of the direction called; those conventions are kept. In flowkern's terms its
couplings are ``coupling_forward`` / ``coupling_inverse`` over ``h = [s | t]`` (``"halves"``), with its
clamps ``clamp · 0.636 · atan(s)`` → ``"atan"`` and ``clamp · tanh(s)`` → ``"exp"``, both with
``bound = clamp``; conditions only feed the subnetworks.
"""
import inspect

import FrEIA.modules as Fm
import numpy as np
import torch
from FrEIA.modules import coupling_layers

from .. import functional
from . import rule
from ._common import as_image, like


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


class _Coupling:
    """One affine half-coupling of a FrEIA block as the fused op: channel ``parity`` 1 transforms the first
    ``split_len1`` channels given the rest, 0 the last ``split_len2`` given the first."""

    def _couple(self, image, x, subnet, parity, c, rev):
        """``image`` (N, C, H, W) the input ``x`` (N, C, ...) seen as an image → (output image, Σ log s of the
        x → z map)."""
        condition = like(image.split([self.split_len1, self.split_len2], dim=1)[parity], x)
        if self.conditional:
            condition = torch.cat([condition, *c], 1)
        h = as_image(subnet(condition))
        op = functional.coupling_inverse if rev else functional.coupling_forward
        return op(image, h, "channel", parity, _clamp_scale(self), self.clamp, "halves")

    def flowkern_adopt(self):
        pass

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
        logdet = (self.scale.sum() * int(np.prod(self.dims_in[1:]))).repeat(v.shape[0])
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
    Fm.AllInOneBlock: lambda module: (None, "its global affine, soft permutation and scaled tanh clamp are not "
                                            "covered by the fused ops yet"),
}
