"""Ragged (chunked) prefill attention for GPU (Pallas Triton): the one ragged kernel JAX does not ship for GPU.

Grid (R, Hkv, ceil(T / block_q)): program (r, h, i) takes rows [i*block_q, (i+1)*block_q) of segment r's new
tokens and the G query heads of KV head h, stacked as [block_q * G, hd] rows of one dot. Programs past the end
of their segment (or of the live segments) exit at once. Per program, a loop with a runtime trip count gathers
the visible KV blocks of segment r straight from the pages (`pages[page_ids, :, h, :]`, masked to visible pages)
from the window start of the first row to the position of the last row. Rows are read and written with masked
gathers/scatters, so segments of any length and any offset share the flat [T, Hq, hd] arrays.

Output rows that belong to no live segment (padding) are zero: the output aliases a zero buffer, which no
program writes outside the live segments (tests pass `poison_output=True` to start it as NaN instead, so a live
row that no program writes fails).

Fused variant: program (r, h, i) first stores head h of the new K/V of segment r's tokens [0, (i+1)*block_q)
into their slots (the earlier blocks' tokens are rewritten with identical values by several programs: a benign
race that removes any cross-program ordering), then a CTA barrier, then attends. int8 KV as in decode_gpu.

Power-of-two sizes: head_dim, page_size, pages_per_block, block_q (G is padded to a power of two, copying q); dots
need block_q * G, pages_per_block * page_size and head_dim >= 16.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from . import _common as C
from .decode_gpu import _is_pow2, _next_pow2
from .reference import quantize_kv_int8


def _prefill_kernel(*refs, block_q, group, page_size, pages_per_block, scale, softcap, quantized, fused,
                    compute_dtype, interpret):
    refs = list(refs)
    q_ref, tables_ref, cu_ref, kv_lens_ref, num_seqs_ref, window_ref = (refs.pop(0) for _ in range(6))
    k_ref, v_ref = refs.pop(0), refs.pop(0)
    ks_ref = vs_ref = None
    if quantized:
        ks_ref, vs_ref = refs.pop(0), refs.pop(0)
    if fused:
        slots_ref, k_new_ref, v_new_ref = refs.pop(0), refs.pop(0), refs.pop(0)
        if quantized:
            k_new_s_ref, v_new_s_ref = refs.pop(0), refs.pop(0)
    refs.pop(0)                                              # zero-initialised output, aliased to o_ref
    o_ref = refs.pop(0)
    if fused:
        k_ref, v_ref = refs.pop(0), refs.pop(0)
        if quantized:
            ks_ref, vs_ref = refs.pop(0), refs.pop(0)
    assert not refs

    r, h, qb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    hd = q_ref.shape[-1]
    q_start, q_end = cu_ref[r], cu_ref[r + 1]
    kv_len = kv_lens_ref[r]
    ctx = kv_len - (q_end - q_start)
    blk_tok0 = q_start + qb * block_q
    live = jnp.logical_and(r < num_seqs_ref[0], blk_tok0 < q_end)
    bk = pages_per_block * page_size
    lanes = jnp.arange(hd)

    @pl.when(live)
    def _():
        if fused:
            def write_block(j, c):
                tok = q_start + j * block_q + jnp.arange(block_q)
                ok = tok < q_end
                slot = plgpu.load(slots_ref.at[tok], mask=ok, other=0)
                page, off = C.div(slot, page_size), C.rem(slot, page_size)
                mask2 = jnp.broadcast_to(ok[:, None], (block_q, hd))
                dst = (page[:, None], off[:, None], h, lanes[None, :])
                src = (tok[:, None], h, lanes[None, :])
                plgpu.store(k_ref.at[dst], plgpu.load(k_new_ref.at[src], mask=mask2, other=0), mask=mask2)
                plgpu.store(v_ref.at[dst], plgpu.load(v_new_ref.at[src], mask=mask2, other=0), mask=mask2)
                if quantized:
                    plgpu.store(ks_ref.at[page, off, h], plgpu.load(k_new_s_ref.at[tok, h], mask=ok, other=0), mask=ok)
                    plgpu.store(vs_ref.at[page, off, h], plgpu.load(v_new_s_ref.at[tok, h], mask=ok, other=0), mask=ok)
                return c

            lax.fori_loop(0, qb + 1, write_block, 0)
            if not interpret:
                plgpu.debug_barrier()

        tok = blk_tok0 + jnp.arange(block_q)                 # [bq]
        row_ok = tok < q_end
        heads = h * group + jnp.arange(group)
        q_idx = (tok[:, None, None], heads[None, :, None], lanes[None, None, :])
        q_mask = jnp.broadcast_to(row_ok[:, None, None], (block_q, group, hd))
        rows = block_q * group
        q = plgpu.load(q_ref.at[q_idx], mask=q_mask, other=0).reshape(rows, hd).astype(compute_dtype)
        row_pos = jnp.broadcast_to((ctx + tok - q_start)[:, None], (block_q, group)).reshape(rows, 1)
        row_in = jnp.broadcast_to(row_ok[:, None], (block_q, group)).reshape(rows, 1)

        last_tok = jnp.minimum(q_end, blk_tok0 + block_q) - 1
        pos_hi = ctx + last_tok - q_start
        pos_lo = ctx + blk_tok0 - q_start
        window = window_ref[0]
        first_pos = C.window_start(pos_lo, window)
        first_page = C.div(first_pos, page_size)
        end_page = C.div(pos_hi, page_size) + 1

        def body(blk, carry):
            m, l, acc = carry
            page_idx = blk * pages_per_block + jnp.arange(pages_per_block)
            page_ok = (page_idx >= first_page) & (page_idx < end_page)
            ids = tables_ref[r, pl.ds(blk * pages_per_block, pages_per_block)]
            ids = jnp.where(page_ok, ids, 0)
            pid, t_in = ids[:, None, None], jnp.arange(page_size)[None, :, None]
            kv_mask = jnp.broadcast_to(page_ok[:, None, None], (pages_per_block, page_size, hd))
            k = plgpu.load(k_ref.at[pid, t_in, h, lanes[None, None, :]], mask=kv_mask, other=0).reshape(bk, hd)
            v = plgpu.load(v_ref.at[pid, t_in, h, lanes[None, None, :]], mask=kv_mask, other=0).reshape(bk, hd)
            kpos_1d = blk * bk + jnp.arange(bk)
            key_ok = (kpos_1d >= first_pos) & (kpos_1d <= pos_hi)   # slots some row of this block may see
            v = jnp.where(key_ok[:, None], v, jnp.zeros_like(v))
            s = C.dot_nt(q, k.astype(compute_dtype))                          # [bq*G, bk]
            sc_mask = jnp.broadcast_to(page_ok[:, None], (pages_per_block, page_size))
            if quantized:
                k_scale = plgpu.load(ks_ref.at[ids[:, None], t_in[:, :, 0], h], mask=sc_mask, other=0).reshape(bk)
                s = s * jnp.where(key_ok, k_scale, 0.0)[None, :]
            s = C.logits_transform(s, scale=scale, softcap=softcap)
            kpos = kpos_1d[None, :]
            visible = row_in & (kpos <= row_pos) & (kpos >= first_pos)
            visible = visible & C.in_window(row_pos, kpos, window)
            s = jnp.where(visible, s, C.NEG_INF)
            m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
            m_safe = jnp.where(m_new == C.NEG_INF, 0.0, m_new)
            p = jnp.exp(s - m_safe)
            alpha = jnp.exp(m - m_safe)
            l_new = alpha * l + jnp.sum(p, axis=1, keepdims=True)
            if quantized:
                v_scale = plgpu.load(vs_ref.at[ids[:, None], t_in[:, :, 0], h], mask=sc_mask, other=0).reshape(bk)
                p = p * jnp.where(key_ok, v_scale, 0.0)[None, :]
            acc_new = alpha * acc + C.dot_nn(p.astype(compute_dtype), v.astype(compute_dtype))
            return m_new, l_new, acc_new

        init = (jnp.full((rows, 1), C.NEG_INF, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
                jnp.zeros((rows, hd), jnp.float32))
        m, l, acc = lax.fori_loop(C.div(first_pos, bk), C.div(pos_hi, bk) + 1, body, init)
        out = C.finalize(acc, l).reshape(block_q, group, hd).astype(o_ref.dtype)
        plgpu.store(o_ref.at[q_idx], out, mask=q_mask)


def _prefill_call(q, k_pages, v_pages, block_tables, cu_q_lens, kv_lens, num_seqs, *, scale, window, softcap,
                  k_scales, v_scales, new_kv, block_q, pages_per_block, num_warps, interpret, poison_output=False):
    t, hq, hd = q.shape
    n, ps, hkv, _ = C.check_attention_shapes(hq, k_pages, v_pages, k_scales, v_scales)
    g = hq // hkv
    quantized, fused = k_scales is not None, new_kv is not None
    gp = _next_pow2(g)
    bq = block_q or max(max(1, 16 // gp), min(64, _next_pow2(t)))
    ppb = pages_per_block or max(1, min(_next_pow2(block_tables.shape[1]), max(1, 64 // ps)))
    for name, val in (("head_dim", hd), ("page_size", ps), ("pages_per_block", ppb), ("block_q", bq)):
        if not _is_pow2(val):
            raise ValueError(f"GPU (Triton) prefill needs a power-of-two {name}, got {val}")
    if bq * gp < 16 or ppb * ps < 16 or hd < 16:
        raise ValueError("GPU (Triton) dots need >= 16 rows (block_q * G), keys per block and head_dim")
    tables = C.pad_block_tables(block_tables, ppb)
    cdt = C.compute_dtype_for(q.dtype, k_pages.dtype)
    full = pl.no_block_spec
    q_in = q
    if gp != g:   # pad each KV head's query group to a power of two (a copy of q; only for G = 3, 5, 6, 7, ...)
        q_in = jnp.pad(q.reshape(t, hkv, g, hd), ((0, 0), (0, 0), (0, gp - g), (0, 0))).reshape(t, hkv * gp, hd)
    inputs = [q_in, tables, cu_q_lens.astype(jnp.int32), kv_lens.astype(jnp.int32),
              jnp.asarray(num_seqs, jnp.int32).reshape(1), jnp.asarray(window, jnp.int32).reshape(1),
              k_pages, v_pages]
    if quantized:
        inputs += [k_scales, v_scales]
    page_idx = [6, 7] + ([8, 9] if quantized else [])
    if fused:
        k_new, v_new, slots = new_kv
        if quantized:
            k_new, k_new_s = quantize_kv_int8(k_new)
            v_new, v_new_s = quantize_kv_int8(v_new)
            inputs += [slots.astype(jnp.int32), k_new, v_new, k_new_s, v_new_s]
        else:
            inputs += [slots.astype(jnp.int32), k_new.astype(k_pages.dtype), v_new.astype(v_pages.dtype)]
    inputs.append(jnp.full(q_in.shape, jnp.nan if poison_output else 0.0, q.dtype))
    aliases = {len(inputs) - 1: 0}
    out_shape = [jax.ShapeDtypeStruct(q_in.shape, q.dtype)]
    if fused:
        for j, idx in enumerate(page_idx):
            aliases[idx] = 1 + j
            out_shape.append(jax.ShapeDtypeStruct(inputs[idx].shape, inputs[idx].dtype))
    kernel = functools.partial(
        _prefill_kernel, block_q=bq, group=gp, page_size=ps, pages_per_block=ppb,
        scale=float(scale), softcap=None if softcap is None else float(softcap), quantized=quantized, fused=fused,
        compute_dtype=cdt, interpret=bool(interpret))
    outs = pl.pallas_call(
        kernel, grid=(block_tables.shape[0], hkv, pl.cdiv(t, bq)),
        in_specs=[full] * len(inputs), out_specs=[full] * len(out_shape), out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=2),
        interpret=interpret, name="jaxserve_ragged_prefill_gpu",
    )(*inputs)
    out = outs[0]
    if gp != g:
        out = out.reshape(t, hkv, gp, hd)[:, :, :g].reshape(t, hq, hd)
    return out, outs[1:]


_STATIC = ("scale", "softcap", "block_q", "pages_per_block", "num_warps", "interpret", "poison_output")


@functools.partial(jax.jit, static_argnames=_STATIC)
def ragged_prefill_attention(q, k_pages, v_pages, block_tables, cu_q_lens, kv_lens, num_seqs, *, scale, window=0,
                             softcap=None, k_scales=None, v_scales=None, block_q=None, pages_per_block=None,
                             num_warps=4, interpret=False, poison_output=False):
    """See reference.ragged_prefill_attention. `poison_output`: rows outside the live segments are NaN instead
    of zero (tests)."""
    out, _ = _prefill_call(q, k_pages, v_pages, block_tables, cu_q_lens, kv_lens, num_seqs, scale=scale,
                           window=window, softcap=softcap, k_scales=k_scales, v_scales=v_scales, new_kv=None,
                           block_q=block_q, pages_per_block=pages_per_block, num_warps=num_warps,
                           interpret=interpret, poison_output=poison_output)
    return out


@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnames=("k_pages", "v_pages", "k_scales", "v_scales"))
def ragged_prefill_attention_fused(q, k_new, v_new, k_pages, v_pages, slots, block_tables, cu_q_lens, kv_lens,
                                   num_seqs, *, scale, window=0, softcap=None, k_scales=None, v_scales=None,
                                   block_q=None, pages_per_block=None, num_warps=4, interpret=False,
                                   poison_output=False):
    """See reference.ragged_prefill_attention_fused. Returns (out, k_pages, v_pages[, k_scales, v_scales]).

    Note: only the live segments' tokens are written (padding tokens' null-page writes are skipped)."""
    out, pages = _prefill_call(q, k_pages, v_pages, block_tables, cu_q_lens, kv_lens, num_seqs, scale=scale,
                               window=window, softcap=softcap, k_scales=k_scales, v_scales=v_scales,
                               new_kv=(k_new, v_new, slots), block_q=block_q, pages_per_block=pages_per_block,
                               num_warps=num_warps, interpret=interpret, poison_output=poison_output)
    return (out, *pages)
