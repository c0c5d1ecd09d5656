"""AdamW as in the paper (§5.3): β = (0.9, 0.95), weight decay 0.1 on matrices only."""

from __future__ import annotations

import torch
from torch import nn

# Parameters that are scales, gates or mixing logits rather than weights: never decayed.
NO_DECAY_SUFFIXES = ("beta", "bias")
NO_DECAY_MARKERS = ("norm", "dense.logits", "layernorm")


def decays(name: str, param: torch.Tensor) -> bool:
    """True for weight matrices (linear, embedding, conv); False for norms, biases, eSwish β, dense logits."""
    lowered = name.lower()
    if param.dim() < 2 or lowered.endswith(NO_DECAY_SUFFIXES):
        return False
    return not any(m in lowered for m in NO_DECAY_MARKERS)


def param_groups(model: nn.Module, weight_decay: float, dense_lr_mult: float = 1.0) -> list[dict]:
    """Decayed matrices and undecayed rest; with ``dense_lr_mult != 1`` the dense-residual logits form a third
    group whose ``lr_mult`` scales the scheduled learning rate (the trainer applies it every step)."""
    decay, no_decay, dense = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if dense_lr_mult != 1.0 and "dense.logits" in name:
            dense.append(p)
        else:
            (decay if decays(name, p) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if dense:
        groups.append({"params": dense, "weight_decay": 0.0, "lr_mult": dense_lr_mult})
    return groups


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1,
                    betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                    dense_lr_mult: float = 1.0) -> torch.optim.AdamW:
    fused = all(p.device.type == "cuda" for p in model.parameters())
    return torch.optim.AdamW(param_groups(model, weight_decay, dense_lr_mult), lr=lr, betas=betas, eps=eps,
                             fused=fused or None)
