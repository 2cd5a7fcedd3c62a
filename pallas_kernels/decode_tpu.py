"""Paged-attention decode for TPU (Pallas Mosaic): one query token per sequence against its paged KV.

Grid: one program per sequence (all KV heads of that sequence), "parallel". Inside, a loop with a runtime trip
count walks the sequence's KV blocks (`pages_per_block` pages each) from the first page inside the sliding
window to the last page holding a token, double-buffering manual DMAs HBM -> VMEM: one DMA per page and
K/V (a page is one contiguous `[page_size, Hkv, hd]` slab of the engine's layout, so every KV head of a page
comes in one transfer). Pages outside the visible range are never fetched.

Scalar prefetch (SMEM): `kv_lens [R]`, `block_tables` flattened `[R * P]`, `window [1]` (runtime, 0 = none),
and `slots [R]` when fused.

int8 KV: pages are DMA'd as int8 with their per-(token, head) f32 scales and dequantized in VMEM, so HBM traffic
is the int8 bytes plus 4 bytes per token-head of scales.

Fused variant: each program first DMAs (HBM -> HBM) its sequence's new K/V row into the page slot (pages are aliased
input->output), waits for it, then attends; the new token is therefore visible to its own query. JAX's
`pallas.ops.tpu.paged_attention` has neither the fused write nor sliding windows, and needs a head-major cache.
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


def _decode_kernel(*refs, page_size, pages_per_block, pages_per_seq, num_kv_heads, scale, softcap,
                   quantized, fused, compute_dtype):
    # ---- unpack refs (order fixed by the pallas_call below) ----
    refs = list(refs)
    kv_lens_ref, block_tables_ref, window_ref = refs.pop(0), refs.pop(0), refs.pop(0)
    slots_ref = refs.pop(0) if fused else None
    q_ref = refs.pop(0)                                      # [Hkv, G, hd] VMEM block of this sequence
    k_hbm, v_hbm = refs.pop(0), refs.pop(0)                  # [N, ps, Hkv, hd] in HBM
    ks_hbm = vs_hbm = None
    if quantized:
        ks_hbm, vs_hbm = refs.pop(0), refs.pop(0)            # [N, ps, Hkv] f32 in HBM
    if fused:
        k_new_hbm, v_new_hbm = refs.pop(0), refs.pop(0)      # [R, Hkv, hd] in HBM: the new tokens
        if quantized:
            k_new_s_hbm, v_new_s_hbm = refs.pop(0), refs.pop(0)  # [R, 1, Hkv]
    o_ref = refs.pop(0)                                      # [Hkv, G, hd]
    if fused:
        # Aliased outputs: the same HBM buffers as the page inputs. Write and read through them so the
        # interpreter (which keeps inputs and outputs apart) sees the same data flow as the hardware.
        k_hbm, v_hbm = refs.pop(0), refs.pop(0)
        if quantized:
            ks_hbm, vs_hbm = refs.pop(0), refs.pop(0)
    k_buf, v_buf = refs.pop(0), refs.pop(0)                  # [2, ppb, ps, Hkv, hd] double buffers
    ks_buf = vs_buf = None
    if quantized:
        ks_buf, vs_buf = refs.pop(0), refs.pop(0)            # [2, ppb, ps, Hkv] f32
    sems = refs.pop(0)                                       # DMA semaphores [(k, v, ks, vs), slot]
    m_ref, l_ref, acc_ref = refs.pop(0), refs.pop(0), refs.pop(0)   # [Hkv, G, 1], [Hkv, G, 1], [Hkv, G, hd]
    write_sem = refs.pop(0)
    assert not refs

    r = pl.program_id(0)
    kv_len = kv_lens_ref[r]
    kv = PagedKV(k_hbm, v_hbm, ks_hbm, vs_hbm, k_buf, v_buf, ks_buf, vs_buf, sems, block_tables_ref,
                 pages_per_seq=pages_per_seq, pages_per_block=pages_per_block, page_size=page_size,
                 num_kv_heads=num_kv_heads)
    block_tokens = kv.block_tokens

    # ---- fused KV write: this sequence's new token goes to its slot before anyone reads the page ----
    if fused:
        slot = slots_ref[r]
        page, offset = C.div(slot, page_size), C.rem(slot, page_size)
        # HBM -> HBM DMAs of one [Hkv, hd] row (and its [1, Hkv] scales).
        writes = [pltpu.make_async_copy(k_new_hbm.at[r], k_hbm.at[page, offset], write_sem.at[0]),
                  pltpu.make_async_copy(v_new_hbm.at[r], v_hbm.at[page, offset], write_sem.at[0])]
        if quantized:
            writes += [pltpu.make_async_copy(k_new_s_hbm.at[r], ks_hbm.at[page, pl.ds(offset, 1)], write_sem.at[0]),
                       pltpu.make_async_copy(v_new_s_hbm.at[r], vs_hbm.at[page, pl.ds(offset, 1)], write_sem.at[0])]
        for w in writes:
            w.start()
        for w in writes:
            w.wait()

    # ---- visible key range [first_pos, kv_len): the query sits at kv_len - 1 ----
    first_pos = C.window_start(kv_len - 1, window_ref[0])
    first_page = C.div(first_pos, page_size)
    end_page = C.cdiv(kv_len, page_size)

    m_ref[...] = jnp.full(m_ref.shape, C.NEG_INF, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def compute(blk, slot):
        pos_row = blk * block_tokens + lax.broadcasted_iota(jnp.int32, (1, block_tokens), 1)
        pos_col = blk * block_tokens + lax.broadcasted_iota(jnp.int32, (block_tokens, 1), 0)
        vis_row = jnp.logical_and(pos_row >= first_pos, pos_row < kv_len)
        vis_col = jnp.logical_and(pos_col >= first_pos, pos_col < kv_len)
        for h in range(num_kv_heads):
            k = kv.k(slot, h).astype(compute_dtype)
            v = kv.v(slot, h)
            v = jnp.where(vis_col, v, jnp.zeros_like(v))       # unfetched pages hold stale bytes
            q = q_ref[h].astype(compute_dtype)                  # [G, hd]
            s = C.logits_transform(C.dot_nt(q, k), scale=scale, softcap=softcap)
            m, l, acc = C.online_softmax_step(m_ref[h], l_ref[h], acc_ref[h], s, v,
                                              jnp.broadcast_to(vis_row, s.shape), compute_dtype)
            m_ref[h], l_ref[h], acc_ref[h] = m, l, acc

    kv.stream(r, C.div(first_pos, block_tokens), C.cdiv(kv_len, block_tokens), first_page, end_page, compute)
    o_ref[...] = C.finalize(acc_ref[...], l_ref[...]).astype(o_ref.dtype)


def _default_pages_per_block(page_size, pages_per_seq):
    return max(1, min(pages_per_seq, max(1, 256 // page_size)))


def _decode_call(q, k_pages, v_pages, block_tables, kv_lens, *, scale, window, softcap, k_scales, v_scales,
                 new_kv, pages_per_block, interpret):
    r, hq, hd = q.shape
    n, ps, hkv, _ = C.check_attention_shapes(hq, k_pages, v_pages, k_scales, v_scales)
    g = hq // hkv
    quantized = k_scales is not None
    fused = new_kv is not None
    ppb = pages_per_block or _default_pages_per_block(ps, block_tables.shape[1])
    tables = C.pad_block_tables(block_tables, ppb)
    pages_per_seq = tables.shape[1]
    cdt = C.compute_dtype_for(q.dtype, k_pages.dtype)

    scalars = [kv_lens.astype(jnp.int32), tables.reshape(-1), jnp.asarray(window, jnp.int32).reshape(1)]
    if fused:
        scalars.append(new_kv[2].astype(jnp.int32))
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    q4 = q.reshape(r, hkv, g, hd)
    q_spec = pl.BlockSpec((None, hkv, g, hd), lambda i, *_: (i, 0, 0, 0))
    inputs, in_specs = [q4, k_pages, v_pages], [q_spec, any_spec, any_spec]
    if quantized:
        inputs += [k_scales, v_scales]
        in_specs += [any_spec, any_spec]
    out_shape = [jax.ShapeDtypeStruct(q4.shape, q.dtype)]
    out_specs = [q_spec]
    aliases = {}
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
        n_scalars = len(scalars)
        # operand index counts the scalar-prefetch operands first
        aliased = [k_pages, v_pages] + ([k_scales, v_scales] if quantized else [])
        for j, arr in enumerate(aliased):
            aliases[n_scalars + 1 + j] = 1 + j
            out_shape.append(jax.ShapeDtypeStruct(arr.shape, arr.dtype))
            out_specs.append(any_spec)

    scratch = kv_scratch_shapes(ppb, ps, hkv, hd, k_pages.dtype, quantized)
    scratch += [pltpu.VMEM((hkv, g, 1), jnp.float32), pltpu.VMEM((hkv, g, 1), jnp.float32),
                pltpu.VMEM((hkv, g, hd), jnp.float32), pltpu.SemaphoreType.DMA((1,))]

    kernel = functools.partial(
        _decode_kernel, page_size=ps, pages_per_block=ppb, pages_per_seq=pages_per_seq, num_kv_heads=hkv,
        scale=float(scale), softcap=None if softcap is None else float(softcap),
        quantized=quantized, fused=fused, compute_dtype=cdt)
    kv_bytes = k_pages.dtype.itemsize
    cost = pl.CostEstimate(flops=4 * r * hq * hd * pages_per_seq * ps, transcendentals=r * hq * pages_per_seq * ps,
                           bytes_accessed=2 * r * pages_per_seq * ps * hkv * hd * kv_bytes + 2 * q.nbytes)
    outs = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=len(scalars), grid=(r,), in_specs=in_specs,
                                               out_specs=out_specs, scratch_shapes=scratch),
        out_shape=out_shape,
        input_output_aliases=aliases,
        # Fused or not, rows are independent: each writes only its own slot (kv_len-0 rows: the null page).
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        cost_estimate=cost,
        interpret=interpret,
        name="jaxserve_paged_decode_tpu",
    )(*scalars, *inputs)
    out = outs[0].reshape(r, hq, hd)
    return out, outs[1:]


@functools.partial(jax.jit, static_argnames=("scale", "softcap", "pages_per_block", "interpret"))
def paged_attention_decode(q, k_pages, v_pages, block_tables, kv_lens, *, scale, window=0, softcap=None,
                           k_scales=None, v_scales=None, pages_per_block=None, interpret=False):
    """See reference.paged_attention_decode. `interpret`: False on TPU; True or pltpu.InterpretParams on CPU."""
    out, _ = _decode_call(q, k_pages, v_pages, block_tables, kv_lens, scale=scale, window=window, softcap=softcap,
                          k_scales=k_scales, v_scales=v_scales, new_kv=None, pages_per_block=pages_per_block,
                          interpret=interpret)
    return out


@functools.partial(jax.jit, static_argnames=("scale", "softcap", "pages_per_block", "interpret"),
                   donate_argnames=("k_pages", "v_pages", "k_scales", "v_scales"))
def paged_attention_decode_fused(q, k_new, v_new, k_pages, v_pages, slots, block_tables, kv_lens, *, scale,
                                 window=0, softcap=None, k_scales=None, v_scales=None, pages_per_block=None,
                                 interpret=False):
    """See reference.paged_attention_decode_fused: writes k_new/v_new [R, Hkv, hd] at slots [R] in-kernel
    (pages donated and aliased), then attends. Returns (out, k_pages, v_pages[, k_scales, v_scales])."""
    out, pages = _decode_call(q, k_pages, v_pages, block_tables, kv_lens, scale=scale, window=window,
                              softcap=softcap, k_scales=k_scales, v_scales=v_scales, new_kv=(k_new, v_new, slots),
                              pages_per_block=pages_per_block, interpret=interpret)
    return (out, *pages)
