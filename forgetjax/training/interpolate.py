"""Weight-space interpolation between a start model and its post-trained model (WiSE-FT, Wortsman et al. 2022):
theta(alpha) = (1 - alpha) * theta_start + alpha * theta_post, every parameter, computed in float32 and cast back to
the parameter's dtype. Written as (1 - alpha) a + alpha b, so alpha = 0 and alpha = 1 give the start and the post
weights bit for bit. A LoRA model is merged into plain kernels first (`merge_lora`)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from forgetjax.training.lora import merge_lora


def interpolate_params(start, post, alpha: float):
    """(1 - alpha) * start + alpha * post leaf by leaf over two parameter pytrees of the same structure (pure)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")

    def mix(a, b):
        if a.shape != b.shape:
            raise ValueError(f"cannot interpolate parameters of shapes {a.shape} and {b.shape}")
        if not jnp.issubdtype(a.dtype, jnp.floating):
            return a
        value = (1.0 - alpha) * a.astype(jnp.float32) + alpha * b.astype(jnp.float32)
        return value.astype(a.dtype)

    return jax.tree.map(mix, start, post)


def interpolate_models(start, post, alpha: float):
    """A new model with `start`'s structure and dtypes whose parameters are the interpolation at `alpha` (both models
    are left unchanged; LoRA adapters are merged into their kernels first)."""
    start, post = merge_lora(start), merge_lora(post)
    graphdef, start_state, rest = nnx.split(start, nnx.Param, ...)
    post_state = nnx.state(post, nnx.Param)
    if jax.tree.structure(start_state) != jax.tree.structure(post_state):
        raise ValueError("cannot interpolate models of different architectures")
    return nnx.merge(graphdef, interpolate_params(start_state, post_state, alpha), rest)
