"""Chunked per-token statistics (`forgetjax.models.vocab`) against the plain log-softmax of the full logits and a
float64 numpy reference: values and gradients for tied and untied heads, T not a multiple of the chunk, left
padding, bfloat16 compute, the chunk size reaching the losses, and the compiled memory of a backward pass."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from forgetjax.models.config import ModelConfig
from forgetjax.models.decoder import CausalLM
from forgetjax.losses.token import weighted_nll
from forgetjax.models.vocab import (check_logit_chunk, get_logit_chunk, set_logit_chunk, token_stats, vocab_loss,
                                    vocab_stats)

VOCAB, HIDDEN, EPS, K, TOP = 97, 32, 1e-6, 4, 5
B, T = 3, 13  # chunk 7 -> 2 positions per row, 7 chunks, one padded position


def make_model(tied: bool, dtype=jnp.float32, vocab: int = VOCAB, layers: int = 2, seed: int = 0) -> CausalLM:
    """A random decoder whose final norm scale is not all ones and whose head spreads the next-token
    distributions (log-probs of the targets between about -2 and -20)."""
    config = ModelConfig(model_type="qwen2", vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=48,
                         num_layers=layers, num_heads=4, num_kv_heads=2, head_dim=8, rms_norm_eps=EPS,
                         rope_theta=1e4, tie_word_embeddings=tied, qkv_bias=True)
    model = CausalLM(config, dtype=dtype, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    model.norm.scale.set_value(jnp.asarray(1 + 0.3 * rng.normal(size=HIDDEN), jnp.float32))
    head = model.embed_tokens.embedding if tied else model.lm_head.kernel
    head.set_value(jnp.asarray(0.5 * rng.normal(size=head.shape), jnp.float32))
    return model


def head_of(model) -> jax.Array:
    """The LM head as [D, V] (the tied embedding transposed)."""
    return model.embed_tokens.embedding[...].T if model.lm_head is None else model.lm_head.kernel[...]


def batch(seed: int = 1):
    """Left-padded ids, attention mask, targets, gather ids [B, T, K] and a loss mask inside the attention mask."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, (B, T)).astype(np.int32)
    mask = np.ones((B, T), bool)
    mask[1, :4] = mask[2, :9] = False
    targets = rng.integers(0, VOCAB, (B, T)).astype(np.int32)
    gather = rng.integers(0, VOCAB, (B, T, K)).astype(np.int32)
    loss_mask = mask & (rng.random((B, T)) < 0.8)
    return ids, mask, targets, gather, loss_mask


def numpy_log_softmax(hidden, scale, head) -> np.ndarray:
    """float64 log-softmax of rms_norm(hidden) * scale @ head [D, V]."""
    h = np.asarray(jnp.asarray(hidden, jnp.float32), np.float64)
    x = h / np.sqrt(np.mean(h * h, axis=-1, keepdims=True) + EPS) * np.asarray(scale, np.float64)
    logits = x @ np.asarray(head, np.float64)
    top = logits.max(-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


def expected_stats(logp: np.ndarray, targets, gather, limit: int) -> dict[str, np.ndarray]:
    """Every statistic from a full log-softmax [B, T, V] (numpy)."""
    logp = np.asarray(logp, np.float64)
    top_ids = np.argsort(-logp[..., :limit], axis=-1, kind="stable")[..., :TOP]
    return {"logprobs": np.take_along_axis(logp, targets[..., None], -1)[..., 0],
            "entropy": -np.sum(np.exp(logp) * logp, axis=-1),
            "argmax": np.argmax(logp, axis=-1),
            "gathered": np.take_along_axis(logp, gather, -1),
            "top_logprobs": np.take_along_axis(logp, top_ids, -1), "top_ids": top_ids}


def assert_stats(stats, expected: dict[str, np.ndarray], rtol: float, atol: float) -> None:
    for name, value in expected.items():
        got = np.asarray(getattr(stats, name))
        if name in ("argmax", "top_ids"):
            np.testing.assert_array_equal(got, value, err_msg=name)
        else:
            assert got.dtype == np.float32, name
            np.testing.assert_allclose(got, value, rtol=rtol, atol=atol, err_msg=name)


REQUESTS = dict(entropy=True, logsumexp=True, argmax=True, top_k=TOP, top_k_limit=VOCAB - 10)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("chunk", [0, 1, 7, 10_000])
def test_stats_equal_the_log_softmax_of_the_full_logits(tied, chunk):
    model = make_model(tied)
    ids, mask, targets, gather, _ = batch()
    stats = jax.jit(lambda m, *a: token_stats(m, *a[:2], chunk=chunk, targets=a[2], gather_ids=a[3], **REQUESTS))(
        model, ids, mask, targets, gather)
    logits = model(ids, mask)
    plain = expected_stats(jax.nn.log_softmax(logits, axis=-1), targets, gather, VOCAB - 10)
    assert_stats(stats, plain, rtol=1e-5, atol=1e-6)
    hidden = model.forward_hidden(ids, mask)[0]
    reference = expected_stats(numpy_log_softmax(hidden, model.norm.scale[...], head_of(model)), targets, gather,
                               VOCAB - 10)
    assert_stats(stats, reference, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(stats.logsumexp), np.asarray(jax.nn.logsumexp(logits, axis=-1)), rtol=1e-6)


def reference_objective(hidden, scale, head, targets, gather, weights):
    """A loss touching log p(targets), the entropy and the gathered log-probs, from the full logits."""
    x = hidden * jax.lax.rsqrt(jnp.mean(hidden * hidden, axis=-1, keepdims=True) + EPS) * scale
    logp = jax.nn.log_softmax(jnp.dot(x, head), axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    gathered = jnp.take_along_axis(logp, gather, -1)
    return jnp.sum(weights * (picked + 0.3 * entropy + 0.2 * jnp.sum(gathered, -1)))


@pytest.mark.parametrize("tied", [False, True])
def test_gradients_to_hidden_norm_and_head_equal_the_unchunked_reference(tied):
    rng = np.random.default_rng(2)
    _, _, targets, gather, loss_mask = batch()
    hidden = jnp.asarray(rng.normal(size=(B, T, HIDDEN)), jnp.float32)
    scale = jnp.asarray(1 + 0.3 * rng.normal(size=HIDDEN), jnp.float32)
    head = jnp.asarray(0.5 * rng.normal(size=(HIDDEN, VOCAB)), jnp.float32)
    weights = jnp.asarray(loss_mask, jnp.float32)

    def chunked(h, s, w):
        stats = vocab_stats(h, s, w.T if tied else w, tied=tied, eps=EPS, chunk=7, targets=targets,
                            gather_ids=gather, entropy=True)
        return jnp.sum(weights * (stats.logprobs + 0.3 * stats.entropy + 0.2 * jnp.sum(stats.gathered, -1)))

    value, grads = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1, 2)))(hidden, scale, head)
    ref_value, ref_grads = jax.value_and_grad(reference_objective, argnums=(0, 1, 2))(
        hidden, scale, head, targets, gather, weights)
    assert float(value) == pytest.approx(float(ref_value), rel=1e-5)
    for name, got, expected in zip(("hidden", "norm scale", "head"), grads, ref_grads):
        assert float(jnp.max(jnp.abs(got))) > 0, name
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5,
                                   atol=1e-5 * float(jnp.max(jnp.abs(expected))), err_msg=name)


