"""The one compiled training step shared by every method.

A method supplies `loss_fn(model, batch, rng) -> (loss_sum, loss_count, metrics)` with metrics as (sum, count)
pairs. The step splits the global batch into micro-batches inside the compiled program, accumulates gradients of the
un-normalised loss and divides once by the total count, so accumulation is exact (the same update as one big batch).
Parameters, optimiser state and batch carry explicit shardings; the old state is donated.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from forgetjax.sharding import batch_spec, constrain

LossFn = Callable[[Any, dict, jax.Array], tuple[jax.Array, jax.Array, dict]]


@dataclasses.dataclass
class TrainState:
    """Everything a step reads and writes besides the batch: trainable/frozen params, optimiser state, step, key."""

    trainable: nnx.State
    frozen: nnx.State
    opt_state: Any
    step: int
    rng: jax.Array


def split_model(model, lora: bool):
    """(graphdef, trainable, frozen): LoRA factors only when `lora`, else every parameter."""
    if lora:
        return nnx.split(model, nnx.LoRAParam, ...)
    return nnx.split(model, nnx.Param, ...)


def _micro_batches(batch: dict, micro: int) -> dict:
    """[B, ...] -> [micro, B // micro, ...] with strided rows, so every micro-batch spans all batch shards."""

    def reshape(x):
        if x.shape[0] % micro:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by micro_batches={micro}")
        y = x.reshape(x.shape[0] // micro, micro, *x.shape[1:]).swapaxes(0, 1)
        return constrain(y, (None, "batch") + (None,) * (y.ndim - 2))

    return jax.tree.map(reshape, batch)


def make_train_step(graphdef, loss_fn: LossFn, tx: optax.GradientTransformation, *, micro_batches: int = 1):
    """step(trainable, frozen, opt_state, batch, rng, lr) -> (trainable, opt_state, metrics), un-jitted."""

    def micro_loss(trainable, frozen, micro, key):
        model = nnx.merge(graphdef, trainable, frozen)
        loss_sum, loss_count, metrics = loss_fn(model, micro, key)
        return loss_sum, (loss_count, metrics)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def accumulate(trainable, frozen, batch, rng):
        """(grads, loss_sum, loss_count, metrics) summed over micro-batches; one call when there is one."""
        keys = jax.random.split(rng, micro_batches)
        if micro_batches == 1:
            (loss_sum, (loss_count, metrics)), grads = grad_fn(trainable, frozen, batch, keys[0])
            return grads, loss_sum, loss_count, metrics
        micros = _micro_batches(batch, micro_batches)
        first = jax.tree.map(lambda x: x[0], micros)
        _, (count_shape, metric_shapes) = jax.eval_shape(micro_loss, trainable, frozen, first, keys[0])
        zeros = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)  # noqa: E731
        init = (jax.tree.map(jnp.zeros_like, trainable), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
                zeros(metric_shapes))

        def body(carry, inputs):
            grads, loss_sum, loss_count, metrics = carry
            micro, key = inputs
            (m_loss, (m_count, m_metrics)), m_grads = grad_fn(trainable, frozen, micro, key)
            grads = jax.tree.map(jnp.add, grads, m_grads)
            metrics = jax.tree.map(jnp.add, metrics, m_metrics)
            return (grads, loss_sum + m_loss, loss_count + m_count, metrics), None

        carry, _ = jax.lax.scan(body, init, (micros, keys))
        return carry

    def step(trainable, frozen, opt_state, batch, rng, lr):
        grads, loss_sum, loss_count, metrics = accumulate(trainable, frozen, batch, rng)
        scale = 1.0 / jnp.maximum(loss_count, 1.0)
        grads = jax.tree.map(lambda g: g * scale, grads)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = jax.tree.map(lambda p, u: (p - lr * u).astype(p.dtype), trainable, updates)
        metrics = dict(metrics)
        metrics["loss"] = (loss_sum, loss_count)
        metrics["grad_norm"] = (grad_norm, jnp.ones((), jnp.float32))
        return trainable, opt_state, metrics

    return step


def compile_train_step(step_fn, state: TrainState, batch_example: dict, mesh: Mesh | None):
    """jit with explicit in/out shardings (parameters and optimiser state keep their layout; batch split over
    data x fsdp; metrics replicated), donating the old trainable parameters and optimiser state."""
    shardings = lambda tree: jax.tree.map(lambda x: x.sharding, tree)  # noqa: E731
    trainable_sh, frozen_sh, opt_sh = shardings(state.trainable), shardings(state.frozen), shardings(state.opt_state)
    if mesh is None:
        return jax.jit(step_fn, donate_argnums=(0, 2))
    replicated = NamedSharding(mesh, PartitionSpec())
    batch_sh = jax.tree.map(lambda x: NamedSharding(mesh, batch_spec(x.ndim)), batch_example)
    return jax.jit(step_fn, in_shardings=(trainable_sh, frozen_sh, opt_sh, batch_sh, replicated, replicated),
                   out_shardings=(trainable_sh, opt_sh, replicated), donate_argnums=(0, 2))


def finalize_metrics(metrics: dict) -> dict[str, float]:
    """{name: (sum, count)} -> {name: sum / count} on the host (NaN-free: count 0 gives 0)."""
    out = {}
    for name, (total, count) in jax.device_get(metrics).items():
        out[name] = float(total) / float(count) if float(count) else 0.0
    return out
