"""Train, evaluate and sample a flow from the command line.

    python -m flowkern.train                                     # Glow on the embedded digits
    python -m flowkern.train --model realnvp2d --data moons --steps 3000
    python -m flowkern.train --data cifar10 --data-dir ~/data --memory-saving
    torchrun --nproc_per_node=2 -m flowkern.train --steps 2000  # DistributedDataParallel (gloo / NCCL)

The run folder (``--out``) receives ``checkpoint.pt`` (model, optimiser, step and configuration),
``config.json``, ``log.jsonl`` (one line per step, flushed to disk with every checkpoint), ``metrics.json``
at the end and PNG samples. Each step's batch and dequantisation noise are a function of (seed, step)
alone, so ``--resume`` continues exactly as if the run had never stopped, and N processes of batch B see
the batches of one process of batch N·B. Ctrl-C stops after the current step and saves a checkpoint.
"""
import argparse
import collections
import json
import math
import os
import signal
import sys
import threading
import time
import typing
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from . import data as datasets
from .backends import _MODULES, AUTO, BackendUnavailable, auto_choices, get_backend, pin_auto_choices, set_backend
from .models import Glow, RealNVP, RealNVP2d

MODELS = ("glow", "realnvp", "realnvp2d")
CHECKPOINT, LOG = "checkpoint.pt", "log.jsonl"
DEVICE_TYPES = ("cpu", "cuda")

# ---------------------------------------------------------------------------------------------- options


def data_kind(name: str) -> str:
    """What ``--data`` names: digits, toy (a 2-D set), cifar10, folder (of images) or npz."""
    if name == "digits" or name in datasets.TOY_SETS:
        return "toy" if name in datasets.TOY_SETS else "digits"
    if name == "cifar10" or (os.path.isdir(name) and datasets.find_cifar10(name)):
        return "cifar10"
    return "npz" if name.endswith(".npz") else "folder"


def _at_least(low):
    return lambda v: None if v >= low else f"at least {low}"


def _positive(v):
    return None if math.isfinite(v) and v > 0 else "a finite number above 0"


def _bits(v):
    return None if 1 <= v <= 8 else "from 1 to 8"


def _fraction(v):
    return None if 0 < v < 1 else "between 0 and 1"


def _temperatures(values):
    return None if values and all(math.isfinite(t) and t > 0 for t in values) else "finite numbers above 0"


def _device(value):
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        device = None
    return None if device is not None and device.type in DEVICE_TYPES else "cpu, cuda or cuda:N"


def _images(cfg):
    return None if data_kind(cfg.data) != "toy" else f"{cfg.data} is 2-D points, not images"


def _eight_bit(cfg):
    kind = data_kind(cfg.data)
    return None if kind in ("cifar10", "folder", "npz") else (
        "digits have 17 levels" if kind == "digits" else f"{cfg.data} is 2-D points")


def _folder(cfg):
    return None if data_kind(cfg.data) == "folder" else "it resizes a folder's images"


def _held_out(cfg):
    kind = data_kind(cfg.data)
    return None if kind in ("digits", "folder", "npz") else (
        "CIFAR-10 has its own test set" if kind == "cifar10" else f"{cfg.data} draws its own test points")


def _cifar(cfg):
    return None if cfg.data == "cifar10" else "it locates CIFAR-10 for --data cifar10"


def _for(*models):
    return lambda cfg: None if cfg.model in models else f"it applies to {' and '.join(models)}"


def _memory_saving(cfg):
    return None if cfg.memory_saving else "it applies with --memory-saving"


def option(default, help, *, check=None, applies=None, resumable=True, **argparse_options):
    """One option of the run: its default, help, the check of its value (``check(value)`` returns what
    was expected, or None), when it applies (``applies(cfg)`` returns why not, or None), and whether a
    resumed run may change it (architecture and data may not)."""
    factory = {"default_factory": (lambda: list(default))} if isinstance(default, list) else {"default": default}
    return field(**factory, metadata=dict(help=help, check=check, applies=applies, resumable=resumable,
                                          argparse=argparse_options))