def test_batch_sharded_over_a_mesh_matches_float64_and_the_unchunked_gradients():
    """Rows split over data x fsdp = 4 shards and the vocabulary over tensor = 2: 6 tokens per device are 2
    positions per row (8 rows, 2 per shard), so T = 13 runs in 7 chunks."""
    from forgetjax.models.vocab import batch_shards
    from forgetjax.sharding import make_mesh, shard_batch

    rng = np.random.default_rng(4)
    rows = 8
    hidden = rng.normal(size=(rows, T, HIDDEN)).astype(np.float32)
    scale = jnp.asarray(1 + 0.3 * rng.normal(size=HIDDEN), jnp.float32)
    head = jnp.asarray(0.5 * rng.normal(size=(HIDDEN, VOCAB)), jnp.float32)
    targets = rng.integers(0, VOCAB, (rows, T)).astype(np.int32)
    gather = rng.integers(0, VOCAB, (rows, T, K)).astype(np.int32)
    weights = jnp.asarray(rng.random((rows, T)) < 0.8, jnp.float32)

    def chunked(h, s, w, targets, gather):
        stats = vocab_stats(h, s, w, tied=False, eps=EPS, chunk=6, targets=targets, gather_ids=gather, entropy=True)
        return jnp.sum(weights * (stats.logprobs + 0.3 * stats.entropy + 0.2 * jnp.sum(stats.gathered, -1))), stats

    mesh = make_mesh(data=2, fsdp=2, tensor=2, devices=jax.devices()[:8])
    with jax.set_mesh(mesh):
        assert jax.jit(lambda: batch_shards(rows))() == 4
        h, t, g = shard_batch((hidden, targets, gather), mesh)
        (value, stats), grads = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1, 2), has_aux=True))(
            h, scale, head, t, g)
    reference = expected_stats(numpy_log_softmax(hidden, scale, head), targets, gather, VOCAB)
    del reference["argmax"], reference["top_ids"], reference["top_logprobs"]
    assert_stats(stats, reference, rtol=1e-5, atol=1e-6)
    ref_value, ref_grads = jax.value_and_grad(reference_objective, argnums=(0, 1, 2))(
        jnp.asarray(hidden), scale, head, targets, gather, weights)
    assert float(value) == pytest.approx(float(ref_value), rel=1e-5)
    for name, got, expected in zip(("hidden", "norm scale", "head"), grads, ref_grads):
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5,
                                   atol=1e-5 * float(jnp.max(jnp.abs(expected))), err_msg=name)


