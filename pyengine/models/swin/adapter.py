"""The adapter of timm Swin Transformers (``timm.models.swin_transformer.SwinTransformer``).

Structure units, per block (all stages' blocks in order, ``layers.s.blocks.j``): the heads of
its window attention with their q/k and value dims, and the FFN neurons (:class:`SwinSpec`;
stages differ in width, heads and tokens). Each block's relative-position table keeps the
columns of its kept heads; a head without q/k dims attends by its bias (and the shifted-window
mask) alone. What stays: the stage widths (residual streams), the patch embedding, patch
merging, the windows and shifts (the compact block partitions, pads and shifts exactly as
timm does), the final norm and the head.

Not supported: ``dynamic_img_size`` / ``strict_img_size=False`` (masks built per call; the
cost model needs one input size), norms other than LayerNorm.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from pyengine.models.base import register_adapter
from pyengine.models.transformer.adapter import TransformerAdapter, require
from pyengine.models.transformer.compact import compact_attention, compact_ffn
from pyengine.models.transformer.gated import GatedAttention, attn_heads
from pyengine.models.transformer.spec import BlockShape, TransformerGeometry, TransformerSpec
from pyengine.models.transformer.tokens import check_norm, ffn_config
from pyengine.structure.spec import register_spec_type

SUPPORTED = ("timm SwinTransformer models with fixed input size (swin_tiny/small/base/large_"
             "patch4_window7/12_*), LayerNorms, Mlp FFNs")


@dataclass(frozen=True)
class SwinGeometry(TransformerGeometry):
    """Dense shape of a timm Swin: per stage its blocks, width, heads, head dim, FFN width,
    token grid, window and the shift of its odd blocks ((0, 0) when the window covers the
    grid)."""

    depths: tuple[int, ...]
    dims: tuple[int, ...]
    num_heads: tuple[int, ...]
    head_dims: tuple[int, ...]
    mlp_hiddens: tuple[int, ...]
    resolutions: tuple[tuple[int, int], ...]
    windows: tuple[tuple[int, int], ...]
    shifts: tuple[tuple[int, int], ...]
    in_chans: int = 3
    patch_size: tuple[int, int] = (4, 4)
    num_classes: int = 0
    qkv_bias: bool = True
    patch_norm: bool = True
    pool: str = "avg"

    _POSITIVE = ("depths", "dims", "num_heads", "head_dims", "mlp_hiddens", "in_chans",
                 "patch_size")

    # what a fraction of a head's dims or of an FFN is taken of (--min-head-dims, --min-ffn
    # become one count for all blocks): the smallest stage's
    @property
    def head_dim(self) -> int:
        return min(self.head_dims)

    @property
    def mlp_hidden(self) -> int:
        return min(self.mlp_hiddens)

    def block_shapes(self) -> tuple[BlockShape, ...]:
        n = len(self.depths)
        for name in ("dims", "num_heads", "head_dims", "mlp_hiddens", "resolutions", "windows",
                     "shifts"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries for {n} stages")
        out = []
        for s in range(n):
            (H, W), (wh, ww) = self.resolutions[s], self.windows[s]
            sh = BlockShape(
                dim=self.dims[s], heads=self.num_heads[s], head_dim=self.head_dims[s],
                hidden=self.mlp_hiddens[s], tokens=H * W,
                windows=math.ceil(H / wh) * math.ceil(W / ww), window=wh * ww,
                qkv_bias="qkv" if self.qkv_bias else "none", attn_bias=True,
                bias_rows=(2 * wh - 1) * (2 * ww - 1))
            out += [sh] * self.depths[s]
        return tuple(out)


@register_spec_type("swin")
@dataclass(frozen=True)
class SwinSpec(TransformerSpec):
    """What a pruned Swin keeps (JSON ``"family": "swin"``; ``blocks`` run over all stages:
    ``blocks[i]`` is the i-th block of ``layers.0.blocks``, ``layers.1.blocks``, ...)."""

    geometry_type = SwinGeometry


def _stages(model: nn.Module) -> list[nn.Module]:
    return list(model.layers)


def geometry(model: nn.Module) -> SwinGeometry:
    """The dense geometry of a timm Swin, gated or not (compact ones carry it in the spec)."""
    s = getattr(model, "pyengine_spec", None)
    if isinstance(s, SwinSpec) and s.dense is not None:
        return s.dense
    from timm.models.swin_transformer import (PatchMerging, SwinTransformerBlock,
                                              WindowAttention)
    require(not model.dynamic_img_size, "model", "dynamic_img_size / strict_img_size=False "
            "(attention masks built per input size)", SUPPORTED)
    stages = {k: [] for k in ("depths", "dims", "num_heads", "head_dims", "mlp_hiddens",
                              "resolutions", "windows", "shifts")}
    qkv_bias = None
    for s, st in enumerate(_stages(model)):
        require(isinstance(st.downsample, PatchMerging if s > 0 else nn.Identity),
                f"layers.{s}.downsample", "expected timm PatchMerging between stages", SUPPORTED)
        if s > 0:
            require(check_norm(st.downsample.norm, st.downsample.norm.normalized_shape[0])
                    and st.downsample.reduction.bias is None, f"layers.{s}.downsample",
                    "patch merging must be a LayerNorm and a bias-free Linear", SUPPORTED)
        cfgs = []
        for j, blk in enumerate(st.blocks):
            where = f"layers.{s}.blocks.{j}"
            require(type(blk) is SwinTransformerBlock, where,
                    f"{type(blk).__name__} is not a timm SwinTransformerBlock", SUPPORTED)
            attn = blk.attn
            if not isinstance(attn, GatedAttention):
                require(type(attn) is WindowAttention, f"{where}.attn",
                        f"{type(attn).__name__} is not a timm WindowAttention", SUPPORTED)
            require(not getattr(blk, "dynamic_mask", False), where, "dynamic masks", SUPPORTED)
            D = blk.dim
            require(check_norm(blk.norm1, D) and check_norm(blk.norm2, D), where,
                    "block norms must be LayerNorms with weight and bias", SUPPORTED)
            require(attn.proj.bias is not None, f"{where}.attn", "proj without bias", SUPPORTED)
            H, Dh = attn_heads(attn)
            ffn = ffn_config(blk.mlp, f"{where}.mlp", SUPPORTED)
            require(ffn["ffn"] == "mlp", f"{where}.mlp", "only timm Mlp FFNs", SUPPORTED)
            cfgs.append((D, H, Dh, ffn["mlp_hidden"], tuple(blk.input_resolution),
                         tuple(blk.window_size), tuple(blk.shift_size)))
            qkv_bias = attn.qkv.bias is not None
        require(len(cfgs) > 0, f"layers.{s}", "a stage without blocks", SUPPORTED)
        even, odd = cfgs[0], cfgs[1] if len(cfgs) > 1 else None
        require(even[6] == (0, 0), f"layers.{s}.blocks.0", "a shifted first block", SUPPORTED)
        for j, c in enumerate(cfgs):
            ref = even if j % 2 == 0 else odd
            require(c == ref, f"layers.{s}.blocks.{j}", "blocks of a stage differ in shape (or in "
                    "their shift pattern)", SUPPORTED)
        D, H, Dh, M, res, win, _ = even
        for k, v in zip(("dims", "num_heads", "head_dims", "mlp_hiddens", "resolutions",
                         "windows", "shifts"), (D, H, Dh, M, res, win, odd[6] if odd else (0, 0))):
            stages[k].append(v)
        stages["depths"].append(len(cfgs))
    pe = model.patch_embed
    require(isinstance(pe.norm, nn.Identity) or check_norm(pe.norm, stages["dims"][0]),
            "patch_embed.norm", "must be a LayerNorm", SUPPORTED)
    require(check_norm(model.norm, stages["dims"][-1]), "norm", "must be a LayerNorm", SUPPORTED)
    fc = getattr(model.head, "fc", None)
    require(isinstance(fc, (nn.Linear, nn.Identity)), "head", "expected a ClassifierHead with a "
            "Linear", SUPPORTED)
    pool = model.head.global_pool.pool_type if hasattr(model.head, "global_pool") else ""
    return SwinGeometry(
        **{k: tuple(v) for k, v in stages.items()}, in_chans=pe.proj.in_channels,
        patch_size=tuple(pe.patch_size), num_classes=model.num_classes,
        qkv_bias=bool(qkv_bias), patch_norm=not isinstance(pe.norm, nn.Identity),
        pool=pool or "")


class CompactSwinBlock(nn.Module):
    """A Swin block over the kept heads and neurons: timm's shifted-window partition, padding
    and attention mask around a compact attention; an absent branch passes the residual."""

    def __init__(self, block: nn.Module, attn, mlp):
        super().__init__()
        self.input_resolution = tuple(block.input_resolution)
        self.window_size, self.shift_size = tuple(block.window_size), tuple(block.shift_size)
        self.window_area = self.window_size[0] * self.window_size[1]
        keep_a, keep_m = attn is not None, mlp is not None
        self.norm1 = copy.deepcopy(block.norm1) if keep_a else None
        self.attn = attn
        self.drop_path1 = copy.deepcopy(block.drop_path1) if keep_a else None
        self.norm2 = copy.deepcopy(block.norm2) if keep_m else None
        self.mlp = mlp
        self.drop_path2 = copy.deepcopy(block.drop_path2) if keep_m else None
        mask = block.attn_mask if keep_a else None
        self.register_buffer("attn_mask", None if mask is None else mask.clone(), persistent=False)

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        from timm.models.swin_transformer import window_partition, window_reverse
        B, H, W, C = x.shape
        shift = any(self.shift_size)
        if shift:
            x = torch.roll(x, shifts=(-self.shift_size[0], -self.shift_size[1]), dims=(1, 2))
        ph = (self.window_size[0] - H % self.window_size[0]) % self.window_size[0]
        pw = (self.window_size[1] - W % self.window_size[1]) % self.window_size[1]
        x = torch.nn.functional.pad(x, (0, 0, 0, pw, 0, ph))
        _, Hp, Wp, _ = x.shape
        win = window_partition(x, self.window_size).view(-1, self.window_area, C)
        out = self.attn(win, mask=self.attn_mask)
        out = out.view(-1, self.window_size[0], self.window_size[1], C)
        x = window_reverse(out, self.window_size, Hp, Wp)[:, :H, :W, :].contiguous()
        if shift:
            x = torch.roll(x, shifts=self.shift_size, dims=(1, 2))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        if self.attn is not None:
            x = x + self.drop_path1(self._attn(self.norm1(x)))
        if self.mlp is not None:
            x = x.reshape(B, -1, C)
            x = x + self.drop_path2(self.mlp(self.norm2(x)))
            x = x.reshape(B, H, W, C)
        return x


@register_adapter
class SwinAdapter(TransformerAdapter):
    name = "swin"
    spec_type = SwinSpec
    spec_label = "Swin spec (family 'swin')"
    geometry_type = SwinGeometry
    supported = SUPPORTED
    model_type = "timm.models.swin_transformer.SwinTransformer"

    def geometry(self, model: nn.Module) -> SwinGeometry:
        return geometry(model)

    def block_slots(self, model: nn.Module) -> list:
        return [(st.blocks, j) for st in _stages(model) for j in range(len(st.blocks))]

    def compact_block(self, block, b, sh, copy_weights: bool, opts: dict):
        attn = compact_attention(block.attn, b, sh, copy_weights) if b.has_attn else None
        mlp = compact_ffn(block.mlp, b.mlp, copy_weights) if b.has_mlp else None
        return CompactSwinBlock(block, attn, mlp)

    def cost_rows(self, spec, row, batch: int, attention: str) -> None:
        from pyengine.models.transformer.cost import block_rows
        g = spec.dense
        B = batch
        ph, pw = g.patch_size
        (H0, W0), D0, C = g.resolutions[0], g.dims[0], g.in_chans
        P = H0 * W0
        row("patch_embed.proj", "conv", B * P * D0 * C * ph * pw, D0 * C * ph * pw + D0,
            B * P * C * ph * pw + B * P * D0)
        if g.patch_norm:
            row("patch_embed.norm", "norm", 0, 2 * D0, 2 * B * P * D0)
        shapes, blocks = g.shapes(), iter(zip(spec.blocks, g.shapes()))
        for s, n in enumerate(g.depths):
            H, W = g.resolutions[s]
            if s > 0:
                cin, cout = g.dims[s - 1], g.dims[s]
                pre = f"layers.{s}.downsample"
                row(f"{pre}.norm", "norm", 0, 8 * cin, 2 * B * H * W * 4 * cin)
                row(f"{pre}.reduction", "linear", B * H * W * 4 * cin * cout, 4 * cin * cout,
                    B * H * W * (4 * cin + cout))
            for j in range(n):
                b, sh = next(blocks)
                block_rows(row, f"layers.{s}.blocks.{j}", sh, b, B, attention)
        del shapes
        (H, W), D = g.resolutions[-1], g.dims[-1]
        row("norm", "norm", 0, 2 * D, 2 * B * H * W * D)
        row("head.global_pool", "elementwise", 0, 0, B * H * W * D + B * D)
        if g.num_classes > 0:
            c = g.num_classes
            row("head.fc", "linear", B * D * c, D * c + c, B * D + B * c)

