"""TPU (Mosaic) paged-KV streaming shared by the decode and prefill kernels.

A KV block is `pages_per_block` consecutive entries of one sequence's block table. Each page is one contiguous
`[page_size, Hkv, hd]` slab of the engine's cache, fetched with one DMA (K and V separately, plus the int8 scale
rows `[page_size, Hkv]`) into slot 0 or 1 of a VMEM double buffer. Only pages in the caller's visible page range
are fetched; the rest of the buffer keeps stale bytes, which the kernels mask (logits by select, V rows zeroed).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from . import _common as C


def kv_scratch_shapes(pages_per_block, page_size, num_kv_heads, head_dim, kv_dtype, quantized):
    """VMEM double buffers for K and V (and scales), then the DMA semaphores [4 (k, v, ks, vs), 2 slots]."""
    shape = (2, pages_per_block, page_size, num_kv_heads, head_dim)
    out = [pltpu.VMEM(shape, kv_dtype), pltpu.VMEM(shape, kv_dtype)]
    if quantized:
        out += [pltpu.VMEM(shape[:-1], jnp.float32), pltpu.VMEM(shape[:-1], jnp.float32)]
    out += [pltpu.SemaphoreType.DMA((4, 2))]
    return out


class PagedKV:
    """DMA + VMEM access to one layer's paged K/V for a kernel program."""

    def __init__(self, k_hbm, v_hbm, ks_hbm, vs_hbm, k_buf, v_buf, ks_buf, vs_buf, sems, block_tables_ref, *,
                 pages_per_seq, pages_per_block, page_size, num_kv_heads):
        self.k_hbm, self.v_hbm, self.ks_hbm, self.vs_hbm = k_hbm, v_hbm, ks_hbm, vs_hbm
        self.k_buf, self.v_buf, self.ks_buf, self.vs_buf = k_buf, v_buf, ks_buf, vs_buf
        self.sems = sems
        self.tables = block_tables_ref                       # SMEM, flattened [R * pages_per_seq]
        self.pages_per_seq = pages_per_seq
        self.ppb = pages_per_block
        self.ps = page_size
        self.hkv = num_kv_heads
        self.block_tokens = pages_per_block * page_size
        self.quantized = ks_hbm is not None

    def _copies(self, seq, blk, slot, first_page, end_page):
        out = []
        for i in range(self.ppb):
            p = blk * self.ppb + i
            fetch = jnp.logical_and(p >= first_page, p < end_page)
            page_id = self.tables[seq * self.pages_per_seq + p]
            cps = [pltpu.make_async_copy(self.k_hbm.at[page_id], self.k_buf.at[slot, i], self.sems.at[0, slot]),
                   pltpu.make_async_copy(self.v_hbm.at[page_id], self.v_buf.at[slot, i], self.sems.at[1, slot])]
            if self.quantized:
                cps += [pltpu.make_async_copy(self.ks_hbm.at[page_id], self.ks_buf.at[slot, i], self.sems.at[2, slot]),
                        pltpu.make_async_copy(self.vs_hbm.at[page_id], self.vs_buf.at[slot, i], self.sems.at[3, slot])]
            out.append((fetch, cps))
        return out

    def start(self, seq, blk, slot, first_page, end_page):
        for fetch, cps in self._copies(seq, blk, slot, first_page, end_page):
            @pl.when(fetch)
            def _():
                for c in cps:
                    c.start()

    def wait(self, seq, blk, slot, first_page, end_page):
        for fetch, cps in self._copies(seq, blk, slot, first_page, end_page):
            @pl.when(fetch)
            def _():
                for c in cps:
                    c.wait()

    def _load(self, buf, scale_buf, slot, h):
        x = buf[slot, :, :, h, :].reshape(self.block_tokens, -1)           # [bk, hd], KV head h
        if scale_buf is None:
            return x
        s = scale_buf[slot].reshape(self.block_tokens, self.hkv)            # [bk, Hkv]
        lane = lax.broadcasted_iota(jnp.int32, s.shape, 1)
        col = jnp.sum(jnp.where(lane == h, s, 0.0), axis=1, keepdims=True)  # head h's scale column [bk, 1]
        return x.astype(jnp.float32) * col

    def k(self, slot, h):
        return self._load(self.k_buf, self.ks_buf, slot, h)

    def v(self, slot, h):
        return self._load(self.v_buf, self.vs_buf, slot, h)

    def stream(self, seq, blk_start, blk_end, first_page, end_page, compute):
        """for blk in [blk_start, blk_end): prefetch blk+1, wait blk, compute(blk, slot). Runtime trip count."""
        @pl.when(blk_start < blk_end)
        def _():
            self.start(seq, blk_start, 0, first_page, end_page)

        def body(blk, carry):
            slot = C.rem(blk - blk_start, 2)

            @pl.when(blk + 1 < blk_end)
            def _():
                self.start(seq, blk + 1, 1 - slot, first_page, end_page)

            self.wait(seq, blk, slot, first_page, end_page)
            compute(blk, slot)
            return carry

        lax.fori_loop(blk_start, blk_end, body, 0)
