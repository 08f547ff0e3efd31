"""Causal grouped-query attention, dispatched by backend: cuDNN flash attention on GPU, Pallas splash attention on
TPU, XLA elsewhere.

Every mask the project needs is expressed with segment ids: a query may attend to a key at the same or an earlier
slot in the same segment. Packed rows carry one segment per example; padding is segment 0, so a left- or
right-padded row is the segments `[0 .. 0 1 .. 1]` or `[1 .. 1 0 .. 0]`. Real tokens never see padding and padding
sees only padding (its outputs are ignored, but no row is ever fully masked, so no backend produces NaNs).

`attention` serves training, teacher-forced scoring and prefill (queries and keys are the same tokens);
`cached_attention` serves a step over a KV cache (queries are new tokens, keys are the cache plus the new tokens): in
XLA, reading every cache slot, or for one-token decode steps with jax's Pallas ragged decode-attention kernel
("ragged": Triton on GPU, the Pallas interpreter on CPU; refused on TPU), which reads only the slots written so far.
`paged_decode_attention` serves one-token steps over a `PagedKVCache` with jax's TPU paged-attention kernel ("paged":
Mosaic on TPU, the TPU interpreter on CPU; refused on GPU), which also reads only the written slots.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

Implementation = Literal["auto", "xla", "cudnn", "splash"]
IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")
DECODE_IMPLEMENTATIONS = ("xla", "ragged", "paged")
RAGGED_BLOCK = 128  # cache slots per program of the ragged decode kernel (a power of two, as Triton needs)
RAGGED_STEP = 64  # slots a program reads per iteration: a step reads the written slots rounded up to this

MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
_SPLASH_BLOCK = 128
XLA_QUERY_BLOCK = 512  # queries per block of the XLA path on long rows (see _xla_attention)
# float32 [B, Hq, query block, T] arrays the XLA path holds at once in a layer's backward pass (recomputed scores and
# probabilities, their gradients): 3 on XLA:CPU under remat dots and full (tests/test_memory.py)
XLA_SCORE_COPIES = 3


def segments_from(attention_mask: jax.Array | None, segment_ids: jax.Array | None, shape) -> jax.Array:
    """Segment ids [B, T] with 0 for padding: real tokens get `segment_ids + 1` (or 1 without packing)."""
    valid = jnp.ones(shape, bool) if attention_mask is None else attention_mask.astype(bool)
    if segment_ids is None:
        return valid.astype(jnp.int32)
    return jnp.where(valid, segment_ids.astype(jnp.int32) + 1, 0)


def choose_implementation(requested: Implementation, *, dtype, head_dim: int, length: int,
                          backend: str | None = None) -> str:
    """The backend kernel for this call. 'auto' picks cuDNN on GPU for bf16/f16 with a supported head size, splash
    on TPU when the length is a multiple of 128, and XLA otherwise; an explicit request is honoured or refused.
    `backend` ("cpu", "gpu", "tpu") defaults to jax's; the memory plan passes the planned one."""
    if requested not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {requested!r}; choose one of {IMPLEMENTATIONS}")
    backend = backend or jax.default_backend()
    cudnn_ok = backend == "gpu" and jnp.dtype(dtype) in _CUDNN_DTYPES and head_dim % 8 == 0 and head_dim <= 256
    splash_ok = length % _SPLASH_BLOCK == 0
    if requested == "auto":
        if cudnn_ok:
            return "cudnn"
        if backend == "tpu" and splash_ok:
            return "splash"
        return "xla"
    if requested == "cudnn" and not cudnn_ok:
        raise ValueError(f"cuDNN attention needs a GPU and bf16/f16 with head_dim % 8 == 0 (<= 256); got backend "
                         f"{backend}, dtype {jnp.dtype(dtype).name}, head_dim {head_dim}")
    if requested == "splash" and not splash_ok:
        raise ValueError(f"splash attention needs a length that is a multiple of {_SPLASH_BLOCK}, got {length}")
    return requested