@dataclass
class Config:
    """Every option of a run: the command line is built from these declarations."""
    model: str | None = option(None, "glow or realnvp for images, realnvp2d for 2-D points (default: by --data)",
                               resumable=False, choices=MODELS)
    data: str = option("digits", f"digits, {', '.join(datasets.TOY_SETS)}, cifar10, a folder of images (searched "
                       "recursively) or a .npz of integer images", resumable=False)
    data_dir: str | None = option(None, "the folder holding cifar-10-batches-py (or set CIFAR10_DIR)",
                                  applies=_cifar)
    steps: int = option(2000, "train until this many steps", check=_at_least(0))
    batch_size: int = option(64, "per process", check=_at_least(1), resumable=False)
    lr: float = option(1e-3, "peak learning rate", check=_positive)
    warmup: int = option(200, "steps of linear learning-rate warm-up (0: none)", check=_at_least(0))
    clip: float = option(50.0, "largest gradient norm; larger ones are scaled down to it", check=_positive)
    seed: int = option(0, "seeds the model, the batches and the dequantisation noise", check=_at_least(0),
                       resumable=False)
    backend: str = option("auto", "the fused ops' implementation", choices=(*_MODULES, AUTO))
    device: str | None = option(None, "cpu, cuda or cuda:N (default: cuda when available)", check=_device)
    memory_saving: bool = option(False, "train by inversion: activation memory flat in depth")
    check_reconstruction: float | None = option(
        None, "warn when an input rebuilt by inversion is off by more than this relative error",
        check=_positive, applies=_memory_saving, metavar="TOL")
    levels: int | None = option(None, "scales of glow or realnvp (default: by image size, at most 3)",
                                check=_at_least(1), applies=_for("glow", "realnvp"), resumable=False)
    depth: int = option(8, "flow steps per level (glow) or couplings (realnvp2d)", check=_at_least(1),
                        applies=_for("glow", "realnvp2d"), resumable=False)
    hidden: int = option(64, "conditioner width", check=_at_least(1), resumable=False)
    blocks: int = option(2, "residual blocks per s/t network", check=_at_least(0), applies=_for("realnvp"),
                         resumable=False)
    coupling: str = option("affine", "the coupling's transform", applies=_for("glow"), resumable=False,
                           choices=("affine", "additive"))
    n_bits: int = option(8, "quantise 8-bit images to this many bits", check=_bits, applies=_eight_bit,
                         resumable=False)
    image_size: int | None = option(None, "resize a folder's images to this size", check=_at_least(2),
                                    applies=_folder, resumable=False)
    test_fraction: float = option(0.1, "share of the images held out for evaluation", check=_fraction,
                                  applies=_held_out, resumable=False)
    out: str | None = option(None, "run folder (default: runs/<model>-<data>)")
    checkpoint_every: int = option(500, "steps between checkpoints", check=_at_least(1))
    eval_every: int = option(0, "steps between evaluations of the test set, logged (0: at the end only)",
                             check=_at_least(0))
    sample: bool = option(True, "write samples at the end (images: a PNG grid per temperature; 2-D points: "
                          "density and samples)")
    sample_every: int = option(0, "steps between sample files during training (0: none)", check=_at_least(0))
    temperatures: list = option([0.5, 0.7, 0.85, 1.0], "sampling temperatures", check=_temperatures,
                                applies=_images, type=float, nargs="+")
    progress: bool = option(True, "show a progress bar")


