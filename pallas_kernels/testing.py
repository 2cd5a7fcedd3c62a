"""Test helpers: random paged-KV cases with poisoned caches, interpret settings, tolerances, lowering."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


# Tolerances (max abs error against the reference, on outputs of magnitude ~1), per compute dtype:
# float32 kernels accumulate in f32 like the reference; bf16 kernels feed bf16 to the dots (probabilities are
# rounded to bf16 before P.V) and round the output to bf16.
ATOL = {jnp.dtype(jnp.float32): 2e-5, jnp.dtype(jnp.bfloat16): 3e-2}
# Relative (to max |ref|) tolerance of the quantized matmuls: the reference dequantizes to f32 exactly; the
# kernels round the dequantized tile to x.dtype.
MATMUL_RTOL = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 2e-2}


def tpu_interpret():
    """TPU interpret mode: simulates HBM/VMEM, DMAs (executed on wait) and semaphores; every uninitialised
    buffer (outputs, scratch, VMEM) starts as NaN, and out-of-bounds reads raise.

    Also resets the interpreter's global simulated-TPU state, which a kernel that raised leaves behind (JAX
    documents that it must be reset before interpreting again); after a clean run it is already empty."""
    from jax.experimental.pallas import tpu as pltpu
    pltpu.reset_tpu_interpret_mode_state()
    return pltpu.InterpretParams(uninitialized_memory="nan", out_of_bounds_reads="raise")


GPU_INTERPRET = True  # generic interpreter: outputs start as NaN (ints: INT_MIN)

TRITON_CHECK = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")


def export(fn, platform, *args, **kwargs):
    """Lower `fn(*args, **kwargs)` for `platform` ("tpu" | "cuda") on this machine; returns the MLIR text."""
    checks = [TRITON_CHECK] if platform in ("cuda", "rocm") else []
    exp = jax.export.export(jax.jit(functools.partial(fn, **kwargs)), platforms=(platform,),
                            disabled_checks=checks)(*args)
    return exp.mlir_module()


def sweep_variant(g):
    """The deterministic GQA sweeps' settings for ratio g (1-8), whatever hypothesis draws: KV heads, dtype,
    soft-cap, int8 KV and fused write, so every kernel variant runs in the sweep and every ratio runs."""
    return dict(hkv=2 if g in (2, 3) else 1, dtype=jnp.bfloat16 if g % 2 else jnp.float32,
                softcap=4.0 if g % 3 == 0 else None, int8=g in (3, 4, 7, 8), fused=g in (5, 6, 7, 8))


def np_quantize_kv_int8(x):
    """numpy twin of reference.quantize_kv_int8 (test data is built in numpy: no per-shape compiles)."""
    x = np.asarray(x, np.float32)
    amax = np.abs(x).max(axis=-1)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.round(x / scale[..., None]), -127, 127).astype(np.int8)
    return q, scale


def _poison(x, visible_slots):
    """Set every slot not in visible_slots to NaN so an unmasked read of it poisons the output."""
    flat = x.reshape(-1, *x.shape[2:]).copy()
    mask = np.ones(flat.shape[0], bool)
    mask[np.asarray(sorted(visible_slots), np.int64)] = False
    flat[mask] = np.nan
    return flat.reshape(x.shape)


def ragged_case(rng, q_lens, ctx_lens, *, num_heads, num_kv_heads, head_dim, page_size, window=0, num_seqs=None,
                pad_tokens=2, num_tokens=None, dtype=jnp.float32, int8=False, extra_pages=2, pages_per_seq=None,
                poison=True):
    """A flat batch: sequence r has ctx_lens[r] cached tokens and q_lens[r] new ones (kv_len = ctx + q).

    Pages are allocated in random order from 1..N-1 (page 0 = null page, table padding); N depends only on the
    shapes. With `poison`, every KV slot no live query may see (null page, unused pages, page tails past kv_len,
    slots before the window) is NaN (for int8: its scale is NaN). The new tokens' slots are the engine's:
    page*ps+offset of their position; padding tokens (and non-live sequences) point into the null page."""
    r = len(q_lens)
    num_seqs = r if num_seqs is None else num_seqs
    kv_lens = [c + q for c, q in zip(ctx_lens, q_lens)]
    need = [(k + page_size - 1) // page_size for k in kv_lens]
    p = pages_per_seq or max(1, max(need))
    n = 1 + r * p + extra_pages                              # depends on shapes only: compiles are reused
    perm = rng.permutation(np.arange(1, n))
    tables = np.zeros((r, p), np.int32)
    o = 0
    for i in range(r):
        tables[i, :need[i]] = perm[o:o + need[i]]
        o += need[i]
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    t = int(cu[-1]) + pad_tokens if num_tokens is None else num_tokens
    assert t >= cu[-1]
    shape = (n, page_size, num_kv_heads, head_dim)
    normal = lambda *sh: rng.standard_normal(sh).astype(np.float32)
    q, k_pages, v_pages = normal(t, num_heads, head_dim), normal(*shape), normal(*shape)
    k_new, v_new = normal(t, num_kv_heads, head_dim), normal(t, num_kv_heads, head_dim)
    slots = np.zeros(t, np.int32)
    visible = set()
    for i in range(r):
        for j in range(q_lens[i]):
            pos = ctx_lens[i] + j
            slots[cu[i] + j] = tables[i, pos // page_size] * page_size + pos % page_size
        if i < num_seqs and q_lens[i] > 0:
            first = max(0, ctx_lens[i] - window + 1) if window else 0
            for pos in range(first, kv_lens[i]):
                visible.add(int(tables[i, pos // page_size]) * page_size + pos % page_size)
    for j in range(int(cu[num_seqs]), t):
        slots[j] = j % page_size                                # padding tokens -> null page
    k_scales = v_scales = None
    if int8:
        k_pages, k_scales = np_quantize_kv_int8(k_pages)
        v_pages, v_scales = np_quantize_kv_int8(v_pages)
        if poison:
            k_scales, v_scales = _poison(k_scales, visible), _poison(v_scales, visible)
    elif poison:
        k_pages, v_pages = _poison(k_pages, visible), _poison(v_pages, visible)
    cast = lambda x: jnp.asarray(x, dtype) if x.dtype == np.float32 else jnp.asarray(x)
    return dict(q=cast(q), k_pages=cast(k_pages), v_pages=cast(v_pages), block_tables=jnp.asarray(tables),
                cu_q_lens=jnp.asarray(cu), kv_lens=jnp.asarray(kv_lens, jnp.int32),
                num_seqs=jnp.asarray([num_seqs], jnp.int32), k_new=cast(k_new), v_new=cast(v_new),
                slots=jnp.asarray(slots),
                k_scales=None if k_scales is None else jnp.asarray(k_scales),
                v_scales=None if v_scales is None else jnp.asarray(v_scales))


def decode_case(rng, kv_lens, **kw):
    """Decode = one new token per row (kv_len-0 rows: no token, zero query, slot in the null page)."""
    r = len(kv_lens)
    q_lens = [1 if k > 0 else 0 for k in kv_lens]
    ctx = [k - q for k, q in zip(kv_lens, q_lens)]
    c = ragged_case(rng, q_lens, ctx, num_tokens=r, **kw)
    # Row i's token is flat token cu[i] when it has one.
    cu = np.asarray(c["cu_q_lens"])
    has = np.asarray(q_lens) > 0
    rows = np.where(has, cu[:-1], 0)

    def pick(x):
        x = np.asarray(x)
        return jnp.asarray(np.where(has[:, None, None], x[rows], np.zeros_like(x[rows])))

    slots = np.where(has, np.asarray(c["slots"])[rows], 0).astype(np.int32)
    return dict(q=pick(c["q"]), k_new=pick(c["k_new"]), v_new=pick(c["v_new"]), slots=jnp.asarray(slots),
                k_pages=c["k_pages"], v_pages=c["v_pages"], k_scales=c["k_scales"], v_scales=c["v_scales"],
                block_tables=c["block_tables"], kv_lens=c["kv_lens"])


def f32(x):
    return np.asarray(x.astype(jnp.float32)) if hasattr(x, "astype") else np.asarray(x, np.float32)


def max_err(a, b):
    a, b = f32(a), f32(b)
    return float(np.abs(a - b).max()) if a.size else 0.0


def assert_pages_equal(got, want):
    """A fused kernel's updated page buffers (K, V[, scales]) equal the reference's on every page but the
    null page 0, which padding tokens / kv_len-0 rows may write."""
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(f32(g)[1:], f32(w)[1:])
