"""forgetjax logits vs HF torch (Qwen2ForCausalLM / LlamaForCausalLM) on tiny random configs, float32."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import forgetjax
from forgetjax.models.config import ModelConfig
from forgetjax.models.decoder import KVCache, PagedKVCache
from tiny_models import QWEN2_SHAPES, hf_logits, left_padded_batch, make_hf_model, max_relative_error

TOL = 1e-5


@pytest.mark.parametrize("shape", sorted(QWEN2_SHAPES))
def test_qwen2_logits_match_hf_with_left_padding(tmp_path, shape):
    hf = make_hf_model(tmp_path, "qwen2", **QWEN2_SHAPES[shape])
    model, _ = forgetjax.load(tmp_path)
    ids, mask = left_padded_batch(np.random.default_rng(1), [9, 4, 1, 7], vocab=151)
    expected = hf_logits(hf, ids, mask)
    actual = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    assert actual.dtype == np.float32
    assert max_relative_error(actual, expected, mask) <= TOL


@pytest.mark.parametrize("overrides", [
    dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
    dict(attention_bias=False, num_key_value_heads=1, head_dim=24, hidden_size=64, num_attention_heads=4),
    dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0}),
    dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 16, "rope_theta": 500000.0}, head_dim=32,
         num_attention_heads=2, num_key_value_heads=1),
])
def test_llama_logits_match_hf(tmp_path, overrides):
    hf = make_hf_model(tmp_path, "llama", **overrides)
    model, _ = forgetjax.load(tmp_path)
    ids, mask = left_padded_batch(np.random.default_rng(2), [6, 11], vocab=151)
    assert max_relative_error(np.asarray(model(ids, mask)), hf_logits(hf, ids, mask), mask) <= TOL


def test_packed_segments_equal_separate_sequences(tmp_path):
    hf = make_hf_model(tmp_path, "qwen2")
    model, _ = forgetjax.load(tmp_path)
    rng = np.random.default_rng(3)
    a, b = rng.integers(3, 151, size=5), rng.integers(3, 151, size=7)
    packed = np.concatenate([a, b])[None].astype(np.int32)
    segments = np.array([[1] * 5 + [2] * 7], np.int32)
    actual = np.asarray(model(packed, segment_ids=segments))[0]
    expected = np.concatenate([hf_logits(hf, a[None])[0], hf_logits(hf, b[None])[0]])
    assert max_relative_error(actual, expected) <= TOL


def test_kv_cache_prefill_and_decode_match_full_forward(tmp_path):
    hf = make_hf_model(tmp_path, "qwen2", **QWEN2_SHAPES["gqa1_tied"])
    model, _ = forgetjax.load(tmp_path)
    ids, mask = left_padded_batch(np.random.default_rng(4), [8, 5, 3], vocab=151)
    prompt_len, new = 5, 3
    expected = hf_logits(hf, ids, mask)
    cache = KVCache.init(model.config, batch=3, max_len=16)
    cached_forward = nnx.jit(lambda model, ids, mask, cache: model(ids, mask, cache=cache))  # one program per width
    logits, cache = cached_forward(model, ids[:, :prompt_len], mask[:, :prompt_len], cache)
    pieces = [np.asarray(logits)]
    for t in range(prompt_len, prompt_len + new):
        logits, cache = cached_forward(model, ids[:, t:t + 1], mask[:, t:t + 1], cache)
        pieces.append(np.asarray(logits))
    actual = np.concatenate(pieces, axis=1)
    assert int(cache.index) == prompt_len + new
    assert max_relative_error(actual, expected, mask) <= TOL


def test_paged_kv_cache_prefill_and_decode_match_hf(tmp_path):
    """decode_attention "paged": a left-padded prefill moved to the front of each row, then one-token steps
    (padding steps included, which write nothing) through the TPU paged kernel (interpreted on CPU), against HF's
    logits. Weights at std 0.3 make attention sharp enough for a RoPE shift of one position to show (relative
    error 0.79); the kernel rounds keys and values to bfloat16 as it loads them, so 3e-2 (measured 1.1e-2)."""
    hf = make_hf_model(tmp_path, "qwen2", initializer_range=0.3, **QWEN2_SHAPES["gqa2_untied"])
    model, _ = forgetjax.load(tmp_path)
    ids, mask = left_padded_batch(np.random.default_rng(4), [12, 7, 3], vocab=151)
    expected = hf_logits(hf, ids, mask)
    prompt_len = 5  # row 2's prompt is all padding; its first decode steps are padding too
    prefill = nnx.jit(lambda model, ids, mask, cache: model.prefill(ids, mask, cache)[:2])
    step = nnx.jit(lambda model, ids, mask, cache: model(ids, mask, cache=cache))
    for kind, tolerance in (("xla", TOL), ("paged", 3e-2)):
        model.decode_attention = kind
        cache = model.new_cache(3, ids.shape[1])
        hidden, cache = prefill(model, ids[:, :prompt_len], mask[:, :prompt_len], cache)
        pieces = [np.asarray(model.unembed(hidden))]
        for t in range(prompt_len, ids.shape[1]):
            logits, cache = step(model, ids[:, t:t + 1], mask[:, t:t + 1], cache)
            pieces.append(np.asarray(logits))
        assert max_relative_error(np.concatenate(pieces, axis=1), expected, mask) <= tolerance, kind
    np.testing.assert_array_equal(np.asarray(cache.lengths), mask.sum(axis=1))


def test_paged_kv_cache_writes_each_rows_real_tokens_in_order_from_its_length():
    cfg = ModelConfig(model_type="qwen2", vocab_size=11, hidden_size=8, intermediate_size=8, num_layers=2,
                      num_heads=2, num_kv_heads=1, head_dim=4, rope_theta=10000.0, rms_norm_eps=1e-6)
    cache = PagedKVCache.init(cfg, batch=3, max_len=10)
    assert cache.k.shape == (1, 2, 3, 16, 4)
    rng = np.random.default_rng(0)
    mask = np.array([[0, 0, 1, 1, 1], [1, 0, 1, 0, 1], [0, 0, 0, 0, 0]], bool)
    lengths = np.array([4, 0, 2], np.int32)
    cache = PagedKVCache(k=cache.k, v=cache.v, lengths=jnp.asarray(lengths))
    k = rng.normal(size=(2, 3, 5, 1, 4)).astype(np.float32)
    new = cache.written(jnp.asarray(k), jnp.asarray(-k), jnp.asarray(mask))
    expected = np.zeros((1, 2, 3, 16, 4), np.float32)
    for row in range(3):
        for offset, t in enumerate(np.flatnonzero(mask[row])):
            expected[0, :, row, lengths[row] + offset] = k[:, row, t, 0]
    np.testing.assert_array_equal(np.asarray(new.k), expected)
    np.testing.assert_array_equal(np.asarray(new.v), -expected)
    np.testing.assert_array_equal(np.asarray(new.lengths), lengths + mask.sum(axis=1))


def test_remat_and_bf16_compute(tmp_path):
    """Rematerialisation changes nothing in f32; bf16 compute stays within a loose, stated tolerance (5e-2)."""
    hf = make_hf_model(tmp_path, "qwen2")
    ids, mask = left_padded_batch(np.random.default_rng(5), [10, 6], vocab=151)
    expected = hf_logits(hf, ids, mask)
    remat_model, _ = forgetjax.load(tmp_path, remat="full")
    assert max_relative_error(np.asarray(remat_model(ids, mask)), expected, mask) <= TOL
    bf16_model, _ = forgetjax.load(tmp_path, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    actual = np.asarray(bf16_model(ids, mask))
    assert actual.dtype == np.float32
    assert max_relative_error(actual, expected, mask) <= 5e-2


@pytest.mark.parametrize("arch, overrides", [
    ("qwen2", QWEN2_SHAPES["gqa2_untied"]), ("qwen2", QWEN2_SHAPES["gqa1_tied"]),
    ("llama", dict(mlp_bias=True, attention_bias=True))])
@pytest.mark.parametrize("remat", ["none", "full"])
def test_sft_loss_gradients_match_hf_autograd(tmp_path, arch, overrides, remat):
    """Every parameter's gradient of the shipped SFT loss (masked mean token NLL over left-padded rows) equals HF
    torch autograd's in float32, to 2e-5 of each tensor's largest entry: the layer's backward pass (one copy of each
    normed input shared by its projections, SwiGLU's own vjp), the chunked vocabulary loss and remat."""
    import torch

    from forgetjax.convert.hf import hf_tensors
    from forgetjax.losses.token import sft_loss

    hf = make_hf_model(tmp_path, arch, **overrides)
    model, _ = forgetjax.load(tmp_path, remat=remat)
    ids, mask = left_padded_batch(np.random.default_rng(6), [9, 5, 7], vocab=151)
    targets = np.concatenate([ids[:, 1:], np.zeros((3, 1), np.int32)], axis=1)
    loss_mask = (mask & np.roll(mask, -1, axis=1)).astype(np.float32)
    loss_mask[:, -1] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    batch = {"input_ids": ids, "targets": targets, "loss_mask": loss_mask, "attention_mask": mask,
             "positions": positions, "segment_ids": mask.astype(np.int32)}

    def mean_nll(model):
        total, count, _ = sft_loss(model, batch)
        return total / count

    grads = nnx.jit(nnx.grad(mean_nll))(model)
    nnx.update(model, nnx.state(grads, nnx.Param))
    actual = dict(hf_tensors(model))

    hf.zero_grad()
    logits = hf(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask.astype(np.int64)),
                position_ids=torch.tensor(positions, dtype=torch.long)).logits
    picked = torch.log_softmax(logits, -1).gather(-1, torch.tensor(targets, dtype=torch.long)[..., None])[..., 0]
    weights = torch.tensor(loss_mask)
    (-(picked * weights).sum() / weights.sum()).backward()
    expected = {name: p.grad.numpy() for name, p in hf.named_parameters()}
    if "lm_head.weight" in actual and "lm_head.weight" not in expected:
        expected["lm_head.weight"] = expected["model.embed_tokens.weight"]
    assert set(actual) == set(expected)
    for name, value in expected.items():
        scale = np.abs(value).max()
        assert scale > 0, name
        assert np.abs(actual[name] - value).max() <= 2e-5 * scale, (name, np.abs(actual[name] - value).max() / scale)