@pytest.mark.parametrize("tied", [False, True])
def test_sft_loss_and_its_parameter_gradients_equal_the_log_softmax_of_model_logits(tied):
    from forgetjax.losses.token import sft_loss

    model = make_model(tied)
    set_logit_chunk(model, 5)
    ids, mask, targets, _, loss_mask = batch()
    arrays = {"input_ids": ids, "attention_mask": mask, "positions": np.maximum(np.cumsum(mask, 1) - 1, 0),
              "segment_ids": mask.astype(np.int32), "targets": targets, "loss_mask": loss_mask.astype(np.float32)}
    graphdef, state = nnx.split(model)

    def chunked(state):
        total, count, _ = sft_loss(nnx.merge(graphdef, state), arrays)
        return total / count

    def plain(state):
        m = nnx.merge(graphdef, state)
        logp = jax.nn.log_softmax(m(ids, mask, arrays["positions"], arrays["segment_ids"]), axis=-1)
        picked = jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
        return -jnp.sum(picked * loss_mask) / loss_mask.sum()

    value, grads = jax.jit(jax.value_and_grad(chunked))(state)
    ref_value, ref_grads = jax.value_and_grad(plain)(state)
    assert float(value) == pytest.approx(float(ref_value), rel=1e-5)
    flat, ref_flat = dict(grads.flat_state()), dict(ref_grads.flat_state())
    assert set(flat) == set(ref_flat)
    for path, expected in ref_flat.items():
        expected = np.asarray(expected[...])
        np.testing.assert_allclose(np.asarray(flat[path][...]), expected, rtol=1e-5,
                                   atol=1e-5 * np.abs(expected).max(), err_msg=str(path))
    head = ("embed_tokens", "embedding") if tied else ("lm_head", "kernel")
    assert np.abs(np.asarray(flat[head][...])).max() > 0


@pytest.mark.parametrize("tied", [False, True])
def test_bfloat16_compute_matches_its_full_logits_and_float64_within_bf16_rounding(tied):
    """bfloat16 hidden states and head with float32 accumulation: equal to the same model's full logits to 1e-5
    (same arithmetic, another blocking) and to float64 to 1e-2 relative (bf16 rounds the inputs to 2^-9)."""
    model = make_model(tied, dtype=jnp.bfloat16)
    ids, mask, targets, gather, _ = batch()
    stats = jax.jit(lambda m: token_stats(m, ids, mask, chunk=7, targets=targets, gather_ids=gather, entropy=True,
                                          logsumexp=True))(model)
    plain = expected_stats(jax.nn.log_softmax(model(ids, mask), axis=-1), targets, gather, VOCAB)
    del plain["argmax"], plain["top_ids"], plain["top_logprobs"]
    assert_stats(stats, plain, rtol=1e-5, atol=1e-5)
    hidden = model.forward_hidden(ids, mask)[0]
    assert hidden.dtype == jnp.bfloat16
    reference = expected_stats(numpy_log_softmax(hidden, model.norm.scale[...], head_of(model)), targets, gather,
                               VOCAB)
    del reference["argmax"], reference["top_ids"], reference["top_logprobs"]
    assert_stats(stats, reference, rtol=1e-2, atol=1e-2)


def test_grpo_loss_and_entropy_metric_with_several_chunks_equal_the_full_logits():
    from forgetjax.losses.policy_gradient import policy_loss
    from forgetjax.methods.grpo import GRPO, GRPOArgs

    model = make_model(tied=False)
    set_logit_chunk(model, 4)
    ids, mask, targets, _, loss_mask = batch()
    rng = np.random.default_rng(3)
    arrays = {"input_ids": ids, "attention_mask": mask, "positions": np.maximum(np.cumsum(mask, 1) - 1, 0),
              "segment_ids": mask.astype(np.int32), "targets": targets, "loss_mask": loss_mask.astype(np.float32),
              "old_logp": np.asarray(-rng.random((B, T)) * 5, np.float32),
              "advantages": np.asarray([1.0, -0.5, 0.25], np.float32)}
    method = GRPO(GRPOArgs(group_size=3, max_new_tokens=T), None, "grpo")
    total, count, metrics = jax.jit(lambda m: method.loss(m, arrays, jax.random.key(0)))(model)
    logp = np.asarray(jax.nn.log_softmax(model(ids, mask, arrays["positions"], arrays["segment_ids"]), axis=-1),
                      np.float64)
    picked = np.take_along_axis(logp, targets[..., None], -1)[..., 0].astype(np.float32)
    ref_total, ref_count, _ = policy_loss(picked, arrays["old_logp"], None, arrays["advantages"],
                                          arrays["loss_mask"], variant="grpo", group_size=3)
    assert float(count) == float(ref_count)
    assert float(total) == pytest.approx(float(ref_total), rel=1e-5)
    entropy = -np.sum(np.exp(logp) * logp, axis=-1)
    assert float(metrics["entropy"][0]) == pytest.approx(float((entropy * loss_mask).sum()), rel=1e-5)
    assert float(metrics["entropy"][1]) == loss_mask.sum()


