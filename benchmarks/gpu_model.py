"""A static performance model of the Triton and CUDA ops on an H100 (sm_90), from their sm_90 compilation alone.

    python -m benchmarks.gpu_model [--batch 64] [--out DIR]

Each op is called at Glow's level shapes with the launches compiled, not run (:mod:`benchmarks.gpu_check`),
so the model sees each kernel's real grid, block size, registers and shared memory. It prints, per op and
shape, the bytes the op must move, its programs against the SMs, the occupancy those resources allow, the
bytes it has in flight, and an estimated fraction of copy bandwidth. These are estimates, not measurements.

The CUDA kernels are read from the built extension: registers, spills and static shared memory from
``cuobjdump`` (:func:`benchmarks.gpu_check.check_cuda`), and each kernel's grid, dynamic shared memory and the
elements a thread requests at once from ``torch.ops.flowkern._cuda_launch``, the arithmetic
(``csrc/flowkern/launch.h``) the CUDA launchers themselves take their grids from. What each block reads (which
inputs, how many launches beside the kernel) is written out here (:func:`cuda_launch`). Without an extension
built for sm_90 the CUDA rows are left out, and said so.

The model, and what it leaves out:

1. **Floor.** ``bytes / B``: each input read once, each output written once, at the copy bandwidth ``B``
   (:data:`COPY_BANDWIDTH`, what a device-to-device copy reaches on an H100 SXM).
2. **Latency (Little's law).** Streaming at ``B`` needs ``B · L`` bytes requested and not yet returned
   (:data:`LATENCY` = DRAM latency under load). A coupling or ActNorm program requests all its data at once;
   a Triton 1×1 conv program one iteration of its loop over a ``tl.dot``, which Triton software-pipelines
   with ``num_stages − 1`` iterations ahead; a CUDA 1×1 conv thread one chunk of a pixel's inputs, and a CUDA
   weight-gradient block one staged tile. Bytes in flight = resident programs × those bytes (× iterations
   ahead); the fraction of ``B`` is at most ``in flight / (B · L)``.
3. **Occupancy and waves.** Resident programs per SM follow from registers, warps and shared memory
   (:func:`benchmarks.gpu_check.blocks_per_sm`); a grid smaller than one wave leaves SMs idle, and a
   partial last wave runs with fewer programs in flight.
4. **Launches.** Each launch adds :data:`LAUNCH_COST` (launch, ramp-up, drain), including the small PyTorch
   kernels an op runs beside its main kernel (partial sums, casts).

Left out: instruction throughput (these kernels do a few flops per byte), L2 hits (inputs several times
larger than L2 in the benchmarks), DRAM page and bank effects, coalescing (the kernels read rows of pixels:
coalesced by construction), the exact SASS latency chains (an iteration's loads are taken as issued
together), and shared-memory bandwidth (the CUDA 1×1 conv kernels read their operands from shared memory
at about one wavefront per multiply-add per warp; at small C that port, not DRAM, can bound them). A kernel
the model puts near 100% can still be limited by what it leaves out; one it puts far below is limited by its
design: too few programs, too little in flight, or too many launches.
"""
import argparse
import functools
import json
import os
import sys
import types

import torch

from flowkern import backends

from . import gpu_check as check

COPY_BANDWIDTH = 3.0e12  # bytes/s: a device-to-device copy on an H100 SXM (HBM3, 3.35 TB/s peak)
LATENCY = 800e-9  # s: DRAM latency under load
LAUNCH_COST = 3e-6  # s per kernel launch: launch, ramp-up and drain
SHAPES = [(12, 64), (48, 32)]  # (C, H = W): a Glow's first level on 128² images and a deep level
DTYPES = (torch.float32, torch.bfloat16)
# PyTorch kernels a Triton op launches beside its Triton kernels (which the model sees compiled): the
# couplings' sum of their partial log-dets
TORCH_LAUNCHES = {"coupling_forward": 1, "coupling_inverse": 1}