def _flag(name):
    return "--" + name.replace("_", "-")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flowkern.train", description=__doc__.split("\n\n")[0],
                                argument_default=argparse.SUPPRESS)
    for f in fields(Config):
        kw = dict(f.metadata["argparse"])
        if f.type is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif "type" not in kw:
            kw["type"] = next(t for t in typing.get_args(f.type) or (f.type,) if t is not type(None))
        default = f.default_factory() if callable(f.default_factory) else f.default
        shown = " ".join(map(str, default)) if isinstance(default, list) else default
        help = f.metadata["help"]
        if "(default" not in help and default is not None:
            help += f" (default: {shown})"
        p.add_argument(_flag(f.name), dest=f.name, help=help, **kw)
    p.add_argument("--resume", action="store_true", default=False,
                   help="continue the run in --out from its checkpoint: the learning-rate schedule, clipping, "
                        "steps, evaluation, sampling, backend, device and outputs may change; architecture "
                        "and data may not")
    p.add_argument("--overwrite", action="store_true", default=False, help="start again in an --out that holds a run")
    return p


@dataclass
class Command:
    """What the command line asked for: the configuration, the options it named, and how to start."""
    cfg: Config
    given: dict
    resume: bool = False
    overwrite: bool = False


def parse_args(argv=None) -> Command:
    """Parse and check the command line; a bad option exits with status 2 and a one-line message."""
    p = parser()
    args = vars(p.parse_args(argv))
    resume, overwrite = args.pop("resume"), args.pop("overwrite")
    if resume and overwrite:
        p.error("--resume continues a run and --overwrite starts it again: pass one")
    by_name = {f.name: f for f in fields(Config)}
    for name, value in args.items():
        check = by_name[name].metadata["check"]
        expected = check(value) if check is not None and value is not None else None
        if expected is not None:
            shown = " ".join(map(str, value)) if isinstance(value, list) else value
            p.error(f"{_flag(name)} {shown}: expected {expected}")
    cfg = Config(**args)
    cfg.model = cfg.model or default_model(cfg.data)
    for name in args:
        applies = by_name[name].metadata["applies"]
        reason = applies(cfg) if applies is not None else None
        if reason is not None:
            p.error(f"{_flag(name)} does not apply to --model {cfg.model} --data {cfg.data}: {reason}")
    if cfg.out is None:
        cfg.out = os.path.join("runs", f"{cfg.model}-{os.path.basename(os.path.normpath(cfg.data))}")
    return Command(cfg, args, resume, overwrite)


def resumed_config(stored: dict, given: dict) -> Config:
    """The configuration of a resumed run: the checkpoint's, with the options given that a resumed run may
    change; a change of any other option is refused (ValueError)."""
    by_name = {f.name: f for f in fields(Config)}
    for name, value in given.items():
        if not by_name[name].metadata["resumable"] and name in stored and value != stored[name]:
            raise ValueError(f"{_flag(name)} {value}: a resumed run keeps the architecture and data it started "
                             f"with ({_flag(name)} {stored[name]}); start a new run with another --out")
    known = {k: v for k, v in stored.items() if k in by_name}  # options added since keep their defaults
    return Config(**{**known, **given})


# ----------------------------------------------------------------------------------------------------- data


class Data:
    """A training and a test set: uint8 levels (N, C, H, W) with ``n_bins`` levels, or points (N, D)."""

    def __init__(self, name, train, test, n_bins=None):
        self.name, self.train, self.test, self.n_bins = name, train, test, n_bins

    @property
    def images(self):
        return self.n_bins is not None

    def prepare(self, rows, generator=None):
        """Rows of a set as model input: dequantised images on [-0.5, 0.5), or points as they are."""
        if not self.images:
            return rows
        return datasets.dequantize(rows, self.n_bins, generator=generator, noise=True)

    def batch(self, step, size, seed, rank=0, world=1):
        """This process's share of step ``step``'s global batch of ``size · world`` rows."""
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
        rows = torch.randint(len(self.train), (size * world,), generator=generator)
        return self.prepare(self.train[rows], generator)[rank * size:(rank + 1) * size]


