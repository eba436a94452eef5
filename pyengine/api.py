"""The public API: gate, spec, apply, compile, save, load."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from pyengine.models.resnet import blocks as resnet
from pyengine.io.atomic import write_bytes, write_json, write_text
from pyengine.models.vit.compact import CompactBlock, compact_block, fold_gates
from pyengine.models.vit.gated import GatedAttention, GatedMlp
from pyengine.structure.gates import gate_factory
from pyengine.structure.spec import Block, CnnSpec, Geometry, Head, Spec, SpecError
from pyengine.models.vit.adapter import check_vit, create_model, dense_config, geometry, is_gated, model_name

MODEL_FORMAT = "pyengine.model/1"
WEIGHTS, SPEC, CONFIG = "model.safetensors", "spec.json", "config.json"


def gate(model: nn.Module, method: str = "mask", **gate_kwargs) -> nn.Module:
    """In place: swap every block's timm Attention/Mlp for gated modules; returns ``model``.

    The gated modules keep the original parameters. ``method`` picks the gate kind
    ("mask": fixed 0/1 masks; "hiap" and "sss" plug into the same slots). timm ResNets get
    gated residual blocks instead (inner conv channels and one gate per block).
    """
    if resnet.is_resnet(model):
        if resnet.is_gated(model):
            if getattr(model, "pyengine_method", None) == method:
                return model
            raise ValueError(f"model is already gated with method {model.pyengine_method!r}")
        resnet.gate(model, gate_factory(method, **gate_kwargs))
        model.pyengine_method = method
        return model
    check_vit(model)
    if is_gated(model):
        if getattr(model, "pyengine_method", None) == method:
            return model
        raise ValueError(f"model is already gated with method {model.pyengine_method!r}")
    make = gate_factory(method, **gate_kwargs)
    geometry(model)  # fails early, with a clear message, on unsupported blocks
    from timm.models.vision_transformer import Block as TimmBlock
    # build all gated modules first, so an unsupported block leaves the model untouched
    new = []
    for i, blk in enumerate(model.blocks):
        if type(blk) is not TimmBlock:
            from pyengine.models.vit.gated import UnsupportedModuleError
            raise UnsupportedModuleError(
                f"blocks.{i} is {type(blk).__module__}.{type(blk).__name__}; pyengine gates "
                "timm's pre-norm vision_transformer.Block")
        new.append((GatedAttention(blk.attn, make), GatedMlp(blk.mlp, make)))
    for blk, (a, m) in zip(model.blocks, new):
        blk.attn, blk.mlp = a, m
    model.pyengine_method = method
    return model


def _gated_blocks(model: nn.Module):
    if not is_gated(model):
        raise ValueError("model is not gated: call pyengine.gate(model) first")
    return [(b.attn, b.mlp) for b in model.blocks]


def spec(model: nn.Module) -> Spec:
    """The current hard structure of ``model`` (gated, compact or plain dense timm)."""
    s = getattr(model, "pyengine_spec", None)
    if s is not None:
        return s
    if resnet.is_resnet(model):
        return resnet.spec(model, model_name(model))
    g = geometry(model)
    name = model_name(model)
    if not is_gated(model):
        return Spec.full(g, model=name)
    blocks = []
    for attn, mlp in _gated_blocks(model):
        a, m = attn.gates.hard(), mlp.gates.hard()
        heads = []
        if bool(a["block"]):
            for h in range(attn.num_heads):
                if bool(a["head"][h]):
                    heads.append(Head(h, tuple(torch.nonzero(a["qk"][h]).flatten().tolist()),
                                      tuple(torch.nonzero(a["v"][h]).flatten().tolist())))
        mlp_idx = tuple(torch.nonzero(m["neuron"]).flatten().tolist()) if bool(m["block"]) else ()
        blocks.append(Block(tuple(heads), mlp_idx))
    return Spec(tuple(blocks), model=name, dense=g)


def apply(model: nn.Module, s: Spec) -> nn.Module:
    """Fix the gates of a gated ``model`` to the structure ``s`` (validated against it)."""
    if isinstance(s, CnnSpec):
        if not resnet.is_resnet(model):
            raise SpecError(f"a CNN spec (stages) does not fit a {type(model).__name__}")
        return resnet.apply(model, s, model_name(model))
    if not isinstance(s, Spec):
        raise TypeError(f"apply expects a pyengine.Spec, got {type(s).__name__}")
    if resnet.is_resnet(model):
        raise SpecError("a ViT spec (blocks) does not fit a ResNet: it needs a CNN spec (stages)")
    g = geometry(model)
    s.check_geometry(g, model_name(model))
    if s.dense is not None and s.dense != g:
        raise SpecError(f"spec was made for a model of geometry {s.dense}, this one is {g}")
    for (attn, mlp), b in zip(_gated_blocks(model), s.blocks):
        dev = attn.qkv.weight.device
        H, Dh = attn.num_heads, attn.head_dim
        head = torch.zeros(H, dtype=torch.bool, device=dev)
        qk = torch.zeros(H, Dh, dtype=torch.bool, device=dev)
        v = torch.zeros(H, Dh, dtype=torch.bool, device=dev)
        for h in b.heads:
            head[h.index] = True
            qk[h.index, list(h.qk)] = True
            v[h.index, list(h.v)] = True
        attn.gates.set_hard({"block": torch.tensor(b.has_attn, device=dev), "head": head,
                             "qk": qk, "v": v})
        neuron = torch.zeros(mlp.hidden, dtype=torch.bool, device=dev)
        neuron[list(b.mlp)] = True
        mlp.gates.set_hard({"block": torch.tensor(b.has_mlp, device=dev), "neuron": neuron})
    return model


def _build(container: nn.Module, s: Spec, copy_weights: bool) -> nn.Module:
    for i, b in enumerate(s.blocks):
        container.blocks[i] = compact_block(container.blocks[i], b, copy_weights)
    container.pyengine_spec = s
    return container


def compile(model: nn.Module) -> nn.Module:  # noqa: A001 - the public name is the contract
    """A dense, smaller copy of a gated ``model`` that computes what its hard gates compute."""
    s = spec(model)
    cfg = _dense_config(model) if _describable(model) else None
    out = copy.deepcopy(model)
    for attr in ("pyengine_method",):
        out.__dict__.pop(attr, None)
    if isinstance(s, CnnSpec):
        if resnet.is_compact(model):
            return out
        resnet.fold_gates(out)
        out = resnet.build(out, s, copy_weights=True)
    else:
        fold_gates(out)  # real-valued gates (SSS scales) live on in the weights
        out = _build(out, s, copy_weights=True)
    if cfg is not None:
        out.pyengine_config = cfg
    return out


def _dense_config(model: nn.Module) -> dict:
    if resnet.is_resnet(model):
        return resnet.dense_config(model, model_name(model))
    return dense_config(model)


def _describable(model: nn.Module) -> bool:
    return getattr(model, "pyengine_config", None) is not None or model_name(model) is not None


def is_compact(model: nn.Module) -> bool:
    return resnet.is_compact(model) or any(isinstance(m, CompactBlock) for m in model.modules())


def save(model: nn.Module, directory) -> Path:
    """Write ``model.safetensors`` + ``spec.json`` + ``config.json`` (no pickle) to ``directory``.

    A gated model is compiled first. Each file is written atomically.
    """
    from safetensors.torch import save as st_save

    if not is_compact(model):
        if not (is_gated(model) or resnet.is_gated(model)):
            raise ValueError("save expects a compact (pyengine.compile) or gated model")
        model = compile(model)
    cfg = getattr(model, "pyengine_config", None)
    if cfg is None:
        raise ValueError("cannot tell which timm model this is; create it with "
                         "pyengine.create_model(name, **kwargs) so it can be rebuilt on load")
    rebuilt = _skeleton(cfg["architecture"], cfg["kwargs"], model.pyengine_spec)
    if repr(rebuilt) != repr(model):
        raise ValueError(
            f"timm.create_model({cfg['architecture']!r}, **{cfg['kwargs']}) does not rebuild this "
            "model's architecture; create it with pyengine.create_model(name, **kwargs)")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    config = {"format": MODEL_FORMAT, "architecture": cfg["architecture"],
              "kwargs": cfg["kwargs"], "torch": torch.__version__}
    write_bytes(d / WEIGHTS, st_save(state, metadata={"format": MODEL_FORMAT}))
    write_text(d / SPEC, model.pyengine_spec.to_json())
    write_json(config, d / CONFIG)
    return d


def _skeleton(architecture: str, kwargs: dict, s: Spec | CnnSpec) -> nn.Module:
    """The compact model's modules, randomly initialised, rebuilt from its config and spec."""
    model = create_model(architecture, **kwargs)
    if isinstance(s, CnnSpec):
        g = resnet.geometry(model)
        if s.dense is not None and s.dense != g:
            raise SpecError(f"spec was made for geometry {s.dense}, the rebuilt model is {g}")
        s.check_geometry(g, architecture)
        s = CnnSpec(s.stages, model=s.model or architecture, dense=s.dense or g, meta=s.meta)
        return resnet.build(model, s, copy_weights=False)
    g = geometry(model)
    if s.dense is not None and s.dense != g:
        raise SpecError(f"spec was made for geometry {s.dense}, the rebuilt model is {g}")
    return _build(model, s.with_dense(g, architecture), copy_weights=False)


def load(directory, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a compact model saved by :func:`save` (timm container + spec + safetensors)."""
    from safetensors.torch import load_file

    d = Path(directory)
    for name in (WEIGHTS, SPEC, CONFIG):
        if not (d / name).is_file():
            raise FileNotFoundError(f"{d / name} is missing; not a pyengine.save directory")
    config = json.loads((d / CONFIG).read_text())
    if config.get("format") != MODEL_FORMAT:
        raise ValueError(f"{d / CONFIG}: format {config.get('format')!r}, expected {MODEL_FORMAT!r}")
    model = _skeleton(config["architecture"], config["kwargs"], Spec.from_json((d / SPEC).read_text()))
    model.load_state_dict(load_file(str(d / WEIGHTS)), strict=True)
    return model.to(device).eval()


__all__ = ["gate", "spec", "apply", "compile", "save", "load", "create_model", "is_compact",
           "Geometry"]
