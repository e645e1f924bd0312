"""Where the CUDA toolkit and the CUDA torch wheel's own CUDA files are, for setup.py and CMake.

    python tools/cuda_toolkit.py --cmake-args   # hints for building CMakeLists.txt against the pip wheel
"""
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys


def _toolkit_of(nvcc):
    """The toolkit directory an nvcc belongs to (nvcc may be a wrapper script elsewhere)."""
    try:
        out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
        match = re.search(r"TOP=(\S+)", out.stdout + out.stderr)
        if match:
            return os.path.realpath(match.group(1))  # TOP is the toolkit root, written as bin/..
    except (OSError, subprocess.SubprocessError):
        pass
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def find_cuda_home():
    """$CUDA_HOME or $CUDA_PATH, else the toolkit of the nvcc on PATH (or /usr/local/cuda); None if none."""
    for key in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(key):
            return os.environ[key]
    nvcc = shutil.which("nvcc")
    if nvcc is None and os.path.exists("/usr/local/cuda/bin/nvcc"):
        nvcc = "/usr/local/cuda/bin/nvcc"
    return _toolkit_of(nvcc) if nvcc else None


def wheel_cuda_dirs(kind):
    """The CUDA torch wheel's ``nvidia/cu<major>/<kind>`` folders (kind: include or lib)."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    dirs = []
    for base in spec.submodule_search_locations:
        dirs += sorted(glob.glob(os.path.join(base, "cu[0-9]*", kind)))
    return dirs


def cmake_args():
    """CMake definitions that let torch's CMake files find CUDA when torch is the CUDA pip wheel."""
    import torch

    args = [f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"]
    cuda_home = find_cuda_home()
    if torch.version.cuda is None or cuda_home is None:
        return args
    args += [f"-DCUDA_TOOLKIT_ROOT_DIR={cuda_home}", f"-DCUDAToolkit_ROOT={cuda_home}",
             f"-DCMAKE_CUDA_COMPILER={os.path.join(cuda_home, 'bin', 'nvcc')}"]
    for lib_dir in wheel_cuda_dirs("lib"):
        nvrtc = sorted(glob.glob(os.path.join(lib_dir, "libnvrtc.so*")))
        if nvrtc and not os.path.exists(os.path.join(cuda_home, "lib64", "libnvrtc.so")):
            args.append(f"-DCUDA_nvrtc_LIBRARY={nvrtc[0]}")
            break
    return args


if __name__ == "__main__":
    if sys.argv[1:] != ["--cmake-args"]:
        sys.exit(__doc__)
    print(" ".join(cmake_args()))
