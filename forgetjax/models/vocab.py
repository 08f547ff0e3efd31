"""Per-token statistics of a causal LM's next-token distributions without materialising [B, T, V] logits.

`vocab_stats` applies the final RMSNorm and the LM head (the tied embedding [V, D] or the head kernel [D, V]) to
hidden states [B, T, D] a chunk of positions at a time inside a `lax.scan`: each chunk's float32 logits [B, c, V]
are reduced at once to the requested per-token quantities (`VocabStats`). The chunk body is rematerialised
(`jax.checkpoint`), so the backward pass recomputes a chunk's logits instead of keeping them: the logits (and their
cotangent) take one chunk's [B, c, V] at a time, not [B, T, V]. `chunk` counts the tokens one device holds: with
the B rows split over S batch shards of the active mesh (S = 1 without one), at most max(1, chunk * S // B)
positions per row, T split into the fewest such chunks of equal width (padded by less than one position per chunk);
0 runs one unchunked pass. A single chunk is not rematerialised: recomputing it would hold the same logits again.
`logit_stats` is the reduction of one block of logits, shared with the logits-level losses.

`vocab_loss` (`head_loss` with a model's head) is the sum of a token-local loss of those statistics (SFT's weighted
NLL, top-k KD, GRPO's clipped surrogate): its gradient is formed chunk by chunk in the forward pass, so no chunk's
logits are computed twice.

`token_stats(model, ...)` runs the decoder and `head_stats(model, hidden)` the model's head; both use the model's
chunk size (`set_logit_chunk`, default `DEFAULT_CHUNK`) unless `chunk` is given. `token_kl(model, reference, ...)`
is the full-vocabulary KL between two models' next-token distributions, chunked the same way.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from forgetjax.models.decoder import rms_norm
from forgetjax.sharding import constrain, logical_to_spec

DEFAULT_CHUNK = 1024
_CHUNK_ATTRIBUTE = "logit_chunk"


class VocabStats(NamedTuple):
    """Per-token quantities [B, T(, K)] in float32 (ids int32); a field is None unless it was requested."""

    logprobs: jax.Array | None = None      # log p(targets)
    logsumexp: jax.Array | None = None     # log of the softmax normaliser
    entropy: jax.Array | None = None       # H(p) over the whole vocabulary
    argmax: jax.Array | None = None        # the most likely token id
    gathered: jax.Array | None = None      # log p(gather_ids) [B, T, K]
    top_logprobs: jax.Array | None = None  # the top_k log-probs [B, T, k], descending
    top_ids: jax.Array | None = None       # their ids [B, T, k]


def logit_stats(logits: jax.Array, *, targets: jax.Array | None = None, gather_ids: jax.Array | None = None,
                entropy: bool = False, logsumexp: bool = False, argmax: bool = False, top_k: int = 0,
                top_k_limit: int | None = None) -> VocabStats:
    """The requested `VocabStats` of a block of logits [..., V] (computed in float32).

    targets [...]: log p(targets); gather_ids [..., K]: log p at those ids; top_k: the k most likely ids among the
    first `top_k_limit` (default all), with log-probs normalised over the whole vocabulary."""
    logits = logits.astype(jnp.float32)
    top = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
    shifted = logits - top[..., None]
    log_norm = jnp.log(jnp.sum(jnp.exp(shifted), axis=-1))  # log-probs are shifted - log_norm (no cancellation)
    out = {}
    if targets is not None:
        picked = jnp.take_along_axis(shifted, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
        out["logprobs"] = picked - log_norm
    if logsumexp:
        out["logsumexp"] = log_norm + top
    if entropy:
        probs = jnp.exp(shifted - log_norm[..., None])
        out["entropy"] = log_norm - jnp.sum(probs * shifted, axis=-1)
    if argmax:
        out["argmax"] = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if gather_ids is not None:
        out["gathered"] = jnp.take_along_axis(shifted, gather_ids.astype(jnp.int32), axis=-1) - log_norm[..., None]
    if top_k:
        values, ids = jax.lax.top_k(shifted[..., :top_k_limit], top_k)
        out["top_logprobs"], out["top_ids"] = values - log_norm[..., None], ids.astype(jnp.int32)
    return VocabStats(**out)


def batch_shards(rows: int) -> int:
    """How many shards a batch axis of `rows` rows is split into under the active mesh (1 without one)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    axes = logical_to_spec(("batch",), (rows,), mesh)[0] or ()
    return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


