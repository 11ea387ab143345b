"""The optimiser recipe (MAE, He et al. 2022): AdamW parameter groups and the per-step warmup-cosine schedule.

AdamW (betas 0.9/0.95, decoupled weight decay 0.05, none on norms, biases, position embeddings and class/mask
tokens), per-step linear warmup then cosine decay to ``min_lr``. Layer-wise lr decay for fine-tuning uses timm's
parameter groups (``layer_decay``); each group's ``lr_scale`` multiplies the schedule.
"""
from __future__ import annotations

import math

from torch import nn

__all__ = ["NO_DECAY_NAMES", "no_decay_names", "param_groups", "lr_at_step"]

# Parameters that are never weight-decayed whatever their shape (MAE / timm convention): learned
# position embeddings and special tokens are lookup tables, not weights to shrink.
NO_DECAY_NAMES = ("pos_embed", "decoder_pos_embed", "cls_token", "mask_token", "dist_token", "reg_token")


def no_decay_names(model: nn.Module) -> set[str]:
    """Names of the parameters of ``model`` that get no weight decay."""
    declared = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    names = set()
    for name, param in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if param.ndim <= 1 or name.endswith(".bias") or leaf in NO_DECAY_NAMES or name in declared \
                or leaf in declared:
            names.add(name)
    return names


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float | None = None) -> list[dict]:
    """AdamW parameter groups: no weight decay on norms, biases, 1-D parameters, position embeddings
    and class/mask tokens (and whatever ``model.no_weight_decay()`` lists).

    With ``layer_decay`` the groups come from timm's ``param_groups_layer_decay`` (each with an
    ``lr_scale`` = layer_decay ** depth-from-top) and the same no-decay names. Frozen parameters
    (requires_grad False) are left out.
    """
    no_decay = no_decay_names(model)
    if layer_decay is not None:
        from timm.optim import param_groups_layer_decay

        groups = param_groups_layer_decay(model, weight_decay=weight_decay, no_weight_decay_list=sorted(no_decay),
                                          layer_decay=layer_decay)
        return [{**g, "lr_scale": float(g.get("lr_scale", 1.0))} for g in groups if g["params"]]
    decay, plain = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (plain if name in no_decay else decay).append(param)
    groups = [{"params": decay, "weight_decay": float(weight_decay), "lr_scale": 1.0},
              {"params": plain, "weight_decay": 0.0, "lr_scale": 1.0}]
    return [g for g in groups if g["params"]]


def lr_at_step(step: int, total_steps: int, warmup_steps: int, peak_lr: float, min_lr: float = 0.0) -> float:
    """Learning rate of optimiser step ``step`` (0-based): linear warmup, then cosine to ``min_lr``.

    Warmup rises linearly to ``peak_lr`` at step ``warmup_steps - 1`` (the first step already moves);
    the cosine then falls from ``peak_lr`` and would reach ``min_lr`` at ``total_steps``.
    """
    if total_steps < 1 or not 0 <= warmup_steps < total_steps:
        raise ValueError(f"need 0 <= warmup_steps < total_steps, got warmup_steps={warmup_steps}, "
                         f"total_steps={total_steps}")
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
