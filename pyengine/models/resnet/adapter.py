"""The adapter of timm ResNets (BasicBlock and Bottleneck blocks).

Structure units: per residual block, the output channels of each inner conv and the block's
residual branch as a whole (:class:`~pyengine.structure.spec.CnnSpec`). The gated, compact and
removed blocks are in :mod:`.blocks`, costs in :mod:`.cost`, importance units in
:mod:`.importance`.
"""
from __future__ import annotations

from torch import nn

from pyengine.models.base import Adapter, register_adapter
from pyengine.models.resnet import blocks
from pyengine.structure.spec import CnnGeometry, CnnSpec


@register_adapter
class ResNetAdapter(Adapter):
    name = "resnet"
    spec_type = CnnSpec
    spec_label = "CNN spec (stages)"
    geometry_type = CnnGeometry
    supported = blocks.SUPPORTED

    def supports(self, model: nn.Module) -> str | None:
        return None if blocks.is_resnet(model) else "not a timm ResNet"

    def check(self, model: nn.Module) -> None:
        blocks.geometry(model)

    def geometry(self, model: nn.Module) -> CnnGeometry:
        return blocks.geometry(model)

    def is_gated(self, model: nn.Module) -> bool:
        return blocks.is_gated(model)

    def gate(self, model: nn.Module, make_gates) -> None:
        blocks.gate(model, make_gates)

    def gate_sets(self, model: nn.Module) -> list:
        if not blocks.is_gated(model):
            raise ValueError("model is not gated: call pyengine.gate(model) first")
        return [m.gates for m in model.modules() if isinstance(m, blocks.GatedResBlock)]

    def spec(self, model: nn.Module, name: str | None) -> CnnSpec:
        return blocks.spec(model, name)

    def apply(self, model: nn.Module, s: CnnSpec, name: str | None) -> None:
        blocks.apply(model, s, name)

    def fold_gates(self, model: nn.Module) -> None:
        blocks.fold_gates(model)

    def build(self, container: nn.Module, s: CnnSpec, copy_weights: bool) -> nn.Module:
        return blocks.build(container, s, copy_weights)

    def rebuild_kwargs(self, model: nn.Module) -> dict:
        g = blocks.geometry(model)
        return {"num_classes": g.num_classes, "in_chans": g.in_chans}

    def cost(self, model_or_spec, rows, batch: int, **options) -> str:
        from pyengine.models.resnet.cost import cost_rows
        return cost_rows(model_or_spec, rows, batch, **options)

    def ledger(self, g: CnnGeometry, model: str | None, **constraints):
        from pyengine.models.resnet.ledger import CnnLedger
        return CnnLedger(g, model, **constraints)

    def importance(self, model: nn.Module):
        from pyengine.models.resnet.importance import ResNetUnits
        return ResNetUnits(model)

    def expected_macs(self, model: nn.Module, probs, batch: int = 1):
        from pyengine.models.factory import model_name
        from pyengine.models.resnet.ledger import expected_macs
        return expected_macs(blocks.geometry(model), model_name(model), probs, batch)

    def project(self, model: nn.Module, scores, target: float, tolerance: float = 0.03,
                round_to: int | None = None, **constraints) -> CnnSpec:
        """HiAP's final structure (see :func:`pyengine.models.cnn.ledger.project_blocks`): per
        block its inner conv channels in logit order and the residual branch."""
        from pyengine import api
        from pyengine.models.cnn.ledger import ProjectedBlock, project_blocks
        from pyengine.models.factory import model_name
        from pyengine.models.resnet.ledger import CnnLedger
        from pyengine.structure.solver import allowed_counts
        from pyengine.structure.spec import make_conv_block
        name = model_name(model)
        g = blocks.geometry(model)
        led = CnnLedger(g, name)
        if len(scores) != led.n:
            raise ValueError(f"scores for {len(scores)} gate sets, the model has {led.n} blocks")

        def cost(keep, ks, i):
            led.kept[i] = [list(range(k)) for k in ks] if keep else None
            return round(led.block_macs(i))
        projected = [ProjectedBlock(True, sc["block"], [
            (sc[sl], allowed_counts(c, round_to, 1, allow_zero=False))
            for sl, c in zip(g.slots, g.inner[i])], lambda keep, ks, i=i: cost(keep, ks, i))
            for i, sc in enumerate(scores)]
        project_blocks(projected, round(led.fixed), led.dense, target, tolerance)
        it = iter(projected)
        stages = []
        for n in g.layers:
            st = []
            for _ in range(n):
                keep, kept = next(it).kept()
                st.append(make_conv_block(keep, **dict(zip(g.slots, kept))))
            stages.append(tuple(st))
        s = CnnSpec(tuple(stages), model=name, dense=g,
                    meta={"made_by": "hiap.project", "target": target, "tolerance": tolerance})
        api.apply(model, s)
        return s
