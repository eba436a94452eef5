"""The adapter machinery the EVA, BEiT and Swin adapters share: gate, spec, apply, fold,
build, cost, ledger, importance, HiAP's expected MACs and projection, synthetic structures.

A family adapter subclasses :class:`TransformerAdapter` and says where its blocks are
(:meth:`~TransformerAdapter.block_slots`), what its dense geometry is, how its attention is
wired (rotary layout, prefix tokens), how a compact block is built, and which stem/head rows
its cost has.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from pyengine.models.base import Adapter, UnsupportedModuleError
from pyengine.models.transformer.compact import fold_gates
from pyengine.models.transformer.gated import GatedAttention, GatedFFN
from pyengine.models.transformer.gating import block_of_masks, masks_of_block
from pyengine.structure.spec import SpecError

__all__ = ["TransformerAdapter"]


class TransformerAdapter(Adapter):
    """Shared part of the EVA / BEiT / Swin adapters (see the module docstring)."""

    model_type: str = ""            # "timm.models.eva.Eva": the timm class this family takes

    # ---- what a family says -------------------------------------------------------------
    def block_slots(self, model: nn.Module) -> list[tuple[nn.Module, int]]:
        """(container, index) of every transformer block, in spec order (default: the
        ``blocks`` list of a plain token model)."""
        return [(model.blocks, i) for i in range(len(model.blocks))]

    def attn_options(self, model: nn.Module) -> dict:
        """Keywords of :class:`GatedAttention` / ``compact_attention`` (``rope_half``, ``npt``)."""
        return {}

    def compact_block(self, block: nn.Module, b, sh, copy_weights: bool, opts: dict) -> nn.Module:
        raise NotImplementedError

    def cost_rows(self, spec, row, batch: int, attention: str) -> None:
        raise NotImplementedError

    def rebuild_kwargs(self, model: nn.Module) -> dict:
        """timm kwargs that rebuild the dense container when it was not made by
        ``pyengine.create_model`` (which remembers its own)."""
        g = self.geometry(model)
        return {"num_classes": g.num_classes, "in_chans": g.in_chans,
                "img_size": list(model.patch_embed.img_size)}

    # ---- recognising ----------------------------------------------------------------------
    def _timm_class(self):
        import importlib
        mod, _, cls = self.model_type.rpartition(".")
        return getattr(importlib.import_module(mod), cls)

    def supports(self, model: nn.Module) -> str | None:
        return None if isinstance(model, self._timm_class()) else \
            f"not a {self.model_type.rpartition('.')[2]}"

    def check(self, model: nn.Module) -> None:
        self.geometry(model)

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return [c[i] for c, i in self.block_slots(model)]

    def is_gated(self, model: nn.Module) -> bool:
        return any(isinstance(m, (GatedAttention, GatedFFN)) for m in model.modules())

    def _gated_pairs(self, model: nn.Module) -> list[tuple[GatedAttention, GatedFFN]]:
        if not self.is_gated(model):
            raise ValueError("model is not gated: call pyengine.gate(model) first")
        return [(b.attn, b.mlp) for b in self.blocks(model)]

    # ---- structure -------------------------------------------------------------------------
    def gate(self, model: nn.Module, make_gates) -> None:
        g = self.geometry(model)
        opts = self.attn_options(model)
        blocks = self.blocks(model)
        # build every gated module first: an unsupported block leaves the model untouched
        new = [(GatedAttention(b.attn, sh, make_gates, **opts), GatedFFN(b.mlp, sh, make_gates))
               for b, sh in zip(blocks, g.shapes())]
        for b, (a, m) in zip(blocks, new):
            b.attn, b.mlp = a, m

    def gate_sets(self, model: nn.Module) -> list:
        """Per block its attention's gates, then its FFN's (the pairs HiAP reads)."""
        return [gs for a, m in self._gated_pairs(model) for gs in (a.gates, m.gates)]

    def spec(self, model: nn.Module, name: str | None):
        g = self.geometry(model)
        if not self.is_gated(model):
            return self.spec_type.full(g, model=name)
        blocks = [block_of_masks(a.gates.hard(), m.gates.hard(), sh)
                  for (a, m), sh in zip(self._gated_pairs(model), g.shapes())]
        return self.spec_type(tuple(blocks), model=name, dense=g)

    def apply(self, model: nn.Module, s, name: str | None) -> None:
        g = self.geometry(model)
        s.check_geometry(g, name)
        if s.dense is not None and s.dense != g:
            raise SpecError(f"spec was made for a model of geometry {s.dense}, this one is {g}")
        for (a, m), b, sh in zip(self._gated_pairs(model), s.blocks, g.shapes()):
            am, mm = masks_of_block(b, sh, device=a.proj.weight.device)
            a.gates.set_hard(am)
            m.gates.set_hard(mm)

    def fold_gates(self, model: nn.Module) -> None:
        fold_gates(model)

    def build(self, container: nn.Module, s, copy_weights: bool) -> nn.Module:
        opts = self.attn_options(container)
        for (c, i), b, sh in zip(self.block_slots(container), s.blocks, s.dense.shapes()):
            c[i] = self.compact_block(c[i], b, sh, copy_weights, opts)
        container.pyengine_spec = s
        return container


    # ---- cost --------------------------------------------------------------------------------
    def resolve_spec(self, model_or_spec: Any):
        if isinstance(model_or_spec, self.spec_type):
            s = model_or_spec
        elif isinstance(model_or_spec, nn.Module):
            s = getattr(model_or_spec, "pyengine_spec", None)
            if s is None:
                s = self.spec(model_or_spec, None)
        else:
            raise TypeError(f"cost() takes a spec or a model, got {type(model_or_spec).__name__}")
        if s.dense is None:
            raise ValueError(f"cost of a {self.name} spec needs its dense geometry: this spec has "
                             "no 'dense' field; take it with pyengine.spec(model)")
        return s

    def cost(self, model_or_spec, rows, batch: int, attention: str = "fused",
             img_size: int | None = None, **options) -> str:
        if img_size is not None:
            raise ValueError(f"img_size is for CNNs; a {self.name} model's input size is part of "
                             "its geometry (create it with img_size=...)")
        if attention not in ("fused", "math"):
            raise ValueError(f"attention must be 'fused' or 'math', got {attention!r}")
        self.cost_rows(self.resolve_spec(model_or_spec), rows, batch, attention)
        return attention

    def block_cost_rows(self, s, row, batch: int, attention: str, names: Sequence[str],
                        rope: bool = False, qk_norm: bool = False) -> None:
        from pyengine.models.transformer.cost import block_rows
        for pre, b, sh in zip(names, s.blocks, s.dense.shapes()):
            block_rows(row, pre, sh, b, batch, attention, rope=rope, qk_norm=qk_norm)

    def dense_macs(self, g, name: str | None = None) -> int:
        from pyengine.cost import cost
        return cost(self.spec_type.full(g, model=name)).macs

    def ledger(self, g, model: str | None, **constraints):
        from pyengine.models.transformer.ledger import TransformerLedger
        return TransformerLedger(g, model, self, **constraints)

    def importance(self, model: nn.Module):
        from pyengine.models.transformer.importance import TransformerUnits
        return TransformerUnits(self._gated_pairs_for_scoring(model), self.geometry(model))

    def _gated_pairs_for_scoring(self, model: nn.Module):
        if self.is_compact(model):
            raise TypeError("compact (compiled) models cannot be scored; score the gated one")
        if not self.is_gated(model):
            raise TypeError(f"score a gated {self.name} model (pyengine.gate(model)): its units "
                            "are read from the gated attention and FFN modules")
        return self._gated_pairs(model)

    # ---- HiAP --------------------------------------------------------------------------------
    def expected_macs(self, model: nn.Module, probs: Sequence | None = None, batch: int = 1,
                      transform=None) -> torch.Tensor:
        """Differentiable expected MACs (float64) of a gated model from keep probabilities
        ``probs`` (aligned with :meth:`gate_sets`; default: each gate set's ``probs()``, or its
        hard masks); ``transform(slot, tensor)`` is applied to each probability first."""
        from pyengine.models.transformer.expected import expected_total_macs
        g = self.geometry(model)
        sets = self.gate_sets(model)
        if probs is None:
            probs = [gs.probs() if hasattr(gs, "probs") else
                     {k: v.double() for k, v in gs.hard().items()} for gs in sets]
        if transform is not None:
            probs = [{k: transform(k, v) for k, v in p.items()} for p in probs]
        return expected_total_macs(self, g, probs, batch)

    def project(self, model: nn.Module, scores: Sequence, target: float, **options):
        """HiAP's final structure at ``target`` from logit-like ``scores`` (one dict per gate
        set, aligned with :meth:`gate_sets`); applied to ``model`` and returned."""
        from pyengine.models.transformer.project import project
        return project(self, model, scores, target, **options)


def _name(model: nn.Module) -> str | None:
    from pyengine.models.factory import model_name
    return model_name(model)


def require(cond: bool, where: str, what: str, supported: str) -> None:
    """UnsupportedModuleError ``where: what; supported: ...`` unless ``cond``."""
    if not cond:
        raise UnsupportedModuleError(f"{where}: {what}; supported: {supported}")
