"""One-shot importance scores for every prunable structure of a timm ViT.

    calib = calibrate(model, loader, batches=8)          # forward/backward hooks, raw statistics
    scores = score(model, "agf", calib)                  # one BlockScores per transformer block
    scores[3].qk[h, d], scores[3].v[h, d], scores[3].head[h], scores[3].neuron[j],
    scores[3].attn, scores[3].mlp                         # higher = more important

Structures and the weights / features that belong to them (block with H heads of Dh dims,
``qkv`` rows ordered (q|k|v, head, dim) as timm reshapes them, FFN of M neurons):

* q/k dim (h, d): qkv rows ``h*Dh+d`` (q) and ``H*Dh + h*Dh+d`` (k); features q and k there.
* v dim (h, d):   qkv row ``2*H*Dh + h*Dh+d`` (v) and proj column ``h*Dh+d``; feature v there.
* head h:         all its q/k and v dims.
* neuron j:       fc1 row j and fc2 column j; feature = the activation fc2 reads (after act).
* attention / FFN block: every weight of the branch; feature = the branch output.

Criteria (each a sum over the structure's weights or feature elements unless said):

* ``magnitude``: L2 norm of the structure's weights.
* ``wanda``:     sum |W_ij| * ||X_j||_2 (X_j: input feature j of that Linear over all tokens).
* ``ria``:       sum (|W_ij| / sum_k |W_kj| + |W_ij| / sum_k |W_ik|) * ||X_j||_2^0.5, the sums
                 running over the whole Linear (all of qkv, all of proj, ...).
* ``taylor``:    |sum w * dL/dw| over the structure's weights and biases, dL/dw the gradient of
                 the mean calibration loss.
* ``agf``:       AGF kinetic utility E_x sum |a * dL_x/da| over the structure's feature elements
                 (all tokens), L_x the loss of one sample.
* ``random``:    uniform [0, 1) scores from a seeded generator.

timm ResNets (:func:`cnn_blocks`) get :class:`ConvBlockScores`: per inner conv slot (conv1,
and conv2 of a Bottleneck) one score per channel, whose weights are the output filter of the
conv making it, its BN scale/shift (Taylor only, as biases) and the input slice of the conv
reading it, whose feature is what that conv reads; and one per residual block (its branch
output as feature). A conv counts as a Linear over (in channel, kh, kw) inputs whose input
norm ||X_j|| is that of the in channel over all positions.

The statistics come from one ``pyengine.ops.importance_reduce_many`` call per calibration step
for all hooked tensors of all blocks (sum |x|, sum x^2, sum |x*g| per channel).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

CRITERIA = ("magnitude", "wanda", "ria", "taylor", "agf", "random")

__all__ = ["CRITERIA", "BlockScores", "ConvBlockScores", "Calibration", "calibrate", "score",
           "score_all", "vit_blocks", "cnn_blocks"]


@dataclass
class BlockScores:
    """Scores of one transformer block (float64, CPU). Higher means more important."""

    head: torch.Tensor    # [H]
    qk: torch.Tensor      # [H, Dh]
    v: torch.Tensor       # [H, Dh]
    neuron: torch.Tensor  # [M]
    attn: float           # the whole attention branch
    mlp: float            # the whole FFN branch


# per block: the hooked tensors, in this order, and their channel counts
_ATTN_KEYS = ("attn_in", "qkv_out", "proj_in", "attn_out")
_MLP_KEYS = ("mlp_in", "hidden", "mlp_out")


@dataclass
class Calibration:
    """Raw statistics of a calibration run: per block and hooked tensor a float64 [3, C]
    (sum |a|, sum a^2, sum |a * dL_x/da| over samples and tokens), the per-parameter
    gradients of the mean loss, and the number of samples."""

    stats: list[dict[str, torch.Tensor]]
    grads: dict[str, torch.Tensor]
    samples: int
    batches: int
    loss: float
    meta: dict = field(default_factory=dict)


def vit_blocks(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(attention, mlp) of every block of a timm ViT, gated or not (they expose qkv/proj and
    fc1/fc2 either way)."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise TypeError(f"{type(model).__name__} has no .blocks; importance scores need a timm "
                        "VisionTransformer (gated or not)")
    out = []
    for i, b in enumerate(blocks):
        attn, mlp = getattr(b, "attn", None), getattr(b, "mlp", None)
        if not all(hasattr(attn, a) for a in ("qkv", "proj", "num_heads", "head_dim")) or \
                not all(hasattr(mlp, a) for a in ("fc1", "fc2")):
            raise TypeError(f"blocks.{i} is not a standard (or gated) timm attention/Mlp block; "
                            "compact (compiled) models cannot be scored, score the gated one")
        out.append((attn, mlp))
    return out


def _default_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # summed over the batch, so a feature's gradient is that of its own sample's loss
    return F.cross_entropy(model(x), y, reduction="sum")


def calibrate(model: nn.Module, loader: Iterable, batches: int = 8, device="cpu",
              loss_fn: Callable | None = None, backend: str = "auto",
              progress: bool = False) -> Calibration:
    """Run ``batches`` batches of ``loader`` forward and backward through ``model`` (eval
    mode, no dropout) and collect what every criterion needs. ``loss_fn(model, x, y)`` must
    return the loss summed over the batch (default: cross-entropy, reduction="sum")."""
    from tqdm import tqdm

    from pyengine.ops import importance_reduce_many

    if not isinstance(batches, int) or batches < 1:
        raise ValueError(f"calibrate: batches must be a positive integer, got {batches!r}")
    loss_fn = loss_fn or _default_loss
    cnn = _is_resnet(model)
    blocks = cnn_blocks(model) if cnn else vit_blocks(model)
    was_training = model.training
    model.eval()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    saved_grads = {n: p.grad for n, p in params.items()}
    for p in params.values():
        p.grad = None

    captured: dict[tuple[int, str], list] = {}  # (block, key) -> [activation, grad]

    def keep(i: int, key: str, t: torch.Tensor) -> None:
        slot = [t.detach(), None]
        captured[(i, key)] = slot
        if t.requires_grad:
            def grab(g, slot=slot):
                slot[1] = g.detach()
            t.register_hook(grab)

    handles = []
    for i, blk in enumerate(blocks if cnn else []):
        kind = blk.kind if hasattr(blk, "kind") else _cnn_kind(blk)
        for sl in _CNN_SLOTS[kind]:
            conv_out, _, conv_in = _CNN_SLOT_LAYERS[sl]
            handles += [
                getattr(blk, conv_out).register_forward_pre_hook(
                    lambda m, a, i=i, sl=sl: keep(i, f"{sl}.in", a[0])),
                getattr(blk, conv_in).register_forward_pre_hook(
                    lambda m, a, i=i, sl=sl: keep(i, f"{sl}.feature", a[0]))]
        handles.append(getattr(blk, _CNN_LAST_BN[kind]).register_forward_hook(
            lambda m, a, o, i=i: _keep_branch(keep, i, o)))
    for i, (attn, mlp) in enumerate([] if cnn else blocks):
        handles += [
            attn.qkv.register_forward_pre_hook(lambda m, a, i=i: keep(i, "attn_in", a[0])),
            attn.qkv.register_forward_hook(lambda m, a, o, i=i: keep(i, "qkv_out", o)),
            attn.proj.register_forward_pre_hook(lambda m, a, i=i: keep(i, "proj_in", a[0])),
            attn.register_forward_hook(lambda m, a, o, i=i: keep(i, "attn_out", o)),
            mlp.fc1.register_forward_pre_hook(lambda m, a, i=i: keep(i, "mlp_in", a[0])),
            mlp.fc2.register_forward_pre_hook(lambda m, a, i=i: keep(i, "hidden", a[0])),
            mlp.register_forward_hook(lambda m, a, o, i=i: keep(i, "mlp_out", o)),
        ]
    if cnn:
        keys = [(i, k) for i, blk in enumerate(blocks) for k in _cnn_keys(blk)]
    else:
        keys = [(i, k) for i in range(len(blocks)) for k in _ATTN_KEYS + _MLP_KEYS]
    acc: dict[tuple[int, str], torch.Tensor] = {}
    samples = done = 0
    total_loss = 0.0
    try:
        it = iter(loader)
        for _ in tqdm(range(batches), desc="calibrate", disable=not progress, leave=False):
            try:
                x, y = next(it)
            except StopIteration:
                break
            x, y = x.to(device), y.to(device)
            captured.clear()
            with torch.enable_grad():
                loss = loss_fn(model, x, y)
                loss.backward()
            missing = [k for k in keys if k not in captured]
            if missing:
                raise RuntimeError(f"calibrate: hooks did not see {missing[:3]}...; is every "
                                   "block run in the forward?")
            # channels last (conv feature maps are [B, C, H, W]): the op reduces leading dims
            last = (lambda t: t.movedim(1, -1)) if cnn else (lambda t: t)  # noqa: E731
            xs = [last(captured[k][0]) for k in keys]
            gs = [None if captured[k][1] is None else last(captured[k][1]) for k in keys]
            # one launch for every hooked tensor of every block
            red = importance_reduce_many(xs, gs, backend=backend)
            for k, r in zip(keys, red):
                r = r.double().cpu()
                acc[k] = acc[k] + r if k in acc else r
            samples += int(y.shape[0])
            total_loss += float(loss.detach())
            done += 1
    finally:
        for h in handles:
            h.remove()
        captured.clear()
        model.train(was_training)
    if done == 0:
        raise ValueError("calibrate: the loader yielded no batch")
    grads = {n: (p.grad.detach().double().cpu() / samples if p.grad is not None
                 else torch.zeros(p.shape, dtype=torch.float64))
             for n, p in params.items()}
    for n, p in params.items():
        p.grad = saved_grads[n]
    stats = [{k: v for (j, k), v in acc.items() if j == i} for i in range(len(blocks))]
    return Calibration(stats, grads, samples, done, total_loss / samples)


# ---- criteria ------------------------------------------------------------------------------
def _w(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().double().cpu()


def _param_names(model: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def _linear_parts(attn, mlp):
    return (_w(attn.qkv.weight), _w(attn.qkv.bias), _w(attn.proj.weight), _w(attn.proj.bias),
            _w(mlp.fc1.weight), _w(mlp.fc1.bias), _w(mlp.fc2.weight), _w(mlp.fc2.bias))


def _combine(r_qkv, c_proj, r_fc1, c_fc2, H, Dh, f, attn_extra=0.0, mlp_extra=0.0):
    """Per-structure scores from additive contributions: ``r_qkv`` [3*H*Dh] per qkv row,
    ``c_proj`` [H*Dh] per proj column, ``r_fc1``/``c_fc2`` [M] per neuron; ``f`` maps a
    structure's summed contribution to its score (identity, sqrt or abs)."""
    HD = H * Dh
    q, k, v = r_qkv[:HD].view(H, Dh), r_qkv[HD:2 * HD].view(H, Dh), r_qkv[2 * HD:].view(H, Dh)
    p = c_proj.view(H, Dh)
    qk_sum, v_sum = q + k, v + p
    return BlockScores(
        head=f(qk_sum.sum(1) + v_sum.sum(1)), qk=f(qk_sum), v=f(v_sum),
        neuron=f(r_fc1 + c_fc2),
        attn=float(f(r_qkv.sum() + c_proj.sum() + attn_extra)),
        mlp=float(f(r_fc1.sum() + c_fc2.sum() + mlp_extra)))


