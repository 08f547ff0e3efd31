"""Training budgets in steps, tokens, examples or model FLOPs, so methods can be matched on compute or data.

Accounting: a training token is a real (non-padding) token of a training forward pass; its cost is 3 x the forward
FLOPs per token (forward + backward, the usual 6N convention). Methods add the FLOPs they spend outside the step
(rollouts, reference-model forwards) as `extra_flops`. The last offline batch is trimmed so that token, example and
FLOPs budgets end exactly at the budget.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Literal

import numpy as np

BudgetKind = Literal["steps", "tokens", "examples", "flops"]


@dataclasses.dataclass
class BudgetConfig:
    kind: BudgetKind = "steps"
    value: float = 100

    def validate(self):
        if self.value <= 0:
            raise ValueError(f"budget value must be > 0, got {self.value}")


@dataclasses.dataclass
class BudgetUsage:
    steps: int = 0
    tokens: int = 0
    examples: int = 0
    flops: float = 0.0

    def amount(self, kind: BudgetKind) -> float:
        return float(getattr(self, kind))

    def add(self, tokens: int, examples: int, flops: float) -> None:
        self.steps += 1
        self.tokens += int(tokens)
        self.examples += int(examples)
        self.flops += float(flops)


def progress(cfg: BudgetConfig, usage: BudgetUsage) -> float:
    return min(usage.amount(cfg.kind) / cfg.value, 1.0)


def exhausted(cfg: BudgetConfig, usage: BudgetUsage) -> bool:
    return usage.amount(cfg.kind) >= cfg.value - 1e-9


def trim_tokens(batch: dict[str, np.ndarray], keep_tokens: int) -> dict[str, np.ndarray]:
    """Keep the first `keep_tokens` real tokens in row-major order; later tokens become padding (masked out of
    attention and loss). Causal attention means the kept tokens are unaffected."""
    mask = batch["attention_mask"].astype(bool)
    keep = (np.cumsum(mask.reshape(-1)) <= keep_tokens).reshape(mask.shape) & mask
    out = dict(batch)
    out["attention_mask"] = keep
    out["loss_mask"] = batch["loss_mask"] * keep
    if "segment_ids" in batch:
        out["segment_ids"] = np.where(keep, batch["segment_ids"], 0)
    return out


def trim_rows(batch: dict[str, np.ndarray], keep_rows: int) -> dict[str, np.ndarray]:
    """Mask whole rows beyond `keep_rows` (shapes stay fixed so nothing recompiles)."""
    out = dict(batch)
    rows = np.arange(next(iter(batch.values())).shape[0]) < keep_rows
    for key, value in batch.items():
        if key.endswith(("attention_mask", "loss_mask")) and value.ndim == 2:
            out[key] = value * rows[:, None].astype(value.dtype)
        elif key.endswith("segment_ids") and value.ndim == 2:
            out[key] = np.where(rows[:, None], value, 0)
        elif key.endswith("example_mask"):
            out[key] = value * rows.astype(value.dtype)
    return out


def tokens_within(cfg: BudgetConfig, usage: BudgetUsage, flops_per_token: float) -> float:
    """How many more training tokens the budget allows (inf for step/example budgets)."""
    remaining = cfg.value - usage.amount(cfg.kind)
    if cfg.kind == "tokens":
        return remaining
    if cfg.kind == "flops":
        return math.floor(remaining / flops_per_token)
    return math.inf
