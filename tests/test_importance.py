"""Every criterion against a hand computation (explicit float64 forward, loops over structures)
on a tiny 1-block timm ViT."""
import pytest
import timm
import torch
import torch.nn.functional as F

import pyengine
from pyengine.methods.criteria import CRITERIA, calibrate, score


def tiny_vit(embed_dim=6, num_heads=2, mlp_ratio=1.5, depth=1):
    torch.manual_seed(1)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=4,
                          embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                          mlp_ratio=mlp_ratio, num_classes=3)
    # non-trivial norms and biases, so no term of a criterion vanishes by construction
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return m.double().eval()


def manual(model, x, y):
    """Explicit float64 forward of a 1-block ViT; returns the loss (sum over the batch) and
    the intermediate tensors the criteria read, all in the autograd graph."""
    blk = model.blocks[0]
    at, ml = blk.attn, blk.mlp
    H, Dh = at.num_heads, at.head_dim
    t = model.patch_embed(x)
    t = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), t], 1) + model.pos_embed
    B, N, D = t.shape
    xa = blk.norm1(t)
    qkv = torch.einsum("bnc,oc->bno", xa, at.qkv.weight) + at.qkv.bias
    q = qkv[..., :H * Dh].reshape(B, N, H, Dh)
    k = qkv[..., H * Dh:2 * H * Dh].reshape(B, N, H, Dh)
    v = qkv[..., 2 * H * Dh:].reshape(B, N, H, Dh)
    s = torch.einsum("bnhd,bmhd->bhnm", q, k) * Dh ** -0.5
    o = torch.einsum("bhnm,bmhd->bnhd", s.softmax(-1), v).reshape(B, N, H * Dh)
    attn_out = torch.einsum("bnc,oc->bno", o, at.proj.weight) + at.proj.bias
    t = t + attn_out
    xm = blk.norm2(t)
    hid = F.gelu(torch.einsum("bnc,oc->bno", xm, ml.fc1.weight) + ml.fc1.bias)
    mlp_out = torch.einsum("bnc,oc->bno", hid, ml.fc2.weight) + ml.fc2.bias
    t = model.norm(t + mlp_out)
    logits = model.head(t[:, 0])
    loss = F.cross_entropy(logits, y, reduction="sum")
    return loss, dict(xa=xa, qkv=qkv, o=o, attn_out=attn_out, xm=xm, hid=hid, mlp_out=mlp_out)


