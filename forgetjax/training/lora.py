"""LoRA adapters on the stacked attention/MLP projections; merged into the base kernels on export."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from forgetjax.models.decoder import CausalLM, StackedLinear

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass
class LoraConfig:
    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = LORA_TARGETS

    def validate(self):
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        unknown = sorted(set(self.targets) - set(LORA_TARGETS))
        if unknown:
            raise ValueError(f"unknown LoRA target(s) {unknown}; choose from {list(LORA_TARGETS)}")


def apply_lora(model: CausalLM, cfg: LoraConfig, seed: int = 0) -> CausalLM:
    """Add LoRA factors A [layers, in, r] (Gaussian, std 1/r) and B [layers, r, out] (zeros) to every targeted
    projection, so the adapted model starts exactly equal to the base. Returns the same model, mutated."""
    key = jax.random.key(seed)
    scale = cfg.alpha / cfg.rank
    for path, module in sorted(model.iter_modules(), key=lambda item: str(item[0])):
        if not isinstance(module, StackedLinear) or path[-1] not in cfg.targets:
            continue
        key, sub = jax.random.split(key)
        kernel = module.kernel
        layers, fan_in, fan_out = kernel.shape
        _, in_axis, out_axis = kernel.get_metadata()["logical_axes"]
        a = jax.random.normal(sub, (layers, fan_in, cfg.rank), jnp.float32) / cfg.rank
        module.lora_a = nnx.LoRAParam(a.astype(kernel.dtype), logical_axes=("layers", in_axis, "lora_rank"),
                                      lora_scale=scale)
        module.lora_b = nnx.LoRAParam(jnp.zeros((layers, cfg.rank, fan_out), kernel.dtype),
                                      logical_axes=("layers", "lora_rank", out_axis))
    model.lora_scale = scale
    return model


def has_lora(model: CausalLM) -> bool:
    return bool(jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))


def merge_lora(model: CausalLM) -> CausalLM:
    """A plain CausalLM whose kernels are kernel + scale * A @ B (the input if it has no LoRA)."""
    if not has_lora(model):
        return model
    from forgetjax.convert.hf import merged_lora_kernels

    merged = merged_lora_kernels(model)
    dtype = model.embed_tokens.embedding[...].dtype
    plain = nnx.eval_shape(lambda: CausalLM(model.config, param_dtype=dtype, dtype=model.dtype, remat=model.remat))
    graphdef, state = nnx.split(plain)
    source = {".".join(map(str, p)): v for p, v in nnx.state(model, nnx.Param).flat_state()
              if not isinstance(v, nnx.LoRAParam)}
    for path, var in state.flat_state():
        key = ".".join(map(str, path))
        value = source[key][...]
        if key in merged:
            value = jax.device_put(merged[key].astype(value.dtype), value.sharding)
        var.set_value(value)
    return nnx.merge(graphdef, state)
