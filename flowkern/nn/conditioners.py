"""Conditioner networks: map the pass-through part of a coupling's input to its ``h``.

Each ends in a zero-initialised layer, so a fresh coupling is the identity (Glow's initialisation) and
its scale starts at ``s(0)``.
"""
import functools

import torch
import torch.nn.functional as F
from torch import nn

from .. import functional
from .._validation import check_choice, check_count
from ..backends import fastest
from .actnorm import ActNorm


class ConvActNorm(nn.Module):
    """conv (no bias) → ActNorm → ReLU, as in Glow's hidden layers.

    Once ActNorm is initialised (and always in evaluation), it is folded into the convolution:
    ``ActNorm(conv(x, W)) = conv(x, W·e^log_scale) + bias`` per output channel, so the hidden activations
    are written once, by the convolution, and the ReLU runs in place on them. Gradients reach ``W``,
    ``log_scale`` and ``bias`` through the folded weight. The first training batch runs unfolded, for
    ActNorm's data-dependent initialisation.

    Shapes: (N, in_channels, H, W) → (N, out_channels, H, W).
    """

    def __init__(self, in_channels, out_channels, kernel_size):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        nn.init.normal_(self.conv.weight, 0.0, 0.05)
        self.norm = ActNorm(out_channels)
        self.fold_actnorm = True  # as FlowStep.fold_actnorm: fold once initialised

    def folds(self):
        """Whether ActNorm is folded into the convolution on this call."""
        return self.fold_actnorm and not self.norm.will_initialize()

    def folded(self):
        """``(W·e^log_scale, bias)``: the weight (out, in, k, k) and bias (out,) of the folded convolution."""
        weight = self.conv.weight
        return weight * self.norm.log_scale.exp().to(weight.dtype).view(-1, 1, 1, 1), self.norm.bias

    def forward(self, x):
        if not self.folds():  # under autocast the convolution's output is low precision: ActNorm's is not
            return self.norm(self.conv(x).to(self.norm.log_scale.dtype))[0].relu()
        # the convolution's backward needs its input and weight, not its output: ReLU may overwrite it
        return F.conv2d(x, *self.folded(), padding=self.conv.padding).relu_()


def _check_widths(**widths):
    for name, value in widths.items():
        check_count(value, name)


def zero_conv(in_channels, out_channels, kernel_size=3):
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class GlowConditioner(nn.Sequential):
    """conv3×3 → ActNorm → ReLU → conv1×1 → ActNorm → ReLU → zero-initialised conv3×3.

    On the devices in :attr:`MATMUL_DEVICES`, once both ActNorms fold, the same map may run in another of
    :attr:`FORMS`: its convolutions over channels-last activations (:func:`glow_conditioner_channels_last`),
    or its last two convolutions as matrix products over (pixels, channels) (:func:`glow_conditioner_by_matmul`),
    which one CPU runs faster and another slower than the convolutions. :attr:`form` picks one; by default the
    first call of each shape times each (forward, and backward where a gradient is recorded) and keeps the
    fastest for the process (:data:`FORM_CHOICES`; the benchmark case ``glow_conditioner_forward_backward``
    measures them).

    Shapes: (N, in_channels, H, W) → (N, out_channels, H, W).
    """

    #: where the other forms are candidates: oneDNN's convolutions run faster over channels-last activations on
    #: some CPUs, and its 3×3 convolutions with few output channels below its matrix-product speed; on CUDA
    #: cuDNN's convolutions are kept
    MATMUL_DEVICES = ("cpu",)
    FORMS = ("convolutions", "channels-last convolutions", "matrix products")

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int = 512):
        _check_widths(in_channels=in_channels, out_channels=out_channels, hidden_channels=hidden_channels)
        super().__init__(
            ConvActNorm(in_channels, hidden_channels, 3),
            ConvActNorm(hidden_channels, hidden_channels, 1),
            zero_conv(hidden_channels, out_channels),
        )
        #: one of :attr:`FORMS`, or None: the fastest, measured on the first call of each shape
        self.form = None

    def form_of(self, x) -> str:
        """The one of :attr:`FORMS` a call on ``x`` (the conditioner's input, or any tensor of its batch and
        image size, such as the coupling's input) takes: ``"convolutions"`` until both ActNorms fold, then
        :func:`conditioner_form`'s choice (``form``, or the fastest measured)."""
        first, hidden, last = self
        if not (first.folds() and hidden.folds()):
            return "convolutions"
        widths = (first.conv.in_channels, last.in_channels, last.out_channels)
        return conditioner_form(x, widths, self.folded, self.form, self.MATMUL_DEVICES)

    def folded(self):
        """``(w1, b1, w2, b2, w3, b3)``: the three convolutions' weights and biases with both ActNorms folded in,
        by one fused op (:func:`flowkern.functional.fold_actnorms`); in compiled code by the modules' own
        folds, which inductor fuses with the rest of the graph."""
        first, hidden, last = self
        if torch.compiler.is_compiling():
            return (*first.folded(), *hidden.folded(), last.weight, last.bias)
        w1, w2 = functional.fold_actnorms(first.conv.weight, first.norm.log_scale, hidden.conv.weight,
                                          hidden.norm.log_scale)
        return w1, first.norm.bias, w2, hidden.norm.bias, last.weight, last.bias

    def one_node_form(self, x) -> "str | None":
        """The form (:meth:`form_of`) a coupling runs this conditioner in inside its one autograd node
        (:class:`~flowkern.nn.glow_coupling.GlowCoupling`), or None where it does not: the node takes it with both
        ActNorms folded, in eager code, where convolutions are taken (on the CPU's matrix-product path autograd
        keeps its ops)."""
        first, hidden, _ = self
        if not (first.folds() and hidden.folds()) or torch.compiler.is_compiling():
            return None
        form = self.form_of(x)
        return None if form == "matrix products" else form

    def paddings(self):
        """The three convolutions' paddings."""
        first, hidden, last = self
        return first.conv.padding, hidden.conv.padding, last.padding

    def forward(self, x):
        first, hidden, _ = self
        if not (first.folds() and hidden.folds()):
            return super().forward(x)
        return FORM_FUNCTIONS[self.form_of(x)](x, *self.folded())


