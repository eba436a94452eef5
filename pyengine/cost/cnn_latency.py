"""The latency model of a CNN structure on one device (ResNet, ConvNeXt, EfficientNet /
MobileNetV3, RegNet): predicted milliseconds from the model's measured CNN latency table
(:mod:`pyengine.cost.cnn_latency_table`: every block's in-model time by kept width, a removed
block's, the fixed rest).

    lat = pyengine.latency(compact_resnet, batch=1, dtype=torch.float32, device="cpu")
    print(lat.table())          # one row per block ("stages.S.B": kept or removed) + "fixed"

:func:`pyengine.latency` and ``pyengine cost --latency`` come here for a CNN spec or model;
:class:`CnnLatencyModel` prices structures for a latency budget (``--budget latency``): the
one-shot allocation (:func:`pyengine.structure.solver.allocate` takes it through
:meth:`CnnLatencyModel.ledger`) and SSS's target (:meth:`CnnLatencyModel.spec_ms`). There is
no differentiable expected latency of gate probabilities for CNNs yet (HiAP's budget loss needs
one), so the model has no ``expected``.
"""
from __future__ import annotations

from typing import Sequence

import torch

from pyengine.cost.cnn_latency_table import (_NO_SIZE, CnnLatencyTable, block_slots,
                                             block_widths, get_cnn_table)
from pyengine.cost.dtypes import as_dtype, dtype_name
from pyengine.cost.latency_table import LatencyTableError, measuring_enabled
from pyengine.structure.latency_ledger import LatencyLedger

__all__ = ["CnnLatencyModel", "cnn_spec_of", "cnn_latency", "cnn_table_for"]


def cnn_spec_of(x):
    """The CNN spec of ``x`` (a CnnSpec / BlockSpec, or a dense, gated or compact CNN model);
    None when ``x`` is not a CNN (a ViT and its spec go the ViT way)."""
    from pyengine.structure.spec import StageSpecBase
    if isinstance(x, StageSpecBase):
        return x
    if not isinstance(x, torch.nn.Module):
        return None
    from pyengine.api import spec as spec_of
    from pyengine.models import adapter_for
    try:
        adapter_for(x)
    except Exception:  # not a model any adapter knows: the ViT path says why
        return None
    s = spec_of(x)
    return s if isinstance(s, StageSpecBase) else None


def _geometry_and_name(spec):
    g = spec.dense
    if g is None:
        raise LatencyTableError("the latency model needs a spec with dense geometry "
                                "(pyengine.spec(model))")
    if not spec.model:
        raise LatencyTableError("the CNN latency table is per model: the spec needs its "
                                "'model' name (pyengine.spec(model) fills it)")
    if not g.img_size or int(g.img_size) <= 0:
        raise LatencyTableError(_NO_SIZE)
    return g, spec.model


def cnn_table_for(g, model: str, device="cpu", dtype=torch.float32, batch: int = 1, log=None,
                  progress: bool = True) -> CnnLatencyTable:
    """The CNN table of ``device``/``dtype`` holding ``model`` at ``batch`` (cached, measured
    once if missing); a one-line error when there is none and measuring is off."""
    dev = torch.device("cpu" if device is None else device)
    dt = as_dtype(dtype)
    t = get_cnn_table(g, model, dev, dt, batch, log=log, progress=progress)
    if t is None:
        why = ("measuring is off (PYENGINE_LATENCY=off)" if not measuring_enabled()
               else "it could not be measured")
        raise LatencyTableError(f"no CNN latency table for {dev.type} {dtype_name(dt)}, "
                                f"{model} at {g.img_size}px, batch {batch}, and {why}")
    return t