def vocab_stats(hidden: jax.Array, norm_scale: jax.Array, head: jax.Array, *, tied: bool, eps: float,
                chunk: int = DEFAULT_CHUNK, targets: jax.Array | None = None, gather_ids: jax.Array | None = None,
                **requests) -> VocabStats:
    """`logit_stats` of the logits rms_norm(hidden) @ head, computed `chunk` tokens at a time (module docstring).

    hidden [B, T, D]: the final residual stream (before the final norm); head: the tied embedding [V, D] when
    `tied`, else the head kernel [D, V], used in hidden's dtype with float32 accumulation; targets [B, T] and
    gather_ids [B, T, K] are split with the positions; `requests` are logit_stats' other flags."""
    def block(h, block_targets, block_ids):
        return logit_stats(_project(h, norm_scale, head, tied, eps), targets=block_targets, gather_ids=block_ids,
                           **requests)

    return _chunked(block, chunk, hidden, targets, gather_ids)


def _head_axes(tied: bool) -> tuple[str, str]:
    """Logical axes of the LM head: the tied embedding [V, D] or the head kernel [D, V]."""
    return ("vocab", "embed") if tied else ("embed", "vocab")


def _project(hidden: jax.Array, norm_scale: jax.Array, head: jax.Array, tied: bool, eps: float) -> jax.Array:
    """float32 logits [B, c, V] = rms_norm(hidden) @ head of one chunk of final hidden states [B, c, D]."""
    d = hidden.shape[-1]
    x = rms_norm(hidden, norm_scale, eps).reshape(-1, d)
    contract = (((1,), (1,)), ((), ())) if tied else (((1,), (0,)), ((), ()))
    head = constrain(head, _head_axes(tied))  # and so its gradient, accumulated over chunks, is laid out like it
    logits = jax.lax.dot_general(x, head.astype(hidden.dtype), contract, preferred_element_type=jnp.float32)
    return constrain(logits.reshape(*hidden.shape[:2], logits.shape[-1]), ("batch", "length", "act_vocab"))


