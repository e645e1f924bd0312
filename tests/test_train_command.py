"""`python -m flowkern.train` as a hostile user meets it: every option checked, resume that takes the
changes it may and refuses the rest, a log that survives kill -9, Ctrl-C, bad data, and loading a run back."""
import dataclasses
import json
import math
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import flowkern
import flowkern.train as train
from test_train import ROOT, TINY, read_log, read_metrics, run


def refused(capsys, out, *args):
    """Run the command; assert it exits with 2, one line on stderr, nothing written. Returns that line."""
    assert run(out, *args) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert not os.path.isdir(out) or not os.listdir(out), "a refused run wrote into its folder"
    return lines[-1]


@pytest.mark.parametrize("args, expected", [
    (["--clip", "-1"], "--clip -1.0: expected a finite number above 0"),
    (["--clip", "0"], "--clip 0.0: expected a finite number above 0"),
    (["--lr", "nan"], "--lr nan: expected a finite number above 0"),
    (["--n-bits", "9", "--data", "X.npz"], "--n-bits 9: expected from 1 to 8"),
    (["--temperatures", "0.7", "-1"], "--temperatures 0.7 -1.0: expected finite numbers above 0"),
    (["--test-fraction", "1"], "--test-fraction 1.0: expected between 0 and 1"),
    (["--steps", "-3"], "--steps -3: expected from 1 to 1000000000"),
    (["--steps", "0"], "--steps 0: expected from 1"),  # a run of no steps would leave no checkpoint
    (["--seed", "9223372036854775808"], "--seed 9223372036854775808: expected from 0 to 9223372036854775807"),
    (["--hidden", str(10 ** 9)], "--hidden 1000000000: expected from 1 to 4096"),
    (["--depth", str(10 ** 6)], "--depth 1000000: expected from 1 to 256"),
    (["--device", "mps"], "--device mps: expected cpu, cuda or cuda:N"),
    (["--device", "potato"], "--device potato: expected cpu, cuda or cuda:N"),
    (["--device", "meta"], "--device meta: expected cpu, cuda or cuda:N"),
    (["--n-bits", "5"], "--n-bits does not apply to --model glow --data digits: digits have 17 levels"),
    (["--image-size", "16"], "--image-size does not apply"),
    (["--data", "moons", "--temperatures", "0.5"], "moons is 2-D points, not images"),
    (["--blocks", "3"], "--blocks does not apply to --model glow"),
    (["--coupling", "additive", "--model", "realnvp"], "it applies to glow"),
    (["--check-reconstruction", "1e-3"], "it applies with --memory-saving"),
    (["--data-dir", "/tmp"], "it locates CIFAR-10"),
    (["--resume", "--overwrite"], "pass one"),
    (["--kinetic", "0.1"], "--kinetic does not apply to --model glow"),
    (["--model", "ffjord", "--memory-saving"], "--memory-saving does not apply to --model ffjord"),
    (["--model", "ffjord", "--precision", "bf16"], "--precision does not apply to --model ffjord"),
    (["--model", "ffjord", "--kinetic", "-1"], "--kinetic -1.0: expected a finite number, at least 0"),
    (["--model", "ffjord", "--kinetic", "inf"], "--kinetic inf: expected a finite number, at least 0"),
    (["--model", "ffjord", "--jacobian", "nan"], "--jacobian nan: expected a finite number, at least 0"),
    (["--model", "ffjord", "--solver", "bogus"], "invalid choice: 'bogus'"),
    (["--model", "ffjord", "--tol", "1e-300"], "--tol 1e-300: expected from 1e-08 to 0.1"),
    (["--model", "ffjord", "--divergence", "trace"], "invalid choice"),
    (["--model", "ffjord", "--compile", "default"], "--compile does not apply to --model ffjord"),
    (["--compile", "fast"], "invalid choice"),
    (["--model", "potato"], "invalid choice"),
])
def test_every_bad_option_is_refused_at_parse_time(tmp_path, capsys, args, expected):
    assert expected in refused(capsys, tmp_path / "run", *args)


