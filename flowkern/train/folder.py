"""The run folder: refusing one that cannot take the run, one run at a time in it, the log that survives a
stop, checkpoints written atomically, and strict JSON."""
import contextlib
import fcntl
import json
import math
import os
import signal
import sys
import threading

import torch

from ..data import RUN_FILES

CHECKPOINT, LOG = RUN_FILES
FORMAT = 1  # version of checkpoint.pt's layout; a checkpoint of another version is refused


class NonFiniteLoss(RuntimeError):
    """The loss or the gradient norm is not finite: training stops, the last checkpoint stays as it was."""


class Interrupted(RuntimeError):
    """Ctrl-C stopped training after a step, whose checkpoint was saved."""


class WriteFailed(RuntimeError):
    """A file of the run could not be written mid-run; the last checkpoint stays as it was."""


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
        probe = os.path.join(out, f".writable.{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as error:
        raise ValueError(f"--out {out}: cannot write there ({error.strerror or error})") from None


class FolderLock:
    """An exclusive lock on the folder ``out`` for the life of a run: ``flock`` on the folder itself, so it
    writes nothing and the OS releases it when the process dies (``kill -9`` leaves no stale lock). A second
    run on the same folder is refused (ValueError) while the first holds it."""

    def __init__(self, out):
        self.fd = None
        self.fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = None
            raise ValueError(f"--out {out}: another run is using this folder; wait for it to end or choose "
                             "another --out") from None

    def release(self):
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor releases the lock
            self.fd = None

    __del__ = release


@contextlib.contextmanager
def writing(path):
    """Turn a failure to write ``path`` into :class:`WriteFailed`, one line naming the file."""
    try:
        yield
    except (OSError, RuntimeError) as error:
        reason = getattr(error, "strerror", None) or str(error).splitlines()[0]
        raise WriteFailed(f"cannot write {path} ({reason}): training stopped; the last checkpoint is as it "
                          "was") from None


def replace_atomically(path, write):
    """``write(tmp)`` to a file of this process's own, then move it over ``path``: a stop while writing
    keeps the previous ``path``, and two processes never share a temporary file."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with writing(path):
        try:
            write(tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def dump_json(path, value):
    """Write ``value`` to ``path`` atomically as strict JSON (a NaN or infinity is a ValueError, not
    ``NaN`` in the file)."""
    text = json.dumps(value, indent=1, allow_nan=False)

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text + "\n")
    replace_atomically(path, write)


def read_log(path, step):
    """The records of the steps before ``step`` in the log at ``path``, in order. A line that is not a step's
    record (torn by a stop mid-write, damaged or edited) is reported on stderr and skipped; the lines of
    ``step`` and after (a resumed run writes them again) are dropped."""
    kept = []
    if not os.path.isfile(path):
        return kept
    with open(path, errors="replace") as f:
        for number, line in enumerate(f, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if not (isinstance(record, dict) and type(record.get("step")) is int
                    and isinstance(record.get("bits_per_dim"), (int, float))
                    and math.isfinite(record["bits_per_dim"])):
                print(f"flowkern.train: {path} line {number} is not a step's record (torn or damaged): "
                      "skipped", file=sys.stderr)
                continue
            if record["step"] < step:
                kept.append(record)
    return kept


def open_log(path, records):
    """The log rewritten with ``records`` (from :func:`read_log`) and opened for appending."""
    def write(tmp):
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r, allow_nan=False) + "\n" for r in records)
    replace_atomically(path, write)
    with writing(path):
        return open(path, "a")


def save_checkpoint(out, state):
    """Write ``state`` as the run's checkpoint: a stop while saving keeps the previous one."""
    replace_atomically(os.path.join(out, CHECKPOINT), lambda tmp: torch.save({"format": FORMAT, **state}, tmp))


def read_checkpoint(path, device="cpu", needs=("model", "step", "config")) -> dict:
    """The checkpoint at ``path`` (tensors only: ``weights_only``), checked for its format and the keys in
    ``needs``; a damaged or foreign file is a ValueError naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # truncated, empty, not a torch file, or a pickle that names code
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"{path}: not a readable checkpoint ({reason[:200]})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a flowkern checkpoint (a {type(state).__name__}, not a dict)")
    version = state.get("format", FORMAT)  # checkpoints written before the version was recorded are version 1
    if version != FORMAT:
        raise ValueError(f"{path}: checkpoint format {version!r}, this flowkern reads format {FORMAT}")
    missing = [key for key in needs if key not in state]
    if missing:
        raise ValueError(f"{path}: not a complete checkpoint: it lacks {', '.join(missing)}")
    if not isinstance(state["config"], dict) or type(state["step"]) is not int or state["step"] < 0:
        raise ValueError(f"{path}: damaged checkpoint (its config or step is not what flowkern writes)")
    return state


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
