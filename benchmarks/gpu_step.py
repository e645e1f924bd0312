"""A whole Glow training step captured as one CUDA graph, against the same step eager and the plain-PyTorch Glow.

    python -m benchmarks.gpu_step [--levels 3 --steps 32 --hidden 512 --batch 64] [--out DIR]

The step is mean bits/dim, backward and one fused Adam step. flowkern's step reads nothing back to the host,
so on CUDA it is captured once with ``torch.cuda.graph`` (Adam with ``capturable=True``) and replayed: one
launch from the host for the step's kernels. The captured step starts from a copy of the eager step's
model and optimiser state, and its loss and updated parameters are compared with the eager step's, which
checks that the capture recorded the step the eager code runs. Times are medians of CUDA events, the three
providers called in turn. Without CUDA (``--device cpu``) the graph is skipped: that checks the script.
"""
import argparse
import copy
import json
import os
import sys

import torch

import flowkern

from .measure import summarize, time_calls
from .plain_glow import PlainGlow


def _model(plain, args, device, x):
    torch.manual_seed(0)
    cls = PlainGlow if plain else flowkern.Glow
    model = cls(x.shape[1], x.shape[2], args.levels, args.steps, args.hidden).to(device)
    with torch.no_grad():  # ActNorm's data-dependent initialisation
        model.log_prob(x)
    return model


def _adam(model, capturable=False):
    return torch.optim.Adam(model.parameters(), lr=1e-4, fused=True, capturable=capturable)


def eager_step(model, optimizer, x):
    """``step()``: one training step on ``x``, returning its loss (a device tensor)."""
    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = model.bits_per_dim(x).mean()
        loss.backward()
        optimizer.step()
        return loss.detach()
    return step


def graphed_step(model, optimizer, x, warmup=3):
    """The step of :func:`eager_step` captured in a CUDA graph: returns ``(replay, loss)``, ``loss`` the
    static tensor each replay writes. Warm-up runs on a side stream first, as capture requires (Triton
    compiles, the backends' choices and the caching allocator settle there); each warm-up step updates the
    parameters, as a training step does."""
    step = eager_step(model, optimizer, x)
    stream = torch.cuda.Stream(x.device)
    stream.wait_stream(torch.cuda.current_stream(x.device))
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream(x.device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        loss = step()
    return graph.replay, loss


def _max_relative_difference(model_a, model_b):
    worst = 0.0
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        worst = max(worst, ((a - b).norm() / b.norm().clamp_min(1e-30)).item())
    return worst


def check_capture(model, x):
    """One captured step against one eager step from the same state: ``(loss difference, largest relative
    difference of a parameter after the step)``. The two start from copies of ``model`` whose optimisers
    have the capture's warm-up behind them, so both take the same step."""
    captured = copy.deepcopy(model)
    optimizer = _adam(captured, capturable=True)
    replay, loss = graphed_step(captured, optimizer, x)  # the warm-up steps moved the parameters
    eager = copy.deepcopy(captured)
    eager_optimizer = _adam(eager, capturable=True)
    eager_optimizer.load_state_dict(optimizer.state_dict())
    expected = eager_step(eager, eager_optimizer, x)()
    replay()
    torch.cuda.synchronize(x.device)
    return (loss - expected).abs().item(), _max_relative_difference(captured, eager)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=32, help="image side (3 channels)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--min-time", type=float, default=2.0, help="seconds of timed calls per provider")
    parser.add_argument("--out", default=None, help="folder for step.md and step.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    x = torch.rand(args.batch, 3, args.size, args.size, device=device) - 0.5

    plain = _model(True, args, device, x)
    fused = _model(False, args, device, x)
    providers = {"plain eager": eager_step(plain, _adam(plain), x),
                 "flowkern eager": eager_step(fused, _adam(fused), x)}
    checks = {}
    if device.type == "cuda":
        checks["loss difference"], checks["parameter difference"] = check_capture(fused, x)
        graph_model = copy.deepcopy(fused)
        providers["flowkern CUDA graph"] = graphed_step(graph_model, _adam(graph_model, capturable=True), x)[0]
    times = time_calls(list(providers.values()), device, warmup=2, min_time=args.min_time, min_reps=5)
    stats = {name: summarize(t) for name, t in zip(providers, times)}
    base = stats["plain eager"]["median_ms"]

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    command = " ".join(["python -m benchmarks.gpu_step", *(sys.argv[1:] if argv is None else argv)])
    lines = [f"# A Glow training step on {name}", "",
             f"Glow L={args.levels}, K={args.steps}, {args.hidden} hidden, {args.batch}×3×{args.size}×{args.size}, "
             f"float32 (TF32 allowed), fused Adam; torch {torch.__version__}; command `{command}`.", "",
             "| provider | median ms | p10–p90 ms | × plain eager |", "|---|---:|---:|---:|"]
    for provider, s in stats.items():
        lines.append(f"| {provider} | {s['median_ms']:.2f} | {s['p10_ms']:.2f}–{s['p90_ms']:.2f} | "
                     f"{base / s['median_ms']:.2f} |")
    if checks:
        lines += ["", "Captured step against the eager step from the same state: loss differs by "
                  f"{checks['loss difference']:.2e} bits/dim, parameters by at most {checks['parameter difference']:.2e}"
                  " (relative norm)."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "step.md"), "w") as f:
            f.write(text)
        with open(os.path.join(args.out, "step.json"), "w") as f:
            json.dump({"device": name, "config": vars(args), "times": stats, "checks": checks}, f, indent=1)
    return stats, checks


if __name__ == "__main__":
    main()
