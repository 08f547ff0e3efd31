"""On-device sampling: one jitted program = prefill + a `lax.while_loop` decode over a preallocated KV cache.

Prompts are left-padded so their last tokens align, padded to a few length/batch buckets so that few shapes compile,
and repeated `n` times for n samples per prompt. Greedy, temperature, top-k and top-p are supported; the loop stops
early when every row has emitted a stop token. For every sampled token the model's own log-probability
(temperature 1, before any filtering) is returned, as policy-gradient methods need it.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from forgetjax.distributed import to_host
from forgetjax.models.decoder import CausalLM
from forgetjax.sharding import constrain

LENGTH_BUCKETS = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample. temperature 0 means greedy; top_k 0 and top_p 1 disable those filters."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    n: int = 1
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0 or self.n < 1:
            raise ValueError(f"top_k must be >= 0 and n >= 1, got top_k={self.top_k} n={self.n}")


@dataclasses.dataclass
class Completions:
    """Sampled continuations, one row per (prompt, sample): prompt i's samples are rows i*n ... i*n+n-1."""

    tokens: np.ndarray      # [rows, max_new_tokens] (pad after the end)
    logprobs: np.ndarray    # [rows, max_new_tokens] model log-prob of each sampled token (0 after the end)
    lengths: np.ndarray     # [rows] tokens kept (stop token included, stop-string tail removed)
    texts: list[str]
    finished: np.ndarray    # [rows] True when a stop token/string ended the row (False: budget exhausted)

    def mask(self) -> np.ndarray:
        return np.arange(self.tokens.shape[1])[None, :] < self.lengths[:, None]


def bucket(value: int, buckets: Sequence[int] = LENGTH_BUCKETS) -> int:
    for b in buckets:
        if value <= b:
            return b
    return int(math.ceil(value / buckets[-1]) * buckets[-1])


def filter_logits(logits: jax.Array, temperature: jax.Array, top_k: int, top_p: jax.Array) -> jax.Array:
    """Temperature-scaled logits with top-k / nucleus filtering (filtered entries at -inf)."""
    logits = logits / jnp.maximum(temperature, 1e-6)
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)

    def nucleus(logits):
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        cumulative = jnp.cumsum(probs, axis=-1) - probs
        keep_sorted = cumulative < top_p
        threshold = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        return jnp.where(logits < threshold, -jnp.inf, logits)

    # the vocabulary sort runs only when nucleus filtering is on (a runtime branch: no recompilation)
    return jax.lax.cond(top_p < 1.0, nucleus, lambda logits: logits, logits)


def _sample_step(logits, key, temperature, top_k: int, top_p):
    """Next token (argmax at temperature 0, else a filtered categorical draw) and its unfiltered log-prob.

    Greedy steps skip the filtering and the random draw at run time (`lax.cond`), so one compiled program serves
    every temperature without paying for a vocabulary sort and noise it does not use."""
    def sample(logits):
        return jax.random.categorical(key, filter_logits(logits, temperature, top_k, top_p), axis=-1)

    token = jax.lax.cond(temperature > 0, sample, lambda logits: jnp.argmax(logits, axis=-1), logits)
    logprob = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), token[:, None], axis=-1)[:, 0]
    return token.astype(jnp.int32), logprob


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "top_k", "cache_dtype"))
def _generate(graphdef, state, prompt_ids, prompt_mask, key, temperature, top_p, stop_ids, pad_id, *,
              max_new_tokens: int, top_k: int, cache_dtype):
    model = nnx.merge(graphdef, state)
    batch, prompt_len = prompt_ids.shape
    cache = model.new_cache(batch, prompt_len + max_new_tokens, cache_dtype)
    cache = dataclasses.replace(cache, k=constrain(cache.k, cache.AXES), v=constrain(cache.v, cache.AXES))
    hidden, cache, _ = model.prefill(prompt_ids, prompt_mask, cache)
    last_logits = model.unembed(hidden[:, -1:])[:, 0]  # only the last position's logits are needed

    tokens = jnp.full((batch, max_new_tokens), pad_id, jnp.int32)
    logprobs = jnp.zeros((batch, max_new_tokens), jnp.float32)
    done = jnp.zeros((batch,), bool)
    lengths = jnp.zeros((batch,), jnp.int32)

    def cond(carry):
        step, _, _, _, _, done, _, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, last_logits, cache, tokens, logprobs, done, lengths, key = carry
        key, sub = jax.random.split(key)
        token, logprob = _sample_step(last_logits, sub, temperature, top_k, top_p)
        token = jnp.where(done, pad_id, token)
        tokens = tokens.at[:, step].set(token)
        logprobs = logprobs.at[:, step].set(jnp.where(done, 0.0, logprob))
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | jnp.any(token[:, None] == stop_ids[None, :], axis=-1)
        logits, cache = model(token[:, None], jnp.ones((batch, 1), bool), cache=cache)
        return step + 1, logits[:, -1], cache, tokens, logprobs, done, lengths, key

    carry = (jnp.zeros((), jnp.int32), last_logits, cache, tokens, logprobs, done, lengths, key)
    _, _, _, tokens, logprobs, done, lengths, _ = jax.lax.while_loop(cond, body, carry)
    return tokens, logprobs, lengths, done