def reference(model, batches, criterion):
    """Scores by explicit loops over structures, float64."""
    blk = model.blocks[0]
    at, ml = blk.attn, blk.mlp
    H, Dh = at.num_heads, at.head_dim
    HD = H * Dh
    Wq, bq = at.qkv.weight.detach(), at.qkv.bias.detach()
    Wp, bp = at.proj.weight.detach(), at.proj.bias.detach()
    W1, b1 = ml.fc1.weight.detach(), ml.fc1.bias.detach()
    W2, b2 = ml.fc2.weight.detach(), ml.fc2.bias.detach()
    M = W1.shape[0]
    params = [at.qkv.weight, at.qkv.bias, at.proj.weight, at.proj.bias, ml.fc1.weight,
              ml.fc1.bias, ml.fc2.weight, ml.fc2.bias]
    sq = {k: 0 for k in ("xa", "o", "xm", "hid")}
    agf = {k: 0 for k in ("qkv", "hid", "attn_out", "mlp_out")}
    gsum = [torch.zeros_like(p) for p in params]
    n = 0
    for x, y in batches:
        loss, t = manual(model, x, y)
        keys = list(agf)
        grads = torch.autograd.grad(loss, [t[k] for k in keys] + params)
        for k, g in zip(keys, grads):
            agf[k] = agf[k] + (t[k].detach() * g).abs().sum((0, 1))
        for i, g in enumerate(grads[len(keys):]):
            gsum[i] += g
        for k in sq:
            sq[k] = sq[k] + (t[k].detach() ** 2).sum((0, 1))
        n += x.shape[0]
    G = dict(zip(("Wq", "bq", "Wp", "bp", "W1", "b1", "W2", "b2"), [g / n for g in gsum]))
    nx = {k: v.sqrt() for k, v in sq.items()}
    rows = lambda h, d: (h * Dh + d, HD + h * Dh + d, 2 * HD + h * Dh + d)  # noqa: E731

    # per-weight score of one Linear element, for the weight-space criteria
    def ria_elem(W, xn, i, j):
        A = W.abs()
        return (A[i, j] / A[:, j].sum() + A[i, j] / A[i, :].sum()) * xn[j] ** 0.5

    def sum_rows(W, rws, fn):  # sum over the listed rows, all input columns
        return sum(fn(i, j) for i in rws for j in range(W.shape[1]))

    def sum_cols(W, cls, fn):  # sum over the listed columns, all output rows
        return sum(fn(i, j) for j in cls for i in range(W.shape[0]))

    if criterion == "magnitude":
        e_qkv = lambda i, j: Wq[i, j] ** 2; e_p = lambda i, j: Wp[i, j] ** 2  # noqa: E702,E731
        e_1 = lambda i, j: W1[i, j] ** 2; e_2 = lambda i, j: W2[i, j] ** 2  # noqa: E702,E731
        f = torch.sqrt
    elif criterion == "wanda":
        e_qkv = lambda i, j: Wq[i, j].abs() * nx["xa"][j]  # noqa: E731
        e_p = lambda i, j: Wp[i, j].abs() * nx["o"][j]  # noqa: E731
        e_1 = lambda i, j: W1[i, j].abs() * nx["xm"][j]  # noqa: E731
        e_2 = lambda i, j: W2[i, j].abs() * nx["hid"][j]  # noqa: E731
        f = lambda s: s  # noqa: E731
    elif criterion == "ria":
        e_qkv = lambda i, j: ria_elem(Wq, nx["xa"], i, j)  # noqa: E731
        e_p = lambda i, j: ria_elem(Wp, nx["o"], i, j)  # noqa: E731
        e_1 = lambda i, j: ria_elem(W1, nx["xm"], i, j)  # noqa: E731
        e_2 = lambda i, j: ria_elem(W2, nx["hid"], i, j)  # noqa: E731
        f = lambda s: s  # noqa: E731
    elif criterion == "taylor":
        e_qkv = lambda i, j: Wq[i, j] * G["Wq"][i, j]  # noqa: E731
        e_p = lambda i, j: Wp[i, j] * G["Wp"][i, j]  # noqa: E731
        e_1 = lambda i, j: W1[i, j] * G["W1"][i, j]  # noqa: E731
        e_2 = lambda i, j: W2[i, j] * G["W2"][i, j]  # noqa: E731
        f = torch.abs
    if criterion == "agf":
        a = {k: v / n for k, v in agf.items()}
        qk = torch.tensor([[a["qkv"][rows(h, d)[0]] + a["qkv"][rows(h, d)[1]] for d in range(Dh)]
                           for h in range(H)])
        vv = torch.tensor([[a["qkv"][rows(h, d)[2]] for d in range(Dh)] for h in range(H)])
        return dict(qk=qk, v=vv, head=qk.sum(1) + vv.sum(1), neuron=a["hid"],
                    attn=a["attn_out"].sum(), mlp=a["mlp_out"].sum())
    bias = criterion == "taylor"
    qk = torch.zeros(H, Dh, dtype=torch.float64)
    vv = torch.zeros(H, Dh, dtype=torch.float64)
    qk_raw, v_raw = torch.zeros(H, Dh, dtype=torch.float64), torch.zeros(H, Dh, dtype=torch.float64)
    for h in range(H):
        for d in range(Dh):
            rq, rk, rv = rows(h, d)
            s = sum_rows(Wq, [rq, rk], e_qkv)
            if bias:
                s = s + bq[rq] * G["bq"][rq] + bq[rk] * G["bq"][rk]
            qk_raw[h, d] = s
            s = sum_rows(Wq, [rv], e_qkv) + sum_cols(Wp, [h * Dh + d], e_p)
            if bias:
                s = s + bq[rv] * G["bq"][rv]
            v_raw[h, d] = s
    qk, vv = f(qk_raw), f(v_raw)
    head = f(qk_raw.sum(1) + v_raw.sum(1))
    neuron = torch.zeros(M, dtype=torch.float64)
    for j in range(M):
        s = sum_rows(W1, [j], e_1) + sum_cols(W2, [j], e_2)
        if bias:
            s = s + b1[j] * G["b1"][j]
        neuron[j] = f(s)
    attn = qk_raw.sum() + v_raw.sum() + ((bp * G["bp"]).sum() if bias else 0)
    mlp = (sum_rows(W1, range(M), e_1) + sum_cols(W2, range(M), e_2)
           + ((b1 * G["b1"]).sum() + (b2 * G["b2"]).sum() if bias else 0))
    return dict(qk=qk, v=vv, head=head, neuron=neuron, attn=f(torch.as_tensor(attn)),
                mlp=f(torch.as_tensor(mlp)))


