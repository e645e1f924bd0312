"""nflows' couplings, ActNorm, LU linear map and 1×1 convolution on flowkern's ops.

nflows' ``forward(inputs, context=None)`` maps data → noise and ``inverse`` noise → data, each returning
``(outputs, logabsdet (N,))`` of the direction called; those conventions are kept. In flowkern's terms its
affine coupling is ``coupling_forward`` / ``coupling_inverse`` over ``h = [shift | raw]`` (``"shift_halves"``)
with the scale ``sigmoid(raw + 2) + 1e-3`` (``"offset_sigmoid"``), its additive coupling the ``"additive"``
scale over ``h = shift``; a mask that transforms the first ⌈D/2⌉ features is the channel mask's parity 1, one
that transforms the rest its parity 0. Its LU parametrisation (a softplus diagonal, the bias after the product)
is assembled in the layer and run by ``folded_lu_weight``, ``folded_lu_weight_inverse`` and ``conv1x1``.
Inputs are (N, D) vectors or (N, C, H, W) images, as in nflows.
"""
import torch
import torch.nn.functional as F
from nflows.transforms import conv, coupling, lu, normalization

from .. import functional
from ..nn.actnorm import BufferFlag
from ..reference import coupling_condition
from . import rule
from ._common import as_image, like


def _check_inputs(inputs, features):
    """nflows' own refusals, in its words."""
    if inputs.dim() not in (2, 4):
        raise ValueError("Inputs must be a 2D or a 4D tensor.")
    if inputs.shape[1] != features:
        raise ValueError(f"Expected features = {features}, got {inputs.shape[1]}.")


def _mask_parity(module):
    """The channel mask's parity computing ``module``'s mask, or None: parity 1 transforms the first ⌈D/2⌉
    features, parity 0 the rest."""
    features = module.features
    first = (features + 1) // 2
    transformed, identity = module.transform_features.tolist(), module.identity_features.tolist()
    if features >= 2 and transformed == list(range(first, features)) and identity == list(range(first)):
        return 0
    if features >= 2 and transformed == list(range(first)) and identity == list(range(first, features)):
        return 1
    return None


def _scale(module):
    """The fused scale of an nflows coupling: ``"additive"`` for its additive one."""
    return "additive" if isinstance(module, coupling.AdditiveCouplingTransform) else "offset_sigmoid"


class AffineCouplingTransform(coupling.AffineCouplingTransform):
    """``nflows.transforms.AffineCouplingTransform`` with a mask split at ⌈D/2⌉ as one fused coupling op: the
    identity part read in place by ``transform_net(identity, context)``, ``h = [shift | raw]`` read as it is, the
    scale ``sigmoid(raw + 2) + 1e-3`` and the log-det in the same pass."""

    def flowkern_adopt(self):
        # read once: the mask is a buffer of the device
        self._flowkern_parity, self._flowkern_scale = _mask_parity(self), _scale(self)

    def flowkern_runs(self):
        return f"one fused coupling op (scale {_scale(self)!r}, h shift_halves, parity {_mask_parity(self)})"

    def _couple(self, inputs, context, inverse):
        _check_inputs(inputs, self.features)
        image = as_image(inputs)
        condition = like(coupling_condition(image, "channel", self._flowkern_parity), inputs)
        h = as_image(self.transform_net(condition, context))
        op = functional.coupling_inverse if inverse else functional.coupling_forward
        out, logdet = op(image, h, "channel", self._flowkern_parity, self._flowkern_scale, 2.0, "shift_halves")
        return like(out, inputs), -logdet if inverse else logdet

    def forward(self, inputs, context=None):
        return self._couple(inputs, context, inverse=False)

    def inverse(self, inputs, context=None):
        return self._couple(inputs, context, inverse=True)


class AdditiveCouplingTransform(AffineCouplingTransform, coupling.AdditiveCouplingTransform):
    """``nflows.transforms.AdditiveCouplingTransform`` with a mask split at ⌈D/2⌉ as one fused additive coupling
    op (``h = shift``); its log-det is zero."""


def _coupling_rule(subclass):
    @rule(subclass)
    def check(module):
        if module.unconditional_transform is not None:
            return None, "an unconditional transform of the identity features"
        if _mask_parity(module) is None:
            return None, ("a mask that does not transform the first ceil(D/2) features or the rest: the fused "
                          "coupling's channel mask splits at ceil(D/2)")
        return subclass, subclass.flowkern_runs(module)
    return check


class ActNorm(normalization.ActNorm):
    """``nflows.transforms.ActNorm`` by the fused ActNorm op: ``forward`` ``x·e^log_scale + shift``, ``inverse``
    ``(x − shift)·e^−log_scale``, log-det ``±H·W·Σ log_scale`` per sample (Σ log_scale for vectors). The
    data-dependent initialisation fires on the first ``forward`` in training mode, as nflows', with its
    estimator (unbiased std); its flag, the buffer ``initialized``, is read from the device only after it was
    written."""

    def flowkern_adopt(self):
        self._done = BufferFlag()
        self._done(self.initialized)  # read eagerly, for code compiled before the next eager call

    def flowkern_runs(self):
        return "the fused ActNorm op; its initialisation flag read without a host sync"

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._done(self.initialized)  # as above: a loaded flag is known to compiled code

    @torch.no_grad()
    def _initialize(self, inputs):
        rows = inputs.transpose(0, 1).reshape(inputs.shape[1], -1)  # (C, samples · pixels)
        std = rows.std(dim=1)
        self.log_scale.copy_(-torch.log(std))
        self.shift.copy_(-(rows / std[:, None]).mean(dim=1))
        self.initialized.fill_(True)

    def _run(self, inputs, inverse):
        if inputs.dim() not in (2, 4):
            raise ValueError("Expecting inputs to be a 2D or a 4D tensor.")
        op = functional.actnorm_inverse if inverse else functional.actnorm_forward
        out, logdet = op(as_image(inputs), self.log_scale, self.shift)
        return like(out, inputs), -logdet if inverse else logdet

    def forward(self, inputs, context=None):
        if inputs.dim() in (2, 4) and self.training and not self._done(self.initialized):
            self._initialize(inputs)
        return self._run(inputs, inverse=False)

    def inverse(self, inputs, context=None):
        return self._run(inputs, inverse=True)


