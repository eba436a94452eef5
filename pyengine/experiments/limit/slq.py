"""Stochastic Lanczos quadrature: the spectral density of a symmetric operator from products.

Each probe v (Rademacher, normalised) runs ``iters`` Lanczos steps with full
reorthogonalisation; the tridiagonal T's eigenvalues theta_j are the quadrature nodes and the
squared first components of its eigenvectors their weights, so that
``sum_j w_j f(theta_j) ~= v^T f(H) v`` (exact for polynomials of degree < 2*iters). Averaging
over probes estimates ``tr f(H) / n``, i.e. integrals against the eigenvalue density.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm


def lanczos(matvec: Callable[[torch.Tensor], torch.Tensor], v0: torch.Tensor, iters: int,
            reorthogonalize: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``(alpha, beta)`` of the Lanczos tridiagonal after at most ``iters`` steps from ``v0``.

    Stops early when the Krylov space becomes invariant (beta ~ 0): the quadrature is then
    exact for that probe. Full reorthogonalisation (classical Gram-Schmidt, twice) keeps the
    basis orthogonal, so no ghost copies of the outlying eigenvalues appear.
    """
    if iters < 1:
        raise ValueError(f"lanczos: iters must be >= 1, got {iters}")
    if v0.dim() != 1:
        raise ValueError(f"lanczos: v0 must be a vector, got shape {tuple(v0.shape)}")
    n = v0.numel()
    m = min(iters, n)
    norm = v0.norm()
    if not norm > 0:
        raise ValueError("lanczos: the start vector is zero")
    eps = torch.finfo(v0.dtype).eps
    Q = torch.zeros(m, n, dtype=v0.dtype, device=v0.device)
    q = v0 / norm
    alpha, beta = [], []
    for j in range(m):
        Q[j] = q
        w = matvec(q).to(v0.dtype)
        a = torch.dot(q, w)
        w = w - a * q
        if j > 0:
            w = w - beta[-1] * Q[j - 1]
        if reorthogonalize:
            for _ in range(2):
                w = w - Q[:j + 1].T @ (Q[:j + 1] @ w)
        alpha.append(float(a))
        if j == m - 1:
            break
        b = w.norm()
        scale = max(abs(float(a)), beta[-1] if beta else 0.0, 1e-300)
        if float(b) <= 100 * eps * scale:
            break  # invariant subspace: the quadrature for this probe is already exact
        beta.append(float(b))
        q = w / b
    return np.asarray(alpha, dtype=np.float64), np.asarray(beta, dtype=np.float64)


def lanczos_block(matmat: Callable[[torch.Tensor], torch.Tensor], V0: torch.Tensor, iters: int,
                  reorthogonalize: bool = True) -> list[tuple[np.ndarray, np.ndarray]]:
    """:func:`lanczos` for the columns of ``V0`` [n, k] at once (one ``matmat`` per step);
    each column is an independent recurrence and stops on its own breakdown."""
    if iters < 1:
        raise ValueError(f"lanczos: iters must be >= 1, got {iters}")
    if V0.dim() != 2:
        raise ValueError(f"lanczos_block: V0 must be [n, k], got shape {tuple(V0.shape)}")
    n, k = V0.shape
    m = min(iters, n)
    norms = V0.norm(dim=0)
    if not bool((norms > 0).all()):
        raise ValueError("lanczos_block: a start vector is zero")
    eps = torch.finfo(V0.dtype).eps
    Q = torch.zeros(m, n, k, dtype=V0.dtype, device=V0.device)
    q = V0 / norms
    alpha = np.zeros((m, k))
    beta = np.zeros((max(m - 1, 0), k))
    length = np.full(k, m)
    active = torch.ones(k, dtype=torch.bool, device=V0.device)
    for j in range(m):
        Q[j] = q
        W = matmat(q).to(V0.dtype)
        a = (q * W).sum(0)
        W = W - a * q
        if j > 0:
            W = W - torch.as_tensor(beta[j - 1], dtype=V0.dtype, device=V0.device) * Q[j - 1]
        if reorthogonalize:
            for _ in range(2):
                C = (Q[:j + 1] * W).sum(1)  # [j+1, k]: per-column projections
                W = W - (Q[:j + 1] * C[:, None, :]).sum(0)
        alpha[j] = np.where(active.cpu().numpy(), a.cpu().numpy(), alpha[j])
        if j == m - 1:
            break
        b = W.norm(dim=0)
        prev = torch.as_tensor(beta[j - 1] if j > 0 else np.zeros(k), dtype=V0.dtype, device=V0.device)
        scale = torch.maximum(a.abs(), prev).clamp_min(1e-300)
        stop = active & (b <= 100 * eps * scale)
        length[stop.cpu().numpy()] = j + 1
        active = active & ~stop
        if not bool(active.any()):
            break
        beta[j] = torch.where(active, b, torch.zeros_like(b)).cpu().numpy()
        q = torch.where(active, W / torch.where(active, b, torch.ones_like(b)), torch.zeros_like(W))
    return [(alpha[:length[c], c].copy(), beta[:length[c] - 1, c].copy()) for c in range(k)]


