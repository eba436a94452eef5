"""Compact (dense, smaller) modules that a pruned ViT compiles into.

A compact block keeps only what its :class:`~pyengine.spec.Block` lists: one fused qkv
Linear over the kept q/k/v dims of the kept heads, a proj Linear over the kept value dims, and
a timm Mlp over the kept neurons. A removed attention or FFN branch is gone entirely: the block
passes the residual through.

The heads are packed bucket by bucket as the layer's head layout says
(:mod:`pyengine.models.vit.layout`): each head zero-padded to its bucket's q/k and v widths, so
the varlen-attention op sees one run per bucket. Without a layout: the exact one (one bucket
per distinct head shape, sorted by shape, no padding).
"""
from __future__ import annotations

import copy
import functools

import torch
from torch import nn

from pyengine import ops
from pyengine.models.packed_linear import PackedLinear, pack_mlp
from pyengine.models.vit.layout import BlockLayout, exact_block
from pyengine.structure.spec import Block as BlockSpec
from pyengine.structure.spec import Head


def packing_order(heads: tuple[Head, ...]) -> list[Head]:
    """Kept heads in packed order: grouped by (qk dim, v dim), then by dense index."""
    return sorted(heads, key=lambda h: (len(h.qk), len(h.v), h.index))


@functools.lru_cache(maxsize=None)
def _runnable(backend: str, device_type: str, needs_grad: bool = False) -> bool:
    """Whether the varlen_attention backend can run on this device type in this installation
    (with a backward when ``needs_grad``)."""
    from pyengine.ops.varlen_attention import OP
    b = OP.backend(backend)
    return (b.device_reason(torch.device(device_type)) is None and b.unavailable() is None
            and (b.supports_autograd or not needs_grad))


@torch.compiler.assume_constant_result
def _planned_backend(backend: str, planned: str, planned_device: str, device_type: str,
                     needs_grad: bool = False) -> str:
    """The backend a layer runs: an explicit one as set; under "auto", the one the layout
    planned for this device type when it can run here (a planned inference-only backend
    gives way while the model trains: fine-tuning a compiled model works), else the op's own
    choice."""
    if backend != "auto" or planned in ("", "auto") or device_type != planned_device:
        return backend
    return planned if _runnable(planned, device_type, needs_grad) else "auto"


class CompactAttention(nn.Module):
    """Attention over the kept heads of one layer, run as the buckets of ``layout``.

    ``heads`` are the kept heads (any order); ``layout`` (default: the exact one) orders them
    into buckets and sets each head's padded widths (``qk_dims``/``v_dims``, per packed head;
    ``kept_qk``/``kept_v`` are what the spec keeps). ``backend`` as in
    :func:`pyengine.ops.varlen_attention`; under "auto" the layout's planned backend runs where
    it was planned for (``planned_device``) and can run.
    """

    def __init__(self, dim: int, heads: list[Head], scale: float, qkv_bias: bool = True,
                 proj_bias: bool = True, backend: str = "auto",
                 layout: BlockLayout | None = None, mode: str = "exact",
                 planned_device: str | None = None):
        super().__init__()
        by_index = {h.index: h for h in heads}
        if layout is None:
            layout = exact_block(BlockSpec(tuple(sorted(heads, key=lambda h: h.index))))
        if sorted(layout.order) != sorted(by_index):
            raise ValueError(f"layout holds heads {sorted(layout.order)}, the layer keeps "
                             f"{sorted(by_index)}")
        self.layout, self.mode = layout, mode
        self.head_index = layout.order
        self.qk_dims, self.v_dims = layout.qk_dims, layout.v_dims
        self.kept_qk = [len(by_index[i].qk) for i in self.head_index]
        self.kept_v = [len(by_index[i].v) for i in self.head_index]
        if any(k > p for k, p in zip(self.kept_qk + self.kept_v, self.qk_dims + self.v_dims)):
            raise ValueError("a bucket is narrower than the dims its heads keep")
        self.scale = float(scale)
        self._scales = [self.scale] * len(self.head_index)
        self._runners: dict = {}
        self.backend = backend
        self.planned_backend = layout.backend if planned_device else "auto"
        self.planned_device = planned_device or ""
        sqk, sv = sum(self.qk_dims), sum(self.v_dims)
        self.splits = [sqk, sqk, sv]
        self.qkv = PackedLinear(dim, 2 * sqk + sv, bias=qkv_bias)
        self.proj = PackedLinear(sv, dim, bias=proj_bias)
        self.proj_drop = nn.Identity()

    def run_backend(self, device_type: str, needs_grad: bool = False) -> str:
        """The backend name this layer passes to the op on a ``device_type`` device."""
        return _planned_backend(self.backend, self.planned_backend, self.planned_device,
                                device_type, needs_grad)

    def _runner(self, q, k, v, needs_grad: bool):
        """The backend's ``run`` for inputs like these, chosen once per device, dtype, shape,
        grad mode and backend setting: the op's argument checks and backend choice cost as much
        as the attention itself on small layers (q/k/v come out of this layer's own qkv, so
        what was checked once holds for every call of that key)."""
        key = (q.device, q.dtype, tuple(q.shape[:2]), needs_grad, self.backend,
               self.planned_backend)
        run = self._runners.get(key)
        if run is None:
            from pyengine.ops.dispatch import select
            from pyengine.ops.varlen_attention import OP
            from pyengine.ops.varlen_attention.reference import check_inputs
            check_inputs(q, k, v, self.qk_dims, self.v_dims)
            b = select(OP, self.run_backend(q.device.type, needs_grad),
                       (q, k, v, self.qk_dims, self.v_dims, self._scales))
            run = functools.partial(b.run, qk_dims=self.qk_dims, v_dims=self.v_dims,
                                    scales=self._scales)
            if len(self._runners) >= 32:  # many input shapes: keep the newest ones
                self._runners.clear()
            self._runners[key] = run
        return run(q, k, v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).split(self.splits, dim=-1)
        needs_grad = torch.is_grad_enabled() and q.requires_grad
        if torch.compiler.is_compiling():  # traced: the op as registered
            o = ops.varlen_attention(q, k, v, self.qk_dims, self.v_dims, self.scale,
                                     backend=self.run_backend(x.device.type, needs_grad))
        else:
            o = self._runner(q, k, v, needs_grad)
        return self.proj_drop(self.proj(o))

    def extra_repr(self) -> str:
        text = f"heads={self.head_index}, qk_dims={self.qk_dims}, v_dims={self.v_dims}"
        padded = self.kept_qk != self.qk_dims or self.kept_v != self.v_dims
        text += f", layout={self.mode} [{self.layout.describe()}]"
        if padded:
            text += f", kept_qk={self.kept_qk}, kept_v={self.kept_v}"
        if self.planned_device and self.planned_backend != "auto":
            text += f", planned_backend={self.planned_backend} on {self.planned_device}"
        if self.backend != "auto":
            text += f", backend={self.backend}"
        return text


