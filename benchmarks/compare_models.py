"""FFJORD beside the discrete flows: each model of similar parameter count trained by the same command
(``python -m flowkern.train``) for the same steps and batches, then compared on held-out NLL, training time
per step, sampling time and NFE, with the densities side by side on the 2-D set.

    python -m benchmarks.compare_models [--steps N] [--data moons,digits] [--out DIR]

Writes ``compare.json``, ``compare.md`` and ``density_<data>.png`` under
``benchmarks/results/<device>-models/``. Times are medians on this machine; run it with nothing else running.
"""
import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

import flowkern
import flowkern.train as train

from .report import RESULTS
from .run import device_slug, environment

# (model, its options): widths chosen so that the models of one data set have similar parameter counts
CONFIGS = {
    "moons": [("realnvp2d", ["--hidden", "64", "--depth", "8"]),
              ("ffjord", ["--hidden", "128", "--depth", "3"])],
    "digits": [("glow", ["--hidden", "20", "--depth", "4"]),
               ("realnvp", ["--hidden", "6", "--blocks", "1"]),
               ("ffjord", ["--hidden", "32", "--depth", "3", "--divergence", "hutchinson"])],
}
STEPS = {"moons": 500, "digits": 400}  # FFJORD takes about a second a step on digits on a 2-core CPU
WARMUP = 50
SAMPLES = {"moons": 1000, "digits": 100}


def read_log(folder):
    with open(os.path.join(folder, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def sampling_seconds(model, n, repeats=3):
    """Median wall time of drawing ``n`` samples, and the NFE of the last draw (None for discrete flows)."""
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        model.sample(n)
        times.append(time.perf_counter() - began)
    return statistics.median(times), getattr(model, "nfe", None)


def compare(data, steps, batch_size, folder):
    rows = []
    for model_name, options in CONFIGS[data]:
        out = os.path.join(folder, f"{model_name}-{data}")
        argv = ["--model", model_name, "--data", data, "--steps", str(steps), "--batch-size", str(batch_size),
                "--warmup", str(WARMUP), "--seed", "0", "--no-progress", "--no-sample",
                "--checkpoint-every", str(steps), "--out", out, *options]
        if train.main(argv) != 0:
            raise RuntimeError(f"python -m flowkern.train {' '.join(argv)} failed")
        with open(os.path.join(out, "metrics.json")) as f:
            metrics = json.load(f)
        run = flowkern.load_run(out)
        log = read_log(out)[-100:]
        dims = sum(math.prod(shape) for shape in run.model.latent_shapes())
        sample_time, sample_nfe = sampling_seconds(run.model, SAMPLES[data])
        row = dict(data=data, model=model_name, options=" ".join(options),
                   parameters=sum(p.numel() for p in run.model.parameters()), steps=steps,
                   test_bits_per_dim=metrics["test_bits_per_dim"],
                   test_nll_nats=metrics["test_bits_per_dim"] * dims * math.log(2),
                   step_ms=1000 / metrics["steps_per_second"], samples=SAMPLES[data],
                   sample_ms=1000 * sample_time, sample_nfe=sample_nfe,
                   nfe_forward=statistics.mean(r["nfe_forward"] for r in log) if "nfe_forward" in log[0] else None,
                   nfe_backward=statistics.mean(r["nfe_backward"] for r in log) if "nfe_backward" in log[0] else None,
                   test_divergence=metrics.get("test_divergence"))
        rows.append((row, run.model))
    return rows


def plot_densities(data, models, test, path, grid=160):
    """Each model's density over the data's range, side by side with the held-out points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    low, high = test.min(0).values - 0.5, test.max(0).values + 0.5
    xs, ys = (torch.linspace(low[i].item(), high[i].item(), grid) for i in range(2))
    points = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(-1, 2)
    figure, axes = plt.subplots(1, len(models) + 1, figsize=(4 * (len(models) + 1), 4))
    axes[0].scatter(*test[:2000].T.numpy(), s=2, c="0.3")
    axes[0].set_title(f"{data}: held-out points")
    extent = (xs[0].item(), xs[-1].item(), ys[0].item(), ys[-1].item())
    axes[0].set_xlim(*extent[:2])
    axes[0].set_ylim(*extent[2:])
    for axis, (name, model) in zip(axes[1:], models):
        with torch.no_grad():
            density = torch.cat([model.log_prob(p).exp() for p in points.split(4096)])
        axis.imshow(density.reshape(grid, grid).numpy(), origin="lower", cmap="viridis", extent=extent)
        axis.set_title(name)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def table(rows):
    lines = ["| data | model | parameters | steps | test bits/dim | test NLL (nats) | step ms | sampling ms (n) | "
             "NFE forward / backward / sampling |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        nfe = "–" if r["nfe_forward"] is None else (f"{r['nfe_forward']:.0f} / {r['nfe_backward']:.0f} / "
                                                    f"{r['sample_nfe']}")
        lines.append(f"| {r['data']} | {r['model']} | {r['parameters']:,} | {r['steps']} | "
                     f"{r['test_bits_per_dim']:.3f} | {r['test_nll_nats']:.2f} | {r['step_ms']:.0f} | "
                     f"{r['sample_ms']:.0f} ({r['samples']}) | {nfe} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: 500 moons, 400 digits)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--data", default="moons,digits", help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--out", default=None, help="results folder (default: benchmarks/results/<device>-models)")
    args = parser.parse_args(argv)
    device = torch.device("cpu")
    out = args.out or os.path.join(RESULTS, f"{device_slug(device)}-models")
    os.makedirs(out, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for data in args.data.split(","):
            if data not in CONFIGS:
                parser.error(f"--data {data}: expected one of {', '.join(CONFIGS)}")
            compared = compare(data, args.steps or STEPS[data], args.batch_size, folder)
            rows += [row for row, _ in compared]
            if data == "moons":
                test = flowkern.data.toy2d("moons", 4000, seed=2)  # the command's held-out set
                plot_densities(data, [(row["model"], model) for row, model in compared], test,
                               os.path.join(out, f"density_{data}.png"))
    text = (f"# FFJORD beside the discrete flows (batch {args.batch_size}, {WARMUP} warm-up steps, equal steps per "
            f"data set)\n\n" + table(rows))
    with open(os.path.join(out, "compare.json"), "w") as f:
        json.dump({"environment": environment(device, None), "rows": rows}, f, indent=1,
                  default=lambda v: float(v) if isinstance(v, np.floating) else str(v))
    with open(os.path.join(out, "compare.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
