"""Paged-attention decode for GPU (Pallas Triton), flash-decoding style.

Where the GPU API differs from the TPU one: there is no scalar prefetch or manual DMA. Block tables and lengths
are ordinary global-memory refs read in-kernel; a KV block is a gather load `pages[page_ids, :, h, :]` masked to
the visible pages (masked-off pages cost no memory traffic); grid programs are independent, so the context is
split across `num_splits` programs per (sequence, KV head) and the partial softmax states are merged in XLA
afterwards (small: [R, Hkv, splits, G, hd]).

Grid (R, Hkv, splits). Query heads of one KV head form the rows of the dot, padded to >= 16 (tensor-core minimum).
int8 KV: the per-token K scale multiplies the logits column and the V scale the probabilities column, so the
int8 tile goes straight to the dot after a cast.

Fused variant: every split of (r, h) stores the row's new K/V head-h vector at its slot (identical values, a
benign race), then a CTA barrier, then attends, so its own token is visible to it.

Triton needs power-of-two tensor sizes: head_dim, page_size and pages_per_block must be powers of two.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from . import _common as C
from .reference import quantize_kv_int8


def _is_pow2(x):
    return x > 0 and (x & (x - 1)) == 0


def _next_pow2(x):
    return 1 << max(0, (x - 1).bit_length())


def _decode_kernel(*refs, page_size, pages_per_block, num_splits, scale, softcap, quantized, fused,
                   compute_dtype, interpret):
    refs = list(refs)
    q_ref, kv_lens_ref, tables_ref, window_ref = (refs.pop(0) for _ in range(4))  # [Gp, hd], [R], [R, P], [1]
    k_ref, v_ref = refs.pop(0), refs.pop(0)                                  # [N, ps, Hkv, hd]
    ks_ref = vs_ref = None
    if quantized:
        ks_ref, vs_ref = refs.pop(0), refs.pop(0)                            # [N, ps, Hkv]
    if fused:
        slots_ref, k_new_ref, v_new_ref = refs.pop(0), refs.pop(0), refs.pop(0)  # [R], [R, Hkv, hd] x2
        if quantized:
            k_new_s_ref, v_new_s_ref = refs.pop(0), refs.pop(0)              # [R, Hkv]
    o_ref, m_out_ref, l_out_ref = refs.pop(0), refs.pop(0), refs.pop(0)      # [Gp, hd], [Gp], [Gp]
    if fused:  # aliased page outputs: write and read through them
        k_ref, v_ref = refs.pop(0), refs.pop(0)
        if quantized:
            ks_ref, vs_ref = refs.pop(0), refs.pop(0)
    assert not refs

    r, h, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    kv_len = kv_lens_ref[r]
    block_tokens = pages_per_block * page_size

    if fused:
        slot = slots_ref[r]
        page, offset = C.div(slot, page_size), C.rem(slot, page_size)
        k_ref[page, offset, h, :] = k_new_ref[r, h, :]
        v_ref[page, offset, h, :] = v_new_ref[r, h, :]
        if quantized:
            ks_ref[page, offset, h] = k_new_s_ref[r, h]
            vs_ref[page, offset, h] = v_new_s_ref[r, h]
        if not interpret:  # the interpreter runs programs one at a time; barrier has no CPU lowering
            plgpu.debug_barrier()

    first_pos = C.window_start(kv_len - 1, window_ref[0])
    first_page = C.div(first_pos, page_size)
    num_pages = C.cdiv(kv_len, page_size)
    blk_start = C.div(first_pos, block_tokens)
    blk_end = C.cdiv(kv_len, block_tokens)
    per_split = C.cdiv(jnp.maximum(blk_end - blk_start, 0), num_splits)
    my_start = blk_start + split * per_split
    my_end = jnp.minimum(blk_end, my_start + per_split)

    q = q_ref[...].astype(compute_dtype)                                     # [Gp, hd]
    gp, hd = q.shape

    def body(blk, carry):
        m, l, acc = carry
        page_idx = blk * pages_per_block + jnp.arange(pages_per_block)
        page_ok = (page_idx >= first_page) & (page_idx < num_pages)
        ids = tables_ref[r, pl.ds(blk * pages_per_block, pages_per_block)]
        ids = jnp.where(page_ok, ids, 0)
        # Gather indices are all arrays (page, token-in-page, lane): one pointer tensor [ppb, ps, hd].
        pid, tok, lane = ids[:, None, None], jnp.arange(page_size)[None, :, None], jnp.arange(hd)[None, None, :]
        kv_mask = jnp.broadcast_to(page_ok[:, None, None], (pages_per_block, page_size, hd))
        k = plgpu.load(k_ref.at[pid, tok, h, lane], mask=kv_mask, other=0).reshape(block_tokens, hd)
        v = plgpu.load(v_ref.at[pid, tok, h, lane], mask=kv_mask, other=0).reshape(block_tokens, hd)
        sc_mask = jnp.broadcast_to(page_ok[:, None], (pages_per_block, page_size))
        pos = blk * block_tokens + jnp.arange(block_tokens)
        key_ok = (pos >= first_pos) & (pos < kv_len)
        visible = key_ok[None, :]
        v = jnp.where(key_ok[:, None], v, jnp.zeros_like(v))     # slots outside the window / past kv_len
        s = C.dot_nt(q, k.astype(compute_dtype))                            # [Gp, bk]
        if quantized:
            k_scale = plgpu.load(ks_ref.at[ids[:, None], tok[:, :, 0], h], mask=sc_mask, other=0)
            k_scale = k_scale.reshape(1, block_tokens)
            s = s * jnp.where(visible, k_scale, 0.0)
        s = C.logits_transform(s, scale=scale, softcap=softcap)
        s = jnp.where(visible, s, C.NEG_INF)
        m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
        m_safe = jnp.where(m_new == C.NEG_INF, 0.0, m_new)
        p = jnp.exp(s - m_safe)
        alpha = jnp.exp(m - m_safe)
        l_new = alpha * l + jnp.sum(p, axis=1, keepdims=True)
        if quantized:
            v_scale = plgpu.load(vs_ref.at[ids[:, None], tok[:, :, 0], h], mask=sc_mask, other=0)
            v_scale = v_scale.reshape(1, block_tokens)
            p = p * jnp.where(visible, v_scale, 0.0)
        acc_new = alpha * acc + C.dot_nn(p.astype(compute_dtype), v.astype(compute_dtype))
        return m_new, l_new, acc_new

    init = (jnp.full((gp, 1), C.NEG_INF, jnp.float32), jnp.zeros((gp, 1), jnp.float32),
            jnp.zeros((gp, hd), jnp.float32))
    m, l, acc = lax.fori_loop(my_start, jnp.maximum(my_end, my_start), body, init)
    o_ref[...] = acc
    m_out_ref[...] = m[:, 0]
    l_out_ref[...] = l[:, 0]


def _merge_splits(o, m, l):
    """o [..., S, G, hd], m/l [..., S, G] partial states -> [..., G, hd]."""
    m_max = jnp.max(m, axis=-2, keepdims=True)
    m_safe = jnp.where(m_max == C.NEG_INF, 0.0, m_max)
    w = jnp.exp(m - m_safe)                                   # empty splits: exp(-inf) = 0
    l_tot = jnp.sum(w * l, axis=-2)
    o_tot = jnp.sum(w[..., None] * o, axis=-3)
    return o_tot / jnp.where(l_tot == 0.0, 1.0, l_tot)[..., None]


def _default_splits(r, hkv, max_blocks):
    # Aim for ~2 CTAs per SM of an H100 (132 SMs) when the batch alone cannot fill the GPU.
    return int(max(1, min(16, max_blocks, C.cdiv(264, max(1, r * hkv)))))


def _decode_call(q, k_pages, v_pages, block_tables, kv_lens, *, scale, window, softcap, k_scales, v_scales, new_kv,
                 pages_per_block, num_splits, num_warps, interpret):
    r, hq, hd = q.shape
    n, ps, hkv, _ = C.check_attention_shapes(hq, k_pages, v_pages, k_scales, v_scales)
    g = hq // hkv
    quantized, fused = k_scales is not None, new_kv is not None
    ppb = pages_per_block or max(1, min(_next_pow2(block_tables.shape[1]), max(1, 128 // ps)))
    for name, val in (("head_dim", hd), ("page_size", ps), ("pages_per_block", ppb)):
        if not _is_pow2(val):
            raise ValueError(f"GPU (Triton) decode needs a power-of-two {name}, got {val}")
    if ppb * ps < 16 or hd < 16:
        raise ValueError("GPU (Triton) dots need pages_per_block * page_size >= 16 and head_dim >= 16")
    tables = C.pad_block_tables(block_tables, ppb)
    splits = num_splits or _default_splits(r, hkv, tables.shape[1] // ppb)
    gp = max(16, _next_pow2(g))
    q4 = q.reshape(r, hkv, g, hd)
    if gp != g:
        q4 = jnp.pad(q4, ((0, 0), (0, 0), (0, gp - g), (0, 0)))
    cdt = C.compute_dtype_for(q.dtype, k_pages.dtype)

    full = pl.no_block_spec  # whole-array ref (no blocking): a global-memory pointer in Triton
    inputs = [q4, kv_lens.astype(jnp.int32), tables, jnp.asarray(window, jnp.int32).reshape(1), k_pages, v_pages]
    in_specs = [pl.BlockSpec((None, None, gp, hd), lambda i, j, s: (i, j, 0, 0))] + [full] * 5
    if quantized:
        inputs += [k_scales, v_scales]
        in_specs += [full, full]
    aliases = {}
    out_shape = [jax.ShapeDtypeStruct((r, hkv, splits, gp, hd), jnp.float32),
                 jax.ShapeDtypeStruct((r, hkv, splits, gp), jnp.float32),
                 jax.ShapeDtypeStruct((r, hkv, splits, gp), jnp.float32)]
    out_specs = [pl.BlockSpec((None, None, None, gp, hd), lambda i, j, s: (i, j, s, 0, 0)),
                 pl.BlockSpec((None, None, None, gp), lambda i, j, s: (i, j, s, 0)),
                 pl.BlockSpec((None, None, None, gp), lambda i, j, s: (i, j, s, 0))]
    if fused:
        k_new, v_new, slots = new_kv
        page_inputs = [4, 5] + ([6, 7] if quantized else [])
        if quantized:
            k_new, k_new_s = quantize_kv_int8(k_new)
            v_new, v_new_s = quantize_kv_int8(v_new)
            inputs += [slots.astype(jnp.int32), k_new, v_new, k_new_s, v_new_s]
            in_specs += [full] * 5
        else:
            inputs += [slots.astype(jnp.int32), k_new.astype(k_pages.dtype), v_new.astype(v_pages.dtype)]
            in_specs += [full] * 3
        for j, idx in enumerate(page_inputs):
            aliases[idx] = 3 + j
            out_shape.append(jax.ShapeDtypeStruct(inputs[idx].shape, inputs[idx].dtype))
            out_specs.append(full)

    kernel = functools.partial(
        _decode_kernel, page_size=ps, pages_per_block=ppb, num_splits=splits, scale=float(scale),
        softcap=None if softcap is None else float(softcap), quantized=quantized, fused=fused, compute_dtype=cdt,
        interpret=bool(interpret))
    outs = pl.pallas_call(
        kernel, grid=(r, hkv, splits), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=2),
        interpret=interpret, name="jaxserve_paged_decode_gpu",
    )(*inputs)
    o = _merge_splits(outs[0], outs[1], outs[2])[:, :, :g, :]
    return o.reshape(r, hq, hd).astype(q.dtype), outs[3:]


_STATIC = ("scale", "softcap", "pages_per_block", "num_splits", "num_warps", "interpret")


@functools.partial(jax.jit, static_argnames=_STATIC)
def paged_attention_decode(q, k_pages, v_pages, block_tables, kv_lens, *, scale, window=0, softcap=None,
                           k_scales=None, v_scales=None, pages_per_block=None, num_splits=None, num_warps=4,
                           interpret=False):
    """See reference.paged_attention_decode."""
    out, _ = _decode_call(q, k_pages, v_pages, block_tables, kv_lens, scale=scale, window=window, softcap=softcap,
                          k_scales=k_scales, v_scales=v_scales, new_kv=None, pages_per_block=pages_per_block,
                          num_splits=num_splits, num_warps=num_warps, interpret=interpret)
    return out


@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnames=("k_pages", "v_pages", "k_scales", "v_scales"))
def paged_attention_decode_fused(q, k_new, v_new, k_pages, v_pages, slots, block_tables, kv_lens, *, scale,
                                 window=0, softcap=None, k_scales=None, v_scales=None, pages_per_block=None,
                                 num_splits=None, num_warps=4, interpret=False):
    """See reference.paged_attention_decode_fused. Returns (out, k_pages, v_pages[, k_scales, v_scales])."""
    out, pages = _decode_call(q, k_pages, v_pages, block_tables, kv_lens, scale=scale, window=window,
                              softcap=softcap, k_scales=k_scales, v_scales=v_scales, new_kv=(k_new, v_new, slots),
                              pages_per_block=pages_per_block, num_splits=num_splits, num_warps=num_warps,
                              interpret=interpret)
    return (out, *pages)