class CompactBlock(nn.Module):
    """A pre-norm ViT block whose attention and/or FFN branch may be absent."""

    def __init__(self, norm1, attn, ls1, drop_path1, norm2, mlp, ls2, drop_path2):
        super().__init__()
        self.norm1, self.attn, self.ls1, self.drop_path1 = norm1, attn, ls1, drop_path1
        self.norm2, self.mlp, self.ls2, self.drop_path2 = norm2, mlp, ls2, drop_path2

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise NotImplementedError("compact ViT blocks do not take attention masks yet")
        if self.attn is not None:
            x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        if self.mlp is not None:
            x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


def _padded_index(heads: list[Head], widths: list[int], kept, src) -> tuple[list[int], list[int]]:
    """``(dst, src)`` positions that copy each head's kept dims into its padded slot (the
    rest of the slot stays zero); ``kept(h)`` lists the kept dims, ``src(h, j)`` maps one."""
    dst_i, src_i, off = [], [], 0
    for h, w in zip(heads, widths):
        ks = kept(h)
        dst_i += range(off, off + len(ks))
        src_i += [src(h, j) for j in ks]
        off += w
    return dst_i, src_i


@torch.no_grad()
def compact_block(block: nn.Module, bspec: BlockSpec, copy_weights: bool,
                  layout: BlockLayout | None = None, mode: str = "exact",
                  planned_device: str | None = None) -> CompactBlock:
    """Build the compact twin of a timm (or gated) ViT block, its heads in ``layout`` (default:
    exact); copy gathered weights (zero-padded) if asked."""
    from timm.layers import Mlp

    attn, mlp = block.attn, block.mlp
    H, Dh = attn.num_heads, attn.head_dim
    dim = attn.qkv.in_features
    new_attn = None
    if bspec.has_attn:
        new_attn = CompactAttention(dim, list(bspec.heads), attn.scale,
                                    attn.qkv.bias is not None, attn.proj.bias is not None,
                                    layout=layout, mode=mode, planned_device=planned_device)
        new_attn.proj_drop = copy.deepcopy(attn.proj_drop)
        w = attn.qkv.weight
        new_attn.to(device=w.device, dtype=w.dtype)
        if copy_weights:
            by_index = {h.index: h for h in bspec.heads}
            heads = [by_index[i] for i in new_attn.head_index]
            sqk = sum(new_attn.qk_dims)
            dst, src = [], []
            for which, (widths, kept, base) in enumerate((
                    (new_attn.qk_dims, lambda h: h.qk, 0), (new_attn.qk_dims, lambda h: h.qk, sqk),
                    (new_attn.v_dims, lambda h: h.v, 2 * sqk))):
                d, s_ = _padded_index(heads, widths, kept,
                                      lambda h, j, which=which: which * H * Dh + h.index * Dh + j)
                dst += [base + i for i in d]
                src += s_
            cd, cs = _padded_index(heads, new_attn.v_dims, lambda h: h.v,
                                   lambda h, j: h.index * Dh + j)
            dev = w.device
            di, si = (torch.tensor(x, dtype=torch.long, device=dev) for x in (dst, src))
            cdi, csi = (torch.tensor(x, dtype=torch.long, device=dev) for x in (cd, cs))
            for p in new_attn.parameters():
                p.zero_()  # padded rows and columns are zero: the padding is exact
            new_attn.qkv.weight[di] = w.index_select(0, si)
            if attn.qkv.bias is not None:
                new_attn.qkv.bias[di] = attn.qkv.bias.index_select(0, si)
            new_attn.proj.weight[:, cdi] = attn.proj.weight.index_select(1, csi)
            if attn.proj.bias is not None:
                new_attn.proj.bias.copy_(attn.proj.bias)
    new_mlp = None
    if bspec.has_mlp:
        m = len(bspec.mlp)
        new_mlp = Mlp(mlp.fc1.in_features, m, mlp.fc2.out_features,
                      bias=(mlp.fc1.bias is not None, mlp.fc2.bias is not None))
        pack_mlp(new_mlp)
        new_mlp.act = copy.deepcopy(mlp.act)
        new_mlp.drop1, new_mlp.drop2 = copy.deepcopy(mlp.drop1), copy.deepcopy(mlp.drop2)
        new_mlp.to(device=mlp.fc1.weight.device, dtype=mlp.fc1.weight.dtype)
        if copy_weights:
            idx = torch.tensor(bspec.mlp, dtype=torch.long, device=mlp.fc1.weight.device)
            new_mlp.fc1.weight.copy_(mlp.fc1.weight.index_select(0, idx))
            if mlp.fc1.bias is not None:
                new_mlp.fc1.bias.copy_(mlp.fc1.bias.index_select(0, idx))
            new_mlp.fc2.weight.copy_(mlp.fc2.weight.index_select(1, idx))
            if mlp.fc2.bias is not None:
                new_mlp.fc2.bias.copy_(mlp.fc2.bias)
    keep_a, keep_m = new_attn is not None, new_mlp is not None
    return CompactBlock(
        copy.deepcopy(block.norm1) if keep_a else None, new_attn,
        copy.deepcopy(block.ls1) if keep_a else None, copy.deepcopy(block.drop_path1) if keep_a else None,
        copy.deepcopy(block.norm2) if keep_m else None, new_mlp,
        copy.deepcopy(block.ls2) if keep_m else None, copy.deepcopy(block.drop_path2) if keep_m else None)