def tridiagonal_quadrature(alpha: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gauss quadrature nodes and weights (weights sum to 1) from a Lanczos tridiagonal."""
    k = len(alpha)
    T = np.diag(alpha)
    if k > 1:
        T += np.diag(beta[:k - 1], 1) + np.diag(beta[:k - 1], -1)
    theta, U = np.linalg.eigh(T)
    return theta, U[0] ** 2


@dataclass
class Spectrum:
    """SLQ result: per probe, nodes (Ritz values) and weights that sum to 1."""

    nodes: list[np.ndarray]
    weights: list[np.ndarray]
    dim: int
    iters: int = 0
    meta: dict = field(default_factory=dict)

    @property
    def probes(self) -> int:
        return len(self.nodes)

    def flat(self) -> tuple[np.ndarray, np.ndarray]:
        """All nodes and their weights, normalised so the weights sum to 1 over all probes."""
        return (np.concatenate(self.nodes),
                np.concatenate(self.weights) / self.probes)

    def moment(self, k: int, absolute: bool = False) -> float:
        """Estimate of ``(1/n) tr H^k`` (``|H|^k`` with ``absolute``)."""
        x, w = self.flat()
        if absolute:
            x = np.abs(x)
        return float(np.sum(w * x ** k))

    def density(self, grid: np.ndarray, sigma: float | None = None) -> np.ndarray:
        """Gaussian-smoothed eigenvalue density on ``grid`` (integrates to ~1)."""
        x, w = self.flat()
        grid = np.asarray(grid, dtype=np.float64)
        if sigma is None:
            span = float(x.max() - x.min()) if x.size > 1 else 1.0
            sigma = max(span, 1e-12) / 200
        d = np.exp(-0.5 * ((grid[:, None] - x[None, :]) / sigma) ** 2) @ w
        return d / (sigma * math.sqrt(2 * math.pi))

    def to_dict(self) -> dict:
        return {"dim": self.dim, "iters": self.iters, "probes": self.probes,
                "nodes": [n.tolist() for n in self.nodes],
                "weights": [w.tolist() for w in self.weights], **self.meta}


def slq(op: Callable[[torch.Tensor], torch.Tensor], iters: int = 64, probes: int = 1,
        seed: int = 0, dim: int | None = None, dtype: torch.dtype | None = None,
        device: str | torch.device | None = None, reorthogonalize: bool = True,
        progress: bool = False, block: int = 1,
        matmat: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Spectrum:
    """Stochastic Lanczos quadrature of the symmetric operator ``op`` (a callable ``v -> Hv``;
    a :class:`HessianOperator` carries its own ``dim``/``dtype``/``device``).

    ``block > 1`` runs that many probes at once through ``matmat`` (``V -> HV``; by default
    ``op.matmat``): the same probes and, up to rounding, the same result as one at a time.
    """
    if probes < 1:
        raise ValueError(f"slq: probes must be >= 1, got {probes}")
    if block < 1:
        raise ValueError(f"slq: block must be >= 1, got {block}")
    dim = dim if dim is not None else getattr(op, "dim", None)
    if dim is None:
        raise ValueError("slq: give dim= for a plain callable")
    dtype = dtype or getattr(op, "dtype", torch.float32)
    device = device or getattr(op, "device", "cpu")
    g = torch.Generator().manual_seed(seed)
    nodes, weights = [], []
    if block > 1:
        matmat = matmat or getattr(op, "matmat", None)
        if matmat is None:
            raise ValueError("slq: block > 1 needs an operator with matmat (or matmat=)")
        for start in tqdm(range(0, probes, block), desc="slq probe blocks", disable=not progress,
                          leave=False):
            k = min(block, probes - start)
            V = (torch.randint(0, 2, (k, dim), generator=g) * 2 - 1).T.to(dtype=dtype, device=device)
            for a, b in lanczos_block(matmat, V, iters, reorthogonalize):
                theta, w = tridiagonal_quadrature(a, b)
                nodes.append(theta)
                weights.append(w)
        return Spectrum(nodes, weights, dim, iters)
    for _ in tqdm(range(probes), desc="slq probes", disable=not progress, leave=False):
        v = (torch.randint(0, 2, (dim,), generator=g) * 2 - 1).to(dtype=dtype, device=device)
        a, b = lanczos(op, v, iters, reorthogonalize)
        theta, w = tridiagonal_quadrature(a, b)
        nodes.append(theta)
        weights.append(w)
    return Spectrum(nodes, weights, dim, iters)
