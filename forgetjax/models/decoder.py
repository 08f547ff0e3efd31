"""Flax NNX causal decoder for the Qwen2 family (Qwen2/Qwen2.5 and Llama-architecture checkpoints such as SmolLM2).

Layer parameters are stacked along a leading `layers` axis and the forward pass scans over them, so compile time
stays flat in depth. The per-layer math is written as pure functions of a weight dict, which keeps the scan body,
rematerialisation and the KV cache explicit. Norms, softmax and logits are computed in float32 whatever the
compute dtype.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from forgetjax.models.config import ModelConfig
from forgetjax.sharding import constrain

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Preallocated key/value cache for all layers.

    k, v: [layers, batch, max_len, kv_heads, head_dim]; mask: [batch, max_len] marks slots holding real tokens;
    index: the next slot to write (the same for every row: prompts are left-padded so their ends align)."""

    k: jax.Array
    v: jax.Array
    mask: jax.Array
    index: jax.Array

    @classmethod
    def init(cls, config: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> "KVCache":
        shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   mask=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


def _init_normal(rngs: nnx.Rngs, shape, dtype, std: float):
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class StackedLinear(nnx.Module):
    """A linear map per layer: kernel [layers, in, out] (HF's weight transposed), optional bias [layers, out]."""

    def __init__(self, num_layers: int, in_features: int, out_features: int, *, in_axis: str, out_axis: str,
                 use_bias: bool, param_dtype, rngs: nnx.Rngs, std: float = 0.02):
        self.kernel = nnx.Param(_init_normal(rngs, (num_layers, in_features, out_features), param_dtype, std),
                                logical_axes=("layers", in_axis, out_axis))
        self.bias = (nnx.Param(jnp.zeros((num_layers, out_features), param_dtype), logical_axes=("layers", out_axis))
                     if use_bias else None)


class Embedding(nnx.Module):
    def __init__(self, vocab_size: int, dim: int, param_dtype, rngs: nnx.Rngs):
        self.embedding = nnx.Param(_init_normal(rngs, (vocab_size, dim), param_dtype, 0.02),
                                   logical_axes=("vocab", "embed"))


class RMSNormScale(nnx.Module):
    def __init__(self, dim: int, param_dtype):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=("norm",))


class LMHead(nnx.Module):
    def __init__(self, dim: int, vocab_size: int, param_dtype, rngs: nnx.Rngs):
        self.kernel = nnx.Param(_init_normal(rngs, (dim, vocab_size), param_dtype, 0.02),
                                logical_axes=("embed", "vocab"))


class StackedRMSNorm(nnx.Module):
    def __init__(self, num_layers: int, dim: int, param_dtype):
        self.scale = nnx.Param(jnp.ones((num_layers, dim), param_dtype), logical_axes=("layers", "norm"))


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, param_dtype, rngs: nnx.Rngs):
        L, d = cfg.num_layers, cfg.hidden_size
        self.q_proj = StackedLinear(L, d, cfg.q_size, in_axis="embed", out_axis="q_heads", use_bias=cfg.qkv_bias,
                                    param_dtype=param_dtype, rngs=rngs)
        self.k_proj = StackedLinear(L, d, cfg.kv_size, in_axis="embed", out_axis="kv_heads", use_bias=cfg.qkv_bias,
                                    param_dtype=param_dtype, rngs=rngs)
        self.v_proj = StackedLinear(L, d, cfg.kv_size, in_axis="embed", out_axis="kv_heads", use_bias=cfg.qkv_bias,
                                    param_dtype=param_dtype, rngs=rngs)
        self.o_proj = StackedLinear(L, cfg.q_size, d, in_axis="q_heads", out_axis="embed", use_bias=cfg.o_bias,
                                    param_dtype=param_dtype, rngs=rngs)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, param_dtype, rngs: nnx.Rngs):
        L, d, f = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = StackedLinear(L, d, f, in_axis="embed", out_axis="mlp", use_bias=cfg.mlp_bias,
                                       param_dtype=param_dtype, rngs=rngs)
        self.up_proj = StackedLinear(L, d, f, in_axis="embed", out_axis="mlp", use_bias=cfg.mlp_bias,
                                     param_dtype=param_dtype, rngs=rngs)
        self.down_proj = StackedLinear(L, f, d, in_axis="mlp", out_axis="embed", use_bias=cfg.mlp_bias,
                                       param_dtype=param_dtype, rngs=rngs)


class DecoderLayers(nnx.Module):
    """All decoder layers, parameters stacked on a leading axis."""

    def __init__(self, cfg: ModelConfig, param_dtype, rngs: nnx.Rngs):
        self.input_layernorm = StackedRMSNorm(cfg.num_layers, cfg.hidden_size, param_dtype)
        self.self_attn = Attention(cfg, param_dtype, rngs)
        self.post_attention_layernorm = StackedRMSNorm(cfg.num_layers, cfg.hidden_size, param_dtype)
        self.mlp = MLP(cfg, param_dtype, rngs)


