"""Train, evaluate and sample a flow from the command line.

    python -m flowkern.train                                     # Glow on the embedded digits
    python -m flowkern.train --model realnvp2d --data moons --steps 3000 --sample
    python -m flowkern.train --data cifar10 --data-dir ~/data --memory-saving
    torchrun --nproc_per_node=2 -m flowkern.train --steps 2000  # DistributedDataParallel (gloo / NCCL)

The run folder (``--out``) receives ``checkpoint.pt`` (model, optimiser, step and configuration),
``log.jsonl`` (one line per step), ``metrics.json`` at the end and, with ``--sample``, PNG samples.
Each step's batch and dequantisation noise are a function of (seed, step) alone, so ``--resume``
continues exactly as if the run had never stopped, and N processes of batch B see the batches of one
process of batch N·B.
"""
import argparse
import collections
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from . import data as datasets
from .backends import AUTO, BackendUnavailable, auto_choices, get_backend, set_backend
from .models import Glow, RealNVP, RealNVP2d

MODELS = ("glow", "realnvp", "realnvp2d")
CHECKPOINT = "checkpoint.pt"


@dataclass
class Config:
    model: str | None = None  # default: glow for images, realnvp2d for points
    data: str = "digits"  # digits, a 2-D toy set, cifar10, or a folder of images / a .npz
    data_dir: str | None = None  # where cifar10 lies
    steps: int = 2000
    batch_size: int = 64  # per process
    lr: float = 1e-3
    warmup: int = 200  # steps of linear learning-rate warm-up
    clip: float = 50.0  # gradient-norm clipping
    seed: int = 0
    backend: str = "auto"
    device: str | None = None
    memory_saving: bool = False
    check_reconstruction: float | None = None
    levels: int | None = None  # scales; default by image size
    depth: int = 8  # flow steps per level (glow), couplings (realnvp2d)
    hidden: int = 64
    blocks: int = 2  # residual blocks per RealNVP s/t network
    coupling: str = "affine"  # glow: affine or additive
    n_bits: int = 8  # quantisation of 8-bit images (digits keep their 17 levels)
    image_size: int | None = None  # resize a folder of images
    test_fraction: float = 0.1
    out: str | None = None  # default runs/<model>-<data>
    checkpoint_every: int = 500
    sample: bool = False
    temperatures: list = field(default_factory=lambda: [0.5, 0.7, 0.85, 1.0])
    progress: bool = True


# what a resumed run may change; the rest comes from its checkpoint, so that it continues the same run
RESUMABLE = ("steps", "backend", "device", "out", "checkpoint_every", "sample", "temperatures", "progress",
             "check_reconstruction", "data_dir")


class NonFiniteLoss(RuntimeError):
    pass


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
    name = cfg.data
    if name == "digits":
        train, test = datasets.split(datasets.load_digits()[0], cfg.test_fraction)
        return Data(name, train, test, n_bins=17)
    if name in datasets.TOY_SETS:
        return Data(name, datasets.toy2d(name, 20000, seed=1), datasets.toy2d(name, 4000, seed=2))
    if name == "cifar10":
        folder = cfg.data_dir or os.environ.get("CIFAR10_DIR")
        if folder is None:
            raise ValueError("--data cifar10 needs --data-dir (or CIFAR10_DIR): the folder holding "
                             "cifar-10-batches-py; flowkern never downloads data")
        train, test = datasets.load_cifar10(folder)
    elif os.path.isdir(name) and datasets.find_cifar10(name):
        train, test = datasets.load_cifar10(name)
    elif os.path.isdir(name):
        train, test = datasets.split(datasets.load_image_folder(name, cfg.image_size), cfg.test_fraction)
    elif name.endswith(".npz") and os.path.isfile(name):
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
    if cfg.model not in MODELS:
        raise ValueError(f"--model {cfg.model!r}: expected one of {', '.join(MODELS)}")
    if data.images == (cfg.model == "realnvp2d"):
        kind = "images" if data.images else "2-D points"
        raise ValueError(f"--model {cfg.model} does not model {kind} ({cfg.data}); use "
                         f"{'glow or realnvp' if data.images else 'realnvp2d'}")
    if data.images and cfg.levels is None:
        size = data.train.shape[-1]
        twos = (size & -size).bit_length() - 1  # times the size halves evenly
        cfg.levels = max(1, min(3, twos - 1)) if cfg.model == "glow" else max(1, min(3, twos))
    return cfg


