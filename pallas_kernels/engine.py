"""The engine's attention through the Pallas kernels: `EngineConfig.attention_impl` -> an `attention_fn` for
`jaxserve.models.transformer.forward_step`.

forward_step calls, once per layer inside its `lax.scan`,

    attention_fn(cfg, q, k_cache, v_cache, layer, block_tables, kv_lens, q_pos, window, *, page_size,
                 block_pages, batch_invariant)

with q [R, Q, Hq, hd], the whole cache k/v_cache [L, num_pages * page_size, Hkv, hd] (this step's K/V already
written), the traced layer index, block_tables [R, P], kv_lens [R] (context including the new tokens),
q_pos [R, Q] (-1 for padding slots) and the layer's window (traced). It returns [R, Q, Hq, hd].

No copy of a layer's cache is made: the cache is viewed (a free reshape of contiguous memory) as the pages of
all layers, `[L * num_pages, page_size, Hkv, hd]`, and the layer is selected by offsetting the page ids,
`block_tables + layer * num_pages` (an [R, P] int32 add). Table padding (page 0) becomes the layer's own null
page, which the kernels mask like any other invisible page. An int8 KV cache (`kv_cache_dtype="int8"`, an
`Int8KV` of int8 values and per token-and-head f32 scales) is viewed the same way: int8 pages plus the kernels'
`k_scales` / `v_scales`.

The engine's `attn_block_pages` is the TPU kernels' `pages_per_block` (KV pages per DMA'd block); the Triton
kernels keep their own power-of-two choice.

Decode steps (Q == 1) go to the paged decode kernel. Prefill steps pack the [R, Q] rows (row r has
q_len[r] = count(q_pos[r] >= 0) new tokens, left-aligned) into the ragged kernel's flat layout: a gather of q
to [R*Q, Hq, hd] with segments back to back (cu_q_lens = cumsum(q_len)), the trailing R*Q - sum(q_len) tokens
padding, and a gather back. Both gathers move q-sized data, small next to the KV the kernel reads.

"auto" is Pallas on TPU / GPU and the engine's own XLA path (returned as None) on CPU; "pallas" on CPU runs the
TPU kernels in interpret mode (JAX's HLO interpreter: slow, for tests). On GPU, shapes the Triton kernels cannot
take (non-power-of-two page_size or head_dim, head_dim < 16) give the XLA path under "auto" and a ValueError
under "pallas". `batch_invariant` is ignored: on TPU / GPU each sequence's attention is computed by programs of
its own whatever the batch (decode), but the ragged kernel's query blocks can span sequences, so bitwise
batch invariance of prefill is not claimed for the Pallas path.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax.numpy as jnp

from . import dispatch


def engine_attention_fn(impl: str, *, head_dim: int, page_size: int, platform: Optional[str] = None,
                        kernel: Optional[str] = None, interpret=None) -> Optional[Callable]:
    """The forward_step attention_fn for `impl` ("auto" | "xla" | "pallas"), or None for the engine's XLA path.

    `platform` defaults to jax.default_backend(); `kernel` forces a kernel family ("tpu" | "gpu", e.g. the
    Triton kernels interpreted on CPU); `interpret` overrides the interpret setting (e.g. a
    pltpu.InterpretParams). Raises ValueError for an unknown impl, or "pallas" with shapes the kernels cannot take.
    """
    backend = dispatch.attention_backend(impl, platform)
    if backend == "xla":
        return None
    fam, interp = dispatch._family(platform, kernel)
    if fam == "gpu" and not dispatch._gpu_shape_ok(page_size, head_dim):
        if impl == "auto":
            return None
        raise ValueError(f"attention_impl='pallas' on GPU needs a power-of-two page_size and head_dim >= 16 "
                         f"(Triton); got page_size={page_size}, head_dim={head_dim}")
    if interpret is not None:
        interp = interpret
    mod_decode, mod_prefill = dispatch.kernel_modules(fam)

    def attention_fn(cfg, q, k_cache, v_cache, layer, block_tables, kv_lens, q_pos, window, *, page_size,
                     block_pages=None, batch_invariant=False):
        del batch_invariant  # see the module docstring
        num_layers, slots, hkv, hd = k_cache.shape
        n = slots // page_size
        kw = dict(scale=float(cfg.attn_scale), window=jnp.asarray(window, jnp.int32),
                  softcap=cfg.attn_logit_softcap, interpret=interp)
        if hasattr(k_cache, "scales"):
            # An int8 KV cache (jaxserve.weights.quantize.Int8KV): int8 values + f32 scales [L, slots, Hkv],
            # viewed as the kernels' int8 pages and k_scales / v_scales [pages, page_size, Hkv].
            kw["k_scales"] = k_cache.scales.reshape(num_layers * n, page_size, hkv)
            kw["v_scales"] = v_cache.scales.reshape(num_layers * n, page_size, hkv)
            k_cache, v_cache = k_cache.q, v_cache.q
        elif hasattr(k_cache, "bits"):  # a bfloat16 cache stored as bits on CPU (jaxserve.weights.quantize.Bf16KV)
            k_cache, v_cache = k_cache.as_bfloat16(), v_cache.as_bfloat16()
        k_pages = k_cache.reshape(num_layers * n, page_size, hkv, hd)
        v_pages = v_cache.reshape(num_layers * n, page_size, hkv, hd)
        tables = block_tables.astype(jnp.int32) + jnp.asarray(layer, jnp.int32) * n
        kv_lens = kv_lens.astype(jnp.int32)
        if fam == "tpu" and block_pages:
            # Default 16 pages = the kernels' own default of 256 tokens at page_size 16. It also bounds the
            # kernels' unrolled per-page DMA code, which matters for interpret-mode compile time.
            kw["pages_per_block"] = int(block_pages)
        r, qn, hq, _ = q.shape
        if qn == 1:
            out = mod_decode.paged_attention_decode(q[:, 0], k_pages, v_pages, tables, kv_lens, **kw)
            return out[:, None]
        q_lens = jnp.sum(q_pos >= 0, axis=1).astype(jnp.int32)
        cu = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(q_lens).astype(jnp.int32)])
        t = r * qn
        tok = jnp.arange(t, dtype=jnp.int32)
        seq = jnp.minimum(jnp.searchsorted(cu[1:], tok, side="right"), r - 1).astype(jnp.int32)
        src = jnp.where(tok < cu[r], seq * qn + tok - cu[seq], 0)
        q_flat = q.reshape(t, hq, hd)[src]
        out_flat = mod_prefill.ragged_prefill_attention(q_flat, k_pages, v_pages, tables, cu, kv_lens,
                                                        jnp.full((1,), r, jnp.int32), **kw)
        valid = jnp.arange(qn, dtype=jnp.int32)[None, :] < q_lens[:, None]               # [R, Q]
        idx = jnp.where(valid, cu[:-1, None] + jnp.arange(qn, dtype=jnp.int32)[None, :], 0)
        out = out_flat[idx]                                                               # [R, Q, Hq, hd]
        return jnp.where(valid[:, :, None, None], out, jnp.zeros((), out.dtype))

    attention_fn.kernel_family = fam
    attention_fn.interpret = interp
    return attention_fn
