"""`python -m flowkern.train`: training runs, resuming, stopping on a non-finite loss, sampling, and
two processes under torchrun."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import flowkern
import flowkern.train as train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--depth", "2", "--hidden", "16", "--batch-size", "32", "--warmup", "5", "--no-progress"]


def run(out, *args):
    return train.main([*TINY, "--out", str(out), *args])


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def read_metrics(out):
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)


def test_defaults_train_glow_on_digits():
    command = train.parse_args([])
    cfg = command.cfg
    assert (cfg.model, cfg.data, cfg.out) == ("glow", "digits", os.path.join("runs", "glow-digits"))
    assert not command.resume and not command.overwrite and command.given == {} and cfg.sample
    assert train.parse_args(["--data", "moons"]).cfg.model == "realnvp2d"


def test_glow_on_digits_learns_and_writes_its_run(tmp_path):
    assert run(tmp_path, "--steps", "40", "--sample", "--temperatures", "0.5", "1") == 0
    losses = [line["bits_per_dim"] for line in read_log(tmp_path)]
    assert len(losses) == 40 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) < sum(losses[:5]) - 5 * 0.3, losses
    metrics = read_metrics(tmp_path)
    assert metrics["steps"] == 40 and metrics["uniform_bits_per_dim"] == pytest.approx(math.log2(17))
    assert metrics["test_bits_per_dim"] < metrics["uniform_bits_per_dim"]
    ran = set(flowkern.available_backends())  # under "auto": what it chose for each op a Glow step calls
    assert {"coupling_forward", "coupling_inverse", "conv1x1"} <= set(metrics["backend"]) and set(
        metrics["backend"].values()) <= ran
    for name in ("samples_t0.5.png", "samples_t1.png"):
        with Image.open(tmp_path / name) as image:
            assert image.mode == "L" and image.width == image.height >= 8 * 9
    state = torch.load(tmp_path / train.CHECKPOINT, weights_only=True)
    assert state["step"] == 40 and state["config"]["model"] == "glow" and "optimizer" in state


def test_resume_continues_as_if_uninterrupted(tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert run(whole, "--steps", "10") == 0
    assert run(parts, "--steps", "6", "--checkpoint-every", "3") == 0
    assert run(parts, "--steps", "6") == 2  # a run folder is never silently overwritten
    assert run(parts, "--steps", "10", "--resume") == 0
    assert [line["step"] for line in read_log(parts)] == list(range(10))
    assert read_log(parts) == read_log(whole)
    a, b = (torch.load(path / train.CHECKPOINT, weights_only=True)["model"] for path in (whole, parts))
    assert all(torch.equal(a[k], b[k]) for k in a)
    trained = read_metrics(parts)
    assert run(parts, "--steps", "10", "--resume", "--sample", "--temperatures", "0.7") == 0  # evaluate, sample
    metrics = read_metrics(parts)
    assert metrics["samples"] == ["samples_t0.7.png"] and (parts / "samples_t0.7.png").is_file()
    for key in ("steps", "train_seconds", "steps_per_second", "train_bits_per_dim", "test_bits_per_dim"):
        assert metrics[key] == trained[key], key


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    loss_of = train.loop.batch_loss

    def poisoned(objective, x, step):
        loss = loss_of(objective, x, step)
        return loss * float("nan") if step == 7 else loss

    monkeypatch.setattr(train.loop, "batch_loss", poisoned)
    assert run(tmp_path, "--steps", "20", "--checkpoint-every", "5") == 1
    message = capsys.readouterr().err
    assert "loss is nan at step 7" in message and "(step 5)" in message
    assert torch.load(tmp_path / train.CHECKPOINT, weights_only=True)["step"] == 5
    assert [line["step"] for line in read_log(tmp_path)] == list(range(7))


def test_memory_saving_trains_like_backpropagation(tmp_path):
    assert run(tmp_path / "standard", "--steps", "4") == 0
    assert run(tmp_path / "inversion", "--steps", "4", "--memory-saving") == 0
    standard, inversion = (read_log(tmp_path / name) for name in ("standard", "inversion"))
    for a, b in zip(standard, inversion):
        assert b["bits_per_dim"] == pytest.approx(a["bits_per_dim"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)


def test_realnvp_on_digits_by_inversion(tmp_path):
    assert train.main(["--model", "realnvp", "--hidden", "16", "--blocks", "1", "--batch-size", "32", "--out",
                       str(tmp_path), "--steps", "3", "--memory-saving", "--check-reconstruction", "1e-3"]) == 0
    metrics = read_metrics(tmp_path)
    assert (metrics["model"], metrics["memory_saving"], metrics["steps"]) == ("realnvp", True, 3)
    assert torch.load(tmp_path / train.CHECKPOINT, weights_only=True)["config"]["check_reconstruction"] == 1e-3


def test_realnvp2d_on_moons_writes_a_density_plot(tmp_path):
    assert run(tmp_path, "--data", "moons", "--steps", "30", "--sample") == 0
    metrics = read_metrics(tmp_path)
    assert metrics["model"] == "realnvp2d" and "uniform_bits_per_dim" not in metrics
    losses = [line["bits_per_dim"] for line in read_log(tmp_path)]
    assert sum(losses[-5:]) < sum(losses[:5])
    with Image.open(tmp_path / "density.png") as image:
        assert image.width > image.height > 100


def test_images_from_a_folder_and_npz(tmp_path):
    rng = torch.Generator().manual_seed(0)
    levels = torch.randint(0, 256, (20, 8, 8, 3), generator=rng, dtype=torch.uint8)
    np.savez(tmp_path / "images.npz", x=levels.numpy())
    cfg = train.Config(data=str(tmp_path / "images.npz"), n_bits=5)
    data = train.load_data(cfg)
    assert data.train.shape == (18, 3, 8, 8) and data.test.shape == (2, 3, 8, 8) and data.n_bins == 32
    assert data.train.max() < 32
    train.resolve_defaults(cfg, data)
    assert (cfg.model, cfg.levels) == ("glow", 2)
    model = train.build_model(cfg, data.train.shape[1:])
    assert model.bits_per_dim(data.batch(0, 4, seed=0), data.n_bins).shape == (4,)


@pytest.mark.parametrize("args, expected", [
    (["--model", "glow", "--data", "moons"], "does not model 2-D points"),
    (["--model", "realnvp2d"], "does not model images"),
    (["--data", "no-such-set"], "expected digits"),
    (["--data", "cifar10"], "--data-dir"),
    (["--resume"], "no checkpoint"),
    (["--backend", "no-such-backend"], "no-such-backend"),
    *([] if torch.cuda.is_available() else [(["--device", "cuda"], "no CUDA device")]),
])
def test_bad_configurations_are_refused_with_a_message(tmp_path, capsys, monkeypatch, args, expected):
    monkeypatch.delenv("CIFAR10_DIR", raising=False)
    assert run(tmp_path / "run", *args) == 2
    assert expected in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("mode", [[], ["--memory-saving"]], ids=["backprop", "memory-saving"])
def test_two_processes_stay_identical_and_learn(tmp_path, mode):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "flowkern.train", *TINY, "--batch-size", "16", "--steps", "30", "--out", str(tmp_path), *mode]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = read_metrics(tmp_path)
    assert metrics["processes"] == 2 and metrics["global_batch_size"] == 32
    # ActNorm initialised from each process's own data (statistics all-reduced), then DDP steps:
    # every parameter and buffer equal across the processes
    assert metrics["replica_max_abs_difference"] == 0.0
    losses = [line["bits_per_dim"] for line in read_log(tmp_path)]
    assert len(losses) == 30 and sum(losses[-5:]) < sum(losses[:5]) - 5 * 0.3


class _HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ops that copy a value from a tensor to the host (``.item()``, ``bool(t)``): each waits for
    the device to finish everything queued before it."""
    READS = ("_local_scalar_dense", "is_nonzero", "equal")

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.READS:
            self.reads.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("args", [[], ["--model", "realnvp"], ["--data", "moons"], ["--precision", "fp16"],
                                  ["--memory-saving"]], ids=["glow", "realnvp", "realnvp2d", "glow-fp16", "glow-by-inversion"])
def test_a_training_step_reads_nothing_back_from_the_device(tmp_path, args):
    """The model, the loss, its backward, the gradient scaler, clipping and the optimiser run without a host
    synchronisation: the losses are read every READ_EVERY steps, so a step can be captured as one CUDA graph."""
    tiny = TINY[2:] if "realnvp" in args else TINY  # realnvp takes no --depth
    command = train.parse_args([*tiny, "--out", str(tmp_path), "--steps", "10", *args])
    trainer = train.Run(command)
    try:
        trainer._train_step(0)  # ActNorm's data-dependent initialisation reads its batch's statistics
        for step in (1, 2):
            with _HostReads() as mode:
                record = trainer._train_step(step)
            assert mode.reads == [], f"step {step} read back {mode.reads}"
            assert torch.is_tensor(record["bits_per_dim"]) and torch.is_tensor(record["grad_norm"])
        records, failure = trainer._read([trainer._train_step(3)], False, 0)
        assert failure is None and math.isfinite(records[0]["bits_per_dim"])
    finally:
        trainer.close()