def load_data(cfg: Config) -> Data:
    name, kind = cfg.data, data_kind(cfg.data)
    if kind == "digits":
        train, test = datasets.split(datasets.load_digits()[0], cfg.test_fraction)
        return Data(name, train, test, n_bins=17)
    if kind == "toy":
        return Data(name, datasets.toy2d(name, 20000, seed=1), datasets.toy2d(name, 4000, seed=2))
    if name == "cifar10":
        folder = cfg.data_dir or os.environ.get("CIFAR10_DIR")
        if folder is None:
            raise ValueError("--data cifar10 needs --data-dir (or CIFAR10_DIR): the folder holding "
                             "cifar-10-batches-py; flowkern never downloads data")
        train, test = datasets.load_cifar10(folder)
    elif kind == "cifar10":
        train, test = datasets.load_cifar10(name)
    elif kind == "folder" and os.path.isdir(name):
        train, test = datasets.split(datasets.load_image_folder(name, cfg.image_size),
                                     cfg.test_fraction)
    elif kind == "npz" and os.path.isfile(name):
        train, test = datasets.split(datasets.load_npz(name), cfg.test_fraction)
    else:
        raise ValueError(f"--data {name!r}: expected digits, {', '.join(datasets.TOY_SETS)}, cifar10, "
                         "a folder of images or a .npz file")
    if cfg.n_bits < 8:
        train, test = datasets.quantize(train, cfg.n_bits), datasets.quantize(test, cfg.n_bits)
    return Data(os.path.basename(os.path.normpath(name)), train, test, n_bins=2 ** cfg.n_bits)


# ---------------------------------------------------------------------------------------------------- model


def default_model(data_name):
    return "realnvp2d" if data_name in datasets.TOY_SETS else "glow"


def resolve_defaults(cfg: Config, data: Data) -> Config:
    """Fill in the model and its number of levels from the data."""
    cfg.model = cfg.model or default_model(cfg.data)
    if data.images == (cfg.model == "realnvp2d"):
        kind = "images" if data.images else "2-D points"
        raise ValueError(f"--model {cfg.model} does not model {kind} ({cfg.data}); use "
                         f"{'glow or realnvp' if data.images else 'realnvp2d'}")
    if data.images and cfg.levels is None:
        size = data.train.shape[-1]
        twos = (size & -size).bit_length() - 1  # times the size halves evenly
        cfg.levels = max(1, min(3, twos - 1)) if cfg.model == "glow" else max(1, min(3, twos))
    return cfg


def build_model(cfg: Config, data_shape) -> nn.Module:
    """The model ``cfg`` describes, for rows of shape ``data_shape`` ((C, H, W) images or (D,) points)."""
    if cfg.model == "realnvp2d":
        model = RealNVP2d(dim=data_shape[0], hidden=cfg.hidden, layers=cfg.depth)
    else:
        channels, height, width = data_shape
        if height != width:
            raise ValueError(f"{cfg.model} needs square images, got {height}×{width}; pass --image-size")
        if cfg.model == "glow":
            model = Glow(channels, height, levels=cfg.levels, steps=cfg.depth, hidden_channels=cfg.hidden,
                         coupling=cfg.coupling)
        else:
            model = RealNVP(channels, height, scales=cfg.levels, hidden_channels=cfg.hidden, blocks=cfg.blocks)
    return model.set_memory_saving(cfg.memory_saving, cfg.check_reconstruction)


@dataclass
class TrainedRun:
    """A run loaded back by :func:`load_run`: the model (in evaluation mode), its configuration, the number
    of levels of its data (``None`` for points) and the steps it was trained."""
    model: nn.Module
    config: Config
    n_bins: int | None
    step: int


def load_run(path, device="cpu") -> TrainedRun:
    """Rebuild the model of the run folder ``path`` from its checkpoint, as it was last saved."""
    checkpoint = os.path.join(path, CHECKPOINT)
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"no {CHECKPOINT} in {path}: not a run folder, or its run saved no checkpoint")
    state = torch.load(checkpoint, map_location=device, weights_only=True)
    cfg = resumed_config(state["config"], {})
    if "data_shape" in state:
        shape, n_bins = state["data_shape"], state["n_bins"]
    else:  # written before checkpoints recorded the data's shape
        data = load_data(cfg)
        shape, n_bins = data.train.shape[1:], data.n_bins
    model = build_model(cfg, shape).to(device)
    model.load_state_dict(state["model"])
    return TrainedRun(model.eval(), cfg, n_bins, state["step"])