def test_help_shows_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit) as exit:
        train.parse_args(["--help"])
    assert exit.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for field in dataclasses.fields(train.Config):
        assert train.options._flag(field.name) in text
    assert "--lr LR peak learning rate (default: 0.001)" in text
    assert "--sample, --no-sample" in text and "--eval-every" in text and "--sample-every" in text


def poison_at(monkeypatch, bad_step):
    loss_of = train.loop.batch_loss

    def poisoned(objective, x, step):
        loss = loss_of(objective, x, step)
        return loss * float("nan") if step == bad_step else loss
    monkeypatch.setattr(train.loop, "batch_loss", poisoned)


def test_resume_takes_the_schedule_it_may_change_and_refuses_the_rest(tmp_path, capsys, monkeypatch):
    poison_at(monkeypatch, 7)
    assert run(tmp_path, "--steps", "12", "--checkpoint-every", "5", "--no-sample") == 1
    assert "then --resume" in capsys.readouterr().err
    monkeypatch.undo()
    for args, name in [(["--depth", "3"], "--depth 3"), (["--hidden", "8"], "--hidden 8"),
                       (["--batch-size", "8"], "--batch-size 8"), (["--seed", "4"], "--seed 4")]:
        assert run(tmp_path, "--resume", *args) == 2
        message = capsys.readouterr().err
        assert f"{name}: a resumed run keeps the architecture and data" in message, message
    assert [line["step"] for line in read_log(tmp_path)] == list(range(7))  # refused runs touched nothing

    # the advice of the non-finite-loss message, followed: new learning rate, warm-up and clipping apply
    assert run(tmp_path, "--resume", "--lr", "2e-4", "--warmup", "20", "--clip", "1", "--no-sample") == 0
    log = read_log(tmp_path)
    assert [line["step"] for line in log] == list(range(12))
    for line in log[5:]:
        assert line["lr"] == pytest.approx(2e-4 * (line["step"] + 1) / 20)
    state = torch.load(tmp_path / train.CHECKPOINT, weights_only=True)
    assert state["step"] == 12 and (state["config"]["lr"], state["config"]["clip"]) == (2e-4, 1.0)
    assert state["config"]["depth"] == 2  # what the resumed run did not name comes from the checkpoint


def test_options_that_apply_are_judged_by_the_resumed_runs_model(tmp_path, capsys):
    assert run(tmp_path, "--steps", "2", "--memory-saving", "--no-sample") == 0
    assert run(tmp_path, "--resume", "--steps", "3", "--check-reconstruction", "1e-3", "--no-sample") == 0
    assert read_metrics(tmp_path)["steps"] == 3
    assert run(tmp_path, "--resume", "--steps", "4", "--no-memory-saving", "--check-reconstruction", "1e-3") == 2
    assert "--check-reconstruction does not apply" in capsys.readouterr().err


def test_a_loss_that_fails_before_any_checkpoint_does_not_suggest_resume(tmp_path, capsys, monkeypatch):
    poison_at(monkeypatch, 2)
    assert run(tmp_path, "--steps", "12", "--checkpoint-every", "5") == 1
    message = capsys.readouterr().err
    assert "before its first checkpoint" in message and "--overwrite" in message and "--resume" not in message
    monkeypatch.undo()
    assert "holds a run" in refused_again(capsys, tmp_path)  # a log without a checkpoint is still a run
    assert run(tmp_path, "--resume") == 2 and "stopped before its first checkpoint" in capsys.readouterr().err
    assert run(tmp_path, "--steps", "3", "--overwrite", "--no-sample") == 0
    assert [line["step"] for line in read_log(tmp_path)] == [0, 1, 2]


