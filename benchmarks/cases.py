"""Benchmark cases and the providers that run them.

Whole-model cases come first: a Glow training step and sampling, as users run them, with the providers
of :data:`MODEL_PROVIDERS`: the same Glow written in plain PyTorch (:mod:`benchmarks.plain_glow`), eager
and under ``torch.compile``; flowkern's Glow eager (``auto`` backend), compiled, trained by inversion and
on the reference backend; and normflows' Glow where installed.

The op and layer cases have the providers of :func:`providers`, all measured in one run: ``eager`` (the
reference ops called directly), ``compile`` (``torch.compile`` of the same reference code), each flowkern
backend other than the reference (through the layers' path, ``flowkern.functional``), and the peer
libraries normflows and FrEIA where installed.

A case's ``build(provider)`` returns a zero-argument callable to time, or None where the provider has no
counterpart of the case.
"""
import dataclasses
import importlib.util
import math
from dataclasses import dataclass

import torch
from torch import nn

import flowkern
import flowkern.functional as F
from flowkern import reference as R
from flowkern.train.loop import adam

from .plain_glow import PlainGlow

PEERS = tuple(p for p in ("normflows", "FrEIA") if importlib.util.find_spec(p) is not None)

# whole-model providers -> the flowkern backend each runs under
MODEL_BACKENDS = {"plain eager": "reference", "plain compile": "reference", "flowkern": "auto",
                  "flowkern compile": "auto", "flowkern by inversion": "auto", "flowkern reference": "reference"}
MODEL_PROVIDERS = (*MODEL_BACKENDS, *(p for p in PEERS if p == "normflows"))
PLAIN_BASELINES = ("plain eager", "plain compile")


def providers():
    backends = [b for b in flowkern.available_backends() if b not in ("reference", "auto")]
    return ["eager", "compile", *backends, *PEERS]


def backend_of(provider):
    """The flowkern backend a provider runs under (the reference for eager, compile and peers)."""
    if provider in MODEL_BACKENDS:
        return MODEL_BACKENDS[provider]
    if "accelerated" in provider:  # a peer's model after flowkern.accelerate
        return "auto"
    return provider if provider in flowkern.available_backends() else "reference"


@dataclass
class Case:
    name: str
    params: dict
    build: object  # build(provider) -> callable or None
    bytes_moved: int = 0  # bytes the op must move: inputs read once, outputs written once
    baseline: object = None  # build(provider) of what this case is compared with, timed in turn with it
    providers: tuple = None  # the case's own providers (None: the suite's, :func:`providers`)
    versus: tuple = ("eager", "compile")  # the providers that the speed-up columns divide by
    flow_steps: int = 0  # flow steps of a whole-model case: its rows count the ops per flow step and host syncs
    graph_breaks: object = None  # graph_breaks(provider) -> int or None: torch.compile's graph breaks in its loss

    @property
    def label(self):
        return f"{self.name} " + " ".join(f"{k}={v}" for k, v in self.params.items())


def _params(n, c, size, dtype, **extra):
    return dict(N=n, C=c, HW=f"{size}x{size}", **extra, dtype=str(dtype).replace("torch.", ""))


def _compiled(fn):
    return torch.compile(fn, dynamic=False)


def _op_fn(provider, reference_fn, functional_fn):
    """The implementation of an op that ``provider`` runs, or None (peers have no op-level counterpart)."""
    if provider == "eager":
        return reference_fn
    if provider == "compile":
        return _compiled(reference_fn)
    return None if provider in PEERS else functional_fn


def _op(provider, reference_fn, functional_fn, args):
    fn = _op_fn(provider, reference_fn, functional_fn)
    return None if fn is None else lambda: fn(*args)


def _flow_step(run, inputs, backward):
    """Time ``run(*inputs) -> (y, logdet)``, with its backward from fixed random output gradients."""
    if backward:
        inputs = [t.detach().clone().requires_grad_() for t in inputs]
    with torch.no_grad():
        grads = [torch.randn_like(o) for o in run(*inputs)]

    def step():
        outputs = run(*inputs)
        if backward:
            torch.autograd.backward(outputs, grads)
    return step


