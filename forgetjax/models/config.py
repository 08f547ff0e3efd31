"""Decoder configuration derived from a Hugging Face `config.json` (Qwen2/Qwen2.5 and Llama-architecture models)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Iterable

from forgetjax.errors import UserError

SUPPORTED_MODEL_TYPES = ("qwen2", "llama")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class UnsupportedConfigError(UserError):
    """A config.json asks for a feature this decoder does not implement."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters of one causal decoder; everything the forward pass needs and nothing else."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_type: str = "default"
    rope_params: tuple[tuple[str, float], ...] = ()
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    max_position_embeddings: int = 32768
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    hf_config: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedConfigError(
                f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}")

    def inv_frequencies(self):
        """RoPE inverse frequencies [head_dim / 2] (float64, host), with linear or Llama-3 scaling applied."""
        import numpy as np

        inv = 1.0 / (self.rope_theta ** (np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim))
        params = dict(self.rope_params)
        if self.rope_type == "linear":
            return inv / params["factor"]
        if self.rope_type == "llama3":
            factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
            context = params["original_max_position_embeddings"]
            wavelen = 2 * np.pi / inv
            smooth = np.clip((context / wavelen - low) / (high - low), 0.0, 1.0)
            scaled = (1 - smooth) * inv / factor + smooth * inv
            return np.where(wavelen < context / high, inv, np.where(wavelen > context / low, inv / factor, scaled))
        return inv

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def params_per_layer(self) -> int:
        """Parameters of one decoder layer: projections, their biases, two norm scales."""
        d, f = self.hidden_size, self.intermediate_size
        layer = d * (self.q_size + 2 * self.kv_size) + self.q_size * d
        layer += (self.q_size + 2 * self.kv_size) * self.qkv_bias + d * self.o_bias
        return layer + 3 * d * f + (2 * f + d) * self.mlp_bias + 2 * d

    def num_params(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        d = self.hidden_size
        head = 0 if self.tie_word_embeddings else d * self.vocab_size
        return self.vocab_size * d + self.num_layers * self.params_per_layer() + d + head

    # FLOPs: the one accounting every budget and metric uses. Budgets charge real (non-padding) tokens only: a
    # forward pass outside the train step (sampling, reference or teacher scoring) charges each sequence at its own
    # length (`forward_flops`), never the padded width of its batch; the train step charges its real tokens at
    # `train_flops_per_token(max_length)`, whose attention term is taken at the run's context length so that a FLOPs
    # budget converts to tokens at one rate and trims the last batch exactly.

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token (PaLM convention): 2 x matmul weights (LM head included, lookup excluded)
        plus 4 x layers x q_size x seq_len for attention scores and values, where seq_len is the context the token
        attends over, charged in full (no causal halving). Norms, RoPE, softmax and other elementwise work are not
        counted. Forward only; a training step (forward + backward) is 3x this.

        This is the project's only FLOPs formula: per-sequence costs go through `forward_flops`, and a training step
        charges 3 x flops_per_token(max_length) per real token (`Method.flops_per_token`)."""
        d, f = self.hidden_size, self.intermediate_size
        per_layer = d * (self.q_size + 2 * self.kv_size) + self.q_size * d + 3 * d * f
        matmul_weights = self.num_layers * per_layer + self.vocab_size * d
        return 2.0 * matmul_weights + 4.0 * self.num_layers * self.q_size * seq_len

    def forward_flops(self, lengths: Iterable[int]) -> float:
        """Forward FLOPs of sequences with these real token counts: n x flops_per_token(n) each (padding free)."""
        return float(sum(int(n) * self.flops_per_token(int(n)) for n in lengths if n > 0))

    def train_flops_per_token(self, max_length: int) -> float:
        """Train-step FLOPs per real token (forward + backward = 3 x forward) at a context of max_length."""
        return 3.0 * self.flops_per_token(max_length)

    def to_hf_dict(self) -> dict[str, Any]:
        """An HF config.json dict equivalent to this config (the source dict when known, updated)."""
        architecture = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}[self.model_type]
        out = {k: v for k, v in self.hf_config.items() if not k.startswith("_")}
        out.update({
            "architectures": [architecture],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu",
        })
        out["rope_parameters"] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta, **dict(self.rope_params)}
        if "original_max_position_embeddings" in out["rope_parameters"]:
            value = out["rope_parameters"]["original_max_position_embeddings"]
            out["rope_parameters"]["original_max_position_embeddings"] = int(value)
        out.pop("rope_scaling", None)
        out.pop("rope_theta", None)
        if self.model_type == "llama":
            out["attention_bias"] = self.qkv_bias
            out["mlp_bias"] = self.mlp_bias
        for key, value in (("bos_token_id", self.bos_token_id), ("pad_token_id", self.pad_token_id)):
            if value is not None:
                out[key] = value
        if self.eos_token_ids:
            out["eos_token_id"] = self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else list(self.eos_token_ids)
        return out


def _rope_settings(hf: dict[str, Any], where: str) -> tuple[float, str, dict[str, float]]:
    """(theta, rope type, scaling params) from transformers-5 `rope_parameters` or legacy `rope_theta`/`rope_scaling`."""
    params = dict(hf.get("rope_parameters") or {})
    legacy = dict(hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedConfigError(
            f"{where}: rope type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    merged = {**legacy, **params}
    keys = {"linear": ("factor",),
            "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
    scaling = {}
    for key in keys.get(rope_type, ()):
        if key not in merged:
            raise UnsupportedConfigError(f"{where}: rope type {rope_type!r} needs rope parameter {key!r}")
        scaling[key] = float(merged[key])
    return float(theta), rope_type, scaling


def config_from_hf(hf: dict[str, Any], where: str = "config.json") -> ModelConfig:
    """Build a ModelConfig from an HF config dict; unsupported features raise UnsupportedConfigError naming the field."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedConfigError(
            f"{where}: model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [k for k in required if k not in hf]
    if missing:
        raise UnsupportedConfigError(f"{where}: missing required field(s) {', '.join(missing)}")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedConfigError(f"{where}: hidden_act={act!r} is not supported (only 'silu')")
    if hf.get("use_sliding_window"):
        raise UnsupportedConfigError(f"{where}: use_sliding_window=true is not supported (full attention only)")
    layer_types = hf.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        raise UnsupportedConfigError(f"{where}: layer_types {sorted(set(layer_types))} include non-full attention")
    if hf.get("pretraining_tp", 1) not in (1, None):
        raise UnsupportedConfigError(f"{where}: pretraining_tp={hf['pretraining_tp']} is not supported")
    theta, rope_type, scaling = _rope_settings(hf, where)
    heads = int(hf["num_attention_heads"])
    head_dim = int(hf.get("head_dim") or hf["hidden_size"] // heads)
    if model_type == "qwen2":
        qkv_bias, o_bias, mlp_bias = True, False, False
    else:
        qkv_bias = o_bias = bool(hf.get("attention_bias", False))
        mlp_bias = bool(hf.get("mlp_bias", False))
    eos = hf.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
    return ModelConfig(
        model_type=model_type,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_type=rope_type,
        rope_params=tuple(sorted(scaling.items())),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=mlp_bias,
        max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos_ids,
        pad_token_id=hf.get("pad_token_id"),
        hf_config=dict(hf),
    )


def load_config(path: str | Path) -> ModelConfig:
    """Read `config.json` (a file or a directory holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json at {path}")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UnsupportedConfigError(f"{path}: not valid JSON ({err})") from err
    return config_from_hf(hf, where=str(path))
