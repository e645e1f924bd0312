"""normflows' Glow layers on flowkern's ops.

normflows' ``forward`` maps latent → data and ``inverse`` data → latent, each returning the log-det of the
direction called; those conventions are kept. In flowkern's terms its couplings are
``coupling_forward`` (latent → data) and ``coupling_inverse`` (data → latent) over ``h`` laid out
``"interleaved"`` (``shift, raw = h[:, 0::2], h[:, 1::2]``), with its scale maps ``"exp"`` → ``"plain_exp"``,
``"sigmoid"`` → ``"reciprocal_sigmoid"`` (its latent → data map divides by the sigmoid) and
``"sigmoid_inv"`` → ``"sigmoid"``.
"""
import normflows as nf
import torch
from torch import nn

from .. import functional
from ..nn.actnorm import BufferFlag
from ..reference import coupling_condition, lu_weight, lu_weight_inverse
from . import rule
from ._common import as_image, glow_convolutions, has_hooks, like, run_glow_conditioner

SCALES = {"exp": "plain_exp", "sigmoid": "reciprocal_sigmoid", "sigmoid_inv": "sigmoid"}
PARITIES = {"channel": 0, "channel_inv": 1}  # which chunk normflows' Split passes: the first, the second


class ActNorm(nf.flows.ActNorm):
    """``normflows.flows.ActNorm`` over (N, C, H, W) by the fused ActNorm op: ``forward`` ``z·e^s + t``,
    ``inverse`` ``(z − t)·e^−s``, log-det ``±H·W·Σ s`` (0-d, as normflows). The data-dependent initialisation
    fires on the first call in either direction, as normflows', with its estimator (unbiased std + 1e-6); its
    flag, the buffer ``data_dep_init_done``, is read from the device only after it was written."""

    def flowkern_adopt(self):
        self._done = BufferFlag()
        self.initialized()  # read eagerly, for code compiled before the next eager call

    def flowkern_runs(self):
        return "the fused ActNorm op; its initialisation flag read without a host sync"

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.initialized()  # as above: a loaded flag is known to compiled code

    def initialized(self) -> bool:
        return self._done(self.data_dep_init_done)

    @torch.no_grad()
    def _initialize(self, z, direction):
        std = z.std(dim=self.batch_dims, keepdim=True) + 1e-6
        mean = z.mean(dim=self.batch_dims, keepdim=True)
        if direction == "forward":
            self.s.copy_(-torch.log(std))
            self.t.copy_(-mean * torch.exp(self.s))
        else:
            self.s.copy_(torch.log(std))
            self.t.copy_(mean)
        self.data_dep_init_done.fill_(1.0)

    def _logdet(self, z):
        return self.s.sum() * (z.shape[2] * z.shape[3])

    def forward(self, z):
        if not self.initialized():
            self._initialize(z, "forward")
        return functional.actnorm_forward(z, self.s.view(-1), self.t.view(-1))[0], self._logdet(z)

    def inverse(self, z):
        if not self.initialized():
            self._initialize(z, "inverse")
        return functional.actnorm_inverse(z, self.s.view(-1), self.t.view(-1))[0], -self._logdet(z)


@rule(ActNorm)
def _actnorm(module):
    if module.s.dim() != 4 or module.s.shape[0] != 1 or module.s.shape[2:] != (1, 1):
        return None, (f"parameters of shape {tuple(module.s.shape)}: the fused ActNorm takes (N, C, H, W) inputs "
                      "with one scale per channel, s of shape (1, C, 1, 1)")
    return ActNorm, ActNorm.flowkern_runs(module)


class Invertible1x1Conv(nf.flows.Invertible1x1Conv):
    """``normflows.flows.Invertible1x1Conv`` by the fused 1×1 convolution: ``inverse`` (data → latent) by
    ``W = P·L·U``, ``forward`` by ``W⁻¹`` (LU: triangular solves; a free W: its float64 inverse, as normflows);
    log-det ``±H·W·Σ log_S`` (a free W: its ``slogdet``), 0-d."""

    def flowkern_adopt(self):
        pass

    def flowkern_runs(self):
        return "the fused 1×1 convolution" + (", W⁻¹ by triangular solves" if self.use_lu else "")

    def _matrix(self, inverse):
        if self.use_lu:
            return (lu_weight_inverse if inverse else lu_weight)(self.P, self.L, self.U, self.sign_S, self.log_S)
        return torch.linalg.inv(self.W.double()).to(self.W.dtype) if inverse else self.W

    def _logdet(self, z):
        per_pixel = self.log_S.sum() if self.use_lu else torch.linalg.slogdet(self.W)[1]
        return per_pixel * (z.shape[2] * z.shape[3])

    def forward(self, z):
        return functional.conv1x1(z, self._matrix(inverse=True)), -self._logdet(z)

    def inverse(self, z):
        return functional.conv1x1(z, self._matrix(inverse=False)), self._logdet(z)


@rule(Invertible1x1Conv)
def _invconv(module):
    return Invertible1x1Conv, Invertible1x1Conv.flowkern_runs(module)