def test_chunk_size_is_validated_and_kept_through_split_and_merge():
    from forgetjax.training.trainer import TrainConfig

    model = make_model(tied=True, layers=1)
    assert get_logit_chunk(model) == 1024
    set_logit_chunk(model, 0)
    graphdef, state = nnx.split(model)
    assert get_logit_chunk(nnx.merge(graphdef, state)) == 0
    for bad in (-1, True, 2.5, None):
        with pytest.raises(ValueError, match="logit_chunk"):
            check_logit_chunk(bad)
    with pytest.raises(ValueError, match="logit_chunk"):
        TrainConfig(logit_chunk=-1).validate()


def test_backward_pass_holds_one_chunk_of_logits_not_the_whole_batch():
    """jit(grad) of the SFT loss over B x T = 32 x 256 tokens and V = 32000: the full-logits loss needs temporary
    buffers of several [B, T, V] float32 arrays (1000 MiB each); the chunked one (default 1024 tokens) well under
    one. (Short rows keep the attention's [B, H, T, T] buffers small beside the logits.)"""
    from forgetjax.losses.token import sft_loss

    b, t, vocab = 32, 256, 32000
    model = make_model(tied=False, vocab=vocab, layers=1)
    graphdef, state = nnx.split(model)
    arrays = {"input_ids": jnp.zeros((b, t), jnp.int32), "attention_mask": jnp.ones((b, t), bool),
              "positions": jnp.zeros((b, t), jnp.int32), "segment_ids": jnp.ones((b, t), jnp.int32),
              "targets": jnp.zeros((b, t), jnp.int32), "loss_mask": jnp.ones((b, t), jnp.float32)}

    def chunked(state, batch):
        return sft_loss(nnx.merge(graphdef, state), batch)[0]

    def plain(state, batch):
        m = nnx.merge(graphdef, state)
        logp = jax.nn.log_softmax(m(batch["input_ids"], batch["attention_mask"], batch["positions"],
                                    batch["segment_ids"]), axis=-1)
        return -jnp.sum(jnp.take_along_axis(logp, batch["targets"][..., None], -1))

    def temp_bytes(loss):
        return jax.jit(jax.grad(loss)).lower(state, arrays).compile().memory_analysis().temp_size_in_bytes

    logits_bytes = b * t * vocab * 4
    chunked_bytes, plain_bytes = temp_bytes(chunked), temp_bytes(plain)
    print(f"[B, T, V] f32 logits {logits_bytes / 2**20:.0f} MiB; backward temp: chunked "
          f"{chunked_bytes / 2**20:.0f} MiB, full logits {plain_bytes / 2**20:.0f} MiB")
    assert plain_bytes > logits_bytes
    assert chunked_bytes < logits_bytes / 2


@pytest.mark.parametrize("tied", [False, True])
def test_backward_temp_memory_scales_with_the_chunk(tied):
    """jit(grad) of vocab_stats' log-probs w.r.t. hidden, norm and head: temporary buffers within three chunks of
    float32 logits (a chunk's logits and their cotangent), a fraction of the [B, T, V] logits."""
    b, t, d, vocab, chunk = 2, 1024, 64, 32000, 256
    shape = jax.ShapeDtypeStruct
    head = shape((vocab, d) if tied else (d, vocab), jnp.float32)
    args = (shape((b, t, d), jnp.float32), shape((d,), jnp.float32), head, shape((b, t), jnp.int32))

    def loss(hidden, scale, head, targets):
        return jnp.sum(vocab_stats(hidden, scale, head, tied=tied, eps=EPS, chunk=chunk, targets=targets).logprobs)

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    chunk_bytes = chunk * vocab * 4
    print(f"chunk logits {chunk_bytes / 2**20:.0f} MiB, [B, T, V] {b * t * vocab * 4 / 2**20:.0f} MiB; backward temp "
          f"{temp / 2**20:.0f} MiB")
    assert temp < 3 * chunk_bytes


def _chunk_loops(t: int, chunk: int, b: int = 4, d: int = 8, vocab: int = 50):
    """(scan length, positions per chunk, whether anything is rematerialised) of vocab_stats' log-probs over [b, t]
    rows, read from its jaxpr; (0, t, False) when there is no scan."""
    S = jax.ShapeDtypeStruct
    args = (S((b, t, d), jnp.float32), S((d,), jnp.float32), S((d, vocab), jnp.float32), S((b, t), jnp.int32))

    def loss(hidden, scale, head, targets):
        return jnp.sum(vocab_stats(hidden, scale, head, tied=False, eps=EPS, chunk=chunk, targets=targets).logprobs)

    jaxpr = jax.make_jaxpr(loss)(*args).jaxpr
    names = {eqn.primitive.name for eqn in jaxpr.eqns}
    scans = [eqn for eqn in jaxpr.eqns if eqn.primitive.name == "scan"]
    if not scans:
        return 0, t, any(name.startswith(("checkpoint", "remat")) for name in names)
    hidden_xs = next(v.aval.shape for v in scans[0].invars if len(v.aval.shape) == 4 and v.aval.shape[-1] == d)
    remat = any(e.primitive.name.startswith(("checkpoint", "remat")) for e in scans[0].params["jaxpr"].jaxpr.eqns)
    return scans[0].params["length"], hidden_xs[2], remat