def _ria(W: torch.Tensor, xnorm: torch.Tensor) -> torch.Tensor:
    A = W.abs()
    col = A.sum(0, keepdim=True).clamp_min(1e-300)  # over outputs, per input channel j
    row = A.sum(1, keepdim=True).clamp_min(1e-300)  # over inputs, per output row i
    return (A / col + A / row) * xnorm.sqrt()[None, :]


def _need(calib: Calibration | None, criterion: str) -> Calibration:
    if calib is None:
        raise ValueError(f"criterion {criterion!r} needs calibration statistics: pass "
                         "calib=calibrate(model, loader)")
    return calib


def score(model: nn.Module, criterion: str, calib: Calibration | None = None,
          seed: int = 0) -> list[BlockScores]:
    """Scores of every structure of every block by ``criterion`` (one of :data:`CRITERIA`).

    ``magnitude`` and ``random`` need no calibration; the others use ``calib`` (from
    :func:`calibrate` on the same model with the same weights).
    """
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    if _is_resnet(model):
        return _score_cnn(model, criterion, calib, seed)
    blocks = vit_blocks(model)
    if calib is not None and len(calib.stats) != len(blocks):
        raise ValueError(f"calibration has {len(calib.stats)} blocks, the model {len(blocks)}")
    names = _param_names(model)
    gen = torch.Generator().manual_seed(seed)
    out = []
    ident = lambda t: t  # noqa: E731
    for i, (attn, mlp) in enumerate(blocks):
        H, Dh = attn.num_heads, attn.head_dim
        Wq, bq, Wp, bp, W1, b1, W2, b2 = _linear_parts(attn, mlp)
        M = W1.shape[0]
        if criterion == "random":
            r = lambda *s: torch.rand(*s, generator=gen, dtype=torch.float64)  # noqa: E731
            out.append(BlockScores(r(H), r(H, Dh), r(H, Dh), r(M), float(r(1)), float(r(1))))
            continue
        if criterion == "magnitude":
            out.append(_combine((Wq ** 2).sum(1), (Wp ** 2).sum(0), (W1 ** 2).sum(1),
                                (W2 ** 2).sum(0), H, Dh, torch.sqrt))
            continue
        st = _need(calib, criterion).stats[i]
        if criterion == "agf":
            n = calib.samples
            bs = _combine(st["qkv_out"][2] / n, torch.zeros(H * Dh, dtype=torch.float64),
                          st["hidden"][2] / n, torch.zeros(M, dtype=torch.float64), H, Dh, ident)
            # a whole branch's feature is its output, not the sum of its parts
            bs.attn = float(st["attn_out"][2].sum() / n)
            bs.mlp = float(st["mlp_out"][2].sum() / n)
            out.append(bs)
            continue
        xa, xp = st["attn_in"][1].sqrt(), st["proj_in"][1].sqrt()
        x1, x2 = st["mlp_in"][1].sqrt(), st["hidden"][1].sqrt()
        if criterion == "wanda":
            out.append(_combine(Wq.abs() @ xa, Wp.abs().sum(0) * xp, W1.abs() @ x1,
                                W2.abs().sum(0) * x2, H, Dh, ident))
        elif criterion == "ria":
            out.append(_combine(_ria(Wq, xa).sum(1), _ria(Wp, xp).sum(0), _ria(W1, x1).sum(1),
                                _ria(W2, x2).sum(0), H, Dh, ident))
        else:  # taylor
            g = lambda p: calib.grads[names[id(p)]]  # noqa: E731
            r_qkv = (Wq * g(attn.qkv.weight)).sum(1)
            if bq is not None:
                r_qkv = r_qkv + bq * g(attn.qkv.bias)
            r_fc1 = (W1 * g(mlp.fc1.weight)).sum(1)
            if b1 is not None:
                r_fc1 = r_fc1 + b1 * g(mlp.fc1.bias)
            attn_extra = float((bp * g(attn.proj.bias)).sum()) if bp is not None else 0.0
            mlp_extra = float((b2 * g(mlp.fc2.bias)).sum()) if b2 is not None else 0.0
            out.append(_combine(r_qkv, (Wp * g(attn.proj.weight)).sum(0), r_fc1,
                                (W2 * g(mlp.fc2.weight)).sum(0), H, Dh, torch.abs,
                                attn_extra, mlp_extra))
    return out