@torch.no_grad()
def fold_gates(model: nn.Module) -> None:
    """In place: multiply the gate values of every gated ViT module into its weights, so that
    the block computes the same with the kept gates at 1. Mask gates are 0/1, so this changes
    nothing for them; SSS scale factors (any real value) survive compile this way.

    q/k gates scale q and k rows alike (q*g . k*g, as the gated forward does), value gates
    (times the head gate) scale v rows, the block gate scales proj (or fc2) weight and bias,
    and neuron gates scale the fc2 columns that read them.
    """
    from pyengine.models.vit.gated import GatedAttention, GatedMlp

    for m in model.modules():
        if isinstance(m, GatedAttention):
            g = m.gates.values()
            H, Dh = m.num_heads, m.head_dim
            row = torch.cat([g["qk"].reshape(-1), g["qk"].reshape(-1),
                             (g["v"] * g["head"][:, None]).reshape(-1)])
            row = row.to(m.qkv.weight.dtype)
            assert row.numel() == 3 * H * Dh
            m.qkv.weight.mul_(row[:, None])
            if m.qkv.bias is not None:
                m.qkv.bias.mul_(row)
            m.proj.weight.mul_(g["block"])
            if m.proj.bias is not None:
                m.proj.bias.mul_(g["block"])
        elif isinstance(m, GatedMlp):
            g = m.gates.values()
            m.fc2.weight.mul_(g["neuron"].to(m.fc2.weight.dtype)[None, :] * g["block"])
            if m.fc2.bias is not None:
                m.fc2.bias.mul_(g["block"])
