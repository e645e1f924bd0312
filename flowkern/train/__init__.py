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
import json
import os
import sys

import torch.distributed as dist

from ..backends import BackendUnavailable
from .building import Data, TrainedRun, build_model, load_data, load_run, resolve_defaults
from .folder import CHECKPOINT, LOG, Interrupted, NonFiniteLoss, WriteFailed
from .loop import Run
from .options import MODELS, Command, Config, default_model, parse_args

__all__ = ["CHECKPOINT", "LOG", "MODELS", "Command", "Config", "Data", "NonFiniteLoss", "Run", "TrainedRun",
           "WriteFailed", "build_model", "default_model", "load_data", "load_run", "main", "parse_args",
           "resolve_defaults"]


def main(argv=None):
    """The command line: 0 when the run is done, 1 when it stopped on a non-finite loss or evaluation or a file
    it could not write (one line on stderr, the last checkpoint kept), 2 for a bad option, data, checkpoint or
    run folder (one line on stderr, nothing written), 130 when interrupted (after a checkpoint)."""
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
        except (NonFiniteLoss, WriteFailed) as error:
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