def build_model(cfg: Config, data: Data) -> nn.Module:
    if cfg.model == "realnvp2d":
        model = RealNVP2d(dim=data.train.shape[1], hidden=cfg.hidden, layers=cfg.depth)
    else:
        channels, height, width = data.train.shape[1:]
        if height != width:
            raise ValueError(f"{cfg.model} needs square images, got {height}×{width}; pass --image-size")
        if cfg.model == "glow":
            model = Glow(channels, height, levels=cfg.levels, steps=cfg.depth, hidden_channels=cfg.hidden,
                         coupling=cfg.coupling)
        else:
            model = RealNVP(channels, height, scales=cfg.levels, hidden_channels=cfg.hidden, blocks=cfg.blocks)
    return model.set_memory_saving(cfg.memory_saving, cfg.check_reconstruction)


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


# ------------------------------------------------------------------------------------------------- training


def adam(params, lr):
    """Adam fused into one kernel over all parameters where their device has one (CPU and CUDA: a
    quarter of the default loop's time on a Glow's 4 M parameters), else the multi-tensor version."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except RuntimeError:  # no fused Adam for this device
        return torch.optim.Adam(params, lr=lr, foreach=True)


class Run:
    """One process's part of a training run: ``Run(cfg).train()`` trains, evaluates, samples, and returns
    the final metrics."""

    def __init__(self, cfg: Config, resume: bool = False, overwrite: bool = False):
        self.rank, self.world, self.device = _start_processes(cfg.device)
        path = os.path.join(cfg.out, CHECKPOINT)
        state = None
        if resume:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"--resume: no checkpoint at {path}")
            state = torch.load(path, map_location=self.device, weights_only=True)
            cfg = Config(**{**state["config"], **{k: getattr(cfg, k) for k in RESUMABLE}})
        elif os.path.isfile(path) and not overwrite:
            raise FileExistsError(f"{path} exists: pass --resume to continue that run, --overwrite to start "
                                  "it again, or choose another --out")
        self.cfg = cfg
        set_backend(cfg.backend)
        torch.manual_seed(cfg.seed)
        self.data = load_data(cfg)
        resolve_defaults(cfg, self.data)
        self.model = build_model(cfg, self.data).to(self.device)
        self.objective = BitsPerDim(self.model, self.data.n_bins)
        if self.world > 1:
            self.objective = nn.parallel.DistributedDataParallel(self.objective)
        self.optimizer = adam(self.model.parameters(), cfg.lr)
        self.step = 0
        self.resumed = state is not None
        if self.resumed:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.step = state["step"]
        self.dims = math.prod(self.data.train.shape[1:])
        self.recent = collections.deque(maxlen=100)  # the last steps' losses

    @property
    def lead(self):
        return self.rank == 0

    def backends(self):
        """The backend that ran the fused ops, or under "auto" the one it chose for each op."""
        if get_backend() != AUTO:
            return get_backend()
        return {op: choice.backend for (device, op), choice in sorted(auto_choices().items())
                if torch.device(device).type == self.device.type}

    def learning_rate(self, step):
        return self.cfg.lr * min(1.0, (step + 1) / max(1, self.cfg.warmup))

    def train(self) -> dict:
        cfg = self.cfg
        if self.lead:
            os.makedirs(cfg.out, exist_ok=True)
            _truncate_log(os.path.join(cfg.out, "log.jsonl"), self.step)
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
        log = open(os.path.join(cfg.out, "log.jsonl"), "a") if self.lead else None
        last_saved = self.step
        try:
            for step in bar:
                lr = self.learning_rate(step)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                x = self.data.batch(step, cfg.batch_size, cfg.seed, self.rank, self.world).to(self.device)
                loss = batch_loss(self.objective, x, step)
                mean_loss, finite = self._agree(loss)
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
                if log is not None:
                    log.write(json.dumps({"step": step, "bits_per_dim": mean_loss, "lr": lr,
                                          "grad_norm": grad_norm}) + "\n")
                if step % 10 == 0 or self.step == cfg.steps:
                    bar.set_postfix(nll=f"{mean_loss * self.dims * math.log(2):.2f}", bpd=f"{mean_loss:.3f}",
                                    lr=f"{lr:.1e}", refresh=False)
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                    self.save()
                    last_saved = self.step
        finally:
            if log is not None:
                log.close()
            bar.close()

    def _agree(self, loss):
        """The loss averaged over processes, and whether it is finite on all of them (so that all stop)."""
        value = loss.detach().double().reshape(1)
        if self.world > 1:
            value = torch.cat([value, (~torch.isfinite(value)).double()])
            dist.all_reduce(value)
            return value[0].item() / self.world, value[1].item() == 0
        value = value.item()
        return value, math.isfinite(value)

    def _stop_message(self, step, what, value, last_saved):
        saved = (f"the last good checkpoint is {os.path.join(self.cfg.out, CHECKPOINT)} (step {last_saved})"
                 if last_saved > 0 else "no checkpoint was written")
        return (f"the {what} is {value} at step {step}: training stopped; {saved}. Lower --lr, lengthen "
                "--warmup or lower --clip, then --resume")

    def save(self):
        if not self.lead:
            return
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step,
                 "config": asdict(self.cfg)}
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
    def write_samples(self, n=64):
        """PNG grids of samples at each temperature (images) or a density and sample plot (points)."""
        self.model.eval()
        generator = torch.Generator(device=self.device).manual_seed(self.cfg.seed)
        if self.data.images:
            files = []
            for t in self.cfg.temperatures:
                x = self.model.sample(n, temperature=t, generator=generator).float().cpu()
                levels = torch.floor((x + 0.5) * self.data.n_bins).clamp(0, self.data.n_bins - 1)
                files.append(f"samples_t{t:g}.png")
                save_grid(levels, self.data.n_bins, os.path.join(self.cfg.out, files[-1]))
        else:
            files = ["density.png"]
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


def _truncate_log(path, step):
    """Drop the lines of steps at or after ``step`` (a resumed run writes them again)."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip() and json.loads(line)["step"] < step]
    with open(path, "w") as f:
        f.writelines(lines)


