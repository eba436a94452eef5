"""Structures made to order: specs with heterogeneous head dims at a given MAC fraction.

Benchmarks and the demo need a pruned structure before any learned method has run; these
specs look like what HiAP finds (heads of different q/k and v widths, FFNs of different
sizes) and hit a MAC target, so speed can be measured against what pruning claims.
"""
from __future__ import annotations

import random

from pyengine.models.vit.cost import attn_macs, mlp_macs, total_macs
from pyengine.structure.spec import Geometry, Spec, make_block

HEAD_DIMS = (16, 24, 32, 40, 48, 56, 64)


def _round(x: float, multiple: int) -> int:
    return int(round(x / multiple)) * multiple


def heterogeneous_spec(g: Geometry, target: float, seed: int = 0, model: str | None = None,
                       dims: tuple[int, ...] = HEAD_DIMS, multiple: int = 8,
                       min_heads: int = 1) -> Spec:
    """A spec keeping about ``target`` of the dense MACs, with random per-head q/k and v widths
    from ``dims`` and FFN widths rounded to ``multiple`` (tensor-core friendly)."""
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target must be a MAC fraction in (0, 1], got {target}")
    rng = random.Random(seed)
    dims = tuple(d for d in dims if d <= g.head_dim) or (g.head_dim,)
    dense_block = attn_macs(g, [g.head_dim] * g.num_heads, [g.head_dim] * g.num_heads) + \
        mlp_macs(g, g.mlp_hidden)
    per_neuron = mlp_macs(g, 1)
    layers = []
    for _ in range(g.depth):
        nheads = rng.randint(max(min_heads, (g.num_heads + 1) // 2), g.num_heads)
        heads = [(h, rng.choice(dims), rng.choice(dims))
                 for h in sorted(rng.sample(range(g.num_heads), nheads))]
        budget = target * dense_block
        while len(heads) > min_heads and attn_macs(g, [h[1] for h in heads],
                                                   [h[2] for h in heads]) > 0.8 * budget:
            heads.pop(rng.randrange(len(heads)))
        a = attn_macs(g, [h[1] for h in heads], [h[2] for h in heads])
        m = min(g.mlp_hidden, max(multiple, _round((budget - a) / per_neuron, multiple)))
        layers.append([heads, m])

    def build(layers) -> Spec:
        blocks = []
        r = random.Random(seed + 1)
        for heads, m in layers:
            hs = [(h, r.sample(range(g.head_dim), dq), r.sample(range(g.head_dim), dv))
                  for h, dq, dv in heads]
            blocks.append(make_block(hs, r.sample(range(g.mlp_hidden), m)))
        return Spec(tuple(blocks), model=model, dense=g,
                    meta={"made_by": "pyengine.synthetic.heterogeneous_spec", "target": target,
                          "seed": seed})

    # the stem and classifier are not pruned: shift FFN widths until the whole model hits target
    dense = total_macs(Spec.full(g, model=model))
    for _ in range(4):
        gap = target * dense - total_macs(build(layers))
        step = _round(gap / per_neuron / g.depth, multiple)
        if step == 0:
            break
        for layer in layers:
            layer[1] = min(g.mlp_hidden, max(multiple, layer[1] + step))
    return build(layers)


def random_channels_spec(gated, target: float, seed: int = 0, multiple: int = 8):
    """A structure of a gated CNN (any family with a solver ledger) at ``target`` of the dense
    MACs, with random kept channels (heterogeneous widths, as a learned method finds) in
    multiples of ``multiple`` channels (whole groups where a slot's unit is a group): the
    global allocation of random scores."""
    from pyengine.methods.criteria import score
    from pyengine.models import geometry, model_name
    from pyengine.structure.solver import allocate
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target must be a MAC fraction in (0, 1], got {target}")
    return allocate(score(gated, "random", seed=seed), geometry(gated), target, mode="global",
                    granularity="channel", round_to=multiple,
                    model=model_name(gated),
                    meta={"made_by": "pyengine.synthetic.random_channels_spec",
                          "target": target, "seed": seed, "multiple": multiple})
