"""The predicted pruning threshold (Zhang et al., NeurIPS 2024).

With eps the spread (std) of the per-batch training loss and lambda_i the Hessian's
eigenvalues, the sublevel set {w : L(w) <= L(w*) + eps} has radius r_i^2 = 2 eps / |lambda_i|
along eigenvector i (absolute values: the Hessian of a trained net is not PSD). Its
normalised squared Gaussian width at distance R is

    gw(R) = sum_i p_i r_i^2 / (R^2 + r_i^2) / sum_i p_i = sum_i p_i 2eps / (2eps + R^2 |lambda_i|)

with p the spectral density (SLQ nodes and weights). One-shot global magnitude pruning to
ratio rho moves the weights by R(rho) = ||w - w_pruned(rho)||_2; the predicted limit is the
rho on the grid minimising |gw(R(rho)) - rho|.

Flat directions: Hessian rows with L1 norm < 1e-7 are exact zero eigen-directions that a
few Lanczos steps smear into small nodes. The rows of the weights at magnitude quantiles are
checked; their flat fraction f is added as mass at eigenvalue 0 (gw -> (1-f) gw + f).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pyengine.experiments.limit.slq import Spectrum


def gaussian_width(nodes: np.ndarray, weights: np.ndarray, R, eps: float,
                   flat: float = 0.0) -> np.ndarray:
    """Normalised squared Gaussian width gw(R) for an array of distances ``R``."""
    if eps <= 0:
        raise ValueError(f"eps must be positive, got {eps}")
    if not 0.0 <= flat < 1.0:
        raise ValueError(f"flat fraction must be in [0, 1), got {flat}")
    nodes = np.abs(np.asarray(nodes, dtype=np.float64))
    weights = np.asarray(weights, dtype=np.float64)
    if weights.sum() <= 0:
        raise ValueError("spectral weights sum to zero")
    R2 = np.asarray(R, dtype=np.float64)[..., None] ** 2
    # r^2/(R^2 + r^2) written as 2eps/(2eps + R^2|lambda|): no division by a zero eigenvalue
    gw = (weights * (2 * eps) / (2 * eps + R2 * nodes)).sum(-1) / weights.sum()
    return (1 - flat) * gw + flat


def _flat_weights(params: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


def magnitude_order(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """Indices of all weights (flattened, concatenated) by increasing magnitude; ties by index,
    so a ratio prunes exactly ``floor(ratio * n)`` weights."""
    w = _flat_weights(params).abs().double()
    return torch.sort(w, stable=True).indices


def count(ratio: float, n: int) -> int:
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"pruning ratio must be in [0, 1], got {ratio}")
    return int(np.floor(ratio * n + 1e-9))


def pruned_distance(params: Sequence[torch.Tensor], ratios: Iterable[float]) -> np.ndarray:
    """R(rho) = ||w - w_pruned(rho)||_2 for one-shot global magnitude pruning."""
    w = _flat_weights(params).double()
    sq = torch.sort(w.abs(), stable=True).values ** 2
    csum = torch.cat([torch.zeros(1, dtype=sq.dtype, device=sq.device), torch.cumsum(sq, 0)])
    return np.array([float(csum[count(r, w.numel())].sqrt()) for r in ratios])


@torch.no_grad()
def loss_spread(model: nn.Module, loader, device: str | torch.device = "cpu",
                max_batches: int | None = None) -> tuple[float, float, list[float]]:
    """``(mean, std, per_batch)`` of the mean training loss per batch (eval mode); the std
    is the paper's eps."""
    was_training = model.training
    model.eval()
    losses = []
    try:
        for i, (x, y) in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            dtype = next(model.parameters()).dtype
            losses.append(float(F.cross_entropy(model(x.to(device, dtype)), y.to(device))))
    finally:
        model.train(was_training)
    if len(losses) < 2:
        raise ValueError(f"loss_spread needs at least 2 batches, the loader gave {len(losses)}")
    return float(np.mean(losses)), float(np.std(losses)), losses


def flat_fraction(op, params: Sequence[torch.Tensor], rows: int = 100, tol: float = 1e-7,
                  progress: bool = False) -> tuple[float, list[dict]]:
    """Fraction of sampled Hessian rows with L1 norm < ``tol``; the rows are those of the
    weights at magnitude quantiles 0, 1/rows, ..., (rows-1)/rows (the weight each pruning ratio
    removes last), as in the paper."""
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    from tqdm import tqdm
    order = magnitude_order(params)
    n = order.numel()
    w = _flat_weights(params)
    out = []
    for i in tqdm(range(rows), desc="hessian rows", disable=not progress, leave=False):
        idx = int(order[min(n - 1, count(i / rows, n))])
        out.append({"quantile": i / rows, "index": idx, "weight": float(w[idx]),
                    "row_l1": op.row_l1(idx)})
    flat = sum(r["row_l1"] < tol for r in out) / rows
    return float(flat), out


@dataclass
class Prediction:
    ratio: float                 # predicted limit (flat correction included)
    ratio_uncorrected: float     # without the flat-direction correction
    eps: float
    flat: float
    ratios: list[float]
    R: list[float]
    gw: list[float]
    gw_uncorrected: list[float]
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def solve(ratios: Sequence[float], gw: np.ndarray) -> float:
    """The grid ratio minimising |gw(R(rho)) - rho| (the smallest on ties)."""
    diff = np.abs(np.asarray(gw) - np.asarray(ratios))
    return float(np.asarray(ratios)[int(np.argmin(diff))])


def predict(spectrum: Spectrum, params: Sequence[torch.Tensor], eps: float,
            ratios: Sequence[float], flat: float = 0.0,
            R: Sequence[float] | None = None) -> Prediction:
    """Predicted threshold on the grid ``ratios``; ``R`` overrides the unstructured distances
    (the structured extension passes its own)."""
    ratios = [float(r) for r in ratios]
    R = np.asarray(R, dtype=np.float64) if R is not None else pruned_distance(params, ratios)
    if len(R) != len(ratios):
        raise ValueError(f"{len(R)} distances for {len(ratios)} ratios")
    nodes, weights = spectrum.flat()
    gw = gaussian_width(nodes, weights, R, eps, flat)
    gw0 = gaussian_width(nodes, weights, R, eps, 0.0)
    return Prediction(solve(ratios, gw), solve(ratios, gw0), float(eps), float(flat), ratios,
                      R.tolist(), gw.tolist(), gw0.tolist())
