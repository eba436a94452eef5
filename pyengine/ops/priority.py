"""What backend="auto" runs: per op and device kind, the backends in order of preference.

The dispatcher (pyengine/ops/dispatch.py) runs the first backend of the list that supports the
call's inputs (built, right device and dtypes, a backward when an input requires grad), so every
list ends with the torch reference. These lists are measured facts, not guesses: an entry
changes only with a committed timing (bench/results/) that shows the new backend correct AND
faster on that device kind. No GPU timings have been committed yet, so on CUDA attention and
the masked FFN run the reference. On the CPU, varlen attention runs the C++ kernel first:
bench/results/cpu/issue14/cpu_varlen_attention.{json,log} (2 cores, fp32 and bf16, batch 1
and 8, 197 tokens) has it correct to the float64 reference and faster than torch's SDPA on
uniform heads (64, 40, 24 wide) and than the per-run reference path on mixed widths, in every
case; with an input that needs gradients the dispatcher passes over it (no backward) to torch.
The importance reductions keep the choice they had before these lists (the csrc kernel when
pyengine._C has it; bench/cpu_csrc.py times it against the reference).
"""
from __future__ import annotations

PRIORITY: dict[str, dict[str, tuple[str, ...]]] = {
    "varlen_attention": {"cpu": ("cpu", "torch"), "cuda": ("torch",)},
    "masked_ffn": {"cpu": ("torch",), "cuda": ("torch",)},
    "importance_reduce": {"cpu": ("cpu", "torch"), "cuda": ("cuda", "torch")},
    "importance_reduce_many": {"cpu": ("cpu", "torch"), "cuda": ("cuda", "torch")},
}

# device kinds without an entry (mps, meta, ...): the reference
DEFAULT: tuple[str, ...] = ("torch",)


def auto_order(op: str, device_type: str) -> tuple[str, ...]:
    """The backends "auto" tries for ``op`` on a ``device_type`` device, best first."""
    return PRIORITY.get(op, {}).get(device_type, DEFAULT)
