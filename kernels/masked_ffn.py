"""Masked FFN in Triton: fc1 -> activation (-> * gate) -> fc2 over the kept neurons only.

Weights stay dense ([hidden, in] and [out, hidden]); ``keep`` (int32, unique indices) names the
kept neurons. Every GEMM is one generic tiled kernel (Triton tutorial style) whose operand
loads go through the index table, so the gather of kept rows of w1 / columns of w2 happens in
the GEMM loads and nothing is copied; weight gradients are scattered back into the dense
layout by the GEMM stores. Epilogues fuse the bias, the activation, the soft gate (HiAP) and,
in the backward, the activation derivative and the gate gradient.

Forward (M = tokens, K = kept neurons):
    Z = x @ w1[keep]^T + b1[keep]          (stored, [M, K])
    H = act(Z) * gate[keep]                (stored, [M, K]; fc1 kernel epilogue)
    y = H @ w2[:, keep]^T + b2             (fc2 kernel)
Backward:
    dH = dy @ w2[:, keep];  dZ = dH * gate[keep] * act'(Z);  dgate[keep] += sum_m dH * act(Z)
    dw2[:, keep] = dy^T @ H;  dx = dZ @ w1[keep];  dw1[keep] = dZ^T @ x
    db1[keep] = sum_m dZ;  db2 = sum_m dy
Weight-gradient GEMMs reduce over all tokens into small outputs, so they split the reduction
over programs (fp32 atomics) to fill the GPU.
"""
from __future__ import annotations

import functools
import itertools

import torch
import triton
import triton.language as tl

from ._common import LaunchConfig, check_device, dtype_name, empty, is_interpret

ACTS = {"gelu": 0, "gelu_tanh": 1, "relu": 2, "silu": 3}
EPI_NONE, EPI_BIAS, EPI_FC1, EPI_DZ = 0, 1, 2, 3


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _act(z, ACT: tl.constexpr):
    if ACT == 0:
        out = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    elif ACT == 1:
        out = 0.5 * z * (1.0 + _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z)))
    elif ACT == 2:
        out = tl.maximum(z, 0.0)
    else:
        out = z * tl.sigmoid(z)
    return out


@triton.jit
def _act_grad(z, ACT: tl.constexpr):
    if ACT == 0:
        cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
        out = cdf + z * pdf
    elif ACT == 1:
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        t = _tanh(u)
        out = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * 0.7978845608028654 * (
            1.0 + 3.0 * 0.044715 * z * z)
    elif ACT == 2:
        out = tl.where(z > 0.0, 1.0, 0.0)
    else:
        s = tl.sigmoid(z)
        out = s * (1.0 + z * (1.0 - s))
    return out


