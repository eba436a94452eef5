"""Helpers shared by the Triton kernels: interpreter detection, dtype mapping, sizes, and the
description of one launch configuration (what kernels/aot.py compiles for real GPU targets)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
       torch.float64: tl.float64}
# Triton's names of the types in a kernel signature ("*fp16" is a pointer to fp16)
_SIG = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
        torch.float64: "fp64", torch.int32: "i32", torch.int64: "i64"}


def is_interpret() -> bool:
    """True when Triton runs its CPU interpreter (TRITON_INTERPRET=1 set before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def tl_dtype(dt: torch.dtype):
    try:
        return _TL[dt]
    except KeyError:
        raise TypeError(f"pyengine Triton kernels take float32/float16/bfloat16/float64 tensors, "
                        f"got {dt}") from None


def dtype_name(dt: torch.dtype) -> str:
    """Triton's signature name of a torch dtype: fp32, fp16, bf16, fp64, i32, i64."""
    return _SIG[dt]


def pow2_at_least(n: int, lo: int = 16) -> int:
    """Tile width for a head or GEMM dim: next power of two, at least ``lo`` (tl.dot needs 16)."""
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


def check_device(name: str, *tensors) -> None:
    """Triton runs on CUDA tensors, or on CPU tensors under the interpreter."""
    for t in tensors:
        if t is None:
            continue
        if t.device.type != "cuda" and not is_interpret():
            raise RuntimeError(f"{name}: the Triton backend needs CUDA tensors (or "
                               f"TRITON_INTERPRET=1 for the CPU interpreter), got {t.device}")


# Tests set POISON = True: every output buffer a kernel must fully write starts as NaN, so a
# tile the kernel forgets shows up instead of passing on leftover memory.
POISON = False


def empty(shape, dtype, device):
    if POISON:
        return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)
    return torch.empty(tuple(shape), dtype=dtype, device=device)


@dataclass(frozen=True, eq=False)
class LaunchConfig:
    """One compiled variant of a kernel that a launcher can choose: its constexprs, the element
    types of its pointer arguments, num_warps and num_stages. Every kernel module lists all of
    its variants in ``launch_configs()``, built by the same functions the launchers call, and
    kernels/aot.py compiles them for sm_80/sm_90. Arguments that are neither constexprs nor
    pointers are 32-bit ints."""
    kernel: object                 # the @triton.jit function
    label: str                     # what varies, for the log: "fp16 BLOCK_M=128 ... warps=4"
    constexprs: dict               # every constexpr argument -> its value
    pointers: dict                 # every pointer argument -> the torch dtype of its elements
    num_warps: int = 4
    num_stages: int = 3
    # int arguments that are 1 for contiguous tensors: the JIT turns an int argument equal to 1
    # into a constant, so the usual (contiguous) launch compiles with them fixed to 1
    unit: frozenset = frozenset()
    # in the representative subset (aot --quick, which the default test suite compiles): the
    # narrowest and the widest tiles per kernel and dtype, each call site of a GEMM
    quick: bool = False

    @property
    def kernel_name(self) -> str:
        """module.kernel, the module by its file name (the same whatever package imports it)."""
        fn = getattr(self.kernel, "fn", self.kernel)
        module = os.path.splitext(os.path.basename(fn.__code__.co_filename))[0]
        return f"{module}.{fn.__name__}"