def score_all(model: nn.Module, calib: Calibration | None, criteria=CRITERIA,
              seed: int = 0) -> dict[str, list[BlockScores]]:
    """``{criterion: score(model, criterion, calib, seed)}`` for several criteria at once."""
    return {c: score(model, c, calib, seed) for c in criteria}


# ---- ResNets ---------------------------------------------------------------------------------
# A prunable channel of slot s (conv1, and conv2 in a Bottleneck) owns: the output filter of the
# conv that makes it, its BN scale and shift, and the input slice of the conv that reads it;
# its feature is what that reader sees (after the activation, where the gate multiplies). A
# residual block's feature is its branch output (the last BN's output, before the add).
_CNN_SLOTS = {"basic": ("conv1",), "bottleneck": ("conv1", "conv2")}
_CNN_SLOT_LAYERS = {"conv1": ("conv1", "bn1", "conv2"), "conv2": ("conv2", "bn2", "conv3")}
_CNN_LAST_BN = {"basic": "bn2", "bottleneck": "bn3"}
_CNN_CONVS = {"basic": ("conv1", "conv2"), "bottleneck": ("conv1", "conv2", "conv3")}
_CNN_BNS = {"basic": ("bn1", "bn2"), "bottleneck": ("bn1", "bn2", "bn3")}