def attention(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array | None,
              implementation: Implementation = "auto") -> jax.Array:
    """Causal attention within segments. q: [B, T, Hq, D]; k, v: [B, T, Hkv, D]; segments: [B, T] (0 = padding),
    or None when every row is one unpadded sequence (the kernels then need no mask at all).

    Returns [B, T, Hq * D]. Query head h uses kv head h // (Hq / Hkv), as HF's repeat_kv does."""
    b, t, hq, d = q.shape
    kind = choose_implementation(implementation, dtype=q.dtype, head_dim=d, length=t)
    if kind == "cudnn":
        out = _cudnn_attention(q, k, v, segments)
    elif kind == "splash":
        out = _splash_attention(q, k, v, segments)
    else:
        out = _xla_attention(q, k, v, segments, XLA_QUERY_BLOCK)
    return out.reshape(b, t, hq * d)


def _causal(t: int) -> jax.Array:
    return jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]


def _same_segment_causal(segments: jax.Array | None, t: int) -> jax.Array:
    """[B or 1, T, T]: key at or before the query, in the same segment."""
    if segments is None:
        return _causal(t)[None]
    return _causal(t)[None] & (segments[:, :, None] == segments[:, None, :])


@functools.partial(jax.checkpoint, static_argnums=(4,))
def _xla_attention(q, k, v, segments, query_block: int):
    """Attention in XLA: float32 scores and softmax. Rows longer than `query_block` are done `query_block` queries
    at a time against every key (a loop over query blocks, each rematerialised), so a forward pass holds
    [B, H, query_block, T] scores instead of [B, H, T, T] (long multiple-choice scoring on CPU). Rematerialised, so
    the backward pass keeps only q, k and v, not the probabilities."""
    b, t, hq, d = q.shape
    if t <= query_block:
        return _grouped_softmax_attention(q, k, v, _same_segment_causal(segments, t))
    blocks = -(-t // query_block)
    pad = blocks * query_block - t
    q_blocks = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, blocks, query_block, hq, d).swapaxes(0, 1)
    key_segments = jnp.ones((b, t), jnp.int32) if segments is None else segments
    query_segments = jnp.pad(key_segments, ((0, 0), (0, pad))).reshape(b, blocks, query_block).swapaxes(0, 1)

    @jax.checkpoint
    def one_block(args):
        index, q_block, q_segments = args
        positions = index * query_block + jnp.arange(query_block)
        mask = (positions[:, None] >= jnp.arange(t)[None, :])[None] & (
            q_segments[:, :, None] == key_segments[:, None, :])
        return _grouped_softmax_attention(q_block, k, v, mask)

    out = jax.lax.map(one_block, (jnp.arange(blocks), q_blocks, query_segments))
    return out.swapaxes(0, 1).reshape(b, blocks * query_block, hq, d)[:, :t]


