"""From scores to a structure at a MAC target: the one solver every method and model family
ends with.

    spec = allocate(scores, geometry, target=0.5, mode="global", granularity="dim",
                    min_heads=1, round_to=1, model="vit_tiny_patch16_224")   # one-shot criteria
    spec = project(model, logits, target=0.5, tolerance=0.03)               # HiAP's finalize
    t = threshold(model, factors, target=0.5, dense_macs=...)               # SSS's fallback

``target`` is the kept fraction of the dense model's total MACs (patch embedding / stem and
classifier included). What a structure is and what it costs is the model family's ledger
(``models/<family>/ledger.py``: kept sets per block, exact MACs, the chunks a ranking removes);
the strategies here are family-free:

* ``allocate(mode="global")``: scores are normalized per structure type (divided by that
  type's mean over all layers, so q/k dims, v dims, heads, neurons or channels compare), then
  the lowest-scored chunks are removed across all layers until the MACs are at or under the
  target. ``round_to=r`` keeps counts at multiples of r: units go in chunks of r,
  lowest-scored first (the first chunk of a group takes the remainder). With a latency
  budget the removed chunks are then given back, highest-scored first, wherever they fit
  (a branch's ms barely follows its width, so the ranking alone overshoots).
* ``allocate(mode="uniform")``: every layer keeps the same fraction of each type (the
  highest-scored ones); the fraction is the largest one at or under the target (bisection).
* ``project``: starts from the units whose score says keep, then adds or removes single steps
  ranked by their effective keep probability until the MACs are within ``target * (1 +-
  tolerance)`` (HiAP's gates; ViT); where no single step lands in that band, one step
  exchanged for another in a second layer.
* ``threshold``: zeroes the smallest ``|factor|`` of a gated model by one global threshold
  until its structure is at or under the target (SSS's scale factors).
"""
from __future__ import annotations

import dataclasses
import heapq
import math
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from pyengine.models.vit.cost import block_macs, total_macs
from pyengine.structure.latency_ledger import LatencyLedger
from pyengine.structure.spec import Block, Head, Spec

MODES = ("global", "uniform")
GRANULARITIES = ("dim", "head", "block")   # ViT; a ResNet's "channel" is "dim"

__all__ = ["allocate", "allocate_cnn", "project", "threshold", "allowed_counts", "MODES",
           "GRANULARITIES", "CNN_GRANULARITIES"]
CNN_GRANULARITIES = ("channel", "block")


# ---- shared pieces of the rankings -----------------------------------------------------------
def _order(values: torch.Tensor) -> list[int]:
    """Indices ascending by score (ties by index), deterministic."""
    v = values.double().tolist()
    return sorted(range(len(v)), key=lambda i: (v[i], i))


def _chunks(order: list[int], r: int) -> list[list[int]]:
    first = len(order) % r or r
    out = [order[:first]]
    out += [order[i:i + r] for i in range(first, len(order), r)]
    return [c for c in out if c]


def _norm(vals: list[torch.Tensor]) -> list[torch.Tensor]:
    """Divide a structure type's scores by their mean |score| over all layers."""
    mean = torch.cat([v.double().flatten() for v in vals]).abs().mean()
    return [v.double() / mean if mean > 0 else v.double() for v in vals]


def _keep(count: int, p: float, r: int, least: int) -> int:
    k = math.ceil(p * count / r - 1e-9) * r
    return min(count, max(least, k))


def _infeasible(ledger, budget, reached) -> str:
    if getattr(ledger, "unit", "MACs") == "ms":
        what = f"the latency target: the smallest structure this allocation allows runs " \
               f"{reached:.4g} ms > budget {budget:.4g} ms"
    else:
        what = f"the MAC target: the smallest structure this allocation allows costs " \
               f"{reached:.0f} MACs > budget {budget:.0f}"
    return (f"cannot reach {what} (min_heads={ledger.min_heads}; lower min_heads, use "
            "granularity 'dim', or raise the target)")


def _ledger(g, model, **constraints):
    from pyengine.models import adapter_for_geometry
    return adapter_for_geometry(g).ledger(g, model, **constraints)


