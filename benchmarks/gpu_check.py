"""Every kernel compiled for the H100 (sm_90) on a machine without a GPU, and the resources each one uses.

    python -m benchmarks.gpu_check [--out DIR]   # compile all, write DIR/resources.{json,md}, exit 1 on a problem
    python -m benchmarks.gpu_check --update      # also rewrite the committed tables in results/sm90-static/

Triton: a stand-in driver answers that the current device is an sm_90 GPU, and each kernel launch inside the
Triton ops compiles the kernel (Triton's warm-up mode) instead of running it. The ops themselves are called,
on CPU tensors of Glow's shapes, so every kernel is compiled with the signature, specialisation and constexprs
a launch on a GPU would give it. Triton's own ``ptxas -v`` reports registers and spills; Triton reports the
shared memory it asks for.

CUDA: ``cuobjdump --dump-resource-usage`` on the built extension, compiled for sm_90 by ``make setup`` (skipped,
and said so, when the extension was built without CUDA).

A problem, which fails the check: a kernel that does not compile, a spill at a shape in the Glow range
(:data:`GLOW_CHANNELS`), or shared memory beyond what one block may have on an H100 (a launch would fail).
"""
import argparse
import contextlib
import functools
import importlib
import json
import os
import re
import subprocess
import sys
import types

import torch

# The H100 SXM (sm_90) per-SM limits that bound occupancy.
SMS = 132
REGISTERS_PER_SM = 65536
REGISTER_UNIT = 256  # registers are allocated per warp in units of 256
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
SHARED_PER_SM = 228 * 1024
MAX_SHARED_PER_BLOCK = 227 * 1024
SHARED_RESERVED_PER_BLOCK = 1024  # the driver's per-block reservation

# Channel counts of Glow's levels (squeezed 3-channel images, up to four levels): a spill here fails the check.
GLOW_CHANNELS = (12, 24, 48, 96)
# (C, H = W) of the shapes compiled: Glow's levels on 32² and 64² images, and wider layers up to C = 384
SHAPES = [(3, 64), (12, 64), (12, 32), (24, 16), (24, 32), (48, 8), (48, 32), (96, 16), (192, 8), (384, 4), (384, 16)]
# the couplings' code depends on the block of pixels (from H·W) and on C only through specialisation (odd
# counts, multiples of 16): one shape per block size, an odd C, and the widest
COUPLING_SHAPES = [(3, 64), (12, 64), (24, 16), (48, 8), (96, 16), (384, 4)]
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# (scale, h layout) of the couplings: every scale in flowkern's layout, and normflows' interleaved layout (a
# stride of 2 between h's planes, which Triton specialises differently from 1) with its scales
COUPLING_VARIANTS = [*((scale, "halves") for scale in ("sigmoid", "reciprocal_sigmoid", "exp", "plain_exp", "atan",
                                                      "offset_sigmoid", "additive")),
                     *((scale, "interleaved") for scale in ("sigmoid", "reciprocal_sigmoid", "plain_exp"))]
# (x dtype, h dtype) of the couplings: each dtype alone, and a float32 flow under autocast
COUPLING_DTYPES = [(d, d) for d in DTYPES] + [(torch.float32, torch.bfloat16), (torch.float32, torch.float16)]
BATCH = 2  # the batch only sizes the grid, which compiling does not see

RESULTS = os.path.join(os.path.dirname(__file__), "results", "sm90-static")  # the committed tables
BUILD = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "build", "sm90-static")


def _triton_modules():
    """The Triton kernels' modules, without their package's import (which registers torch ops and refuses a
    machine that can neither run them on a GPU nor interpret them: this process only compiles)."""
    name = "flowkern.backends.triton"
    if name not in sys.modules:
        package = types.ModuleType(name)
        package.__path__ = [os.path.join(os.path.dirname(importlib.import_module("flowkern.backends").__file__),
                                         "triton")]
        sys.modules[name] = package
    return {op: importlib.import_module(f"{name}.{op}")
            for op in ("coupling", "actnorm", "conv1x1", "lu_weight", "fold_actnorms")}


