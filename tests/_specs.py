"""Random structure specs with the awkward cases mixed in (dims of 1 and 7, q/k dims of 0,
layers with no heads, FFNs with no neurons)."""
import random

from pyengine.structure.spec import Spec, make_block

ODD_DIMS = (1, 7, 16, 40)


def random_spec(g, seed: int, model=None, p_head=0.6, p_no_attn=0.15, p_no_mlp=0.15) -> Spec:
    rng = random.Random(seed)
    blocks = []
    for _ in range(g.depth):
        heads = []
        if rng.random() >= p_no_attn:
            for h in range(g.num_heads):
                if rng.random() < p_head:
                    nqk = rng.choice((0, g.head_dim) + tuple(d for d in ODD_DIMS if d <= g.head_dim))
                    nv = rng.choice((g.head_dim,) + tuple(d for d in ODD_DIMS if d <= g.head_dim))
                    heads.append((h, rng.sample(range(g.head_dim), nqk),
                                  rng.sample(range(g.head_dim), nv)))
        mlp = []
        if rng.random() >= p_no_mlp:
            mlp = rng.sample(range(g.mlp_hidden), rng.choice((1, 7, g.mlp_hidden // 3, g.mlp_hidden)))
        blocks.append(make_block(heads, mlp))
    return Spec(tuple(blocks), model=model, dense=g)
