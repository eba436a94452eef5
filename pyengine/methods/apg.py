"""Optimizers for sparse scale factors: SSS's modified Accelerated Proximal Gradient (APG).

SSS (Huang & Wang, ECCV 2018) learns a scale factor per head, neuron, channel or residual
block under ``gamma * ||lambda||_1``. The L1 term is not differentiable, so it is handled by a
proximal step (soft-thresholding), which is what produces *exact* zeros: the structure to
remove. The modified APG needs one forward/backward per step because the parameter itself
holds the look-ahead point ``lambda'`` (the gradient is taken there):

    z       = S_{lr*gamma}(lambda' - lr * grad(lambda'))     # proximal gradient step
    v       = z - lambda' + mu * v                           # == z_t - z_{t-1}
    lambda' = z + mu * v                                     # look-ahead for the next step

with ``S_a(x) = sign(x) * max(|x| - a, 0)``. This is FISTA with a constant momentum ``mu``:
``z`` is the iterate, ``lambda'`` the extrapolated point. ``nonneg=True`` uses the prox of
L1 plus the non-negativity constraint (``max(x - a, 0)``) and clamps ``lambda' >= 0`` as the
reference code does; with it a factor that the prox zeroes is exactly zero at once (without
it the look-ahead overshoots past zero for one step, then settles at exactly zero).

Two mistakes of a known port are avoided on purpose: the L1 term must *not* also be added to
the loss (the prox already applies it; adding it would double-count gamma), and the
momentum buffer is written back to the optimizer state every step.
"""
from __future__ import annotations

import torch

__all__ = ["APG", "soft_threshold"]


def soft_threshold(x: torch.Tensor, a: float, nonneg: bool = False) -> torch.Tensor:
    """``S_a(x) = sign(x) max(|x| - a, 0)``; with ``nonneg`` the prox of L1 + (x >= 0)."""
    if nonneg:
        return (x - a).clamp_min(0)
    return torch.sign(x) * (x.abs() - a).clamp_min(0)


class APG(torch.optim.Optimizer):
    """Modified Accelerated Proximal Gradient with soft-thresholding (SSS).

    Args:
        params: the scale factors (iterable of tensors or param groups). No weight decay is
            applied to them, by design.
        lr: step size ``eta`` (a scheduler may change ``param_groups[i]["lr"]``).
        gamma: L1 strength; the threshold of each step is ``lr * gamma``.
        momentum: ``mu`` in [0, 1); 0 gives plain ISTA (proximal gradient descent).
        nonneg: keep the factors >= 0.

    State per parameter: ``momentum_buffer`` (``v``) and ``prox`` (the last ``z``, the iterate
    itself; :meth:`finalize` writes it into the parameter at the end of training).
    """

    def __init__(self, params, lr: float, gamma: float, momentum: float = 0.9,
                 nonneg: bool = False):
        for name, v in (("lr", lr), ("gamma", gamma)):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
                raise ValueError(f"APG: {name} must be a number >= 0, got {v!r}")
        if not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
            raise ValueError(f"APG: momentum must be in [0, 1), got {momentum!r}")
        super().__init__(params, dict(lr=float(lr), gamma=float(gamma),
                                      momentum=float(momentum), nonneg=bool(nonneg)))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, gamma, mu, nonneg = group["lr"], group["gamma"], group["momentum"], group["nonneg"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("APG does not support sparse gradients")
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                v = state["momentum_buffer"]
                z = soft_threshold(p - lr * p.grad, lr * gamma, nonneg)
                v.mul_(mu).add_(z).sub_(p)          # v = z - lambda' + mu v
                state["prox"] = z
                p.copy_(z + mu * v)                 # lambda' = z + mu v
                if nonneg:
                    p.clamp_(min=0)
        return loss

    @torch.no_grad()
    def finalize(self) -> None:
        """Write the last proximal point ``z`` (exact zeros included) into each parameter and
        clear the momentum: call it once training of the factors is over."""
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p, {})
                if "prox" in state:
                    p.copy_(state["prox"])
                if "momentum_buffer" in state:
                    state["momentum_buffer"].zero_()