#: {(device, dtype, input shape, hidden and output widths, records a gradient): (form, {form: seconds})}: what
#: :func:`conditioner_form` measured faster in this process, for conditioners whose ``form`` is unset
FORM_CHOICES: dict = {}


def conditioner_form(x, widths, weights, form=None, devices=GlowConditioner.MATMUL_DEVICES) -> str:
    """How ``conv3×3 → ReLU → conv1×1 → ReLU → conv3×3`` runs on ``x`` (its input, or any tensor of its batch
    and image size): one of :attr:`GlowConditioner.FORMS`. ``widths`` is ``(C_in, hidden, C_out)``;
    ``weights()`` returns ``(w1, b1, w2, b2, w3, b3)``, called only to measure.

    The other forms are candidates on ``devices`` (:attr:`GlowConditioner.MATMUL_DEVICES`), in eager code
    (compiled code keeps the convolutions: inductor's ``fold`` made the compiled step slower), the matrix
    products where their per-tap products, (N·H·W, 9·C_out), are no larger than a hidden activation (Glow's
    conditioners at 256 channels and more); then ``form`` decides, or, ``None``, the fastest candidate measured
    on the first call of each shape (:func:`_faster_form`). A form asked for that is not a candidate falls back
    to the convolutions."""
    if form is not None:
        check_choice(form, GlowConditioner.FORMS, "form")
    if x.device.type not in devices or torch.compiler.is_compiling():
        return "convolutions"
    candidates = [f for f in GlowConditioner.FORMS if f != "matrix products" or 9 * widths[2] <= widths[1]]
    if form is not None:
        return form if form in candidates else "convolutions"
    return _faster_form(x, widths, weights, candidates)


def form_input(x, form):
    """``x`` in the memory format ``form`` convolves it in: channels-last for ``"channels-last convolutions"``."""
    return x.contiguous(memory_format=torch.channels_last) if form == "channels-last convolutions" else x


def _faster_form(x, widths, weights, candidates):
    """The fastest of ``candidates`` (forms of :attr:`GlowConditioner.FORMS`) with ``weights`` on inputs of
    ``x``'s batch, image size, dtype and device, measured on the first call for each: forward, and backward to the weights where a
    gradient is recorded, on a random input and detached copies of ``weights()`` (the parameters, their
    gradients and the global random state are not touched)."""
    grad = torch.is_grad_enabled()
    n, _, height, width = x.shape
    c_in, hidden, c_out = widths
    key = (str(x.device), x.dtype, (n, c_in, height, width), hidden, c_out, grad)
    if key not in FORM_CHOICES:
        weights = [t.detach().requires_grad_(grad) for t in weights()]
        # a generator of its own: measuring must not move the caller's random stream (sampling with a seed)
        x = torch.randn(key[2], generator=torch.Generator().manual_seed(0)).to(x.device, x.dtype)

        def call(form):
            out = form(x, *weights)
            if grad:
                torch.autograd.grad(out, weights, torch.ones_like(out))

        calls = {form: functools.partial(call, FORM_FUNCTIONS[form]) for form in candidates}
        for fn in calls.values():  # warm-up
            fn()
        FORM_CHOICES[key] = fastest(calls, rounds=3)
    return FORM_CHOICES[key][0]


