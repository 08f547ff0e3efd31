"""Flax NNX causal decoder for the Qwen2 family (Qwen2/Qwen2.5 and Llama-architecture checkpoints such as SmolLM2).

Layer parameters are stacked along a leading `layers` axis and the forward pass scans over them, so compile time
stays flat in depth. The per-layer math is written as pure functions of a weight dict, which keeps the scan body,
rematerialisation and the KV cache explicit. Norms, softmax and logits are computed in float32 whatever the
compute dtype.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from forgetjax.models.attention import (DECODE_IMPLEMENTATIONS, IMPLEMENTATIONS, attention, cached_attention,
                                       paged_decode_attention, paged_geometry, ragged_cache_length, segments_from)
from forgetjax.models.config import ModelConfig
from forgetjax.sharding import constrain

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Preallocated key/value cache for all layers.

    k, v: [layers, batch, kv_heads, max_len, head_dim], each head's slots contiguous so that a decode step reads them
    in place (with slots before heads XLA copies every layer's slice into this order each step); mask: [batch,
    max_len] marks slots holding real tokens; index: the next slot to write (the same for every row: prompts are
    left-padded so their ends align)."""

    k: jax.Array
    v: jax.Array
    mask: jax.Array
    index: jax.Array

    AXES = ("layers", "batch", "kv_heads", "length", "head_dim")  # logical axis names of k and v

    @classmethod
    def init(cls, config: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> "KVCache":
        shape = (config.num_layers, batch, config.num_kv_heads, max_len, config.head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   mask=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def written(self, k: jax.Array, v: jax.Array, mask: jax.Array) -> "KVCache":
        """This cache with T new tokens' keys and values (each [layers, batch, T, kv_heads, head_dim], as the layer
        loop yields them) and their mask [batch, T] written at slots [index, index + T)."""
        index = self.index

        def put(cache, new):
            new = jnp.swapaxes(new, 2, 3).astype(cache.dtype)
            return jax.lax.dynamic_update_slice(cache, new, (0, 0, 0, index, 0))

        return KVCache(k=put(self.k, k), v=put(self.v, v),
                       mask=jax.lax.dynamic_update_slice(self.mask, mask, (0, index)),
                       index=jnp.asarray(index + k.shape[2], jnp.int32))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PagedKVCache:
    """Preallocated key/value cache in the layout of jax's TPU paged-attention kernel (decode_attention "paged").

    k, v: [kv_heads, layers, batch, max_len, head_dim]: seen as [kv_heads, pages, page size, head_dim], every
    (layer, row) is a run of whole pages of one pool, which the kernel reads in place. Each row holds its tokens
    from slot 0 (a left-padded prompt is moved to the front as it is written) and `lengths` [batch] counts them, so
    rows grow independently: a decode step writes row b's token at slot lengths[b]."""

    k: jax.Array
    v: jax.Array
    lengths: jax.Array

    AXES = ("kv_heads", "layers", "batch", "length", "head_dim")  # logical axis names of k and v

    @classmethod
    def init(cls, config: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> "PagedKVCache":
        slots = paged_geometry(max_len)[0]
        shape = (config.num_kv_heads, config.num_layers, batch, slots, config.head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), lengths=jnp.zeros((batch,), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def written(self, k: jax.Array, v: jax.Array, mask: jax.Array) -> "PagedKVCache":
        """This cache with T new tokens' keys and values (each [layers, batch, T, kv_heads, head_dim], as the layer
        loop yields them): row b's real tokens (mask [batch, T]) go, in order, to the slots from lengths[b] on."""
        mask = mask.astype(bool)
        slots = jnp.where(mask, self.lengths[:, None] + jnp.cumsum(mask, axis=-1, dtype=jnp.int32) - 1, self.max_len)
        rows = jnp.arange(mask.shape[0])[:, None]

        def put(cache, new):  # slot max_len (padding) is out of range: dropped
            return cache.at[:, :, rows, slots].set(jnp.transpose(new, (3, 0, 1, 2, 4)).astype(cache.dtype),
                                                   mode="drop")

        return PagedKVCache(k=put(self.k, k), v=put(self.v, v),
                            lengths=self.lengths + jnp.sum(mask, axis=-1, dtype=jnp.int32))


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in float32, cast back to the input dtype before the scale (as HF does). Its backward pass
    keeps x and the float32 reciprocal RMS [..., 1] and recomputes the rest: autodiff would keep a float32 copy of x,
    two statistics and the normed x (4 more bytes per feature and token, and the scale cast to the compute dtype)."""
    return _rms_norm_forward(x, scale, eps)[0]


def _rms_norm_forward(x, scale, eps):
    x32 = x.astype(jnp.float32)
    inverse = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale.astype(x.dtype) * (x32 * inverse).astype(x.dtype), (x, scale, inverse)


def _rms_norm_backward(eps, saved, grad):
    """y = s * cast(n), n = x r, r = (mean(x^2) + eps)^-1/2: dn = cast(grad * s) in float32, dx = r (dn - n mean(dn
    n)) over the feature axis, ds = sum of grad * cast(n) over every other axis."""
    x, scale, inverse = saved
    normed32 = x.astype(jnp.float32) * inverse
    d_scale = jnp.sum((grad * normed32.astype(x.dtype)).astype(jnp.float32), axis=tuple(range(x.ndim - 1)))
    d_normed = (grad * scale.astype(x.dtype)).astype(jnp.float32)
    d_x = inverse * (d_normed - normed32 * jnp.mean(d_normed * normed32, axis=-1, keepdims=True))
    return d_x.astype(x.dtype), d_scale.astype(scale.dtype)


rms_norm.defvjp(_rms_norm_forward, _rms_norm_backward)


def linear(weights: dict[str, Any], x: jax.Array, lora_scale: float = 1.0) -> jax.Array:
    """x @ kernel (+ bias) (+ lora_scale * x @ A @ B when the weight dict carries LoRA factors)."""
    lead = x.shape[:-1]
    x = x.reshape(-1, x.shape[-1])  # no-op on the layer's already flattened inputs
    y = jnp.dot(x, weights["kernel"].astype(x.dtype))
    if weights.get("bias") is not None:
        y = y + weights["bias"].astype(x.dtype)
    if weights.get("lora_a") is not None:
        delta = jnp.einsum("...i,ir->...r", x, weights["lora_a"].astype(x.dtype))
        y = y + jnp.einsum("...r,ro->...o", delta, weights["lora_b"].astype(x.dtype)) * lora_scale
    return y.reshape(*lead, y.shape[-1])


@jax.custom_vjp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """silu(gate) * up, whose backward pass keeps only gate and up (the sigmoid and SiLU are recomputed from gate):
    autodiff would keep four [tokens, intermediate] arrays per layer instead of two when nothing is rematerialised."""
    return jax.nn.silu(gate) * up


def _swiglu_forward(gate, up):
    return swiglu(gate, up), (gate, up)


def _swiglu_backward(saved, grad):
    gate, up = saved
    sig = jax.nn.sigmoid(gate)
    d_gate = grad * up * sig * (1 + gate * (1 - sig))  # d/dx x*sigmoid(x) = sigmoid(x) (1 + x (1 - sigmoid(x)))
    return d_gate.astype(gate.dtype), (grad * (gate * sig)).astype(up.dtype)


swiglu.defvjp(_swiglu_forward, _swiglu_backward)


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


def _layer_forward(cfg: ModelConfig, w: dict[str, Any], x: jax.Array, cos, sin, attend,
                   lora_scale: float = 1.0):
    """One decoder layer; `attend(q, k, v) -> [B, T, Hq * D]` is the attention of this call (plain, or over a KV
    cache). Returns the layer output and this layer's new keys and values [B, T, Hkv, D]."""
    b, t, d = x.shape
    h = rms_norm(x, w["input_layernorm"]["scale"], cfg.rms_norm_eps).reshape(b * t, d)
    attn_w = w["self_attn"]
    q = linear(attn_w["q_proj"], h, lora_scale).reshape(b, t, cfg.num_heads, cfg.head_dim)
    k = linear(attn_w["k_proj"], h, lora_scale).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    v = linear(attn_w["v_proj"], h, lora_scale).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    x = x + linear(attn_w["o_proj"], attend(q, k, v), lora_scale)
    x = constrain(x, ("batch", "length", "act_embed"))
    h = rms_norm(x, w["post_attention_layernorm"]["scale"], cfg.rms_norm_eps).reshape(b * t, d)
    mlp_w = w["mlp"]
    gated = swiglu(linear(mlp_w["gate_proj"], h, lora_scale), linear(mlp_w["up_proj"], h, lora_scale))
    x = x + linear(mlp_w["down_proj"], gated, lora_scale).reshape(b, t, d)
    return constrain(x, ("batch", "length", "act_embed")), (k, v)


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
                 attention_impl: str = "auto", rngs: nnx.Rngs | None = None):
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat={remat!r}; choose one of {sorted(REMAT_POLICIES)}")
        if attention_impl not in IMPLEMENTATIONS:
            raise ValueError(f"attention_impl={attention_impl!r}; choose one of {IMPLEMENTATIONS}")
        rngs = rngs or nnx.Rngs(0)
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.remat = remat
        self.attention_impl = attention_impl
        self.decode_unroll = 0  # layers unrolled per iteration of the cached (decode) layer loop; 0: by backend
        # one-token steps over the cache: "xla" (every slot), "ragged" (written ones; GPU) or "paged" (written ones,
        # over a PagedKVCache; TPU)
        self.decode_attention = "xla"
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
        """Final residual stream (before the last norm), the updated cache, and optionally every layer's output.

        Without a cache, attention runs on the backend's fused kernel (`models.attention`); with one, the new tokens
        attend to the cache and to themselves, and their keys/values are written into it after the layer loop."""
        if cache is not None:
            if segment_ids is not None:
                raise ValueError("segment_ids (packing) cannot be combined with a KV cache")
            return self._forward_cached(input_ids, attention_mask, positions, cache, return_hidden)
        x, _, layer_outputs = self._forward(input_ids, attention_mask, positions, segment_ids, return_hidden,
                                            collect_kv=False)
        return x, None, layer_outputs

    def forward_embeds(self, embeds: jax.Array, attention_mask: jax.Array | None = None,
                       positions: jax.Array | None = None) -> jax.Array:
        """Final residual stream (before the last norm) of input embeddings [B, T, D] given in place of
        `embed(input_ids)`: the differentiable input of token-level attacks (one-hot tokens @ the embedding)."""
        x, _, _ = self._forward(None, attention_mask, positions, None, False, collect_kv=False,
                                embeds=constrain(embeds.astype(self.dtype), ("batch", "length", "act_embed")))
        return x

    def prefill(self, input_ids, attention_mask, cache: KVCache | PagedKVCache, return_hidden: bool = False):
        """Fill an empty cache with a (left-padded) prompt: the same fused attention as a plain forward, the keys
        and values written into slots [0, T) of a KVCache (each row's real tokens from slot 0 of a PagedKVCache).
        Returns (hidden, cache, layer outputs)."""
        attention_mask = attention_mask.astype(bool)
        x, (k, v), layer_outputs = self._forward(input_ids, attention_mask, None, None, return_hidden,
                                                 collect_kv=True)
        return x, cache.written(k, v, attention_mask), layer_outputs

    def _forward(self, input_ids, attention_mask, positions, segment_ids, return_hidden: bool, collect_kv: bool,
                 embeds: jax.Array | None = None):
        cfg = self.config
        b, t = (input_ids if embeds is None else embeds).shape[:2]
        unmasked = attention_mask is None and segment_ids is None
        segments = None if unmasked else segments_from(attention_mask, segment_ids, (b, t))
        if positions is None:
            mask = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
            positions = positions_from_mask(mask, segment_ids)
        cos, sin = rope_tables(positions, cfg.inv_frequencies())
        impl, lora_scale = self.attention_impl, self.lora_scale

        def attend(q, k, v):
            return attention(q, k, v, segments, impl)

        def body(x, w):
            x, kv = _layer_forward(cfg, w, x, cos, sin, attend, lora_scale)
            return x, ((x if return_hidden else None), (kv if collect_kv else None))

        if self.remat != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[self.remat])
        x0 = self.embed(input_ids) if embeds is None else embeds
        x, (layer_outputs, kv) = jax.lax.scan(body, x0, self.layer_weights())
        return x, kv, layer_outputs

    def cache_length(self, tokens: int) -> int:
        """KV-cache slots for `tokens` prompt + new tokens: whole kernel programs (blocks) under decode_attention
        "ragged" ("paged"), else exactly `tokens`."""
        if self.decode_attention == "ragged":
            return ragged_cache_length(tokens)
        if self.decode_attention == "paged":
            return paged_geometry(tokens)[0]
        return tokens

    def new_cache(self, batch: int, tokens: int, dtype=None) -> KVCache | PagedKVCache:
        """An empty cache for `tokens` prompt + new tokens per row, of the kind `decode_attention` reads."""
        if self.decode_attention not in DECODE_IMPLEMENTATIONS:
            raise ValueError(f"decode_attention={self.decode_attention!r}; choose one of {DECODE_IMPLEMENTATIONS}")
        kind = PagedKVCache if self.decode_attention == "paged" else KVCache
        return kind.init(self.config, batch, self.cache_length(tokens), dtype or self.dtype)

    def _decode_unroll(self) -> int:
        """4 layers per loop iteration on GPUs (7-16% faster greedy decode at Qwen2.5-1.5B on an H200, batch 1 to
        256, compile still under 5 s per bucket), 1 elsewhere; `decode_unroll` overrides it."""
        if self.decode_unroll:
            return self.decode_unroll
        return 4 if jax.default_backend() == "gpu" else 1

    def _forward_cached(self, input_ids, attention_mask, positions, cache: KVCache, return_hidden: bool):
        """New tokens over a filled cache. The layer scan reads each layer's cache slice once (as scan input, never
        carried or written inside the loop); the new keys/values come out as scan outputs [L, B, T, Hkv, D] and one
        in-place update writes them at slot `cache.index` for every layer."""
        if isinstance(cache, PagedKVCache):
            return self._forward_paged(input_ids, attention_mask, positions, cache, return_hidden)
        if self.decode_attention == "paged":
            raise ValueError("decode_attention 'paged' reads a PagedKVCache (CausalLM.new_cache), not a KVCache")
        cfg = self.config
        b, t = input_ids.shape
        attention_mask = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
        if positions is None:
            seen = jnp.sum(cache.mask, axis=-1, dtype=jnp.int32)[:, None]
            positions = jnp.maximum(seen + jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)
        cos, sin = rope_tables(positions, cfg.inv_frequencies())
        new_segments = attention_mask.astype(jnp.int32)
        lora_scale, decode_attention = self.lora_scale, self.decode_attention

        def body(x, xs):
            w, k_cache, v_cache = xs

            def attend(q, k, v):
                return cached_attention(q, k, v, new_segments, k_cache, v_cache, cache.mask, cache.index,
                                        decode_attention)

            x, kv = _layer_forward(cfg, w, x, cos, sin, attend, lora_scale)
            return x, ((x if return_hidden else None), kv)

        x, (layer_outputs, (k_new, v_new)) = jax.lax.scan(
            body, self.embed(input_ids), (self.layer_weights(), cache.k, cache.v), unroll=self._decode_unroll())
        return x, cache.written(k_new, v_new, attention_mask), layer_outputs

    def _forward_paged(self, input_ids, attention_mask, positions, cache: PagedKVCache, return_hidden: bool):
        """One new token per row over a PagedKVCache. The cache is carried through the layer scan: each layer writes
        its new key and value into its pages and the paged kernel reads them in place (`paged_decode_attention`). A
        padding token (mask False) does not count: its key and value sit past the row's length until the row's next
        real token overwrites them, and its output is meaningless."""
        cfg = self.config
        b, t = input_ids.shape
        if t != 1:
            raise ValueError(f"a PagedKVCache takes one new token per row after its prefill, got {t}")
        real = jnp.ones((b,), bool) if attention_mask is None else attention_mask.astype(bool)[:, 0]
        if positions is None:
            positions = cache.lengths[:, None]
        cos, sin = rope_tables(positions, cfg.inv_frequencies())
        lora_scale = self.lora_scale

        def body(carry, xs):
            x, k_pages, v_pages = carry
            w, layer = xs
            written = {}

            def attend(q, k, v):
                out, written["k"], written["v"] = paged_decode_attention(q, k, v, k_pages, v_pages, cache.lengths,
                                                                         layer)
                return out

            x, _ = _layer_forward(cfg, w, x, cos, sin, attend, lora_scale)
            return (x, written["k"], written["v"]), (x if return_hidden else None)

        (x, k_pages, v_pages), layer_outputs = jax.lax.scan(
            body, (self.embed(input_ids), cache.k, cache.v),
            (self.layer_weights(), jnp.arange(cfg.num_layers, dtype=jnp.int32)), unroll=self._decode_unroll())
        return x, PagedKVCache(k=k_pages, v=v_pages, lengths=cache.lengths + real), layer_outputs
