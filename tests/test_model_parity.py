"""forgetjax logits vs HF torch (Qwen2ForCausalLM / LlamaForCausalLM) on tiny random configs, float32."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import forgetjax
from forgetjax.models.decoder import KVCache
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