def test_swiglu_gradient_in_bf16_is_within_bf16_rounding_of_float32_autodiff():
    """SwiGLU's own vjp with bf16 inputs against float64 autodiff of silu(gate) * up on the same values: within 1e-2
    of each gradient's largest entry (bf16 keeps 8 bits of mantissa), as close as bf16 autodiff of the expression."""
    import jax
    import jax.numpy as jnp

    from forgetjax.models.decoder import swiglu

    rng = np.random.default_rng(7)
    gate, up, grad = (jnp.asarray(rng.normal(scale=3.0, size=(64, 96)), jnp.bfloat16) for _ in range(3))

    def pulled_back(fn, dtype):
        _, vjp = jax.vjp(fn, gate.astype(dtype), up.astype(dtype))
        return [np.asarray(g, np.float64) for g in vjp(grad.astype(dtype))]

    with jax.enable_x64():
        reference = pulled_back(lambda g, u: jax.nn.silu(g) * u, jnp.float64)
    ours = pulled_back(swiglu, jnp.bfloat16)
    autodiff = pulled_back(lambda g, u: jax.nn.silu(g) * u, jnp.bfloat16)
    for mine, theirs, exact in zip(ours, autodiff, reference):
        scale = np.abs(exact).max()
        assert np.abs(mine - exact).max() <= 1e-2 * scale
        assert np.abs(mine - exact).max() <= 2 * np.abs(theirs - exact).max() + 1e-3 * scale


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_rms_norm_gradient_matches_hf_qwen2_rmsnorm_autograd(dtype):
    """RMSNorm's own vjp (it keeps x and the reciprocal RMS) against torch autograd of HF's Qwen2RMSNorm in float64
    on the same values (inputs [2, 8, 48] with a scale of one to a few hundred, float32 weights): float32 within 1e-5
    of each gradient's largest entry; bf16 inputs within 2e-2, and no further off than twice bf16 autodiff of the
    same expression."""
    import jax
    import torch
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    from forgetjax.models.decoder import rms_norm

    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2, 8, 48)) * rng.uniform(1, 300, size=(2, 8, 1)), dtype)
    scale = jnp.asarray(1 + 0.3 * rng.normal(size=48), jnp.float32)
    grad = jnp.asarray(rng.normal(size=(2, 8, 48)), dtype)

    norm = Qwen2RMSNorm(48, eps=1e-6).double()
    with torch.no_grad():
        norm.weight.copy_(torch.tensor(np.asarray(scale, np.float64)))
    x_ref = torch.tensor(np.asarray(x, np.float64), requires_grad=True)
    norm(x_ref).backward(torch.tensor(np.asarray(grad, np.float64)))
    exact = [x_ref.grad.numpy(), norm.weight.grad.numpy()]

    def pulled_back(fn):
        _, vjp = jax.vjp(lambda x, s: fn(x, s, 1e-6), x, scale)
        return [np.asarray(g, np.float64) for g in vjp(grad)]

    def autodiff_norm(x, s, eps):
        x32 = x.astype(jnp.float32)
        return s.astype(x.dtype) * (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + eps)).astype(x.dtype)

    ours, autodiff = pulled_back(rms_norm), pulled_back(autodiff_norm)
    for mine, theirs, reference in zip(ours, autodiff, exact):
        error = np.abs(mine - reference).max() / np.abs(reference).max()
        if dtype == "float32":
            assert error <= 1e-5, error
        else:
            assert error <= 2e-2, error
            assert error <= 2 * np.abs(theirs - reference).max() / np.abs(reference).max() + 1e-3, error
