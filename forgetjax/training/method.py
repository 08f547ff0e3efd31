"""What a post-training method is: a pure loss plus a source of batches. The training loop knows nothing else.

Offline methods draw batches from a prepared dataset (SFT targets, preference pairs with cached reference
log-probs); online methods produce them by sampling with the current parameters and scoring with a verifier.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Any, Callable, Protocol

import jax
import numpy as np

from forgetjax.training.budget import DataUse


@dataclasses.dataclass
class Batch:
    """One global batch: host arrays, and what it costs against the budget (tokens, examples and FLOPs always count
    the whole global batch). `extra_flops`: FLOPs spent outside the train step, by component
    (`budget.EXTRA_COMPONENTS`: rollout, teacher, reference). `process_local`: the arrays hold only this process's rows
    (`forgetjax.distributed.process_rows`), as per-process data pipelines load them; otherwise every process holds
    the whole batch. `replay_rows` marks the rows of replay data (`forgetjax.training.replay`)."""

    arrays: dict[str, np.ndarray]
    tokens: int
    examples: int
    extra_flops: dict[str, float] = dataclasses.field(default_factory=dict)
    info: dict[str, float] = dataclasses.field(default_factory=dict)
    process_local: bool = False
    replay_rows: np.ndarray | None = None  # bool per held row: drawn from the replay data (`train.replay`)

    @property
    def extra_total(self) -> float:
        return float(sum(self.extra_flops.values()))


class BatchSource(Protocol):
    def next_batch(self, context: "StepContext") -> Batch | None:
        """The next batch, or None when the data is exhausted."""

    def get_state(self) -> dict:
        """JSON-serialisable position, saved with every checkpoint."""

    def set_state(self, state: dict) -> None:
        """Resume from a saved position."""

    def data_use(self) -> "DataUse | None":
        """Its data's size and how much of it was drawn (None when the source does not know: the run then records
        no epochs)."""

    def replay_use(self) -> "DataUse | None":
        """The replay records' size and how many were drawn (only sources of methods that replay)."""


@dataclasses.dataclass
class StepContext:
    """What a batch source may use: the current model (online methods sample from it), the step, a PRNG key."""

    current_model: Callable[[], Any]
    step: int
    rng: jax.Array
    mesh: Any = None


class Method(abc.ABC):
    """A post-training method. `trim` says how the last batch is cut to fit a token/example budget; `replays`
    whether it can train with replay rows (SFT rows of replay data in every batch)."""

    name: str = "method"
    trim: str = "tokens"  # "tokens" (SFT-style rows), "pairs" (whole rows of a paired batch) or "none"
    kl_contexts: tuple[str, ...] = ("",)  # array-name prefixes of the contexts the KL to the start is measured on
    replays: bool = False  # its batch source mixes `train.replay` rows in (`forgetjax.training.replay`)

    @abc.abstractmethod
    def loss(self, model, batch: dict, rng: jax.Array):
        """(loss_sum, loss_count, metrics {name: (sum, count)}) — pure and jit-traceable."""

    @abc.abstractmethod
    def batch_source(self, trainer) -> BatchSource:
        """Build the source of batches (may prepare data with the trainer's model and tokenizer first)."""

    @property
    def keeps_start(self) -> bool:
        """Whether it keeps a frozen copy of the starting parameters (a reference model): the args' `keeps_start`
        when they have one (read by `forgetjax plan` too)."""
        return bool(getattr(getattr(self, "args", None), "keeps_start", False))

    def sampler_rows(self, batch_size: int) -> int:
        """Rows of the largest call this method makes to the sampler with the model being trained (0: it never
        samples it); the args' `sampler_rows` when they have one."""
        rows = getattr(getattr(self, "args", None), "sampler_rows", None)
        return rows(batch_size) if rows is not None else 0

    def flops_per_token(self, trainer) -> float:
        """Training FLOPs per real token of the step's forward/backward passes (`ModelConfig.train_flops_per_token`)."""
        return trainer.model_config.train_flops_per_token(trainer.cfg.max_length)