def _batches(n_batches=2, B=3, classes=3):
    return [(torch.randn(B, 3, 8, 8, dtype=torch.float64), torch.randint(0, classes, (B,)))
            for _ in range(n_batches)]


@pytest.mark.parametrize("criterion", ["magnitude", "wanda", "ria", "taylor", "agf"])
@pytest.mark.parametrize("dims", [(6, 2, 1.5), (7, 1, 1.0), (3, 3, 2.0)])
def test_criterion_matches_hand_computation(criterion, dims):
    D, H, r = dims  # head dims 3, 7 and 1
    model = tiny_vit(D, H, r)
    batches = _batches()
    calib = calibrate(model, batches, batches=len(batches), backend="torch")
    got = score(model, criterion, calib)[0]
    want = reference(model, batches, criterion)
    # statistics are reduced in float32 by the op: compare at float32 precision
    tol = dict(rtol=2e-5, atol=1e-9)
    for k in ("qk", "v", "head", "neuron"):
        torch.testing.assert_close(getattr(got, k), want[k].double(), **tol, msg=k)
    for k in ("attn", "mlp"):
        torch.testing.assert_close(torch.tensor(getattr(got, k), dtype=torch.float64), want[k].double(), **tol, msg=k)
    assert calib.samples == 6 and calib.batches == 2


def test_gated_model_scores_like_the_plain_one():
    model = tiny_vit(6, 2, 1.5, depth=2)
    batches = _batches()
    plain = calibrate(model, batches, batches=2)
    pyengine.gate(model)
    gated = calibrate(model, batches, batches=2)
    for c in CRITERIA:
        for a, b in zip(score(model, c, plain), score(model, c, gated)):
            torch.testing.assert_close(a.qk, b.qk, rtol=1e-6, atol=1e-12)
            torch.testing.assert_close(a.neuron, b.neuron, rtol=1e-6, atol=1e-12)
            assert a.attn == pytest.approx(b.attn, rel=1e-6)
    # the calibration left no gradients behind
    assert all(p.grad is None for p in model.parameters())


def test_random_is_seeded_and_shapes():
    model = tiny_vit(6, 2, 1.5, depth=2)
    a, b, c = score(model, "random", seed=3), score(model, "random", seed=3), score(model, "random", seed=4)
    assert torch.equal(a[1].v, b[1].v) and not torch.equal(a[1].v, c[1].v)
    assert a[0].qk.shape == (2, 3) and a[0].neuron.shape == (9,) and a[0].head.shape == (2,)


