"""Per-device memory of a training step, and the remat policy a run can afford.

Estimates (bytes per device), each term sharded over fsdp x tensor unless said otherwise:
- parameters, gradients (both in the param dtype; twice under micro_batches > 1: the accumulated sum beside one
  micro-batch's gradients) and AdamW's two moments in `moments_bytes` (only LoRA factors are trained when LoRA is
  on); the compute-dtype copy of the weights is made one layer at a time inside the layer scan (all layers' copies
  are kept only without remat, counted with the activations);
- activations kept for the backward pass of the local micro-batch, counted from the decoder's own layer
  (`saved_bytes_per_token`): without remat the values JAX saves from `models.decoder._layer_forward` (each norm's
  input and float32 reciprocal RMS, the one normed input its projections share, q and k after RoPE, v, the
  attention output, SwiGLU's gate and up and its output) and, when the compute dtype is
  not the parameters', every layer's weights cast to it (`jax.ad_checkpoint.print_saved_residuals` lists both;
  tested); with remat "dots" the matmul outputs; with remat "full" the layer inputs alone; under either, the layer
  recomputed during the backward pass adds what no remat would keep less its already counted share. Attention keeps
  no T x T scores between layers (fused kernels, or rematerialised XLA attention); where the XLA path runs (CPU,
  float32 on GPU, `models.attention.choose_implementation` on the planned backend) one layer's backward pass holds
  `XLA_SCORE_COPIES` float32 score blocks [rows, heads, min(T, XLA_QUERY_BLOCK), T] (`attention`);
- the float32 logits and their gradient for one chunk of `logit_chunk` tokens per device (`forgetjax.models.vocab`:
  every loss projects the vocabulary chunk by chunk; 0 = the whole batch at once);
- a frozen copy of the starting trained parameters (the KL to the start model, GRPO's KL reference; only the LoRA
  factors under LoRA) in the compute dtype, and the sampler's KV cache for rollouts (rows x length).
Checked against measured peaks on one H200 (benchmarks/results, 2026-12-04): Qwen2.5-0.5B and 1.5B bf16 SFT steps
(4 x 2048 tokens, no remat, chunks of 1024 / 4096 / all tokens) and a 7B step (remat full, bf16 moments); those
layers still saved a copy of the normed input per projection, SwiGLU's intermediates and autodiff's RMSNorm residuals,
which, counted the same way, reproduce the 1.5B peak within 3%. The smaller set saved since is not yet measured on a
GPU.

`train.remat: auto` (the default) takes the cheapest policy whose estimate fits in `MEMORY_FRACTION` of a device's
memory (`fitted_estimate`): no recomputation, then "dots" (matmul outputs kept), then "full" (each layer recomputed).
The trainer decides on its own mesh and device (`device_memory_bytes`), `forgetjax plan` on the planned topology.
Rematerialisation changes the schedule, not the values computed (gradients equal to float noise, tested), so a
run's id hashes the setting as written ("auto"); the policy used is recorded in its train_result.json.
"""
from __future__ import annotations

import dataclasses
import math
import os

from forgetjax.models.attention import XLA_QUERY_BLOCK, XLA_SCORE_COPIES, choose_implementation
from forgetjax.models.config import ModelConfig
from forgetjax.models.vocab import DEFAULT_CHUNK

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_COMPUTE_DTYPE = {4: "float32", 2: "bfloat16"}
MEMORY_FRACTION = 0.85  # of a device's memory that a plan may fill (allocator slack, XLA temporaries)
REMAT_BY_COST = ("none", "dots", "full")  # least recomputation first


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    data: int
    fsdp: int
    tensor: int
    params: float
    gradients: float
    optimizer: float
    activations: float
    kv_cache: float
    logits: float = 0.0
    reference: float = 0.0
    remat: str = "full"
    attention: float = 0.0

    @property
    def total(self) -> float:
        return (self.params + self.gradients + self.optimizer + self.activations + self.logits + self.reference
                + self.kv_cache + self.attention)


def saved_bytes_per_token(config: ModelConfig, remat: str, compute_bytes: int) -> float:
    """Bytes one layer keeps per token for the backward pass under `remat` (see the module docstring)."""
    d, f, q, kv = config.hidden_size, config.intermediate_size, config.q_size, config.kv_size
    if remat == "none":
        return (4 * d + 2 * q + 2 * kv + 3 * f) * compute_bytes + 2 * 4  # + each norm's float32 reciprocal RMS
    if remat == "dots":
        return (2 * d + q + 2 * kv + 2 * f) * compute_bytes
    if remat == "full":
        return d * compute_bytes
    raise ValueError(f"remat={remat!r}; choose one of none, dots, full")


