"""Batched importance reduction in Triton: many tensors, one launch.

Every tensor ``x_i`` ([..., C_i], viewed as [M_i, C_i]) is cut into tiles of ``BLOCK_C``
channels x ``rows_per_tile`` rows; a tile table (one int64 row per program: the addresses of x
and g, M, C, the row range, the first channel, the output offset) lets one launch walk all
tensors whatever their shapes. Each program sums |x|, x^2, |x*g| over its rows in fp32 and
atomically adds the three partial vectors to the packed output (3*C_i floats per tensor).
Tensors are grouped by (x dtype, g dtype) because a Triton pointer type is fixed per compile;
in practice every layer has one dtype, so that is one launch.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._common import LaunchConfig, dtype_name, is_interpret

BLOCK_C = 64
BLOCK_R = 64             # rows per loop step on a GPU (kernels/aot.py compiles it)
INTERPRET_BLOCK_R = 32
NUM_WARPS, NUM_STAGES = 4, 3  # Triton's defaults
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_TABLE_COLS = 8


@triton.jit
def _importance_kernel(table_ptr, out_ptr, xref_ptr, gref_ptr,
                       HAS_G: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # xref/gref: one tensor of the group, passed only for its element type (the addresses in
    # the table are cast to pointers of that type, as in Triton's grouped-GEMM tutorial)
    pid = tl.program_id(0)
    row = table_ptr + pid * 8
    x_ptr = tl.load(row + 0).to(tl.pointer_type(xref_ptr.dtype.element_ty))
    C = tl.load(row + 3)
    r0 = tl.load(row + 4)
    r1 = tl.load(row + 5)
    c0 = tl.load(row + 6)
    o_off = tl.load(row + 7)
    cols = c0 + tl.arange(0, BLOCK_C)
    cmask = cols < C
    acc_abs = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_sq = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_xg = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_G:
        g_ptr = tl.load(row + 1).to(tl.pointer_type(gref_ptr.dtype.element_ty))
    for r in range(r0, r1, BLOCK_R):
        rows = r + tl.arange(0, BLOCK_R)
        mask = (rows < r1)[:, None] & cmask[None, :]
        offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        acc_abs += tl.sum(tl.abs(x), axis=0)
        acc_sq += tl.sum(x * x, axis=0)
        if HAS_G:
            g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            acc_xg += tl.sum(tl.abs(x * g), axis=0)
    tl.atomic_add(out_ptr + o_off + cols, acc_abs, mask=cmask)
    tl.atomic_add(out_ptr + o_off + C + cols, acc_sq, mask=cmask)
    if HAS_G:
        tl.atomic_add(out_ptr + o_off + 2 * C + cols, acc_xg, mask=cmask)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _rows_per_tile(total_elems: int, device: torch.device) -> int:
    """Rows per program: enough programs to fill the GPU, enough rows to amortize the atomics."""
    if is_interpret():
        return 1 << 20  # the interpreter runs programs one by one: as few as possible
    sms = _num_sms(device)
    target = max(1, total_elems // (BLOCK_C * sms * 8))  # ~8 programs per SM
    return max(64, min(4096, triton.next_power_of_2(target)))


def importance_reduce_many(xs: list[torch.Tensor], gs: list[torch.Tensor | None]
                           ) -> list[torch.Tensor]:
    """Float32 [3, C_i] per tensor (sum |x|, sum x^2, sum |x*g|); inputs already validated."""
    if not xs:
        return []
    device = xs[0].device
    if device.type != "cuda" and not is_interpret():
        raise RuntimeError(f"importance_reduce_many: the Triton backend needs CUDA tensors (or "
                           f"TRITON_INTERPRET=1 for the CPU interpreter), got {device}")
    sizes = [3 * x.shape[-1] for x in xs]
    out = torch.zeros(sum(sizes), dtype=torch.float32, device=device)
    keep_alive = []  # contiguous copies must outlive the launch
    groups: dict[tuple, list] = {}
    o_off = 0
    total = sum(x.numel() for x in xs)
    for i, (x, g) in enumerate(zip(xs, gs)):
        C = x.shape[-1]
        M = x.numel() // C if C else 0
        if M and C:
            xc = x.reshape(-1, C).contiguous()
            gc = g.reshape(-1, C).contiguous() if g is not None else None
            keep_alive += [xc, gc]
            groups.setdefault((xc.dtype, gc.dtype if gc is not None else None), []).append(
                (xc, gc, M, C, o_off))
        o_off += sizes[i]
    for (xdt, gdt), items in groups.items():
        # fp64 inputs are reduced in fp32 like the others (the reference keeps fp64 exact)
        rpt = _rows_per_tile(total, device)
        block_r = INTERPRET_BLOCK_R if is_interpret() else BLOCK_R
        rows = []
        for xc, gc, M, C, off in items:
            for c0 in range(0, C, BLOCK_C):
                for r0 in range(0, M, rpt):
                    rows.append([xc.data_ptr(), gc.data_ptr() if gc is not None else 0, M, C,
                                 r0, min(M, r0 + rpt), c0, off])
        table = torch.tensor(rows, dtype=torch.int64, device=device)
        xref = items[0][0]
        gref = items[0][1] if gdt is not None else xref
        _importance_kernel[(len(rows),)](
            table, out, xref, gref, HAS_G=gdt is not None, BLOCK_R=block_r, BLOCK_C=BLOCK_C,
            num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    del keep_alive
    return [t.view(3, s // 3) for t, s in zip(out.split(sizes), sizes)]


def launch_configs():
    """Every variant importance_reduce_many() can launch on a GPU: each x dtype, without g or
    with g of each dtype (a launch per (x dtype, g dtype) group; without g, gref is x)."""
    for xdt in _DTYPES:
        for gdt in (None,) + _DTYPES:
            yield LaunchConfig(
                _importance_kernel, f"x={dtype_name(xdt)} g={dtype_name(gdt) if gdt else '-'} "
                f"BLOCK_R={BLOCK_R} BLOCK_C={BLOCK_C} warps={NUM_WARPS} stages={NUM_STAGES}",
                dict(HAS_G=gdt is not None, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C),
                dict(table_ptr=torch.int64, out_ptr=torch.float32, xref_ptr=xdt,
                     gref_ptr=gdt or xdt), NUM_WARPS, NUM_STAGES,
                quick=gdt in (None, torch.float32) and xdt in (torch.float32, torch.bfloat16))