class BitsPerDim(nn.Module):
    """Per-sample bits/dim of a batch (N,): the training loss, as a module that DDP can wrap."""

    def __init__(self, model, n_bins):
        super().__init__()
        self.model, self.n_bins = model, n_bins

    def forward(self, x):
        return self.model.bits_per_dim(x, self.n_bins)


def batch_loss(objective, x, step):
    """The loss of one training step (mean bits/dim)."""
    return objective(x).mean()


def adam(params, lr):
    """Adam fused into one kernel over all parameters where their device has one (CPU and CUDA: a
    quarter of the default loop's time on a Glow's 4 M parameters), else the multi-tensor version."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except RuntimeError:  # no fused Adam for this device
        return torch.optim.Adam(params, lr=lr, foreach=True)


# --------------------------------------------------------------------------------------------- run folder


class NonFiniteLoss(RuntimeError):
    pass


class Interrupted(RuntimeError):
    pass


def check_folder(out, resume, overwrite):
    """Refuse an ``out`` that cannot take this run: a new run never silently replaces one (a log counts,
    even without a checkpoint), and a resumed one needs its checkpoint. Writes nothing."""
    checkpoint, log = os.path.join(out, CHECKPOINT), os.path.join(out, LOG)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out}: a file, not a folder")
    if resume and not os.path.isfile(checkpoint):
        stopped = (" (its log shows a run that stopped before its first checkpoint: --overwrite starts it again)"
                   if os.path.isfile(log) else "")
        raise FileNotFoundError(f"--resume: no checkpoint at {checkpoint}{stopped}")
    if not resume and not overwrite and (os.path.isfile(checkpoint) or os.path.isfile(log)):
        raise FileExistsError(f"{out} holds a run: pass --resume to continue it, --overwrite to start it "
                              "again, or choose another --out")


def create_folder(out):
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, ".writable")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as error:
        raise ValueError(f"--out {out}: cannot write there ({error.strerror or error})") from None


def open_log(path, step):
    """The run's log opened for appending after the lines of steps before ``step``; lines of later steps (a
    resumed run writes them again) and a line torn by a stop while writing are dropped."""
    kept = []
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # torn by a stop mid-write; only the last line can be
                    break
                if record["step"] < step:
                    kept.append(line if line.endswith("\n") else line + "\n")
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)
    return open(path, "a")


def _sync(file):
    file.flush()
    os.fsync(file.fileno())


class StopRequest:
    """While active, Ctrl-C (SIGINT) asks the loop to stop after its current step instead of raising at once;
    a second Ctrl-C raises as usual."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print("\nflowkern.train: stopping after this step (Ctrl-C again to stop at once)", file=sys.stderr)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


# ------------------------------------------------------------------------------------------------- training


