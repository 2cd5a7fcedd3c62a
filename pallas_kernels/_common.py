"""Pieces shared by the TPU (Mosaic) and GPU (Triton) kernels: plain jnp, valid inside either lowering."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

NEG_INF = -float("inf")


def cdiv(a, b):
    if isinstance(a, int) and isinstance(b, int):
        return (a + b - 1) // b
    return div(a + b - 1, b)


def div(a, b):
    """Division of non-negative ints. lax.div truncates; jnp's // floors and lowers through sign(), which
    Mosaic cannot lower without knowing the TPU generation."""
    if isinstance(a, int) and isinstance(b, int):
        return a // b
    return lax.div(jnp.asarray(a, jnp.int32), jnp.asarray(b, jnp.int32))


def rem(a, b):
    if isinstance(a, int) and isinstance(b, int):
        return a % b
    return lax.rem(jnp.asarray(a, jnp.int32), jnp.asarray(b, jnp.int32))


def pad_block_tables(block_tables, multiple: int):
    """Pad the table width to a multiple of the pages a kernel fetches per KV block, with the null page 0,
    so a block never indexes past the table. A [R, P] int32 copy: negligible next to the KV it indexes."""
    p = block_tables.shape[1]
    extra = -p % multiple
    if extra:
        block_tables = jnp.pad(block_tables, ((0, 0), (0, extra)))
    return block_tables.astype(jnp.int32)


def dot_nt(a, b):
    """a [M, D] . b [N, D]^T -> [M, N] float32 (operands stay in their dtype: bf16 feeds the MXU / tensor cores)."""
    prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=prec, preferred_element_type=jnp.float32)


def dot_nn(a, b):
    """a [M, K] . b [K, N] -> [M, N] float32."""
    prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=prec, preferred_element_type=jnp.float32)


def window_start(first_query_pos, window):
    """First key position visible to a query at `first_query_pos` (window 0 = no window). Runtime scalars."""
    return jnp.where(window > 0, jnp.maximum(first_query_pos - window + 1, 0), 0).astype(jnp.int32)


def in_window(q_pos, k_pos, window):
    return jnp.logical_or(window <= 0, q_pos - k_pos < window)


def logits_transform(s, *, scale: float, softcap):
    s = s * scale
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    return s


def online_softmax_step(m_prev, l_prev, acc_prev, s, v, visible, compute_dtype):
    """One flash-attention step. s [M, N] logits (f32), v [N, D], visible [M, N] bool.

    m/l [M, 1], acc [M, D] f32. Masked logits become -inf; a row that has seen no visible key keeps m = -inf,
    l = 0, acc = 0 (exp is taken against 0 instead of -inf, so no NaN appears)."""
    s = jnp.where(visible, s, NEG_INF)
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    m_safe = jnp.where(m_new == NEG_INF, 0.0, m_new)
    p = jnp.exp(s - m_safe)
    alpha = jnp.exp(m_prev - m_safe)
    l_new = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
    acc_new = alpha * acc_prev + dot_nn(p.astype(compute_dtype), v.astype(compute_dtype))
    return m_new, l_new, acc_new


def finalize(acc, l):
    return acc / jnp.where(l == 0.0, 1.0, l)


def compute_dtype_for(q_dtype, kv_dtype):
    """bf16 operands when both sides are bf16 (MXU/tensor-core rate), else float32."""
    if jnp.dtype(q_dtype) == jnp.bfloat16 and jnp.dtype(kv_dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.int8)):
        return jnp.bfloat16
    return jnp.float32


def check_attention_shapes(q_heads, k_pages, v_pages, k_scales, v_scales):
    n, ps, hkv, hd = k_pages.shape
    if v_pages.shape != k_pages.shape:
        raise ValueError(f"k_pages {k_pages.shape} and v_pages {v_pages.shape} differ")
    if q_heads % hkv:
        raise ValueError(f"q heads {q_heads} not a multiple of KV heads {hkv}")
    if (k_scales is None) != (v_scales is None):
        raise ValueError("give both k_scales and v_scales or neither")
    if k_scales is not None:
        if k_pages.dtype != jnp.int8:
            raise ValueError("scales are only for int8 pages")
        if k_scales.shape != (n, ps, hkv) or v_scales.shape != (n, ps, hkv):
            raise ValueError(f"scales must be [num_pages, page_size, Hkv] = {(n, ps, hkv)}")
    elif k_pages.dtype == jnp.int8:
        raise ValueError("int8 pages need k_scales and v_scales")
    return n, ps, hkv, hd
