"""Pure-jnp references: the definitions every Pallas kernel in this package must reproduce.

Layouts follow docs/architecture.md. Per layer the KV cache is paged,
`k_pages, v_pages: [num_pages, page_size, Hkv, hd]` (a free view of the flat `[num_pages*page_size, Hkv, hd]`
cache). A token's slot is `page * page_size + offset`. Page 0 is the null page; block tables `[R, P]` int32 are
padded with 0. Query head `h` reads KV head `h // (Hq // Hkv)`.

Masking convention shared by all attention functions: a query at position `p` sees the key at position `k` iff
`k <= p` and (`window == 0` or `p - k < window`); `window` may be a traced int32 scalar (one scanned layer
body serving sliding and global layers), in the kernels too. Logits are `scale * q.k`, then (if `softcap`) soft-capped
`softcap * tanh(logits / softcap)`, then softmax in float32. A query that sees no key outputs zeros.

int8 KV: pages are int8 with per-(token, KV head) float32 scales `[num_pages, page_size, Hkv]`;
the dequantized value is `int8 * scale` (`quantize_kv_int8` makes them).

These functions are also the "xla" attention path of `dispatch.py`: they gather every page of the block table,
so their cost grows with the table width, not the context length.
"""

from __future__ import annotations

import jax.numpy as jnp

__all__ = [
    "paged_attention_decode", "paged_attention_decode_fused", "ragged_prefill_attention",
    "ragged_prefill_attention_fused", "write_kv", "quantize_kv_int8", "dequantize_kv_int8",
    "quantize_int8", "dequantize_int8", "quantize_int4", "dequantize_int4", "quantized_matmul",
]


# ----------------------------------------------------------------------------------------------------------
# KV cache helpers
# ----------------------------------------------------------------------------------------------------------

def quantize_kv_int8(x):
    """[..., Hkv, hd] float -> (int8 [..., Hkv, hd], float32 scales [..., Hkv]); symmetric, absmax / 127."""
    x = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=-1)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    q = jnp.clip(jnp.round(x / scale[..., None]), -127, 127).astype(jnp.int8)
    return q, scale


def dequantize_kv_int8(q, scale):
    return q.astype(jnp.float32) * scale[..., None].astype(jnp.float32)


def _gather_seq(pages, scales, block_table):
    """pages [N, ps, Hkv, hd], block_table [..., P] -> [..., P*ps, Hkv, hd] float32 (dequantized if int8)."""
    x = pages[block_table]                                   # [..., P, ps, Hkv, hd]
    if scales is not None:
        x = dequantize_kv_int8(x, scales[block_table])
    x = x.astype(jnp.float32)
    return x.reshape(*block_table.shape[:-1], -1, *pages.shape[2:])


def write_kv(k_pages, v_pages, k_new, v_new, slots, k_scales=None, v_scales=None):
    """Scatter new K/V `[T, Hkv, hd]` into the pages at `slots [T]`. int8 pages (scales given) are quantized
    per (token, head). Returns (k_pages, v_pages, k_scales, v_scales)."""
    n, ps, hkv, hd = k_pages.shape
    flat = lambda a: a.reshape(n * ps, *a.shape[2:])
    if k_scales is not None:
        kq, ks = quantize_kv_int8(k_new)
        vq, vs = quantize_kv_int8(v_new)
        k_scales = flat(k_scales).at[slots].set(ks).reshape(k_scales.shape)
        v_scales = flat(v_scales).at[slots].set(vs).reshape(v_scales.shape)
        k_new, v_new = kq, vq
    k_pages = flat(k_pages).at[slots].set(k_new.astype(k_pages.dtype)).reshape(k_pages.shape)
    v_pages = flat(v_pages).at[slots].set(v_new.astype(v_pages.dtype)).reshape(v_pages.shape)
    return k_pages, v_pages, k_scales, v_scales