def _grouped_softmax_attention(q, k, v, mask):
    """q: [B, T, Hq, D]; k, v: [B, S, Hkv, D]; mask [B, T, S] -> [B, T, Hq, D]."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    q = q.reshape(b, t, hkv, hq // hkv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * (d ** -0.5)
    scores = jnp.where(mask[:, None, None], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, hq, d)


def _cudnn_attention(q, k, v, segments):
    """cuDNN flash attention. Without padding or packing the causal mask alone is passed (no mask tensor); otherwise
    the same-segment mask [B, 1, T, T] becomes an additive bias (no per-head scores are materialised)."""
    mask = None if segments is None else (segments[:, :, None] == segments[:, None, :])[:, None]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation="cudnn")


@functools.lru_cache(maxsize=32)
def _splash_kernel(groups: int, length: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    block = min(512, length)
    while length % block:
        block //= 2
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    mask = splash.MultiHeadMask([splash.CausalMask((length, length))] * groups)
    return splash.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)


def _splash_attention(q, k, v, segments, interpret: bool | None = None):
    """Pallas splash attention (TPU): one multi-query kernel per kv head, the segment ids carrying padding and
    packing. Under a mesh the kernel runs per shard (batch over data/fsdp, heads over tensor) in a shard_map."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    b, t, hq, d = q.shape
    hkv = k.shape[2]
    groups = hq // hkv
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    kernel = _splash_kernel(groups, t, interpret)
    scale = d ** -0.5

    def run(q, k, v, segments):
        qb = (q * jnp.asarray(scale, q.dtype)).reshape(q.shape[0], t, q.shape[2] // groups, groups, d)
        qb = jnp.transpose(qb, (0, 2, 3, 1, 4))  # [B, Hkv, G, T, D]
        kb, vb = jnp.transpose(k, (0, 2, 1, 3)), jnp.transpose(v, (0, 2, 1, 3))  # [B, Hkv, T, D]

        def one_row(qr, kr, vr, seg):
            ids = None if seg is None else splash.SegmentIds(q=seg, kv=seg)
            return jax.vmap(lambda qh, kh, vh: kernel(qh, kh, vh, segment_ids=ids))(qr, kr, vr)

        if segments is None:
            out = jax.vmap(lambda qr, kr, vr: one_row(qr, kr, vr, None))(qb, kb, vb)
        else:
            out = jax.vmap(one_row)(qb, kb, vb, segments)  # [B, Hkv, G, T, D]
        return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(q.shape)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return run(q, k, v, segments)
    from jax.sharding import PartitionSpec as P

    heads, kv_heads = _head_specs(q.shape, k.shape, mesh)
    rows = P(heads[0], None)
    if segments is None:
        return jax.shard_map(lambda q, k, v: run(q, k, v, None), mesh=mesh, in_specs=(heads, kv_heads, kv_heads),
                             out_specs=heads, check_vma=False)(q, k, v)
    return jax.shard_map(run, mesh=mesh, in_specs=(heads, kv_heads, kv_heads, rows), out_specs=heads,
                         check_vma=False)(q, k, v, segments)


def _head_specs(q_shape, kv_shape, mesh):
    """Shard specs of q [B, T, Hq, D] and k/v [B, T, Hkv, D] for a kernel run per shard: rows over data/fsdp, heads
    over tensor when query and kv heads split alike (so each shard keeps whole groups), else heads unsplit."""
    from jax.sharding import PartitionSpec as P

    from forgetjax.sharding import logical_to_spec

    heads = logical_to_spec(("batch", "length", "q_heads", "head_dim"), q_shape, mesh)
    kv_heads = logical_to_spec(("batch", "length", "kv_heads", "head_dim"), kv_shape, mesh)
    if heads[2] != kv_heads[2]:
        return P(heads[0], None, None, None), P(kv_heads[0], None, None, None)
    return heads, kv_heads


def ragged_cache_length(length: int) -> int:
    """A cache length the ragged decode kernel can split: a multiple of RAGGED_BLOCK, or of a power of two >= 16
    for short caches."""
    block = ragged_block(length)
    return -(-length // block) * block


def ragged_block(length: int) -> int:
    """Slots per kernel program for a cache of `length` slots: RAGGED_BLOCK, or the power of two >= 16 at or above
    a shorter length."""
    return RAGGED_BLOCK if length > RAGGED_BLOCK else max(16, 1 << (length - 1).bit_length())


def check_decode_attention(name: str, backend: str | None = None) -> str:
    """`name` if this backend (jax's by default) can run it: "xla" anywhere, "ragged" (a Triton kernel) off TPU,
    "paged" (a TPU kernel) off GPU; on CPU both kernels run in the Pallas interpreters (tests). ValueError else."""
    backend = backend or jax.default_backend()
    if name not in DECODE_IMPLEMENTATIONS:
        raise ValueError(f"decode attention {name!r}; choose one of {DECODE_IMPLEMENTATIONS}")
    if name == "ragged" and backend == "tpu":
        raise ValueError("ragged decode attention is jax's GPU (Triton) kernel; on TPU use 'paged' or 'xla'")
    if name == "paged" and backend == "gpu":
        raise ValueError("paged decode attention is jax's TPU kernel; on GPU use 'ragged' or 'xla'")
    return name


def cached_attention(q: jax.Array, k_new: jax.Array, v_new: jax.Array, new_segments: jax.Array,
                     k_cache: jax.Array, v_cache: jax.Array, cache_valid: jax.Array, filled: jax.Array | None = None,
                     implementation: str = "xla") -> jax.Array:
    """Attention of T new tokens over a KV cache and themselves, without writing the cache.

    q: [B, T, Hq, D]; k_new, v_new: [B, T, Hkv, D]; new_segments: [B, T] (0 = padding); k_cache, v_cache:
    [B, Hkv, S, D] (the KV cache's layout) with cache_valid [B, S] marking slots that hold earlier real tokens
    (every such slot precedes the new tokens). Returns [B, T, Hq * D].

    implementation "xla" reads every slot; "ragged" (one-token steps; other steps take the XLA path) reads only
    slots below `filled` (the cache's next write index) and needs each row's valid slots to be contiguous and to end
    at `filled` - 1, as left-padded prompts followed by decoded tokens are."""
    if implementation not in DECODE_IMPLEMENTATIONS:
        raise ValueError(f"decode attention {implementation!r}; choose one of {DECODE_IMPLEMENTATIONS}")
    if implementation == "paged":
        raise ValueError("paged decode attention runs over a PagedKVCache (paged_decode_attention), not this cache")
    if implementation == "ragged" and q.shape[1] == 1:
        if filled is None:
            raise ValueError("ragged decode attention needs `filled`, the cache's next write index")
        return _ragged_decode_attention(q, k_new, v_new, k_cache, v_cache, cache_valid, filled)
    return _xla_cached_attention(q, k_new, v_new, new_segments, k_cache, v_cache, cache_valid)


def _xla_cached_attention(q, k_new, v_new, new_segments, k_cache, v_cache, cache_valid):
    """The two score blocks (cache, new tokens) share one float32 softmax; each cache slot is read once, in place:
    the cache is the first operand of its two contractions (with it second, XLA:CPU's decode step ran 1.6x slower on
    SmolLM2-135M)."""
    b, t, hq, d = q.shape
    hkv = k_new.shape[2]
    qg = q.reshape(b, t, hkv, hq // hkv, d)
    scale = d ** -0.5
    old = jnp.einsum("bksd,btkgd->bkgts", k_cache.astype(q.dtype), qg, preferred_element_type=jnp.float32) * scale
    old = jnp.where(cache_valid[:, None, None, None, :], old, MASK_VALUE)
    new = jnp.einsum("btkgd,bskd->bkgts", qg, k_new, preferred_element_type=jnp.float32) * scale
    real = new_segments > 0
    # real queries see real new keys at or before them; padding queries see every new key at or before them
    new_mask = _causal(t)[None] & (real[:, None, :] | ~real[:, :, None])
    new = jnp.where(new_mask[:, None, None], new, MASK_VALUE)
    top = jnp.maximum(jnp.max(old, axis=-1, keepdims=True), jnp.max(new, axis=-1, keepdims=True))
    p_old, p_new = jnp.exp(old - top), jnp.exp(new - top)
    total = jnp.sum(p_old, axis=-1, keepdims=True) + jnp.sum(p_new, axis=-1, keepdims=True)
    out = (jnp.einsum("bksd,bkgts->btkgd", v_cache.astype(q.dtype), (p_old / total).astype(q.dtype))
           + jnp.einsum("bkgts,bskd->btkgd", (p_new / total).astype(q.dtype), v_new))
    return out.reshape(b, t, hq * d)


def _ragged_decode_attention(q, k_new, v_new, k_cache, v_cache, cache_valid, filled):
    """One new token per row over the slots [start_r, filled) of its cache row and itself.

    jax's Pallas decode kernel (`pallas.ops.gpu.decode_attention.gqa`) splits the cache into programs of
    `ragged_block` slots, each reading RAGGED_STEP slots per iteration and stopping at `filled`, so a step reads the
    keys and values written so far (rounded up to RAGGED_STEP), not the whole preallocated cache. It returns its
    unnormalised output with the softmax's running max and sum, which are merged here with the new token's own score
    in float32. q is cast to the cache's dtype for the kernel.
    Under a mesh the kernel runs per shard (rows over data/fsdp, kv heads over tensor) in a shard_map."""
    from jax.experimental.pallas.ops.gpu import decode_attention as kernels

    hq, d = q.shape[2], q.shape[3]
    hkv, slots = k_cache.shape[1], k_cache.shape[2]
    groups = hq // hkv
    block = ragged_block(slots)
    if slots % block:
        raise ValueError(f"ragged decode attention needs a cache length that is a multiple of {block}, got "
                         f"{slots} (size the cache with ragged_cache_length)")
    check_decode_attention("ragged")
    interpret = jax.default_backend() != "gpu"  # the Pallas interpreter: CPU tests
    scale = d ** -0.5
    filled = jnp.asarray(filled, jnp.int32)
    start = filled - jnp.sum(cache_valid, axis=-1, dtype=jnp.int32)  # [B]: each row's first valid slot

    def run(q, k_new, v_new, k_cache, v_cache, start, filled):
        rows = q.shape[0]
        out, (total, top) = kernels.gqa(
            q[:, 0].astype(k_cache.dtype), jnp.swapaxes(k_cache, 1, 2), jnp.swapaxes(v_cache, 1, 2), start,
            jnp.broadcast_to(filled, start.shape), sm_scale=scale, block_k=min(block, RAGGED_STEP),
            k_splits=slots // block,
            interpret=interpret, return_residuals=True, normalize_output=False)  # out [B, Hq, D]; total, top [B, Hq]
        own = jnp.einsum("bkgd,bkd->bkg", q[:, 0].reshape(rows, -1, groups, d), k_new[:, 0],
                         preferred_element_type=jnp.float32).reshape(rows, -1) * scale
        peak = jnp.maximum(top, own)
        w_cache, w_own = jnp.exp(top - peak), jnp.exp(own - peak)
        v_own = jnp.repeat(v_new[:, 0], groups, axis=1).astype(jnp.float32)  # query head h reads kv head h // G
        merged = (out.astype(jnp.float32) * w_cache[..., None] + w_own[..., None] * v_own) / (
            total * w_cache + w_own)[..., None]
        return merged.astype(q.dtype).reshape(rows, 1, -1)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return run(q, k_new, v_new, k_cache, v_cache, start, filled)
    from jax.sharding import PartitionSpec as P

    heads, kv_heads = _head_specs(q.shape, k_new.shape, mesh)
    cache = P(kv_heads[0], kv_heads[2], None, None)
    out = P(heads[0], None, heads[2])
    return jax.shard_map(run, mesh=mesh, in_specs=(heads, kv_heads, kv_heads, cache, cache, P(heads[0]), P()),
                         out_specs=out, check_vma=False)(q, k_new, v_new, k_cache, v_cache, start, filled)


PAGE_SIZE = 64  # cache slots per page of the paged decode kernel
PAGED_BLOCK = 256  # slots the paged kernel reads per step of its loop (whole pages): a step reads the written slots
# rounded up to this


def paged_geometry(length: int) -> tuple[int, int, int]:
    """(slots, page size, pages per kernel block) of a paged cache holding `length` tokens: whole blocks of
    PAGED_BLOCK slots in pages of PAGE_SIZE, or one block of the power of two >= 16 at or above a shorter length."""
    if length > PAGED_BLOCK:
        slots = -(-length // PAGED_BLOCK) * PAGED_BLOCK
        return slots, PAGE_SIZE, PAGED_BLOCK // PAGE_SIZE
    slots = max(16, 1 << (length - 1).bit_length())
    page = min(PAGE_SIZE, slots)
    return slots, page, slots // page


def paged_decode_attention(q: jax.Array, k_new: jax.Array, v_new: jax.Array, k_pages: jax.Array,
                           v_pages: jax.Array, lengths: jax.Array, layer: jax.Array,
                           interpret: bool | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One new token per row: writes its key and value at slot `lengths[b]` of row b in layer `layer`, then attends
    over that row's slots [0, lengths[b]] with jax's TPU paged-attention kernel
    (`pallas.ops.tpu.paged_attention`), which reads pages only up to each row's length.

    q: [B, 1, Hq, D]; k_new, v_new: [B, 1, Hkv, D]; k_pages, v_pages: [Hkv, layers, B, S, D] (a `PagedKVCache`'s
    layout: every layer's rows are runs of whole pages of one pool, so the kernel reads the carried cache in place,
    no layer slice is copied); lengths: [B] tokens already in each row (from slot 0). Returns ([B, 1, Hq * D], the
    updated k_pages, v_pages). The kernel computes in float32 but rounds keys and values to bfloat16 as it loads
    them: a float32 cache gains nothing over a bfloat16 one here. Off TPU it runs in the TPU interpreter (CPU tests).
    Under a mesh the write and the kernel run per shard (rows over data/fsdp, kv heads over tensor) in a
    shard_map."""
    from jax.experimental.pallas import tpu as pltpu
    from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention

    d = q.shape[3]
    slots = k_pages.shape[3]
    _, page, pages_per_block = paged_geometry(slots)
    if paged_geometry(slots)[0] != slots:
        raise ValueError(f"paged decode attention needs a cache sized by paged_geometry, got {slots} slots")
    check_decode_attention("paged")
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    scale = d ** -0.5

    def run(q, k_new, v_new, k_pages, v_pages, lengths, layer):
        hkv, layers, rows = k_pages.shape[:3]
        row = jnp.arange(rows)
        k_pages = k_pages.at[:, layer, row, lengths].set(jnp.swapaxes(k_new[:, 0], 0, 1).astype(k_pages.dtype))
        v_pages = v_pages.at[:, layer, row, lengths].set(jnp.swapaxes(v_new[:, 0], 0, 1).astype(v_pages.dtype))
        pages = slots // page
        page_indices = ((layer * rows + row) * pages)[:, None] + jnp.arange(pages, dtype=jnp.int32)[None]
        pool = (k_pages.reshape(hkv, layers * rows * pages, page, d), v_pages.reshape(hkv, layers * rows * pages,
                                                                                     page, d))
        query = q[:, 0] * jnp.asarray(scale, q.dtype)
        with pltpu.force_tpu_interpret_mode() if interpret else contextlib.nullcontext():
            out = paged_attention(query, *pool, (lengths + 1).astype(jnp.int32), page_indices.astype(jnp.int32),
                                  pages_per_compute_block=pages_per_block)
        return out.astype(q.dtype).reshape(rows, 1, -1), k_pages, v_pages

    layer = jnp.asarray(layer, jnp.int32)
    lengths = jnp.asarray(lengths, jnp.int32)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return run(q, k_new, v_new, k_pages, v_pages, lengths, layer)
    from jax.sharding import PartitionSpec as P

    heads, kv_heads = _head_specs(q.shape, k_new.shape, mesh)
    cache = P(kv_heads[2], None, kv_heads[0], None, None)
    return jax.shard_map(run, mesh=mesh, in_specs=(heads, kv_heads, kv_heads, cache, cache, P(heads[0]), P()),
                         out_specs=(P(heads[0], None, heads[2]), cache, cache), check_vma=False)(
        q, k_new, v_new, k_pages, v_pages, lengths, layer)