def coupling_cases(n, c, size, dtype, device):
    es = torch.finfo(dtype).bits // 8
    pixels = n * size * size
    c_t = c // 2
    x = torch.randn(n, c, size, size, dtype=dtype, device=device)
    h = torch.randn(n, 2 * c_t, size, size, dtype=dtype, device=device)
    params = _params(n, c, size, dtype)
    io = (2 * c + 2 * c_t) * pixels * es

    def forward(provider):
        return _op(provider, R.coupling_forward, F.coupling_forward, (x, h))

    def inverse(provider):
        return _op(provider, R.coupling_inverse, F.coupling_inverse, (x, h))

    def forward_backward(provider):
        fn = _op_fn(provider, R.coupling_forward, F.coupling_forward)
        return None if fn is None else _flow_step(fn, (x, h), backward=True)

    # backward reads dy, the transformed half of x and h; writes dx and dh
    backward_io = (c + c_t + 2 * c_t + c + 2 * c_t) * pixels * es
    return [Case("coupling_forward", params, forward, io),
            Case("coupling_inverse", params, inverse, io),
            Case("coupling_forward_backward", params, forward_backward, io + backward_io)]


def _lu_factors(c, device):
    layer = flowkern.nn.InvConv1x1(c).to(device)
    return [t.detach() for t in (layer.perm, layer.lower, layer.upper, layer.sign, layer.log_s)]


def _actnorm_conv1x1_reference(x, log_scale, bias, weight):
    return R.conv1x1(R.actnorm_forward(x, log_scale, bias)[0], weight)


def channel_mixing_cases(n, c, size, dtype, device):
    es = torch.finfo(dtype).bits // 8
    x = torch.randn(n, c, size, size, dtype=dtype, device=device)
    log_scale, bias = 0.1 * torch.randn(c, device=device), torch.randn(c, device=device)
    weight = R.lu_weight(*_lu_factors(c, device))
    params = _params(n, c, size, dtype)
    io = 2 * x.numel() * es

    def actnorm(provider):
        return _op(provider, R.actnorm_forward, F.actnorm_forward, (x, log_scale.to(dtype), bias.to(dtype)))

    def conv(provider):
        return _op(provider, R.conv1x1, F.conv1x1, (x, weight.to(dtype)))

    def fused(provider):
        return _op(provider, _actnorm_conv1x1_reference, F.actnorm_conv1x1,
                   (x, log_scale.to(dtype), bias.to(dtype), weight.to(dtype)))

    return [Case("actnorm_forward", params, actnorm, io),
            Case("conv1x1", params, conv, io),
            Case("actnorm_conv1x1", params, fused, io)]


def call_overhead_cases(device):
    """Per-call cost where moving data is free: the dispatch and launch overhead a K=32, L=3 Glow pays
    about 300 times per forward."""
    x, h = torch.randn(1, 4, 2, 2, device=device), torch.randn(1, 4, 2, 2, device=device)
    log_scale, bias, weight = torch.zeros(4, device=device), torch.zeros(4, device=device), torch.eye(4, device=device)
    params = _params(1, 4, 2, torch.float32)
    calls = [("coupling_forward", (x, h)), ("actnorm_forward", (x, log_scale, bias)), ("conv1x1", (x, weight))]

    def build(op, args):
        return lambda provider: _op(provider, getattr(R, op), getattr(F, op), args)
    return [Case(f"call_overhead_{op}", params, build(op, args)) for op, args in calls]