@pytest.mark.parametrize("t, chunk, chunks", [(384, 1024, 2), (13, 7 * 4 // 3, 7), (1000, 4 * 300, 4), (321, 512, 3)])
def test_chunks_are_balanced_so_padding_never_costs_a_chunk(t, chunk, chunks):
    """T is split into the fewest chunks of at most chunk // B positions, of equal width: fewer than one padded
    position per chunk (384 positions at 256 per chunk are 2 x 192, not 2 x 256 with 128 positions of padding whose
    logits would be computed, a third of the LM head's work wasted); every chunk is rematerialised."""
    length, width, remat = _chunk_loops(t, chunk)
    assert length == chunks and 0 <= length * width - t < length and width <= max(1, chunk // 4)
    assert remat


def test_a_single_chunk_is_neither_looped_nor_rematerialised():
    """When the whole batch fits one chunk the logits are computed once, as without chunking: rematerialising the only
    chunk would recompute the LM head in the backward pass and hold the same logits again."""
    assert _chunk_loops(384, 4 * 384) == (0, 384, False)
    assert _chunk_loops(384, 0) == (0, 384, False)


def nll_reference(hidden, scale, head, targets, weights):
    """sum(weights * -log p(targets)) over entries with weight > 0, from the full logits (plain autodiff)."""
    x = hidden * jax.lax.rsqrt(jnp.mean(hidden * hidden, axis=-1, keepdims=True) + EPS) * scale
    logp = jax.nn.log_softmax(jnp.dot(x, head), axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
    return jnp.sum(jnp.where(weights > 0, -picked * weights, 0.0))


def vocab_nll(hidden, scale, head, targets, weights, *, tied: bool, chunk: int):
    """The SFT loss through vocab_loss: (sum of weights x -log p(targets), the observed stats)."""
    return vocab_loss(hidden, scale, head, weighted_nll, (weights,), targets=targets, tied=tied, eps=EPS,
                      chunk=chunk)


def nll_inputs(seed: int = 5, rows: int = B, vocab: int = VOCAB):
    """Hidden states, norm scale, head [D, V], targets and float weights: zeros, fractions and a negative entry
    (not counted)."""
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.normal(size=(rows, T, HIDDEN)), jnp.float32)
    scale = jnp.asarray(1 + 0.3 * rng.normal(size=HIDDEN), jnp.float32)
    head = jnp.asarray(0.5 * rng.normal(size=(HIDDEN, vocab)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, vocab, (rows, T)), jnp.int32)
    weights = rng.random((rows, T)) * (rng.random((rows, T)) < 0.7)
    weights[0, 3] = -1.0
    return hidden, scale, head, targets, jnp.asarray(weights, jnp.float32)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("chunk", [0, 1, 7, 10_000])
def test_vocab_nll_and_its_gradients_equal_float64_and_full_logit_autodiff(tied, chunk):
    """The weighted NLL and argmax against float64 numpy; its gradients (the backward pass scaling the ones formed
    in the forward pass by a cotangent of 2.5) against autodiff of the full-logits NLL."""

    hidden, scale, head, targets, weights = nll_inputs()
    logp = numpy_log_softmax(hidden, scale, head)
    picked = np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]
    w = np.asarray(weights, np.float64)
    total, stats = jax.jit(lambda h, s, k: vocab_nll(h, s, k.T if tied else k, targets, weights, tied=tied,
                                                     chunk=chunk))(hidden, scale, head)
    argmax = stats.argmax
    assert float(total) == pytest.approx(float(np.sum(np.where(w > 0, -picked * w, 0.0))), rel=1e-5)
    np.testing.assert_array_equal(np.asarray(argmax), logp.argmax(-1))

    def fused(h, s, k):
        return 2.5 * vocab_nll(h, s, k.T if tied else k, targets, weights, tied=tied, chunk=chunk)[0]

    grads = jax.jit(jax.grad(fused, argnums=(0, 1, 2)))(hidden, scale, head)
    ref_grads = jax.grad(lambda h, s, k: 2.5 * nll_reference(h, s, k, targets, weights), argnums=(0, 1, 2))(
        hidden, scale, head)
    for name, got, expected in zip(("hidden", "norm scale", "head"), grads, ref_grads):
        assert float(jnp.max(jnp.abs(got))) > 0, name
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5,
                                   atol=1e-5 * float(jnp.max(jnp.abs(expected))), err_msg=name)
    assert float(jnp.max(jnp.abs(grads[0][0, 3]))) == 0.0  # the negative weight counts nothing


def logits_matmuls(jaxpr, rows: int) -> int:
    """dot_generals in a jaxpr (and its sub-jaxprs) whose output is a block of logits [rows, VOCAB]."""
    count = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general" and eqn.outvars[0].aval.shape == (rows, VOCAB):
            count += 1
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    count += logits_matmuls(sub.jaxpr, rows)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    count += logits_matmuls(sub, rows)
    return count


def test_vocab_nll_gradient_computes_each_chunks_logits_once():
    """The gradient of the chunked vocab_stats NLL projects each chunk twice (forward, then the rematerialised
    chunk in the backward pass); vocab_loss's once. Chunk 7 over B = 3 rows: 2 positions per row, 6-row blocks."""

    hidden, scale, head, targets, weights = nll_inputs()

    def fused(h, s, k):
        return vocab_nll(h, s, k, targets, weights, tied=False, chunk=7)[0]

    def rematerialised(h, s, k):
        stats = vocab_stats(h, s, k, tied=False, eps=EPS, chunk=7, targets=targets)
        return jnp.sum(jnp.where(weights > 0, -stats.logprobs * weights, 0.0))

    def matmuls(loss):
        return logits_matmuls(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(hidden, scale, head).jaxpr, 6)

    assert matmuls(rematerialised) == 2
    assert matmuls(fused) == 1


@pytest.mark.parametrize("tied", [False, True])
def test_vocab_nll_in_bfloat16_matches_the_autodiff_of_its_stats_within_bf16_rounding(tied):
    """bfloat16 hidden states, float32 norm and head (cast inside): the fused gradients equal autodiff through
    vocab_stats' chunks (the same arithmetic, the cotangent applied after the pull-back) within bf16 rounding."""

    hidden, scale, head, targets, weights = nll_inputs(6)
    hidden = hidden.astype(jnp.bfloat16)
    head = head.T if tied else head

    def fused(h, s, k):
        return vocab_nll(h, s, k, targets, weights, tied=tied, chunk=7)[0] / 10.0

    def through_stats(h, s, k):
        stats = vocab_stats(h, s, k, tied=tied, eps=EPS, chunk=7, targets=targets)
        return jnp.sum(jnp.where(weights > 0, -stats.logprobs * weights, 0.0)) / 10.0

    (value, grads), (ref_value, ref_grads) = (jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(hidden, scale, head)
                                              for f in (fused, through_stats))
    assert float(value) == pytest.approx(float(ref_value), rel=1e-5)
    assert grads[0].dtype == jnp.bfloat16
    for name, got, expected in zip(("hidden", "norm scale", "head"), grads, ref_grads):
        expected = np.asarray(expected, np.float32)
        np.testing.assert_allclose(np.asarray(got, np.float32), expected, rtol=1e-2, atol=1e-2 * np.abs(expected).max(),
                                   err_msg=name)


def test_vocab_nll_on_a_mesh_matches_float64_and_lays_the_head_gradient_out_like_the_head():
    """8 rows over data x fsdp = 4 shards, the head [D, V] over fsdp x tensor (V = 96): 6 tokens per device are 2
    positions per row, so T = 13 runs in 7 chunks; the value equals float64, the gradients plain autodiff, and the
    head's gradient keeps the head's layout, through vocab_loss and through vocab_stats' rematerialised chunks (the
    chunks' accumulated head gradient was replicated over fsdp before the head was constrained in the projection)."""
    from jax.sharding import NamedSharding

    from forgetjax.sharding import logical_to_spec, make_mesh, shard_batch

    hidden, scale, head, targets, weights = nll_inputs(7, rows=8, vocab=96)
    mesh = make_mesh(data=2, fsdp=2, tensor=2, devices=jax.devices()[:8])
    head_spec = logical_to_spec(("embed", "vocab"), head.shape, mesh)
    assert all(head_spec), head_spec  # both axes sharded: the layout check below means something

    def fused(h, s, k, targets, weights):
        return vocab_nll(h, s, k, targets, weights, tied=False, chunk=6)[0]

    def through_stats(h, s, k, targets, weights):
        stats = vocab_stats(h, s, k, tied=False, eps=EPS, chunk=6, targets=targets)
        return jnp.sum(jnp.where(weights > 0, -stats.logprobs * weights, 0.0))

    with jax.set_mesh(mesh):
        h, t, w = shard_batch((np.asarray(hidden), np.asarray(targets), np.asarray(weights)), mesh)
        k = jax.device_put(head, NamedSharding(mesh, head_spec))
        value, grads = jax.jit(jax.value_and_grad(fused, argnums=(0, 1, 2)))(h, scale, k, t, w)
        stats_head_grad = jax.jit(jax.grad(through_stats, argnums=2))(h, scale, k, t, w)
    logp = numpy_log_softmax(hidden, scale, head)
    picked = np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]
    expected = np.sum(np.where(np.asarray(weights) > 0, -picked * np.asarray(weights, np.float64), 0.0))
    assert float(value) == pytest.approx(float(expected), rel=1e-5)
    ref_grads = jax.grad(lambda h, s, k: nll_reference(h, s, k, targets, weights), argnums=(0, 1, 2))(
        hidden, scale, head)
    for name, got, ref in zip(("hidden", "norm scale", "head"), grads, ref_grads):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5,
                                   atol=1e-5 * float(jnp.max(jnp.abs(ref))), err_msg=name)
    for head_grad in (grads[2], stats_head_grad):
        assert head_grad.sharding.is_equivalent_to(NamedSharding(mesh, head_spec), 2), head_grad.sharding
    np.testing.assert_allclose(np.asarray(stats_head_grad), np.asarray(ref_grads[2]), rtol=1e-5,
                               atol=1e-5 * float(jnp.max(jnp.abs(ref_grads[2]))))


