"""The on-device sampler against HF `generate` (greedy, float32), teacher-forced logprobs and a NumPy filter."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import forgetjax
from forgetjax.models.decoder import KVCache
from forgetjax.sampling import sampler as sampler_module
from forgetjax.sampling.sampler import Sampler, SamplingParams, filter_logits
from tiny_models import QWEN2_SHAPES, make_hf_model


def _hf_greedy(hf, prompts, max_new_tokens, pad_id, eos_id):
    import torch

    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, np.int64)
    mask = np.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    with torch.no_grad():
        out = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=max_new_tokens,
                          do_sample=False, pad_token_id=pad_id, eos_token_id=eos_id)
    rows = []
    for row in out[:, width:].numpy():
        row = list(row)
        rows.append(row[:row.index(eos_id) + 1] if eos_id in row else row)
    return rows


_LOG_SOFTMAX_FORWARD = nnx.jit(lambda model, ids: jax.nn.log_softmax(model(ids), axis=-1))


def _teacher_forced_logprobs(model, prompt, completion):
    """Log-probs of `completion` after `prompt` from one plain forward pass (no cache). The row is right-padded to a
    multiple of 64 so that every call compiles one program; padding after the sequence cannot reach its causal
    positions."""
    sequence = list(prompt) + list(completion)
    ids = np.zeros((1, -(-len(sequence) // 64) * 64), np.int32)
    ids[0, :len(sequence)] = sequence
    logp = np.asarray(_LOG_SOFTMAX_FORWARD(model, ids)[0])
    return np.array([logp[len(prompt) - 1 + t, tok] for t, tok in enumerate(completion)])


@pytest.mark.parametrize("shape, decode_attention", [
    ("gqa2_untied", "xla"), ("gqa1_tied", "xla"), ("gqa1_tied", "paged"),
    pytest.param("gqa2_untied", "ragged", marks=pytest.mark.slow)])  # CI: the sharded ragged test below
def test_greedy_matches_hf_generate_on_left_padded_batch(tmp_path, shape, decode_attention):
    """Greedy tokens equal HF's and their log-probs a teacher-forced pass, with decode steps attending through XLA,
    the Pallas ragged kernel or the TPU paged kernel over a PagedKVCache (both interpreted on CPU; the cache is
    sized to their blocks). The paged kernel rounds keys and values to bfloat16 as it loads them: its log-probs
    are held to 2e-3, the others to 1e-4."""
    hf = make_hf_model(tmp_path, "qwen2", **QWEN2_SHAPES[shape])
    model, _ = forgetjax.load(tmp_path)
    model.decode_attention = decode_attention
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(3, 151, size=n)) for n in (7, 2, 12, 5)]
    sampler = Sampler(model, None)
    out = sampler.generate_tokens(prompts, SamplingParams(max_new_tokens=10, stop_token_ids=(2,)))
    expected = _hf_greedy(hf, prompts, 10, pad_id=0, eos_id=2)
    for i, ref in enumerate(expected):
        assert list(out.tokens[i, :out.lengths[i]]) == ref
    for i, prompt in enumerate(prompts):
        completion = out.tokens[i, :out.lengths[i]]
        np.testing.assert_allclose(out.logprobs[i, :out.lengths[i]],
                                   _teacher_forced_logprobs(model, prompt, completion),
                                   atol=2e-3 if decode_attention == "paged" else 1e-4)


@pytest.mark.parametrize("decode_attention", ["ragged", "paged"])
def test_kernel_decode_on_a_mesh_matches_hf_generate(tmp_path, decode_attention):
    """The ragged (paged) kernel inside the sharded decode loop (rows over data, heads over tensor): HF's greedy
    tokens."""
    from forgetjax.sharding import make_mesh

    if len(jax.devices()) < 4:
        pytest.skip("needs 4 simulated devices")
    hf = make_hf_model(tmp_path, "qwen2", **QWEN2_SHAPES["gqa2_untied"])
    mesh = make_mesh(data=2, fsdp=1, tensor=2, devices=jax.devices()[:4])
    model, _ = forgetjax.load(tmp_path, mesh=mesh)
    model.decode_attention = decode_attention
    rng = np.random.default_rng(1)
    prompts = [list(rng.integers(3, 151, size=n)) for n in (9, 3, 14, 6)]
    out = Sampler(model, None, mesh=mesh).generate_tokens(prompts, SamplingParams(max_new_tokens=10,
                                                                                  stop_token_ids=(2,)))
    for i, ref in enumerate(_hf_greedy(hf, prompts, 10, pad_id=0, eos_id=2)):
        assert list(out.tokens[i, :out.lengths[i]]) == ref


def test_sampled_logprobs_equal_teacher_forced_and_seed_reproducible(tmp_path):
    make_hf_model(tmp_path, "qwen2")
    model, _ = forgetjax.load(tmp_path)
    sampler = Sampler(model, None)
    prompts = [[5, 6, 7, 8], [9, 10]]
    params = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9, top_k=50, n=3, seed=7,
                            stop_token_ids=(2,))
    out = sampler.generate_tokens(prompts, params)
    assert out.tokens.shape[0] == 6
    for row in range(6):
        prompt = prompts[row // 3]
        completion = out.tokens[row, :out.lengths[row]]
        np.testing.assert_allclose(out.logprobs[row, :out.lengths[row]],
                                   _teacher_forced_logprobs(model, prompt, completion), atol=1e-4)
    again = sampler.generate_tokens(prompts, params)
    assert np.array_equal(again.tokens, out.tokens)
    other = sampler.generate_tokens(prompts, SamplingParams(**{**params.__dict__, "seed": 8}))
    assert not np.array_equal(other.tokens, out.tokens)


def test_no_recompilation_within_a_bucket(tmp_path):
    make_hf_model(tmp_path, "qwen2")
    model, _ = forgetjax.load(tmp_path)
    sampler = Sampler(model, None)
    params = SamplingParams(max_new_tokens=4, stop_token_ids=(2,))
    sampler.generate_tokens([[3, 4, 5], [6, 7]], params)
    before = sampler_module._generate._cache_size()
    sampler.generate_tokens([[8, 9, 10, 11, 12], [13]], params)
    sampler.generate_tokens([[14, 15, 16, 17, 18, 19, 20], [21]], SamplingParams(max_new_tokens=4, temperature=0.5,
                                                                                top_p=0.8, stop_token_ids=(2,)))
    assert sampler_module._generate._cache_size() == before
    sampler.generate_tokens([[3]] * 3, params)
    assert sampler_module._generate._cache_size() == before + 1


def test_decode_step_reads_each_layer_cache_in_place(tmp_path):
    """XLA:CPU's compiled decode step moves no layer's cache slice: no transpose or copy of a [B, Hkv, S, D] array
    (with the cache stored slots before heads, every layer's K and V slices were transposed every step)."""
    make_hf_model(tmp_path, "qwen2")
    model, _ = forgetjax.load(tmp_path)
    batch, slots, cfg = 3, 40, model.config
    cache = KVCache.init(cfg, batch, slots)
    step = nnx.jit(lambda m, token, c: m(token, None, cache=c))
    text = step.lower(model, jnp.ones((batch, 1), jnp.int32), cache).compile().as_text()
    layer_slice = sorted((batch, cfg.num_kv_heads, slots, cfg.head_dim))
    moved = [line.strip() for line in text.splitlines()
             if (m := re.search(r"= \w+\[([0-9,]+)\]\S* (?:transpose|copy)\(", line))
             and sorted(int(n) for n in m.group(1).split(",")) == layer_slice]
    assert not moved, moved


def _numpy_filter(logits, temperature, top_k, top_p):
    out = []
    for row in logits / temperature:
        keep = np.ones_like(row, bool)
        if top_k:
            keep &= row >= np.sort(row)[::-1][top_k - 1]
        row = np.where(keep, row, -np.inf)  # top-k first, then nucleus on the renormalised rest (as HF)
        order = np.argsort(-row)
        probs = np.exp(row[order] - row[order].max())
        probs /= probs.sum()
        before = np.cumsum(probs) - probs
        nucleus = np.zeros_like(keep)
        nucleus[order[before < top_p]] = True
        if top_p >= 1.0:
            nucleus[:] = True
        out.append(np.where(keep & nucleus, row, -np.inf))
    return np.array(out)


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (5, 1.0), (0, 0.6), (7, 0.8)])
def test_filter_logits_matches_numpy(top_k, top_p):
    logits = np.random.default_rng(1).normal(size=(3, 40)).astype(np.float32) * 3
    actual = np.asarray(filter_logits(logits, np.float32(0.7), top_k, np.float32(top_p)))
    expected = _numpy_filter(logits.astype(np.float64), 0.7, top_k, top_p)
    assert np.array_equal(np.isinf(actual), np.isinf(expected))
    np.testing.assert_allclose(actual[~np.isinf(actual)], expected[~np.isinf(expected)], rtol=1e-6)


@pytest.mark.real_model
def test_smollm2_greedy_matches_hf_generate(smollm2, smollm2_hf):
    model, tokenizer = smollm2
    hf = smollm2_hf
    sampler = Sampler(model, tokenizer)
    questions = ["What is the capital of Australia?", "Name three primary colors.", "Hi"]
    prompts = [sampler.encode_chat([{"role": "user", "content": q}]) for q in questions]
    out = sampler.generate_tokens(prompts, SamplingParams(max_new_tokens=24))
    expected = _hf_greedy(hf, prompts, 24, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id)
    for i, ref in enumerate(expected):
        assert list(out.tokens[i, :out.lengths[i]]) == ref
    assert "Canberra" in out.texts[0]