@dataclass
class ConvBlockScores:
    """Scores of one residual block: per prunable slot ("conv1", "conv2") a float64 [C] of
    channel scores, and the whole block's (its residual branch)."""

    channels: dict[str, torch.Tensor]
    block: float


def _keep_branch(keep, i: int, o: torch.Tensor) -> torch.Tensor:
    """Record the branch output and hand the block a copy: timm's blocks add the shortcut into
    the last BN's output in place (and ReLU it in place), which would overwrite the recorded
    values and move the gradient hook to the modified tensor."""
    keep(i, "branch_out", o)
    return o.clone()


def _is_resnet(model: nn.Module) -> bool:
    from pyengine.models.resnet.blocks import is_resnet
    return is_resnet(model)


def _cnn_kind(blk: nn.Module) -> str:
    from pyengine.models.resnet.blocks import _kind
    return _kind(blk)


def cnn_blocks(model: nn.Module) -> list[nn.Module]:
    """The residual blocks of a timm ResNet (gated or not), stage by stage."""
    from pyengine.models.resnet.blocks import stages
    out = [b for st in stages(model) for b in st]
    for i, b in enumerate(out):
        if not hasattr(b, "conv1") or not hasattr(b, "conv2"):
            raise TypeError(f"residual block {i} ({type(b).__name__}) is not a timm BasicBlock/"
                            "Bottleneck or its gated form; compact models cannot be scored")
    return out