def curved_token_loss(logprobs, gathered, weights, coefficients):
    """A token-local loss, non-linear in log p(target) and in the gathered log-probs, with constant inputs, not 0
    where its inputs are (so positions padded onto a chunk would count)."""
    curved = weights * (logprobs**2 + 0.5 * jnp.exp(logprobs)) + 0.1 * logprobs
    return curved + jnp.sum(coefficients * gathered * jnp.tanh(gathered), axis=-1)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("chunk", [0, 7])
def test_vocab_loss_of_targets_and_gathered_ids_matches_float64_and_full_logit_autodiff(tied, chunk):
    """A non-linear token-local loss of log p(targets) and log p(gather_ids): its value (undifferentiated and
    differentiated) and the observed stats against float64 numpy, its gradients (cotangent 1.7) against autodiff
    through the full logits; the stats carry no gradient."""
    hidden, scale, head, targets, weights = nll_inputs(8)
    _, _, _, gather, _ = batch(9)
    coefficients = jnp.asarray(np.random.default_rng(10).normal(size=(B, T, K)), jnp.float32)
    head_arg = head.T if tied else head

    def fused(h, s, k):
        return vocab_loss(h, s, k, curved_token_loss, (weights, coefficients), targets=targets, gather_ids=gather,
                          tied=tied, eps=EPS, chunk=chunk, entropy=True)

    total, stats = jax.jit(fused)(hidden, scale, head_arg)
    logp = numpy_log_softmax(hidden, scale, head)
    expected = expected_stats(logp, np.asarray(targets), gather, VOCAB)
    c, w = np.asarray(coefficients, np.float64), np.asarray(weights, np.float64)
    lp, g = expected["logprobs"], expected["gathered"]
    expected_total = np.sum(w * (lp**2 + 0.5 * np.exp(lp)) + 0.1 * lp + np.sum(c * g * np.tanh(g), -1))
    assert float(total) == pytest.approx(float(expected_total), rel=1e-5)
    for name in ("logprobs", "entropy", "gathered"):
        np.testing.assert_allclose(np.asarray(getattr(stats, name)), expected[name], rtol=1e-5, atol=1e-5,
                                   err_msg=name)
    np.testing.assert_array_equal(np.asarray(stats.argmax), expected["argmax"])

    def full_logits(h, s, k):
        x = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + EPS) * s
        log_softmax = jax.nn.log_softmax(jnp.dot(x, k), axis=-1)
        picked = jnp.take_along_axis(log_softmax, targets[..., None], -1)[..., 0]
        return 1.7 * jnp.sum(curved_token_loss(picked, jnp.take_along_axis(log_softmax, gather, -1), weights,
                                               coefficients))

    value, grads = jax.jit(jax.value_and_grad(lambda h, s, k: 1.7 * fused(h, s, k)[0], argnums=(0, 1, 2)))(
        hidden, scale, head_arg)
    assert float(value) == pytest.approx(1.7 * float(expected_total), rel=1e-5)  # the differentiated pass's value
    ref_grads = jax.grad(full_logits, argnums=(0, 1, 2))(hidden, scale, head)
    for name, got, ref in zip(("hidden", "norm scale", "head"), grads, ref_grads):
        got = got.T if (tied and name == "head") else got
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5,
                                   atol=1e-5 * float(jnp.max(jnp.abs(ref))), err_msg=name)
    observed = jax.grad(lambda h: jnp.sum(fused(h, scale, head_arg)[1].logprobs))(hidden)
    assert float(jnp.max(jnp.abs(observed))) == 0.0


