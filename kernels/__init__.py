"""Triton kernels of pyengine, shipped inside the package as ``pyengine.kernels``.

    varlen_attention   all heads of a layer, each with its own q/k and v width, one launch;
                       forward + FA2-style backward
    masked_ffn         fc1 -> activation (-> * gate) -> fc2 over kept neurons only; gathers and
                       scatters of kept rows/columns fused into the GEMM loads/stores; fwd + bwd
    importance         per-channel sums of |x|, x^2, |x*g| for many tensors in one launch

Import them only through ``pyengine.ops`` (backend="triton"; the torch.library custom ops are
in pyengine/ops/<op>/library.py). Set TRITON_INTERPRET=1 before the first import to run them on a
CPU (the tests do).
"""
