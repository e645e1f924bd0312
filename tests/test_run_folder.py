"""The run folder as a hostile or careless user meets it: two runs on one folder, damaged logs and
checkpoints, divergence, non-finite results, writes that fail mid-run, and outputs that would become data."""
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
from flowkern.train.folder import FolderLock
from test_train import ROOT, TINY, read_log, run


def strict_json(path):
    """The JSON value in ``path``; NaN, Infinity or a torn file fail the test."""
    def refuse(name):
        raise AssertionError(f"{path} is not strict JSON: it holds {name}")
    with open(path) as f:
        return json.load(f, parse_constant=refuse)


def last_line(capsys):
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return lines[-1]


# ------------------------------------------------------------------------------------- one run at a time


def test_a_second_run_on_a_folder_in_use_is_refused(tmp_path, capsys):
    lock = FolderLock(tmp_path)  # what a running run holds
    for args in ([], ["--overwrite"]):
        assert run(tmp_path, "--steps", "2", *args) == 2
        assert "another run is using this folder" in last_line(capsys)
    assert os.listdir(tmp_path) == []
    lock.release()
    assert run(tmp_path, "--steps", "2", "--no-sample") == 0
    assert run(tmp_path, "--steps", "4", "--resume", "--no-sample") == 0  # each run released the folder