class _PeerConditioner(nn.Sequential):
    """Glow's conditioner without ActNorm, for the peers: conv3×3 → ReLU → conv1×1 → ReLU → conv3×3."""

    def __init__(self, c_in, c_out, hidden):
        super().__init__(nn.Conv2d(c_in, hidden, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(hidden, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, c_out, 3, padding=1))


def _peer_block(provider, c, hidden, x):
    """The peer's Glow step as ``run(x) -> (y, logdet)``, initialised on ``x``."""
    if provider == "normflows":
        import normflows

        block = normflows.flows.GlowBlock(c, hidden, split_mode="channel", scale=True).to(x.device, x.dtype)

        def run(v):
            return block(v)
    else:
        import FrEIA.modules as Fm

        block = Fm.AllInOneBlock([tuple(x.shape[1:])], subnet_constructor=lambda i, o: _PeerConditioner(
            i, o, hidden), permute_soft=True).to(x.device, x.dtype)

        def run(v):
            (y,), logdet = block([v])
            return y, logdet
    run(x)  # data-dependent initialisation
    return run


def flow_step_cases(n, c, size, hidden, dtype, device):
    x = torch.randn(n, c, size, size, dtype=dtype, device=device)
    params = _params(n, c, size, dtype, hidden=hidden)

    def make(backward):
        def build(provider):
            if provider in PEERS:
                return _flow_step(_peer_block(provider, c, hidden, x), (x,), backward)
            torch.manual_seed(0)
            step = flowkern.nn.FlowStep(c, hidden).to(device, dtype)
            step(x)  # ActNorm's initialisation
            return _flow_step(_compiled(step) if provider == "compile" else step, (x,), backward)
        return build

    return [Case("flow_step_forward", params, make(False)),
            Case("flow_step_forward_backward", params, make(True))]


CONDITIONER_PROVIDERS = flowkern.nn.GlowConditioner.FORMS


def conditioner_cases(n, c, size, hidden, dtype, device):
    """A Glow coupling's conditioner (ActNorms folded), forward and backward, in each of the forms
    ``GlowConditioner`` chooses between on the CPU: three convolutions, over NCHW or channels-last activations,
    and :func:`~flowkern.nn.conditioners.glow_conditioner_by_matmul`."""
    x = torch.randn(n, c, size, size, dtype=dtype, device=device)
    torch.manual_seed(0)
    conditioner = flowkern.nn.GlowConditioner(c, 2 * c, hidden).to(device, dtype)
    conditioner(x)  # ActNorm's initialisation
    conditioner.MATMUL_DEVICES = (device.type,)  # a candidate on this device, whichever it is

    def build(provider):
        def run(v):
            conditioner.form = provider
            return (conditioner(v),)
        return _flow_step(run, (x,), backward=True)
    return [Case("glow_conditioner_forward_backward", _params(n, c, size, dtype, hidden=hidden), build,
                 providers=CONDITIONER_PROVIDERS, versus=CONDITIONER_PROVIDERS)]


def _data(n, c, size, dtype, device):
    return (torch.rand(n, c, size, size, device=device) - 0.5).to(dtype)


def _under_autocast(fn, device, dtype):
    """``fn`` run under ``torch.autocast(device.type, dtype)``; ``fn`` itself when ``dtype`` is None."""
    if dtype is None:
        return fn

    def run(*args):
        with torch.autocast(device.type, dtype):
            return fn(*args)
    return run


def _train_step(model, x, loss=None, compile=False, keep_grads=False, autocast=None):
    """One Adam step on ``x`` minimising ``loss(x)`` (by default the mean bits/dim), compiled if ``compile``,
    with the optimiser of ``python -m flowkern.train`` (Adam fused into one kernel where the device has one),
    under ``torch.autocast`` in the dtype ``autocast`` if given. ``keep_grads``: gradients stay allocated
    between steps, as parameters and the optimiser's moments do, so that a step's peak memory is its
    activations and temporaries alone."""
    optimizer = adam(model.parameters(), lr=1e-4)
    loss_fn = _under_autocast(loss or (lambda v: model.bits_per_dim(v).mean()), x.device, autocast)
    if compile:
        loss_fn = _compiled(loss_fn)

    def step():
        optimizer.zero_grad(set_to_none=not keep_grads)
        loss_fn(x).backward()
        optimizer.step()
    return step


def realnvp_cases(n, c, size, levels, hidden, dtype, device):
    x = _data(n, c, size, dtype, device)

    def train(provider):
        if provider in PEERS:
            return None
        torch.manual_seed(0)
        model = flowkern.RealNVP(c, size, scales=levels, hidden_channels=hidden, blocks=2).to(device, dtype)
        return _train_step(model, x, compile=provider == "compile")
    return [Case("realnvp_train_step", _params(n, c, size, dtype, L=levels, hidden=hidden, blocks=2), train)]


def _normflows_glow(c, size, levels, steps, hidden, net_actnorm=True):
    """normflows' Glow as its documentation builds it, at flowkern's widths: GlowBlocks (sigmoid scale, LU 1×1
    conv; with ``net_actnorm`` ActNorm in the conditioner, as flowkern's Glow has), but per-level learned
    Gaussians (``GlowBase``) instead of Glow's conditional priors at the splits, which its API has no
    counterpart of."""
    import normflows as nf

    q0, flows, merges = [], [], []
    for i in range(levels):  # in normflows' order: from the top level down, in the sampling direction
        channels = c * 2 ** (levels + 1 - i)
        flows.append([nf.flows.GlowBlock(channels, hidden, split_mode="channel", scale=True,
                                         net_actnorm=net_actnorm) for _ in range(steps)] + [nf.flows.Squeeze()])
        if i == 0:
            latent = (c * 2 ** (levels + 1), size // 2 ** levels, size // 2 ** levels)
        else:
            merges.append(nf.flows.Merge())
            latent = (c * 2 ** (levels - i), size // 2 ** (levels - i), size // 2 ** (levels - i))
        q0.append(nf.distributions.GlowBase(latent))
    return nf.MultiscaleFlow(q0, flows, merges, class_cond=False)


def glow_cases(n, c, size, levels, steps, hidden, dtype, device, autocast=None):
    """What users run: a Glow training step (bits/dim, backward, Adam) and sampling at T = 0.7, by every
    provider of :data:`MODEL_PROVIDERS`, against the same Glow in plain PyTorch. With ``autocast`` (a
    dtype), both run under ``torch.autocast`` in it, by the plain and flowkern providers, eager and compiled."""
    params = _params(n, c, size, dtype, K=steps, L=levels, hidden=hidden)
    case_providers = MODEL_PROVIDERS
    if autocast is not None:
        params["autocast"] = str(autocast).replace("torch.", "")
        case_providers = (*PLAIN_BASELINES, "flowkern", "flowkern compile")
    x = _data(n, c, size, dtype, device)

    def glow(provider, train):
        torch.manual_seed(0)
        if provider.startswith("plain"):
            model = PlainGlow(c, size, levels, steps, hidden)
        elif provider == "normflows":
            model = _normflows_glow(c, size, levels, steps, hidden)
        else:
            model = flowkern.Glow(c, size, levels, steps, hidden, memory_saving=provider == "flowkern by inversion")
        model = model.to(device, dtype)
        with torch.no_grad():  # ActNorm's data-dependent initialisation
            model.forward_kld(x) if provider == "normflows" else model.log_prob(x)
        return model.train(train)

    def train(provider):
        model = glow(provider, train=True)
        loss = model.forward_kld if provider == "normflows" else None
        return _train_step(model, x, loss, compile=provider.endswith("compile"), autocast=autocast)

    def sample(provider):
        if provider == "flowkern by inversion":
            return None  # sampling runs no backward: the same as "flowkern"
        model = glow(provider, train=False)
        run = _under_autocast(lambda: model.sample(n, temperature=0.7), device, autocast)
        return _compiled(run) if provider.endswith("compile") else run

    flow_steps = levels * steps
    return [Case("glow_train_step", params, train, providers=case_providers, versus=PLAIN_BASELINES,
                 flow_steps=flow_steps),
            Case("glow_sample", {**params, "T": 0.7}, sample, providers=case_providers, versus=PLAIN_BASELINES,
                 flow_steps=flow_steps)]


def _freia_glow(c, size, levels, steps, hidden):
    """A multi-scale Glow written with FrEIA's ``SequenceINN`` at the suite's widths: per step ActNorm, a
    ``GLOWCouplingBlock`` (its default ATAN clamp) with Glow's conv3×3 → ReLU → conv1×1 → ReLU → conv3×3
    subnetworks, and a random permutation; ``IRevNetDownsampling`` between levels. Without factoring out half
    of the channels (``SequenceINN`` keeps one tensor), its deeper levels carry all of them."""
    import FrEIA.framework as Ff
    import FrEIA.modules as Fm

    def subnet(c_in, c_out):
        last = nn.Conv2d(hidden, c_out, 3, padding=1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        return nn.Sequential(nn.Conv2d(c_in, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, hidden, 1),
                             nn.ReLU(), last)

    inn = Ff.SequenceINN(c, size, size)
    for _ in range(levels):
        inn.append(Fm.IRevNetDownsampling)
        for _ in range(steps):
            inn.append(Fm.ActNorm)
            inn.append(Fm.GLOWCouplingBlock, subnet_constructor=subnet)
            inn.append(Fm.PermuteRandom)
    return inn


class _FrEIALikelihood(nn.Module):
    """Bits/dim of a FrEIA INN under a standard normal prior, and sampling by its inverse."""

    def __init__(self, inn, shape):
        super().__init__()
        self.inn, self.shape = inn, shape

    def bits_per_dim(self, x):
        z, log_jac = self.inn(x)
        dims = x[0].numel()
        log_p = -0.5 * (z.flatten(1) ** 2).sum(1) - 0.5 * dims * math.log(2 * math.pi) + log_jac
        return -(log_p / dims - math.log(256)) / math.log(2)

    def sample(self, n, temperature=1.0):
        z = temperature * torch.randn(n, *self.inn(torch.zeros(1, *self.shape, device=self.device))[0].shape[1:],
                                      device=self.device)
        return self.inn(z, rev=True)[0]

    @property
    def device(self):
        return next(self.parameters()).device


DROPIN_PEERS = tuple(p for p in ("normflows", "FrEIA") if p in PEERS)


def dropin_cases(n, c, size, levels, steps, hidden, dtype, device):
    """"Your model, accelerated": a peer library's Glow as its users write it, original and after
    ``flowkern.accelerate``, eager and compiled: training step and sampling at T = 0.7. normflows' is its
    documentation's (no ActNorm in the conditioner); FrEIA's a SequenceINN of ActNorm, GLOWCouplingBlock and
    permutations."""
    x = _data(n, c, size, dtype, device)
    cases = []
    for peer in DROPIN_PEERS:
        own = (peer, f"{peer} accelerated", f"{peer} compile", f"{peer} accelerated compile")

        def model(provider, train, peer=peer):
            torch.manual_seed(0)
            if peer == "normflows":
                m = _normflows_glow(c, size, levels, steps, hidden, net_actnorm=False)
            else:
                m = _FrEIALikelihood(_freia_glow(c, size, levels, steps, hidden), (c, size, size))
            m = m.to(device, dtype)
            with torch.no_grad():  # ActNorm's data-dependent initialisation
                m.forward_kld(x) if peer == "normflows" else m.bits_per_dim(x)
            if "accelerated" in provider:
                flowkern.accelerate(m)
            return m.train(train)

        def loss_of(m, peer=peer):
            return m.forward_kld if peer == "normflows" else (lambda v: m.bits_per_dim(v).mean())

        def train(provider, model=model, loss_of=loss_of):
            m = model(provider, train=True)
            return _train_step(m, x, loss_of(m), compile=provider.endswith("compile"))

        def sample(provider, model=model):
            m = model(provider, train=False)
            run = (lambda: m.sample(n, temperature=0.7)) if peer == "normflows" else (lambda: m.sample(n, 0.7))
            return _compiled(run) if provider.endswith("compile") else run

        def graph_breaks(provider, model=model, loss_of=loss_of):
            if not provider.endswith("compile"):
                return None
            m = model(provider, train=True)
            torch._dynamo.reset()
            return torch._dynamo.explain(loss_of(m))(x).graph_break_count

        params = _params(n, c, size, dtype, K=steps, L=levels, hidden=hidden)
        versus = (peer, f"{peer} compile")
        cases += [Case(f"{peer}_glow_train_step", params, train, providers=own, versus=versus,
                       flow_steps=levels * steps, graph_breaks=graph_breaks),
                  Case(f"{peer}_glow_sample", {**params, "T": 0.7}, sample, providers=own, versus=versus,
                       flow_steps=levels * steps)]
    return cases


INVERSION_CASE = "glow_train_by_inversion"


def inversion_cases(n, c, size, levels, hidden, depths, dtype, device, eager=False):
    """A Glow training step by inversion at several depths K, each timed in turn with the same step by
    standard backprop, its baseline: activation memory (the step's peak above parameters, gradients and
    optimiser state) and time against depth. flowkern's backends (inversion does not compile), and the
    eager reference if ``eager``."""
    x = _data(n, c, size, dtype, device)

    def make(steps, memory_saving):
        def build(provider):
            if provider in PEERS or provider == "compile" or (provider == "eager" and not eager):
                return None
            torch.manual_seed(0)
            model = flowkern.Glow(c, size, levels, steps, hidden, memory_saving=memory_saving).to(device, dtype)
            model(x)  # ActNorm's initialisation
            return _train_step(model, x, keep_grads=True)
        return build

    return [Case(INVERSION_CASE, _params(n, c, size, dtype, K=steps, L=levels, hidden=hidden), make(steps, True),
                 baseline=make(steps, False)) for steps in depths]


def _glow_shape(device, real_shapes):
    """(N, C, size, L, K, hidden) of the whole-model Glow: the CIFAR Glow on a GPU or with ``real_shapes``,
    one a 2-core CPU times in minutes otherwise."""
    return (64, 3, 32, 3, 32, 512) if device.type == "cuda" or real_shapes else (16, 3, 32, 3, 8, 256)


def headline_cases(device, real_shapes=False):
    """What ``make bench`` runs, within 10 minutes on a 2-core CPU: the whole-model Glow's training step and
    sampling, normflows' Glow's training step original and accelerated (eager; the compiled rows and FrEIA's
    are in the full suite), and one op table (the coupling's forward and backward at a Glow's first level,
    float32)."""
    n, c, size = (64, 12, 32)
    coupling = [case for case in coupling_cases(n, c, size, torch.float32, device)
                if case.name == "coupling_forward_backward"]
    glow_shape = _glow_shape(device, real_shapes)
    dropin = [dataclasses.replace(case, providers=case.providers[:2])
              for case in dropin_cases(*glow_shape, torch.float32, device) if case.name == "normflows_glow_train_step"]
    return glow_cases(*glow_shape, torch.float32, device) + dropin + coupling


def all_cases(device, real_shapes=False):
    """The full suite (``make bench-full``). Default sizes fit a 2-core CPU in about half an hour;
    ``real_shapes`` (the default on a GPU) takes Glow's real shapes."""
    dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
    full = device.type == "cuda" or real_shapes
    glow_shape = _glow_shape(device, real_shapes)
    if full:
        op_shapes = [(64, 12, 32), (64, 24, 16), (64, 48, 8), (64, 12, 64), (64, 48, 64)]
        step_shape, realnvp_shape = (64, 48, 8, 512), (64, 3, 32, 3, 32)
    else:  # the op shapes: Glow's first level at batch 64, and a deep level
        op_shapes = [(64, 12, 32), (16, 48, 8)]
        step_shape, realnvp_shape = (16, 12, 16, 64), (16, 3, 16, 2, 8)
    cases = glow_cases(*glow_shape, torch.float32, device)
    # the default run of `python -m flowkern.train`: a Glow of digits' shape (L=2, K=8, 64 hidden), batch 64
    cases += glow_cases(64, 1, 8, 2, 8, 64, torch.float32, device)
    # the conditioners in bfloat16 (on a CPU without bfloat16 instructions, slower than float32: as measured)
    cases += glow_cases(*glow_shape, torch.float32, device, autocast=torch.bfloat16)
    cases += call_overhead_cases(device)
    for dtype in dtypes:
        for n, c, size in op_shapes:
            cases += coupling_cases(n, c, size, dtype, device)
            cases += channel_mixing_cases(n, c, size, dtype, device)
    cases += flow_step_cases(*step_shape, torch.float32, device)
    n, c, size, hidden = glow_shape[0], glow_shape[1], glow_shape[2], glow_shape[-1]
    for level in range(1, 4):  # the conditioners of the whole-model Glow's three levels
        cases += conditioner_cases(n, c * 2 ** level, size // 2 ** level, hidden, torch.float32, device)
    cases += dropin_cases(*glow_shape, torch.float32, device)
    cases += realnvp_cases(*realnvp_shape, torch.float32, device)
    depth_shape = (64, 3, 32, 3, 512) if full else (16, 3, 32, 3, 256)
    cases += inversion_cases(*depth_shape, (4, 8, 16, 32), torch.float32, device)
    if not full:  # a narrow Glow, whose step on a CPU is mostly per-op overhead
        cases += inversion_cases(16, 3, 32, 3, 64, (32,), torch.float32, device, eager=True)
    return cases
