"""One-shot importance scores for every prunable structure of a model, by one interface.

    calib = calibrate(model, loader, batches=8)          # forward/backward hooks, raw statistics
    scores = score(model, "agf", calib)                  # one score record per block
    scores[3].qk[h, d], scores[3].v[h, d], scores[3].head[h], scores[3].neuron[j],
    scores[3].attn, scores[3].mlp                         # (ViT) higher = more important

What each structure owns (weights, features) is its model family's business
(``models/<family>/importance.py``, in the vocabulary of :mod:`pyengine.models.importance`); a
criterion only says how weights or features turn into a number (each a sum over the
structure's weights or feature elements, then ``finish``):

* ``magnitude``: L2 norm of the structure's weights.
* ``wanda``:     sum |W_ij| * ||X_j||_2 (X_j: input feature j of that layer over all tokens).
* ``ria``:       sum (|W_ij| / sum_k |W_kj| + |W_ij| / sum_k |W_ik|) * ||X_j||_2^0.5, the sums
                 running over the whole layer.
* ``taylor``:    |sum w * dL/dw| over the structure's weights and biases, dL/dw the gradient of
                 the mean calibration loss.
* ``agf``:       AGF kinetic utility E_x sum |a * dL_x/da| over the structure's feature elements
                 (all tokens), L_x the loss of one sample.
* ``random``:    uniform [0, 1) scores from a seeded generator.

Adding a criterion: subclass :class:`WeightCriterion` (per-element contributions of a weight
matrix, and of biases) or :class:`FeatureCriterion` (per-channel contributions of recorded
features) and decorate it with ``@register_criterion("name")``; it is then also a
``pyengine prune --method name`` one-shot method.

The statistics come from one ``pyengine.ops.importance_reduce_many`` call per calibration step
for all hooked tensors of all blocks (sum |x|, sum x^2, sum |x*g| per channel).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from pyengine.models.importance import Branch, Group, LayerView
from pyengine.models.resnet.importance import ConvBlockScores
from pyengine.models.vit.importance import BlockScores

__all__ = ["CRITERIA", "Criterion", "WeightCriterion", "FeatureCriterion", "register_criterion",
           "get_criterion", "criteria", "BlockScores", "ConvBlockScores", "Calibration",
           "calibrate", "score", "score_all", "units_of"]


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


def units_of(model: nn.Module):
    """The importance units of ``model``'s family (gated or plain; not compact)."""
    from pyengine.models import adapter_for
    return adapter_for(model).importance(model)


# ---- calibration ----------------------------------------------------------------------------
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
    units = units_of(model)
    nblocks = len(units.blocks)
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

    def branch(i: int, key: str, o: torch.Tensor) -> torch.Tensor:
        # record the branch output and hand the block a copy: a block that adds the shortcut
        # into it in place would overwrite the record and move the gradient hook
        keep(i, key, o)
        return o.clone()

    handles, keys, moves = [], [], []
    default_last = getattr(units, "channels_last", False)
    for i in range(nblocks):
        for h in units.hooks(i):
            keys.append((i, h.key))
            moves.append(default_last if h.channels_last is None else h.channels_last)
            if h.where == "input":
                handles.append(h.module.register_forward_pre_hook(
                    lambda m, a, i=i, k=h.key: keep(i, k, a[0])))
            elif h.where == "output":
                handles.append(h.module.register_forward_hook(
                    lambda m, a, o, i=i, k=h.key: keep(i, k, o)))
            else:  # "branch_output"
                handles.append(h.module.register_forward_hook(
                    lambda m, a, o, i=i, k=h.key: branch(i, k, o)))
    # channels last (conv feature maps are [B, C, H, W]): the op reduces leading dims
    def last(t, move):
        return t.movedim(1, -1) if move else t
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
            if x.is_floating_point() and not bool(torch.isfinite(x).all()):
                raise FloatingPointError(f"calibrate: calibration batch {done + 1} holds NaN/inf "
                                         "inputs; check the data")
            captured.clear()
            with torch.enable_grad():
                loss = loss_fn(model, x, y)
                if not bool(torch.isfinite(loss.detach()).all()):
                    raise FloatingPointError(
                        f"calibrate: the loss of calibration batch {done + 1} is "
                        f"{float(loss.detach())}; the model's weights or activations are not "
                        "finite")
                loss.backward()
            missing = [k for k in keys if k not in captured]
            if missing:
                raise RuntimeError(f"calibrate: hooks did not see {missing[:3]}...; is every "
                                   "block run in the forward?")
            xs = [last(captured[k][0], mv) for k, mv in zip(keys, moves)]
            gs = [None if captured[k][1] is None else last(captured[k][1], mv)
                  for k, mv in zip(keys, moves)]
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
    stats = [{k: v for (j, k), v in acc.items() if j == i} for i in range(nblocks)]
    for (i, k), v in acc.items():
        if not bool(torch.isfinite(v).all()):
            raise FloatingPointError(f"calibrate: the activation statistics of block {i} "
                                     f"({k}) are not finite")
    for n, g in grads.items():
        if not bool(torch.isfinite(g).all()):
            raise FloatingPointError(f"calibrate: the gradient of {n} is not finite")
    return Calibration(stats, grads, samples, done, total_loss / samples)