@triton.jit
def _gemm_kernel(a_ptr, b_ptr, c_ptr, idx_ptr, bias_ptr, gate_ptr, z_ptr, dgate_ptr,
                 M, N, K, K_PER_SPLIT,
                 sam, sak, sbk, sbn, scm, scn, szm, szn,
                 B_GATHER_K: tl.constexpr, B_GATHER_N: tl.constexpr, B_KMAJOR: tl.constexpr,
                 C_SCATTER_M: tl.constexpr, C_SCATTER_N: tl.constexpr,
                 EPI: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GATE: tl.constexpr,
                 ACT: tl.constexpr, ATOMIC: tl.constexpr, IEEE: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP_M: tl.constexpr):
    """C[m, n] (+)= sum_k A[m, k] * B[k, n] with index-table gathers/scatters and epilogues."""
    # grouped ordering of the output tiles (Triton matmul tutorial): better L2 reuse
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    if B_GATHER_N:
        bn = tl.load(idx_ptr + offs_n, mask=n_mask, other=0).to(tl.int64)
    else:
        bn = offs_n.to(tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_lo = pid_k * K_PER_SPLIT
    k_hi = tl.minimum(K, k_lo + K_PER_SPLIT)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_hi
        if B_GATHER_K:
            bk = tl.load(idx_ptr + offs_k, mask=k_mask, other=0).to(tl.int64)
        else:
            bk = offs_k.to(tl.int64)
        a = tl.load(a_ptr + offs_m.to(tl.int64)[:, None] * sam + offs_k.to(tl.int64)[None, :] * sak,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if B_KMAJOR:
            # B's k runs along memory (w2[o, keep[k]]): load B^T so that neighbouring threads
            # read neighbouring kept columns (sorted keeps are mostly adjacent), then transpose
            bt = tl.load(b_ptr + bn[:, None] * sbn + bk[None, :] * sbk,
                         mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.trans(bt)
        else:
            b = tl.load(b_ptr + bk[:, None] * sbk + bn[None, :] * sbn,
                        mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if IEEE:
            acc += tl.dot(a, b, input_precision="ieee")
        else:
            acc += tl.dot(a, b)
    mask = m_mask[:, None] & n_mask[None, :]
    if EPI == 1:  # + bias[n]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + bn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    elif EPI == 2:  # fc1: Z = acc + b1[keep]; store Z; C = act(Z) * gate[keep]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + bn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(z_ptr + offs_m.to(tl.int64)[:, None] * szm + offs_n[None, :] * szn,
                 acc.to(z_ptr.dtype.element_ty), mask=mask)
        acc = _act(acc, ACT)
        if HAS_GATE:
            acc = acc * tl.load(gate_ptr + bn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    elif EPI == 3:  # backward through act and gate: acc = dH -> dZ; dgate[keep] += sum dH*act(Z)
        z = tl.load(z_ptr + offs_m.to(tl.int64)[:, None] * szm + offs_n[None, :] * szn,
                    mask=mask, other=0.0).to(tl.float32)
        if HAS_GATE:
            part = tl.sum(tl.where(mask, acc * _act(z, ACT), 0.0), axis=0)
            tl.atomic_add(dgate_ptr + bn, part, mask=n_mask)
            acc = acc * tl.load(gate_ptr + bn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        acc = acc * _act_grad(z, ACT)
    if C_SCATTER_M:
        cm = tl.load(idx_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
    else:
        cm = offs_m.to(tl.int64)
    if C_SCATTER_N:
        cn = tl.load(idx_ptr + offs_n, mask=n_mask, other=0).to(tl.int64)
    else:
        cn = offs_n.to(tl.int64)
    c_ptrs = c_ptr + cm[:, None] * scm + cn[None, :] * scn
    if ATOMIC:
        tl.atomic_add(c_ptrs, acc, mask=mask)
    else:
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of every GEMM on a GPU (kernels/aot.py
# compiles it for sm_80/sm_90), and under the interpreter (small: it runs programs one by one)
GPU_BLOCKS = (128, 128, 32, 8, 3)
INTERPRET_BLOCKS = (32, 32, 32, 4, 1)
GROUP_M = 8
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _cfg(M: int, N: int, K: int):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)."""
    return INTERPRET_BLOCKS if is_interpret() else GPU_BLOCKS


def _num_sms(device) -> int:
    if is_interpret() or device.type != "cuda":
        return 4
    return _cuda_sms(device)


@functools.lru_cache(maxsize=None)
def _cuda_sms(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _meta(blocks, *, b_gather_k=False, b_gather_n=False, b_kmajor=False, c_scatter_m=False,
          c_scatter_n=False, epi=EPI_NONE, has_bias=False, has_gate=False, act="gelu",
          split_k=False, ieee=False) -> tuple[dict, int, int]:
    """(constexprs, num_warps, num_stages) of one GEMM launch."""
    BM, BN, BK, warps, stages = blocks
    return dict(B_GATHER_K=b_gather_k, B_GATHER_N=b_gather_n, B_KMAJOR=b_kmajor,
                C_SCATTER_M=c_scatter_m, C_SCATTER_N=c_scatter_n, EPI=epi, HAS_BIAS=has_bias,
                HAS_GATE=has_gate, ACT=ACTS[act], ATOMIC=split_k, IEEE=ieee, BLOCK_M=BM,
                BLOCK_N=BN, BLOCK_K=BK, GROUP_M=GROUP_M), warps, stages


def gemm(a, a_strides, b, b_strides, c, c_strides, M, N, K, *, idx=None, b_gather_k=False,
         b_gather_n=False, c_scatter_m=False, c_scatter_n=False, epi=EPI_NONE, bias=None,
         gate=None, z=None, dgate=None, act="gelu", split_k: bool = False):
    """Launch the generic GEMM. With ``split_k`` c must be float32 and zero-filled (atomics)."""
    if M == 0 or N == 0:
        return
    blocks = _cfg(M, N, K)
    # B_KMAJOR: a gathered B whose k runs along memory is loaded transposed (see the kernel);
    # fp32 inputs get exact fp32 dots (tl.dot would round them to tf32)
    meta, warps, stages = _meta(
        blocks, b_gather_k=b_gather_k, b_gather_n=b_gather_n,
        b_kmajor=b_gather_k and b_strides[0] == 1 and b_strides[1] != 1,
        c_scatter_m=c_scatter_m, c_scatter_n=c_scatter_n, epi=epi, has_bias=bias is not None,
        has_gate=gate is not None, act=act, split_k=split_k, ieee=a.dtype == torch.float32)
    BM, BN, BK = meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"]
    tiles = triton.cdiv(M, BM) * triton.cdiv(N, BN)
    splits = 1
    if split_k and K > BK:
        want = max(1, (2 * _num_sms(c.device)) // tiles)
        splits = min(want, triton.cdiv(K, BK))
    per = triton.cdiv(triton.cdiv(max(K, 1), splits), BK) * BK
    splits = triton.cdiv(max(K, 1), per)
    dummy = c
    zs = (z.stride(0), z.stride(1)) if z is not None else (0, 0)
    _gemm_kernel[(tiles, splits)](
        a, b, c, idx if idx is not None else dummy, bias if bias is not None else dummy,
        gate if gate is not None else dummy, z if z is not None else dummy,
        dgate if dgate is not None else dummy,
        M, N, K, per, *a_strides, *b_strides, *c_strides, *zs,
        num_warps=warps, num_stages=stages, **meta)


# The six GEMMs of forward() and backward(): the flags fixed at each call site. The launchers
# pass them and launch_configs() enumerates them, so the two cannot drift apart.
FC1 = dict(b_gather_n=True, epi=EPI_FC1)     # Z = x @ w1[keep]^T + b1; H = act(Z) * gate
FC2 = dict(b_gather_k=True, epi=EPI_BIAS)    # y = H @ w2[:, keep]^T + b2
DH = dict(b_gather_n=True, epi=EPI_DZ)       # dH = dy @ w2[:, keep] -> dZ, dgate
DW2 = dict(c_scatter_n=True, split_k=True)   # dw2[:, keep] = dy^T @ H
DX = dict(b_gather_k=True)                   # dx = dZ @ w1[keep]
DW1 = dict(c_scatter_m=True, split_k=True)   # dw1[keep] = dZ^T @ x
SITES = dict(FC1=FC1, FC2=FC2, DH=DH, DW2=DW2, DX=DX, DW1=DW1)


def launch_configs():
    """Every GEMM variant forward()/backward() can launch on a GPU, for x in fp32/fp16/bf16:
    each call site with the flags its inputs decide (bias, gate, activation, whether a gathered
    B is k-major). Biases and gates are taken in x's dtype (nn.Linear's; the epilogues read them
    as fp32 either way); a missing one is replaced by c, as gemm() does. The unit strides are
    those of contiguous tensors."""
    for dt, (site, flags) in itertools.product(_DTYPES, SITES.items()):
        c_dt = torch.float32 if flags.get("split_k") else dt
        uses_act = flags.get("epi") in (EPI_FC1, EPI_DZ)
        for has_bias, has_gate, act, kmajor in itertools.product(
                (False, True) if site in ("FC1", "FC2") else (False,),
                (False, True) if uses_act else (False,),
                ACTS if uses_act else ("gelu",),
                (False, True) if flags.get("b_gather_k") else (False,)):
            meta, warps, stages = _meta(GPU_BLOCKS, **flags, b_kmajor=kmajor, has_bias=has_bias,
                                        has_gate=has_gate, act=act, ieee=dt == torch.float32)
            ptrs = dict(a_ptr=dt, b_ptr=dt, c_ptr=c_dt, idx_ptr=torch.int32,
                        bias_ptr=dt if has_bias else c_dt, gate_ptr=dt if has_gate else c_dt,
                        z_ptr=dt if uses_act else c_dt,
                        dgate_ptr=torch.float32 if site == "DH" and has_gate else c_dt)
            label = " ".join(
                [site, dtype_name(dt)]
                + ([f"bias={int(has_bias)}"] if site in ("FC1", "FC2") else [])
                + ([f"gate={int(has_gate)} act={act}"] if uses_act else [])
                + ([f"kmajor={int(kmajor)}"] if flags.get("b_gather_k") else [])
                + [f"blocks={'x'.join(map(str, GPU_BLOCKS[:3]))} warps={warps} stages={stages}"])
            # quick: each call site once, the epilogues with everything on
            quick = (act == "gelu" and has_bias == (site in ("FC1", "FC2"))
                     and has_gate == uses_act and kmajor == bool(flags.get("b_gather_k")))
            yield LaunchConfig(_gemm_kernel, label, meta, ptrs, warps, stages,
                               _unit_strides(site, kmajor), quick)


def _unit_strides(site: str, kmajor: bool) -> frozenset:
    """The stride arguments that are 1 when every tensor of the call is contiguous: A is
    read transposed (m along memory) by the dW GEMMs; B has k along memory for fc1 (w1 rows)
    and for a k-major gathered B, else n; C and Z have n along memory."""
    a = "sam" if site in ("DW2", "DW1") else "sak"
    b = "sbk" if site == "FC1" or kmajor else "sbn"
    z = ("szn",) if site in ("FC1", "DH") else ()
    return frozenset((a, b, "scn") + z)


def _check(x, w1, w2, keep, gate, act):
    check_device("masked_ffn", x, w1, w2, keep, gate)
    if act not in ACTS:
        raise ValueError(f"masked_ffn: unknown activation {act!r}; choose from {sorted(ACTS)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"masked_ffn (triton): x must be float32/float16/bfloat16, got {x.dtype}")
    if w1.dtype != x.dtype or w2.dtype != x.dtype:
        raise TypeError(f"masked_ffn (triton): x, w1, w2 must share a dtype, got {x.dtype}, "
                        f"{w1.dtype}, {w2.dtype}")
    if gate is not None and gate.dim() != 1:
        raise ValueError(f"masked_ffn (triton): gate must be 1-D [hidden], got shape "
                         f"{tuple(gate.shape)}")


def forward(x, w1, b1, w2, b2, keep, gate, act: str):
    """(y [..., out], z [M, K], h [M, K]); ``keep`` int32 1-D on x's device."""
    _check(x, w1, w2, keep, gate, act)
    lead = x.shape[:-1]
    D = x.shape[-1]
    x2 = x.reshape(-1, D)
    M, K, O = x2.shape[0], keep.numel(), w2.shape[0]
    z = empty((M, K), x.dtype, x.device)
    h = empty((M, K), x.dtype, x.device)
    y = empty((M, O), x.dtype, x.device)
    # fc1: B[d, n] = w1[keep[n], d]
    gemm(x2, x2.stride(), w1, (w1.stride(1), w1.stride(0)), h, h.stride(), M, K, D, idx=keep,
         **FC1, bias=b1, gate=gate, z=z, act=act)
    # fc2: B[k, o] = w2[o, keep[k]]
    gemm(h, h.stride(), w2, (w2.stride(1), w2.stride(0)), y, y.stride(), M, O, K, idx=keep,
         **FC2, bias=b2)
    return y.reshape(*lead, O), z, h


def backward(gy, x, w1, w2, keep, gate, z, h, act: str, has_b1: bool, has_b2: bool):
    """(dx, dw1, db1, dw2, db2, dgate); absent biases/gate give None."""
    D = x.shape[-1]
    x2 = x.reshape(-1, D)
    O = w2.shape[0]
    gy2 = gy.reshape(-1, O).contiguous()
    M, K = x2.shape[0], keep.numel()
    dev = x.device
    dz = empty((M, K), x.dtype, dev)
    dgate = None if gate is None else torch.zeros(gate.shape[0], dtype=torch.float32, device=dev)
    # dH = dy @ w2[:, keep]  (B[o, k] = w2[o, keep[k]]), epilogue -> dZ and dgate
    gemm(gy2, gy2.stride(), w2, (w2.stride(0), w2.stride(1)), dz, dz.stride(), M, K, O,
         idx=keep, **DH, gate=gate, z=z, dgate=dgate, act=act)
    # dw2[:, keep] = dy^T @ H   (A[o, m] = dy[m, o]); fp32 accumulation over split token ranges
    dw2 = torch.zeros(w2.shape, dtype=torch.float32, device=dev)
    gemm(gy2, (gy2.stride(1), gy2.stride(0)), h, h.stride(), dw2, dw2.stride(), O, K, M,
         idx=keep, **DW2)
    # dx = dZ @ w1[keep]   (B[k, d] = w1[keep[k], d])
    dx = empty((M, D), x.dtype, dev)
    gemm(dz, dz.stride(), w1, (w1.stride(0), w1.stride(1)), dx, dx.stride(), M, D, K,
         idx=keep, **DX)
    # dw1[keep] = dZ^T @ x   (A[k, m] = dZ[m, k])
    dw1 = torch.zeros(w1.shape, dtype=torch.float32, device=dev)
    gemm(dz, (dz.stride(1), dz.stride(0)), x2, x2.stride(), dw1, dw1.stride(), K, D, M,
         idx=keep, **DW1)
    db1 = None
    if has_b1:
        db1 = torch.zeros(w1.shape[0], dtype=torch.float32, device=dev)
        db1.index_add_(0, keep.long(), dz.float().sum(0))
        db1 = db1.to(x.dtype)
    db2 = gy2.float().sum(0).to(x.dtype) if has_b2 else None
    return (dx.reshape(x.shape), dw1.to(w1.dtype), db1, dw2.to(w2.dtype), db2,
            dgate.to(gate.dtype) if gate is not None else None)
