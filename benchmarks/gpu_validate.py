"""The static model checked against a device: each op the model describes, run and timed there.

    python -m benchmarks.gpu_validate [--batch 64] [--backends triton,native] [--out DIR]

For each op, shape and dtype of :mod:`benchmarks.gpu_model` and each fused backend, the same call the model
estimates is timed on the device, with the L2 cache flushed before every timed call:

- **graph**: the op's launches captured once in a CUDA graph and replayed, which is device time alone (its
  kernels and the gaps between them, no host work): what the model estimates;
- **eager**: the op called as a layer calls it, host dispatch included: what an eager training step pays.

Each time is turned into a fraction of the copy bandwidth measured in the same run (bytes moved, each input
read once and each output written once, over time), printed beside the model's estimate for that batch
(``results/sm90-static/model.json``, or ``batch256/model.json``). Without CUDA (``--device cpu``) only the
eager column is measured; that checks the script, not the model.
"""
import argparse
import json
import os
import sys

import torch

from flowkern import backends

from . import gpu_model
from .gpu_check import RESULTS as STATIC
from .measure import copy_bandwidth, summarize, time_call

MODEL_FILES = {64: os.path.join(STATIC, "model.json"), 256: os.path.join(STATIC, "batch256", "model.json")}
MODEL_BACKENDS = {"triton": "triton", "native": "cuda"}  # the model's name for each backend's kernels


def estimates(batch):
    """The model's estimates at ``batch``: {(backend, op, dtype, C, HW): fraction}, empty if not computed."""
    path = MODEL_FILES.get(batch)
    if path is None or not os.path.isfile(path):
        return {}
    with open(path) as f:
        return {(r["backend"], r["op"], r["dtype"], r["C"], r["HW"]): r["fraction"] for r in json.load(f)}


def graphed(call, device):
    """``call``'s launches captured in a CUDA graph: returns the graph's replay. Warm-up on a side stream
    first, as capture requires (Triton compiles, ``auto`` choices and the caching allocator settle there)."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            call()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    return graph.replay


def validate(batch, backend_names, device, min_time):
    bandwidth = copy_bandwidth(device) * 1e9  # bytes/s
    model = estimates(batch)
    rows = []
    for name in backend_names:
        ops = backends._load(name).ops
        for dtype in gpu_model.DTYPES:
            for c, size in gpu_model.SHAPES:
                for op, inputs, call in gpu_model.op_calls(ops, batch, c, size, dtype, device):
                    moved = gpu_model.nbytes(inputs) + gpu_model.nbytes(call())
                    row = dict(backend=name, op=op, dtype=str(dtype).replace("torch.", ""), C=c, HW=f"{size}x{size}",
                               N=batch, bytes=moved)
                    row["model"] = model.get((MODEL_BACKENDS[name], op, row["dtype"], c, row["HW"]))
                    timed = {"eager": call}
                    if device.type == "cuda":
                        timed["graph"] = graphed(call, device)
                    for kind, fn in timed.items():
                        stats = summarize(time_call(fn, device, min_time=min_time))
                        row[f"{kind}_us"] = stats["median_ms"] * 1e3
                        row[kind] = moved / (stats["median_ms"] / 1e3) / bandwidth
                    rows.append(row)
    return rows, bandwidth


def table(rows):
    def pct(value):
        return "–" if value is None else f"{value:.0%}"

    def us(value):
        return "–" if value is None else f"{value:.1f}"

    lines = ["| backend | op | dtype | C | HW | MB moved | model est. | graph µs | graph of copy | eager µs | "
             "eager of copy |", "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['backend']} | {r['op']} | {r['dtype']} | {r['C']} | {r['HW']} | {r['bytes'] / 1e6:.1f} | "
                     f"{pct(r['model'])} | {us(r.get('graph_us'))} | {pct(r.get('graph'))} | {us(r['eager_us'])} | "
                     f"{pct(r['eager'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--backends", default="triton,native", help="comma-separated fused backends")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--min-time", type=float, default=0.2, help="seconds of timed calls per row and kind")
    parser.add_argument("--out", default=None, help="folder for validate.md and validate.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    names = [n for n in args.backends.split(",") if n]
    unknown = [n for n in names if n not in MODEL_BACKENDS]
    if unknown:
        parser.error(f"--backends: expected triton or native, got {', '.join(unknown)}")
    rows, bandwidth = validate(args.batch, names, device, args.min_time)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    command = " ".join(["python -m benchmarks.gpu_validate", *(sys.argv[1:] if argv is None else argv)])
    text = (f"# The static model against {name}\n\nBatch {args.batch}; copy bandwidth {bandwidth / 1e12:.2f} TB/s "
            f"measured in the same run; command `{command}`.\n\n" + table(rows))
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "validate.md"), "w") as f:
            f.write(text)
        with open(os.path.join(args.out, "validate.json"), "w") as f:
            json.dump({"device": name, "batch": args.batch, "copy_bandwidth": bandwidth, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
