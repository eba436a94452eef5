"""The pruning limit (Zhang et al., NeurIPS 2024): how far one-shot global magnitude pruning
can go before accuracy drops, predicted from the Hessian spectrum and measured directly.

    weights = [p for _, p in prunable_parameters(model)]   # all conv/linear weights
    op = HessianOperator(model, cache_batches(train_loader), weights)  # H @ v by double backward
    spectrum = slq(op, iters=64, probes=2)                 # stochastic Lanczos quadrature
    _, eps, _ = loss_spread(model, train_loader)           # std of the per-batch loss
    flat, _ = flat_fraction(op, weights)                   # exactly flat Hessian rows
    pred = predict(spectrum, weights, eps, ratios, flat)   # |gw(R(rho)) - rho| = min
    meas = measure(model, val_loader, ratios)              # largest ratio keeping the accuracy
"""
from pyengine.experiments.limit.hessian import HessianOperator, cache_batches, full_hessian, prunable_parameters
from pyengine.experiments.limit.measured import Curve, measure, measure_structured
from pyengine.experiments.limit.models import digits_mlp, digits_vit_small
from pyengine.experiments.limit.slq import Spectrum, lanczos, slq
from pyengine.experiments.limit.threshold import (Prediction, flat_fraction, gaussian_width, loss_spread, predict,
                        pruned_distance)

__all__ = ["HessianOperator", "cache_batches", "full_hessian", "prunable_parameters", "Spectrum",
           "lanczos", "slq", "Prediction", "flat_fraction", "gaussian_width", "loss_spread",
           "predict", "pruned_distance", "Curve", "measure", "measure_structured", "digits_mlp",
           "digits_vit_small"]