class CnnLatencyModel:
    """Predicted ms of structures of one CNN at one batch from its table: ``fixed`` (stem,
    head, everything between the blocks), per block :meth:`block_ms`, ``dense`` (the dense
    model), :meth:`spec_ms` (a structure); :meth:`ledger` prices the solver's structures."""

    def __init__(self, table: CnnLatencyTable, geometry, model: str, batch: int = 1):
        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
            raise ValueError(f"latency batch must be a positive integer, got {batch!r}")
        self.table, self.g, self.model, self.batch = table, geometry, model, batch
        entry = table.entry(geometry, model, batch)
        if entry is None:
            raise LatencyTableError(f"the {table.device} {table.dtype} CNN latency table has no "
                                    f"entry for {model} at {geometry.img_size}px, batch {batch}")
        self.entry = entry
        self.slots = block_slots(geometry)
        self.fixed = entry.fixed_ms
        self.dense = self.fixed + sum(self.block_ms(i, True, [c for _, c, _ in sl])
                                      for i, sl in enumerate(self.slots))

    @classmethod
    def for_model(cls, model_or_spec, device="cpu", dtype=torch.float32, batch: int = 1,
                  log=None, progress: bool = True) -> "CnnLatencyModel":
        """The model of a CNN (a spec with dense geometry and model name, or a model) on
        ``device`` in ``dtype`` at ``batch``: its table read from the cache or measured."""
        s = cnn_spec_of(model_or_spec)
        if s is None:
            raise LatencyTableError(f"CnnLatencyModel covers CNNs; got "
                                    f"{type(model_or_spec).__name__}")
        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
            raise ValueError(f"latency batch must be a positive integer, got {batch!r}")
        g, name = _geometry_and_name(s)
        return cls(cnn_table_for(g, name, device, dtype, batch, log=log, progress=progress),
                   g, name, batch)

    # ---- hard structures ---------------------------------------------------------------
    def block_ms(self, i: int, keep: bool, widths: Sequence[int] = ()) -> float:
        """Block ``i`` kept with ``widths`` (kept channels of each of its slots), or removed."""
        grid = self.entry.blocks[i]
        if not keep:
            if grid.removed_ms is None:
                raise ValueError(f"block {i} has no residual connection: it cannot be removed")
            return grid.removed_ms
        return grid(widths)

    def spec_ms(self, spec) -> float:
        """A whole structure: ``fixed`` + every block (kept at its widths, or removed)."""
        return self.fixed + sum(self._spec_block_ms(i, b) for i, b in enumerate(spec.blocks))

    def _spec_block_ms(self, i: int, blk) -> float:
        return self.block_ms(i, blk.keep, block_widths(blk, self.slots[i]) if blk.keep else ())

    def rows(self, spec) -> list:
        """:class:`~pyengine.cost.latency.LatencyRow` per block ("stages.S.B"), then "fixed"."""
        from pyengine.cost.latency import LatencyRow
        rows, i = [], 0
        for s, st in enumerate(spec.stages):
            for b, blk in enumerate(st):
                ms = self._spec_block_ms(i, blk)
                if blk.keep:
                    desc = ", ".join(f"{name} {w}/{c}" for (name, c, _), w in
                                     zip(self.slots[i], block_widths(blk, self.slots[i])))
                    rows.append(LatencyRow(f"stages.{s}.{b}", "block", ms, desc or "whole"))
                else:
                    rows.append(LatencyRow(f"stages.{s}.{b}", "removed", ms, "shortcut only"))
                i += 1
        rows.append(LatencyRow("fixed", "fixed", self.fixed, "stem, head and between blocks"))
        return rows

    # ---- the structure solver ------------------------------------------------------------
    def ledger(self, ledger) -> "CnnLatencyLedger":
        """``ledger`` (the family's solver ledger) priced in predicted ms: what
        :func:`pyengine.structure.solver.allocate` budgets by with ``latency=`` this model."""
        return CnnLatencyLedger(ledger, self)


class CnnLatencyLedger(LatencyLedger):
    """A CNN solver ledger (ResNet ``CnnLedger`` or a family's ``SlotLedger``) whose costs are
    predicted ms instead of MACs; everything else is the wrapped ledger's. A block's kept
    state: its kept lists (a ResNet's one per slot, a SlotLedger's one of units), None when
    the block is removed."""

    def __init__(self, ledger, latency: CnnLatencyModel):
        if not hasattr(ledger, "kept") or len(ledger.kept) != len(latency.slots):
            raise ValueError("a CNN latency budget needs the CNN's own ledger (one kept entry "
                             f"per block of {latency.model})")
        super().__init__(ledger, latency)
        # ResNet ledgers keep a list of channels per slot; a SlotLedger one list of units of
        # its one slot (``group`` channels each)
        self._resnet = hasattr(ledger.g, "inner")
        self._per_unit = [[1] * len(sl) if self._resnet else [grp for _, _, grp in sl]
                          for sl in latency.slots]

    def block_macs(self, l: int) -> float:  # the strategies' name for a block's cost
        k = self._ledger.kept[l]
        if k is None:
            return self._lat.block_ms(l, False)
        per = self._per_unit[l]
        if not per:
            return self._lat.block_ms(l, True, ())
        lists = k if self._resnet else [k]
        return self._lat.block_ms(l, True, [len(u) * p for u, p in zip(lists, per)])

    def n_blocks(self) -> int:
        return len(self._ledger.kept)

    def get_state(self, l: int) -> tuple | None:
        k = self._ledger.kept[l]
        if k is None:
            return None
        return tuple(tuple(u) for u in (k if self._resnet else [k]))

    def set_state(self, l: int, state: tuple | None) -> None:
        if state is None:
            self._ledger.kept[l] = None
        else:
            lists = [sorted(u) for u in state]
            self._ledger.kept[l] = lists if self._resnet else lists[0]


def cnn_latency(spec, batch: int = 1, dtype=torch.float32, device="cpu", *,
                table: CnnLatencyTable | None = None, log=None):
    """:func:`pyengine.latency` of a CNN spec: a :class:`~pyengine.cost.latency.Latency` with
    one row per block and the fixed part."""
    from pyengine.cost.latency import Latency
    g, name = _geometry_and_name(spec)
    if table is None:
        table = cnn_table_for(g, name, device, dtype, batch, log=log)
    elif not isinstance(table, CnnLatencyTable):
        raise LatencyTableError(f"a CNN is priced by a CNN latency table, got "
                                f"{type(table).__name__}")
    lm = CnnLatencyModel(table, g, name, batch)
    return Latency(lm.spec_ms(spec), batch, table.device, table.dtype, "n/a", lm.rows(spec))