# ---- allocate ----------------------------------------------------------------------------------
def allocate(scores: Sequence, g, target: float, mode: str = "global", granularity: str = "dim",
             min_heads: int = 1, round_to: int = 1, model: str | None = None,
             meta: dict | None = None, min_dims: int = 1, min_neurons: int = 0,
             latency=None):
    """A spec keeping at most ``target`` of the dense MACs, chosen by ``scores`` (higher =
    keep), for the family of geometry ``g`` (see the module docstring for ``mode`` and
    ``round_to``, the family's ledger for ``granularity`` and the constraints: ViT
    ``min_heads``, ``min_dims`` q/k and v dims in every kept head, ``min_neurons`` per FFN).
    ``latency``: a :class:`~pyengine.cost.latency.LatencyModel` (ViT): ``target`` is then a
    fraction of the dense model's predicted latency, and the strategies remove by it."""
    if not isinstance(target, (int, float)) or not 0 < target <= 1:
        raise ValueError(f"target must be the kept fraction of dense MACs in (0, 1], got "
                         f"{target!r}")
    if mode not in MODES:
        raise ValueError(f"unknown allocation mode {mode!r}; choose one of {', '.join(MODES)}")
    if not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"round_to must be a positive integer, got {round_to!r}")
    ledger = _ledger(g, model, min_heads=min_heads, min_dims=min_dims, min_neurons=min_neurons)
    if granularity == "dim" and "dim" not in ledger.granularities:
        granularity = ledger.granularities[0]  # the family's finest unit (ResNet: channel)
    if granularity not in ledger.granularities:
        raise ValueError(f"unknown granularity {granularity!r}; choose one of "
                         f"{', '.join(ledger.granularities)}")
    ledger.check_scores(scores)
    if latency is not None:
        ledger = latency.ledger(ledger) if hasattr(latency, "ledger") else _LatencyLedger(ledger, latency)
    budget = target * ledger.dense
    if mode == "uniform":
        _uniform(ledger, ledger.uniform(scores, granularity, round_to, _order, _keep), budget)
    else:
        _global(ledger, ledger.chunks(scores, granularity, round_to, _norm, _order, _chunks),
                budget)
        if hasattr(ledger, "refill"):
            ledger.refill(budget)
    meta = {**(meta or {}), "allocation": mode, "granularity": granularity, "target": target,
            "round_to": round_to, **ledger.meta()}
    spec = ledger.spec(meta)
    if latency is not None:
        ms = latency.spec_ms(spec)
        if ms > budget * (1 + 1e-9):
            raise AssertionError(f"allocation bug: {ms} ms over the budget {budget}")
        return dataclasses.replace(spec, meta={
            **meta, "budget": "latency", "latency_ms": ms, "dense_latency_ms": ledger.dense,
            "kept_latency": ms / ledger.dense, "latency_batch": latency.batch,
            "latency_device": latency.table.device})
    from pyengine.cost import cost
    macs = cost(spec).macs
    if macs > budget * (1 + 1e-9) + 1e-6:
        raise AssertionError(f"allocation bug: {macs} MACs over the budget {budget}")
    # every family's spec is a frozen dataclass with a ``meta`` field
    return dataclasses.replace(spec, meta={**meta, "macs": macs, "dense_macs": ledger.dense,
                                           "kept_macs": macs / ledger.dense})


class _LatencyLedger(LatencyLedger):
    """A ViT ledger whose costs are predicted ms (a LatencyModel) instead of MACs; a block's
    kept state: its q/k lists per head, its v lists per head, its neurons."""

    def __init__(self, ledger, latency):
        if not hasattr(ledger, "layers") or not hasattr(ledger.layers[0], "heads"):
            raise ValueError("a latency budget needs a ViT (the latency table prices ViT "
                             "layers)")
        super().__init__(ledger, latency)

    def block_macs(self, l: int) -> float:  # the strategies' name for a block's cost
        lay = self._ledger.layers[l]
        hs = lay.heads()
        return self._lat.layer_ms([len(lay.qk[h]) for h in hs], [len(lay.v[h]) for h in hs],
                                  len(lay.neurons))

    def n_blocks(self) -> int:
        return len(self._ledger.layers)

    def get_state(self, l: int) -> tuple:
        lay = self._ledger.layers[l]
        return tuple(tuple(x) for x in (*lay.qk, *lay.v, lay.neurons))

    def set_state(self, l: int, state: tuple) -> None:
        lay = self._ledger.layers[l]
        H = len(lay.qk)
        lay.qk, lay.v = [list(x) for x in state[:H]], [list(x) for x in state[H:2 * H]]
        lay.neurons = list(state[-1])

    def valid(self, l: int, state: tuple) -> bool:
        H = len(self._ledger.layers[l].qk)
        return not any(q and not v for q, v in zip(state[:H], state[H:2 * H]))  # no v: no head


