"""Varlen-head attention in Triton (flash-attention style), forward and backward.

The heads of one layer have their own q/k width ``dq_h`` and v width ``dv_h`` and are packed
contiguously: ``q``/``k`` are [B, N, sum(dq)], ``v`` and the output [B, N, sum(dv)]. All heads
of the layer run in ONE launch over (query blocks, batch x heads); a per-head table gives each
program its head's offsets, dims, softmax scale and bucket. No head is padded to the widest
head of the layer: a bucket is the pair of tile widths of the head's OWN dims (next power of
two, at least 16 because tl.dot needs 16), each program branches on its bucket to a tile body
compiled for that width (up to MAX_BUCKETS = 4 shapes per launch; a layer with more shapes
takes another launch), and loads q/k/v through masks up to that width. A head of 16 dims
therefore does a quarter of the matrix work of a head of 64. Sequence lengths need not be
multiples of the block (masks).

Head dims go up to MAX_HEAD_DIM = 256 (tiles of 16..256): the widest that kernels/aot.py
compiles and checks for sm_80/sm_90; a wider head is refused with a ValueError.

A head with ``dq == 0`` loads an all-zero q, so its scores are all zero and its attention is
uniform (the mean of v), exactly as the reference defines it. Heads with ``dv == 0`` produce
no output columns and are skipped (their q/k gradients are zero).

Forward stores the log-sum-exp (base 2) per row, [B, H, N] fp32, for the backward, which is
the FA2 split: a preprocessing kernel for delta = rowsum(dO * O), one kernel for dK/dV
(looping over query blocks) and one for dQ (looping over key blocks); no atomics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (LaunchConfig, check_device, dtype_name, empty, is_interpret,
                      pow2_at_least)

LOG2E = 1.4426950408889634
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _head_row(tab_ptr, scale_ptr, hb):
    """One head's table row: q/k offset, q/k dim, v offset, v dim, head index, scale."""
    qk_off = tl.load(tab_ptr + hb * 6 + 0)
    dq = tl.load(tab_ptr + hb * 6 + 1)
    v_off = tl.load(tab_ptr + hb * 6 + 2)
    dv = tl.load(tab_ptr + hb * 6 + 3)
    h = tl.load(tab_ptr + hb * 6 + 4)
    scale = tl.load(scale_ptr + hb)
    return qk_off, dq, v_off, dv, h, scale