def method_batch(seed: int = 3):
    """A GRPO batch over `batch()`'s rows: old and reference log-probs, one advantage per row."""
    ids, mask, targets, _, loss_mask = batch()
    rng = np.random.default_rng(seed)
    return {"input_ids": ids, "attention_mask": mask, "positions": np.maximum(np.cumsum(mask, 1) - 1, 0),
            "segment_ids": mask.astype(np.int32), "targets": targets, "loss_mask": loss_mask.astype(np.float32),
            "old_logp": np.asarray(-rng.random((B, T)) * 5, np.float32),
            "ref_logp": np.asarray(-rng.random((B, T)) * 5, np.float32),
            "advantages": np.asarray([1.0, -0.5, 0.25], np.float32)}


def full_logit_logprobs(model, arrays):
    """log p(targets) [B, T] from the model's full logits (plain autodiff)."""
    logp = jax.nn.log_softmax(model(arrays["input_ids"], arrays["attention_mask"], arrays["positions"],
                                    arrays["segment_ids"]), axis=-1)
    return jnp.take_along_axis(logp, arrays["targets"][..., None], -1)[..., 0]


def assert_same_gradients(grads, ref_grads) -> None:
    flat, ref_flat = dict(grads.flat_state()), dict(ref_grads.flat_state())
    assert set(flat) == set(ref_flat)
    for path, expected in ref_flat.items():
        expected = np.asarray(expected[...])
        assert np.abs(expected).max() > 0, path
        np.testing.assert_allclose(np.asarray(flat[path][...]), expected, rtol=1e-5,
                                   atol=1e-5 * np.abs(expected).max(), err_msg=str(path))