def allocate_cnn(scores, g, target: float, mode: str = "global", granularity: str = "channel",
                 round_to: int = 1, model: str | None = None, meta: dict | None = None):
    """:func:`allocate` for a ResNet (kept for callers of the first version)."""
    return allocate(scores, g, target, mode=mode, granularity=granularity, round_to=round_to,
                    model=model, meta=meta)


def _global(ledger, chunks: list, budget: float) -> None:
    """Remove the lowest-scored chunk (ties in push order) until the MACs fit the budget."""
    heap = [(score, tie, payload) for tie, (score, payload) in enumerate(chunks)]
    heapq.heapify(heap)
    cur = ledger.total()
    while cur > budget:
        if not heap:
            raise ValueError(_infeasible(ledger, budget, cur))
        _, _, payload = heapq.heappop(heap)
        l = ledger.block_of(payload)
        before = ledger.block_macs(l)
        if ledger.remove(payload) is None:
            continue
        cur += ledger.block_macs(l) - before


def _uniform(ledger, build, budget: float) -> None:
    """The largest fraction kept in every layer at or under the budget (bisection)."""
    build(0.0)
    if ledger.total() > budget:
        raise ValueError(_infeasible(ledger, budget, ledger.total()))
    build(1.0)
    if ledger.total() <= budget:
        return
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        build(mid)
        if ledger.total() <= budget:
            lo = mid
        else:
            hi = mid
    build(lo)


# ---- project (HiAP) ------------------------------------------------------------------------------
def allowed_counts(total: int, round_to: int | None, minimum: int = 0,
                   allow_zero: bool = True) -> list[int]:
    """Kept counts a group of ``total`` units may have: multiples of ``round_to`` (and
    ``total`` itself, and 0 if ``allow_zero``), at least ``minimum`` (0 aside)."""
    r = int(round_to) if round_to else 1
    if r < 1:
        raise ValueError(f"round_to must be a positive integer, got {round_to!r}")
    counts = set(range(r, total, r)) | {total}
    counts = {c for c in counts if c >= minimum}
    if allow_zero and minimum <= 0:
        counts.add(0)
    if not counts:
        counts = {total}
    return sorted(counts)


def _nearest(allowed: list[int], c: int) -> int:
    return min(allowed, key=lambda a: (abs(a - c), -a))