def bytes_per_iteration(name, constexprs, dtypes):
    """Bytes one program of kernel ``name`` requests before it must wait: all of them for the couplings and
    ActNorm (one channel, no loop), one iteration of the loop for the 1×1 conv kernels. ``dtypes``: element
    sizes of x, h and the weight."""
    block = constexprs.get("BLOCK", 0)
    e_x, e_h, e_w = dtypes
    if name == "_coupling_kernel":  # x, raw, shift of its channel (additive: x, shift)
        return block * (e_x + (e_h if constexprs["SCALE"] == 2 else 2 * e_h))
    if name == "_coupling_backward_kernel":  # ∂y, x, raw, shift
        return block * (2 * e_x + (e_h if constexprs["SCALE"] == 2 else 2 * e_h))
    if name == "_actnorm_kernel":
        return block * e_x
    if name == "_actnorm_backward_kernel":  # ∂y and x
        return 2 * block * e_x
    if name == "_conv1x1_kernel":  # a (K_BLOCK × BLOCK) tile of x and a (CO_PAD × K_BLOCK) tile of W
        return constexprs["K_BLOCK"] * (block * e_x + constexprs["CO_PAD"] * e_w)
    if name == "_conv1x1_weight_grad_kernel":  # (CO_BLOCK + CI_PAD) × BLOCK of ∂y and x
        return (constexprs["CO_BLOCK"] + constexprs["CI_PAD"]) * block * e_x
    raise KeyError(f"no model of the loop of {name}")


def nbytes(values):
    if isinstance(values, torch.Tensor):
        return values.numel() * values.element_size()
    if isinstance(values, (tuple, list)):
        return sum(nbytes(v) for v in values)
    return 0


def triton_ops(modules):
    """The Triton launchers behind the ops (:func:`benchmarks.gpu_check._triton_modules`), by the ops' names."""
    coupling, actnorm, conv = modules["coupling"], modules["actnorm"], modules["conv1x1"]
    return types.SimpleNamespace(
        coupling_forward=coupling.launch_coupling_forward, coupling_backward=coupling.launch_coupling_backward,
        actnorm=actnorm.launch_actnorm, actnorm_backward=actnorm.launch_actnorm_backward,
        conv1x1=conv.launch_conv1x1, conv1x1_weight_grad=conv.launch_conv1x1_weight_grad)