@pytest.mark.slow
def test_two_runs_started_at_once_on_one_folder(tmp_path):
    """Two processes race for one --out: one trains, the other is refused with one line; the folder holds one
    consistent run."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "flowkern.train", *TINY, "--steps", "30", "--checkpoint-every", "2",
               "--no-sample", "--backend", "reference", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": ROOT}
    processes = [subprocess.Popen(command, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
                 for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in processes]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refusal = next(err for code, err in results if code == 2).strip().splitlines()
    assert len(refusal) == 1 and ("another run is using this folder" in refusal[0] or "holds a run" in refusal[0])
    assert [r["step"] for r in read_log(out)] == list(range(30))
    assert torch.load(out / train.CHECKPOINT, weights_only=True)["step"] == 30
    assert strict_json(out / "metrics.json")["steps"] == 30
    assert not [name for name in os.listdir(out) if name.endswith(".tmp")]


# ----------------------------------------------------------------------------------------------- the log


def test_a_damaged_line_in_the_middle_of_the_log_is_skipped_not_the_rest(tmp_path, capsys):
    assert run(tmp_path, "--steps", "20", "--checkpoint-every", "20", "--no-sample") == 0
    with open(tmp_path / train.LOG) as f:
        lines = f.readlines()
    lines[4] = lines[4][:17] + "\n"  # torn
    lines[9] = "null\n"
    damaged = "".join(lines)
    (tmp_path / train.LOG).write_text(damaged)
    assert run(tmp_path, "--resume", "--no-sample") == 0  # nothing to train: the log is left as it is
    assert (tmp_path / train.LOG).read_text() == damaged
    capsys.readouterr()
    assert run(tmp_path, "--resume", "--steps", "22", "--no-sample") == 0
    err = capsys.readouterr().err
    assert "log.jsonl line 5 is not a step's record" in err and "log.jsonl line 10 is not a step's record" in err
    steps = [r["step"] for r in read_log(tmp_path)]
    assert steps == [s for s in range(22) if s not in (4, 9)]


@pytest.mark.parametrize("tail", ['{"step": 6, "bits_per', '{"step": 6, "bits_per_dim": 5.0}', "\0\0\0\0",
                                  '{"step": 7, "bits_per_dim": 5.0}\n{"st'])
def test_what_a_killed_run_left_after_its_checkpoint_is_replaced_on_resume(tmp_path, tail):
    # a kill mid-write leaves a line without its end (or a filesystem's zeros); lines of steps after the
    # checkpoint are written again by the resumed run
    assert run(tmp_path, "--steps", "6", "--no-sample") == 0
    logged = (tmp_path / train.LOG).read_text()
    with open(tmp_path / train.LOG, "a") as f:
        f.write(tail)
    assert run(tmp_path, "--resume", "--steps", "8", "--no-sample") == 0
    text = (tmp_path / train.LOG).read_text()
    assert text.startswith(logged) and text.endswith("\n")
    assert [r["step"] for r in read_log(tmp_path)] == list(range(8))
    assert all(r["bits_per_dim"] != 5.0 for r in read_log(tmp_path))


def test_train_bits_per_dim_spans_a_resume(tmp_path):
    assert run(tmp_path, "--steps", "6", "--no-sample") == 0
    assert run(tmp_path, "--resume", "--steps", "9", "--no-sample") == 0
    losses = [r["bits_per_dim"] for r in read_log(tmp_path)]
    assert len(losses) == 9
    assert strict_json(tmp_path / "metrics.json")["train_bits_per_dim"] == pytest.approx(np.mean(losses), rel=1e-12)


# -------------------------------------------------------------------------------- divergence and results


def test_a_diverged_model_is_never_checkpointed_nor_reported(tmp_path, capsys):
    assert run(tmp_path, "--steps", "1", "--lr", "10", "--warmup", "0") == 1
    message = last_line(capsys)
    assert "after step 1 the loss of the next batch is" in message and "before its first checkpoint" in message
    assert not (tmp_path / train.CHECKPOINT).exists() and not (tmp_path / "metrics.json").exists()
    assert not list(tmp_path.glob("*.png"))
    for line in (tmp_path / train.LOG).read_text().splitlines():
        json.loads(line, parse_constant=lambda name: pytest.fail(f"the log holds {name}"))


def test_the_last_good_checkpoint_is_good(tmp_path, capsys):
    """A run that diverges after some checkpoints: the one its message names gives finite losses, and a
    resume from it with a lower --lr trains."""
    out = tmp_path / "run"
    assert run(out, "--steps", "40", "--lr", "3", "--warmup", "20", "--checkpoint-every", "1", "--no-sample") == 1
    message = last_line(capsys)
    assert "the last good checkpoint is" in message, message
    saved = torch.load(out / train.CHECKPOINT, weights_only=True)["step"]
    assert f"(step {saved})" in message
    loaded = flowkern.load_run(out)
    x = flowkern.data.dequantize(flowkern.data.load_digits()[0][:64], 17)
    assert torch.isfinite(loaded.model.bits_per_dim(x, 17)).all()
    assert run(out, "--resume", "--steps", str(saved + 3), "--lr", "1e-5", "--no-sample") == 0
    metrics = strict_json(out / "metrics.json")
    assert math.isfinite(metrics["test_bits_per_dim"]) and metrics["steps"] == saved + 3


def test_every_json_file_a_run_writes_is_strict(tmp_path):
    assert run(tmp_path, "--steps", "3", "--eval-every", "1", "--no-sample") == 0
    for name in ("config.json", "metrics.json"):
        strict_json(tmp_path / name)
    for line in (tmp_path / train.LOG).read_text().splitlines():
        json.loads(line, parse_constant=lambda name: pytest.fail(f"the log holds {name}"))


def test_a_write_that_fails_mid_run_is_one_line_and_keeps_the_checkpoint(tmp_path, capsys, monkeypatch):
    # as torch.save fails when the folder has become read-only (a root user is not stopped by the mode bits)
    save, calls = torch.save, []

    def failing_save(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise RuntimeError(f"File {path} cannot be opened.")
        return save(obj, path, *args, **kwargs)
    monkeypatch.setattr(torch, "save", failing_save)
    assert run(tmp_path, "--steps", "6", "--checkpoint-every", "2", "--no-sample") == 1
    message = last_line(capsys)
    assert message.startswith(f"flowkern.train: cannot write {tmp_path / train.CHECKPOINT}") and "training stopped" in message
    monkeypatch.undo()
    assert torch.load(tmp_path / train.CHECKPOINT, weights_only=True)["step"] == 2
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]
    assert run(tmp_path, "--resume", "--no-sample") == 0


# ------------------------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    assert run(out, "--steps", "2", "--no-sample") == 0
    return out, torch.load(out / train.CHECKPOINT, weights_only=True)


def _damaged(state):
    return {key: value for key, value in state.items() if key != "data_shape"}


@pytest.mark.parametrize("damage, expected", [
    (lambda path, state: path.write_bytes(path.read_bytes()[:1000]), "not a readable checkpoint"),
    (lambda path, state: path.write_bytes(b""), "not a readable checkpoint"),
    (lambda path, state: path.write_text("hello"), "not a readable checkpoint"),
    (lambda path, state: torch.save([1, 2], path), "not a flowkern checkpoint"),
    (lambda path, state: torch.save({**state, "format": 99}, path), "checkpoint format 99"),
    (lambda path, state: torch.save({k: v for k, v in state.items() if k != "model"}, path), "it lacks model"),
    (lambda path, state: torch.save({**state, "config": {**state["config"], "model": "glow2"}}, path),
     "model = 'glow2', expected one of glow, realnvp"),
    (lambda path, state: torch.save({**state, "config": {**state["config"], "hidden": 10 ** 9}}, path),
     "hidden = 1000000000, expected from 1 to 4096"),
    (lambda path, state: torch.save({**state, "config": {**state["config"], "depth": 10 ** 6}}, path),
     "depth = 1000000, expected from 1 to 256"),
    (lambda path, state: torch.save({**state, "config": {**state["config"], "hidden": "64"}}, path),
     "hidden = '64', expected a value of type int"),
    (lambda path, state: torch.save({**state, "step": "2"}, path), "damaged checkpoint"),
])
def test_a_damaged_checkpoint_is_refused_naming_its_file(tmp_path, capsys, trained, damage, expected):
    source, state = trained
    out = tmp_path / "run"
    out.mkdir()
    for name in (train.CHECKPOINT, train.LOG):
        (out / name).write_bytes((source / name).read_bytes())
    damage(out / train.CHECKPOINT, state)
    before = sorted(os.listdir(out))
    with pytest.raises(ValueError, match=expected) as error:
        flowkern.load_run(out)
    assert str(out / train.CHECKPOINT) in str(error.value)
    assert run(out, "--resume", "--steps", "4") == 2
    message = last_line(capsys)
    assert str(out / train.CHECKPOINT) in message and expected.split(",")[0] in message
    assert sorted(os.listdir(out)) == before  # nothing written


def test_load_run_never_reads_data(tmp_path, trained):
    """A checkpoint without the data's shape is refused: rebuilding the data would read (and unpickle) files."""
    source, state = trained
    torch.save(_damaged(state), tmp_path / train.CHECKPOINT)
    with pytest.raises(ValueError, match="it lacks data_shape"):
        flowkern.load_run(tmp_path)


