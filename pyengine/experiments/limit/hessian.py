"""Hessian-vector products of the training loss, by double backward over a fixed set of batches.

The batches are cached once: a shuffling loader with ``drop_last`` would otherwise give a
different operator on every call, and Lanczos needs one fixed symmetric matrix. The loss is
the sample-weighted mean over all cached batches, so the operator is the Hessian of the mean
training loss whatever the batch split.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def prunable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The weights one global magnitude threshold runs over: every conv/linear weight (the
    paper's setting; biases and norms stay)."""
    out = [(f"{name}.weight" if name else "weight", m.weight) for name, m in model.named_modules()
           if isinstance(m, PRUNABLE) and m.weight is not None and m.weight.requires_grad]
    if not out:
        raise ValueError(f"{type(model).__name__} has no trainable conv/linear weight to prune")
    return out


def cache_batches(loader: Iterable, max_samples: int | None = None,
                  device: str | torch.device = "cpu", dtype: torch.dtype | None = None
                  ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[(x, y), ...]`` from ``loader``, at most ``max_samples`` samples in all."""
    if max_samples is not None and max_samples <= 0:
        raise ValueError(f"max_samples must be positive, got {max_samples}")
    out, n = [], 0
    for x, y in loader:
        if max_samples is not None and n + len(y) > max_samples:
            x, y = x[:max_samples - n], y[:max_samples - n]
        if len(y) == 0:
            break
        x = x.to(device=device, dtype=dtype if dtype is not None and x.is_floating_point() else None)
        out.append((x, y.to(device)))
        n += len(y)
        if max_samples is not None and n >= max_samples:
            break
    if not out:
        raise ValueError("cache_batches: the loader gave no samples")
    return out


def _double_backward_ok():
    """SDPA's fused CPU/flash kernels have no double backward; the math backend does."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # older torch: nothing to select
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


class HessianOperator:
    """``H @ v`` for the Hessian of the mean loss w.r.t. ``params`` (flattened, concatenated).

    The model is put in eval mode for each product (dropout off, fixed norms), so the
    operator is deterministic and symmetric.
    """

    def __init__(self, model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                 params: Sequence[torch.Tensor] | None = None,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy):
        if not batches:
            raise ValueError("HessianOperator needs at least one batch")
        self.model = model
        self.params = list(params) if params is not None else [p for _, p in prunable_parameters(model)]
        if not self.params:
            raise ValueError("HessianOperator: empty parameter list")
        for p in self.params:
            if not p.requires_grad:
                raise ValueError(f"parameter of shape {tuple(p.shape)} does not require grad")
        self.batches = list(batches)
        self.loss_fn = loss_fn
        self.sizes = [p.numel() for p in self.params]
        self.dim = sum(self.sizes)
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device
        self.samples = sum(len(y) for _, y in self.batches)
        self.calls = 0

    def _split(self, v: torch.Tensor) -> list[torch.Tensor]:
        return [c.view_as(p) for c, p in zip(torch.split(v, self.sizes), self.params)]

    def _batch_grads(self):
        """Yield (gradients with their graph, batch weight) per cached batch, in eval mode;
        the model's train/eval state comes back afterwards."""
        was_training = self.model.training
        self.model.eval()
        try:
            for x, y in self.batches:
                with _double_backward_ok():
                    loss = self.loss_fn(self.model(x), y)
                yield (torch.autograd.grad(loss, self.params, create_graph=True),
                       len(y) / self.samples)
        finally:
            self.model.train(was_training)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        if v.shape != (self.dim,):
            raise ValueError(f"HessianOperator.matvec: v has shape {tuple(v.shape)}, expected "
                             f"({self.dim},)")
        v = v.to(device=self.device, dtype=self.dtype)
        vs = self._split(v)
        out = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        for grads, w in self._batch_grads():
            gv = sum((g * u).sum() for g, u in zip(grads, vs))
            hv = torch.autograd.grad(gv, self.params, allow_unused=True)
            hv = torch.cat([(h if h is not None else torch.zeros_like(p)).reshape(-1)
                            for h, p in zip(hv, self.params)])
            out += hv.detach() * w
        self.calls += 1
        return out

    __call__ = matvec

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``H @ V`` for a block of columns ``V`` [dim, k] in one vectorised double backward
        (``is_grads_batched``); cheap many-probe SLQ for small models."""
        if V.dim() != 2 or V.shape[0] != self.dim:
            raise ValueError(f"HessianOperator.matmat: V has shape {tuple(V.shape)}, expected "
                             f"({self.dim}, k)")
        V = V.to(device=self.device, dtype=self.dtype)
        Vs = [c.T.reshape(V.shape[1], *p.shape) for c, p in zip(torch.split(V, self.sizes), self.params)]
        out = torch.zeros_like(V)
        for grads, w in self._batch_grads():
            hv = torch.autograd.grad(grads, self.params, grad_outputs=Vs,
                                     is_grads_batched=True, allow_unused=True)
            hv = torch.cat([(h if h is not None else torch.zeros(V.shape[1], *p.shape,
                                                                 dtype=p.dtype, device=p.device)
                             ).reshape(V.shape[1], -1) for h, p in zip(hv, self.params)], 1)
            out += hv.T.detach() * w
        self.calls += 1
        return out

    def loss(self) -> float:
        """Mean loss over the cached batches."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                total = sum(float(self.loss_fn(self.model(x), y)) * len(y) for x, y in self.batches)
        finally:
            self.model.train(was_training)
        return total / self.samples

    def row_l1(self, index: int) -> float:
        """L1 norm of row ``index`` of the Hessian (one product with a unit vector)."""
        if not 0 <= index < self.dim:
            raise ValueError(f"row index {index} out of range [0, {self.dim})")
        e = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        e[index] = 1
        return float(self.matvec(e).abs().sum())


def full_hessian(op: HessianOperator) -> torch.Tensor:
    """The dense Hessian, column by column (only for models small enough to hold it)."""
    if op.dim > 20_000:  # 3.2 GB in float64
        raise ValueError(f"full_hessian: {op.dim} parameters is too many for a dense Hessian")
    cols = []
    for i in range(op.dim):
        e = torch.zeros(op.dim, dtype=op.dtype, device=op.device)
        e[i] = 1
        cols.append(op.matvec(e))
    h = torch.stack(cols, 1)
    return 0.5 * (h + h.T)  # exact symmetry; the two halves differ only by rounding
