"""Hybrid routing (AGF paper): a pruned light expert answers; a zero-cost prior computed from
its own logits sends the inputs it is unsure of to the heavy (dense) expert.

    curve = route_curve(light_logits, heavy_logits, labels, light_macs, heavy_macs, "max_softmax")
    best = pick(curve, heavy_top1)       # cheapest threshold whose accuracy matches the heavy's

An input goes to the heavy expert when its prior is below the threshold. Priors (higher =
the light expert is more confident): ``max_softmax`` (top probability), ``margin`` (top-1 minus
top-2 probability), ``neg_entropy`` (minus the entropy of the softmax). The light expert always
runs, so the overall cost per input is ``light_macs + usage * heavy_macs``, reported relative
to the heavy expert alone.
"""
from __future__ import annotations

import numpy as np
import torch

PRIORS = ("max_softmax", "margin", "neg_entropy")

__all__ = ["PRIORS", "prior", "route_curve", "pick", "pareto", "cross_validate", "logits_of"]


def prior(logits: torch.Tensor, name: str) -> np.ndarray:
    """Confidence of each row of ``logits`` [n, classes] (float64 numpy, higher = surer)."""
    if name not in PRIORS:
        raise ValueError(f"unknown prior {name!r}; choose one of {', '.join(PRIORS)}")
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must be [n, classes >= 2], got {list(logits.shape)}")
    p = torch.softmax(logits.double(), -1)
    if name == "max_softmax":
        v = p.max(-1).values
    elif name == "margin":
        top = p.topk(2, -1).values
        v = top[:, 0] - top[:, 1]
    else:
        v = (p * torch.log(p.clamp_min(1e-300))).sum(-1)
    return v.cpu().numpy()


def _thresholds(values: np.ndarray) -> np.ndarray:
    # every distinct split of the data: below the smallest (nothing routed), between
    # consecutive distinct values, above the largest (everything routed)
    u = np.unique(values)
    mids = (u[:-1] + u[1:]) / 2 if len(u) > 1 else np.array([])
    return np.concatenate([[-np.inf], mids, [np.inf]])


def route_curve(light_logits: torch.Tensor, heavy_logits: torch.Tensor, labels: torch.Tensor,
                light_macs: float, heavy_macs: float, prior_name: str = "max_softmax",
                thresholds=None) -> list[dict]:
    """Accuracy, heavy usage and relative cost at every threshold (all distinct splits by
    default), sorted by threshold ascending (usage ascending)."""
    if light_logits.shape != heavy_logits.shape or light_logits.shape[0] != labels.shape[0]:
        raise ValueError(f"logits {list(light_logits.shape)} / {list(heavy_logits.shape)} and "
                         f"labels {list(labels.shape)} do not match")
    if heavy_macs <= 0 or light_macs < 0:
        raise ValueError(f"MACs must be positive, got light {light_macs}, heavy {heavy_macs}")
    y = labels.cpu().numpy()
    lc = light_logits.argmax(-1).cpu().numpy() == y
    hc = heavy_logits.argmax(-1).cpu().numpy() == y
    v = prior(light_logits, prior_name)
    ts = _thresholds(v) if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    out = []
    for t in np.sort(ts):
        send = v < t
        usage = float(send.mean())
        acc = float(np.where(send, hc, lc).mean() * 100)
        out.append({"threshold": float(t), "usage": usage, "top1": acc,
                    "cost": (light_macs + usage * heavy_macs) / heavy_macs})
    return out


def pick(curve: list[dict], target_top1: float, tol: float = 0.0) -> dict | None:
    """The cheapest point with top-1 >= ``target_top1 - tol`` (None if there is none)."""
    ok = [p for p in curve if p["top1"] >= target_top1 - tol - 1e-9]
    return min(ok, key=lambda p: (p["cost"], -p["top1"])) if ok else None


def pareto(curve: list[dict]) -> list[dict]:
    """Points no other point beats on both cost (lower) and top-1 (higher), by cost."""
    pts = sorted(curve, key=lambda p: (p["cost"], -p["top1"]))
    front, best = [], -np.inf
    for p in pts:
        if p["top1"] > best:
            front.append(p)
            best = p["top1"]
    return front


def cross_validate(light_logits, heavy_logits, labels, light_macs, heavy_macs, prior_name,
                   folds: int = 2, seed: int = 0) -> dict:
    """Honest estimate: pick the threshold on one part of the data (matching the heavy
    expert's accuracy there), report usage / top-1 / cost on the held-out rest; averaged."""
    n = labels.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    parts = perm.chunk(folds)
    rows = []
    for k in range(folds):
        test = parts[k]
        fit = torch.cat([parts[j] for j in range(folds) if j != k])
        hfit = float((heavy_logits[fit].argmax(-1) == labels[fit]).double().mean() * 100)
        best = pick(route_curve(light_logits[fit], heavy_logits[fit], labels[fit], light_macs,
                                heavy_macs, prior_name), hfit)
        ev = route_curve(light_logits[test], heavy_logits[test], labels[test], light_macs,
                         heavy_macs, prior_name, thresholds=[best["threshold"]])[0]
        htest = float((heavy_logits[test].argmax(-1) == labels[test]).double().mean() * 100)
        rows.append({"threshold": best["threshold"], "usage": ev["usage"], "top1": ev["top1"],
                     "cost": ev["cost"], "heavy_top1": htest})
    mean = lambda k: float(np.mean([r[k] for r in rows]))  # noqa: E731
    return {"folds": rows, "usage": mean("usage"), "top1": mean("top1"), "cost": mean("cost"),
            "heavy_top1": mean("heavy_top1")}


@torch.no_grad()
def logits_of(model, loader, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of ``model`` over ``loader`` (eval mode), on the CPU."""
    was = model.training
    model.eval()
    outs, ys = [], []
    try:
        for x, y in loader:
            outs.append(model(x.to(device)).float().cpu())
            ys.append(y)
    finally:
        model.train(was)
    if not outs:
        raise ValueError("logits_of: the loader is empty")
    return torch.cat(outs), torch.cat(ys)
