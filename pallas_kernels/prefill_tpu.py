"""Ragged (chunked) prefill attention for TPU (Pallas Mosaic).

A flat batch of new-token segments (`cu_q_lens`) attends causally to each segment's context in the paged cache,
the new tokens included (their K/V are in the pages; kv_lens counts them). Used for whole prompts, chunked
prefill (later chunks see earlier chunks through the pages) and prefix-cache hits (context that was never
computed in this batch), and with q_len = 1 it is also a decode step.

Grid: one program per block of `block_q` flat tokens, all heads. A block can hold the tail of one segment and
the head of the next; the program walks the segments overlapping it (scalar loop over `cu_q_lens` in SMEM)
and, per segment, streams only the KV blocks the block's rows can see: from the window start of its first row
to the position of its last row. Rows of other segments are masked, so each row's online-softmax state
(VMEM scratch, f32) only moves while its own segment is processed. Rows of the G query heads sharing a KV head
are stacked, [G * block_q, hd], so each K/V tile is used by G * block_q rows of one dot.

Scalar prefetch: kv_lens [R], block_tables [R*P], cu_q_lens [R+1], num_seqs [1], window [1] (runtime, 0 = none)
(+ slots [T] when fused).

Fused variant (`new_kv`): before attending, program b DMAs (HBM -> HBM) its own block's tokens' K/V into their slots
(pages aliased input->output) and waits. Programs run in order ("arbitrary"), and a row only sees keys at
positions <= its own, which belong to tokens of the same or earlier blocks, so every key is written before it is
read. JAX's ragged_paged_attention has no fused write ("TODO: create a write_to_kv_cache kernel") and needs its
own combined-KV cache layout.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from . import _common as C
from ._tpu_kv import PagedKV, kv_scratch_shapes
from .reference import quantize_kv_int8


def _prefill_kernel(*refs, block_q, num_tokens, page_size, pages_per_block, pages_per_seq, num_kv_heads,
                    group, scale, softcap, quantized, fused, compute_dtype):
    refs = list(refs)
    kv_lens_ref, tables_ref, cu_ref, num_seqs_ref, window_ref = (refs.pop(0) for _ in range(5))
    slots_ref = refs.pop(0) if fused else None
    q_ref = refs.pop(0)                                      # [block_q, Hq, hd]
    k_hbm, v_hbm = refs.pop(0), refs.pop(0)
    ks_hbm = vs_hbm = None
    if quantized:
        ks_hbm, vs_hbm = refs.pop(0), refs.pop(0)
    if fused:
        k_new_hbm, v_new_hbm = refs.pop(0), refs.pop(0)      # [T, Hkv, hd] in HBM
        if quantized:
            k_new_s_hbm, v_new_s_hbm = refs.pop(0), refs.pop(0)  # [T, 1, Hkv]
    o_ref = refs.pop(0)                                      # [block_q, Hq, hd]
    if fused:                                                # aliased page outputs (see decode_tpu)
        k_hbm, v_hbm = refs.pop(0), refs.pop(0)
        if quantized:
            ks_hbm, vs_hbm = refs.pop(0), refs.pop(0)
    k_buf, v_buf = refs.pop(0), refs.pop(0)
    ks_buf = vs_buf = None
    if quantized:
        ks_buf, vs_buf = refs.pop(0), refs.pop(0)
    sems = refs.pop(0)
    m_ref, l_ref, acc_ref = refs.pop(0), refs.pop(0), refs.pop(0)  # [Hkv, G*bq, 1] x2, [Hkv, G*bq, hd]
    write_sem = refs.pop(0)
    assert not refs

    b = pl.program_id(0)
    blk_lo = b * block_q                                     # this program's flat tokens [blk_lo, blk_lo + block_q)
    kv = PagedKV(k_hbm, v_hbm, ks_hbm, vs_hbm, k_buf, v_buf, ks_buf, vs_buf, sems, tables_ref,
                 pages_per_seq=pages_per_seq, pages_per_block=pages_per_block, page_size=page_size,
                 num_kv_heads=num_kv_heads)
    bk = kv.block_tokens

    # ---- fused write of this block's new K/V ----
    if fused:
        n_write = jnp.minimum(block_q, num_tokens - blk_lo)

        def copies(i):
            tok = blk_lo + i
            slot = slots_ref[tok]
            page, off = C.div(slot, page_size), C.rem(slot, page_size)
            cps = [pltpu.make_async_copy(k_new_hbm.at[tok], k_hbm.at[page, off], write_sem.at[0]),
                   pltpu.make_async_copy(v_new_hbm.at[tok], v_hbm.at[page, off], write_sem.at[0])]
            if quantized:
                cps += [pltpu.make_async_copy(k_new_s_hbm.at[tok], ks_hbm.at[page, pl.ds(off, 1)], write_sem.at[0]),
                        pltpu.make_async_copy(v_new_s_hbm.at[tok], vs_hbm.at[page, pl.ds(off, 1)], write_sem.at[0])]
            return cps

        def start_i(i, c):
            for cp in copies(i):
                cp.start()
            return c

        def wait_i(i, c):
            for cp in copies(i):
                cp.wait()
            return c

        lax.fori_loop(0, n_write, start_i, 0)
        lax.fori_loop(0, n_write, wait_i, 0)

    m_ref[...] = jnp.full(m_ref.shape, C.NEG_INF, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    # Row j of the stacked [G * block_q] layout is query head (h*G + j // block_q) of flat token blk_lo + j % block_q.
    row_tok = blk_lo + jnp.concatenate([lax.broadcasted_iota(jnp.int32, (block_q, 1), 0)] * group, axis=0)
    num_seqs = num_seqs_ref[0]
    window = window_ref[0]

    def q_rows(h):
        return jnp.concatenate([q_ref[:, h * group + g, :] for g in range(group)], axis=0)  # [G*bq, hd]

    def process_seq(s):
        q_start, q_end = cu_ref[s], cu_ref[s + 1]
        kv_len = kv_lens_ref[s]
        ctx = kv_len - (q_end - q_start)                     # position of the segment's first new token
        lo_tok = jnp.maximum(q_start, blk_lo)
        hi_tok = jnp.minimum(q_end, blk_lo + block_q)        # exclusive
        pos_lo = ctx + lo_tok - q_start
        pos_hi = ctx + hi_tok - 1 - q_start                  # last row's position: keys up to here
        first_pos = C.window_start(pos_lo, window)
        row_pos = ctx + row_tok - q_start                    # [G*bq, 1]
        row_in = jnp.logical_and(row_tok >= lo_tok, row_tok < hi_tok)

        def compute(blk, slot):
            k_row = blk * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
            k_col = blk * bk + lax.broadcasted_iota(jnp.int32, (bk, 1), 0)
            visible = jnp.logical_and(row_in, k_row <= row_pos)
            visible = jnp.logical_and(visible, C.in_window(row_pos, k_row, window))
            visible = jnp.logical_and(visible, k_row >= first_pos)
            v_ok = jnp.logical_and(k_col >= first_pos, k_col <= pos_hi)
            for h in range(num_kv_heads):
                k = kv.k(slot, h).astype(compute_dtype)
                v = kv.v(slot, h)
                v = jnp.where(v_ok, v, jnp.zeros_like(v))
                s_ = C.logits_transform(C.dot_nt(q_rows(h).astype(compute_dtype), k), scale=scale, softcap=softcap)
                m, l, acc = C.online_softmax_step(m_ref[h], l_ref[h], acc_ref[h], s_, v, visible, compute_dtype)
                m_ref[h], l_ref[h], acc_ref[h] = m, l, acc

        @pl.when(lo_tok < hi_tok)
        def _():
            kv.stream(s, C.div(first_pos, bk), C.div(pos_hi, bk) + 1, C.div(first_pos, page_size),
                      C.div(pos_hi, page_size) + 1, compute)

    # First segment whose tokens reach into this block, then every segment starting before the block ends.
    def skip_cond(s):   # both operands are evaluated: clamp the index so cu_q_lens is never read past R
        return jnp.logical_and(s < num_seqs, cu_ref[jnp.minimum(s + 1, num_seqs)] <= blk_lo)

    s0 = lax.while_loop(skip_cond, lambda s: s + 1, jnp.int32(0))

    def seq_cond(s):
        return jnp.logical_and(s < num_seqs, cu_ref[s] < blk_lo + block_q)

    def seq_body(s):
        process_seq(s)
        return s + 1

    lax.while_loop(seq_cond, seq_body, s0)

    for h in range(num_kv_heads):
        out = C.finalize(acc_ref[h], l_ref[h])               # [G*bq, hd]
        for g in range(group):
            o_ref[:, h * group + g, :] = out[g * block_q:(g + 1) * block_q].astype(o_ref.dtype)


def _prefill_call(q, k_pages, v_pages, block_tables, cu_q_lens, kv_lens, num_seqs, *, scale, window, softcap,
                  k_scales, v_scales, new_kv, block_q, pages_per_block, interpret):
    t, hq, hd = q.shape
    n, ps, hkv, _ = C.check_attention_shapes(hq, k_pages, v_pages, k_scales, v_scales)
    g = hq // hkv
    quantized, fused = k_scales is not None, new_kv is not None
    # rows per KV-head dot = G * block_q; keep Hq * block_q <= 4096 so the f32 state (acc, m, l) stays a few MB
    bq = block_q or max(8, min(128, -(-t // 8) * 8, (4096 // hq) // 8 * 8))
    ppb = pages_per_block or max(1, min(block_tables.shape[1], max(1, 256 // ps)))
    tables = C.pad_block_tables(block_tables, ppb)
    pages_per_seq = tables.shape[1]
    cdt = C.compute_dtype_for(q.dtype, k_pages.dtype)
    num_seqs = jnp.asarray(num_seqs, jnp.int32).reshape(1)

    scalars = [kv_lens.astype(jnp.int32), tables.reshape(-1), cu_q_lens.astype(jnp.int32), num_seqs,
               jnp.asarray(window, jnp.int32).reshape(1)]
    if fused:
        scalars.append(new_kv[2].astype(jnp.int32))
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    q_spec = pl.BlockSpec((bq, hq, hd), lambda i, *_: (i, 0, 0))
    inputs, in_specs = [q, k_pages, v_pages], [q_spec, any_spec, any_spec]
    if quantized:
        inputs += [k_scales, v_scales]
        in_specs += [any_spec, any_spec]
    out_shape, out_specs, aliases = [jax.ShapeDtypeStruct(q.shape, q.dtype)], [q_spec], {}
    if fused:
        k_new, v_new, _ = new_kv
        if quantized:
            k_new, k_new_s = quantize_kv_int8(k_new)
            v_new, v_new_s = quantize_kv_int8(v_new)
            inputs += [k_new, v_new, k_new_s[:, None, :], v_new_s[:, None, :]]
            in_specs += [any_spec] * 4
        else:
            inputs += [k_new.astype(k_pages.dtype), v_new.astype(v_pages.dtype)]
            in_specs += [any_spec] * 2
        aliased = [k_pages, v_pages] + ([k_scales, v_scales] if quantized else [])
        for j, arr in enumerate(aliased):
            aliases[len(scalars) + 1 + j] = 1 + j
            out_shape.append(jax.ShapeDtypeStruct(arr.shape, arr.dtype))
            out_specs.append(any_spec)

    scratch = kv_scratch_shapes(ppb, ps, hkv, hd, k_pages.dtype, quantized)
    scratch += [pltpu.VMEM((hkv, g * bq, 1), jnp.float32), pltpu.VMEM((hkv, g * bq, 1), jnp.float32),
                pltpu.VMEM((hkv, g * bq, hd), jnp.float32), pltpu.SemaphoreType.DMA((1,))]
    kernel = functools.partial(
        _prefill_kernel, block_q=bq, num_tokens=t, page_size=ps, pages_per_block=ppb, pages_per_seq=pages_per_seq,
        num_kv_heads=hkv, group=g, scale=float(scale),
        softcap=None if softcap is None else float(softcap), quantized=quantized, fused=fused, compute_dtype=cdt)
    outs = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=len(scalars), grid=(pl.cdiv(t, bq),),
                                               in_specs=in_specs, out_specs=out_specs, scratch_shapes=scratch),
        out_shape=out_shape, input_output_aliases=aliases,
        # Fused: block b must finish its writes before later blocks read them -> sequential.
        compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary" if fused else "parallel",),
                                             vmem_limit_bytes=48 * 1024 * 1024),
        interpret=interpret, name="jaxserve_ragged_prefill_tpu",
    )(*scalars, *inputs)
    return outs[0], outs[1:]


_STATIC = ("scale", "softcap", "block_q", "pages_per_block", "interpret")


@functools.partial(jax.jit, static_argnames=_STATIC)
def ragged_prefill_attention(q, k_pages, v_pages, block_tables, cu_q_lens, kv_lens, num_seqs, *, scale, window=0,
                             softcap=None, k_scales=None, v_scales=None, block_q=None, pages_per_block=None,
                             interpret=False):
    """See reference.ragged_prefill_attention."""
    out, _ = _prefill_call(q, k_pages, v_pages, block_tables, cu_q_lens, kv_lens, num_seqs, scale=scale,
                           window=window, softcap=softcap, k_scales=k_scales, v_scales=v_scales, new_kv=None,
                           block_q=block_q, pages_per_block=pages_per_block, interpret=interpret)
    return out


@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnames=("k_pages", "v_pages", "k_scales", "v_scales"))
def ragged_prefill_attention_fused(q, k_new, v_new, k_pages, v_pages, slots, block_tables, cu_q_lens, kv_lens,
                                   num_seqs, *, scale, window=0, softcap=None, k_scales=None, v_scales=None,
                                   block_q=None, pages_per_block=None, interpret=False):
    """See reference.ragged_prefill_attention_fused. Returns (out, k_pages, v_pages[, k_scales, v_scales])."""
    out, pages = _prefill_call(q, k_pages, v_pages, block_tables, cu_q_lens, kv_lens, num_seqs, scale=scale,
                               window=window, softcap=softcap, k_scales=k_scales, v_scales=v_scales,
                               new_kv=(k_new, v_new, slots), block_q=block_q, pages_per_block=pages_per_block,
                               interpret=interpret)
    return (out, *pages)
