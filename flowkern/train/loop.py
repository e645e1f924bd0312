"""The training loop of one process: ``Run(parse_args(argv)).train()``."""
import collections
import json
import math
import os
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..backends import AUTO, auto_choices, get_backend, pin_auto_choices, set_backend
from ..nn import ActNorm
from .building import build_model, load_data, resolve_defaults
from .folder import (CHECKPOINT, LOG, FolderLock, Interrupted, NonFiniteLoss, StopRequest, check_folder,
                     create_folder, dump_json, open_log, read_checkpoint, read_log, save_checkpoint, sync, writing)
from .options import PRECISIONS, Command, resumed_config
from .outputs import evaluate, write_samples


# float16 steps the gradient scaler may skip in a row (overflowing gradients) before the run stops
MAX_SKIPPED = 20
# steps between reads of the losses from the device (also at every checkpoint, evaluation and sample file):
# the steps in between run with no host synchronisation
READ_EVERY = 20


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


class Run:
    """One process's part of a training run: ``Run(parse_args(argv)).train()`` trains, evaluates, samples,
    and returns the final metrics. Every check of the configuration and the data happens here, before
    anything is written."""

    def __init__(self, command: Command):
        self.lock = None  # the lead process holds the run folder's lock from here to the end of the run
        try:
            self._start(command)
        except BaseException:
            self.close()  # a refused run leaves the folder free at once
            raise

    def _start(self, command):
        cfg = command.cfg
        self.rank, self.world, self.device = _start_processes(cfg.device)
        if self.lead and os.path.isdir(cfg.out):
            self.lock = FolderLock(cfg.out)
        check_folder(cfg.out, command.resume, command.overwrite)
        state = None
        if command.resume:
            path = os.path.join(cfg.out, CHECKPOINT)
            state = read_checkpoint(path, self.device)
            cfg = resumed_config(state["config"], {**command.given, "out": cfg.out}, source=path)
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
        if cfg.compile:
            self.objective = torch.compile(self.objective, mode=cfg.compile)
        self.optimizer = adam(self.model.parameters(), cfg.lr)
        self.autocast_dtype = PRECISIONS[cfg.precision]
        self.scaler = gradient_scaler(self.device, cfg.precision)
        self.skipped = 0  # consecutive steps the gradient scaler skipped
        self.step, self.resumed, self.stopping = 0, state is not None, False
        if self.resumed:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.step = state["step"]
            if "scaler" in state:
                self.scaler.load_state_dict(state["scaler"])
        self.dims = math.prod(self.data.train.shape[1:])
        self.recent = collections.deque(maxlen=100)  # the last steps' losses
        if self.lead:
            create_folder(cfg.out)
            if self.lock is None:  # a new folder: another run may have made it since the first check
                self.lock = FolderLock(cfg.out)
                check_folder(cfg.out, command.resume, command.overwrite)

    def close(self):
        """Release the run folder (the end of the process releases it too)."""
        if self.lock is not None:
            self.lock.release()

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
        """Train to ``--steps``, evaluate, sample, write ``metrics.json``; the run folder is released at the end.
        A non-finite loss or evaluation raises :class:`NonFiniteLoss`, a file that cannot be written
        :class:`WriteFailed`; the last checkpoint is kept either way."""
        try:
            return self._train()
        finally:
            self.close()

    def _train(self) -> dict:
        cfg = self.cfg
        if self.lead:
            dump_json(os.path.join(cfg.out, "config.json"), asdict(cfg))
        start, began = self.step, time.perf_counter()
        self._loop()
        seconds = time.perf_counter() - began
        metrics = {"model": cfg.model, "data": self.data.name, "steps": self.step, "processes": self.world,
                   "global_batch_size": cfg.batch_size * self.world,
                   "memory_saving": cfg.memory_saving, "precision": cfg.precision, "compile": cfg.compile,
                   "replica_max_abs_difference": self.replica_difference()}
        if self.step > start:  # what this invocation trained (a resumed run may only evaluate and sample)
            metrics.update(train_seconds=round(seconds, 2), steps_per_second=round((self.step - start) / seconds, 3),
                           train_bits_per_dim=float(np.mean(self.recent)))
        if self.lead:
            metrics["test_bits_per_dim"] = self._evaluate()
            if self.model.last_divergence is not None:  # a continuous flow's trace and solve
                metrics.update(test_divergence=self.model.last_divergence, test_nfe=self.model.nfe)
            if self.data.images:
                metrics["uniform_bits_per_dim"] = math.log2(self.data.n_bins)
            if cfg.sample:
                with writing(cfg.out):
                    metrics["samples"] = write_samples(self.model, self.data, self.cfg, self.device)
            metrics["backend"] = self.backends()
            path = os.path.join(cfg.out, "metrics.json")
            if self.resumed and os.path.isfile(path):  # keep what earlier invocations measured
                try:
                    with open(path) as f:
                        earlier = json.load(f)
                except (OSError, ValueError):
                    earlier = None
                metrics = {**earlier, **metrics} if isinstance(earlier, dict) else metrics
            dump_json(path, metrics)
        _barrier(self.world)
        return metrics

    def _batch(self, step):
        """This process's share of the batch of ``step``, on the run's device."""
        return self.data.batch(step, self.cfg.batch_size, self.cfg.seed, self.rank, self.world).to(self.device)

    def _autocast(self):
        """The forward's precision: ``torch.autocast`` in the ``--precision`` dtype, or off for fp32."""
        return torch.autocast(self.device.type, self.autocast_dtype, enabled=self.autocast_dtype is not None)

    def _initialize(self, step):
        """ActNorm's data-dependent initialisation by an eager forward of the batch of ``step``, the one the
        first training step would initialise from: compiled, the loss then traces as one graph, where an
        uninitialised ActNorm would break it and compile the initialising pass besides."""
        if not any(m.will_initialize() for m in self.model.modules() if isinstance(m, ActNorm)):
            return
        with torch.no_grad(), self._autocast():
            self.model.log_prob(self._batch(step))

    def _evaluate(self):
        """The test set's bits/dim; a non-finite one is an error, never a result."""
        value = evaluate(self.model, self.data, self.device)
        if not math.isfinite(value):
            raise NonFiniteLoss(f"the test set's bits/dim is {value} after step {self.step}: the model of "
                                f"{os.path.join(self.cfg.out, CHECKPOINT)} gives no finite likelihood there. "
                                "Lower --lr, lengthen --warmup or lower --clip, then start again with --overwrite")
        return value

    def _loop(self):
        cfg = self.cfg
        if self.step >= cfg.steps:  # nothing to train: the log stays exactly as it is
            return
        if cfg.compile:
            self._initialize(self.step)
        log = None
        if self.lead:
            records = read_log(os.path.join(cfg.out, LOG), self.step)
            self.recent.extend(r["bits_per_dim"] for r in records)  # train_bits_per_dim spans a resume
            log = open_log(os.path.join(cfg.out, LOG), records)
        bar = _progress(range(self.step, cfg.steps), self.step, cfg.steps, cfg.progress and self.lead)
        last_saved, pending = self.step, []
        try:
            with StopRequest() as stop:
                for step in bar:
                    pending.append(self._train_step(step))
                    checkpoint = self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps
                    evaluation = self.lead and cfg.eval_every and self.step % cfg.eval_every == 0
                    samples = self.lead and cfg.sample_every and self.step % cfg.sample_every == 0
                    asked = self.world == 1 and stop.requested  # several processes agree at the next read
                    if not (checkpoint or evaluation or samples or asked or self.step % READ_EVERY == 0):
                        continue
                    records, failure = self._read(pending, stop.requested, last_saved)
                    pending = []
                    if evaluation and failure is None:
                        records[-1]["test_bits_per_dim"] = self._evaluate()
                    if log is not None:
                        with writing(log.name):
                            log.writelines(json.dumps(r, allow_nan=False) + "\n" for r in records)
                    if failure is not None:  # the steps before it are logged; none after it is checkpointed
                        raise failure
                    last = records[-1]
                    bar.set_postfix(nll=f"{last['bits_per_dim'] * self.dims * math.log(2):.2f}",
                                    bpd=f"{last['bits_per_dim']:.3f}", lr=f"{last['lr']:.1e}", refresh=False)
                    if checkpoint or self.stopping:
                        self._check_parameters(last_saved)
                        if log is not None:
                            with writing(log.name):
                                sync(log)  # every line before a checkpoint is on disk before the checkpoint
                        self.save()
                        last_saved = self.step
                    if samples:
                        with writing(cfg.out):
                            write_samples(self.model, self.data, self.cfg, self.device, tag=f"_step{self.step}")
                    if self.stopping:
                        raise Interrupted(f"interrupted: stopped after step {self.step} and saved "
                                          f"{os.path.join(cfg.out, CHECKPOINT)}; --resume continues")
        finally:
            if log is not None:
                log.close()
            bar.close()

    def _train_step(self, step) -> dict:
        """One optimiser step, with no host synchronisation: returns its record with the loss, the total loss
        and the gradient norm as device tensors, read by :meth:`_read`, which finds a non-finite step (no
        checkpoint is written before that read; float16 steps whose gradients overflowed were skipped on the
        device by the gradient scaler, as is any step whose gradients are not finite)."""
        cfg = self.cfg
        lr = self.learning_rate(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x = self._batch(step)
        evaluations = self.model.evaluations  # a continuous flow's count of its network's calls
        with self._autocast():
            loss = batch_loss(self.objective, x, step)
        regularization = self.model.regularization()
        total = loss + regularization
        record = {"step": step, "lr": lr, "bits_per_dim": loss.detach(), "total": total.detach()}
        if torch.is_tensor(regularization):
            record["regularization"] = regularization.detach()
        if evaluations is not None:
            record["nfe_forward"] = self.model.evaluations - evaluations
        if self.model.checks_loss_before_backward and not self._finite_on_every_process(total):
            record["grad_norm"] = torch.full((), float("nan"))  # no backward, no update; the read stops the run
            self.step = step + 1
            return record
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if evaluations is not None:
            record["nfe_backward"] = self.model.evaluations - evaluations - record["nfe_forward"]
        self.scaler.unscale_(self.optimizer)
        record["grad_norm"] = nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step = step + 1
        return record

    def _finite_on_every_process(self, total):
        """Whether the loss ``total`` is finite on every process (a host read)."""
        flag = (~torch.isfinite(total.detach())).double().reshape(1)
        if self.world > 1:
            dist.all_reduce(flag)
        return flag.item() == 0

    def _read(self, pending, stop_requested, last_saved):
        """``(records, failure)``: the records of the steps since the last read as numbers, from one transfer
        from the device for all of them (under torchrun the losses averaged over processes, which also agree
        whether to stop). At a non-finite loss, or a non-finite gradient norm the float16 scaler may not
        skip, the records stop before that step and ``failure`` is the :class:`NonFiniteLoss` naming it
        (else None)."""
        names = ("bits_per_dim", "total", "grad_norm", "regularization")
        values = torch.stack([r[name].detach().double().reshape(()) for r in pending for name in names if name in r])
        if self.world > 1:
            both = torch.cat([values / self.world, values.new_tensor([float(stop_requested)])])
            dist.all_reduce(both)
            values, stop_requested = both[:-1], both[-1].item() > 0
        values = iter(values.tolist())
        records = []
        for r in pending:
            record = {**r, **{name: next(values) for name in names if name in r}}
            step, total, grad_norm = record["step"], record.pop("total"), record["grad_norm"]
            if not math.isfinite(total):
                return records, NonFiniteLoss(self._stop_message(step, "loss", record["bits_per_dim"], last_saved))
            if not math.isfinite(grad_norm):
                if self.cfg.precision != "fp16" or self.skipped >= MAX_SKIPPED:
                    return records, NonFiniteLoss(self._stop_message(step, "gradient norm", grad_norm, last_saved))
                self.skipped += 1  # float16 gradients overflowed: the scaler skipped this step and scaled down
                record.update(grad_norm=None, skipped=True)  # the log is strict JSON
            else:
                self.skipped = 0
            self.recent.append(record["bits_per_dim"])
            records.append(record)
        self.stopping = stop_requested
        return records, None

    def _check_parameters(self, last_saved):
        """Before a checkpoint: the parameters must be finite and give a finite loss on the next step's batch
        (the one training would take next), so that a checkpoint never holds a diverged model. The check
        draws from forked random streams: training goes on exactly as without it."""
        loss = None
        finite = bool(torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all())
        if finite:
            devices = [self.device] if self.device.type == "cuda" else []
            with torch.no_grad(), torch.random.fork_rng(devices=devices), self._autocast():
                loss = self.model.bits_per_dim(self._batch(self.step), self.data.n_bins).mean()
            finite = bool(torch.isfinite(loss))
        if self.world > 1:  # every process stops, or none: each judged its own share of the batch
            flag = torch.tensor([float(not finite)], device=self.device)
            dist.all_reduce(flag)
            finite = flag.item() == 0
        if not finite:
            what = ("the parameters are not finite" if loss is None else
                    f"the loss of the next batch is {loss.item()}" if not torch.isfinite(loss) else
                    "another process's loss of the next batch is not finite")
            raise NonFiniteLoss(f"after step {self.step} {what}: training stopped, and that model is not "
                                f"checkpointed; {self._advice(last_saved)}")

    def _advice(self, last_saved):
        advice = "Lower --lr, lengthen --warmup or lower --clip"
        if last_saved > 0:
            return (f"the last good checkpoint is {os.path.join(self.cfg.out, CHECKPOINT)} (step {last_saved}). "
                    f"{advice}, then --resume: they take effect from that step")
        return f"this is before its first checkpoint. {advice}, then start again with --overwrite"

    def _stop_message(self, step, what, value, last_saved):
        return f"the {what} is {value} at step {step}: training stopped; {self._advice(last_saved)}"

    def save(self):
        if not self.lead:
            return
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step,
                 "config": asdict(self.cfg), "data_shape": list(self.data.train.shape[1:]),
                 "n_bins": self.data.n_bins, "backend": self.backends()}
        if self.cfg.precision == "fp16":
            state["scaler"] = self.scaler.state_dict()
        save_checkpoint(self.cfg.out, state)

    def replica_difference(self):
        """Largest difference of any parameter or buffer between processes (0.0 for one process)."""
        if self.world == 1:
            return 0.0
        flat = torch.cat([t.detach().double().flatten() for t in self.model.state_dict().values()])
        high, low = flat.clone(), flat.clone()
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        return (high - low).max().item()


def gradient_scaler(device, precision):
    """The gradient scaler of a run: float16's loss scaling, or else a scale of 1 (exact) that never grows, kept
    for its other half: a step whose gradients are not finite is skipped on the device (fused Adam takes the
    scaler's flag), so that the parameters stay finite until the next read of the losses stops the run."""
    if precision == "fp16":
        return torch.amp.GradScaler(device.type)
    return torch.amp.GradScaler(device.type, init_scale=1.0, growth_interval=2 ** 31 - 1)


def _start_processes(device):
    """(rank, world size, device) for this process; joins the process group that torchrun set up."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this torch sees no CUDA device")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
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