def _cnn_keys(blk: nn.Module) -> list[str]:
    kind = blk.kind if hasattr(blk, "kind") else _cnn_kind(blk)
    return [f"{sl}.{t}" for sl in _CNN_SLOTS[kind] for t in ("in", "feature")] + ["branch_out"]


def _conv_in_norms(st: dict, kind: str) -> dict[str, torch.Tensor]:
    """||X_j||_2 per input channel of every branch conv (from the hooked inputs)."""
    x = {"conv1": st["conv1.in"][1].sqrt(), "conv2": st["conv1.feature"][1].sqrt()}
    if kind == "bottleneck":
        x["conv3"] = st["conv2.feature"][1].sqrt()
    return x


def _conv_elem(W: torch.Tensor, xnorm: torch.Tensor, criterion: str) -> torch.Tensor:
    """Per-weight score of a conv [O, I, kh, kw] viewed as a Linear over (I, kh, kw) inputs whose
    input feature norm is that of channel I (all positions)."""
    if criterion == "magnitude":
        return W ** 2
    if criterion == "wanda":
        return W.abs() * xnorm[None, :, None, None]
    # ria: sums over the whole matrix [O, I*kh*kw]
    A = W.abs()
    col = A.sum(0, keepdim=True).clamp_min(1e-300)
    row = A.sum((1, 2, 3), keepdim=True).clamp_min(1e-300)
    return (A / col + A / row) * xnorm.sqrt()[None, :, None, None]


