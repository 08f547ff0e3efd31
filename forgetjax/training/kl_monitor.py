"""KL to the start model, measured for every method: after every `every`-th step, the token-level
KL(pi_theta || pi_start) of the updated policy on that step's training batch, over the whole vocabulary
(`forgetjax.models.vocab.token_kl`, chunked: no [B, T, V] logits), averaged over the completion tokens (the loss
mask) of the method's contexts (`Method.kl_contexts`: SFT rows, DPO/SPIN chosen and rejected rows, ...). Logged as
`kl_to_start` in metrics.jsonl and summarised (last, mean, max over the measured steps) in train_result.json and
cell.json. The two forward passes (policy and start) over the batch's real tokens are charged to the budget as the
`reference` FLOPs component (`forgetjax.training.budget`)."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from forgetjax.models.vocab import token_kl


@dataclasses.dataclass
class KLConfig:
    """`every`: measure after every N-th step (0 = never; study cells default to 10,
    `forgetjax.study.matrix.STUDY_KL_EVERY`)."""

    every: int = 0

    def validate(self):
        if isinstance(self.every, bool) or self.every < 0:
            raise ValueError(f"kl_to_start.every must be an integer >= 0 (0 = off), got {self.every!r}")


def context_keys(arrays: Mapping[str, Any], prefixes: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """(prefix, loss-mask key) of every context of `prefixes` present in the batch; a context without its own
    `<prefix>loss_mask` uses the batch's `loss_mask` (contexts that share the completion tokens)."""
    out = []
    for prefix in prefixes:
        if f"{prefix}input_ids" not in arrays:
            continue
        mask = f"{prefix}loss_mask" if f"{prefix}loss_mask" in arrays else "loss_mask"
        if mask in arrays:
            out.append((prefix, mask))
    return tuple(out)


def sequence_lengths(attention_mask: np.ndarray, segment_ids: np.ndarray | None = None) -> list[int]:
    """Real tokens of every sequence of a batch: per row, or per packed segment when the rows carry segment ids."""
    mask = np.asarray(attention_mask).astype(bool)
    if segment_ids is None:
        return [int(n) for n in mask.sum(axis=1)]
    segments = np.where(mask, np.asarray(segment_ids), 0)
    return [int(n) for row in segments for n in np.unique(row[row > 0], return_counts=True)[1]]


def kl_flops(model_config, arrays: Mapping[str, Any], contexts: Sequence[tuple[str, str]]) -> float:
    """FLOPs of one measurement over the rows held here: a forward of the policy and of the start model over every
    context's real tokens (each sequence at its own length)."""
    total = 0.0
    for prefix, _ in contexts:
        lengths = sequence_lengths(arrays[f"{prefix}attention_mask"], arrays.get(f"{prefix}segment_ids"))
        total += 2.0 * model_config.forward_flops(lengths)
    return total


@functools.partial(jax.jit, static_argnums=(0, 5))
def kl_sums(graphdef, trainable, frozen, start, arrays: dict, contexts: tuple[tuple[str, str], ...]):
    """(sum of the per-token KL over the contexts' loss-mask tokens, their count) of the model (graphdef, trainable,
    frozen) against the same graph with the start parameters."""
    model = nnx.merge(graphdef, trainable, frozen)
    reference = nnx.merge(graphdef, start, frozen)
    total, count = jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)
    for prefix, mask_key in contexts:
        kl = token_kl(model, reference, arrays[f"{prefix}input_ids"], arrays.get(f"{prefix}attention_mask"),
                      arrays.get(f"{prefix}positions"), arrays.get(f"{prefix}segment_ids"))
        mask = arrays[mask_key].astype(jnp.float32)
        total = total + jnp.sum(jax.lax.stop_gradient(kl) * mask)
        count = count + jnp.sum(mask)
    return total, count


@dataclasses.dataclass
class KLSummary:
    """Running summary of the measured steps (saved with every checkpoint, so a resumed run keeps it)."""

    last: float | None = None
    total: float = 0.0
    max: float | None = None
    measured_steps: int = 0

    def add(self, value: float) -> None:
        self.last = value
        self.total += value
        self.max = value if self.max is None else max(self.max, value)
        self.measured_steps += 1

    def result(self) -> dict[str, Any] | None:
        """{last, mean, max, measured_steps}; None when no step was measured."""
        if not self.measured_steps:
            return None
        return {"last": self.last, "mean": self.total / self.measured_steps, "max": self.max,
                "measured_steps": self.measured_steps}