@rule(ActNorm)
def _actnorm(module):
    return ActNorm, ActNorm.flowkern_runs(module)


class LULinear(lu.LULinear):
    """``nflows.transforms.LULinear`` over (N, D) vectors by the fused 1×1 convolution of (N, D, 1, 1) (other
    ranks, which nflows mixes along their last dimension, run nflows' own code): ``W = L·U`` with
    nflows' parametrisation (unit lower ``L``, upper ``U`` with diagonal ``softplus(u) + eps``) assembled by
    ``folded_lu_weight`` (no permutation, ``log_s = log(softplus(u) + eps)``), the bias added after; ``inverse``
    by ``folded_lu_weight_inverse``, no triangular solve over the data. Log-det ``±Σ log(softplus(u) + eps)``
    per sample. nflows' weight cache (``using_cache``) is not needed: the weight costs one op."""

    def flowkern_adopt(self):
        d, like = self.features, self.bias
        below = torch.ones(d, d, dtype=torch.bool, device=like.device).tril(-1)
        constants = {"below": below, "above": below.t().contiguous(), "identity": torch.eye(d).to(like),
                     "zeros": torch.zeros(d).to(like), "ones": torch.ones(d).to(like)}
        for name, t in constants.items():  # non-persistent: the checkpoint keys stay nflows'
            self.register_buffer(f"_flowkern_{name}", t, persistent=False)

    def flowkern_runs(self):
        return "the fused 1×1 convolution; W from its LU factors in one op, W⁻¹ by triangular substitutions"

    def _factors(self):
        """The arguments of ``folded_lu_weight``: nflows' entries in row-major order, as it places them."""
        identity, zeros = self._flowkern_identity, self._flowkern_zeros
        lower = identity.masked_scatter(self._flowkern_below, self.lower_entries)  # their diagonals are not read
        upper = identity.masked_scatter(self._flowkern_above, self.upper_entries)
        log_s = torch.log(F.softplus(self.unconstrained_upper_diag) + self.eps)
        return identity, lower, upper, self._flowkern_ones, log_s, zeros, zeros

    def _weight(self, inverse):
        """(W or W⁻¹ (D, D), the log-det of the forward map per position (0-d))."""
        factors = self._factors()
        if inverse:
            return functional.folded_lu_weight_inverse(*factors)[0], factors[4].sum()
        weight, _, per_pixel = functional.folded_lu_weight(*factors)
        return weight, per_pixel

    def _map(self, inputs, inverse, weight, per_pixel):
        image = as_image(inputs)
        if inverse:
            out = functional.conv1x1(image, weight, -(weight @ self.bias))
        else:
            out = functional.conv1x1(image, weight, self.bias)
        logdet = (per_pixel * (image.shape[2] * image.shape[3])).expand(image.shape[0])
        return like(out, inputs), -logdet if inverse else logdet

    def forward(self, inputs, context=None):
        if inputs.dim() != 2:  # nflows' F.linear then mixes the last dimension: its own code runs
            return super().forward(inputs, context)
        return self._map(inputs, False, *self._weight(inverse=False))

    def inverse(self, inputs, context=None):
        if inputs.dim() != 2:
            return super().inverse(inputs, context)
        return self._map(inputs, True, *self._weight(inverse=True))


class OneByOneConvolution(LULinear, conv.OneByOneConvolution):
    """``nflows.transforms.OneByOneConvolution``: its fixed channel permutation folded into the LU weight
    (``W·P``, and ``P⁻¹·W⁻¹`` for the inverse, each one ``index_copy``) and the whole map one fused 1×1
    convolution per pixel, as :class:`LULinear`."""

    def _weight(self, inverse):
        weight, per_pixel = super()._weight(inverse)
        permutation = self.permutation._permutation  # the input's channel i is channel permutation[i] of x
        return torch.empty_like(weight).index_copy_(0 if inverse else 1, permutation, weight), per_pixel

    def forward(self, inputs, context=None):
        if inputs.dim() != 4:
            raise ValueError("Inputs must be a 4D tensor.")
        return self._map(inputs, False, *self._weight(inverse=False))

    def inverse(self, inputs, context=None):
        if inputs.dim() != 4:
            raise ValueError("Inputs must be a 4D tensor.")
        return self._map(inputs, True, *self._weight(inverse=True))


@rule(LULinear)
def _lu_linear(module):
    return LULinear, LULinear.flowkern_runs(module)


@rule(OneByOneConvolution)
def _one_by_one(module):
    return OneByOneConvolution, OneByOneConvolution.flowkern_runs(module)


RULES = {
    lu.LULinear: _lu_linear,
    conv.OneByOneConvolution: _one_by_one,
    normalization.ActNorm: _actnorm,
    coupling.AffineCouplingTransform: _coupling_rule(AffineCouplingTransform),
    coupling.AdditiveCouplingTransform: _coupling_rule(AdditiveCouplingTransform),
}
