"""What every Triton op shares: launch checks, strides, dtypes and torch.library registration."""
import os

import torch
import triton
import triton.language as tl

def interpreting() -> bool:
    """True when Triton runs kernels on the CPU with its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_launchable(t: torch.Tensor, name: str) -> None:
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu" and interpreting():
        if t.dtype == torch.bfloat16:
            raise TypeError(f"{name}: the Triton interpreter computes bfloat16 wrongly; use a CUDA tensor, "
                            "another dtype, or another backend")
        return
    raise ValueError(f"{name}: the triton backend needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), "
                     f"got a tensor on {t.device}")


# Tests set this to fill every kernel output with NaN before the kernel runs, so an unwritten element shows.
POISON_OUTPUTS = False


def empty(shape, dtype, device) -> torch.Tensor:
    """Uninitialised storage for a kernel's output (NaN-filled while ``POISON_OUTPUTS`` is set)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    return out.fill_(float("nan")) if POISON_OUTPUTS else out


def inner_dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` (N, C, H, W) if each (H, W) plane is dense, else a contiguous copy.

    Kernels take strides for N and C only, so the views ``chunk`` returns run without a copy.
    """
    height, width = t.shape[2], t.shape[3]
    if (width == 1 or t.stride(3) == 1) and (height == 1 or t.stride(2) == width):
        return t
    return t.contiguous()


def accumulator(dtype: torch.dtype):
    """Triton arithmetic dtype for a tensor dtype: float64 stays, everything else is float32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def pixel_block(pixels: int, largest: int = 1024) -> int:
    return max(16, min(largest, triton.next_power_of_2(pixels)))


def warps_for(block: int, per_thread: int = 4) -> int:
    """Warps for a program of ``block`` pixels, ``per_thread`` pixels a thread (up to 8 warps). At most 4 for the
    couplings, whose per-pixel math then fits in registers without spilling (sm_90 static compile,
    ``python -m benchmarks.gpu_check``)."""
    return max(1, min(8, block // (32 * per_thread)))
