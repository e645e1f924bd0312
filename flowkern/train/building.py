"""What a run is built from: its data sets, and the model its options describe (also rebuilt from a run
folder by :func:`load_run`)."""
import os
from dataclasses import dataclass

import torch
from torch import nn

from .. import data as datasets
from ..models import FFJORD, Glow, RealNVP, RealNVP2d
from ..nn.conditioners import GlowConditioner
from .folder import CHECKPOINT, read_checkpoint
from .options import DEPTHS, Config, data_kind, default_model, resumed_config

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
        generator = torch.Generator().manual_seed((seed * 1_000_003 + step) % 2 ** 64)
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



def resolve_defaults(cfg: Config, data: Data) -> Config:
    """Fill in the model and its number of levels from the data."""
    cfg.model = cfg.model or default_model(cfg.data)
    if cfg.model != "ffjord" and data.images == (cfg.model == "realnvp2d"):
        kind = "images" if data.images else "2-D points"
        raise ValueError(f"--model {cfg.model} does not model {kind} ({cfg.data}); use "
                         f"{'glow, realnvp or ffjord' if data.images else 'realnvp2d or ffjord'}")
    if cfg.depth is None and cfg.model in DEPTHS:
        cfg.depth = DEPTHS[cfg.model]
    if data.images and cfg.levels is None and cfg.model in ("glow", "realnvp"):
        size = data.train.shape[-1]
        twos = (size & -size).bit_length() - 1  # times the size halves evenly
        cfg.levels = max(1, min(3, twos - 1)) if cfg.model == "glow" else max(1, min(3, twos))
    return cfg


def build_model(cfg: Config, data_shape) -> nn.Module:
    """The model ``cfg`` describes, for rows of shape ``data_shape`` ((C, H, W) images or (D,) points)."""
    if cfg.model == "realnvp2d":
        model = RealNVP2d(dim=data_shape[0], hidden=cfg.hidden, layers=cfg.depth)
    elif cfg.model == "ffjord":
        return FFJORD(tuple(data_shape), hidden=cfg.hidden, depth=cfg.depth, method=cfg.solver, rtol=cfg.tol,
                      atol=cfg.tol, adjoint=cfg.adjoint, divergence=cfg.divergence, kinetic=cfg.kinetic,
                      jacobian=cfg.jacobian)
    else:
        channels, height, width = data_shape
        if height != width:
            fix = ("pass --image-size to resize them" if data_kind(cfg.data) == "folder"
                   else "crop or resize them to a square first")
            raise ValueError(f"{cfg.model} needs square images, got {height}×{width}: {fix}")
        if cfg.model == "glow":
            model = Glow(channels, height, levels=cfg.levels, steps=cfg.depth, hidden_channels=cfg.hidden,
                         coupling=cfg.coupling)
            for conditioner in model.modules():
                if isinstance(conditioner, GlowConditioner) and cfg.conditioner_form != "auto":
                    conditioner.form = cfg.conditioner_form
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


def check_data_shape(state, source):
    """The data shape and levels a checkpoint records: (C, H, W) images with n_bins levels, or (D,) points."""
    shape, n_bins = state["data_shape"], state["n_bins"]
    sizes = isinstance(shape, (list, tuple)) and len(shape) in (1, 3) and all(
        type(s) is int and 1 <= s <= 2 ** 16 for s in shape)
    levels = n_bins is None if len(shape or ()) == 1 else type(n_bins) is int and 2 <= n_bins <= 256
    if not (sizes and levels):
        raise ValueError(f"{source}: damaged checkpoint (data_shape {shape!r} with n_bins {n_bins!r})")
    return tuple(shape), n_bins


def load_run(path, device="cpu") -> TrainedRun:
    """Rebuild the model of the run folder ``path`` from its checkpoint, as it was last saved. Only the
    checkpoint is read (tensors only, its configuration checked as the command line is); never data."""
    checkpoint = os.path.join(path, CHECKPOINT)
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"no {CHECKPOINT} in {path}: not a run folder, or its run saved no checkpoint")
    state = read_checkpoint(checkpoint, device, needs=("model", "step", "config", "data_shape", "n_bins"))
    cfg = resumed_config(state["config"], {}, source=checkpoint)
    shape, n_bins = check_data_shape(state, checkpoint)
    model = build_model(cfg, shape).to(device)
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, TypeError, AttributeError) as error:
        raise ValueError(f"{checkpoint}: its parameters do not fit the model its configuration describes "
                         f"({str(error).splitlines()[0]})") from None
    return TrainedRun(model.eval(), cfg, n_bins, state["step"])