# ---- the criterion interface -----------------------------------------------------------------
def _w(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().double().cpu()


@dataclass
class _Block:
    """What a criterion sees of one block: its layers and groups, the calibration statistics
    of its hooks, the gradients (by parameter), the random generator."""

    layers: dict[str, LayerView]
    groups: list
    stats: dict[str, torch.Tensor] | None
    grad: Callable[[torch.Tensor], torch.Tensor] | None
    samples: int
    gen: torch.Generator


class Criterion:
    """How the weights or features a structure owns become its importance (higher: keep)."""

    name = "base"
    needs_data = True   # reads calibration statistics or gradients

    def block(self, b: _Block) -> dict[str, torch.Tensor | float]:
        """Scores of every group and branch of one block, by name."""
        raise NotImplementedError


def _gather(vec: torch.Tensor, index: torch.Tensor, ndim: int) -> torch.Tensor:
    """``vec[index]`` summed over the index's trailing dims beyond the group's ``ndim``."""
    g = vec[index]
    return g.sum(dim=tuple(range(ndim, g.dim()))) if g.dim() > ndim else g


class WeightCriterion(Criterion):
    """A criterion over weights: per-element contributions of each weight matrix (viewed as
    ``[rows, cols]``) and per-row contributions of bias-like vectors; a unit sums the rows and
    columns it owns, a branch everything of its layers; ``finish`` maps the sum to the score."""

    def elements(self, W: torch.Tensor, xnorm: torch.Tensor | None, G) -> torch.Tensor:
        raise NotImplementedError

    def bias(self, b: torch.Tensor, G) -> torch.Tensor | None:
        return None  # biases count only where a criterion says so

    def finish(self, t):
        return t

    def xnorm(self, b: _Block, view: LayerView) -> torch.Tensor | None:
        """||X_j||_2 per weight column (a conv's columns share their input channel's norm)."""
        if b.stats is None or view.input_key is None:
            return None
        x = b.stats[view.input_key][1].sqrt()
        return x.repeat_interleave(view.repeat) if view.repeat > 1 else x

    def _grouped(self, W, xnorm, G, groups: int) -> torch.Tensor:
        """Elements of a layer; a grouped conv is ``groups`` layers, each reading its own
        input channels (a column's norm is that of its group's input channel)."""
        if groups == 1:
            return self.elements(W, xnorm, G)
        rows, cols = W.shape[0] // groups, W.shape[1]
        return torch.cat([self.elements(
            W[k * rows:(k + 1) * rows], None if xnorm is None else xnorm[k * cols:(k + 1) * cols],
            None if G is None else G[k * rows:(k + 1) * rows]) for k in range(groups)])

    def block(self, b: _Block) -> dict:
        rows, cols, total = {}, {}, {}
        for name, view in b.layers.items():
            r = c = None
            t = 0.0
            if view.weight is not None:
                W = _w(view.weight)
                E = self._grouped(W.reshape(W.shape[0], -1), self.xnorm(b, view),
                                  (b.grad(view.weight).reshape(W.shape[0], -1)
                                   if b.grad is not None else None), view.groups)
                r, c = E.sum(1), E.sum(0)
                t = E.sum()
            for p in view.biases:
                if p is None:
                    continue
                e = self.bias(_w(p), b.grad(p) if b.grad is not None else None)
                if e is not None:
                    r = e if r is None else r + e
                    t = t + e.sum()
            rows[name], cols[name], total[name] = r, c, t
        out: dict = {}
        for g in b.groups:
            if isinstance(g, Branch):
                out[g.name] = float(self.finish(torch.as_tensor(
                    sum(total[n] for n in g.layers), dtype=torch.float64)))
                continue
            acc = torch.zeros(g.shape, dtype=torch.float64)
            for part in g.weight_parts:
                vec = (rows if part.kind == "row" else cols)[part.source]
                if vec is not None:
                    acc = acc + _gather(vec, part.index, len(g.shape))
            out[g.name] = self.finish(acc)
        return out


class FeatureCriterion(Criterion):
    """A criterion over recorded features: per-channel contributions of each hooked tensor;
    a unit sums the channels it owns, a branch the whole branch output."""

    def channels(self, stats: torch.Tensor, samples: int) -> torch.Tensor:
        raise NotImplementedError

    def block(self, b: _Block) -> dict:
        out: dict = {}
        for g in b.groups:
            if isinstance(g, Branch):
                out[g.name] = float(self.channels(b.stats[g.feature], b.samples).sum())
                continue
            acc = torch.zeros(g.shape, dtype=torch.float64)
            for part in g.feature_parts:
                acc = acc + _gather(self.channels(b.stats[part.source], b.samples), part.index,
                                    len(g.shape))
            out[g.name] = acc
        return out


_CRITERIA: dict[str, Criterion] = {}


def register_criterion(name: str):
    """Class decorator: make a :class:`Criterion` available by ``name`` (and as a one-shot
    method of ``pyengine prune``)."""
    def deco(cls):
        obj = cls()
        obj.name = name
        _CRITERIA[name] = obj
        return cls
    return deco


@register_criterion("magnitude")
class Magnitude(WeightCriterion):
    needs_data = False

    def elements(self, W, xnorm, G):
        return W ** 2

    def finish(self, t):
        return torch.sqrt(t)


@register_criterion("wanda")
class Wanda(WeightCriterion):
    def elements(self, W, xnorm, G):
        return W.abs() * xnorm[None, :]


@register_criterion("ria")
class RIA(WeightCriterion):
    def elements(self, W, xnorm, G):
        A = W.abs()
        col = A.sum(0, keepdim=True).clamp_min(1e-300)  # over outputs, per input column j
        row = A.sum(1, keepdim=True).clamp_min(1e-300)  # over inputs, per output row i
        return (A / col + A / row) * xnorm.sqrt()[None, :]


@register_criterion("taylor")
class Taylor(WeightCriterion):
    def elements(self, W, xnorm, G):
        return W * G

    def bias(self, b, G):
        return b * G

    def finish(self, t):
        return t.abs() if isinstance(t, torch.Tensor) else abs(t)


@register_criterion("agf")
class AGF(FeatureCriterion):
    def channels(self, stats, samples):
        return stats[2] / samples


@register_criterion("random")
class Random(Criterion):
    needs_data = False

    def block(self, b: _Block) -> dict:
        out: dict = {}
        for g in b.groups:  # drawn in the family's group order (reproducible per seed)
            if isinstance(g, Branch):
                out[g.name] = float(torch.rand(1, generator=b.gen, dtype=torch.float64))
            else:
                out[g.name] = torch.rand(*g.shape, generator=b.gen, dtype=torch.float64)
        return out


CRITERIA = tuple(_CRITERIA)


def criteria() -> dict[str, Criterion]:
    return dict(_CRITERIA)


def get_criterion(name: str) -> Criterion:
    if name not in _CRITERIA:
        raise ValueError(f"unknown criterion {name!r}; choose one of {', '.join(_CRITERIA)}")
    return _CRITERIA[name]


# ---- scoring ----------------------------------------------------------------------------------
def score(model: nn.Module, criterion: str, calib: Calibration | None = None,
          seed: int = 0) -> list:
    """Scores of every structure of every block by ``criterion`` (one of :data:`CRITERIA`).

    ``magnitude`` and ``random`` need no calibration; the others use ``calib`` (from
    :func:`calibrate` on the same model with the same weights).
    """
    crit = get_criterion(criterion)
    units = units_of(model)
    n = len(units.blocks)
    if calib is None and crit.needs_data:
        raise ValueError(f"criterion {criterion!r} needs calibration statistics: pass "
                         "calib=calibrate(model, loader)")
    if calib is not None and len(calib.stats) != n:
        raise ValueError(f"calibration has {len(calib.stats)} blocks, the model {n}")
    names = {id(p): k for k, p in model.named_parameters()}
    grad = (lambda p: calib.grads[names[id(p)]]) if calib is not None else None  # noqa: E731
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        b = _Block(units.layers(i), units.groups(i), calib.stats[i] if calib else None, grad,
                   calib.samples if calib else 0, gen)
        raw = crit.block(b)
        for name, v in raw.items():  # NaN scores would rank arbitrarily: stop here
            if not bool(torch.isfinite(torch.as_tensor(v)).all()):
                raise FloatingPointError(f"score: {criterion} scores of block {i} ({name}) are "
                                         "not finite; the weights or calibration statistics "
                                         "hold NaN/inf")
        out.append(units.assemble(i, raw))
    return out


def score_all(model: nn.Module, calib: Calibration | None, criteria=CRITERIA,
              seed: int = 0) -> dict[str, list]:
    """``{criterion: score(model, criterion, calib, seed)}`` for several criteria at once."""
    return {c: score(model, c, calib, seed) for c in criteria}