def _chunk_count(rows: int, length: int, chunk: int) -> int:
    """How many chunks of positions `chunk` tokens per device make of [rows, length] (module docstring)."""
    if not chunk or length == 0:
        return 1
    return -(-length // max(1, chunk * batch_shards(rows) // rows))


def _split(x: jax.Array | None, n: int) -> jax.Array | None:
    """[B, T, ...] -> [n, B, ceil(T / n), ...], T padded with zeros at the end."""
    if x is None:
        return None
    b, t = x.shape[:2]
    width = -(-t // n)
    x = jnp.pad(x, [(0, 0), (0, n * width - t)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(b, n, width, *x.shape[2:]), 1, 0)


def _merge(y: jax.Array, length: int) -> jax.Array:
    """`_split`'s inverse: [n, B, width, ...] -> [B, length, ...]."""
    y = jnp.moveaxis(y, 0, 1)
    return y.reshape(y.shape[0], -1, *y.shape[3:])[:, :length]


def _chunked(block, chunk: int, *xs):
    """`block(*xs)` computed `chunk` tokens per device at a time (module docstring): every x is [B, T, ...] (or None)
    and split along T; the rematerialised chunk results are joined back to [B, T, ...]."""
    b, t = xs[0].shape[:2]
    n = _chunk_count(b, t, chunk)
    if n == 1:
        return block(*xs)
    body = jax.checkpoint(lambda carry, pieces: (carry, block(*pieces)), prevent_cse=False)
    _, stacked = jax.lax.scan(body, None, tuple(_split(x, n) for x in xs))
    return jax.tree.map(lambda y: _merge(y, t), stacked)


def vocab_loss(hidden: jax.Array, norm_scale: jax.Array, head: jax.Array, token_loss, token_inputs: tuple = (), *,
               targets: jax.Array, gather_ids: jax.Array | None = None, tied: bool, eps: float,
               chunk: int = DEFAULT_CHUNK, entropy: bool = False) -> tuple[jax.Array, VocabStats]:
    """(sum over [B, T] of token_loss(logprobs, gathered, *token_inputs), the observed `VocabStats`) under
    rms_norm(hidden) @ head, in chunks like `vocab_stats`, for a loss that is token-local: position t's loss depends
    only on position t's log p(targets) [B, T], log p(gather_ids) [B, T, K] (None without gather_ids) and the
    entries t of `token_inputs` (arrays [B, T, ...], constants: not differentiated). token_loss maps chunks [B, c]
    of these to per-token losses [B, c].

    Differentiated, each chunk's gradient is formed as soon as its logits are: the per-token loss gradient pulled
    back through the log-softmax, the head and the final norm, and kept (hidden's [B, T, D], the norm scale's and
    the head's own sizes), so the backward pass only scales it by the sum's cotangent and no chunk's logits are
    computed twice (a rematerialised `vocab_stats` chunk computes them again). The stats (logprobs, argmax,
    gathered, entropy when asked) are observations: they carry no gradient. Undifferentiated, it is `vocab_stats`
    followed by the sum."""
    loss, stats = _vocab_loss(tied, eps, chunk, token_loss, entropy, hidden, norm_scale, head, targets, gather_ids,
                              tuple(token_inputs))
    return loss, jax.tree.map(jax.lax.stop_gradient, stats)


def _stats_requests(targets, gather_ids, entropy: bool) -> dict:
    return {"targets": targets, "gather_ids": gather_ids, "argmax": True, "entropy": entropy}


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
def _vocab_loss(tied, eps, chunk, token_loss, entropy, hidden, norm_scale, head, targets, gather_ids, inputs):
    stats = vocab_stats(hidden, norm_scale, head, tied=tied, eps=eps, chunk=chunk,
                        **_stats_requests(targets, gather_ids, entropy))
    return jnp.sum(token_loss(stats.logprobs, stats.gathered, *inputs)), stats


def _vocab_loss_forward(tied, eps, chunk, token_loss, entropy, hidden, norm_scale, head, targets, gather_ids,
                        inputs):
    def chunk_step(carry, pieces):
        total, d_scale, d_head = carry
        h, block_targets, block_ids, counted, block_inputs = pieces
        logits, pull_project = jax.vjp(lambda h, s, k: _project(h, s, k, tied, eps), h, norm_scale, head)

        def observe(block_logits):
            stats = logit_stats(block_logits, **_stats_requests(block_targets, block_ids, entropy))
            return (stats.logprobs, stats.gathered), stats

        (logprobs, gathered), pull_stats, stats = jax.vjp(observe, logits, has_aux=True)
        losses, pull_loss = jax.vjp(lambda lp, g: token_loss(lp, g, *block_inputs), logprobs, gathered)
        (d_logits,) = pull_stats(pull_loss(counted))  # positions padded onto the last chunk count nothing
        d_h, d_s, d_k = pull_project(d_logits)
        total = total + jnp.sum(jnp.where(counted > 0, losses, 0.0))
        return (total, d_scale + d_s, d_head + d_k), (d_h, stats)

    b, t = hidden.shape[:2]
    n = _chunk_count(b, t, chunk)
    start = (jnp.zeros((), jnp.float32), jnp.zeros_like(norm_scale), jnp.zeros_like(head))
    pieces = (hidden, targets, gather_ids, jnp.ones((b, t), jnp.float32), inputs)
    if n == 1:
        (total, d_scale, d_head), (d_hidden, stats) = chunk_step(start, pieces)
    else:
        (total, d_scale, d_head), stacked = jax.lax.scan(chunk_step, start, jax.tree.map(lambda x: _split(x, n),
                                                                                          pieces))
        d_hidden, stats = jax.tree.map(lambda y: _merge(y, t), stacked)
    return (total, stats), (d_hidden, d_scale, d_head)


def _vocab_loss_backward(tied, eps, chunk, token_loss, entropy, residuals, cotangents):
    d_hidden, d_scale, d_head = residuals
    g = cotangents[0]
    return (d_hidden * g.astype(d_hidden.dtype), d_scale * g.astype(d_scale.dtype), d_head * g.astype(d_head.dtype),
            None, None, None)


_vocab_loss.defvjp(_vocab_loss_forward, _vocab_loss_backward)


def logit_kl(logits_p: jax.Array, logits_q: jax.Array) -> jax.Array:
    """KL(p || q) = sum_v p(v) (log p(v) - log q(v)) over the last axis of two blocks of logits (float32)."""
    log_p = jax.nn.log_softmax(logits_p.astype(jnp.float32), axis=-1)
    log_q = jax.nn.log_softmax(logits_q.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def _head(model) -> tuple[jax.Array, bool]:
    """`model`'s LM head and whether it is the tied embedding [V, D] (else the head kernel [D, V])."""
    tied = model.lm_head is None
    return (model.embed_tokens.embedding[...] if tied else model.lm_head.kernel[...]), tied


def _logits(model, hidden: jax.Array) -> jax.Array:
    """float32 logits [B, c, V] of one chunk of `model`'s final hidden states (its final norm and LM head)."""
    head, tied = _head(model)
    return _project(hidden, model.norm.scale[...], head, tied, model.config.rms_norm_eps)


def token_kl(model, reference, input_ids: jax.Array, attention_mask: jax.Array | None = None,
             positions: jax.Array | None = None, segment_ids: jax.Array | None = None, *,
             chunk: int | None = None) -> jax.Array:
    """KL(model || reference) [B, T] of the two models' next-token distributions at every position of input_ids,
    over the whole vocabulary, one chunk of positions at a time (no [B, T, V] logits). Both models see the same
    inputs; `chunk` defaults to `model`'s."""
    hidden_p, _, _ = model.forward_hidden(input_ids, attention_mask, positions, segment_ids)
    hidden_q, _, _ = reference.forward_hidden(input_ids, attention_mask, positions, segment_ids)
    return _chunked(lambda p, q: logit_kl(_logits(model, p), _logits(reference, q)),
                    get_logit_chunk(model) if chunk is None else chunk, hidden_p, hidden_q)


def check_logit_chunk(chunk) -> int:
    """`chunk` if it is a valid chunk size (an integer >= 0, 0 = unchunked), else a ValueError."""
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0:
        raise ValueError(f"logit_chunk must be an integer >= 0 (0 = unchunked), got {chunk!r}")
    return chunk


def set_logit_chunk(model, chunk: int) -> None:
    """Make `chunk` the default of `token_stats`/`head_stats` for `model`; a static attribute, so nnx.split/merge
    keep it."""
    setattr(model, _CHUNK_ATTRIBUTE, check_logit_chunk(chunk))


def get_logit_chunk(model) -> int:
    """The model's chunk size (`set_logit_chunk`), `DEFAULT_CHUNK` when none was set."""
    return getattr(model, _CHUNK_ATTRIBUTE, DEFAULT_CHUNK)


def head_stats(model, hidden: jax.Array, *, chunk: int | None = None, **requests) -> VocabStats:
    """`vocab_stats` of hidden states [B, T, D] under `model`'s final norm and LM head (tied or not)."""
    head, tied = _head(model)
    return vocab_stats(hidden, model.norm.scale[...], head, tied=tied, eps=model.config.rms_norm_eps,
                       chunk=get_logit_chunk(model) if chunk is None else chunk, **requests)


def head_loss(model, hidden: jax.Array, token_loss, token_inputs: tuple = (), *, targets: jax.Array,
              gather_ids: jax.Array | None = None, entropy: bool = False,
              chunk: int | None = None) -> tuple[jax.Array, VocabStats]:
    """`vocab_loss` of hidden states [B, T, D] under `model`'s final norm and LM head (tied or not)."""
    head, tied = _head(model)
    return vocab_loss(hidden, model.norm.scale[...], head, token_loss, token_inputs, targets=targets,
                      gather_ids=gather_ids, tied=tied, eps=model.config.rms_norm_eps, entropy=entropy,
                      chunk=get_logit_chunk(model) if chunk is None else chunk)


def token_stats(model, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                positions: jax.Array | None = None, segment_ids: jax.Array | None = None, *,
                chunk: int | None = None, **requests) -> VocabStats:
    """`head_stats` of `model`'s forward pass over input_ids [B, T] (the arguments of `model(...)`)."""
    hidden, _, _ = model.forward_hidden(input_ids, attention_mask, positions, segment_ids)
    return head_stats(model, hidden, chunk=chunk, **requests)
