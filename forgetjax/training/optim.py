"""AdamW with a warmup + cosine/linear/constant schedule over training progress, and global-norm clipping.

The schedule is a function of progress in [0, 1] (the share of the budget used: steps, tokens or FLOPs), so runs
matched on tokens or FLOPs decay their learning rate over the same budget whatever their step count. The learning
rate is applied inside the compiled step, so it can be computed on the host every step without recompiling.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import optax


@dataclasses.dataclass
class OptimizerConfig:
    lr: float = 1e-5
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0

    def validate(self):
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("warmup_ratio must be in [0, 1) and min_lr_ratio in [0, 1]")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0 or null, got {self.max_grad_norm}")


def learning_rate(cfg: OptimizerConfig, progress: float) -> float:
    """lr at a progress in [0, 1]: linear warmup over warmup_ratio, then decay to lr * min_lr_ratio."""
    progress = min(max(progress, 0.0), 1.0)
    if cfg.warmup_ratio > 0 and progress < cfg.warmup_ratio:
        return cfg.lr * progress / cfg.warmup_ratio
    if cfg.schedule == "constant":
        return cfg.lr
    rest = (progress - cfg.warmup_ratio) / (1.0 - cfg.warmup_ratio)
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "linear":
        return cfg.lr - (cfg.lr - floor) * rest
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * rest))


def decay_mask(params) -> object:
    """Weight decay on matrices only (kernels, embeddings, LoRA factors); never on norms or biases."""
    return jax.tree.map(lambda x: getattr(x, "ndim", 0) >= 2, params)


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """Clip -> Adam moments -> decoupled weight decay; the step multiplies the result by -lr."""
    parts = []
    if cfg.max_grad_norm is not None:
        parts.append(optax.clip_by_global_norm(cfg.max_grad_norm))
    parts.append(optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps))
    if cfg.weight_decay:
        parts.append(optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask))
    return optax.chain(*parts)