def test_errors():
    model = tiny_vit()
    with pytest.raises(ValueError, match="unknown criterion 'foo'"):
        score(model, "foo")
    with pytest.raises(ValueError, match="needs calibration"):
        score(model, "wanda")
    with pytest.raises(ValueError, match="batches must be a positive integer"):
        calibrate(model, _batches(), batches=0)
    with pytest.raises(ValueError, match="no batch"):
        calibrate(model, [], batches=1)
    # not a model family pyengine knows: the error says what each family looked for
    with pytest.raises(TypeError, match="cannot prune .*Linear.*not a timm VisionTransformer"):
        score(torch.nn.Linear(2, 2), "magnitude")


def test_more_batches_than_the_loader_has_uses_what_is_there():
    model = tiny_vit()
    calib = calibrate(model, _batches(2), batches=10)
    assert calib.batches == 2 and calib.samples == 6


# ---- ResNets ---------------------------------------------------------------------------------
def tiny_resnet(block="basic"):
    from timm.models.resnet import BasicBlock, Bottleneck, ResNet
    torch.manual_seed(2)
    if block == "basic":
        m = ResNet(block=BasicBlock, layers=(1, 1, 1, 1), channels=(3, 4, 5, 2), stem_width=4,
                   num_classes=3)
    else:
        m = ResNet(block=Bottleneck, layers=(1, 1, 1, 1), channels=(2, 3, 1, 2), stem_width=4,
                   num_classes=3)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):  # non-trivial running stats and affine
                mod.running_mean.normal_()
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.normal_()
                mod.bias.normal_()
    return m.double().eval()


def cnn_reference(model, batches, criterion):
    """Per-block channel and block scores by explicit loops over weights / feature elements."""
    from pyengine.models.resnet.blocks import stages
    blocks = [b for st in stages(model) for b in st]
    feats = {}

    def grab(name):
        def hook(m, a, o=None):
            t = a[0] if o is None else o
            t.retain_grad()
            feats[name] = (t, t.detach().clone())
            if o is not None:  # the block adds the shortcut into it in place: give it a copy
                return o.clone()
        return hook
    hs = []
    for i, b in enumerate(blocks):
        bott = hasattr(b, "conv3")
        hs.append(b.conv1.register_forward_pre_hook(grab((i, "x"))))
        hs.append(b.conv2.register_forward_pre_hook(grab((i, "a1"))))
        if bott:
            hs.append(b.conv3.register_forward_pre_hook(grab((i, "a2"))))
        hs.append((b.bn3 if bott else b.bn2).register_forward_hook(grab((i, "out"))))
    params = dict(model.named_parameters())
    gsum = {k: torch.zeros_like(p) for k, p in params.items()}
    sq, kin = {}, {}
    n = 0
    for x, y in batches:
        model.zero_grad()
        feats.clear()
        F.cross_entropy(model(x), y, reduction="sum").backward()
        for k, p in params.items():
            gsum[k] += p.grad
        for key, (t, v) in feats.items():
            sq[key] = sq.get(key, 0) + (v ** 2).sum((0, 2, 3))
            kin[key] = kin.get(key, 0) + (v * t.grad).abs().sum((0, 2, 3))
        n += x.shape[0]
    for h in hs:
        h.remove()
    model.zero_grad(set_to_none=True)
    names = {id(p): k for k, p in params.items()}
    G = lambda p: gsum[names[id(p)]] / n  # noqa: E731

    def elem(W, xn, o, i, kh, kw):
        if criterion == "magnitude":
            return W[o, i, kh, kw] ** 2
        if criterion == "wanda":
            return W[o, i, kh, kw].abs() * xn[i]
        A = W.abs()
        return (A[o, i, kh, kw] / A[:, i, kh, kw].sum() + A[o, i, kh, kw] / A[o].sum()) * xn[i] ** 0.5

    def rows(W, xn, outs):
        return sum(elem(W, xn, o, i, a, b) for o in outs for i in range(W.shape[1])
                   for a in range(W.shape[2]) for b in range(W.shape[3]))

    def cols(W, xn, ins):
        return sum(elem(W, xn, o, i, a, b) for i in ins for o in range(W.shape[0])
                   for a in range(W.shape[2]) for b in range(W.shape[3]))

    out = []
    for i, b in enumerate(blocks):
        bott = hasattr(b, "conv3")
        slots = [("conv1", b.conv1, b.bn1, b.conv2, (i, "x"), (i, "a1"))]
        if bott:
            slots.append(("conv2", b.conv2, b.bn2, b.conv3, (i, "a1"), (i, "a2")))
        convs = [(b.conv1, (i, "x")), (b.conv2, (i, "a1"))] + ([(b.conv3, (i, "a2"))] if bott else [])
        bns = [b.bn1, b.bn2] + ([b.bn3] if bott else [])
        ch = {}
        for name, co, bn, ci, kx, ka in slots:
            W, Wi = co.weight.detach(), ci.weight.detach()
            xn, an = sq[kx].sqrt(), sq[ka].sqrt()
            vals = []
            for c in range(W.shape[0]):
                if criterion == "agf":
                    vals.append(kin[ka][c] / n)
                elif criterion == "taylor":
                    s = (W[c] * G(co.weight)[c]).sum() + (Wi[:, c] * G(ci.weight)[:, c]).sum()
                    s = s + bn.weight[c] * G(bn.weight)[c] + bn.bias[c] * G(bn.bias)[c]
                    vals.append(s.detach().abs())
                else:
                    s = rows(W, xn, [c]) + cols(Wi, an, [c])
                    vals.append(s.sqrt() if criterion == "magnitude" else s)
            ch[name] = torch.stack([torch.as_tensor(v) for v in vals]).double()
        if criterion == "agf":
            blk = kin[(i, "out")].sum() / n
        elif criterion == "taylor":
            blk = sum((c.weight * G(c.weight)).sum() for c, _ in convs) + sum(
                (m.weight * G(m.weight)).sum() + (m.bias * G(m.bias)).sum() for m in bns)
            blk = blk.detach().abs()
        else:
            blk = sum(rows(c.weight.detach(), sq[k].sqrt(), range(c.weight.shape[0]))
                      for c, k in convs)
            blk = blk.sqrt() if criterion == "magnitude" else blk
        out.append((ch, float(blk)))
    return out