@triton.jit
def _fwd_tile(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, tab_ptr, scale_ptr, b, hb, pid_m,
              sqb, sqn, skb, skn, svb, svn, sob, son, N, H_total,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BDQ: tl.constexpr,
              BDV: tl.constexpr, IEEE: tl.constexpr):
    """One query block of one head, with tiles of THIS head's width (BDQ x BDV)."""
    qk_off, dq, v_off, dv, h, scale = _head_row(tab_ptr, scale_ptr, hb)
    qk_scale = scale * 1.4426950408889634  # exp2 instead of exp
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_dq = tl.arange(0, BDQ)
    offs_dv = tl.arange(0, BDV)
    m_mask = offs_m < N
    dq_mask = offs_dq < dq
    dv_mask = offs_dv < dv
    b64 = b.to(tl.int64)
    q_base = q_ptr + b64 * sqb + qk_off
    k_base = k_ptr + b64 * skb + qk_off
    v_base = v_ptr + b64 * svb + v_off
    q = tl.load(q_base + offs_m[:, None] * sqn + offs_dq[None, :],
                mask=m_mask[:, None] & dq_mask[None, :], other=0.0)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BDV], dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        n_idx = start_n + offs_n
        n_mask = n_idx < N
        kT = tl.load(k_base + n_idx[None, :] * skn + offs_dq[:, None],
                     mask=dq_mask[:, None] & n_mask[None, :], other=0.0)
        if IEEE:
            s = tl.dot(q, kT, input_precision="ieee")
        else:
            s = tl.dot(q, kT)
        s = tl.where(n_mask[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vt = tl.load(v_base + n_idx[:, None] * svn + offs_dv[None, :],
                     mask=n_mask[:, None] & dv_mask[None, :], other=0.0)
        acc = acc * alpha[:, None]
        if IEEE:
            acc += tl.dot(p.to(vt.dtype), vt, input_precision="ieee")
        else:
            acc += tl.dot(p.to(vt.dtype), vt)
        m_i = m_new
    acc = acc / l_i[:, None]
    o_base = o_ptr + b64 * sob + v_off
    tl.store(o_base + offs_m[:, None] * son + offs_dv[None, :], acc.to(o_ptr.dtype.element_ty),
             mask=m_mask[:, None] & dv_mask[None, :])
    lse = m_i + tl.log2(l_i)
    tl.store(lse_ptr + (b64 * H_total + h) * N + offs_m, lse, mask=m_mask)


@triton.jit
def _fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, tab_ptr, scale_ptr,
                sqb, sqn, skb, skn, svb, svn, sob, son, N, H_launch, H_total,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr,
                BDQ0: tl.constexpr, BDV0: tl.constexpr, BDQ1: tl.constexpr, BDV1: tl.constexpr,
                BDQ2: tl.constexpr, BDV2: tl.constexpr, BDQ3: tl.constexpr, BDV3: tl.constexpr,
                IEEE: tl.constexpr):
    """All heads of a layer in one launch: each program branches on its head's bucket (column
    5 of the table) to tiles of that bucket's width; NB (<= 4) buckets are compiled in."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H_launch
    hb = pid_bh % H_launch
    bucket = tl.load(tab_ptr + hb * 6 + 5)
    if bucket == 0:
        _fwd_tile(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, tab_ptr, scale_ptr, b, hb, pid_m,
                  sqb, sqn, skb, skn, svb, svn, sob, son, N, H_total,
                  BLOCK_M, BLOCK_N, BDQ0, BDV0, IEEE)
    if NB > 1:
        if bucket == 1:
            _fwd_tile(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, tab_ptr, scale_ptr, b, hb, pid_m,
                      sqb, sqn, skb, skn, svb, svn, sob, son, N, H_total,
                      BLOCK_M, BLOCK_N, BDQ1, BDV1, IEEE)
    if NB > 2:
        if bucket == 2:
            _fwd_tile(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, tab_ptr, scale_ptr, b, hb, pid_m,
                      sqb, sqn, skb, skn, svb, svn, sob, son, N, H_total,
                      BLOCK_M, BLOCK_N, BDQ2, BDV2, IEEE)
    if NB > 3:
        if bucket == 3:
            _fwd_tile(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, tab_ptr, scale_ptr, b, hb, pid_m,
                      sqb, sqn, skb, skn, svb, svn, sob, son, N, H_total,
                      BLOCK_M, BLOCK_N, BDQ3, BDV3, IEEE)


@triton.jit
def _bwd_delta_kernel(o_ptr, do_ptr, delta_ptr, tab_ptr, sob, son, sdob, sdon,
                      N, H_launch, H_total, BLOCK_M: tl.constexpr, BDV: tl.constexpr):
    """delta = rowsum(dO * O) per head (memory-bound: one width, the launch's widest v)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H_launch
    hb = pid_bh % H_launch
    v_off = tl.load(tab_ptr + hb * 6 + 2)
    dv = tl.load(tab_ptr + hb * 6 + 3)
    h = tl.load(tab_ptr + hb * 6 + 4)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BDV)
    mask = (offs_m < N)[:, None] & (offs_dv < dv)[None, :]
    b64 = b.to(tl.int64)
    o = tl.load(o_ptr + b64 * sob + v_off + offs_m[:, None] * son + offs_dv[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + b64 * sdob + v_off + offs_m[:, None] * sdon + offs_dv[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(delta_ptr + (b64 * H_total + h) * N + offs_m, tl.sum(o * do, axis=1),
             mask=offs_m < N)


@triton.jit
def _dkdv_tile(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, tab_ptr,
               scale_ptr, b, hb, pid_n,
               sqb, sqn, skb, skn, svb, svn, sdob, sdon, sgkb, sgkn, sgvb, sgvn, N, H_total,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BDQ: tl.constexpr,
               BDV: tl.constexpr, IEEE: tl.constexpr):
    """dK, dV of one key block of one head: loop over the query blocks (FA2 backward)."""
    qk_off, dq, v_off, dv, h, scale = _head_row(tab_ptr, scale_ptr, hb)
    qk_scale = scale * 1.4426950408889634
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_dq = tl.arange(0, BDQ)
    offs_dv = tl.arange(0, BDV)
    n_mask = offs_n < N
    dq_mask = offs_dq < dq
    dv_mask = offs_dv < dv
    b64 = b.to(tl.int64)
    k = tl.load(k_ptr + b64 * skb + qk_off + offs_n[:, None] * skn + offs_dq[None, :],
                mask=n_mask[:, None] & dq_mask[None, :], other=0.0)
    v = tl.load(v_ptr + b64 * svb + v_off + offs_n[:, None] * svn + offs_dv[None, :],
                mask=n_mask[:, None] & dv_mask[None, :], other=0.0)
    dk = tl.zeros([BLOCK_N, BDQ], dtype=tl.float32)
    dvacc = tl.zeros([BLOCK_N, BDV], dtype=tl.float32)
    row_base = (b64 * H_total + h) * N
    for start_m in range(0, N, BLOCK_M):
        m_idx = start_m + offs_m
        m_mask = m_idx < N
        qT = tl.load(q_ptr + b64 * sqb + qk_off + m_idx[None, :] * sqn + offs_dq[:, None],
                     mask=dq_mask[:, None] & m_mask[None, :], other=0.0)
        do = tl.load(do_ptr + b64 * sdob + v_off + m_idx[:, None] * sdon + offs_dv[None, :],
                     mask=m_mask[:, None] & dv_mask[None, :], other=0.0)
        lse = tl.load(lse_ptr + row_base + m_idx, mask=m_mask, other=0.0)
        delta = tl.load(delta_ptr + row_base + m_idx, mask=m_mask, other=0.0)
        if IEEE:
            sT = tl.dot(k, qT, input_precision="ieee")
        else:
            sT = tl.dot(k, qT)
        pT = tl.exp2(sT * qk_scale - lse[None, :])
        pT = tl.where(m_mask[None, :], pT, 0.0)
        if IEEE:
            dvacc += tl.dot(pT.to(do.dtype), do, input_precision="ieee")
            dpT = tl.dot(v, tl.trans(do), input_precision="ieee")
        else:
            dvacc += tl.dot(pT.to(do.dtype), do)
            dpT = tl.dot(v, tl.trans(do))
        dsT = pT * (dpT - delta[None, :])
        if IEEE:
            dk += tl.dot(dsT.to(qT.dtype), tl.trans(qT), input_precision="ieee")
        else:
            dk += tl.dot(dsT.to(qT.dtype), tl.trans(qT))
    dk = dk * scale
    tl.store(dk_ptr + b64 * sgkb + qk_off + offs_n[:, None] * sgkn + offs_dq[None, :],
             dk.to(dk_ptr.dtype.element_ty), mask=n_mask[:, None] & dq_mask[None, :])
    tl.store(dv_ptr + b64 * sgvb + v_off + offs_n[:, None] * sgvn + offs_dv[None, :],
             dvacc.to(dv_ptr.dtype.element_ty), mask=n_mask[:, None] & dv_mask[None, :])


@triton.jit
def _bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                     tab_ptr, scale_ptr,
                     sqb, sqn, skb, skn, svb, svn, sdob, sdon, sgkb, sgkn, sgvb, sgvn,
                     N, H_launch, H_total,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr,
                     BDQ0: tl.constexpr, BDV0: tl.constexpr, BDQ1: tl.constexpr,
                     BDV1: tl.constexpr, BDQ2: tl.constexpr, BDV2: tl.constexpr,
                     BDQ3: tl.constexpr, BDV3: tl.constexpr, IEEE: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H_launch
    hb = pid_bh % H_launch
    bucket = tl.load(tab_ptr + hb * 6 + 5)
    if bucket == 0:
        _dkdv_tile(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, tab_ptr,
                   scale_ptr, b, hb, pid_n, sqb, sqn, skb, skn, svb, svn, sdob, sdon,
                   sgkb, sgkn, sgvb, sgvn, N, H_total, BLOCK_M, BLOCK_N, BDQ0, BDV0, IEEE)
    if NB > 1:
        if bucket == 1:
            _dkdv_tile(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                       tab_ptr, scale_ptr, b, hb, pid_n, sqb, sqn, skb, skn, svb, svn, sdob,
                       sdon, sgkb, sgkn, sgvb, sgvn, N, H_total, BLOCK_M, BLOCK_N, BDQ1, BDV1,
                       IEEE)
    if NB > 2:
        if bucket == 2:
            _dkdv_tile(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                       tab_ptr, scale_ptr, b, hb, pid_n, sqb, sqn, skb, skn, svb, svn, sdob,
                       sdon, sgkb, sgkn, sgvb, sgvn, N, H_total, BLOCK_M, BLOCK_N, BDQ2, BDV2,
                       IEEE)
    if NB > 3:
        if bucket == 3:
            _dkdv_tile(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                       tab_ptr, scale_ptr, b, hb, pid_n, sqb, sqn, skb, skn, svb, svn, sdob,
                       sdon, sgkb, sgkn, sgvb, sgvn, N, H_total, BLOCK_M, BLOCK_N, BDQ3, BDV3,
                       IEEE)


@triton.jit
def _dq_tile(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, tab_ptr, scale_ptr,
             b, hb, pid_m, sqb, sqn, skb, skn, svb, svn, sdob, sdon, sgqb, sgqn, N, H_total,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BDQ: tl.constexpr,
             BDV: tl.constexpr, IEEE: tl.constexpr):
    """dQ of one query block of one head: loop over the key blocks (FA2 backward)."""
    qk_off, dq, v_off, dv, h, scale = _head_row(tab_ptr, scale_ptr, hb)
    qk_scale = scale * 1.4426950408889634
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_dq = tl.arange(0, BDQ)
    offs_dv = tl.arange(0, BDV)
    m_mask = offs_m < N
    dq_mask = offs_dq < dq
    dv_mask = offs_dv < dv
    b64 = b.to(tl.int64)
    q = tl.load(q_ptr + b64 * sqb + qk_off + offs_m[:, None] * sqn + offs_dq[None, :],
                mask=m_mask[:, None] & dq_mask[None, :], other=0.0)
    do = tl.load(do_ptr + b64 * sdob + v_off + offs_m[:, None] * sdon + offs_dv[None, :],
                 mask=m_mask[:, None] & dv_mask[None, :], other=0.0)
    row_base = (b64 * H_total + h) * N
    lse = tl.load(lse_ptr + row_base + offs_m, mask=m_mask, other=0.0)
    delta = tl.load(delta_ptr + row_base + offs_m, mask=m_mask, other=0.0)
    dqacc = tl.zeros([BLOCK_M, BDQ], dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        n_idx = start_n + offs_n
        n_mask = n_idx < N
        kT = tl.load(k_ptr + b64 * skb + qk_off + n_idx[None, :] * skn + offs_dq[:, None],
                     mask=dq_mask[:, None] & n_mask[None, :], other=0.0)
        vT = tl.load(v_ptr + b64 * svb + v_off + n_idx[None, :] * svn + offs_dv[:, None],
                     mask=dv_mask[:, None] & n_mask[None, :], other=0.0)
        if IEEE:
            s = tl.dot(q, kT, input_precision="ieee")
            dp = tl.dot(do, vT, input_precision="ieee")
        else:
            s = tl.dot(q, kT)
            dp = tl.dot(do, vT)
        p = tl.exp2(s * qk_scale - lse[:, None])
        p = tl.where(n_mask[None, :], p, 0.0)
        ds = p * (dp - delta[:, None])
        if IEEE:
            dqacc += tl.dot(ds.to(kT.dtype), tl.trans(kT), input_precision="ieee")
        else:
            dqacc += tl.dot(ds.to(kT.dtype), tl.trans(kT))
    dqacc = dqacc * scale
    tl.store(dq_ptr + b64 * sgqb + qk_off + offs_m[:, None] * sgqn + offs_dq[None, :],
             dqacc.to(dq_ptr.dtype.element_ty), mask=m_mask[:, None] & dq_mask[None, :])


@triton.jit
def _bwd_dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, tab_ptr, scale_ptr,
                   sqb, sqn, skb, skn, svb, svn, sdob, sdon, sgqb, sgqn,
                   N, H_launch, H_total,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr,
                   BDQ0: tl.constexpr, BDV0: tl.constexpr, BDQ1: tl.constexpr,
                   BDV1: tl.constexpr, BDQ2: tl.constexpr, BDV2: tl.constexpr,
                   BDQ3: tl.constexpr, BDV3: tl.constexpr, IEEE: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H_launch
    hb = pid_bh % H_launch
    bucket = tl.load(tab_ptr + hb * 6 + 5)
    if bucket == 0:
        _dq_tile(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, tab_ptr, scale_ptr,
                 b, hb, pid_m, sqb, sqn, skb, skn, svb, svn, sdob, sdon, sgqb, sgqn, N,
                 H_total, BLOCK_M, BLOCK_N, BDQ0, BDV0, IEEE)
    if NB > 1:
        if bucket == 1:
            _dq_tile(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, tab_ptr,
                     scale_ptr, b, hb, pid_m, sqb, sqn, skb, skn, svb, svn, sdob, sdon, sgqb,
                     sgqn, N, H_total, BLOCK_M, BLOCK_N, BDQ1, BDV1, IEEE)
    if NB > 2:
        if bucket == 2:
            _dq_tile(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, tab_ptr,
                     scale_ptr, b, hb, pid_m, sqb, sqn, skb, skn, svb, svn, sdob, sdon, sgqb,
                     sgqn, N, H_total, BLOCK_M, BLOCK_N, BDQ2, BDV2, IEEE)
    if NB > 3:
        if bucket == 3:
            _dq_tile(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, tab_ptr,
                     scale_ptr, b, hb, pid_m, sqb, sqn, skb, skn, svb, svn, sdob, sdon, sgqb,
                     sgqn, N, H_total, BLOCK_M, BLOCK_N, BDQ3, BDV3, IEEE)


# ---- host side ---------------------------------------------------------------------------------
MAX_HEAD_DIM = 256  # widest q/k or v head accepted: the widest tiles kernels/aot.py compiles
WIDTHS = (16, 32, 64, 128, 256)  # the tile widths pow2_at_least() gives for dims 0..MAX_HEAD_DIM

# (BLOCK_M, BLOCK_N, num_warps, num_stages) by the widest tile of a launch: the first row whose
# bound holds it; wider heads, smaller tiles. Untuned (no GPU was at hand when this was
# written): bench/gpu_ops.py measures them. kernels/aot.py compiles every row for sm_80/sm_90.
FWD_BLOCKS = ((64, (128, 64, 4, 3)), (128, (128, 32, 8, 2)), (MAX_HEAD_DIM, (64, 32, 8, 1)))
BWD_BLOCKS = ((64, (64, 64, 4, 1)), (MAX_HEAD_DIM, (64, 32, 8, 1)))
# fp32 (IEEE dots, on FMAs) stages twice the bytes in shared memory: heads over 128 wide at
# 64 x 32 need 200 KiB in dK/dV, over sm_80's 163 KiB; at 32 x 32 they need 132 KiB
BWD_BLOCKS_FP32 = ((64, (64, 64, 4, 1)), (128, (64, 32, 8, 1)), (MAX_HEAD_DIM, (32, 32, 8, 1)))
INTERPRET_BLOCKS = (32, 32, 4, 1)
DELTA_WARPS, DELTA_STAGES = 4, 3  # the delta kernel: Triton's defaults


def buckets(qk_dims: list[int], v_dims: list[int]) -> dict[tuple[int, int], list[int]]:
    """Heads grouped by tile widths (pow2 >= 16 of their own q/k and v dims); dv == 0 skipped."""
    out: dict[tuple[int, int], list[int]] = {}
    for h, (dq, dv) in enumerate(zip(qk_dims, v_dims)):
        if dv > 0:
            if max(dq, dv) > MAX_HEAD_DIM:
                raise ValueError(f"varlen_attention (triton): head {h} has q/k dim {dq} and v dim "
                                 f"{dv}; the Triton kernels take head dims up to {MAX_HEAD_DIM}")
            out.setdefault((pow2_at_least(dq), pow2_at_least(dv)), []).append(h)
    return out


_SLOTS = 4  # bucket branches the kernels have (BDQ0/BDV0 .. BDQ3/BDV3)
MAX_BUCKETS = _SLOTS  # tile shapes per launch (1: one launch per shape); more -> another launch


def launches(qk_dims: list[int], v_dims: list[int]) -> list[list[tuple[tuple[int, int], list]]]:
    """The launches of one layer: groups of <= MAX_BUCKETS buckets, widest tiles first (so the
    longest programs start first). A pruned ViT layer has at most a few buckets: one launch."""
    items = sorted(buckets(qk_dims, v_dims).items(), key=lambda kv: -(kv[0][0] + kv[0][1]))
    per = max(1, min(MAX_BUCKETS, _SLOTS))
    return [items[i:i + per] for i in range(0, len(items), per)]


_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _tables(qk_dims, v_dims, scales, group, device):
    """Per-head rows [q/k offset, q/k dim, v offset, v dim, head, bucket slot] + scales; cached
    per layer shape and device so that a forward does no host-to-device copy after the first."""
    key = (tuple(qk_dims), tuple(v_dims), tuple(scales), tuple(b for b, _ in group), str(device))
    hit = _TABLES.get(key)
    if hit is not None:
        return hit
    qo, vo = [0], [0]
    for dq, dv in zip(qk_dims, v_dims):
        qo.append(qo[-1] + dq)
        vo.append(vo[-1] + dv)
    rows, sc = [], []
    for slot, (_, heads) in enumerate(group):
        for h in heads:
            rows.append([qo[h], qk_dims[h], vo[h], v_dims[h], h, slot])
            sc.append(scales[h])
    out = (torch.tensor(rows, dtype=torch.int32, device=device),
           torch.tensor(sc, dtype=torch.float32, device=device))
    if len(_TABLES) > 4096:
        _TABLES.clear()
    _TABLES[key] = out
    return out


def _bucket_args(group) -> dict:
    args = {"NB": len(group)}
    for i in range(_SLOTS):
        bdq, bdv = group[i][0] if i < len(group) else (16, 16)
        args[f"BDQ{i}"], args[f"BDV{i}"] = bdq, bdv
    return args


def _table(dtype, backward: bool):
    if not backward:
        return FWD_BLOCKS
    return BWD_BLOCKS_FP32 if dtype == torch.float32 else BWD_BLOCKS


def _gpu_blocks(group, dtype, backward: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of a launch on a GPU: its row of the table."""
    wide = max(max(bdq, bdv) for (bdq, bdv), _ in group)
    for bound, cfg in _table(dtype, backward):
        if wide <= bound:
            return cfg
    raise ValueError(f"varlen_attention (triton): tile width {wide} > {MAX_HEAD_DIM}")


def _blocks(group, dtype, backward: bool = False) -> tuple[int, int, int, int]:
    if is_interpret():
        return INTERPRET_BLOCKS
    return _gpu_blocks(group, dtype, backward)


def _meta(group, dtype, blocks) -> tuple[dict, int, int]:
    """(constexprs, num_warps, num_stages) of a forward/dK-dV/dQ launch of ``group``."""
    BM, BN, warps, stages = blocks
    # fp32 inputs get exact fp32 dots (tl.dot would round them to tf32)
    meta = dict(BLOCK_M=BM, BLOCK_N=BN, IEEE=dtype == torch.float32, **_bucket_args(group))
    return meta, warps, stages


def _delta_meta(group, blocks) -> dict:
    return dict(BLOCK_M=blocks[0], BDV=max(bdv for (_, bdv), _ in group))


def _last_contig(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def forward(q, k, v, qk_dims, v_dims, scales):
    """(out [B, N, sum(dv)], lse [B, H, N] fp32 base-2)."""
    check_device("varlen_attention", q, k, v)
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"varlen_attention (triton): q, k, v must share one dtype of float32, "
                        f"float16, bfloat16; got {q.dtype}, {k.dtype}, {v.dtype}")
    q, k, v = _last_contig(q), _last_contig(k), _last_contig(v)
    B, N, _ = q.shape
    H = len(qk_dims)
    o = empty((B, N, sum(v_dims)), v.dtype, v.device)
    lse = empty((B, H, N), torch.float32, q.device)
    if B == 0 or N == 0:
        return o, lse
    if any(dv == 0 for dv in v_dims):  # heads without output are skipped; define their rows
        lse[:, [h for h, dv in enumerate(v_dims) if dv == 0]] = 0.0
    for group in launches(qk_dims, v_dims):
        tab, sc = _tables(qk_dims, v_dims, scales, group, q.device)
        meta, warps, stages = _meta(group, q.dtype, _blocks(group, q.dtype))
        Hl = tab.shape[0]
        _fwd_kernel[(triton.cdiv(N, meta["BLOCK_M"]), B * Hl)](
            q, k, v, o, lse, tab, sc, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            v.stride(0), v.stride(1), o.stride(0), o.stride(1), N, Hl, H,
            num_warps=warps, num_stages=stages, **meta)
    return o, lse


def backward(do, q, k, v, o, lse, qk_dims, v_dims, scales):
    """(dq, dk, dv) of the forward above, each contiguous like q, k, v."""
    q, k, v, o, do = (_last_contig(t) for t in (q, k, v, o, do))
    B, N, _ = q.shape
    H = len(qk_dims)
    zero_cols = any(dv == 0 and dq > 0 for dq, dv in zip(qk_dims, v_dims))
    gq, gk = empty(q.shape, q.dtype, q.device), empty(k.shape, k.dtype, k.device)
    if zero_cols:  # heads without value dims get no launch: their q/k gradients are zero
        gq.zero_()
        gk.zero_()
    gv = empty(v.shape, v.dtype, v.device)
    if B == 0 or N == 0:
        return gq.zero_(), gk.zero_(), gv.zero_()
    delta = empty((B, H, N), torch.float32, q.device)
    for group in launches(qk_dims, v_dims):
        tab, sc = _tables(qk_dims, v_dims, scales, group, q.device)
        blocks = _blocks(group, q.dtype, backward=True)
        meta, warps, stages = _meta(group, q.dtype, blocks)
        BM, BN = meta["BLOCK_M"], meta["BLOCK_N"]
        Hl = tab.shape[0]
        _bwd_delta_kernel[(triton.cdiv(N, BM), B * Hl)](
            o, do, delta, tab, o.stride(0), o.stride(1), do.stride(0), do.stride(1),
            N, Hl, H, num_warps=DELTA_WARPS, num_stages=DELTA_STAGES,
            **_delta_meta(group, blocks))
        _bwd_dkdv_kernel[(triton.cdiv(N, BN), B * Hl)](
            q, k, v, do, lse, delta, gk, gv, tab, sc,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            do.stride(0), do.stride(1), gk.stride(0), gk.stride(1), gv.stride(0), gv.stride(1),
            N, Hl, H, num_warps=warps, num_stages=stages, **meta)
        _bwd_dq_kernel[(triton.cdiv(N, BM), B * Hl)](
            q, k, v, do, lse, delta, gq, tab, sc,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            do.stride(0), do.stride(1), gq.stride(0), gq.stride(1),
            N, Hl, H, num_warps=warps, num_stages=stages, **meta)
    return gq, gk, gv


def _aot_groups(table) -> list[list]:
    """Launches (as launches() forms them) that together hold every bucket under every row of
    ``table`` (FWD_BLOCKS or BWD_BLOCKS) that a launch can give it, with NB = 1..4.

    All launches cannot be compiled (any <= 4 of the 25 width pairs: ~15k per kernel and
    dtype), and need not be: a bucket's tile body is a branch on a constexpr of its own, so
    the code of a launch is the code of its buckets' bodies under the launch's row, and its
    shared memory is the most any of them needs (branches do not hold shared memory at the same
    time; tests/test_triton_aot.py checks that on a mixed launch). So compiled: every pair
    alone (the usual launch, NB = 1), every pair in a launch with a wider row's pair (which
    gives it that row's blocks), and the narrowest row's pairs in launches of NB = 4, 3, 2."""
    def group(pairs):
        # one head per pair, dims = the widths themselves: launches() orders them as it would
        (g,) = launches([a for a, _ in pairs], [b for _, b in pairs])
        return g

    pairs = [(a, b) for a in WIDTHS for b in WIDTHS]
    out = [group([p]) for p in pairs]
    lo = 0
    for bound, _ in table:
        own = [p for p in pairs if lo < max(p) <= bound]
        lower = [p for p in pairs if max(p) <= lo]
        # lower pairs three at a time next to one of this row's pairs (rotating)
        for j, i in enumerate(range(0, len(lower), _SLOTS - 1)):
            out.append(group([own[j % len(own)]] + lower[i:i + _SLOTS - 1]))
        lo = bound
    first = [p for p in pairs if max(p) <= table[0][0]]
    out += [group(first[a:b]) for a, b in ((0, 4), (4, 7), (7, 9)) if first[a:b]]
    return out


def launch_configs():
    """Every (kernel, constexprs, pointer types, num_warps, num_stages) the launchers above can
    use on a GPU, for each dtype; see _aot_groups for the bucket combinations. Compiled for
    sm_80/sm_90 by kernels/aot.py."""
    def label(dt, meta, warps, stages):
        pairs = ",".join(f"{meta[f'BDQ{i}']}x{meta[f'BDV{i}']}" for i in range(meta["NB"]))
        return (f"{dtype_name(dt)} BLOCK_M={meta['BLOCK_M']} BLOCK_N={meta['BLOCK_N']} "
                f"buckets={pairs} warps={warps} stages={stages}")

    def quick(dt, group):
        # the narrowest and the widest bucket alone; in fp16 also a launch mixing rows
        pairs = [p for p, _ in group]
        return pairs in ([(16, 16)], [(MAX_HEAD_DIM, MAX_HEAD_DIM)]) or (
            dt == torch.float16 and pairs == [(16, MAX_HEAD_DIM), (16, 64), (16, 32), (16, 16)])

    for dt in _DTYPES:
        io = dict(q_ptr=dt, k_ptr=dt, v_ptr=dt, tab_ptr=torch.int32, scale_ptr=torch.float32,
                  lse_ptr=torch.float32)
        for group in _aot_groups(_table(dt, backward=False)):
            meta, warps, stages = _meta(group, dt, _gpu_blocks(group, dt))
            yield LaunchConfig(_fwd_kernel, label(dt, meta, warps, stages), meta,
                               dict(io, o_ptr=dt), warps, stages, quick=quick(dt, group))
        bwd = dict(io, do_ptr=dt, delta_ptr=torch.float32)
        for group in _aot_groups(_table(dt, backward=True)):
            blocks = _gpu_blocks(group, dt, backward=True)
            meta, warps, stages = _meta(group, dt, blocks)
            yield LaunchConfig(_bwd_dkdv_kernel, label(dt, meta, warps, stages), meta,
                               dict(bwd, dk_ptr=dt, dv_ptr=dt), warps, stages,
                               quick=quick(dt, group))
            yield LaunchConfig(_bwd_dq_kernel, label(dt, meta, warps, stages), meta,
                               dict(bwd, dq_ptr=dt), warps, stages, quick=quick(dt, group))
        # the delta kernel sees only BLOCK_M and the launch's widest v tile
        seen = set()
        for bound, blocks in _table(dt, backward=True):
            for w in WIDTHS:
                dmeta = _delta_meta([((16, w), [])], blocks)
                if w > bound or tuple(dmeta.values()) in seen:
                    continue
                seen.add(tuple(dmeta.values()))
                yield LaunchConfig(
                    _bwd_delta_kernel, f"{dtype_name(dt)} BLOCK_M={dmeta['BLOCK_M']} BDV={w} "
                    f"warps={DELTA_WARPS} stages={DELTA_STAGES}", dmeta,
                    dict(o_ptr=dt, do_ptr=dt, delta_ptr=torch.float32, tab_ptr=torch.int32),
                    DELTA_WARPS, DELTA_STAGES, quick=w == MAX_HEAD_DIM)


def flops(B: int, N: int, qk_dims, v_dims) -> int:
    """Useful FLOPs of the forward (what FlopCounterMode counts for SDPA)."""
    return 2 * B * N * N * sum(dq + dv for dq, dv in zip(qk_dims, v_dims) if dq > 0)