def _progress(steps, initial, total, enabled):
    from tqdm import tqdm

    return tqdm(steps, initial=initial, total=total, unit="step", dynamic_ncols=True, disable=not enabled)


# ----------------------------------------------------------------------------------------- command line


def parse_args(argv=None):
    defaults = Config()
    p = argparse.ArgumentParser(prog="python -m flowkern.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=MODELS, help="default: glow for images, realnvp2d for 2-D points")
    p.add_argument("--data", default=defaults.data,
                   help=f"digits, {', '.join(datasets.TOY_SETS)}, cifar10, a folder of images, or a .npz")
    p.add_argument("--data-dir", help="the folder holding cifar-10-batches-py (or set CIFAR10_DIR)")
    p.add_argument("--steps", type=int, default=defaults.steps, help="train until this many steps")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="per process")
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--warmup", type=int, default=defaults.warmup, help="steps of linear learning-rate warm-up")
    p.add_argument("--clip", type=float, default=defaults.clip, help="gradient-norm clipping")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--backend", default=defaults.backend, help="auto, reference, triton or native")
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--memory-saving", action="store_true", help="train by inversion (flat activation memory)")
    p.add_argument("--check-reconstruction", type=float, metavar="TOL",
                   help="with --memory-saving: warn when a rebuilt input's relative error exceeds TOL")
    p.add_argument("--levels", type=int, help="scales of glow/realnvp; default by image size (at most 3)")
    p.add_argument("--depth", type=int, default=defaults.depth,
                   help="flow steps per level (glow) or couplings (realnvp2d)")
    p.add_argument("--hidden", type=int, default=defaults.hidden, help="conditioner width")
    p.add_argument("--blocks", type=int, default=defaults.blocks, help="residual blocks per realnvp s/t network")
    p.add_argument("--coupling", choices=("affine", "additive"), default=defaults.coupling, help="glow")
    p.add_argument("--n-bits", type=int, default=defaults.n_bits, help="quantise 8-bit images to fewer bits")
    p.add_argument("--image-size", type=int, help="resize a folder's images to this size")
    p.add_argument("--test-fraction", type=float, default=defaults.test_fraction,
                   help="held out for evaluation (digits, folders, .npz)")
    p.add_argument("--out", help="run folder; default runs/<model>-<data>")
    p.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every)
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint, with its configuration (only --steps, "
                        "--backend, --device, --data-dir, --check-reconstruction and the output, checkpoint, "
                        "sampling and progress options may change)")
    p.add_argument("--overwrite", action="store_true", help="start again in an --out that holds a run")
    p.add_argument("--sample", action="store_true", help="write PNG samples at the end")
    p.add_argument("--temperatures", type=float, nargs="+", default=defaults.temperatures)
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "warmup", "depth", "hidden", "checkpoint_every"):
        if getattr(args, name) < (0 if name == "steps" else 1):
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    resume, overwrite = args.resume, args.overwrite
    del args.resume, args.overwrite
    cfg = Config(**vars(args))
    cfg.model = cfg.model or default_model(cfg.data)
    if cfg.out is None:
        cfg.out = os.path.join("runs", f"{cfg.model}-{os.path.basename(os.path.normpath(cfg.data))}")
    return cfg, resume, overwrite


def main(argv=None):
    cfg, resume, overwrite = parse_args(argv)
    try:
        try:
            run = Run(cfg, resume=resume, overwrite=overwrite)
        except (ValueError, BackendUnavailable, FileNotFoundError, FileExistsError) as error:  # configuration, data
            print(f"flowkern.train: {error}", file=sys.stderr)
            return 2
        try:
            metrics = run.train()
        except NonFiniteLoss as error:
            print(f"flowkern.train: {error}", file=sys.stderr)
            return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(metrics, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
