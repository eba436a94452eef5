"""The analytical cost model: hand formulas, published MACs, FlopCounterMode agreement on
dense and compiled models, bytes bookkeeping and roofline labels."""
from __future__ import annotations

import json
import random

import pytest
import torch

import pyengine
from pyengine.cost.flop_count import count_flops, math_attention, sdpa_math
from pyengine.cost.peaks import PEAKS, Peaks, peaks_for
from pyengine.cost import Cost, cost
from pyengine.models.vit.cost import block_macs, total_macs
from pyengine.structure.spec import Geometry, Spec, make_block

timm = pytest.importorskip("timm")

TINY = Geometry(depth=12, embed_dim=192, num_heads=3, head_dim=64, mlp_hidden=768,
                num_tokens=197, num_patches=196, in_chans=3, patch_size=(16, 16),
                num_classes=1000, qkv_bias=True)
SMALL = Geometry(depth=12, embed_dim=384, num_heads=6, head_dim=64, mlp_hidden=1536,
                 num_tokens=197, num_patches=196, in_chans=3, patch_size=(16, 16),
                 num_classes=1000, qkv_bias=True)


def hand_macs(D, H, Dh, M, depth, N=197, P=196, C=3, p=16, classes=1000):
    """Dense ViT MACs, written out independently of pyengine.cost."""
    patch = P * (C * p * p) * D
    qkv = N * D * (3 * H * Dh)
    attn = H * (N * N * Dh + N * N * Dh)  # QK^T and PV
    proj = N * (H * Dh) * D
    mlp = N * D * M + N * M * D
    return patch + depth * (qkv + attn + proj + mlp) + D * classes


def counted_flops(model, batch=1):
    return count_flops(model, torch.randn(batch, 3, 224, 224))


def _api():
    try:
        import pyengine
        from pyengine.api import apply, compile, gate, spec  # noqa: F401
        return pyengine
    except ImportError as e:  # pragma: no cover - before the API exists
        pytest.skip(f"pyengine API not available yet: {e}")


# ---- 1. hand formulas and published figures -------------------------------------------------
@pytest.mark.parametrize("g, published, hand", [
    (TINY, 1.26e9, hand_macs(192, 3, 64, 768, 12)),
    (SMALL, 4.61e9, hand_macs(384, 6, 64, 1536, 12)),
])
def test_dense_macs_match_hand_formula_and_published(g, published, hand):
    c = cost(Spec.full(g, model="deit"))
    assert c.macs == hand
    assert c.flops == 2 * c.macs
    assert abs(c.macs - published) / published < 0.01
    assert total_macs(Spec.full(g)) == c.macs
    # batch is linear in MACs
    assert cost(Spec.full(g), batch=8).macs == 8 * c.macs


def test_rows_sum_to_block_formulas():
    rng = random.Random(1)
    s = random_spec(TINY, rng)
    c = cost(s, batch=3)
    for i, b in enumerate(s.blocks):
        rows = sum(r.macs for r in c.layers if r.name.startswith(f"blocks.{i}."))
        assert rows == block_macs(TINY, b.qk_dims, b.v_dims, len(b.mlp), batch=3)
    assert c.macs == sum(r.macs for r in c.layers) == total_macs(s, batch=3)
    assert c.bytes == sum(r.bytes for r in c.layers)


def test_qk0_head_is_free_and_empty_branches_vanish():
    blocks = [make_block([(0, [], range(64))], []),       # uniform attention head, no FFN
              make_block([], range(10))]                   # no attention
    blocks += [make_block([], [])] * (TINY.depth - 2)      # empty blocks
    c = cost(Spec(tuple(blocks), dense=TINY))
    names = [r.name for r in c.layers]
    assert c.layer("blocks.0.attn.sdpa").macs == 0
    assert c.layer("blocks.0.attn.qkv").macs == 197 * 192 * 64
    assert "blocks.0.norm2" not in names and "blocks.0.mlp.fc1" not in names
    assert "blocks.1.norm1" not in names and "blocks.1.attn.qkv" not in names
    assert c.layer("blocks.1.mlp.fc1").macs == 197 * 192 * 10
    assert not any(n.startswith("blocks.5.") for n in names)


# ---- 2. FlopCounterMode agreement ---------------------------------------------------------
def test_sdpa_is_counted_whatever_kernel_torch_picks():
    # torch picks the SDPA kernel (CPU flash for equal widths, math for unequal ones) and
    # FlopCounterMode counts only some of them; count_flops counts every call as its math,
    # 2*B*H*N*N*(qk + v) FLOPs, like our rows, and the math it counts is SDPA's result.
    F = torch.nn.functional
    for dq, dv in [(64, 64), (7, 1), (64, 32), (40, 40)]:
        q, k, v = torch.randn(2, 3, 50, dq), torch.randn(2, 3, 50, dq), torch.randn(2, 3, 50, dv)
        flops = count_flops(lambda: F.scaled_dot_product_attention(q, k, v))  # looked up inside
        assert flops == 2 * 2 * 3 * 50 * 50 * (dq + dv)
        with math_attention():
            got = F.scaled_dot_product_attention(q, k, v, scale=0.3)
        torch.testing.assert_close(got, sdpa_math(q, k, v, scale=0.3))
        torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v, scale=0.3),
                                   atol=1e-5, rtol=1e-5)
    # the swap is undone afterwards
    assert F.scaled_dot_product_attention is not sdpa_math


