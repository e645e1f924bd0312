"""The options of a training run, declared once: the ``Config`` dataclass, and the command line built from
it (each option's default, help, range check, when it applies, and whether a resumed run may change it)."""
import argparse
import math
import os
import typing
from dataclasses import dataclass, field, fields

import torch

from .. import data as datasets
from ..backends import AUTO, MODULES
from ..nn.conditioners import GlowConditioner
from ..nn.continuous import SOLVERS

MODELS = ("glow", "realnvp", "realnvp2d", "ffjord")
DEPTHS = {"glow": 8, "realnvp2d": 8, "ffjord": 3}  # --depth of each model that takes it
DEVICE_TYPES = ("cpu", "cuda")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # autocast dtype of each
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")  # torch.compile's modes


def data_kind(name: str) -> str:
    """What ``--data`` names: digits, toy (a 2-D set), cifar10, folder (of images) or npz."""
    if name == "digits" or name in datasets.TOY_SETS:
        return "toy" if name in datasets.TOY_SETS else "digits"
    if name == "cifar10" or (os.path.isdir(name) and datasets.find_cifar10(name)):
        return "cifar10"
    return "npz" if name.endswith(".npz") else "folder"


def _between(low, high):
    return lambda v: None if low <= v <= high else f"from {low} to {high}"


def _positive(v):
    return None if math.isfinite(v) and v > 0 else "a finite number above 0"


def _weight(v):
    return None if math.isfinite(v) and v >= 0 else "a finite number, at least 0"


def _tolerance(v):  # a float32 solve cannot meet a tighter one: its steps shrink until they underflow
    return None if 1e-8 <= v <= 0.1 else "from 1e-08 to 0.1"


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
    model: str | None = option(None, "glow or realnvp for images, realnvp2d for 2-D points, ffjord for either "
                               "(default: by --data)", resumable=False, choices=MODELS)
    data: str = option("digits", f"digits, {', '.join(datasets.TOY_SETS)}, cifar10, a folder of images (searched "
                       "recursively) or a .npz of integer images", resumable=False)
    data_dir: str | None = option(None, "the folder holding cifar-10-batches-py (or set CIFAR10_DIR)",
                                  applies=_cifar)
    steps: int = option(2000, "train until this many steps", check=_between(1, 10 ** 9))
    batch_size: int = option(64, "per process", check=_between(1, 2 ** 16), resumable=False)
    lr: float = option(1e-3, "peak learning rate", check=_positive)
    warmup: int = option(200, "steps of linear learning-rate warm-up (0: none)", check=_between(0, 10 ** 9))
    clip: float = option(50.0, "largest gradient norm; larger ones are scaled down to it", check=_positive)
    seed: int = option(0, "seeds the model, the batches and the dequantisation noise", check=_between(0, 2 ** 63 - 1),
                       resumable=False)
    backend: str = option("auto", "the fused ops' implementation", choices=(*MODULES, AUTO))
    device: str | None = option(None, "cpu, cuda or cuda:N (default: cuda when available)", check=_device)
    memory_saving: bool = option(False, "train by inversion: activation memory flat in depth",
                                 applies=_for("glow", "realnvp", "realnvp2d"))
    precision: str = option("fp32", "the conditioners' dtype under torch.autocast (bf16, or fp16 with a gradient "
                            "scaler); the flow's state and log-dets stay float32", choices=PRECISIONS,
                            applies=_for("glow", "realnvp", "realnvp2d"))
    compile: str | None = option(None, "torch.compile the training loss and its backward in this mode: default, "
                                 "reduce-overhead (CUDA graphs on a GPU: one launch for the whole step's kernels) or "
                                 "max-autotune; the first step compiles (default: eager)", choices=COMPILE_MODES,
                                 applies=_for("glow", "realnvp", "realnvp2d"))
    check_reconstruction: float | None = option(
        None, "warn when an input rebuilt by inversion is off by more than this relative error",
        check=_positive, applies=_memory_saving, metavar="TOL")
    levels: int | None = option(None, "scales of glow or realnvp (default: by image size, at most 3)",
                                check=_between(1, 8), applies=_for("glow", "realnvp"), resumable=False)
    depth: int | None = option(None, "flow steps per level (glow: 8), couplings (realnvp2d: 8) or hidden layers "
                               "of the dynamics (ffjord: 3)", check=_between(1, 256),
                               applies=_for("glow", "realnvp2d", "ffjord"), resumable=False)
    hidden: int = option(64, "conditioner (ffjord: dynamics) width", check=_between(1, 4096), resumable=False)
    blocks: int = option(2, "residual blocks per s/t network", check=_between(0, 64), applies=_for("realnvp"),
                         resumable=False)
    coupling: str = option("affine", "the coupling's transform", applies=_for("glow"), resumable=False,
                           choices=("affine", "additive"))
    conditioner_form: str = option(AUTO, "how the conditioners compute: auto (the fastest form measured per shape; "
                                   "two processes may measure differently, and round differently) or one of "
                                   "them, for runs that must match bit for bit", applies=_for("glow"),
                                   choices=(AUTO, *GlowConditioner.FORMS))
    divergence: str | None = option(None, "ffjord's trace in training: exact, or hutchinson (default: exact up "
                                    "to 64 dimensions); evaluation takes the exact trace up to 64 dimensions",
                                    applies=_for("ffjord"), choices=("exact", "hutchinson"))
    solver: str = option("dopri5", "ffjord's torchdiffeq method", applies=_for("ffjord"), choices=SOLVERS)
    tol: float = option(1e-5, "ffjord's solver tolerance (rtol = atol)", check=_tolerance, applies=_for("ffjord"))
    adjoint: bool = option(True, "ffjord: backpropagate by the adjoint ODE (memory constant in the solver's steps)",
                           applies=_for("ffjord"))
    kinetic: float = option(0.01, "ffjord: weight of the kinetic-energy regulariser (fewer solver steps)",
                            check=_weight, applies=_for("ffjord"))
    jacobian: float = option(0.01, "ffjord: weight of the Jacobian Frobenius-norm regulariser",
                             check=_weight, applies=_for("ffjord"))
    n_bits: int = option(8, "quantise 8-bit images to this many bits", check=_bits, applies=_eight_bit,
                         resumable=False)
    image_size: int | None = option(None, "resize a folder's images to this size", check=_between(2, 4096),
                                    applies=_folder, resumable=False)
    test_fraction: float = option(0.1, "share of the images held out for evaluation", check=_fraction,
                                  applies=_held_out, resumable=False)
    out: str | None = option(None, "run folder (default: runs/<model>-<data>)")
    checkpoint_every: int = option(500, "steps between checkpoints", check=_between(1, 10 ** 9))
    eval_every: int = option(0, "steps between evaluations of the test set, logged (0: at the end only)",
                             check=_between(0, 10 ** 9))
    sample: bool = option(True, "write samples at the end (images: a PNG grid per temperature; 2-D points: "
                          "density and samples)")
    sample_every: int = option(0, "steps between sample files during training (0: none)",
                               check=_between(0, 10 ** 9))
    temperatures: list = option([0.5, 0.7, 0.85, 1.0], "sampling temperatures", check=_temperatures,
                                applies=_images, type=float, nargs="+")
    progress: bool = option(True, "show a progress bar")


