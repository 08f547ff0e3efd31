"""Training budgets in steps, tokens, examples or model FLOPs, so methods can be matched on compute or data.

Accounting: a training token is a real (non-padding) token of a training forward pass; its cost is 3 x the forward
FLOPs per token (forward + backward, the usual 6N convention). Methods add the FLOPs they spend outside the step by
component (`EXTRA_COMPONENTS`: rollout = sampling with the policy or its starting point, prefill + decode; teacher =
a teacher's generations and scoring; reference = reference-model log-probs and the KL to the start model,
`training/kl_monitor.py`). Teacher data generated once and shared
by cells (a teacher stage) is charged pro rata to the distinct examples a cell draws (`SFTBatchSource`): each cell pays
for the teacher compute behind the data it trains on, whether or not another cell built the stage first, and a cell
that uses a tenth of the stage pays a tenth of it. The last offline batch is
trimmed so that token, example and FLOPs budgets end exactly at the budget.

Data use: a batch source that knows its data reports `DataUse` (distinct units in the training set, units consumed),
from which a run records epochs over its data; `max_epochs` (optional) flags a run that repeated its data more
often, and a source that ends before the budget flags the run as having exhausted its data (`data_flags`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Literal

import numpy as np

BudgetKind = Literal["steps", "tokens", "examples", "flops"]
EXTRA_COMPONENTS = ("rollout", "teacher", "reference")
FLOP_COMPONENTS = ("train", *EXTRA_COMPONENTS)
EXCEEDED_MAX_EPOCHS = "exceeded_max_epochs"
DATA_EXHAUSTED = "data_exhausted"


@dataclasses.dataclass
class BudgetConfig:
    """`max_epochs`: repeating the training data more often than this is flagged (training goes on to the budget)."""

    kind: BudgetKind = "steps"
    value: float = 100
    max_epochs: float | None = None

    def validate(self):
        if self.value <= 0:
            raise ValueError(f"budget value must be > 0, got {self.value}")
        if self.max_epochs is not None and self.max_epochs <= 0:
            raise ValueError(f"budget max_epochs must be > 0 or null, got {self.max_epochs}")


def check_extra_flops(extra: dict[str, float]) -> dict[str, float]:
    """`extra` with float values, after checking its keys are components of `EXTRA_COMPONENTS`."""
    unknown = sorted(set(extra) - set(EXTRA_COMPONENTS))
    if unknown:
        raise ValueError(f"extra FLOPs components {unknown} are not among {list(EXTRA_COMPONENTS)}")
    return {name: float(value) for name, value in extra.items()}


@dataclasses.dataclass
class BudgetUsage:
    """What a run spent: steps, training tokens and examples (replay rows included, and counted apart), and FLOPs in
    total and by `FLOP_COMPONENTS`."""

    steps: int = 0
    tokens: int = 0
    examples: int = 0
    flops: float = 0.0
    flops_by_component: dict[str, float] = dataclasses.field(
        default_factory=lambda: dict.fromkeys(FLOP_COMPONENTS, 0.0))
    replay_tokens: int = 0  # of `tokens`: those of replay rows (`forgetjax.training.replay`)
    replay_examples: int = 0  # of `examples`: those of replay rows

    def amount(self, kind: BudgetKind) -> float:
        return float(getattr(self, kind))

    def add(self, tokens: int, examples: int, train_flops: float, extra_flops: dict[str, float]) -> None:
        self.steps += 1
        self.tokens += int(tokens)
        self.examples += int(examples)
        parts = {"train": float(train_flops), **check_extra_flops(extra_flops)}
        for name, value in parts.items():
            self.flops_by_component[name] = self.flops_by_component.get(name, 0.0) + value
        self.flops += sum(parts.values())


@dataclasses.dataclass
class DataUse:
    """A batch source's data: `size` distinct units (records, pairs or problems), `consumed` units drawn so far."""

    size: int
    consumed: int

    def summary(self) -> dict[str, float]:
        """unique units seen, the data size and epochs over it (consumed / size)."""
        return {"unique": min(self.consumed, self.size), "size": self.size,
                "epochs": self.consumed / self.size if self.size else 0.0}


def data_flags(cfg: BudgetConfig, epochs: float | None, exhausted_data: bool) -> list[str]:
    """Why a run's data use needs a look: it repeated its data more than `max_epochs` times, or its data ended
    before the budget did."""
    flags = []
    if cfg.max_epochs is not None and epochs is not None and epochs > cfg.max_epochs + 1e-9:
        flags.append(EXCEEDED_MAX_EPOCHS)
    if exhausted_data:
        flags.append(DATA_EXHAUSTED)
    return flags


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