def test_flop_counter_agrees_on_dense_timm_deit_tiny_from_spec():
    # needs nothing but the Spec: the hand-made full spec against the real timm model
    model = timm.create_model("deit_tiny_patch16_224").eval()
    assert counted_flops(model, batch=2) == cost(Spec.full(TINY), batch=2).flops
    assert cost(Spec.full(TINY)).params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name, kwargs", [
    ("deit_tiny_patch16_224", {}),
    ("deit_small_patch16_224", {}),
    ("deit_tiny_distilled_patch16_224", {}),   # two prefix tokens, head + head_dist
    ("deit3_small_patch16_224", {}),           # LayerScale, pos_embed over patches only
    ("vit_tiny_patch16_224", {"global_pool": "avg"}),  # avg pool + fc_norm, no final norm
])
def test_flop_counter_and_params_agree_on_dense_models(name, kwargs):
    _api()
    model = timm.create_model(name, **kwargs).eval()
    c = cost(model)
    assert counted_flops(model) == c.flops
    assert c.params == sum(p.numel() for p in model.parameters())
    if "distilled" in name:
        assert c.layer("head_dist").macs == 192 * 1000
    if name.startswith("deit3"):
        assert c.layer("blocks.0.ls1").params == 384


def random_spec(g: Geometry, rng: random.Random, model: str | None = None) -> Spec:
    """Heads with 0/1/7/random q/k dims and 1/7/random v dims, blocks without heads and FFNs
    without neurons (each forced to appear at least once)."""
    blocks = []
    for i in range(g.depth):
        heads = []
        n_heads = 0 if i == 1 else rng.randint(0, g.num_heads)
        for h in rng.sample(range(g.num_heads), n_heads):
            nq = rng.choice([0, 1, 7, rng.randint(1, g.head_dim)])
            nv = rng.choice([1, 7, rng.randint(1, g.head_dim)])
            heads.append((h, rng.sample(range(g.head_dim), nq), rng.sample(range(g.head_dim), nv)))
        if i == 0:
            heads = [(0, [3], [5]), (1, range(7), range(7)), (2, [], [1, 2])]
        m = 0 if i == 2 else rng.choice([0, 1, 7, rng.randint(1, g.mlp_hidden)])
        blocks.append(make_block(heads, rng.sample(range(g.mlp_hidden), m)))
    return Spec(tuple(blocks), model=model, dense=g)


def _compiled(name, s=None):
    pe = _api()
    model = timm.create_model(name).eval()
    pe.gate(model, method="mask")
    if s is not None:
        pe.apply(model, s)
    return pe.compile(model).eval()


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "deit_small_patch16_224"])
def test_flop_counter_agrees_on_compiled_full_model(name):
    compact = _compiled(name)
    c = cost(compact, batch=2)
    assert counted_flops(compact, batch=2) == c.flops
    assert c.params == sum(p.numel() for p in compact.parameters())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_flop_counter_agrees_on_compiled_random_specs(seed):
    s = random_spec(TINY, random.Random(seed), model="deit_tiny_patch16_224")
    compact = _compiled("deit_tiny_patch16_224", s)
    c = cost(compact, batch=2)
    assert c.macs == cost(s, batch=2).macs
    counted = counted_flops(compact, batch=2)
    assert abs(counted - c.flops) <= 0.01 * c.flops
    assert counted == c.flops  # in fact exact
    assert c.params == sum(p.numel() for p in compact.parameters())


def test_cost_of_gated_model_follows_its_hard_gates():
    pe = _api()
    s = random_spec(TINY, random.Random(5), model="deit_tiny_patch16_224")
    model = pe.gate(timm.create_model("deit_tiny_patch16_224").eval(), method="mask")
    assert cost(model).macs == cost(Spec.full(TINY)).macs
    pe.apply(model, s)
    assert cost(model).macs == cost(s).macs


# ---- bytes, dtype, batch, API surface ------------------------------------------------------
def test_bytes_bookkeeping():
    s = Spec.full(SMALL)
    c1, c2 = cost(s, batch=1), cost(s, batch=2)
    # parameters are read once per call, activations scale with the batch
    assert c2.bytes - c1.bytes == c1.bytes - 4 * c1.params
    assert cost(s, dtype=torch.bfloat16).bytes * 2 == c1.bytes
    assert cost(s, dtype="bf16").bytes == cost(s, dtype=torch.bfloat16).bytes
    qkv = c1.layer("blocks.0.attn.qkv")
    assert qkv.bytes == 4 * (384 * 1152 + 1152 + 197 * 384 + 197 * 1152)
    assert qkv.intensity == pytest.approx(qkv.flops / qkv.bytes)
    ln = c1.layer("blocks.0.norm1")
    assert ln.macs == 0 and ln.bytes == 4 * (2 * 384 + 2 * 197 * 384) and ln.kind == "norm"
    act = c1.layer("blocks.0.mlp.act")
    assert act.kind == "elementwise" and act.bytes == 4 * 2 * 197 * 1536
    # the unfused attention profile has the same MACs but materialises the scores
    m = cost(s, attention="math")
    assert m.macs == c1.macs and m.bytes > c1.bytes
    assert m.layer("blocks.0.attn.softmax").bytes == 4 * 2 * 6 * 197 * 197


