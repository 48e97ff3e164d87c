"""The optimizer and the learning-rate schedule of the trainer.

AdamW over two parameter groups (weight decay on the matrices, none on norms and biases), and a
schedule of linear warm-up to the peak LR followed by a cosine down to the terminal LR at the
last step.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from themis_engine.train.config import OptimSection
from themis_engine.train.parallelize import plain_name


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Norm weights, biases and other vectors are not decayed (`name` as in named_parameters)."""
    name = plain_name(name)
    return param.ndim < 2 or name.endswith("bias") or "norm" in name


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """[decayed, not decayed] parameter groups of the trainable parameters, in module order."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if no_weight_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimSection, fused: bool = False) -> torch.optim.AdamW:
    """AdamW with the config's LR, betas and eps; `fused` on CUDA."""
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas),
                             eps=cfg.eps, fused=fused)


def warmup_steps(cfg: OptimSection, total_steps: int) -> int:
    return max(1, math.ceil(cfg.warmup_fraction * total_steps)) if cfg.warmup_fraction > 0 else 0


def lr_at(step: int, total_steps: int, cfg: OptimSection) -> float:
    """The LR of optimizer step `step` (0-based) of `total_steps`: linear warm-up to cfg.lr over
    ceil(warmup_fraction * total_steps) steps, then a cosine from cfg.lr to cfg.terminal_lr reached
    at the last step."""
    warm = warmup_steps(cfg, total_steps)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    span = max(1, total_steps - warm - 1)
    progress = min(1.0, (step - warm) / span)
    return cfg.terminal_lr + (cfg.lr - cfg.terminal_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