def refused_again(capsys, out):
    assert run(out, "--steps", "3") == 2
    return capsys.readouterr().err


def test_resume_without_steps_evaluates_and_samples_without_training(tmp_path):
    assert run(tmp_path, "--steps", "6", "--no-sample") == 0
    assert run(tmp_path, "--resume", "--sample", "--temperatures", "0.6") == 0
    assert len(read_log(tmp_path)) == 6 and read_metrics(tmp_path)["steps"] == 6
    assert (tmp_path / "samples_t0.6.png").is_file()


def test_evaluation_and_samples_during_training(tmp_path):
    assert run(tmp_path, "--steps", "6", "--eval-every", "3", "--sample-every", "3", "--temperatures", "0.5") == 0
    log = read_log(tmp_path)
    assert [i for i, line in enumerate(log) if "test_bits_per_dim" in line] == [2, 5]
    assert log[5]["test_bits_per_dim"] == pytest.approx(read_metrics(tmp_path)["test_bits_per_dim"])
    assert {p.name for p in tmp_path.glob("samples_*.png")} == {
        "samples_t0.5_step3.png", "samples_t0.5_step6.png", "samples_t0.5.png"}  # samples by default


def test_ctrl_c_saves_a_checkpoint_and_resume_continues_exactly(tmp_path, monkeypatch, capsys):
    assert run(tmp_path / "whole", "--steps", "10", "--no-sample") == 0
    loss_of = train.loop.batch_loss

    def interrupted(objective, x, step):
        if step == 4:
            os.kill(os.getpid(), signal.SIGINT)
        return loss_of(objective, x, step)
    monkeypatch.setattr(train.loop, "batch_loss", interrupted)
    handler = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN in a background job
    assert run(tmp_path / "parts", "--steps", "10", "--no-sample") == 130
    assert "stopped after step 5 and saved" in capsys.readouterr().err
    assert torch.load(tmp_path / "parts" / train.CHECKPOINT, weights_only=True)["step"] == 5
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGINT) is handler  # the handler is put back
    assert run(tmp_path / "parts", "--resume", "--no-sample") == 0
    assert read_log(tmp_path / "parts") == read_log(tmp_path / "whole")


def test_a_resumed_run_keeps_the_backends_auto_chose(tmp_path, monkeypatch):
    assert run(tmp_path, "--steps", "3", "--no-sample") == 0
    chosen = torch.load(tmp_path / train.CHECKPOINT, weights_only=True)["backend"]
    assert {"coupling_forward", "conv1x1"} <= set(chosen)
    monkeypatch.setattr(flowkern.backends.auto, "_choices", {})  # as in a new process
    monkeypatch.setattr(flowkern.backends.auto, "_measure", None)  # which must not measure again
    assert run(tmp_path, "--resume", "--steps", "5", "--no-sample") == 0
    assert {op: c.backend for (_, op), c in flowkern.backends.auto_choices().items()} == chosen