def test_result_api():
    s = Spec.full(TINY)
    c = cost(s, batch=4, dtype=torch.bfloat16, device="h100")
    d = c.as_dict()
    json.dumps(d)
    assert d["macs"] == c.macs and len(d["layers"]) == len(c.layers)
    assert d["layers"][0]["name"] == "patch_embed" and d["layers"][-1]["name"] == "head"
    t = c.table()
    assert "blocks.11.mlp.fc2" in t and "GMACs" in t
    assert "more rows" in c.table(max_rows=5)
    half = cost(Spec(tuple(make_block([], []) for _ in range(12)), dense=TINY), batch=4)
    assert 0 < half.ratio(c) < 0.1
    kinds = c.by_kind()
    assert set(kinds) == {"conv", "elementwise", "norm", "linear", "attention"}
    assert kinds["norm"]["macs"] == 0 and kinds["attention"]["macs"] > 0
    assert c.time_s > 0 and "layers=<" in repr(c)
    # the package-level function is the same one
    assert pyengine.cost(s).macs == cost(s).macs and isinstance(c, Cost)


def test_errors():
    no_dense = Spec.full(TINY)
    no_dense = Spec(no_dense.blocks)
    with pytest.raises(ValueError, match="dense"):
        cost(no_dense)
    no_tokens = Geometry(depth=1, embed_dim=8, num_heads=1, head_dim=8, mlp_hidden=8)
    with pytest.raises(ValueError, match="num_tokens"):
        cost(Spec.full(no_tokens))
    with pytest.raises(ValueError, match="batch"):
        cost(Spec.full(TINY), batch=0)
    with pytest.raises(TypeError, match="dtype"):
        cost(Spec.full(TINY), dtype="int-ish")
    with pytest.raises(ValueError, match="unknown device"):
        cost(Spec.full(TINY), device="tpu-v9")
    with pytest.raises(TypeError):
        cost("deit_tiny")


# ---- 3. roofline labels --------------------------------------------------------------------
def test_peaks_table_and_matching():
    assert peaks_for("h100") is PEAKS["h100-sxm"]
    assert peaks_for("NVIDIA H100 80GB HBM3") is PEAKS["h100-sxm"]
    assert peaks_for("NVIDIA H100 PCIe") is PEAKS["h100-pcie"]
    assert peaks_for("NVIDIA H200") is PEAKS["h200"]
    assert peaks_for("NVIDIA A100-SXM4-80GB") is PEAKS["a100"]
    assert peaks_for("cpu") is PEAKS["cpu"]
    mine = Peaks("mine", 1e12, 1e11)
    assert peaks_for(mine) is mine and mine.ridge() == 10
    h100 = PEAKS["h100-sxm"]
    assert h100.flops_for(torch.bfloat16) == 989e12 and h100.bytes_per_s == 3.35e12
    assert 290 < h100.ridge(torch.bfloat16) < 300
    assert PEAKS["h200"].flops_for(torch.bfloat16) == 989e12 and PEAKS["h200"].bytes_per_s == 4.8e12
    assert PEAKS["a100"].flops_for(torch.bfloat16) == 312e12
    prec = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert h100.flops_for(torch.float32) == 67e12
        torch.set_float32_matmul_precision("high")
        assert h100.flops_for(torch.float32) == 495e12
    finally:
        torch.set_float32_matmul_precision(prec)
    if not torch.cuda.is_available():
        assert peaks_for(None) is PEAKS["cpu"]


def test_roofline_labels_deit_small_h100():
    s = Spec.full(SMALL)
    big = cost(s, batch=256, dtype=torch.bfloat16, device="h100")
    assert big.layer("blocks.0.mlp.fc1").bound == "compute"
    assert big.layer("blocks.0.mlp.fc2").bound == "compute"
    for name in ("blocks.0.norm1", "blocks.0.norm2", "blocks.0.mlp.act", "blocks.0.add1", "norm"):
        assert big.layer(name).bound == "memory", name
    one = cost(s, batch=1, dtype=torch.bfloat16, device="h100")
    assert one.layer("blocks.0.attn.qkv").bound == "memory"
    assert one.layer("blocks.0.mlp.fc1").bound == "memory"
    for r in big.layers:
        assert r.bound == ("compute" if r.intensity >= PEAKS["h100-sxm"].ridge(torch.bfloat16)
                           else "memory")
        assert r.time_s >= r.bytes / 3.35e12