class _Counts:
    """Counts of one block during projection: heads on/off with their qk/v counts, FFN width.
    Units inside a group are kept in score order (top-k)."""

    def __init__(self, g, att: Mapping[str, torch.Tensor], mlp: Mapping[str, torch.Tensor],
                 threshold: float | None, opts: dict):
        H, Dh, M = g.num_heads, g.head_dim, g.mlp_hidden
        f = lambda t: t.detach().double().cpu()  # noqa: E731
        sa, sm = {k: f(v) for k, v in att.items()}, {k: f(v) for k, v in mlp.items()}
        for name, t, shape in (("attention head", sa["head"], (H,)), ("qk", sa["qk"], (H, Dh)),
                               ("v", sa["v"], (H, Dh)), ("neuron", sm["neuron"], (M,))):
            if tuple(t.shape) != shape:
                raise ValueError(f"scores for {name} have shape {tuple(t.shape)}, expected {shape}")
        # ranking: effective keep probability, macro * micro (sigmoid of logit-like scores)
        p = lambda t: torch.sigmoid(t)  # noqa: E731
        pb, pmb = float(p(sa["block"].reshape(()))), float(p(sm["block"].reshape(())))
        self.p_head = (pb * p(sa["head"])).tolist()
        self.qk_order = torch.argsort(sa["qk"], dim=-1, descending=True, stable=True).tolist()
        self.v_order = torch.argsort(sa["v"], dim=-1, descending=True, stable=True).tolist()
        self.n_order = torch.argsort(sm["neuron"], descending=True, stable=True).tolist()
        pqk = torch.sort(p(sa["qk"]), dim=-1, descending=True).values
        pv = torch.sort(p(sa["v"]), dim=-1, descending=True).values
        pn = torch.sort(p(sm["neuron"]), descending=True).values
        # prefix sums of sorted probabilities: mean probability of any step in O(1)
        z = lambda t: torch.cat([torch.zeros(t.shape[:-1] + (1,), dtype=t.dtype),  # noqa: E731
                                 t.cumsum(-1)], -1)
        self.cqk = (z(pqk) * torch.tensor(self.p_head, dtype=torch.float64)[:, None]).tolist()
        self.cv = (z(pv) * torch.tensor(self.p_head, dtype=torch.float64)[:, None]).tolist()
        self.cn = (z(pn) * pmb).tolist()
        self.qk_allowed, self.v_allowed = opts["qk_allowed"], opts["v_allowed"]
        self.n_allowed, self.min_heads = opts["n_allowed"], opts["min_heads"]
        if threshold is None:  # start from everything
            self.on = [True] * H
            self.kq, self.kv, self.m = [Dh] * H, [Dh] * H, M
        else:
            kq = (sa["qk"] > threshold).sum(-1).tolist()
            kv = (sa["v"] > threshold).sum(-1).tolist()
            battn = bool(sa["block"] > threshold)
            self.on = [battn and bool(sa["head"][h] > threshold) and kv[h] > 0 for h in range(H)]
            self.kq = [_nearest(self.qk_allowed, c) for c in kq]
            self.kv = [_nearest(self.v_allowed, c) for c in kv]
            m = int((sm["neuron"] > threshold).sum()) if bool(sm["block"] > threshold) else 0
            self.m = _nearest(self.n_allowed, m)
        # feasibility: enough heads (the most probable ones)
        need = self.min_heads - sum(self.on)
        for h in sorted(range(H), key=lambda h: -self.p_head[h]):
            if need <= 0:
                break
            if not self.on[h]:
                self.on[h], need = True, need - 1

    def spec_block(self) -> Block:
        heads = tuple(Head(h, tuple(sorted(self.qk_order[h][:self.kq[h]])),
                           tuple(sorted(self.v_order[h][:self.kv[h]])))
                      for h in range(len(self.on)) if self.on[h])
        return Block(heads, tuple(sorted(self.n_order[:self.m])))

    def macs(self, g) -> int:
        qk = [self.kq[h] for h in range(len(self.on)) if self.on[h]]
        v = [self.kv[h] for h in range(len(self.on)) if self.on[h]]
        return block_macs(g, qk, v, self.m)

    def latency(self, model) -> float:
        """Predicted ms of this block (a :class:`~pyengine.cost.latency.LatencyModel`)."""
        on = [h for h in range(len(self.on)) if self.on[h]]
        return model.layer_ms([self.kq[h] for h in on], [self.kv[h] for h in on], self.m)

    def moves(self, remove: bool):
        """Yield (score, apply, undo): one step of one group, scored by the mean effective keep
        probability of the units it removes (or adds)."""
        def step(allowed, c, down):
            i = allowed.index(c)
            j = i - 1 if down else i + 1
            return allowed[j] if 0 <= j < len(allowed) else None

        def mean(cs, a, b):
            return (cs[b] - cs[a]) / (b - a) if b != a else 0.0

        m2 = step(self.n_allowed, self.m, remove)
        if m2 is not None:
            lo, hi = sorted((self.m, m2))
            old = self.m
            yield (mean(self.cn, lo, hi), lambda m2=m2: setattr(self, "m", m2),
                   lambda old=old: setattr(self, "m", old))
        if remove and m2 not in (None, 0) and self.n_allowed[0] == 0:
            # the whole FFN at once: below a latency table's narrowest width a step of a few
            # neurons saves nothing, so the step that removes the branch is never reached
            old = self.m
            yield (mean(self.cn, 0, old), lambda: setattr(self, "m", 0),
                   lambda old=old: setattr(self, "m", old))
        n_on = sum(self.on)
        for h in range(len(self.on)):
            if self.on[h]:
                for counts, allowed, cum in ((self.kq, self.qk_allowed, self.cqk[h]),
                                             (self.kv, self.v_allowed, self.cv[h])):
                    c2 = step(allowed, counts[h], remove)
                    if c2 is not None:
                        lo, hi = sorted((counts[h], c2))
                        old = counts[h]

                        def do(counts=counts, h=h, c2=c2):
                            counts[h] = c2

                        def undo(counts=counts, h=h, old=old):
                            counts[h] = old
                        yield mean(cum, lo, hi), do, undo
            if self.on[h] == remove and (not remove or n_on > self.min_heads):
                def flip(h=h, v=not remove):
                    self.on[h] = v
                yield self.p_head[h], flip, (lambda h=h, v=remove: self.on.__setitem__(h, v))


