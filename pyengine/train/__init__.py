"""Training: the one trainer every learned method uses (``fit``), data, checkpoints, DDP.

    from pyengine.train import fit, evaluate
    fit(model, train_loader, val_loader, epochs=10, lr=1e-3, teacher=dense, kd_alpha=0.5)

trainer (fit, evaluate, recipes), data (digits and image folders through timm's pipeline),
checkpoint (atomic safetensors + JSON checkpoints, exact resume), distributed (torchrun / DDP).
"""
from pyengine.train.trainer import (DIGITS_RECIPE, default_param_groups, evaluate, fit, kd_loss,
                                    seed_everything, train_digits)

__all__ = ["fit", "evaluate", "DIGITS_RECIPE", "default_param_groups", "kd_loss",
           "seed_everything", "train_digits"]