class Run:
    """One process's part of a training run: ``Run(parse_args(argv)).train()`` trains, evaluates, samples,
    and returns the final metrics. Every check of the configuration and the data happens here, before
    anything is written."""

    def __init__(self, command: Command):
        cfg = command.cfg
        check_folder(cfg.out, command.resume, command.overwrite)
        self.rank, self.world, self.device = _start_processes(cfg.device)
        state = None
        if command.resume:
            state = torch.load(os.path.join(cfg.out, CHECKPOINT), map_location=self.device, weights_only=True)
            cfg = resumed_config(state["config"], {**command.given, "out": cfg.out})
        self.cfg = cfg
        set_backend(cfg.backend)
        if state is not None and cfg.backend == AUTO and isinstance(state.get("backend"), dict):
            pin_auto_choices(self.device, state["backend"])  # the same kernels as before the stop
        torch.manual_seed(cfg.seed)
        self.data = load_data(cfg)
        if len(self.data.train) < 1 or len(self.data.test) < 1:
            raise ValueError(f"--data {cfg.data}: needs at least one training and one test row")
        resolve_defaults(cfg, self.data)
        self.model = build_model(cfg, self.data.train.shape[1:]).to(self.device)
        self.objective = BitsPerDim(self.model, self.data.n_bins)
        if self.world > 1:
            self.objective = nn.parallel.DistributedDataParallel(self.objective)
        self.optimizer = adam(self.model.parameters(), cfg.lr)
        self.step, self.resumed, self.stopping = 0, state is not None, False
        if self.resumed:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.step = state["step"]
        self.dims = math.prod(self.data.train.shape[1:])
        self.recent = collections.deque(maxlen=100)  # the last steps' losses
        if self.lead:
            create_folder(cfg.out)

    @property
    def lead(self):
        return self.rank == 0

    def learning_rate(self, step):
        return self.cfg.lr * min(1.0, (step + 1) / max(1, self.cfg.warmup))

    def backends(self):
        """The backend that ran the fused ops, or under "auto" the one it chose for each op."""
        if get_backend() != AUTO:
            return get_backend()
        return {op: choice.backend for (device, op), choice in sorted(auto_choices().items())
                if torch.device(device).type == self.device.type}

    def train(self) -> dict:
        cfg = self.cfg
        if self.lead:
            with open(os.path.join(cfg.out, "config.json"), "w") as f:
                json.dump(asdict(cfg), f, indent=1)
        start, began = self.step, time.perf_counter()
        self._loop()
        seconds = time.perf_counter() - began
        metrics = {"model": cfg.model, "data": self.data.name, "steps": self.step, "processes": self.world,
                   "global_batch_size": cfg.batch_size * self.world,
                   "memory_saving": cfg.memory_saving, "replica_max_abs_difference": self.replica_difference()}
        if self.step > start:  # what this invocation trained (a resumed run may only evaluate and sample)
            metrics.update(train_seconds=round(seconds, 2), steps_per_second=round((self.step - start) / seconds, 3),
                           train_bits_per_dim=float(np.mean(self.recent)))
        if self.lead:
            metrics["test_bits_per_dim"] = self.evaluate()
            if self.data.images:
                metrics["uniform_bits_per_dim"] = math.log2(self.data.n_bins)
            if cfg.sample:
                metrics["samples"] = self.write_samples()
            metrics["backend"] = self.backends()
            path = os.path.join(cfg.out, "metrics.json")
            if self.resumed and os.path.isfile(path):  # keep what earlier invocations measured
                with open(path) as f:
                    metrics = {**json.load(f), **metrics}
            with open(path, "w") as f:
                json.dump(metrics, f, indent=1)
        _barrier(self.world)
        return metrics

    def _loop(self):
        cfg = self.cfg
        bar = _progress(range(self.step, cfg.steps), self.step, cfg.steps, cfg.progress and self.lead)
        log = open_log(os.path.join(cfg.out, LOG), self.step) if self.lead else None
        last_saved = self.step
        try:
            with StopRequest() as stop:
                for step in bar:
                    record = self._train_step(step, stop, last_saved)
                    if self.lead and cfg.eval_every and self.step % cfg.eval_every == 0:
                        record["test_bits_per_dim"] = self.evaluate()
                    if log is not None:
                        log.write(json.dumps(record) + "\n")
                    if step % 10 == 0 or self.step == cfg.steps:
                        bar.set_postfix(nll=f"{record['bits_per_dim'] * self.dims * math.log(2):.2f}",
                                        bpd=f"{record['bits_per_dim']:.3f}", lr=f"{record['lr']:.1e}", refresh=False)
                    if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps or self.stopping:
                        if log is not None:
                            _sync(log)  # every line before a checkpoint is on disk before the checkpoint
                        self.save()
                        last_saved = self.step
                    if self.lead and cfg.sample_every and self.step % cfg.sample_every == 0:
                        self.write_samples(tag=f"_step{self.step}")
                    if self.stopping:
                        raise Interrupted(f"interrupted: stopped after step {self.step} and saved "
                                          f"{os.path.join(cfg.out, CHECKPOINT)}; --resume continues")
        finally:
            if log is not None:
                log.close()
            bar.close()

    def _train_step(self, step, stop, last_saved) -> dict:
        """One optimiser step; returns its log record."""
        cfg = self.cfg
        lr = self.learning_rate(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x = self.data.batch(step, cfg.batch_size, cfg.seed, self.rank, self.world).to(self.device)
        loss = batch_loss(self.objective, x, step)
        mean_loss, finite, self.stopping = self._agree(loss, stop.requested)
        if not finite:
            raise NonFiniteLoss(self._stop_message(step, "loss", mean_loss, last_saved))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip))
        if not math.isfinite(grad_norm):
            raise NonFiniteLoss(self._stop_message(step, "gradient norm", grad_norm, last_saved))
        self.optimizer.step()
        self.step = step + 1
        self.recent.append(mean_loss)
        return {"step": step, "bits_per_dim": mean_loss, "lr": lr, "grad_norm": grad_norm}

    def _agree(self, loss, stop_requested):
        """The loss averaged over processes, whether it is finite on all of them, and whether any was asked
        to stop (so that all stop together)."""
        value = loss.detach().double().reshape(1)
        if self.world > 1:
            value = torch.cat([value, (~torch.isfinite(value)).double(), value.new_tensor([float(stop_requested)])])
            dist.all_reduce(value)
            return value[0].item() / self.world, value[1].item() == 0, value[2].item() > 0
        value = value.item()
        return value, math.isfinite(value), stop_requested

    def _stop_message(self, step, what, value, last_saved):
        advice = "Lower --lr, lengthen --warmup or lower --clip"
        if last_saved > 0:
            return (f"the {what} is {value} at step {step}: training stopped; the last good checkpoint is "
                    f"{os.path.join(self.cfg.out, CHECKPOINT)} (step {last_saved}). {advice}, then --resume: "
                    "they take effect from that step")
        return (f"the {what} is {value} at step {step}: training stopped before its first checkpoint. {advice}, "
                "then start again with --overwrite")

    def save(self):
        if not self.lead:
            return
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step,
                 "config": asdict(self.cfg), "data_shape": list(self.data.train.shape[1:]),
                 "n_bins": self.data.n_bins, "backend": self.backends()}
        path = os.path.join(self.cfg.out, CHECKPOINT)
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)  # a stop while saving keeps the previous checkpoint

    def replica_difference(self):
        """Largest difference of any parameter or buffer between processes (0.0 for one process)."""
        if self.world == 1:
            return 0.0
        flat = torch.cat([t.detach().double().flatten() for t in self.model.state_dict().values()])
        high, low = flat.clone(), flat.clone()
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        return (high - low).max().item()

    @torch.no_grad()
    def evaluate(self, batch_size=500):
        """Mean bits/dim of the test set (dequantisation noise from a fixed seed)."""
        self.model.eval()
        generator = torch.Generator().manual_seed(12345)
        total = 0.0
        for rows in self.data.test.split(batch_size):
            x = self.data.prepare(rows, generator).to(self.device)
            total += self.model.bits_per_dim(x, self.data.n_bins).double().sum().item()
        self.model.train()
        return total / len(self.data.test)

    @torch.no_grad()
    def write_samples(self, n=64, tag=""):
        """PNG grids of samples at each temperature (images) or a density and sample plot (points), named
        with ``tag`` after the temperature."""
        self.model.eval()
        generator = torch.Generator(device=self.device).manual_seed(self.cfg.seed)
        if self.data.images:
            files = []
            for t in self.cfg.temperatures:
                x = self.model.sample(n, temperature=t, generator=generator).float().cpu()
                levels = torch.floor((x + 0.5) * self.data.n_bins).clamp(0, self.data.n_bins - 1)
                files.append(f"samples_t{t:g}{tag}.png")
                save_grid(levels, self.data.n_bins, os.path.join(self.cfg.out, files[-1]))
        else:
            files = [f"density{tag}.png"]
            plot_density(self.model, self.data, os.path.join(self.cfg.out, files[0]), generator)
        self.model.train()
        return files