def _exchange(removes: list, adds: list, cost: float, lo: float, hi: float):
    """``(key, i, remove, j, add)``: a removing step of layer i and an adding step of another
    layer j that together land the cost in ``[lo, hi]``, the best-ranked such pair (lowest
    keep score removed, highest added); else the pair that lands closest to the band's middle
    if that is closer than ``cost``; else None. ``removes[i]`` / ``adds[i]``: layer i's
    ``(score, cost change, apply)`` steps."""
    goal = (lo + hi) / 2
    pair, near = None, (abs(cost - goal), None)
    for i, rem in enumerate(removes):
        for sr, dr, do_r in rem:
            for j, add in enumerate(adds):
                if j == i:
                    continue  # steps of one layer do not add up
                for sa, da, do_a in add:
                    new = cost + dr + da
                    if lo <= new <= hi:
                        if pair is None or sr - sa < pair[0]:
                            pair = (sr - sa, i, do_r, j, do_a)
                    elif abs(new - goal) < near[0]:
                        near = (abs(new - goal), (sr - sa, i, do_r, j, do_a))
    return pair if pair is not None else near[1]


def project(model: nn.Module, scores: Sequence[tuple[Mapping, Mapping]], target: float,
            tolerance: float = 0.03, min_heads: int = 1, min_head_dims: float = 0.0,
            min_ffn: float = 0.0, round_to: int | None = None,
            threshold: float | None = 0.0, latency=None) -> Spec:
    """Choose the hard structure of gated ``model`` from per-unit ``scores`` (logit-like:
    larger keeps; ``sigmoid(score)`` is read as a keep probability), and apply it.

    ``scores``: per block ``(attn, mlp)`` dicts with the gate slots ({block, head, qk, v} and
    {block, neuron}). Start: units with score > ``threshold`` (None: everything), counts
    rounded to multiples of ``round_to``, at least ``min_heads`` heads per layer, at least
    ``min_head_dims`` of a kept head's qk and v dims, at least ``min_ffn`` of the FFN (0
    allows removing whole attention/FFN blocks). Then, while the MACs are outside
    ``target * dense * (1 +- tolerance)``, remove the step with the lowest mean effective keep
    probability (block * head * unit) that does not overshoot, or add the highest one.
    ``latency``: a :class:`~pyengine.cost.latency.LatencyModel`: the target is then a fraction
    of the dense model's predicted latency instead of its MACs.
    Returns the Spec (also applied to ``model`` with :func:`pyengine.apply`)."""
    from pyengine import api
    from pyengine.models import geometry, model_name
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target must be a fraction of dense MACs in (0, 1], got {target!r}")
    if not 0.0 <= tolerance < 1.0:
        raise ValueError(f"tolerance must be in [0, 1), got {tolerance!r}")
    g = geometry(model)
    if len(scores) != g.depth:
        raise ValueError(f"scores for {len(scores)} blocks, the model has {g.depth}")
    if not 0 <= min_heads <= g.num_heads:
        raise ValueError(f"min_heads must be in [0, {g.num_heads}], got {min_heads!r}")
    for name, v in (("min_head_dims", min_head_dims), ("min_ffn", min_ffn)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} is a fraction in [0, 1], got {v!r}")
    Dh, M = g.head_dim, g.mlp_hidden
    dmin = max(1, math.ceil(min_head_dims * Dh - 1e-9))
    opts = {"qk_allowed": allowed_counts(Dh, round_to, dmin if min_head_dims > 0 else 0,
                                         allow_zero=min_head_dims == 0),
            "v_allowed": allowed_counts(Dh, round_to, dmin, allow_zero=False),
            "n_allowed": allowed_counts(M, round_to, math.ceil(min_ffn * M - 1e-9),
                                        allow_zero=min_ffn == 0),
            "min_heads": int(min_heads)}
    layers = [_Counts(g, a, m, threshold, opts) for a, m in scores]
    name = model_name(model)
    if latency is None:
        dense = total_macs(Spec.full(g, model=name))
        fixed = total_macs(Spec(tuple(Block() for _ in range(g.depth)), model=name, dense=g))
        layer_cost = lambda lay: lay.macs(g)  # noqa: E731
    else:  # predicted ms of the structure (cost/latency.py)
        dense, fixed = latency.dense, latency.fixed
        layer_cost = lambda lay: lay.latency(latency)  # noqa: E731
    goal = target * dense
    lo, hi = goal * (1 - tolerance), goal * (1 + tolerance)
    per = [layer_cost(lay) for lay in layers]
    macs = fixed + sum(per)

    def layer_moves(i: int, remove: bool) -> list:
        """(score, MAC change, apply) of every single step in layer ``i``."""
        lay, out = layers[i], []
        for score, do, undo in lay.moves(remove):
            do()
            delta = layer_cost(lay) - per[i]
            undo()
            # a step that changes nothing (qk dims of a head that attends uniformly anyway)
            # or moves the wrong way is no step
            if (delta < 0) if remove else (delta > 0):
                out.append((score, delta, do))
        return out

    cache: dict[tuple[int, bool], list] = {}
    while not lo <= macs <= hi:
        remove = macs > hi
        pick = closest = None
        for i in range(len(layers)):
            if (i, remove) not in cache:
                cache[(i, remove)] = layer_moves(i, remove)
            for score, delta, do in cache[(i, remove)]:
                new = macs + delta
                key = score if remove else -score
                # the best-ranked step that does not leave the band on the far side ...
                if (new >= lo if remove else new <= hi) and (pick is None or key < pick[0]):
                    pick = (key, i, do)
                # ... else the step that lands closest to the goal
                if closest is None or abs(new - goal) < closest[0]:
                    closest = (abs(new - goal), i, do)
        if pick is None and (closest is None or closest[0] >= abs(macs - goal)):
            # no single step lands in the band or closer to the goal (a latency budget: a
            # branch's fixed cost makes the smallest step that removes or restores it a big
            # one): exchange one step for another in a second layer, the pair that lands in
            # the band with the best ranks (remove the least, add the most probable)
            for i in range(len(layers)):
                for rem in (True, False):
                    if (i, rem) not in cache:
                        cache[(i, rem)] = layer_moves(i, rem)
            pair = _exchange([cache[(i, True)] for i in range(len(layers))],
                             [cache[(i, False)] for i in range(len(layers))], macs, lo, hi)
            if pair is None:
                break  # nothing brings it closer: the constraints do not allow the target
            _, i, do_r, j, do_a = pair
            do_r()
            do_a()
            for k in (i, j):
                per[k] = layer_cost(layers[k])
                cache.pop((k, True), None)
                cache.pop((k, False), None)
            macs = fixed + sum(per)
            continue
        _, i, do = pick if pick is not None else closest
        do()
        per[i] = layer_cost(layers[i])
        macs = fixed + sum(per)
        cache.pop((i, True), None)
        cache.pop((i, False), None)
    s = Spec(tuple(lay.spec_block() for lay in layers), model=name, dense=g)
    if latency is None:
        got = total_macs(s)
        assert got == macs, (got, macs)  # the ledger above and the cost model agree
    api.apply(model, s)
    return s