def glow_conditioner_by_convolutions(x, w1, b1, w2, b2, w3, b3):
    """``conv3×3(w1, b1) → ReLU → conv1×1(w2, b2) → ReLU → conv3×3(w3, b3)`` (padding 1) as three convolutions:
    the folded conditioner's map, which :func:`glow_conditioner_by_matmul` computes another way.

    Shapes: as :func:`glow_conditioner_by_matmul`.
    """
    h = F.conv2d(x, w1, b1, padding=1).relu_()
    h = F.conv2d(h, w2, b2).relu_()
    return F.conv2d(h, w3, b3, padding=1)


def glow_conditioner_channels_last(x, w1, b1, w2, b2, w3, b3):
    """:func:`glow_conditioner_by_convolutions` over ``x`` in the channels-last memory format, which oneDNN's
    convolutions take without reordering their activations; the output is channels-last too.

    Shapes: as :func:`glow_conditioner_by_matmul`.
    """
    return glow_conditioner_by_convolutions(x.contiguous(memory_format=torch.channels_last), w1, b1, w2, b2, w3, b3)


def glow_conditioner_by_matmul(x, w1, b1, w2, b2, w3, b3):
    """``conv3×3(w1, b1) → ReLU → conv1×1(w2, b2) → ReLU → conv3×3(w3, b3)`` (padding 1), its last two
    convolutions as matrix products.

    The first convolution writes its output channels-last, so the hidden activations are (N·H·W, hidden)
    matrices without a copy: the 1×1 convolution is one ``addmm``, and the last convolution multiplies by
    all nine taps at once, ``(N·H·W, hidden) @ (hidden, 9·C_out)``, after which ``fold`` adds each tap's
    product in at its offset (with the kernel flipped, since ``fold`` is the adjoint of ``unfold``). Nothing
    larger than the convolutions' own activations is kept for the backward pass.

    Shapes: x (N, C_in, H, W), w1 (hidden, C_in, 3, 3), w2 (hidden, hidden, 1, 1), w3 (C_out, hidden, 3, 3),
    biases (out,) → (N, C_out, H, W).
    """
    n, _, height, width = x.shape
    pixels, c_out = height * width, w3.shape[0]
    h = F.conv2d(x.contiguous(memory_format=torch.channels_last), w1, b1, padding=1).relu_()
    h = h.permute(0, 2, 3, 1).reshape(n * pixels, -1)
    h = torch.addmm(b2, h, w2.flatten(1).t()).relu_()
    taps = w3.flip(2, 3).transpose(0, 1).reshape(h.shape[1], c_out * 9)
    per_tap = (h @ taps).view(n, pixels, c_out * 9).transpose(1, 2)
    return F.fold(per_tap, (height, width), 3, padding=1) + b3.view(1, -1, 1, 1)


#: the function computing each of :attr:`GlowConditioner.FORMS` from the folded weights
FORM_FUNCTIONS = {"convolutions": glow_conditioner_by_convolutions,
                  "channels-last convolutions": glow_conditioner_channels_last,
                  "matrix products": glow_conditioner_by_matmul}


class _ResidualBlock(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x):
        return x + self.body(x)


class ResNetConditioner(nn.Sequential):
    """RealNVP's residual s/t network: conv3×3 → residual blocks → ReLU → zero-initialised conv3×3.

    Shapes: (N, in_channels, H, W) → (N, out_channels, H, W).
    """

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int = 64, blocks: int = 4):
        _check_widths(in_channels=in_channels, out_channels=out_channels, hidden_channels=hidden_channels)
        check_count(blocks, "blocks", minimum=0)
        super().__init__(
            nn.Conv2d(in_channels, hidden_channels, 3, padding=1),
            *[_ResidualBlock(hidden_channels) for _ in range(blocks)],
            nn.ReLU(),
            zero_conv(hidden_channels, out_channels),
        )


class MLPConditioner(nn.Module):
    """A multilayer perceptron for vector data seen as (N, D, 1, 1) images.

    Shapes: (N, in_features, 1, 1) → (N, out_features, 1, 1).
    """

    def __init__(self, in_features: int, out_features: int, hidden: int = 64, depth: int = 2):
        _check_widths(in_features=in_features, out_features=out_features, hidden=hidden)
        check_count(depth, "depth", minimum=0)
        super().__init__()
        layers, width = [], in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        last = nn.Linear(width, out_features)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(*layers, last)

    def forward(self, x):
        n, c, h, w = x.shape
        return self.net(x.reshape(n, c)).reshape(n, self.net[-1].out_features, h, w)