def save_grid(levels, n_bins, path, columns=8, pad=1):
    """Write images of integer levels (N, C, H, W) in 0..n_bins−1 as one PNG grid."""
    from PIL import Image

    n, c, h, w = levels.shape
    rows = math.ceil(n / columns)
    grid = np.zeros((rows * (h + pad) + pad, columns * (w + pad) + pad, c), dtype=np.uint8)
    pixels = (levels.float() * (255 / (n_bins - 1))).round().byte().permute(0, 2, 3, 1).numpy()
    for i in range(n):
        top, left = pad + (i // columns) * (h + pad), pad + (i % columns) * (w + pad)
        grid[top:top + h, left:left + w] = pixels[i]
    scale = max(1, 256 // (rows * (h + pad)))  # small images (digits) enlarged for viewing
    image = Image.fromarray(grid[..., 0] if c == 1 else grid)
    image.resize((image.width * scale, image.height * scale), Image.NEAREST).save(path)


def plot_density(model, data, path, generator, grid=200):
    """The model's density over the data's range, beside samples (T = 1) drawn over the test points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    device = next(model.parameters()).device
    low, high = data.test.min(0).values - 0.5, data.test.max(0).values + 0.5
    xs, ys = (torch.linspace(low[i].item(), high[i].item(), grid) for i in range(2))
    points = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(-1, 2)
    density = torch.cat([model.log_prob(p.to(device)).exp().cpu() for p in points.split(4096)])
    samples = model.sample(2000, generator=generator).cpu()
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 5))
    left.imshow(density.reshape(grid, grid).numpy(), origin="lower", cmap="viridis",
                extent=(xs[0].item(), xs[-1].item(), ys[0].item(), ys[-1].item()))
    left.set_title("model density")
    right.scatter(*data.test[:2000].T.numpy(), s=2, c="0.7", label="data")
    right.scatter(*samples.T.numpy(), s=2, c="tab:blue", label="samples")
    right.set_xlim(xs[0].item(), xs[-1].item())
    right.set_ylim(ys[0].item(), ys[-1].item())
    right.legend(loc="upper right")
    right.set_title("samples over the data")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# ---------------------------------------------------------------------------------------------- processes


def _start_processes(device):
    """(rank, world size, device) for this process; joins the process group that torchrun set up."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this torch sees no CUDA device")
    if world == 1:
        return 0, 1, device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


def _barrier(world):
    if world > 1:
        dist.barrier()


def _progress(steps, initial, total, enabled):
    from tqdm import tqdm

    return tqdm(steps, initial=initial, total=total, unit="step", dynamic_ncols=True, disable=not enabled)


# ----------------------------------------------------------------------------------------- command line


def main(argv=None):
    """The command line: 0 when the run is done, 1 when it stopped on a non-finite loss, 2 for a bad option,
    data or run folder (one line on stderr, nothing written), 130 when interrupted (after a checkpoint)."""
    try:
        command = parse_args(argv)
    except SystemExit as exit:  # argparse's --help, or its message for a bad option
        return exit.code
    try:
        try:
            run = Run(command)
        except (ValueError, OSError, BackendUnavailable) as error:  # configuration, data, run folder
            print(f"flowkern.train: {error}", file=sys.stderr)
            return 2
        try:
            metrics = run.train()
        except NonFiniteLoss as error:
            print(f"flowkern.train: {error}", file=sys.stderr)
            return 1
        except Interrupted as error:
            print(f"flowkern.train: {error}", file=sys.stderr)
            return 130
    except KeyboardInterrupt:
        print("flowkern.train: interrupted", file=sys.stderr)
        return 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(metrics, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
