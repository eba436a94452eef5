"""The machinery shared by the block-structured CNN families (ConvNeXt, EfficientNet /
MobileNetV3, RegNet): a model is a list of stages of blocks; each timm block type has a
pyengine twin (:class:`PrunableBlock`) with timm's attribute names (a timm state dict still
loads) that is *gated* when it holds a gate set and *compact* when it does not.

A family (:class:`Family`) says where the stages are and which twin each timm block type has;
a twin says what its block is (:class:`~pyengine.models.cnn.spec.SlotBlock`: one prunable
channel slot, whether the residual branch can go), how gates enter its forward, how gate
values fold into its weights, how it slices to kept channels, and its importance units.

Gates of a block: its slot (one value per unit: channel, or group of a grouped conv), applied
where the slot's channels are produced (after their activation), and ``block`` (a scalar on
the residual branch before the add) for blocks with a residual connection. A block without a
residual has no ``block`` gate; if all its units are off, its spec keeps its first unit with
gate value 0 (exactly what the gated block computes: a kept channel whose value is 0).
"""
from __future__ import annotations

import copy
from typing import Callable, Mapping

import torch
from torch import nn

from pyengine.models.base import UnsupportedModuleError
from pyengine.models.cnn.spec import BlockGeometry, BlockSpec, SlotBlock
from pyengine.structure.gates import Gates
from pyengine.structure.spec import ConvBlock, SpecError, make_conv_block

__all__ = ["PrunableBlock", "RemovedBlock", "Family", "BlockRef"]


class PrunableBlock(nn.Module):
    """Base of the gated / compact twins of timm blocks (see the module docstring).

    Subclasses set ``TIMM`` (the timm block type), ``NAMES`` (timm's attribute names they take
    over) and implement ``describe``, ``forward``, ``fold``, ``compact``, ``units``.
    """

    TIMM: type | tuple = ()
    NAMES: tuple[str, ...] = ()
    FLAGS: tuple[str, ...] = ()  # plain attributes taken over (e.g. use_conv_mlp)

    def __init__(self, mods: Mapping[str, nn.Module | None], info: SlotBlock,
                 gates: Gates | None = None, **flags):
        super().__init__()
        for name in self.NAMES:
            setattr(self, name, mods[name])
        for name in self.FLAGS:
            setattr(self, name, flags[name])
        self.info = info
        self.gates = gates

    # ---- what the block is --------------------------------------------------------------
    @classmethod
    def describe(cls, blk: nn.Module, where: str) -> SlotBlock:
        """The dense block of a timm block; :class:`UnsupportedModuleError` if it cannot be
        pruned exactly."""
        raise NotImplementedError

    @classmethod
    def of(cls, blk: nn.Module, info: SlotBlock, gates: Gates | None = None) -> "PrunableBlock":
        """The twin of a timm block (or another twin): the same modules, not copies."""
        return cls({n: getattr(blk, n) for n in cls.NAMES}, info, gates,
                   **{n: getattr(blk, n) for n in cls.FLAGS})

    def copies(self, replace: Mapping[nn.Module, nn.Module] | None = None) -> dict:
        """Deep copies of the taken-over modules, with the modules in ``replace`` (anywhere
        inside them) swapped for their replacements."""
        memo = {id(k): v for k, v in (replace or {}).items()}
        return {n: copy.deepcopy(getattr(self, n), memo) for n in self.NAMES}

    def twin_of(self, mods: Mapping[str, nn.Module | None]) -> "PrunableBlock":
        """A compact block of this type from ``mods`` (same flags and dense info)."""
        return type(self)(mods, self.info, None, **{n: getattr(self, n) for n in self.FLAGS})

    @property
    def residual(self) -> bool:
        """Whether the block adds a shortcut (its branch can be removed)."""
        return self.info.removable

    def gate_values(self) -> dict[str, torch.Tensor] | None:
        return self.gates.values() if self.gates is not None else None

    def unit_scale(self, g: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The slot's gate values, one per channel (a group's value on each of its channels)."""
        v = g[self.info.slot]
        return v.repeat_interleave(self.info.group) if self.info.group > 1 else v

    # ---- compile ------------------------------------------------------------------------
    def fold(self) -> None:
        """In place: multiply the gate values into the weights (gates at 1 then compute the
        same on the kept units)."""
        raise NotImplementedError

    def compact(self, channels: list[int] | None) -> nn.Module:
        """A compact twin keeping ``channels`` of the slot (None: no slot), sliced copies."""
        raise NotImplementedError

    def removed(self, nonneg_input: bool) -> nn.Module:
        """What is left when the residual branch goes: the shortcut (and any activation after
        the add); ``nonneg_input``: the block's input is known to be >= 0."""
        return nn.Identity()

    # ---- importance and SSS --------------------------------------------------------------
    def units(self) -> tuple[list, dict, list]:
        """``(hooks, layers, groups)`` in the vocabulary of :mod:`pyengine.models.importance`."""
        raise NotImplementedError

    def frozen_norms(self) -> list[nn.Module]:
        """BatchNorms that read the slot's channels through one conv (SSS trains them on their
        running statistics, see :func:`pyengine.methods.sss.frozen_norms`)."""
        return []

    def extra_repr(self) -> str:
        return f"gates={self.gates.kind}" if self.gates is not None else "compact"