def _truncate_at_stop_strings(tokenizer, tokens: np.ndarray, length: int, stops: Sequence[str]) -> tuple[int, str,
                                                                                                        bool]:
    """Shortest prefix whose text contains a stop string; returns (kept tokens, text before the stop, stopped)."""
    text = tokenizer.decode(tokens[:length], skip_special_tokens=True)
    hits = [text.find(s) for s in stops if s and s in text]
    if not hits:
        return length, text, False
    cut = min(hits)
    for keep in range(1, length + 1):
        prefix = tokenizer.decode(tokens[:keep], skip_special_tokens=True)
        if any(s and s in prefix for s in stops):
            return keep, text[:cut], True
    return length, text[:cut], True


class Sampler:
    """Generates completions for token prompts or chat messages with a CausalLM (optionally sharded on a mesh)."""

    def __init__(self, model: CausalLM, tokenizer: Any, mesh=None, cache_dtype=None,
                 batch_buckets: Sequence[int] = BATCH_BUCKETS):
        self.model = model
        self.tokenizer = tokenizer
        self.mesh = mesh
        self.cache_dtype = jnp.dtype(cache_dtype or model.dtype)
        self.batch_buckets = tuple(batch_buckets)
        self.pad_id = self._pad_id()

    def _pad_id(self) -> int:
        for candidate in (getattr(self.tokenizer, "pad_token_id", None), getattr(self.tokenizer, "eos_token_id", None),
                          self.model.config.pad_token_id):
            if candidate is not None:
                return int(candidate)
        return 0

    def default_stop_ids(self) -> tuple[int, ...]:
        ids = set(self.model.config.eos_token_ids)
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if eos is not None:
            ids.add(int(eos))
        return tuple(sorted(ids))

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def left_pad(self, prompts: Sequence[Sequence[int]], length: int | None = None,
                 rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        longest = max(len(p) for p in prompts)
        length = length or bucket(longest)
        rows = rows or len(prompts)
        ids = np.full((rows, length), self.pad_id, np.int32)
        mask = np.zeros((rows, length), bool)
        for i, p in enumerate(prompts):
            if len(p) > length:
                raise ValueError(f"prompt {i} has {len(p)} tokens, more than the padded length {length}")
            if len(p):
                ids[i, length - len(p):] = p
                mask[i, length - len(p):] = True
        return ids, mask

    def generate_tokens(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> Completions:
        """Sample `params.n` continuations for each tokenised prompt.

        In multi-process runs every process passes the same prompts (SPMD); each device takes its rows of the one
        global batch and every process gets all completions back."""
        if not prompts:
            raise ValueError("no prompts to generate from")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("empty prompt: every prompt needs at least one token")
        expanded = [p for p in prompts for _ in range(params.n)]
        rows = bucket(len(expanded), self.batch_buckets)
        if self.mesh is not None:
            shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
            rows = int(math.ceil(rows / shards) * shards)
        ids, mask = self.left_pad(expanded, rows=rows)
        mask[len(expanded):, -1] = True  # filler rows: one token so attention is defined; outputs dropped
        stop_ids = np.asarray(params.stop_token_ids or self.default_stop_ids() or (-1,), np.int32)
        graphdef, state = nnx.split(self.model)
        if self.mesh is not None:
            from forgetjax.sharding import shard_batch
            ids, mask = shard_batch((ids, mask), self.mesh)
        run = functools.partial(
            _generate, graphdef, state, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(params.seed),
            jnp.float32(params.temperature), jnp.float32(params.top_p), jnp.asarray(stop_ids), jnp.int32(self.pad_id),
            max_new_tokens=params.max_new_tokens, top_k=params.top_k, cache_dtype=self.cache_dtype)
        if self.mesh is not None:
            with jax.set_mesh(self.mesh):
                tokens, logprobs, lengths, done = run()
        else:
            tokens, logprobs, lengths, done = run()
        n = len(expanded)
        tokens, logprobs, lengths, done = (np.array(x[:n]) for x in to_host((tokens, logprobs, lengths, done)))
        texts = []
        for i in range(n):
            if self.tokenizer is None:
                text = ""
            elif params.stop_strings:
                keep, text, stopped = _truncate_at_stop_strings(self.tokenizer, tokens[i], int(lengths[i]),
                                                                params.stop_strings)
                lengths[i], done[i] = keep, done[i] or stopped
            else:
                text = self.tokenizer.decode(tokens[i, :lengths[i]], skip_special_tokens=True)
            tokens[i, lengths[i]:] = self.pad_id
            logprobs[i, lengths[i]:] = 0.0
            texts.append(text)
        return Completions(tokens=tokens, logprobs=logprobs, lengths=lengths, texts=texts, finished=done)

    def chat(self, conversations: Sequence[list[dict[str, str]]], params: SamplingParams) -> Completions:
        return self.generate_tokens([self.encode_chat(c) for c in conversations], params)

    def complete(self, texts: Sequence[str], params: SamplingParams) -> Completions:
        return self.generate_tokens([self.encode_text(t) for t in texts], params)