def _attend(q, k, v, q_pos, k_valid, *, scale, window, softcap):
    """q [B, Hq, hd]; k, v [B, S, Hkv, hd] f32; q_pos [B]; k_valid [B, S] -> [B, Hq, hd] f32."""
    b, hq, hd = q.shape
    s, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    qg = q.astype(jnp.float32).reshape(b, hkv, g, hd)
    logits = jnp.einsum("bhgd,bshd->bhgs", qg, k, precision="highest") * scale
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    kpos = jnp.arange(s)[None, :]
    visible = k_valid & (kpos <= q_pos[:, None])
    window = jnp.asarray(window, jnp.int32)                   # may be a runtime value (per-layer under scan)
    visible &= (window <= 0) | ((q_pos[:, None] - kpos) < window)
    v = jnp.where(visible[:, :, None, None], v, 0.0)         # invisible slots may hold anything (even NaN)
    visible = visible[:, None, None, :]
    logits = jnp.where(visible, logits, -jnp.inf)
    m = jnp.max(logits, axis=-1, keepdims=True)
    p = jnp.where(visible, jnp.exp(logits - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    l = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum("bhgs,bshd->bhgd", p, v, precision="highest") / jnp.where(l == 0, 1.0, l)
    return o.reshape(b, hq, hd)


# ----------------------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------------------

def paged_attention_decode(q, k_pages, v_pages, block_tables, kv_lens, *, scale, window=0, softcap=None,
                           k_scales=None, v_scales=None):
    """One new token per sequence. q [R, Hq, hd] sits at position kv_lens-1; rows with kv_len 0 give zeros.

    k_pages, v_pages [num_pages, page_size, Hkv, hd]; block_tables [R, P] int32; kv_lens [R] int32.
    Returns [R, Hq, hd] in q.dtype."""
    r, hq, hd = q.shape
    k = _gather_seq(k_pages, k_scales, block_tables)         # [R, P*ps, Hkv, hd]
    v = _gather_seq(v_pages, v_scales, block_tables)
    k_valid = jnp.arange(k.shape[1])[None, :] < kv_lens[:, None]
    o = _attend(q, k, v, kv_lens - 1, k_valid, scale=scale, window=window, softcap=softcap)
    return o.astype(q.dtype)


def paged_attention_decode_fused(q, k_new, v_new, k_pages, v_pages, slots, block_tables, kv_lens, *, scale,
                                 window=0, softcap=None, k_scales=None, v_scales=None):
    """Write each row's new K/V `[R, Hkv, hd]` at `slots [R]`, then `paged_attention_decode`.
    Returns (out, k_pages, v_pages) or, for int8 pages, (out, k_pages, v_pages, k_scales, v_scales)."""
    k_pages, v_pages, k_scales, v_scales = write_kv(k_pages, v_pages, k_new, v_new, slots, k_scales, v_scales)
    out = paged_attention_decode(q, k_pages, v_pages, block_tables, kv_lens, scale=scale, window=window,
                                 softcap=softcap, k_scales=k_scales, v_scales=v_scales)
    if k_scales is None:
        return out, k_pages, v_pages
    return out, k_pages, v_pages, k_scales, v_scales


def token_metadata(cu_q_lens, kv_lens, num_seqs, num_tokens):
    """Per flat token: (sequence index, position, valid). Tokens at or past cu_q_lens[num_seqs] are padding."""
    t = jnp.arange(num_tokens)
    num_seqs = jnp.asarray(num_seqs, jnp.int32).reshape(())
    seq = jnp.searchsorted(cu_q_lens[1:], t, side="right")   # first r with cu[r+1] > t
    seq = jnp.minimum(seq, cu_q_lens.shape[0] - 2)
    valid = (t < cu_q_lens[num_seqs]) & (seq < num_seqs)
    q_len = cu_q_lens[seq + 1] - cu_q_lens[seq]
    pos = kv_lens[seq] - q_len + (t - cu_q_lens[seq])
    return seq, pos, valid


def ragged_prefill_attention(q, k_pages, v_pages, block_tables, cu_q_lens, kv_lens, num_seqs, *, scale,
                             window=0, softcap=None, k_scales=None, v_scales=None):
    """Causal attention for a flat batch of new-token segments against their paged context.

    q [T, Hq, hd]: sequence r's new tokens are rows cu_q_lens[r]:cu_q_lens[r+1] (cu_q_lens [R+1] int32);
    kv_lens [R] is the context INCLUDING the new tokens (whose K/V are already in the pages), so token i of
    sequence r sits at position kv_lens[r] - q_len[r] + i. Only the first num_seqs sequences are live; rows past
    cu_q_lens[num_seqs] output zeros. Returns [T, Hq, hd] in q.dtype."""
    t = q.shape[0]
    seq, pos, valid = token_metadata(cu_q_lens, kv_lens, num_seqs, t)
    tables = block_tables[seq]                                # [T, P]
    k = _gather_seq(k_pages, k_scales, tables)                # [T, P*ps, Hkv, hd]
    v = _gather_seq(v_pages, v_scales, tables)
    k_valid = (jnp.arange(k.shape[1])[None, :] < kv_lens[seq][:, None]) & valid[:, None]
    o = _attend(q, k, v, pos, k_valid, scale=scale, window=window, softcap=softcap)
    return o.astype(q.dtype)


def ragged_prefill_attention_fused(q, k_new, v_new, k_pages, v_pages, slots, block_tables, cu_q_lens, kv_lens,
                                   num_seqs, *, scale, window=0, softcap=None, k_scales=None, v_scales=None):
    """Write the new K/V `[T, Hkv, hd]` at `slots [T]` (padding tokens' slots point into the null page), then
    `ragged_prefill_attention`. Returns (out, k_pages, v_pages[, k_scales, v_scales])."""
    k_pages, v_pages, k_scales, v_scales = write_kv(k_pages, v_pages, k_new, v_new, slots, k_scales, v_scales)
    out = ragged_prefill_attention(q, k_pages, v_pages, block_tables, cu_q_lens, kv_lens, num_seqs, scale=scale,
                                   window=window, softcap=softcap, k_scales=k_scales, v_scales=v_scales)
    if k_scales is None:
        return out, k_pages, v_pages
    return out, k_pages, v_pages, k_scales, v_scales


# ----------------------------------------------------------------------------------------------------------
# Weight-only quantization
# ----------------------------------------------------------------------------------------------------------
#
# int8: per output channel. w_q int8 [K, N], scales f32 [N]; w = w_q * scales.
# int4: group-wise along K, symmetric, values in [-8, 7]. scales f32 [K // group_size, N].
#   Packing ("split halves"): w_q uint8 [K//2, N]; byte i holds row i in its low nibble and row i + K//2 in its
#   high nibble (two's complement nibbles). A kernel tile of packed rows [a, b) therefore needs the activation
#   columns [a, b) and [K/2 + a, K/2 + b): two plain BlockSpecs, no lane shuffles. Requires K % (2*group) == 0.

def quantize_int8(w):
    """w [K, N] -> (w_q int8 [K, N], scales f32 [N])."""
    w = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(w), axis=0)
    scales = jnp.where(amax > 0, amax / 127.0, 1.0)
    w_q = jnp.clip(jnp.round(w / scales), -127, 127).astype(jnp.int8)
    return w_q, scales


def dequantize_int8(w_q, scales):
    return w_q.astype(jnp.float32) * scales.astype(jnp.float32)


def quantize_int4(w, group_size):
    """w [K, N] -> (w_q uint8 [K//2, N], scales f32 [K//group_size, N])."""
    k, n = w.shape
    if k % (2 * group_size):
        raise ValueError(f"int4 needs K % (2*group_size) == 0; got K={k}, group_size={group_size}")
    wg = w.astype(jnp.float32).reshape(k // group_size, group_size, n)
    amax = jnp.max(jnp.abs(wg), axis=1)
    scales = jnp.where(amax > 0, amax / 7.0, 1.0)
    q = jnp.clip(jnp.round(wg / scales[:, None, :]), -8, 7).astype(jnp.int32).reshape(k, n)
    lo, hi = q[: k // 2], q[k // 2:]
    w_q = ((lo & 0xF) | ((hi & 0xF) << 4)).astype(jnp.uint8)
    return w_q, scales


def unpack_int4(w_q):
    """uint8 [K//2, N] -> int32 [K, N] values in [-8, 7]."""
    b = w_q.astype(jnp.int32)
    lo = ((b & 0xF) ^ 8) - 8
    hi = (((b >> 4) & 0xF) ^ 8) - 8
    return jnp.concatenate([lo, hi], axis=0)


def dequantize_int4(w_q, scales, group_size):
    q = unpack_int4(w_q).astype(jnp.float32)
    return q * jnp.repeat(scales.astype(jnp.float32), group_size, axis=0)


def quantized_matmul(x, w_q, scales, *, bits=8, group_size=None):
    """x [M, K] (f32/bf16) @ dequantized weight -> [M, N] in x.dtype, float32 accumulation."""
    if bits == 8:
        w = dequantize_int8(w_q, scales)
    elif bits == 4:
        w = dequantize_int4(w_q, scales, group_size)
    else:
        raise ValueError(f"bits must be 8 or 4, got {bits}")
    return jnp.dot(x.astype(jnp.float32), w, precision="highest").astype(x.dtype)
