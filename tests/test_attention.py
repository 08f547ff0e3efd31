"""Attention dispatch (`forgetjax.models.attention`) against a NumPy reference written from the definition: left
and right padding, packed segments, grouped-query heads, the splash kernel (Pallas interpreter on CPU, plain and
under a mesh), and attention over a KV cache."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from forgetjax.models import attention as attn


def reference(q, k, v, allowed):
    """softmax(q k^T / sqrt(d) masked by `allowed` [B, T, S]) v in float64; query head h uses kv head h // group."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, t, hq, d = q.shape
    group = hq // k.shape[2]
    out = np.zeros((b, t, hq, d))
    for h in range(hq):
        scores = np.einsum("btd,bsd->bts", q[:, :, h], k[:, :, h // group]) / np.sqrt(d)
        scores = np.where(allowed, scores, -np.inf)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        out[:, :, h] = np.einsum("bts,bsd->btd", weights, v[:, :, h // group])
    return out


def same_segment_causal(segments):
    t = segments.shape[1]
    return np.tril(np.ones((t, t), bool))[None] & (segments[:, :, None] == segments[:, None, :])


def qkv(b, t, hq, hkv, d, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(keys[0], (b, t, hq, d)), jax.random.normal(keys[1], (b, t, hkv, d)),
            jax.random.normal(keys[2], (b, t, hkv, d)))


def padded_and_packed_segments(t):
    left = np.r_[np.zeros(5), np.ones(t - 5)]
    right = np.r_[np.ones(t - 7), np.zeros(7)]
    packed = np.r_[np.full(t // 3, 1), np.full(t // 3, 2), np.full(t - 2 * (t // 3) - 3, 3), np.zeros(3)]
    return np.stack([left, right, packed]).astype(np.int32)


def real_rows(out, segments):
    return np.asarray(out)[segments > 0]


def test_segments_encode_padding_and_packing():
    mask = jnp.array([[False, True, True], [True, True, False]])
    np.testing.assert_array_equal(attn.segments_from(mask, None, mask.shape), [[0, 1, 1], [1, 1, 0]])
    packed = jnp.array([[1, 1, 2], [1, 2, 0]])
    np.testing.assert_array_equal(attn.segments_from(packed > 0, packed, mask.shape), [[2, 2, 3], [2, 3, 0]])


@pytest.mark.parametrize("hq,hkv", [(4, 4), (6, 2), (4, 1)])
def test_xla_attention_matches_reference_with_padding_and_packing(hq, hkv):
    t = 24
    segments = padded_and_packed_segments(t)
    q, k, v = qkv(3, t, hq, hkv, 16)
    out = attn.attention(q, k, v, jnp.asarray(segments), "xla").reshape(3, t, hq, 16)
    expected = reference(q, k, v, same_segment_causal(segments))
    np.testing.assert_allclose(real_rows(out, segments), real_rows(expected, segments), rtol=1e-5, atol=1e-5)


def test_unmasked_attention_is_plain_causal():
    q, k, v = qkv(2, 16, 4, 2, 8, seed=1)
    out = attn.attention(q, k, v, None, "xla").reshape(2, 16, 4, 8)
    np.testing.assert_allclose(out, reference(q, k, v, np.tril(np.ones((16, 16), bool))[None]), rtol=1e-5,
                               atol=1e-5)


def test_xla_attention_keeps_no_probabilities_for_the_backward_pass():
    """The backward pass recomputes the scores: the residuals saved by the forward are q, k, v-sized, not T x T."""
    b, t, h, d = 1, 512, 4, 8
    q, k, v = qkv(b, t, h, h, d)
    segments = jnp.ones((b, t), jnp.int32)
    _, residuals = jax.vjp(lambda q, k, v: attn.attention(q, k, v, segments, "xla"), q, k, v)
    largest = max(np.prod(leaf.shape) for leaf in jax.tree.leaves(residuals))
    assert largest < b * h * t * t / 8, largest


def test_splash_kernel_matches_reference_and_its_gradients():
    """The TPU splash kernel, run by the Pallas interpreter on CPU: outputs and input gradients equal the reference
    attention's (padding, packing and GQA)."""
    t = 256
    segments = padded_and_packed_segments(t)
    q, k, v = qkv(3, t, 4, 2, 32, seed=2)
    seg = jnp.asarray(segments)
    out = attn._splash_attention(q, k, v, seg, interpret=True)
    expected = reference(q, k, v, same_segment_causal(segments))
    np.testing.assert_allclose(real_rows(out, segments), real_rows(expected, segments), rtol=2e-5, atol=2e-5)

    weight = jnp.asarray(segments > 0, jnp.float32)[:, :, None, None]

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v).reshape(q.shape) * weight * jnp.cos(q))

    grads = jax.grad(loss(lambda q, k, v: attn._splash_attention(q, k, v, seg, interpret=True)), (0, 1, 2))(q, k, v)
    ref_grads = jax.grad(loss(lambda q, k, v: attn._grouped_softmax_attention(
        q, k, v, attn._same_segment_causal(seg, t))), (0, 1, 2))(q, k, v)
    for got, want in zip(grads, ref_grads):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_splash_kernel_under_a_mesh_runs_per_shard():
    from forgetjax.sharding import make_mesh

    if len(jax.devices()) < 4:
        pytest.skip("needs 4 simulated devices")
    mesh = make_mesh(data=2, fsdp=1, tensor=2, devices=jax.devices()[:4])
    t = 128
    segments = np.ones((2, t), np.int32)
    segments[1, :9] = 0
    q, k, v = qkv(2, t, 4, 2, 16, seed=3)
    with jax.set_mesh(mesh):
        out = jax.jit(lambda q, k, v, s: attn._splash_attention(q, k, v, s, interpret=True))(
            q, k, v, jnp.asarray(segments))
    expected = reference(q, k, v, same_segment_causal(segments))
    np.testing.assert_allclose(real_rows(out, segments), real_rows(expected, segments), rtol=2e-5, atol=2e-5)


def test_cached_attention_equals_attention_over_the_concatenated_sequence():
    """New tokens (left-padded) over a cache with holes equal the reference over cache slots + new tokens."""
    b, s, t, hq, hkv, d = 2, 10, 3, 4, 2, 8
    keys = jax.random.split(jax.random.key(4), 5)
    q = jax.random.normal(keys[0], (b, t, hq, d))
    k_new, v_new = jax.random.normal(keys[1], (b, t, hkv, d)), jax.random.normal(keys[2], (b, t, hkv, d))
    k_cache, v_cache = jax.random.normal(keys[3], (b, s, hkv, d)), jax.random.normal(keys[4], (b, s, hkv, d))
    cache_valid = np.zeros((b, s), bool)
    cache_valid[0, 2:6] = True
    cache_valid[1, 4:6] = True
    new_real = np.array([[True, True, True], [False, True, True]])
    out = attn.cached_attention(q, k_new, v_new, jnp.asarray(new_real, jnp.int32), k_cache.transpose(0, 2, 1, 3),
                                v_cache.transpose(0, 2, 1, 3), jnp.asarray(cache_valid))
    allowed = np.concatenate([np.repeat(cache_valid[:, None], t, 1),
                              np.tril(np.ones((t, t), bool))[None] & new_real[:, None, :]], axis=-1)
    expected = reference(q, jnp.concatenate([k_cache, k_new], 1), jnp.concatenate([v_cache, v_new], 1), allowed)
    got = np.asarray(out).reshape(b, t, hq, d)
    np.testing.assert_allclose(got[new_real], expected[new_real], rtol=1e-5, atol=1e-5)


def _decode_case(b, s, hq, hkv, d, starts, filled, seed):
    """One new token per row over a cache whose rows hold real slots [start_r, filled); every other slot holds
    large garbage, so reading an unwritten or padding slot changes the output."""
    keys = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(keys[0], (b, 1, hq, d))
    k_new, v_new = jax.random.normal(keys[1], (b, 1, hkv, d)), jax.random.normal(keys[2], (b, 1, hkv, d))
    valid = np.zeros((b, s), bool)
    for row, start in enumerate(starts):
        valid[row, start:filled] = True
    garbage = np.where(valid[:, :, None, None], 1.0, 50.0)
    k_cache = np.asarray(jax.random.normal(keys[3], (b, s, hkv, d))) * garbage
    v_cache = np.asarray(jax.random.normal(keys[4], (b, s, hkv, d))) * garbage
    allowed = np.concatenate([valid[:, None], np.ones((b, 1, 1), bool)], axis=-1)
    expected = reference(q, np.concatenate([k_cache, k_new], 1), np.concatenate([v_cache, v_new], 1), allowed)
    cache = tuple(jnp.asarray(c.transpose(0, 2, 1, 3), jnp.float32) for c in (k_cache, v_cache))
    return (q, k_new, v_new, jnp.ones((b, 1), jnp.int32)) + cache + (jnp.asarray(valid),), expected


@pytest.mark.parametrize("hq, hkv, s, starts, filled", [
    (6, 2, 384, (0, 37, 200, 255), 256),   # three of the kernel's 128-slot programs skipped or partly masked
    (3, 3, 64, (5, 0, 63), 64),           # a full short cache (one program of 64 slots), a row with one slot
    (4, 1, 256, (9, 120), 129),           # multi-query; filled one past a program boundary
])
def test_ragged_decode_attention_reads_only_the_written_slots(hq, hkv, s, starts, filled):
    """The Pallas ragged kernel (interpreted on CPU) against the float64 reference over the real slots + the new
    token, and against the XLA path; garbage in padding and unwritten slots would show in either."""
    args, expected = _decode_case(len(starts), s, hq, hkv, 16, starts, filled, seed=len(starts))
    ragged = jax.jit(lambda *a: attn.cached_attention(*a, filled=filled, implementation="ragged"))(*args)
    xla = attn.cached_attention(*args)
    b = len(starts)
    np.testing.assert_allclose(np.asarray(ragged).reshape(b, hq, 16), expected[:, 0], rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(np.asarray(ragged), np.asarray(xla), rtol=2e-5, atol=2e-5)


def test_ragged_decode_attention_in_bfloat16():
    """bf16 q and cache: within bf16 rounding (the kernel's output and probabilities are rounded to bf16 once, as
    the XLA path rounds its probabilities) of the float64 reference of the same bf16 inputs."""
    args, _ = _decode_case(2, 256, 6, 2, 16, (3, 100), 180, seed=11)
    args = tuple(a.astype(jnp.bfloat16) if a.dtype == jnp.float32 else a for a in args)
    q, k_new, v_new, _, k_cache, v_cache, valid = args
    allowed = np.concatenate([np.asarray(valid)[:, None], np.ones((2, 1, 1), bool)], axis=-1)
    as64 = lambda a: np.asarray(a.astype(jnp.float32), np.float64)  # noqa: E731
    expected = reference(as64(q), np.concatenate([as64(k_cache).transpose(0, 2, 1, 3), as64(k_new)], 1),
                         np.concatenate([as64(v_cache).transpose(0, 2, 1, 3), as64(v_new)], 1), allowed)
    got = attn.cached_attention(*args, filled=180, implementation="ragged")
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float64).reshape(2, 6, 16), expected[:, 0], rtol=0.03, atol=0.03)


def test_ragged_decode_attention_under_a_mesh_runs_per_shard():
    from forgetjax.sharding import make_mesh

    if len(jax.devices()) < 4:
        pytest.skip("needs 4 simulated devices")
    mesh = make_mesh(data=2, fsdp=1, tensor=2, devices=jax.devices()[:4])
    args, expected = _decode_case(4, 128, 4, 2, 16, (0, 10, 60, 99), 100, seed=5)
    with jax.set_mesh(mesh):
        out = jax.jit(lambda *a: attn.cached_attention(*a, filled=100, implementation="ragged"))(*args)
    np.testing.assert_allclose(np.asarray(out).reshape(4, 4, 16), expected[:, 0], rtol=2e-5, atol=2e-5)


def test_ragged_decode_attention_refuses_what_it_cannot_do():
    args, _ = _decode_case(1, 40, 2, 1, 16, (0,), 10, seed=0)
    with pytest.raises(ValueError, match="multiple of 64"):
        attn.cached_attention(*args, filled=10, implementation="ragged")
    with pytest.raises(ValueError, match="needs `filled`"):
        attn.cached_attention(*args, implementation="ragged")
    with pytest.raises(ValueError, match="choose one of"):
        attn.cached_attention(*args, implementation="splash")
    with pytest.raises(ValueError, match="PagedKVCache"):
        attn.cached_attention(*args, implementation="paged")
    assert [attn.ragged_cache_length(n) for n in (10, 40, 64, 128, 129, 384, 400)] == [16, 64, 64, 128, 256, 384,
                                                                                       512]


def _bf16_exact(key, shape, scale=1.0):
    """Normal values that bfloat16 represents exactly: the paged kernel rounds keys and values to bfloat16 as it
    loads them, so with these (and any cache dtype) float32 tolerances apply."""
    return (scale * jax.random.normal(key, shape)).astype(jnp.bfloat16).astype(jnp.float32)


def _paged_case(b, s, hq, hkv, d, layers, lengths, seed, dtype=jnp.float32):
    """A paged cache [Hkv, layers, B, S, D] whose rows hold `lengths[b]` real tokens from slot 0 in every layer;
    every other slot holds large garbage, so reading an unwritten slot (or another layer's or row's) shows."""
    keys = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(keys[0], (b, 1, hq, d))
    k_new, v_new = _bf16_exact(keys[1], (b, 1, hkv, d)), _bf16_exact(keys[2], (b, 1, hkv, d))
    written = np.arange(s)[None, :] < np.asarray(lengths)[:, None]  # [B, S]
    garbage = np.where(written[None, None, :, :, None], 1.0, 64.0)
    pages = [np.asarray(_bf16_exact(key, (hkv, layers, b, s, d))) * garbage for key in keys[3:]]
    return q, k_new, v_new, [jnp.asarray(p, dtype) for p in pages], written


def _paged_expected(q, k_new, v_new, pages, written, layer):
    """The float64 reference over a row's written slots of `layer` and the new token."""
    k_rows, v_rows = (np.asarray(p, np.float64)[:, layer].transpose(1, 2, 0, 3) for p in pages)  # [B, S, Hkv, D]
    allowed = np.concatenate([written[:, None], np.ones((len(written), 1, 1), bool)], axis=-1)
    return reference(q, np.concatenate([k_rows, np.asarray(k_new)], 1), np.concatenate([v_rows, np.asarray(v_new)], 1),
                     allowed)


@pytest.mark.parametrize("hq, hkv, s, layers, lengths, layer", [
    (6, 2, 512, 3, (0, 37, 255, 256, 511), 1),  # two 256-slot blocks; rows ending at and just past a block
    (3, 3, 64, 2, (5, 63, 1), 0),               # one short block of one 64-slot page; a full row
    (4, 1, 32, 2, (9, 20), 1),                  # multi-query, pages of 32 slots
])
def test_paged_decode_attention_writes_the_new_token_and_reads_only_each_rows_slots(hq, hkv, s, layers, lengths,
                                                                                       layer):
    """jax's TPU paged kernel (TPU interpreter on CPU) against the float64 reference over the row's written slots +
    the new token; the new key and value land at slot lengths[b] of that layer and nothing else changes."""
    d = 16
    q, k_new, v_new, pages, written = _paged_case(len(lengths), s, hq, hkv, d, layers, lengths, seed=s + layer)
    out, k_pages, v_pages = jax.jit(attn.paged_decode_attention)(q, k_new, v_new, *pages, jnp.asarray(lengths),
                                                                 layer)
    expected = _paged_expected(q, k_new, v_new, pages, written, layer)
    np.testing.assert_allclose(np.asarray(out).reshape(len(lengths), hq, d), expected[:, 0], rtol=2e-5, atol=2e-5)
    for before, after, new in ((pages[0], k_pages, k_new), (pages[1], v_pages, v_new)):
        want = np.array(before)
        for row, n in enumerate(lengths):
            want[:, layer, row, n] = np.asarray(new)[row, 0]
        np.testing.assert_array_equal(np.asarray(after), want)


def test_paged_decode_attention_in_bfloat16():
    """A bf16 cache and q: within bf16 rounding of the float64 reference of the same bf16 inputs (the kernel
    rounds its output to the cache's dtype once), and the XLA path over the same slots agrees as closely."""
    lengths, d = (3, 100, 300), 16
    q, k_new, v_new, pages, written = _paged_case(3, 512, 6, 2, d, 2, lengths, seed=11, dtype=jnp.bfloat16)
    q, k_new, v_new = (a.astype(jnp.bfloat16) for a in (q, k_new, v_new))
    out, _, _ = attn.paged_decode_attention(q, k_new, v_new, *pages, jnp.asarray(lengths), 1)
    assert out.dtype == jnp.bfloat16
    as64 = lambda a: np.asarray(jnp.asarray(a, jnp.float32), np.float64)  # noqa: E731
    expected = _paged_expected(as64(q), as64(k_new), as64(v_new), [as64(p) for p in pages], written, 1)
    np.testing.assert_allclose(np.asarray(out, np.float64).reshape(3, 6, d), expected[:, 0], rtol=0.03, atol=0.03)


def test_paged_decode_attention_under_a_mesh_runs_per_shard():
    from forgetjax.sharding import make_mesh

    if len(jax.devices()) < 4:
        pytest.skip("needs 4 simulated devices")
    mesh = make_mesh(data=2, fsdp=1, tensor=2, devices=jax.devices()[:4])
    lengths = (0, 10, 60, 99)
    q, k_new, v_new, pages, written = _paged_case(4, 128, 4, 2, 16, 2, lengths, seed=5)
    with jax.set_mesh(mesh):
        out, k_pages, _ = jax.jit(attn.paged_decode_attention)(q, k_new, v_new, *pages, jnp.asarray(lengths), 1)
    expected = _paged_expected(q, k_new, v_new, pages, written, 1)
    np.testing.assert_allclose(np.asarray(out).reshape(4, 4, 16), expected[:, 0], rtol=2e-5, atol=2e-5)
    np.testing.assert_array_equal(np.asarray(k_pages)[:, 1, np.arange(4), list(lengths)],
                                  np.asarray(k_new)[:, 0].transpose(1, 0, 2))


def test_paged_decode_attention_refuses_what_it_cannot_do(monkeypatch):
    q, k_new, v_new, pages, _ = _paged_case(1, 48, 2, 1, 16, 1, (3,), seed=0)
    with pytest.raises(ValueError, match="sized by paged_geometry"):
        attn.paged_decode_attention(q, k_new, v_new, *pages, jnp.asarray([3]), 0)
    assert [attn.paged_geometry(n) for n in (10, 40, 64, 200, 256, 257, 600)] == [
        (16, 16, 1), (64, 64, 1), (64, 64, 1), (256, 64, 4), (256, 64, 4), (512, 64, 4), (768, 64, 4)]
    monkeypatch.setattr(attn.jax, "default_backend", lambda: "gpu")
    q, k_new, v_new, pages, _ = _paged_case(1, 64, 2, 1, 16, 1, (3,), seed=0)
    with pytest.raises(ValueError, match="on GPU use 'ragged' or 'xla'"):
        attn.paged_decode_attention(q, k_new, v_new, *pages, jnp.asarray([3]), 0)


@pytest.mark.parametrize("name, backend, refusal", [
    ("xla", "tpu", None), ("xla", "gpu", None), ("ragged", "gpu", None), ("ragged", "cpu", None),
    ("paged", "tpu", None), ("paged", "cpu", None), ("ragged", "tpu", "on TPU use 'paged' or 'xla'"),
    ("paged", "gpu", "on GPU use 'ragged' or 'xla'"), ("splash", "tpu", "choose one of")])
def test_decode_attention_is_checked_against_the_backend(name, backend, refusal):
    if refusal is None:
        assert attn.check_decode_attention(name, backend) == name
    else:
        with pytest.raises(ValueError, match=refusal):
            attn.check_decode_attention(name, backend)


def test_dispatch_picks_xla_on_cpu_and_refuses_impossible_requests():
    assert attn.choose_implementation("auto", dtype=jnp.bfloat16, head_dim=64, length=256) == "xla"
    with pytest.raises(ValueError, match="cuDNN attention needs a GPU"):
        attn.choose_implementation("cudnn", dtype=jnp.bfloat16, head_dim=64, length=256)
    with pytest.raises(ValueError, match="multiple of 128"):
        attn.choose_implementation("splash", dtype=jnp.float32, head_dim=64, length=100)
    with pytest.raises(ValueError, match="choose one of"):
        attn.choose_implementation("flash", dtype=jnp.float32, head_dim=64, length=128)


@pytest.mark.parametrize("backend, dtype, head_dim, length, kind", [
    ("gpu", jnp.bfloat16, 128, 2048, "cudnn"), ("gpu", jnp.float16, 64, 100, "cudnn"),
    ("gpu", jnp.float32, 128, 2048, "xla"), ("gpu", jnp.bfloat16, 260, 2048, "xla"),
    ("gpu", jnp.bfloat16, 60, 256, "xla"), ("tpu", jnp.bfloat16, 128, 1024, "splash"),
    ("tpu", jnp.float32, 64, 384, "splash"), ("tpu", jnp.bfloat16, 128, 1000, "xla"),
    ("cpu", jnp.bfloat16, 128, 1024, "xla")])
def test_dispatch_on_a_named_backend_follows_the_kernels_constraints(backend, dtype, head_dim, length, kind):
    """The rule `forgetjax plan` applies for a planned topology: cuDNN for bf16/f16 with head_dim % 8 == 0 and <= 256
    on GPUs, splash for lengths that are multiples of 128 on TPUs, XLA otherwise."""
    assert attn.choose_implementation("auto", dtype=dtype, head_dim=head_dim, length=length, backend=backend) == kind


@pytest.mark.parametrize("block", [8, 7, 24])
def test_xla_attention_by_query_blocks_matches_reference_and_its_gradients(block):
    """Rows longer than the query block are attended block by block (the last block padded when the length is not a
    multiple): outputs and gradients equal the NumPy reference / the unblocked path for padded and packed rows and
    unmasked ones."""
    t, hq, hkv, d = 24, 6, 2, 16
    segments = padded_and_packed_segments(t)
    q, k, v = qkv(3, t, hq, hkv, d, seed=2)
    out = attn._xla_attention(q, k, v, jnp.asarray(segments), block)
    expected = reference(q, k, v, same_segment_causal(segments))
    np.testing.assert_allclose(real_rows(out, segments), real_rows(expected, segments), rtol=1e-5, atol=1e-5)
    plain = attn._xla_attention(q, k, v, None, block)
    np.testing.assert_allclose(plain, reference(q, k, v, np.tril(np.ones((t, t), bool))[None]), rtol=1e-5, atol=1e-5)
    weights = jnp.asarray(segments > 0, jnp.float32)[:, :, None, None]

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)) * weights)

    blocked = jax.grad(loss(lambda q, k, v: attn._xla_attention(q, k, v, jnp.asarray(segments), block)),
                       (0, 1, 2))(q, k, v)
    whole = jax.grad(loss(lambda q, k, v: attn._grouped_softmax_attention(
        q, k, v, attn._same_segment_causal(jnp.asarray(segments), t))), (0, 1, 2))(q, k, v)
    for got, want in zip(blocked, whole):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_long_rows_hold_query_blocks_of_scores_not_the_whole_matrix():
    """The compiled forward of a 2048-token row in 512-query blocks holds a few [H, 512, T] float32 score blocks,
    less than one [H, T, T] matrix; in one block (the whole row) it holds at least one full matrix."""
    b, t, h, d = 1, 2048, 4, 16
    q, k, v = qkv(b, t, h, h, d)
    segments = jnp.ones((b, t), jnp.int32)

    def temp_bytes(block):
        compiled = jax.jit(lambda q, k, v: attn._xla_attention(q, k, v, segments, block)).lower(q, k, v).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    full_scores = b * h * t * t * 4
    assert temp_bytes(512) < full_scores <= temp_bytes(t)