@pytest.mark.parametrize("criterion", ["magnitude", "wanda", "ria", "taylor", "agf"])
@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_resnet_criterion_matches_hand_computation(criterion, block):
    model = tiny_resnet(block)
    batches = [(torch.randn(2, 3, 12, 12, dtype=torch.float64), torch.randint(0, 3, (2,)))
               for _ in range(2)]
    calib = calibrate(model, batches, batches=2, backend="torch")
    got = score(model, criterion, calib)
    want = cnn_reference(model, batches, criterion)
    assert len(got) == len(want)
    for g, (ch, blk) in zip(got, want):
        assert set(g.channels) == set(ch)
        for k in ch:
            torch.testing.assert_close(g.channels[k], ch[k], rtol=2e-5, atol=1e-9, msg=k)
        assert g.block == pytest.approx(blk, rel=2e-5, abs=1e-9)


def test_gated_resnet_scores_like_the_plain_one():
    model = tiny_resnet()
    batches = [(torch.randn(2, 3, 12, 12, dtype=torch.float64), torch.randint(0, 3, (2,)))]
    plain = calibrate(model, batches, batches=1)
    pyengine.gate(model)
    gated = calibrate(model, batches, batches=1)
    for c in CRITERIA:
        for a, b in zip(score(model, c, plain), score(model, c, gated)):
            torch.testing.assert_close(a.channels["conv1"], b.channels["conv1"], rtol=1e-6,
                                       atol=1e-12)
            assert a.block == pytest.approx(b.block, rel=1e-6)