# ----------------------------------------------------------------------------------------------- pure layer math


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in float32, cast back to the input dtype before the scale (as HF does)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale.astype(x.dtype) * normed.astype(x.dtype)


def linear(weights: dict[str, Any], x: jax.Array, lora_scale: float = 1.0) -> jax.Array:
    """x @ kernel (+ bias) (+ lora_scale * x @ A @ B when the weight dict carries LoRA factors)."""
    lead = x.shape[:-1]
    x = x.reshape(-1, x.shape[-1])
    y = jnp.dot(x, weights["kernel"].astype(x.dtype))
    if weights.get("bias") is not None:
        y = y + weights["bias"].astype(x.dtype)
    if weights.get("lora_a") is not None:
        delta = jnp.einsum("...i,ir->...r", x, weights["lora_a"].astype(x.dtype))
        y = y + jnp.einsum("...r,ro->...o", delta, weights["lora_b"].astype(x.dtype)) * lora_scale
    return y.reshape(*lead, y.shape[-1])


def rope_tables(positions: jax.Array, inv_freq) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables [B, T, head_dim] for the rotate-half RoPE convention used by HF Llama/Qwen2."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: [B, T, H, D]; cos/sin: [B, T, D]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention. q: [B, T, Hq, D]; k, v: [B, S, Hkv, D]; mask: [B, T, S] (True = may attend).

    Scores and softmax in float32; query head h uses kv head h // (Hq / Hkv), as HF's repeat_kv does."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    q = q.reshape(b, t, hkv, hq // hkv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * (d ** -0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, hq * d)


def _layer_forward(cfg: ModelConfig, w: dict[str, Any], x: jax.Array, cos, sin, mask,
                   cache: tuple[jax.Array, jax.Array, jax.Array] | None = None, index: jax.Array | None = None,
                   lora_scale: float = 1.0):
    """One decoder layer. With `cache` = (k_all, v_all, layer), the whole stacked cache [L, B, S, Hkv, D] and this
    layer's index, the new keys/values are written in place at (layer, slot `index`) and attention runs over the
    layer's cache; the updated (k_all, v_all) is returned beside the output. Writing into the stacked cache (not a
    per-layer copy written back) keeps a decode step's cache traffic to the new entries plus one read."""
    b, t, _ = x.shape
    h = rms_norm(x, w["input_layernorm"]["scale"], cfg.rms_norm_eps)
    attn_w = w["self_attn"]
    q = linear(attn_w["q_proj"], h, lora_scale).reshape(b, t, cfg.num_heads, cfg.head_dim)
    k = linear(attn_w["k_proj"], h, lora_scale).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    v = linear(attn_w["v_proj"], h, lora_scale).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    updated = None
    if cache is not None:
        k_all, v_all, layer = cache
        start = (layer, 0, index, 0, 0)
        k_all = jax.lax.dynamic_update_slice(k_all, k[None].astype(k_all.dtype), start)
        v_all = jax.lax.dynamic_update_slice(v_all, v[None].astype(v_all.dtype), start)
        updated = (k_all, v_all)
        k = jax.lax.dynamic_index_in_dim(k_all, layer, 0, keepdims=False).astype(x.dtype)
        v = jax.lax.dynamic_index_in_dim(v_all, layer, 0, keepdims=False).astype(x.dtype)
    attn = attend(q, k, v, mask)
    x = x + linear(attn_w["o_proj"], attn, lora_scale)
    x = constrain(x, ("batch", "length", "act_embed"))
    h = rms_norm(x, w["post_attention_layernorm"]["scale"], cfg.rms_norm_eps)
    mlp_w = w["mlp"]
    gated = jax.nn.silu(linear(mlp_w["gate_proj"], h, lora_scale)) * linear(mlp_w["up_proj"], h, lora_scale)
    x = x + linear(mlp_w["down_proj"], gated, lora_scale)
    return constrain(x, ("batch", "length", "act_embed")), updated


def positions_from_mask(attention_mask: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """Token positions that skip padding (left padding works) and restart at every packed segment."""
    if segment_ids is None:
        return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)
    t = jnp.arange(segment_ids.shape[-1])
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], -1)
    start_index = jax.lax.cummax(jnp.where(starts, t, 0), axis=1)
    return t - start_index