def _score_cnn(model: nn.Module, criterion: str, calib, seed: int) -> list[ConvBlockScores]:
    blocks = cnn_blocks(model)
    if calib is not None and len(calib.stats) != len(blocks):
        raise ValueError(f"calibration has {len(calib.stats)} blocks, the model {len(blocks)}")
    names = _param_names(model)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, blk in enumerate(blocks):
        kind = blk.kind if hasattr(blk, "kind") else _cnn_kind(blk)
        slots = _CNN_SLOTS[kind]
        sizes = {sl: getattr(blk, _CNN_SLOT_LAYERS[sl][0]).out_channels for sl in slots}
        if criterion == "random":
            ch = {sl: torch.rand(c, generator=gen, dtype=torch.float64) for sl, c in sizes.items()}
            out.append(ConvBlockScores(ch, float(torch.rand(1, generator=gen, dtype=torch.float64))))
            continue
        W = {c: _w(getattr(blk, c).weight) for c in _CNN_CONVS[kind]}
        if criterion == "agf":
            st = _need(calib, criterion).stats[i]
            n = calib.samples
            out.append(ConvBlockScores({sl: st[f"{sl}.feature"][2] / n for sl in slots},
                                       float(st["branch_out"][2].sum() / n)))
            continue
        if criterion == "taylor":
            calib = _need(calib, criterion)
            g = lambda p: calib.grads[names[id(p)]]  # noqa: E731
            ch = {}
            for sl in slots:
                co, bn, ci = (getattr(blk, n) for n in _CNN_SLOT_LAYERS[sl])
                r = (_w(co.weight) * g(co.weight)).sum((1, 2, 3))
                r = r + _w(bn.weight) * g(bn.weight) + _w(bn.bias) * g(bn.bias)
                r = r + (_w(ci.weight) * g(ci.weight)).sum((0, 2, 3))
                ch[sl] = r.abs()
            total = sum(float((_w(getattr(blk, n).weight) * g(getattr(blk, n).weight)).sum())
                        for n in _CNN_CONVS[kind])
            total += sum(float((_w(getattr(blk, n).weight) * g(getattr(blk, n).weight)).sum()
                               + (_w(getattr(blk, n).bias) * g(getattr(blk, n).bias)).sum())
                         for n in _CNN_BNS[kind])
            out.append(ConvBlockScores(ch, abs(total)))
            continue
        if criterion == "magnitude":
            xn = {c: torch.ones(W[c].shape[1], dtype=torch.float64) for c in W}
        else:
            xn = _conv_in_norms(_need(calib, criterion).stats[i], kind)
        E = {c: _conv_elem(W[c], xn[c], criterion) for c in W}
        f = torch.sqrt if criterion == "magnitude" else (lambda t: t)
        ch = {sl: f(E[_CNN_SLOT_LAYERS[sl][0]].sum((1, 2, 3))
                    + E[_CNN_SLOT_LAYERS[sl][2]].sum((0, 2, 3))) for sl in slots}
        out.append(ConvBlockScores(ch, float(f(sum(e.sum() for e in E.values())))))
    return out