@pytest.mark.slow
def test_kill_9_at_a_random_moment_loses_no_logged_step_before_the_checkpoint(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    # two processes: a named backend and conditioner form, since "auto" measures in each process and may choose
    # differently
    backend = ["--backend", "native" if "native" in flowkern.available_backends() else "reference",
               "--conditioner-form", "convolutions"]
    assert run(whole, "--steps", "40", "--no-sample", *backend) == 0
    # the same number of threads as this process: the losses must match bit for bit
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONPATH": ROOT}
    longest = 0.5  # seconds after the first checkpoint; halved while the kill lands after the last checkpoint
    for _ in range(6):
        shutil.rmtree(killed, ignore_errors=True)
        process = subprocess.Popen([sys.executable, "-m", "flowkern.train", *TINY, "--steps", "40", "--no-sample",
                                    "--checkpoint-every", "3", "--out", str(killed), *backend], env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while not (killed / train.CHECKPOINT).is_file() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(random.uniform(0, longest))
        process.kill()
        process.wait()
        saved = torch.load(killed / train.CHECKPOINT, weights_only=True)["step"]
        if saved < 40:  # a kill after the last checkpoint leaves nothing for --resume to train
            break
        longest /= 2
    assert 3 <= saved < 40, "the run saved its last checkpoint before it could be killed"
    lines = (killed / train.LOG).read_text().split("\n")  # the last may be torn by the kill
    assert [json.loads(line)["step"] for line in lines[:saved]] == list(range(saved))
    with open(killed / train.LOG, "a") as f:
        f.write('{"step": 39, "bits_per')  # a line torn by the kill is repaired on resume
    assert run(killed, "--resume", "--no-sample") == 0
    assert read_log(killed) == read_log(whole)


def test_bad_data_gets_one_line_and_nothing_written(tmp_path, capsys):
    folder = tmp_path / "images" / "cats"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"not an image at all")
    assert "broken.png: not a readable image" in refused(capsys, tmp_path / "a", "--data", str(tmp_path / "images"))

    np.savez(tmp_path / "one.npz", x=np.zeros((1, 8, 8), np.uint8))
    assert "need at least 2 rows" in refused(capsys, tmp_path / "b", "--data", str(tmp_path / "one.npz"))
    np.savez(tmp_path / "wide.npz", x=np.full((4, 8, 8), 300, np.int64))
    assert "expected levels 0..255, got values from 300 to 300" in refused(
        capsys, tmp_path / "c", "--data", str(tmp_path / "wide.npz"))
    np.savez(tmp_path / "two.npz", a=np.zeros((4, 8, 8), np.uint8), b=np.zeros((4, 8, 8), np.uint8))
    assert "name the images x or images" in refused(capsys, tmp_path / "d", "--data", str(tmp_path / "two.npz"))
    (tmp_path / "random.npz").write_bytes(os.urandom(4096))
    assert "not a readable .npz archive" in refused(capsys, tmp_path / "e", "--data", str(tmp_path / "random.npz"))

    cifar = tmp_path / "cifar-10-batches-py"
    cifar.mkdir()
    batch = {b"data": np.zeros((10000, 3072), np.uint8), b"labels": [0] * 10000}
    for name in flowkern.data.CIFAR10_TRAIN + flowkern.data.CIFAR10_TEST:
        with open(cifar / name, "wb") as f:
            pickle.dump(batch, f)
    with open(cifar / "data_batch_3", "r+b") as f:
        f.truncate(5000)
    assert "data_batch_3: not a batch of the python version of CIFAR-10, or truncated" in refused(
        capsys, tmp_path / "f", "--data", "cifar10", "--data-dir", str(tmp_path), "--steps", "1")
    np.savez(tmp_path / "wide.npz", x=np.zeros((4, 8, 12), np.uint8))
    assert "square images, got 8×12: crop or resize them to a square first" in refused(
        capsys, tmp_path / "g", "--data", str(tmp_path / "wide.npz"))
    (tmp_path / "wide").mkdir()
    for i in range(2):
        Image.fromarray(np.zeros((8, 12), np.uint8)).save(tmp_path / "wide" / f"{i}.png")
    assert "pass --image-size to resize them" in refused(capsys, tmp_path / "h", "--data", str(tmp_path / "wide"))
    (tmp_path / "bomb").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "bomb" / "0.png")
    png = bytearray((tmp_path / "bomb" / "0.png").read_bytes())
    png[16:24] = (30000).to_bytes(4, "big") * 2  # the header claims 30000×30000 pixels
    png[29:33] = zlib.crc32(bytes(png[12:29])).to_bytes(4, "big")
    (tmp_path / "bomb" / "0.png").write_bytes(bytes(png))
    assert "0.png: not a readable image" in refused(capsys, tmp_path / "i", "--data", str(tmp_path / "bomb"))