class RemovedBlock(nn.Module):
    """A block whose residual branch is removed: ``act(shortcut(x))``."""

    def __init__(self, shortcut: nn.Module, act: nn.Module):
        super().__init__()
        self.shortcut, self.act = shortcut, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.shortcut(x))


class BlockRef:
    """Where one block lives: ``container[key]`` (a Sequential index or a child name)."""

    def __init__(self, container: nn.Module, key: int | str):
        self.container, self.key = container, key

    def get(self) -> nn.Module:
        return self.container[self.key] if isinstance(self.key, int) else \
            getattr(self.container, self.key)

    def set(self, module: nn.Module) -> None:
        if isinstance(self.key, int):
            self.container[self.key] = module
        else:
            setattr(self.container, self.key, module)


class Family:
    """One model family: its timm model class, its stages and block twins."""

    name = "cnn"
    supported = ""
    block_types: tuple[type[PrunableBlock], ...] = ()

    def is_model(self, model: nn.Module) -> bool:
        raise NotImplementedError

    def stages(self, model: nn.Module) -> list[list[BlockRef]]:
        raise NotImplementedError

    def nonneg_input(self, model: nn.Module) -> bool:
        """True when every block's input is the output of a ReLU (a removed block whose
        shortcut is the identity then needs no activation)."""
        return False

    def twin(self, blk: nn.Module, where: str) -> type[PrunableBlock] | None:
        """The twin type of a timm block or a twin; raises if the type is not supported."""
        for t in self.block_types:
            if isinstance(blk, t) or type(blk) in (t.TIMM if isinstance(t.TIMM, tuple)
                                                   else (t.TIMM,)):
                return t
        raise UnsupportedModuleError(
            f"{where} is {type(blk).__module__}.{type(blk).__name__}, which pyengine cannot "
            f"prune; supported: {self.supported}")

    # ---- the generic pieces behind the adapter --------------------------------------------
    def refs(self, model: nn.Module) -> list[tuple[str, BlockRef]]:
        """``(where, ref)`` of every block, stage by stage."""
        return [(f"stages[{s}][{b}]", r) for s, st in enumerate(self.stages(model))
                for b, r in enumerate(st)]

    def infos(self, model: nn.Module) -> list[SlotBlock]:
        out = []
        for where, r in self.refs(model):
            blk = r.get()
            if isinstance(blk, PrunableBlock):
                if blk.gates is None:
                    raise ValueError(f"{where} is compact; a compact model carries its geometry "
                                     "in its spec")
                out.append(blk.info)
            elif isinstance(blk, (RemovedBlock, nn.Identity)):
                raise ValueError(f"{where} is a removed block of a compact model")
            else:
                out.append(self.twin(blk, where).describe(blk, where))
        return out

    def geometry(self, model: nn.Module, geometry_type: type[BlockGeometry]) -> BlockGeometry:
        from pyengine.models.resnet.blocks import model_img_size
        s = getattr(model, "pyengine_spec", None)
        if isinstance(s, BlockSpec) and s.dense is not None:
            return s.dense
        infos = self.infos(model)
        cfg = getattr(model, "pyengine_config", None) or {}
        kwargs = {k: v for k, v in (cfg.get("kwargs") or {}).items()
                  if k not in ("num_classes", "in_chans", "img_size")}
        return geometry_type(layers=tuple(len(st) for st in self.stages(model)),
                             blocks=tuple(infos), in_chans=self.in_chans(model),
                             num_classes=model.num_classes, img_size=model_img_size(model),
                             kwargs=kwargs)

    def in_chans(self, model: nn.Module) -> int:
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                return m.in_channels
        raise UnsupportedModuleError(f"{type(model).__name__} has no Conv2d stem")

    def gated(self, model: nn.Module) -> list[PrunableBlock]:
        return [r.get() for _, r in self.refs(model)
                if isinstance(r.get(), PrunableBlock) and r.get().gates is not None]

    def is_gated(self, model: nn.Module) -> bool:
        return any(isinstance(m, PrunableBlock) and m.gates is not None
                   for m in model.modules())

    def gate(self, model: nn.Module, make_gates: Callable[[Mapping], Gates]) -> None:
        """In place: every block with something to prune becomes its gated twin."""
        new = []  # all twins first: an unsupported block leaves the model untouched
        for where, r in self.refs(model):
            blk = r.get()
            if isinstance(blk, (PrunableBlock, RemovedBlock)):
                raise ValueError("model is already gated or compiled")
            t = self.twin(blk, where)
            info = t.describe(blk, where)
            shapes = {}
            if info.removable:
                shapes["block"] = ()
            if info.slot:
                shapes[info.slot] = (info.units,)
            if shapes:
                new.append((r, t.of(blk, info, make_gates(shapes))))
        for r, g in new:
            g.train(r.get().training)
            r.set(g)

    def spec(self, model: nn.Module, spec_type: type[BlockSpec], name: str | None) -> BlockSpec:
        g = self.geometry(model, spec_type.geometry_type)
        if not self.is_gated(model):
            return spec_type.full(g, model=name)
        it = iter(g.blocks)
        stages = []
        for st in self.stages(model):
            out = []
            for r in st:
                blk, info = r.get(), next(it)
                if not isinstance(blk, PrunableBlock):
                    out.append(make_conv_block(True, **({info.slot: range(info.channels)}
                                                        if info.slot else {})))
                    continue
                h = blk.gates.hard()
                keep = bool(h["block"]) if info.removable else True
                if not keep:
                    out.append(make_conv_block(False))
                    continue
                chans = {}
                if info.slot:
                    units = torch.nonzero(h[info.slot]).flatten().tolist() or [0]
                    chans[info.slot] = [u * info.group + j for u in units
                                        for j in range(info.group)]
                out.append(make_conv_block(True, **chans))
            stages.append(tuple(out))
        return spec_type(tuple(stages), model=name, dense=g)

    def apply(self, model: nn.Module, s: BlockSpec, name: str | None) -> None:
        g = self.geometry(model, type(s).geometry_type)
        s.check_geometry(g, name)
        if s.dense is not None and s.dense != g:
            raise SpecError(f"spec was made for a model of geometry {s.dense}, this one is {g}")
        for (where, r), b, info in zip(self.refs(model), s.blocks, g.blocks):
            blk = r.get()
            if not isinstance(blk, PrunableBlock):
                continue  # nothing to prune: the spec keeps it whole (checked above)
            dev = next(blk.parameters()).device
            masks = {}
            if info.removable:
                masks["block"] = torch.tensor(b.keep, device=dev)
            if info.slot:
                m = torch.zeros(info.units, dtype=torch.bool, device=dev)
                kept = b.kept(info.slot)
                if kept:
                    m[sorted({c // info.group for c in kept})] = True
                else:  # a removed block: its units' masks do not matter
                    m[:] = True
                masks[info.slot] = m
            blk.gates.set_hard(masks)

    @torch.no_grad()
    def fold_gates(self, model: nn.Module) -> None:
        for blk in self.gated(model):
            blk.fold()

    def build(self, container: nn.Module, s: BlockSpec, copy_weights: bool) -> nn.Module:
        """Replace every block of ``container`` (dense, or gated with folded gates) by its
        compact twin for ``s`` (copies of the kept weights; blocks with nothing to prune stay
        as they are); ``container.pyengine_spec = s``."""
        nonneg = self.nonneg_input(container)
        for (where, r), b in zip(self.refs(container), s.blocks):
            blk = r.get()
            t = self.twin(blk, where)
            if not isinstance(blk, PrunableBlock):
                info = t.describe(blk, where)
                if not info.slot and not info.removable:
                    continue
                blk = t.of(blk, info)
            if not b.keep:
                new = blk.removed(nonneg)
            else:
                new = blk.compact(list(b.kept(blk.info.slot)) if blk.info.slot else None)
            new.train(blk.training)
            r.set(new)
        container.pyengine_spec = s
        return container


def check(cond: bool, where: str, what: str, supported: str) -> None:
    """Raise :class:`UnsupportedModuleError` naming the block unless ``cond``."""
    if not cond:
        raise UnsupportedModuleError(f"{where}: {what}; supported: {supported}")
