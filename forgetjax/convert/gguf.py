"""GGUF -> HF-named float32 tensors, config and tokenizer.

Weights are dequantised with the `gguf` package in NumPy (no torch). llama.cpp stores the Q/K projections of
Llama-architecture models permuted for its interleaved RoPE; that permutation is undone here so the tensors match
the HF layout. The tokenizer (and its chat template) is rebuilt by transformers from the GGUF metadata.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from forgetjax.convert.safetensors_io import ArrayCheckpoint, WeightsError
from forgetjax.models.config import ModelConfig, config_from_hf

_GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER_TO_HF = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
SUPPORTED_ARCHITECTURES = ("llama", "qwen2")


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def hf_name(gguf_name: str) -> str:
    if gguf_name in _GGUF_TO_HF:
        return _GGUF_TO_HF[gguf_name]
    match = _LAYER_RE.match(gguf_name)
    if not match or match.group(2) not in _GGUF_LAYER_TO_HF:
        raise WeightsError(f"GGUF tensor {gguf_name!r} has no HF counterpart in forgetjax's map")
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{_GGUF_LAYER_TO_HF[part]}.{kind}"


def unpermute_rope(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Invert llama.cpp's per-head (2, d/2) -> (d/2, 2) interleave of Q/K rows."""
    out_dim = weight.shape[0]
    return (weight.reshape(n_heads, out_dim // n_heads // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def hf_config_from_gguf(reader, path: Path) -> dict:
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise WeightsError(f"{path}: GGUF architecture {arch!r} is not supported "
                           f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")

    def key(name, default=None):
        value = _field(reader, f"{arch}.{name}", default)
        if value is None:
            raise WeightsError(f"{path}: GGUF metadata lacks {arch}.{name}")
        return value

    tokens = _field(reader, "tokenizer.ggml.tokens") or []
    heads = int(key("attention.head_count"))
    hidden = int(key("embedding_length"))
    tensor_names = {t.name for t in reader.tensors}
    hf = {
        "model_type": arch,
        "architectures": ["LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"],
        "vocab_size": int(key("vocab_size", len(tokens))),
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv", heads)),
        "head_dim": int(key("rope.dimension_count", hidden // heads)),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(key("rope.freq_base", 10000.0))},
        "max_position_embeddings": int(key("context_length")),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "hidden_act": "silu",
    }
    if _field(reader, f"{arch}.rope.scaling.type") not in (None, "none"):
        hf["rope_parameters"] = {"rope_type": _field(reader, f"{arch}.rope.scaling.type"),
                                 "rope_theta": hf["rope_parameters"]["rope_theta"],
                                 "factor": float(_field(reader, f"{arch}.rope.scaling.factor", 1.0))}
    if arch == "llama":
        hf["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
        hf["mlp_bias"] = "blk.0.ffn_up.bias" in tensor_names
    for field, hf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                          ("padding_token_id", "pad_token_id")):
        value = _field(reader, f"tokenizer.ggml.{field}")
        if value is not None:
            hf[hf_key] = int(value)
    return hf


def load_gguf(path: str | Path, progress: bool = False) -> tuple[ModelConfig, ArrayCheckpoint]:
    """(config, HF-named float32 tensors) from a GGUF file."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    try:
        reader = GGUFReader(str(path))
    except Exception as err:  # gguf raises bare ValueError/struct errors on malformed files
        raise WeightsError(f"{path}: not a readable GGUF file ({err})") from err
    hf = hf_config_from_gguf(reader, path)
    config = config_from_hf(hf, where=str(path))
    tensors = {}
    iterator = reader.tensors
    if progress:
        from tqdm import tqdm
        iterator = tqdm(iterator, desc="dequantising GGUF", unit="tensor")
    for tensor in iterator:
        name = hf_name(tensor.name)
        value = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        if config.model_type == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            value = unpermute_rope(value, config.num_heads)
        elif config.model_type == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            value = unpermute_rope(value, config.num_kv_heads)
        tensors[name] = value
    return config, ArrayCheckpoint(tensors, origin=str(path))


def load_gguf_tokenizer(path: str | Path):
    """The HF tokenizer (with chat template) embedded in a GGUF file."""
    from transformers import AutoTokenizer

    path = Path(path)
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
