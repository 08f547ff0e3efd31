"""The one table between Hugging Face tensor names and forgetjax parameter paths, used in both directions.

HF stores one tensor per layer with torch's Linear layout [out, in]; forgetjax stacks layers on a leading axis and
keeps kernels as [in, out]. Each rule names both sides and whether the last two axes are transposed; everything
else (stacking, slicing for sharded reads, un-stacking on export) is derived from the rule.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

import numpy as np

from forgetjax.models.config import ModelConfig

LAYER = "{layer}"


def _always(_: ModelConfig) -> bool:
    return True


@dataclasses.dataclass(frozen=True)
class WeightRule:
    hf: str
    path: str
    transpose: bool = False
    when: Callable[[ModelConfig], bool] = _always

    @property
    def stacked(self) -> bool:
        return LAYER in self.hf

    def hf_names(self, config: ModelConfig) -> list[str]:
        if not self.stacked:
            return [self.hf]
        return [self.hf.replace(LAYER, str(i)) for i in range(config.num_layers)]

    def hf_shape(self, our_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of one HF tensor for a forgetjax parameter of `our_shape`."""
        shape = our_shape[1:] if self.stacked else our_shape
        return tuple(reversed(shape)) if self.transpose else tuple(shape)


def _untied(c: ModelConfig) -> bool:
    return not c.tie_word_embeddings


def _qkv_bias(c: ModelConfig) -> bool:
    return c.qkv_bias


def _o_bias(c: ModelConfig) -> bool:
    return c.o_bias


def _mlp_bias(c: ModelConfig) -> bool:
    return c.mlp_bias


_P = "model.layers.{layer}."
WEIGHT_MAP: tuple[WeightRule, ...] = (
    WeightRule("model.embed_tokens.weight", "embed_tokens.embedding"),
    WeightRule("model.norm.weight", "norm.scale"),
    WeightRule("lm_head.weight", "lm_head.kernel", transpose=True, when=_untied),
    WeightRule(_P + "input_layernorm.weight", "layers.input_layernorm.scale"),
    WeightRule(_P + "post_attention_layernorm.weight", "layers.post_attention_layernorm.scale"),
    WeightRule(_P + "self_attn.q_proj.weight", "layers.self_attn.q_proj.kernel", transpose=True),
    WeightRule(_P + "self_attn.k_proj.weight", "layers.self_attn.k_proj.kernel", transpose=True),
    WeightRule(_P + "self_attn.v_proj.weight", "layers.self_attn.v_proj.kernel", transpose=True),
    WeightRule(_P + "self_attn.o_proj.weight", "layers.self_attn.o_proj.kernel", transpose=True),
    WeightRule(_P + "self_attn.q_proj.bias", "layers.self_attn.q_proj.bias", when=_qkv_bias),
    WeightRule(_P + "self_attn.k_proj.bias", "layers.self_attn.k_proj.bias", when=_qkv_bias),
    WeightRule(_P + "self_attn.v_proj.bias", "layers.self_attn.v_proj.bias", when=_qkv_bias),
    WeightRule(_P + "self_attn.o_proj.bias", "layers.self_attn.o_proj.bias", when=_o_bias),
    WeightRule(_P + "mlp.gate_proj.weight", "layers.mlp.gate_proj.kernel", transpose=True),
    WeightRule(_P + "mlp.up_proj.weight", "layers.mlp.up_proj.kernel", transpose=True),
    WeightRule(_P + "mlp.down_proj.weight", "layers.mlp.down_proj.kernel", transpose=True),
    WeightRule(_P + "mlp.gate_proj.bias", "layers.mlp.gate_proj.bias", when=_mlp_bias),
    WeightRule(_P + "mlp.up_proj.bias", "layers.mlp.up_proj.bias", when=_mlp_bias),
    WeightRule(_P + "mlp.down_proj.bias", "layers.mlp.down_proj.bias", when=_mlp_bias),
)

# Tensors some HF checkpoints carry that hold no weights of ours (recomputed buffers).
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


def rules_for(config: ModelConfig) -> list[WeightRule]:
    return [rule for rule in WEIGHT_MAP if rule.when(config)]


def expected_hf_names(config: ModelConfig) -> set[str]:
    return {name for rule in rules_for(config) for name in rule.hf_names(config)}


def read_block(rule: WeightRule, config: ModelConfig, read: Callable[[str, tuple[slice, ...]], np.ndarray],
               index: tuple[slice, ...]) -> np.ndarray:
    """The block `index` of forgetjax parameter `rule.path`, assembled from HF tensors.

    `read(hf_name, hf_index)` returns a slice of one HF tensor; only the needed slices are read, so every device can
    load just its own shard."""
    if rule.stacked:
        layers = range(config.num_layers)[index[0]]
        inner = tuple(index[1:])
    else:
        layers, inner = None, tuple(index)
    hf_index = tuple(reversed(inner)) if rule.transpose else inner

    def one(name: str) -> np.ndarray:
        block = read(name, hf_index)
        return block.T if rule.transpose else block

    if layers is None:
        return one(rule.hf)
    return np.stack([one(rule.hf.replace(LAYER, str(i))) for i in layers])


def to_hf_tensors(rule: WeightRule, config: ModelConfig, value: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
    """Split one forgetjax parameter into its HF tensors (inverse of `read_block` on the full index)."""
    if not rule.stacked:
        yield rule.hf, np.ascontiguousarray(value.T if rule.transpose else value)
        return
    for i, name in enumerate(rule.hf_names(config)):
        layer = value[i]
        yield name, np.ascontiguousarray(layer.T if rule.transpose else layer)
