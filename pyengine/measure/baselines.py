"""Peer baselines for the bench: a Torch-Pruning model of the same MACs with uniform heads.

Torch-Pruning (``pip install torch-pruning``, the ``compare`` extra) prunes a timm ViT by
dependency graph: with ``prune_head_dims=True`` it removes the same number of q/k/v dims from
every head of a layer, and with one pruning ratio per layer it keeps the same FFN width in
every block. That is the structure stock attention kernels run well, so it is the fair peer
for our heterogeneous heads at equal MACs.

:func:`torch_pruning_model` picks one head dim ``d`` for every head of every layer (the
uniform ratio that meets the MAC target, rounded to ``multiple``) and then one FFN width
``m`` that closes the remaining MAC gap, and asks Torch-Pruning's ``MetaPruner`` for exactly
those widths (magnitude importance; the residual width, patch embedding and classifier are
left alone, as pyengine's specs leave them). The result is a plain timm model with its
structure attached as ``pyengine_spec``, so :func:`pyengine.cost` counts it like ours.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from pyengine.models.vit.cost import total_macs
from pyengine.structure.spec import Block, Geometry, Head, Spec
from pyengine.models.vit.adapter import geometry
from pyengine.models.factory import model_name


def torch_pruning_available() -> tuple[bool, str]:
    """(True, version) if torch_pruning imports, else (False, the reason)."""
    try:
        import torch_pruning as tp
    except Exception as e:  # ImportError, or a broken install raising something else
        return False, f"torch_pruning is not importable ({type(e).__name__}: {e}); " \
                      "pip install torch-pruning (pyengine[compare])"
    return True, getattr(tp, "__version__", "unknown")


def uniform_spec(g: Geometry, head_dim: int, mlp: int, model: str | None = None,
                 meta: dict | None = None) -> Spec:
    """Every head of every layer at ``head_dim`` q/k and v dims, every FFN at ``mlp`` neurons."""
    if not 1 <= head_dim <= g.head_dim:
        raise ValueError(f"head_dim must be in [1, {g.head_dim}], got {head_dim}")
    if not 0 <= mlp <= g.mlp_hidden:
        raise ValueError(f"mlp must be in [0, {g.mlp_hidden}], got {mlp}")
    dims = tuple(range(head_dim))
    heads = tuple(Head(h, dims, dims) for h in range(g.num_heads))
    blocks = tuple(Block(heads, tuple(range(mlp))) for _ in range(g.depth))
    return Spec(blocks, model=model, dense=g, meta=meta or {})


def uniform_widths(g: Geometry, target: float, multiple: int = 8,
                   model: str | None = None) -> tuple[int, int]:
    """(head dim, FFN width) of a uniformly pruned model closest to ``target`` x dense MACs.

    The head dim follows the one ratio that would meet the target if heads and FFN shrank
    alike (Torch-Pruning's default), rounded to ``multiple``; the FFN width (a multiple too)
    then closes the gap. Both stay >= ``multiple`` (or 1 where the dense width is smaller).
    """
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target must be a MAC fraction in (0, 1], got {target}")
    if not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"multiple must be a positive integer, got {multiple!r}")
    dense = total_macs(Spec.full(g, model=model))
    want = target * dense

    def macs(d: float, m: float) -> float:
        # MACs are affine in each width: interpolate between integer-width specs
        lo = total_macs(uniform_spec(g, 1, 0, model))
        per_d = total_macs(uniform_spec(g, 2, 0, model)) - lo
        per_m = total_macs(uniform_spec(g, 1, 1, model)) - lo
        return lo + (d - 1) * per_d + m * per_m

    lo_r, hi_r = 0.0, 1.0   # kept ratio r: d = r * head_dim, m = r * mlp_hidden
    for _ in range(60):
        r = (lo_r + hi_r) / 2
        if macs(max(1.0, r * g.head_dim), r * g.mlp_hidden) > want:
            hi_r = r
        else:
            lo_r = r
    r = (lo_r + hi_r) / 2

    def snap(x: float, upper: int) -> int:
        step = multiple if upper >= multiple else 1
        return int(min(upper, max(step, step * round(x / step))))

    d = snap(r * g.head_dim, g.head_dim)
    base = macs(d, 0)
    per_m = macs(d, 1) - base
    m = snap((want - base) / per_m, g.mlp_hidden)
    return d, m


def _ratio(keep: int, total: int) -> float:
    # Torch-Pruning keeps int(total * (1 - ratio)) channels: aim half a channel above `keep`
    return 1.0 - (keep + 0.5) / total


def torch_pruning_model(dense: nn.Module, target: float, multiple: int = 8,
                        example_input: torch.Tensor | None = None) -> nn.Module:
    """A Torch-Pruning copy of the timm ViT ``dense`` at about ``target`` x its MACs, with one
    head dim for all heads and one FFN width for all blocks (see the module docstring).

    ``dense`` is not modified. The returned model carries ``pyengine_spec`` (its uniform
    structure) and ``pyengine_baseline`` (how it was made).
    """
    ok, why = torch_pruning_available()
    if not ok:
        raise ImportError(why)
    import torch_pruning as tp
    from timm.layers import Mlp
    try:
        from timm.layers import Attention
    except ImportError:  # older timm keeps it in the ViT module
        from timm.models.vision_transformer import Attention

    g = geometry(dense)  # raises UnsupportedModuleError unless a timm ViT
    name = model_name(dense)
    d, m = uniform_widths(g, target, multiple, name)
    model = copy.deepcopy(dense)
    for attr in ("pyengine_config", "pyengine_spec"):
        model.__dict__.pop(attr, None)
    attns = [b.attn for b in model.blocks]
    mlps = [b.mlp for b in model.blocks]
    if not all(type(a) is Attention for a in attns) or not all(isinstance(f, Mlp) for f in mlps):
        raise ValueError("torch_pruning_model supports timm ViT blocks with timm "
                         "layers.Attention and layers.Mlp")
    if example_input is None:
        p = next(model.parameters())
        size = model.patch_embed.img_size
        example_input = torch.randn(1, g.in_chans, *size, device=p.device, dtype=p.dtype)
    # only what pyengine prunes: head dims (qkv out / proj in) and FFN neurons (fc1 out /
    # fc2 in); the residual stream keeps its width
    ignored = [model.patch_embed.proj] + [a.proj for a in attns] + [f.fc2 for f in mlps]
    ignored += [mod for mod in (getattr(model, "head", None), getattr(model, "head_dist", None))
                if isinstance(mod, nn.Linear)]
    ratios: dict[nn.Module, float] = {}
    for a, f in zip(attns, mlps):
        if d < g.head_dim:
            ratios[a.qkv] = _ratio(d, g.head_dim)
        else:
            ignored.append(a.qkv)
        if m < g.mlp_hidden:
            ratios[f.fc1] = _ratio(m, g.mlp_hidden)
        else:
            ignored.append(f.fc1)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cls_token/pos_embed "unwrapped parameters": not pruned
        pruner = tp.pruner.MetaPruner(
            model, example_input, importance=tp.importance.GroupMagnitudeImportance(p=2),
            pruning_ratio=0.0, pruning_ratio_dict=ratios, ignored_layers=ignored,
            num_heads={a.qkv: a.num_heads for a in attns}, prune_head_dims=True,
            prune_num_heads=False, global_pruning=False)
        pruner.step()
    for a in attns:
        # timm's Attention reads its shapes from these attributes
        a.num_heads = pruner.num_heads.get(a.qkv, a.num_heads)
        a.head_dim = a.qkv.out_features // (3 * a.num_heads)
        a.attn_dim = a.num_heads * a.head_dim
        a.scale = a.head_dim ** -0.5
    got = [(a.num_heads, a.head_dim, f.fc1.out_features) for a, f in zip(attns, mlps)]
    if any(x != (g.num_heads, d, m) for x in got) or model.embed_dim != g.embed_dim or \
            any(a.proj.out_features != g.embed_dim for a in attns):
        raise RuntimeError(f"Torch-Pruning produced (heads, head dim, FFN) = {got}, expected "
                           f"({g.num_heads}, {d}, {m}) in every block; its API may have changed")
    attention_module = "timm Attention"
    if not hasattr(attns[0], "attn_dim") and d != g.head_dim:
        # an older timm reshapes attention output to the residual width; run the same
        # uniform-head computation (qkv, one SDPA call, proj) in a module that does not
        attention_module = "pyengine.padded.PaddedAttention (timm Attention lacks attn_dim)"
        for blk, a in zip(model.blocks, attns):
            blk.attn = _uniform_attention(a)
    spec = uniform_spec(g, d, m, name, meta={"made_by": "torch_pruning.MetaPruner",
                                             "target": target})
    model.pyengine_spec = spec
    model.pyengine_baseline = {"method": "torch-pruning", "torch_pruning": tp.__version__,
                               "attention_module": attention_module,
                               "importance": "GroupMagnitudeImportance(p=2)", "head_dim": d,
                               "num_heads": g.num_heads, "mlp_hidden": m, "multiple": multiple,
                               "target": target,
                               "macs_ratio": total_macs(spec) / total_macs(Spec.full(g, name))}
    return model


@torch.no_grad()
def _uniform_attention(a: nn.Module) -> nn.Module:
    """timm Attention (qkv rows: [q heads | k heads | v heads], head_dim each) as the same
    computation in :class:`~pyengine.padded.PaddedAttention` (identical row layout)."""
    from pyengine.models.vit.padded import PaddedAttention
    if not isinstance(getattr(a, "q_norm", nn.Identity()), nn.Identity):
        raise ValueError("cannot convert a timm Attention with q/k norms")
    out = PaddedAttention(a.qkv.in_features, a.num_heads, a.head_dim, a.head_dim, a.scale,
                          a.qkv.bias is not None, a.proj.bias is not None)
    out.to(device=a.qkv.weight.device, dtype=a.qkv.weight.dtype)
    out.qkv.load_state_dict(a.qkv.state_dict())
    out.proj.load_state_dict(a.proj.state_dict())
    return out


def matching_target(dense: nn.Module, compact: nn.Module) -> float:
    """The MAC fraction of ``compact`` relative to ``dense`` (what the peer should match)."""
    from pyengine.cost import cost
    return cost(compact).macs / cost(dense).macs


def describe(model: nn.Module) -> dict[str, Any]:
    return dict(getattr(model, "pyengine_baseline", {}))


__all__ = ["torch_pruning_available", "torch_pruning_model", "uniform_spec", "uniform_widths",
           "matching_target", "describe"]


# --------------------------------------------------------------------------------------
# CNNs (ConvNeXt, EfficientNet / MobileNetV3, RegNet, ResNet): Torch-Pruning as its README
# shows it, at the compact model's MACs
# --------------------------------------------------------------------------------------

def _tp_cnn(dense: nn.Module, ratio: float, example_input: torch.Tensor, multiple: int):
    """A Torch-Pruning copy of ``dense`` with one channel pruning ratio for every layer."""
    import warnings

    import torch_pruning as tp
    model = copy.deepcopy(dense)
    for attr in ("pyengine_config", "pyengine_spec"):
        model.__dict__.pop(attr, None)
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    ignored = [classifier] if isinstance(classifier, nn.Module) else []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvNeXt's layer scales: "unwrapped parameters"
        pruner = tp.pruner.MetaPruner(
            model, example_input, importance=tp.importance.GroupMagnitudeImportance(p=2),
            pruning_ratio=ratio, ignored_layers=ignored, round_to=multiple or None)
        pruner.step()
    return model


def torch_pruning_cnn_model(dense: nn.Module, target: float, multiple: int = 8,
                            example_input: torch.Tensor | None = None, steps: int = 14
                            ) -> nn.Module:
    """Torch-Pruning's ``MetaPruner`` on a timm CNN as its README uses it (L2 group magnitude
    importance, one channel pruning ratio for every prunable layer, the classifier left
    alone, channels rounded to ``multiple``), at the pruning ratio whose MACs come closest to
    ``target`` x the dense MACs (bisection over ``steps`` ratios; MACs as FlopCounterMode
    counts them). Unlike pyengine's specs, Torch-Pruning also narrows the residual streams
    (stage widths) and the squeeze-excite layers. ``dense`` is not modified; the result carries
    ``pyengine_baseline`` (how it was made)."""
    ok, why = torch_pruning_available()
    if not ok:
        raise ImportError(why)
    import torch_pruning as tp

    from pyengine.cost import count_flops
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target must be a MAC fraction in (0, 1], got {target}")
    if example_input is None:
        from pyengine.measure.bench import _image_shape
        p = next(dense.parameters())
        example_input = torch.randn(1, *_image_shape(dense), device=p.device, dtype=p.dtype)
    was_training = dense.training
    dense.eval()
    base = count_flops(dense, example_input)
    best = None
    lo, hi = 0.0, 0.99
    try:
        for _ in range(steps):
            r = (lo + hi) / 2
            m = _tp_cnn(dense, r, example_input, multiple)
            got = count_flops(m.eval(), example_input) / base
            if best is None or abs(got - target) < abs(best[1] - target):
                best = (r, got, m)
            if abs(got - target) <= 0.002:
                break
            lo, hi = (r, hi) if got > target else (lo, r)
    finally:
        dense.train(was_training)
    r, got, model = best
    model.pyengine_baseline = {"method": "torch-pruning", "torch_pruning": tp.__version__,
                               "pruner": "MetaPruner",
                               "importance": "GroupMagnitudeImportance(p=2)",
                               "pruning_ratio": r, "round_to": multiple, "target": target,
                               "macs_ratio": got}
    return model


__all__ += ["torch_pruning_cnn_model"]