# ---- threshold (SSS) ----------------------------------------------------------------------------
@torch.no_grad()
def threshold(model: nn.Module, params: list[torch.Tensor], target: float, dense_macs: int,
              macs: Callable[[nn.Module], int]) -> float:
    """Zero the smallest ``|factor|`` of ``params`` (one global threshold) until
    ``macs(model)`` is <= ``target * dense_macs``; returns the threshold used (0 if nothing was
    needed). ``params`` are the gate factors whose zeros remove units."""
    if macs(model) <= target * dense_macs:
        return 0.0
    saved = [p.detach().clone() for p in params]
    values = torch.cat([p.detach().abs().flatten() for p in params])
    cand = torch.unique(values[values > 0]).sort().values

    def ratio_at(t: float) -> float:
        for p, s in zip(params, saved):
            p.copy_(torch.where(s.abs() < t, torch.zeros_like(s), s))
        return macs(model) / dense_macs

    lo, hi = 0, len(cand)  # smallest index i with ratio_at(cand[i] + eps) <= target
    while lo < hi:
        mid = (lo + hi) // 2
        if ratio_at(math.nextafter(float(cand[mid]), math.inf)) <= target:
            hi = mid
        else:
            lo = mid + 1
    t = math.nextafter(float(cand[min(lo, len(cand) - 1)]), math.inf)
    ratio_at(t)
    return t


