"""Builds flowkern._C, the compiled ops of backend "native"; package metadata lives in pyproject.toml.

A CUDA build when torch has CUDA and nvcc is found, a CPU build otherwise. Switches:
FLOWKERN_NO_CUDA=1 (CPU build), FLOWKERN_FORCE_CUDA=1 (fail if CUDA cannot be built),
FLOWKERN_NO_EXTENSION=1 (no compiled ops at all), TORCH_CUDA_ARCH_LIST (default: the visible GPUs, else 9.0).
"""
import glob
import os
import platform
import re
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)
from tools.cuda_toolkit import find_cuda_home, wheel_cuda_dirs  # noqa: E402


def _flag(name):
    return os.environ.get(name, "0") not in ("", "0")


def _extensions():
    if _flag("FLOWKERN_NO_EXTENSION"):
        return [], {}
    cuda_home = find_cuda_home()
    if cuda_home:
        os.environ.setdefault("CUDA_HOME", cuda_home)  # read when torch.utils.cpp_extension is imported
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    use_cuda = torch.version.cuda is not None and cuda_home is not None and not _flag("FLOWKERN_NO_CUDA")
    if _flag("FLOWKERN_FORCE_CUDA"):
        if torch.version.cuda is None or cuda_home is None:
            raise RuntimeError("FLOWKERN_FORCE_CUDA=1 but torch has no CUDA or no nvcc was found")
        use_cuda = True
    if use_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"  # no GPU to ask: Hopper

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-fopenmp", "-DFLOWKERN_PYTHON_MODULE"]  # at::parallel_for is OpenMP in torch's headers
    cpu_features = ()
    if platform.machine() in ("x86_64", "AMD64") and all(_cpu_has(f) for f in AVX2):
        cpu_features = AVX2
        cxx += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]  # at::vec, 256 bits
    _record_build(cpu_features)
    extra = {"cxx": cxx}
    kwargs = dict(name="flowkern._C", sources=sources, include_dirs=[os.path.join(ROOT, "csrc")],
                  extra_compile_args=extra, extra_link_args=["-fopenmp"], py_limited_api=False)
    if use_cuda:
        kwargs["sources"] += sorted(glob.glob("csrc/cuda/*.cu"))
        kwargs["include_dirs"] += wheel_cuda_dirs("include")
        extra["nvcc"] = ["-O3", "-lineinfo", "-DFLOWKERN_PYTHON_MODULE"]
        ext = CUDAExtension(**kwargs)
    else:
        ext = CppExtension(**kwargs)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


AVX2 = ("avx2", "fma", "f16c")


def _record_build(cpu_features):
    """Write flowkern/_build.py: the CPU features the extension's code needs, which flowkern checks before it
    loads the extension (code built for AVX2 dies with SIGILL on a CPU without it)."""
    with open(os.path.join(ROOT, "flowkern", "_build.py"), "w") as f:
        f.write('"""Written by setup.py when it builds flowkern._C."""\n'
                f"CPU_FEATURES = {tuple(cpu_features)!r}  # what the extension's CPU code needs\n")


def _cpu_has(feature):
    try:
        with open("/proc/cpuinfo") as f:
            return re.search(rf"\b{feature}\b", f.read()) is not None
    except OSError:
        return False


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
