"""The run folder: refusing one that cannot take the run, the log that survives a stop, and checkpoints
written atomically."""
import json
import os
import signal
import sys
import threading

import torch

CHECKPOINT, LOG = "checkpoint.pt", "log.jsonl"


class NonFiniteLoss(RuntimeError):
    """The loss or the gradient norm is not finite: training stops, the last checkpoint stays as it was."""


class Interrupted(RuntimeError):
    """Ctrl-C stopped training after a step, whose checkpoint was saved."""


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


def save_checkpoint(out, state):
    """Write ``state`` as the run's checkpoint: a stop while saving keeps the previous one."""
    path = os.path.join(out, CHECKPOINT)
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def sync(file):
    """Flush ``file`` to disk."""
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