class CausalLM(nnx.Module):
    """Qwen2-family causal language model.

    `model(input_ids, attention_mask=None, positions=None, segment_ids=None)` returns float32 logits [B, T, V];
    with `cache=` it also returns the updated KVCache (prefill: T prompt tokens; decode: T=1)."""

    def __init__(self, config: ModelConfig, *, param_dtype=jnp.float32, dtype=jnp.float32, remat: str = "none",
                 rngs: nnx.Rngs | None = None):
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat={remat!r}; choose one of {sorted(REMAT_POLICIES)}")
        rngs = rngs or nnx.Rngs(0)
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.remat = remat
        self.lora_scale = 1.0
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, param_dtype, rngs)
        self.layers = DecoderLayers(config, param_dtype, rngs)
        self.norm = RMSNormScale(config.hidden_size, param_dtype)
        self.lm_head = (None if config.tie_word_embeddings
                        else LMHead(config.hidden_size, config.vocab_size, param_dtype, rngs))

    def layer_weights(self) -> dict[str, Any]:
        """The stacked per-layer weights as a plain pytree (leading axis = layer)."""
        return nnx.to_pure_dict(nnx.state(self.layers, nnx.Param))

    def embed(self, input_ids: jax.Array) -> jax.Array:
        x = jnp.take(self.embed_tokens.embedding[...], input_ids, axis=0).astype(self.dtype)
        return constrain(x, ("batch", "length", "act_embed"))

    def unembed(self, x: jax.Array) -> jax.Array:
        x = rms_norm(x, self.norm.scale[...], self.config.rms_norm_eps)
        if self.lm_head is None:
            head = self.embed_tokens.embedding[...].astype(self.dtype).T
        else:
            head = self.lm_head.kernel[...].astype(self.dtype)
        logits = jnp.dot(x.reshape(-1, x.shape[-1]), head, preferred_element_type=jnp.float32)
        logits = logits.reshape(*x.shape[:-1], logits.shape[-1])
        return constrain(logits, ("batch", "length", "act_vocab"))

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
                 cache: KVCache | None = None, return_hidden: bool = False):
        hidden, cache, layer_outputs = self.forward_hidden(input_ids, attention_mask, positions, segment_ids, cache,
                                                           return_hidden)
        logits = self.unembed(hidden)
        out = (logits,) + ((cache,) if cache is not None else ()) + ((layer_outputs,) if return_hidden else ())
        return out[0] if len(out) == 1 else out

    def forward_hidden(self, input_ids, attention_mask=None, positions=None, segment_ids=None,
                       cache: KVCache | None = None, return_hidden: bool = False):
        """Final residual stream (before the last norm), the updated cache, and optionally every layer's output."""
        cfg = self.config
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), bool)
        attention_mask = attention_mask.astype(bool)
        if cache is None:
            if positions is None:
                positions = positions_from_mask(attention_mask, segment_ids)
            slots = jnp.arange(t)
            mask = (slots[None, :, None] >= slots[None, None, :]) & attention_mask[:, None, :]
            if segment_ids is not None:
                mask &= segment_ids[:, :, None] == segment_ids[:, None, :]
        else:
            if segment_ids is not None:
                raise ValueError("segment_ids (packing) cannot be combined with a KV cache")
            index = cache.index
            kv_mask = jax.lax.dynamic_update_slice(cache.mask, attention_mask, (0, index))
            if positions is None:
                seen = jnp.sum(cache.mask, axis=-1, dtype=jnp.int32)[:, None]
                positions = seen + jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1
                positions = jnp.maximum(positions, 0)
            q_slots = index + jnp.arange(t)
            k_slots = jnp.arange(cache.max_len)
            mask = (k_slots[None, None, :] <= q_slots[None, :, None]) & kv_mask[:, None, :]
        cos, sin = rope_tables(positions, cfg.inv_frequencies())
        x = self.embed(input_ids)
        weights = self.layer_weights()
        lora_scale = self.lora_scale
        policy = REMAT_POLICIES[self.remat]

        if cache is None:
            def body(x, w):
                x, _ = _layer_forward(cfg, w, x, cos, sin, mask, lora_scale=lora_scale)
                return x, (x if return_hidden else None)

            if self.remat != "none":
                body = jax.checkpoint(body, policy=policy)
            x, layer_outputs = jax.lax.scan(body, x, weights)
            return x, None, layer_outputs

        def cached_body(carry, xs):
            x, k_all, v_all = carry
            w, layer = xs
            x, (k_all, v_all) = _layer_forward(cfg, w, x, cos, sin, mask, (k_all, v_all, layer), index, lora_scale)
            return (x, k_all, v_all), (x if return_hidden else None)

        (x, k_all, v_all), layer_outputs = jax.lax.scan(
            cached_body, (x, cache.k, cache.v), (weights, jnp.arange(cfg.num_layers)))
        new_cache = KVCache(k=k_all, v=v_all, mask=kv_mask, index=index + t)
        return x, new_cache, layer_outputs
