"""The architecture adapter of a block-structured CNN family: every :class:`Adapter` method
through the family's :class:`~pyengine.models.cnn.family.Family` and the shared pieces of this
package (spec, cost, ledger, importance). A family subclasses :class:`BlockAdapter` with its
``family``, ``spec_type`` and ``geometry_type`` and registers it."""
from __future__ import annotations

from torch import nn

from pyengine.models.base import Adapter
from pyengine.models.cnn.family import Family
from pyengine.models.cnn.spec import BlockGeometry, BlockSpec

__all__ = ["BlockAdapter"]


class BlockAdapter(Adapter):
    family: Family
    spec_type: type = BlockSpec
    geometry_type: type = BlockGeometry

    def supports(self, model: nn.Module) -> str | None:
        return None if self.family.is_model(model) else f"not a {self.supported}"

    def check(self, model: nn.Module) -> None:
        self.family.infos(model)  # every block supported, or a clear error naming it

    def geometry(self, model: nn.Module) -> BlockGeometry:
        return self.family.geometry(model, self.geometry_type)

    def is_gated(self, model: nn.Module) -> bool:
        return self.family.is_gated(model)

    def gate(self, model: nn.Module, make_gates) -> None:
        self.family.gate(model, make_gates)

    def gate_sets(self, model: nn.Module) -> list:
        if not self.family.is_gated(model):
            raise ValueError("model is not gated: call pyengine.gate(model) first")
        return [b.gates for b in self.family.gated(model)]

    def spec(self, model: nn.Module, name: str | None) -> BlockSpec:
        return self.family.spec(model, self.spec_type, name)

    def apply(self, model: nn.Module, s: BlockSpec, name: str | None) -> None:
        self.family.apply(model, s, name)

    def fold_gates(self, model: nn.Module) -> None:
        self.family.fold_gates(model)

    def build(self, container: nn.Module, s: BlockSpec, copy_weights: bool) -> nn.Module:
        return self.family.build(container, s, copy_weights)

    def rebuild_kwargs(self, model: nn.Module) -> dict:
        g = self.geometry(model)
        return {"num_classes": g.num_classes, "in_chans": g.in_chans}

    def block_paths(self, model: nn.Module) -> list[str]:
        """The module path of every block (``stages.0.blocks.1``), stage by stage."""
        names = {id(m): n for n, m in model.named_modules()}
        return [f"{names[id(r.container)]}.{r.key}".lstrip(".")
                for _, r in self.family.refs(model)]

    # ---- cost, solver, importance, HiAP ------------------------------------------------------
    def cost(self, model_or_spec, rows, batch: int, **options) -> str:
        from pyengine.models.cnn.cost import cost_rows
        return cost_rows(self, model_or_spec, rows, batch, **options)

    def ledger(self, g: BlockGeometry, model: str | None, **constraints):
        from pyengine.models.cnn.ledger import SlotLedger
        return SlotLedger(self, g, model, **constraints)

    def importance(self, model: nn.Module):
        from pyengine.models.cnn.importance import BlockUnits
        return BlockUnits(model, self.family)

    def expected_macs(self, model: nn.Module, probs, batch: int = 1):
        from pyengine.models.cnn.ledger import expected_macs
        return expected_macs(self, model, probs, batch)

    def project(self, model: nn.Module, scores, target: float, tolerance: float = 0.03,
                round_to: int | None = None, **constraints):
        from pyengine.models.cnn.ledger import project
        return project(self, model, scores, target, tolerance=tolerance, round_to=round_to)