def op_calls(ops, batch, c, size, dtype, device="cpu"):
    """``(op, inputs, call)`` for each op at one shape and dtype, as the layers call them; ``ops``: the ops by
    name (:func:`triton_ops`, or a backend's ``ops``)."""
    x = torch.randn(batch, c, size, size, device=device).to(dtype)
    h = torch.randn(batch, c - c // 2, size, size, device=device).repeat(1, 2, 1, 1).to(dtype)  # channel mask
    vector, weight = torch.randn(c, device=device).to(dtype), torch.randn(c, c, device=device).to(dtype)
    g, g_logdet = torch.randn_like(x), torch.randn(batch, device=device).to(dtype)
    return [
        ("coupling_forward", (x, h), functools.partial(ops.coupling_forward, x, h, "channel", 0, "sigmoid", 2.0,
                                                          "halves")),
        ("coupling_backward", (g, g_logdet, x, h), functools.partial(
            ops.coupling_backward, g, g_logdet, x, h, "channel", 0, "sigmoid", 2.0, "halves", False)),
        ("actnorm", (x, vector, vector), functools.partial(ops.actnorm, x, vector, vector, False)),
        ("actnorm_backward", (g, x, vector, vector), functools.partial(
            ops.actnorm_backward, g, x, vector, vector, False)),
        ("conv1x1", (x, weight, vector), functools.partial(ops.conv1x1, x, weight, vector)),
        ("conv1x1_weight_grad", (g, x), functools.partial(ops.conv1x1_weight_grad, g, x)),
    ]


def estimate(op, dtype, moved, launch):
    """The model for one op whose main kernel makes ``launch``: a dict with its ``kernel`` name, ``programs``
    (blocks), ``threads`` per program, ``registers``, ``spills``, ``shared`` bytes, the ``bytes`` a program
    requests before it must wait, ``ahead`` (such requests in flight at once) and the ``extra`` launches beside
    it. Returns (estimated fraction of copy bandwidth, the kernel's figures)."""
    programs = launch["programs"]
    per_sm = check.blocks_per_sm(launch["registers"], launch["threads"], launch["shared"])
    wave = check.SMS * per_sm
    in_flight = min(programs, wave) * launch["bytes"] * launch["ahead"]
    latency_bound = min(1.0, in_flight / (COPY_BANDWIDTH * LATENCY))
    wave_efficiency = programs / (-(-programs // wave) * wave) if programs >= wave else 1.0
    floor = moved / COPY_BANDWIDTH
    time = floor / (latency_bound * wave_efficiency) + (1 + launch["extra"]) * LAUNCH_COST
    return floor / time, dict(kernel=launch["kernel"], programs=programs, per_sm=per_sm,
                              registers=launch["registers"], spills=launch["spills"], shared=launch["shared"],
                              in_flight=in_flight, latency_bound=latency_bound, wave_efficiency=wave_efficiency,
                              launches=1 + launch["extra"])


def triton_launch(op, dtype, compiled, resources):
    """The model's view of an op's Triton kernels: ``compiled``, a list of (name, constexprs, grid, kernel), the
    main kernel first and any second pass after it."""
    name, constexprs, grid, kernel = compiled[0]
    if kernel.hash not in resources:
        registers, spills = check.ptxas_resources(kernel.asm["ptx"])
        resources[kernel.hash] = (registers, spills, kernel.metadata.shared, kernel.metadata.num_warps,
                                  kernel.metadata.num_stages)
    registers, spills, shared, warps, stages = resources[kernel.hash]
    size = torch.empty(0, dtype=dtype).element_size()
    return dict(kernel=name, programs=grid[0] * (grid[1] if len(grid) > 1 else 1) * (grid[2] if len(grid) > 2 else 1),
                threads=warps * 32, registers=registers, spills=spills, shared=shared,
                bytes=bytes_per_iteration(name, constexprs, (size,) * 3),
                ahead=stages - 1 if "conv1x1" in name else 1,  # only the tl.dot loops are pipelined
                extra=len(compiled) - 1 + TORCH_LAUNCHES.get(op, 0))


_CUDA_TYPES = {torch.float32: "float", torch.float16: "c10::Half", torch.bfloat16: "c10::BFloat16",
               torch.float64: "double"}


def _kernel_row(name, kernels):
    rows = [k for k in kernels if f"::{name}(" in k["kernel"]]
    if len(rows) != 1:
        raise LookupError(f"expected one CUDA kernel {name} in the extension, found {len(rows)}")
    return rows[0]


def _cuda_shape(kernel, batch, c, hw, dtype, wave=0):
    """The launch shape ``csrc/flowkern/launch.h`` gives a CUDA kernel: blocks, threads per block, dynamic shared
    bytes, pixels per block and elements of each input a thread requests at once, read from the built extension."""
    backends._load("native")  # loads the extension, which registers its ops
    grid_x, grid_y, threads, shared, tile, ahead = torch.ops.flowkern._cuda_launch(kernel, batch, c, hw, dtype, wave)
    return dict(programs=grid_x * grid_y, threads=threads, shared=shared, tile=tile, ahead_elements=ahead)


def cuda_launch(op, dtype, batch, c, hw, kernels):
    """The model's view of the CUDA kernel behind ``op`` at (batch, c, H·W), as ``csrc/cuda/`` launches it with
    the parameters of :func:`op_calls` (a half-channel coupling, parity 0); ``kernels``:
    the rows of :func:`benchmarks.gpu_check.check_cuda`."""
    t, acc = _CUDA_TYPES[dtype], "double" if dtype == torch.float64 else "float"
    e = torch.empty(0, dtype=dtype).element_size()
    backward, row = op.endswith("_backward"), None
    # element_bytes: the bytes of one element of each input a block reads (its loads are issued together)
    if op.startswith("coupling"):
        name = f"coupling_{'backward_' if backward else ''}kernel<(flowkern::Scale)0, false, {t}, {t}, {acc}>"
        shape = _cuda_shape("coupling", batch, c, hw, dtype)
        # half the blocks copy a pass-through plane (x), half transform one (x, raw, shift; backward also ∂y)
        element_bytes, extra = ((2 * e if backward else e) + 2 * e + e) / 2, 0 if backward else 1
    elif op.startswith("actnorm"):
        name = f"actnorm_{'backward_' if backward else ''}kernel<false, true, {t}, {t}, {acc}>"
        shape = _cuda_shape("actnorm", batch, c, hw, dtype)
        element_bytes, extra = (2 if backward else 1) * e, 1 if backward else 0  # backward: ∂y and x
    elif op == "conv1x1":
        shape = _cuda_shape("conv1x1", batch, c, hw, dtype)
        name = f"conv1x1_kernel<{t}, {t}, {acc}, {'true' if shape['shared'] else 'false'}>"
        element_bytes, extra = e, 0  # a chunk of the pixel's input channels
    elif op == "conv1x1_weight_grad":
        name = f"conv1x1_weight_grad_kernel<{t}, {acc}>"
        row = _kernel_row(name, kernels)  # one full wave of blocks, as cudaOccupancyMaxActiveBlocksPerMultiprocessor
        threads = _cuda_shape(op, batch, c, hw, dtype)["threads"]
        wave = max(1, check.blocks_per_sm(row["registers"], threads, row["shared_bytes"])) * check.SMS
        shape = _cuda_shape(op, batch, c, hw, dtype, wave)
        element_bytes, extra = 2 * e, 1  # ∂y and x of a staged pixel tile
    else:
        raise KeyError(f"no CUDA model of {op}")
    row = row or _kernel_row(name, kernels)
    # dynamic shared memory comes on top of the static shared memory cuobjdump reports
    return dict(kernel=name.split("<")[0], programs=shape["programs"], threads=shape["threads"],
                registers=row["registers"], spills=row["local_bytes"], shared=shape["shared"] + row["shared_bytes"],
                bytes=shape["threads"] * shape["ahead_elements"] * element_bytes, ahead=1, extra=extra)


def run_model(batch):
    modules = check._triton_modules()
    kernels, _, cuda_skipped = check.check_cuda()
    results, resources = [], {}
    for dtype in DTYPES:
        for c, size in SHAPES:
            compiled = []
            with check.compiling_for_sm90(modules, compiled):
                for op, inputs, call in op_calls(triton_ops(modules), batch, c, size, dtype):
                    start = len(compiled)
                    outputs = call()
                    moved = nbytes(inputs) + nbytes(outputs)
                    launches = [("triton", triton_launch(op, dtype, compiled[start:], resources))]
                    if not cuda_skipped:
                        launches.append(("cuda", cuda_launch(op, dtype, batch, c, size * size, kernels)))
                    for backend, launch in launches:
                        fraction, figures = estimate(op, dtype, moved, launch)
                        results.append(dict(backend=backend, op=op, C=c, HW=f"{size}x{size}", N=batch,
                                            dtype=check._name(dtype), bytes=moved, fraction=fraction, **figures))
    return results, cuda_skipped


def table(results):
    lines = ["| backend | op | dtype | C | HW | MB moved | kernel | launches | programs | per SM | regs | spill B | "
             "smem KB | KB in flight | latency bound | waves | est. of copy |",
             "|---|---|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['backend']} | {r['op']} | {r['dtype']} | {r['C']} | {r['HW']} | {r['bytes'] / 1e6:.1f} | "
                     f"{r['kernel']} | {r['launches']} | "
                     f"{r['programs']} | {r['per_sm']} | {r['registers']} | {r['spills']} | "
                     f"{r['shared'] / 1024:.1f} | {r['in_flight'] / 1024:.0f} | {r['latency_bound']:.0%} | "
                     f"{r['wave_efficiency']:.0%} | {r['fraction']:.0%} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--out", default=check.RESULTS, help="folder for model.json and model.md")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    results, cuda_skipped = run_model(args.batch)
    text = (f"# Static model of the Triton and CUDA ops on an H100 (estimates, not measurements)\n\n"
            f"Batch {args.batch}; copy bandwidth {COPY_BANDWIDTH / 1e12:.1f} TB/s, DRAM latency "
            f"{LATENCY * 1e9:.0f} ns, {LAUNCH_COST * 1e6:.0f} µs per launch; assumptions in "
            f"`benchmarks/gpu_model.py`.\n\n" + (f"CUDA not modelled: {cuda_skipped}.\n\n" if cuda_skipped else "")
            + table(results))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "model.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(args.out, "model.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