def test_out_that_cannot_hold_a_run(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert "a file, not a folder" in refused(capsys, tmp_path / "file")
    assert "cannot write there" in refused(capsys, tmp_path / "file" / "run")


def test_a_folder_of_class_subfolders_trains(tmp_path):
    for label in ("a", "b"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(np.random.randint(0, 256, (8, 8), np.uint8)).save(tmp_path / "images" / label / f"{i}.png")
    assert flowkern.data.load_image_folder(tmp_path / "images").shape == (10, 1, 8, 8)  # greyscale stays so
    assert run(tmp_path / "run", "--data", str(tmp_path / "images"), "--steps", "2", "--batch-size", "4",
               "--n-bits", "5", "--no-sample") == 0


def test_load_run_rebuilds_the_trained_model(tmp_path):
    assert run(tmp_path, "--steps", "5", "--no-sample", "--depth", "3") == 0
    loaded = flowkern.load_run(tmp_path)
    assert loaded.step == 5 and loaded.n_bins == 17 and loaded.config.depth == 3 and not loaded.model.training
    data = train.load_data(loaded.config)
    generator = torch.Generator().manual_seed(12345)  # the evaluation's dequantisation noise
    x = data.prepare(data.test, generator)
    with torch.no_grad():
        bits = loaded.model.bits_per_dim(x, loaded.n_bins).double().mean().item()
    assert bits == pytest.approx(read_metrics(tmp_path)["test_bits_per_dim"], rel=1e-6)
    with pytest.raises(FileNotFoundError, match="no checkpoint.pt"):
        train.load_run(tmp_path / "nothing")



@pytest.mark.slow
def test_bfloat16_training_converges_like_float32(tmp_path, capsys):
    """A digits Glow trained 300 steps with its conditioners in bfloat16 reaches the test bits/dim of the
    float32 run with the same seed, to 0.05."""
    results = {}
    for precision in ("fp32", "bf16"):
        assert run(tmp_path / precision, "--steps", "300", "--precision", precision, "--no-sample") == 0
        results[precision] = read_metrics(tmp_path / precision)
        assert results[precision]["precision"] == precision
    assert abs(results["bf16"]["test_bits_per_dim"] - results["fp32"]["test_bits_per_dim"]) < 0.05
    assert results["fp32"]["test_bits_per_dim"] < results["fp32"]["uniform_bits_per_dim"] - 0.5  # it learned


def test_compiled_training_traces_one_graph_and_follows_the_eager_run(tmp_path):
    """--compile: ActNorm is initialised eagerly from the first batch, then the loss and its backward compile
    into one graph with no break, and the run's losses follow the eager run's with the same seed."""
    from torch._dynamo.utils import counters

    assert run(tmp_path / "eager", "--steps", "4", "--no-sample") == 0
    torch._dynamo.reset()
    counters.clear()
    assert run(tmp_path / "compiled", "--steps", "4", "--no-sample", "--compile", "default") == 0
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"], dict(counters["graph_break"])
    eager, compiled = read_log(tmp_path / "eager"), read_log(tmp_path / "compiled")
    assert [r["step"] for r in compiled] == [0, 1, 2, 3]
    # before any update the loss is the same function of the same parameters (eager: ActNorm unfolded)
    assert compiled[0]["bits_per_dim"] == pytest.approx(eager[0]["bits_per_dim"], rel=1e-6)
    # Adam's first steps move every parameter by about lr whatever its gradient's size, so a gradient near
    # zero that rounds to the other sign compiled moves its parameter the other way: 1e-4, not rounding level
    for e, c in zip(eager[1:], compiled[1:]):
        assert c["bits_per_dim"] == pytest.approx(e["bits_per_dim"], rel=1e-4)
    metrics = read_metrics(tmp_path / "compiled")
    assert metrics["compile"] == "default" and read_metrics(tmp_path / "eager")["compile"] is None


def overflow_at(monkeypatch, bad_steps):
    """Losses of ``bad_steps`` finite but so large that, scaled by the gradient scaler, they overflow."""
    loss_of = train.loop.batch_loss

    def huge(objective, x, step):
        loss = loss_of(objective, x, step)
        return loss * 1e36 if step in bad_steps else loss
    monkeypatch.setattr(train.loop, "batch_loss", huge)


def test_float16_training_skips_overflowing_steps_and_resumes_with_its_scaler(tmp_path, monkeypatch, capsys):
    """fp16 runs on the CPU too, with a gradient scaler: a step whose scaled gradients overflow is skipped
    (logged, parameters untouched, the scale halved), the scaler's state is checkpointed and resumed, and
    MAX_SKIPPED + 1 skips in a row stop the run."""
    overflow_at(monkeypatch, {3, 4})
    assert run(tmp_path / "whole", "--steps", "8", "--precision", "fp16", "--no-sample") == 0
    log = read_log(tmp_path / "whole")
    assert [line["step"] for line in log if line.get("skipped")] == [3, 4]
    assert all(math.isfinite(line["grad_norm"]) for line in log if not line.get("skipped"))
    assert read_metrics(tmp_path / "whole")["precision"] == "fp16"
    state = torch.load(tmp_path / "whole" / train.CHECKPOINT, weights_only=True)
    assert state["scaler"]["scale"] == 2.0 ** 16 / 4  # the initial scale, halved at each skip

    assert run(tmp_path / "parts", "--steps", "4", "--precision", "fp16", "--no-sample") == 0
    assert torch.load(tmp_path / "parts" / train.CHECKPOINT, weights_only=True)["scaler"]["scale"] == 2.0 ** 15
    assert run(tmp_path / "parts", "--resume", "--steps", "8", "--no-sample") == 0
    assert read_log(tmp_path / "parts") == log

    monkeypatch.undo()
    overflow_at(monkeypatch, set(range(2, 100)))
    assert run(tmp_path / "stops", "--steps", "40", "--precision", "fp16", "--no-sample") == 1
    assert "the gradient norm is" in capsys.readouterr().err
    assert sum(1 for line in read_log(tmp_path / "stops") if line.get("skipped")) == train.loop.MAX_SKIPPED


def test_ffjord_trains_on_points_and_logs_its_solves(tmp_path):
    """The continuous flow through the same command: regulariser and NFE of forward and adjoint backward in
    the log, the evaluation's trace and NFE in the metrics, a density plot, and the run loads back."""
    out = tmp_path / "run"
    assert run(out, "--model", "ffjord", "--data", "moons", "--steps", "4", "--tol", "1e-4") == 0
    log = read_log(out)
    assert [r["step"] for r in log] == [0, 1, 2, 3]
    assert all(r["nfe_forward"] > 0 and r["nfe_backward"] > 0 and r["regularization"] > 0 for r in log)
    metrics = read_metrics(out)
    assert metrics["model"] == "ffjord" and metrics["test_divergence"] == "exact" and metrics["test_nfe"] > 0
    assert math.isfinite(metrics["test_bits_per_dim"]) and metrics["samples"] == ["density.png"]
    loaded = flowkern.load_run(out)
    assert isinstance(loaded.model, flowkern.FFJORD) and loaded.config.depth == 2


def test_ffjord_models_images_with_the_hutchinson_trace_in_training(tmp_path):
    out = tmp_path / "run"
    assert run(out, "--model", "ffjord", "--data", "digits", "--steps", "2", "--hidden", "8", "--depth", "1",
               "--tol", "1e-3", "--divergence", "hutchinson", "--no-sample") == 0
    assert read_metrics(out)["test_divergence"] == "exact"  # 64 dimensions: evaluation can afford it
    loaded = flowkern.load_run(out)
    assert loaded.model.flow.divergence == "hutchinson" and loaded.model.shape == (1, 8, 8)