def estimate(config: ModelConfig, data: int, fsdp: int, tensor: int, *, global_batch: int, seq_len: int,
             param_bytes: int = 4, compute_bytes: int = 2, remat: str = "full", lora_rank: int | None = None,
             moments_bytes: int = 4, logit_chunk: int = DEFAULT_CHUNK, reference: bool = False,
             rollout_batch: int = 0, rollout_len: int = 0, micro_batches: int = 1, backend: str | None = None,
             attention_impl: str = "auto") -> MemoryEstimate:
    """Bytes per device of one training step on a data x fsdp x tensor mesh (see the module docstring); `backend`
    ("cpu", "gpu", "tpu"; None: a fused kernel is assumed) decides whether the XLA attention's score blocks count."""
    shards = fsdp * tensor
    n = config.num_params()
    params = n * param_bytes / shards
    if lora_rank:
        d, f, layers = config.hidden_size, config.intermediate_size, config.num_layers
        trainable = layers * lora_rank * (4 * d + 3 * f + 3 * d + config.q_size + 2 * config.kv_size)
    else:
        trainable = n
    gradients = trainable * param_bytes / shards * (2 if micro_batches > 1 else 1)
    optimizer = 2 * trainable * moments_bytes / shards
    local_batch = max(global_batch // (data * fsdp), 1)
    tokens = local_batch * seq_len
    saved = saved_bytes_per_token(config, remat, compute_bytes)
    # the layer recomputed in the backward pass holds what no remat would keep, its saved share already counted
    kept = config.num_layers * saved + saved_bytes_per_token(config, "none", compute_bytes) - saved
    activations = kept * tokens / tensor
    if remat == "none" and compute_bytes != param_bytes:
        activations += config.num_layers * config.params_per_layer() * compute_bytes / shards  # cast weights kept
    logit_rows = min(logit_chunk, tokens) if logit_chunk else tokens
    logits = 2 * logit_rows * config.vocab_size * 4 / tensor
    reference_bytes = trainable * compute_bytes / shards if reference else 0.0  # a copy of the trained parameters
    kv_rows = max(rollout_batch // (data * fsdp), 1) if rollout_batch else 0
    kv_cache = 2 * config.num_layers * kv_rows * rollout_len * config.kv_size * compute_bytes / max(
        math.gcd(tensor, config.num_kv_heads), 1)
    attention = 0.0
    if backend is not None and choose_implementation(attention_impl, dtype=_COMPUTE_DTYPE[compute_bytes],
                                                     head_dim=config.head_dim, length=seq_len,
                                                     backend=backend) == "xla":
        rows = local_batch * config.num_heads / tensor
        attention = XLA_SCORE_COPIES * rows * min(seq_len, XLA_QUERY_BLOCK) * seq_len * 4
    return MemoryEstimate(data, fsdp, tensor, params, gradients, optimizer, activations, kv_cache, logits,
                          reference_bytes, remat, attention)


def train_memory_settings(train) -> dict:
    """The `estimate` keywords a resolved TrainConfig implies: the rows of one micro-batch (the activations a step
    holds at once) and the number of micro-batches, length, parameter and compute dtypes, remat, LoRA rank, Adam
    moments dtype (None: the parameter dtype) and the logits chunk."""
    param_bytes = DTYPE_BYTES[train.param_dtype or train.dtype]
    moments = train.optimizer.moments_dtype
    return {"global_batch": train.batch_size // train.micro_batches, "micro_batches": train.micro_batches,
            "seq_len": train.max_length,
            "param_bytes": param_bytes, "compute_bytes": DTYPE_BYTES[train.dtype], "remat": train.remat,
            "lora_rank": train.lora.rank if train.lora is not None else None,
            "moments_bytes": DTYPE_BYTES[moments] if moments else param_bytes,
            "logit_chunk": train.logit_chunk}


def keeps_start_copy(train, method) -> bool:
    """Whether a run keeps a frozen copy of its starting parameters: it measures the KL to the start
    (train.kl_to_start.every > 0) or its method (or the method's args) `keeps_start` (GRPO with beta > 0)."""
    return bool(train.kl_to_start.every) or bool(getattr(method, "keeps_start", False))


def fitted_estimate(config: ModelConfig, budget_bytes: float, data: int, fsdp: int, tensor: int,
                    **settings) -> MemoryEstimate:
    """`estimate` under `settings["remat"]`; when that is "auto", under the cheapest policy of `REMAT_BY_COST` whose
    total fits in `budget_bytes` ("full" when none fits)."""
    if settings.get("remat", "auto") != "auto":
        return estimate(config, data, fsdp, tensor, **settings)
    settings = {k: v for k, v in settings.items() if k != "remat"}
    for remat in REMAT_BY_COST:
        est = estimate(config, data, fsdp, tensor, remat=remat, **settings)
        if est.total <= budget_bytes:
            return est
    return est


def device_memory_bytes(device=None) -> int:
    """Memory one device may use: the accelerator allocator's limit, or on CPU the host's physical memory shared by
    the process's devices."""
    import jax

    device = device or jax.local_devices()[0]
    stats = device.memory_stats() or {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // jax.local_device_count()