FIELDS = {f.name: f for f in fields(Config)}


def _flag(name):
    return "--" + name.replace("_", "-")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flowkern.train", description="Train, evaluate and sample a flow.",
                                argument_default=argparse.SUPPRESS)
    for f in FIELDS.values():
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
    for name, value in args.items():
        expected = check_value(name, value)
        if expected is not None:
            shown = " ".join(map(str, value)) if isinstance(value, list) else value
            p.error(f"{_flag(name)} {shown}: expected {expected}")
    cfg = Config(**args)
    cfg.model = cfg.model or default_model(cfg.data)
    if not resume:  # a resumed run's model and data are its checkpoint's: checked by resumed_config
        try:
            check_applies(cfg, args)
        except ValueError as error:
            p.error(str(error))
    if cfg.out is None:
        cfg.out = os.path.join("runs", f"{cfg.model}-{os.path.basename(os.path.normpath(cfg.data))}")
    if not resume:
        try:
            check_out(cfg)
        except ValueError as error:
            p.error(str(error))
    return Command(cfg, args, resume, overwrite)


def _of_type(f, value) -> bool:
    """Whether ``value`` has the type of the option ``f`` (as argparse would have made it)."""
    for t in typing.get_args(f.type) or (f.type,):
        if (value is None and t is type(None) or t is bool and type(value) is bool or t is int and type(value) is int
                or t is float and type(value) in (int, float) or t is str and type(value) is str
                or t is list and type(value) is list and all(type(v) in (int, float) for v in value)):
            return True
    return False


def check_value(name, value):
    """What the option ``name`` expected, or None when ``value`` is fine: its type, choices and range."""
    f = FIELDS[name]
    if not _of_type(f, value):
        return "a value of type " + " or ".join(t.__name__ for t in typing.get_args(f.type) or (f.type,))
    choices = f.metadata["argparse"].get("choices")
    if choices is not None and value is not None and value not in choices:
        return f"one of {', '.join(map(str, choices))}"
    check = f.metadata["check"]
    return check(value) if check is not None and value is not None else None


def check_out(cfg: Config) -> None:
    """Refuse (ValueError) an ``--out`` inside the folder of images ``--data``: its samples would become data."""
    if data_kind(cfg.data) != "folder" or not os.path.isdir(cfg.data):
        return
    data, out = os.path.realpath(cfg.data), os.path.realpath(cfg.out)
    if os.path.commonpath([data, out]) == data:
        raise ValueError(f"--out {cfg.out} is inside --data {cfg.data}: the run's samples would become training "
                         "data; choose an --out outside it")


def resumed_config(stored: dict, given: dict, source="the checkpoint") -> Config:
    """The configuration of a resumed run: the checkpoint's (``stored``, checked as the command line is:
    ``source`` names it in the message), with the options given that a resumed run may change; a change of
    any other option, or a stored value the command line would refuse, is a ValueError."""
    known = {k: v for k, v in stored.items() if k in FIELDS}  # options added since keep their defaults
    for name, value in known.items():
        expected = check_value(name, value)
        if expected is not None:
            raise ValueError(f"{source}: its configuration has {name} = {value!r}, expected {expected}")
    for name, value in given.items():
        if not FIELDS[name].metadata["resumable"] and name in known and value != known[name]:
            raise ValueError(f"{_flag(name)} {value}: a resumed run keeps the architecture and data it started "
                             f"with ({_flag(name)} {known[name]}); start a new run with another --out")
    cfg = Config(**{**known, **given})
    check_applies(cfg, given)
    check_out(cfg)
    return cfg


def check_applies(cfg: Config, given) -> None:
    """Refuse (ValueError) each option in ``given`` that does not apply to ``cfg``'s model and data."""
    for name in given:
        applies = FIELDS[name].metadata["applies"]
        reason = applies(cfg) if applies is not None else None
        if reason is not None:
            raise ValueError(f"{_flag(name)} does not apply to --model {cfg.model} --data {cfg.data}: {reason}")


def default_model(data_name):
    return "realnvp2d" if data_name in datasets.TOY_SETS else "glow"