# ------------------------------------------------------------------------------ outputs that become data


def _image_folder(path, n=6):
    path.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(np.random.randint(0, 256, (8, 8, 3), np.uint8)).save(path / f"{i}.png")


def test_an_out_inside_the_data_folder_is_refused(tmp_path, capsys, monkeypatch):
    data = tmp_path / "images"
    _image_folder(data)
    for out in (data / "run", data):
        assert run(out, "--data", str(data), "--steps", "1") == 2
        assert "is inside --data" in last_line(capsys)
    monkeypatch.chdir(data)  # --data . and the default --out, runs/glow-., inside it
    assert train.main([*TINY, "--data", ".", "--steps", "1"]) == 2
    assert "is inside --data ." in last_line(capsys)
    assert sorted(os.listdir(data)) == [f"{i}.png" for i in range(6)]


def test_a_run_folder_under_the_data_is_not_data(tmp_path):
    data = tmp_path / "images"
    _image_folder(data)
    elsewhere = tmp_path / "run"
    assert run(elsewhere, "--data", str(data), "--steps", "2", "--batch-size", "4", "--temperatures", "1") == 0
    os.rename(elsewhere, data / "old-run")  # a run folder moved under the images, samples and all
    assert list((data / "old-run").glob("*.png"))
    assert len(flowkern.data.image_files(data)) == 6


def test_the_largest_seed_trains(tmp_path):
    """The per-step seed arithmetic wraps instead of overflowing for any seed the command line takes."""
    assert run(tmp_path, "--steps", "1", "--seed", str(2 ** 63 - 1), "--no-sample") == 0
    assert strict_json(tmp_path / "config.json")["seed"] == 2 ** 63 - 1


@pytest.mark.parametrize("args", [[], ["--model", "ffjord", "--data", "moons", "--hidden", "8"]],
                         ids=["glow", "ffjord"])
def test_a_non_finite_step_leaves_the_parameters_finite(tmp_path, capsys, monkeypatch, args):
    """The losses are read every few steps; a step whose loss (so gradients) is not finite is skipped on the
    device, so the steps up to the read keep finite parameters (an ODE solve with NaN parameters would fail)."""
    loss_of = train.loop.batch_loss
    poisoned_at = []

    def poisoned(objective, x, step):
        loss = loss_of(objective, x, step)
        if step >= 3:
            poisoned_at.append(step)
            return loss * float("nan")
        return loss
    monkeypatch.setattr(train.loop, "batch_loss", poisoned)
    tiny = TINY[2:] if args else TINY  # ffjord's default depth
    out = tmp_path / "run"
    assert train.main([*tiny, "--out", str(out), "--steps", "12", "--checkpoint-every", "10", "--no-sample",
                       *args]) == 1
    message = last_line(capsys)
    assert "the loss is nan at step 3" in message and "before its first checkpoint" in message
    assert poisoned_at == list(range(3, 10))  # trained on to the read at step 10, with finite parameters
    assert [r["step"] for r in read_log(out)] == [0, 1, 2] and not (out / train.CHECKPOINT).exists()