@contextlib.contextmanager
def compiling_for_sm90(modules, compiled):
    """Within: the current Triton device is an sm_90 GPU, and each kernel launch compiles and appends
    ``(kernel name, constexprs, grid, CompiledKernel)`` to ``compiled`` instead of running."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    class StandInSm90(DriverBase):
        def is_active(self):
            return False

        def map_python_to_cpp_type(self, ty):
            raise NotImplementedError

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_benchmarker(self):
            raise NotImplementedError

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

    def compile_instead(self, grid):
        def launch(*args, **kwargs):
            kernel = self.run(*args, grid=grid, warmup=True, **kwargs)
            constexprs = {k: v for k, v in kwargs.items() if isinstance(v, (int, bool, str)) or v is None
                          or type(v).__module__.startswith("triton")}
            compiled.append((self.fn.__name__, constexprs, tuple(grid), kernel))
        return launch

    conv = modules["conv1x1"]
    saved_getitem, saved_driver, saved_programs = JITFunction.__getitem__, driver._active, conv._programs_per_device
    saved_checks = {m: m.check_launchable for m in modules.values()}
    driver.set_active(StandInSm90())
    JITFunction.__getitem__ = compile_instead
    conv._programs_per_device = lambda device: 2 * SMS  # the grid a launch on an H100 gets
    for module in modules.values():
        module.check_launchable = lambda t, name: None  # CPU tensors stand for the GPU's here
    try:
        yield
    finally:
        JITFunction.__getitem__ = saved_getitem
        conv._programs_per_device = saved_programs
        for module, check in saved_checks.items():
            module.check_launchable = check
        driver._active = saved_driver


def _image(c, size, dtype):
    return torch.randn(BATCH, c, size, size).to(dtype)


def triton_launches(modules):
    """Each Triton op, in each variant, dtype and shape of :data:`SHAPES`, as the layers call it: yields
    ``(op, where, call)``, ``call()`` making the op's launches."""
    coupling, actnorm, conv = modules["coupling"], modules["actnorm"], modules["conv1x1"]
    from flowkern.reference import conditioner_channels

    for c, size in COUPLING_SHAPES:
        for x_dtype, h_dtype in COUPLING_DTYPES:
            for mask in ("channel", "checkerboard"):
                for scale, layout in COUPLING_VARIANTS:
                    x = _image(c, size, x_dtype)
                    h = _image(conditioner_channels(c, mask, 0, scale)[1], size, h_dtype)
                    where = dict(C=c, HW=f"{size}x{size}", dtype=_name(x_dtype), h_dtype=_name(h_dtype), mask=mask,
                                 scale=scale, layout=layout)
                    for inverse in (False, True):
                        op = "coupling_inverse" if inverse else "coupling_forward"
                        run = coupling.launch_coupling_inverse if inverse else coupling.launch_coupling_forward
                        yield op, where, functools.partial(run, x, h, mask, 0, scale, 2.0, layout)
                        yield "coupling_backward", {**where, "inverse": inverse}, functools.partial(
                            coupling.launch_coupling_backward, torch.randn_like(x), torch.randn(BATCH).to(x_dtype),
                            x, h, mask, 0, scale, 2.0, layout, inverse)
    for c, size in SHAPES:
        for dtype in DTYPES:
            x, g = _image(c, size, dtype), _image(c, size, dtype)
            vector = torch.randn(c).to(dtype)
            where = dict(C=c, HW=f"{size}x{size}", dtype=_name(dtype))
            for inverse in (False, True):
                yield "actnorm", {**where, "inverse": inverse}, functools.partial(
                    actnorm.launch_actnorm, x, vector, vector, inverse)
                yield "actnorm_backward", {**where, "inverse": inverse}, functools.partial(
                    actnorm.launch_actnorm_backward, g, x, vector, vector, inverse)
            # the 1×1 conv: forward with bias, its input gradient (by Wᵀ), its weight gradient; a lower-precision
            # x also meets a float32 weight
            for w_dtype in sorted({dtype, torch.float32}, key=str):
                weight = torch.randn(c, c).to(w_dtype)
                where_w = {**where, "weight_dtype": _name(w_dtype)}
                yield "conv1x1", where_w, functools.partial(conv.launch_conv1x1, x, weight, vector.to(w_dtype))
                yield "conv1x1 by W^T", where_w, functools.partial(conv.launch_conv1x1, x, weight.t(), None)
            yield "conv1x1_weight_grad", where, functools.partial(conv.launch_conv1x1_weight_grad, g, x)
    lu_weight = modules["lu_weight"]
    for c in sorted({c for c, _ in SHAPES}):
        # the (C, C) algebra runs in the factors' float32, whatever the activations' dtype
        perm, square, vector = torch.eye(c)[torch.randperm(c)], torch.randn(c, c), torch.randn(c)
        factors = (perm, square, square, vector.sign(), vector, vector, vector)
        where = dict(C=c, dtype="float32")
        yield "folded_lu_weight", where, functools.partial(lu_weight.launch_folded_lu_weight, *factors)
        yield "folded_lu_weight_backward", where, functools.partial(
            lu_weight.launch_folded_lu_weight_backward, square, vector, torch.randn(()), *factors, square)
        yield "folded_lu_weight_inverse", where, functools.partial(lu_weight.launch_folded_lu_weight_inverse, *factors)
    fold = modules["fold_actnorms"]
    # a conditioner's first two weights, (hidden, C/2, 3, 3) and (hidden, hidden, 1, 1)
    for c, hidden in ((12, 64), (48, 512)):
        for dtype in DTYPES:
            w1, w2 = torch.randn(hidden, c // 2, 3, 3).to(dtype), torch.randn(hidden, hidden, 1, 1).to(dtype)
            log_scale = torch.randn(hidden).to(dtype)
            where = dict(C=c, HW=f"hidden {hidden}", dtype=_name(dtype))
            yield "fold_actnorms", where, functools.partial(fold.launch_fold_actnorms, w1, log_scale, w2, log_scale)
            yield "fold_actnorms_backward", where, functools.partial(
                fold.launch_fold_actnorms_backward, torch.randn_like(w1), w1, log_scale, torch.randn_like(w2), w2,
                log_scale)


def _name(dtype):
    return str(dtype).removeprefix("torch.")


def _ptxas():
    import triton.backends.nvidia as nvidia

    return os.path.join(os.path.dirname(nvidia.__file__), "bin", "ptxas")


def ptxas_resources(ptx, arch="sm_90a"):
    """Registers per thread and spill bytes of one kernel's PTX, from ``ptxas -v`` (as Triton invokes it)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "kernel.ptx")
        with open(source, "w") as f:
            f.write(ptx)
        log = subprocess.run([_ptxas(), "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", source,
                              "-o", os.path.join(tmp, "kernel.cubin")], capture_output=True, text=True, check=True)
    text = log.stdout + log.stderr
    registers = int(re.search(r"Used (\d+) registers", text).group(1))
    spill_stores = int(re.search(r"(\d+) bytes spill stores", text).group(1))
    spill_loads = int(re.search(r"(\d+) bytes spill loads", text).group(1))
    return registers, spill_stores + spill_loads


def blocks_per_sm(registers, threads, shared):
    """Resident blocks per SM that registers, warps and shared memory allow (0: the block cannot launch)."""
    warps = -(-threads // 32)
    per_warp = -(-registers * 32 // REGISTER_UNIT) * REGISTER_UNIT
    by_registers = REGISTERS_PER_SM // (per_warp * warps) if registers else MAX_BLOCKS_PER_SM
    by_warps = MAX_WARPS_PER_SM // warps
    if shared > MAX_SHARED_PER_BLOCK:
        return 0
    by_shared = SHARED_PER_SM // (shared + SHARED_RESERVED_PER_BLOCK)
    return min(by_registers, by_warps, by_shared, MAX_BLOCKS_PER_SM)


def check_triton(ops=None):
    """Compile every Triton kernel for sm_90 (those of the ops whose names contain one of ``ops``, if given);
    returns (rows, one per distinct compiled kernel; problems; Triton's version)."""
    import triton

    modules = _triton_modules()
    compiled, kernels, problems = [], {}, []
    with compiling_for_sm90(modules, compiled):
        for op, where, call in triton_launches(modules):
            if ops and not any(o in op for o in ops):
                continue
            start = len(compiled)
            try:
                call()
            except Exception as exc:  # a kernel that does not compile for sm_90
                problems.append(f"{op} {_describe(where)}: does not compile: {type(exc).__name__}: {exc}"[:2000])
                continue
            for name, constexprs, _, kernel in compiled[start:]:
                key = kernel.hash
                if key not in kernels:
                    registers, spills = ptxas_resources(kernel.asm["ptx"])
                    threads = kernel.metadata.num_warps * 32
                    shared = kernel.metadata.shared
                    kernels[key] = dict(op=op, kernel=name, constexprs=_constexprs(constexprs),
                                        dtype=where["dtype"], h_dtype=where.get("h_dtype"),
                                        weight_dtype=where.get("weight_dtype"), warps=kernel.metadata.num_warps,
                                        registers=registers, spill_bytes=spills, shared_bytes=shared,
                                        blocks_per_sm=blocks_per_sm(registers, threads, shared), shapes=[])
                row = kernels[key]
                row["shapes"].append(f"C={where['C']} {where.get('HW', '(C, C)')}")
                if row["spill_bytes"] and where["C"] in GLOW_CHANNELS:
                    problems.append(f"{name} ({op} {_describe(where)}): {row['spill_bytes']} B spilled at a Glow "
                                    f"shape ({row['registers']} registers)")
                if row["shared_bytes"] > MAX_SHARED_PER_BLOCK:
                    problems.append(f"{name} ({op} {_describe(where)}): {row['shared_bytes'] // 1024} KB of shared "
                                    f"memory, above the {MAX_SHARED_PER_BLOCK // 1024} KB a block may have")
    for row in kernels.values():
        row["shapes"] = sorted(set(row["shapes"]), key=lambda s: (int(s.split()[0][2:]), s))
    return list(kernels.values()), problems, triton.__version__


def _describe(where):
    return " ".join(f"{k}={v}" for k, v in where.items())


def _constexprs(constexprs):
    return {k: (v if isinstance(v, (int, bool, str)) or v is None else str(v)) for k, v in constexprs.items()}


def check_cuda():
    """Registers, local memory (spills) and static shared memory of each kernel in the built extension,
    from ``cuobjdump --dump-resource-usage``; (rows, problems, why it was skipped or None)."""
    import glob

    import flowkern

    libraries = glob.glob(os.path.join(os.path.dirname(flowkern.__file__), "_C*.so"))
    if not libraries:
        return [], [], "the extension is not built"
    cuobjdump = os.path.join(os.path.dirname(_ptxas()), "cuobjdump")
    out = subprocess.run([cuobjdump, "--dump-resource-usage", libraries[0]], capture_output=True, text=True)
    if "sm_90" not in out.stdout:
        return [], [], "the extension was built without CUDA kernels for sm_90"
    rows, problems = [], []
    for mangled, usage in re.findall(r"Function (\S+):\s*\n\s*(REG:.*)", out.stdout):
        fields = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", usage))
        name = _demangle(mangled)
        row = dict(kernel=name, registers=int(fields["REG"]), local_bytes=int(fields.get("LOCAL", 0)),
                   stack_bytes=int(fields.get("STACK", 0)), shared_bytes=int(fields.get("SHARED", 0)))
        row["blocks_per_sm"] = blocks_per_sm(row["registers"], 256, row["shared_bytes"])
        rows.append(row)
        if row["local_bytes"]:
            problems.append(f"CUDA {name}: {row['local_bytes']} B of local memory (spills)")
        if row["shared_bytes"] > MAX_SHARED_PER_BLOCK:
            problems.append(f"CUDA {name}: {row['shared_bytes']} B of static shared memory")
    return sorted(rows, key=lambda r: r["kernel"]), problems, None


def _demangle(name):
    try:
        return subprocess.run(["c++filt", name], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return name


def markdown(report):
    lines = [f"# sm_90 resources, compiled without a GPU (Triton {report['triton']})", ""]
    lines += ["Problems: none." if not report["problems"] else "Problems:", ""]
    lines += [f"- {p}" for p in report["problems"]]
    lines += ["", "## Triton kernels (one row per distinct compiled kernel)", "",
              "| op | kernel | dtype | constexprs | warps | registers | spill B | shared KB | blocks/SM | shapes |",
              "|---|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in report["triton_kernels"]:
        dtype = r["dtype"] + (f", h {r['h_dtype']}" if r["h_dtype"] not in (None, r["dtype"]) else "") + (
            f", W {r['weight_dtype']}" if r["weight_dtype"] not in (None, r["dtype"]) else "")
        consts = " ".join(f"{k}={v}" for k, v in r["constexprs"].items() if k != "ACC")
        lines.append(f"| {r['op']} | {r['kernel']} | {dtype} | {consts} | {r['warps']} | {r['registers']} | "
                     f"{r['spill_bytes']} | {r['shared_bytes'] / 1024:.1f} | {r['blocks_per_sm']} | "
                     f"{', '.join(r['shapes'])} |")
    lines += ["", "## CUDA kernels (the built extension, 256 threads per block)", ""]
    if report["cuda_skipped"]:
        lines.append(f"Not checked: {report['cuda_skipped']}.")
    else:
        lines += ["| kernel | registers | local B | shared B | blocks/SM |", "|---|---:|---:|---:|---:|"]
        lines += [f"| `{r['kernel']}` | {r['registers']} | {r['local_bytes']} | {r['shared_bytes']} | "
                  f"{r['blocks_per_sm']} |" for r in report["cuda_kernels"]]
    return "\n".join(lines) + "\n"


def drift(table):
    """The problem, if any, of the committed ``resources.md`` no longer being what this compile gives."""
    try:
        with open(os.path.join(RESULTS, "resources.md")) as f:
            committed = f.read()
    except OSError:
        committed = None
    if committed == table:
        return []
    return [f"{os.path.relpath(RESULTS)}/resources.md differs from this compile's: run `make gpu-check-update` "
            "and commit the tables it writes"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=BUILD, help="folder for resources.json and resources.md (default build/)")
    parser.add_argument("--update", action="store_true", help="also rewrite the committed tables in "
                        "benchmarks/results/sm90-static/ (without it, a difference from them is a problem)")
    parser.add_argument("--ops", default="", help="comma-separated substrings of the ops to compile (default: all)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    triton_rows, triton_problems, triton_version = check_triton(args.ops.split(",") if args.ops else None)
    cuda_rows, cuda_problems, cuda_skipped = check_cuda()
    report = dict(triton=triton_version, triton_kernels=triton_rows, cuda_kernels=cuda_rows,
                  cuda_skipped=cuda_skipped, problems=triton_problems + cuda_problems)
    for folder in [args.out] + ([RESULTS] if args.update else []):
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "resources.json"), "w") as f:
            json.dump(report, f)
        with open(os.path.join(folder, "resources.md"), "w") as f:
            f.write(markdown(report))
    if not args.update and not args.ops:
        report["problems"] += drift(markdown(report))
    print(f"{len(triton_rows)} Triton kernels compiled for sm_90, {len(cuda_rows)} CUDA kernels read"
          + (f" (CUDA not checked: {cuda_skipped})" if cuda_skipped else "") + f"; tables in {args.out}")
    for problem in report["problems"]:
        print(f"problem: {problem}", file=sys.stderr)
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
