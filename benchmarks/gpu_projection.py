"""What bounds a Glow training step on an H100, from measured op counts and the step's arithmetic (an estimate).

    python -m benchmarks.gpu_projection [--levels 3 --steps 32 --hidden 512 --batch 64]

Per provider (the plain-PyTorch Glow, flowkern, flowkern by inversion) and mode (a training step, sampling):

- **ops**: the kernel-launching ops one eager call dispatches, counted on the CPU
  (:func:`benchmarks.measure.count_dispatches`, native backend). The count does not depend on the width or the
  batch, so it is taken at the real depth with 8 hidden channels and a batch of 2; the conditioners are held
  to their convolutions there, the form CUDA runs. Each is at least one kernel launch on a GPU.
- **host**: those ops at :data:`HOST_COST` each, the Python, dispatch, autograd and launch cost an eager op
  pays from the host (the range seen for small ops in PyTorch eager): the time an eager step cannot go below
  when the device waits on the host.
- **device floor**: the conditioners' convolutions (forward, and twice that for the backward; by inversion a
  second forward for the rebuild) at :data:`TF32_PEAK`, plus the activations each flow step writes and reads
  (:func:`activation_bytes`) at :data:`~benchmarks.gpu_model.COPY_BANDWIDTH`. A step replayed as a CUDA graph
  pays the device floor and what the kernels fall short of it by, not the host's cost.

Nothing here ran on a GPU: every time in the output is an estimate, and the output says so.
"""
import argparse

import torch

import flowkern

from .gpu_model import COPY_BANDWIDTH
from .measure import count_dispatches
from .plain_glow import PlainGlow

HOST_COST = (5e-6, 10e-6)  # s per eager op dispatched from Python: autograd, dispatch and the launch
TF32_PEAK = 495e12  # FLOP/s: dense TF32 tensor-core peak of an H100 SXM


def level_shapes(channels, size, levels):
    """(C, H·W) of each level's flow steps."""
    shapes = []
    for level in range(levels):
        channels, size = channels * 4, size // 2
        shapes.append((channels, size * size))
        channels = channels if level == levels - 1 else (channels + 1) // 2
    return shapes


def conditioner_flops(c, hw, hidden, batch):
    """FLOPs of one Glow conditioner's forward: 3×3 (C/2 → hidden), 1×1 (hidden → hidden), 3×3 (hidden → C)."""
    half = c - c // 2
    return 2 * batch * hw * (9 * (c // 2) * hidden + hidden * hidden + 9 * hidden * half * 2)


def activation_bytes(c, hw, hidden, batch, itemsize=4):
    """Bytes one flow step's forward writes and reads once each, its backward twice that: the 1×1 conv's
    and the coupling's outputs and the conditioner's input (C channels each), its two hidden activations and
    its output h (C channels)."""
    forward = 2 * batch * hw * itemsize * (4 * c + 2 * hidden)  # each written once and read once
    return 3 * forward


def count(model, x, mode):
    for conditioner in model.modules():
        if isinstance(conditioner, flowkern.nn.GlowConditioner):
            conditioner.form = "convolutions"  # as on CUDA, whatever this CPU measured faster
    model.train(mode != "sample")
    with torch.no_grad():
        model.log_prob(x)  # ActNorm's data-dependent initialisation
    if mode == "sample":
        def run():
            model.sample(len(x))
    else:
        def run():
            model.zero_grad(set_to_none=True)
            model.bits_per_dim(x).mean().backward()
    with flowkern.use_backend("native"):
        run()
        return count_dispatches(run)["ops"]


def project(levels, steps, hidden, batch, channels=3, size=32):
    """Rows of {provider, mode, ops, host_s (low, high), device_s}: see the module's docstring."""
    x = torch.rand(2, channels, size, size) - 0.5
    shapes = level_shapes(channels, size, levels)
    flops = steps * sum(conditioner_flops(c, hw, hidden, batch) for c, hw in shapes)
    moved = steps * sum(activation_bytes(c, hw, hidden, batch) for c, hw in shapes)
    rows = []
    for provider in ("plain eager", "flowkern", "flowkern by inversion"):
        for mode in ("train", "sample"):
            if mode == "sample" and provider == "flowkern by inversion":
                continue  # sampling runs no backward: the same as flowkern's
            torch.manual_seed(0)
            if provider == "plain eager":
                model = PlainGlow(channels, size, levels, steps, 8)
            else:
                model = flowkern.Glow(channels, size, levels, steps, 8, memory_saving=provider != "flowkern")
            ops = count(model, x, mode)
            passes = {"train": 3, "sample": 1}[mode] + (provider == "flowkern by inversion")
            device = passes * flops / TF32_PEAK + (moved if mode == "train" else moved / 3) / COPY_BANDWIDTH
            rows.append(dict(provider=provider, mode=mode, ops=ops, ops_per_flow_step=ops / (levels * steps),
                             host_s=tuple(ops * cost for cost in HOST_COST), device_s=device))
    return rows


def table(rows):
    lines = ["| provider | mode | ops | ops per flow step | host time, eager (est.) | device floor (est.) |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        low, high = r["host_s"]
        lines.append(f"| {r['provider']} | {r['mode']} | {r['ops']} | {r['ops_per_flow_step']:.1f} | "
                     f"{low * 1e3:.1f}–{high * 1e3:.1f} ms | {r['device_s'] * 1e3:.1f} ms |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args(argv)
    rows = project(args.levels, args.steps, args.hidden, args.batch)
    print(f"Glow L={args.levels}, K={args.steps}, {args.hidden} hidden, batch {args.batch} of 3×32×32, float32 "
          f"(TF32) on an H100 SXM: estimates from op counts measured on the CPU, not GPU measurements.\n")
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
