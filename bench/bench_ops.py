"""pytest-benchmark microbenchmarks of the three ops, one benchmark per (op, backend, device).

    OMP_NUM_THREADS=1 python -m pytest -p no:cacheprovider bench/bench_ops.py \
        --benchmark-json=bench/results/cpu/bench_ops.json                          # CPU
    PYENGINE_BENCH_DEVICE=cuda python -m pytest bench/bench_ops.py \
        --benchmark-json=bench/results/gpu/bench_ops.json                          # GPU

CPU runs the "torch" and "cpu" (csrc) backends; "triton" and "cuda" need a CUDA device (the
Triton interpreter is a correctness tool, not a speed one: it is skipped here). A backend that
is not available is skipped with the reason. Shapes are ViT-S/16 sized (197 tokens, a pruned
layer with mixed head dims, FFN 384 -> 1536 at half the neurons) at a small batch on CPU.
The benchmark harness synchronizes CUDA inside the timed function, so GPU numbers include the
launch; use bench/gpu_ops.py for the kernel-level comparisons against SDPA and dense GEMMs.
"""
from __future__ import annotations

import os

import pytest
import torch

from pyengine import ops

HEADS_QK = [64, 64, 48, 40, 32, 16]
HEADS_V = [64, 56, 48, 40, 24, 16]


def _device() -> torch.device:
    dev = os.environ.get("PYENGINE_BENCH_DEVICE", "cpu")
    if dev == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return torch.device(dev)


def _runner(device: torch.device, fn):
    if device.type == "cuda":
        def run():
            out = fn()
            torch.cuda.synchronize()
            return out
        return run
    return fn


def _skip_unavailable(op: str, backend: str, device: torch.device):
    if backend == "triton" and device.type != "cuda":
        pytest.skip("triton timings need a CUDA device (the interpreter is not a speed test)")
    why = ops.supported_backends(op, device)[backend]
    if why:
        pytest.skip(f"backend {backend!r}: {'; '.join(why)}")


def _try(fn):
    try:
        fn()
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"backend not available: {e}")


BACKENDS = ["torch", "cpu", "triton", "cuda"]


@pytest.fixture(autouse=True)
def _threads():
    if not torch.cuda.is_available():
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_attention(benchmark, backend):
    device = _device()
    _skip_unavailable("varlen_attention", backend, device)
    B = 8 if device.type == "cpu" else 64
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    q = torch.randn(B, 197, sum(HEADS_QK), device=device, dtype=dtype)
    k = torch.randn_like(q)
    v = torch.randn(B, 197, sum(HEADS_V), device=device, dtype=dtype)
    scales = [d ** -0.5 for d in HEADS_QK]
    fn = _runner(device, lambda: ops.varlen_attention(q, k, v, HEADS_QK, HEADS_V, scales,
                                                      backend=backend))
    _try(fn)
    benchmark.extra_info.update(op="varlen_attention", backend=backend, device=str(device),
                                batch=B, tokens=197, qk_dims=HEADS_QK, v_dims=HEADS_V,
                                dtype=str(dtype))
    benchmark(fn)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kept", [0.5, 1.0])
def test_masked_ffn(benchmark, backend, kept):
    device = _device()
    _skip_unavailable("masked_ffn", backend, device)
    B = 8 if device.type == "cpu" else 64
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    x = torch.randn(B, 197, 384, device=device, dtype=dtype)
    w1 = torch.randn(1536, 384, device=device, dtype=dtype) * 0.05
    b1 = torch.zeros(1536, device=device, dtype=dtype)
    w2 = torch.randn(384, 1536, device=device, dtype=dtype) * 0.025
    b2 = torch.zeros(384, device=device, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    keep = torch.randperm(1536, generator=g)[: int(1536 * kept)].sort().values.tolist()
    fn = _runner(device, lambda: ops.masked_ffn(x, w1, b1, w2, b2, keep=keep, backend=backend))
    _try(fn)
    benchmark.extra_info.update(op="masked_ffn", backend=backend, device=str(device), batch=B,
                                tokens=197, kept=kept, dtype=str(dtype))
    benchmark(fn)


@pytest.mark.parametrize("backend", BACKENDS)
def test_importance_reduce_many(benchmark, backend):
    device = _device()
    _skip_unavailable("importance_reduce_many", backend, device)
    B = 8 if device.type == "cpu" else 64
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    # a 12-block ViT-S: per block the qkv input (384), fc1 output (1536) with gradients
    xs, gs = [], []
    for _ in range(12):
        for C in (384, 1536):
            xs.append(torch.randn(B, 197, C, device=device, dtype=dtype))
            gs.append(torch.randn(B, 197, C, device=device, dtype=dtype))
    fn = _runner(device, lambda: ops.importance_reduce_many(xs, gs, backend=backend))
    _try(fn)
    benchmark.extra_info.update(op="importance_reduce_many", backend=backend, device=str(device),
                                tensors=len(xs), bytes=sum(2 * x.numel() * x.element_size()
                                                           for x in xs), dtype=str(dtype))
    benchmark(fn)
