"""Cost: analytical MACs, FLOPs, bytes and params per layer with a roofline label (model), the
differentiable expected cost of gate probabilities (expected), and FLOPs as torch counts them
whatever attention kernel runs (flop_count).

    c = pyengine.cost(compact, batch=64, dtype=torch.bfloat16, device="h100")
"""
from pyengine.cost.flop_count import count_flops
from pyengine.cost.peaks import PEAKS, Peaks, peaks_for
from pyengine.cost.model import Cost, Layer, cost

__all__ = ["cost", "Cost", "Layer", "Peaks", "PEAKS", "peaks_for", "count_flops"]