@pytest.mark.parametrize("variant,beta", [("grpo", 0.0), ("grpo", 0.2), ("drgrpo", 0.2), ("frpo", 0.2)])
def test_grpo_method_loss_and_parameter_gradients_equal_policy_loss_of_the_full_logits(variant, beta):
    """GRPO and Dr.GRPO (one pass over the vocabulary, head_loss) and FRPO (chunked log-probs, then the loss): the
    method's loss and every parameter's gradient against policy_loss of the full logits' log-probs, autodiff."""
    from forgetjax.losses.policy_gradient import policy_loss
    from forgetjax.methods.grpo import GRPO, GRPOArgs

    model = make_model(tied=False)
    set_logit_chunk(model, 4)
    arrays = method_batch()
    logp = np.asarray(full_logit_logprobs(model, arrays))
    rng = np.random.default_rng(4)  # ratios about 1, so both clip bounds bind somewhere, and a KL of about 0.1
    arrays["old_logp"] = np.asarray(logp + rng.normal(scale=0.4, size=logp.shape), np.float32)
    arrays["ref_logp"] = np.asarray(logp + rng.normal(scale=0.5, size=logp.shape), np.float32)
    ratio = np.exp(logp - arrays["old_logp"])[arrays["loss_mask"] > 0]
    assert (ratio > 1.3).any() and (ratio < 0.8).any() and ((ratio > 0.8) & (ratio < 1.2)).any()
    args = GRPOArgs(group_size=3, max_new_tokens=T, beta=beta, clip_low=0.2, clip_high=0.3)
    method = GRPO(args, None, variant)
    graphdef, state = nnx.split(model)
    kwargs = dict(variant=variant, beta=beta, clip_low=0.2, clip_high=0.3, generation_budget=T, group_size=3)

    def through_method(state):
        total, count, _ = method.loss(nnx.merge(graphdef, state), arrays, jax.random.key(0))
        return total / count

    def full_logits(state):
        total, count, _ = policy_loss(full_logit_logprobs(nnx.merge(graphdef, state), arrays), arrays["old_logp"],
                                      arrays["ref_logp"], arrays["advantages"], arrays["loss_mask"], **kwargs)
        return total / count

    value, grads = jax.jit(jax.value_and_grad(through_method))(state)
    ref_value, ref_grads = jax.value_and_grad(full_logits)(state)
    assert float(value) == pytest.approx(float(ref_value), rel=1e-5)
    assert_same_gradients(grads, ref_grads)


def test_kd_token_loss_through_the_vocabulary_pass_equals_ce_plus_sparse_kd_of_the_full_logits():
    """SF-SFT's loss with top-k KD (kd_token_loss through head_loss): value and parameter gradients against
    CE + kd_weight x sparse_kd_loss of the full logits, autodiff."""
    from forgetjax.losses.token import cross_entropy_loss
    from forgetjax.methods.distill import kd_token_loss, sparse_kd_loss
    from forgetjax.models.vocab import head_loss

    model = make_model(tied=True)
    set_logit_chunk(model, 5)
    arrays = method_batch()
    _, _, _, gather, _ = batch(11)
    teacher = np.asarray(jax.nn.log_softmax(np.random.default_rng(12).normal(size=(B, T, K)) * 2, axis=-1),
                         np.float32)
    weights = arrays["loss_mask"]
    graphdef, state = nnx.split(model)
    token_loss = functools.partial(kd_token_loss, kd_weight=0.7, beta=0.3, temperature=1.5)

    def fused(state):
        m = nnx.merge(graphdef, state)
        hidden, _, _ = m.forward_hidden(arrays["input_ids"], arrays["attention_mask"], arrays["positions"],
                                        arrays["segment_ids"])
        return head_loss(m, hidden, token_loss, (weights, teacher), targets=arrays["targets"],
                         gather_ids=gather)[0]

    def full_logits(state):
        m = nnx.merge(graphdef, state)
        logits = m(arrays["input_ids"], arrays["attention_mask"], arrays["positions"], arrays["segment_ids"])
        ce = cross_entropy_loss(logits, arrays["targets"], weights)[0]
        return ce + 0.7 * sparse_kd_loss(logits, gather, teacher, weights, beta=0.3, temperature=1.5)[0]

    value, grads = jax.jit(jax.value_and_grad(fused))(state)
    ref_value, ref_grads = jax.value_and_grad(full_logits)(state)
    assert float(value) == pytest.approx(float(ref_value), rel=1e-5)
    assert_same_gradients(grads, ref_grads)