class AffineCouplingBlock(nf.flows.AffineCouplingBlock):
    """``normflows.flows.AffineCouplingBlock`` (split, coupling, merge) as one fused coupling op: the channel
    split read in place, ``h = param_map(pass part)`` read in its interleaved layout, the log-det reduced in
    the same pass. Inputs (N, C, ...) of any rank; the conditioner sees the pass part in that rank."""

    def flowkern_adopt(self):
        self._parity, self._scale = _coupling_options(self)

    def flowkern_runs(self):
        parity, scale = _coupling_options(self)
        return f"one fused coupling op (scale {scale!r}, h interleaved, parity {parity})"

    def _h(self, z):
        image = as_image(z)
        return as_image(self.flows[1].param_map(like(coupling_condition(image, "channel", self._parity), z))), image

    def forward(self, z):
        h, image = self._h(z)
        out, logdet = functional.coupling_forward(image, h, "channel", self._parity, self._scale, 2.0, "interleaved")
        return like(out, z), logdet

    def inverse(self, z):
        h, image = self._h(z)
        out, logdet = functional.coupling_inverse(image, h, "channel", self._parity, self._scale, 2.0, "interleaved")
        return like(out, z), -logdet


def _coupling_options(block):
    """(parity, scale) of the fused coupling computing an AffineCouplingBlock."""
    split, coupling, _ = block.flows
    return PARITIES[split.mode], SCALES[coupling.scale_map] if coupling.scale else "additive"


@rule(AffineCouplingBlock)
def _coupling_block(module):
    parts = list(module.flows)
    if [type(p) for p in parts] != [nf.flows.Split, nf.flows.AffineCoupling, nf.flows.Merge]:
        return None, "its flows are not normflows' Split, AffineCoupling, Merge"
    split, coupling, merge = parts
    if split.mode not in PARITIES or merge.mode != split.mode:
        return None, (f"split mode {split.mode!r}: the fused coupling covers 'channel' and 'channel_inv' "
                      "(normflows' checkerboard gathers the pass part into a half-width tensor)")
    if coupling.scale and coupling.scale_map not in SCALES:
        return None, f"scale map {coupling.scale_map!r} (covered: {', '.join(SCALES)})"
    return AffineCouplingBlock, AffineCouplingBlock.flowkern_runs(module)


class ConvNet2d(nf.nets.ConvNet2d):
    """``normflows.nets.ConvNet2d`` with Glow's shape (conv3×3 → ReLU → conv1×1 → ReLU → conv3×3) in the
    fastest of :attr:`flowkern.nn.GlowConditioner.FORMS` measured for its shape (on the CPU: over channels-last
    activations, or its last two convolutions as matrix products; elsewhere its convolutions), the ReLUs in
    place."""

    def flowkern_adopt(self):
        pass

    def flowkern_runs(self):
        return "its convolutions, channels-last or as matrix products where measured faster (CPU)"

    def forward(self, x):
        return run_glow_conditioner(self.net[::2], x)


@rule(ConvNet2d)
def _convnet(module):
    if glow_convolutions(module.net, relu_types=(nn.LeakyReLU,)) is None:
        return None, ("not Glow's conv3×3 → ReLU → conv1×1 → ReLU → conv3×3 with biases (leaky slope 0, no "
                      "ActNorm, no hooks): its own layers run")
    return ConvNet2d, ConvNet2d.flowkern_runs(module)


class GlowBlock(nf.flows.GlowBlock):
    """``normflows.flows.GlowBlock`` (coupling, 1×1 conv, ActNorm from latent to data) with its ActNorm and LU
    1×1 conv as one 1×1 convolution: data → latent ``W·((z − t)·e^−s)``, its weight and bias assembled by the
    fused ``folded_lu_weight`` op, and latent → data by ``folded_lu_weight_inverse``. Where that does not apply
    (ActNorm not yet initialised, a free W, a layer with hooks, a layer not accelerated) its layers run one by
    one."""

    def flowkern_adopt(self):
        pass

    def flowkern_runs(self):
        return "ActNorm and the LU 1×1 conv as one 1×1 convolution, then the coupling"

    def _folds(self):
        if len(self.flows) != 3:
            return False
        coupling, conv, norm = self.flows
        return (type(conv) is Invertible1x1Conv and conv.use_lu and type(norm) is ActNorm and norm.initialized()
                and not (has_hooks(conv) or has_hooks(norm)))

    def _factors(self):
        _, conv, norm = self.flows
        log_scale = -norm.s.view(-1)
        return conv.P, conv.L, conv.U, conv.sign_S, conv.log_S, log_scale, -norm.t.view(-1) * log_scale.exp()

    def forward(self, z):
        if not self._folds():
            return super().forward(z)
        coupling = self.flows[0]
        z, logdet = coupling(z)
        weight, bias = functional.folded_lu_weight_inverse(*self._factors())
        per_pixel = self.flows[1].log_S.sum() - self.flows[2].s.sum()  # of the data → latent map
        return functional.conv1x1(z, weight, bias), logdet - per_pixel * (z.shape[2] * z.shape[3])

    def inverse(self, z):
        if not self._folds():
            return super().inverse(z)
        weight, bias, per_pixel = functional.folded_lu_weight(*self._factors())
        logdet = per_pixel * (z.shape[2] * z.shape[3])
        z, coupling_logdet = self.flows[0].inverse(functional.conv1x1(z, weight, bias))
        return z, coupling_logdet + logdet


@rule(GlowBlock)
def _glow_block(module):
    if len(module.flows) != 3:
        return None, "a single-channel block (no 1×1 conv): its layers run one by one"
    if not module.flows[1].use_lu:
        return None, "a free 1×1 conv weight (use_lu=False): its layers run one by one"
    return GlowBlock, GlowBlock.flowkern_runs(module)


RULES = {nf.flows.ActNorm: _actnorm, nf.flows.Invertible1x1Conv: _invconv,
         nf.flows.AffineCouplingBlock: _coupling_block, nf.nets.ConvNet2d: _convnet, nf.flows.GlowBlock: _glow_block}
