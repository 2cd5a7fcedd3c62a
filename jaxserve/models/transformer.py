"""The decoder forward pass over a paged KV cache: Llama family and Gemma 3 in one plain file.

Both families are the same skeleton (pre-norm attention + gated MLP, RoPE, GQA); `ModelConfig` flags select
Gemma 3's extras: GeGLU, QK-norm, sandwich post-norms, embedding scaling, interleaved sliding-window layers
with their own RoPE base, logit soft-capping. Layers are stacked and run with one `lax.scan`, so XLA compiles
one layer body per program; per-layer differences (window, RoPE frequencies) are data, not code.

Shapes: R sequences x Q new tokens per step, D hidden, Hq/Hkv heads, hd head dim, L layers, V vocab.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.config import ModelConfig
from jaxserve.models.kv_cache import write_kv
from jaxserve.models.linear import float_matmul
from jaxserve.models.quantized import is_quantized


class StepInputs(NamedTuple):
    """One step's fixed-shape batch (see docs/architecture.md)."""

    tokens: jax.Array  # i32[R, Q]
    positions: jax.Array  # i32[R, Q]  absolute position of each new token
    q_lens: jax.Array  # i32[R]     new tokens per row (0 for padding rows)
    kv_lens: jax.Array  # i32[R]     context length after this step (cached + new)
    block_tables: jax.Array  # i32[R, P]  page ids, 0-padded; i32[G, R, P] per page group (config.KVLayout)
    slots: jax.Array  # i32[R, Q]  cache slot of each new token (null page for padding); [G, R, Q] per group


# ----------------------------------------------------------------------------------------------
# Building blocks (shared with the cache-free reference in models/reference.py)
# ----------------------------------------------------------------------------------------------


# XLA:CPU picks its GEMM algorithm by the number of rows M (one row: a matrix-vector kernel; a few rows; more
# rows), and they give slightly different per-row results, at thresholds that differ between CPUs (YNNPACK picks
# kernels by instruction set: on one AMX machine 2 rows summed differently from 3..32). Running every matmul on
# tiles of exactly ROW_TILE rows (fewer rows padded up, more rows in a loop of tiles) gives every dot one shape,
# so a token's result does not depend on how many tokens share its step (batch invariance;
# tests/test_batch_invariance). Measured on Gemma 3 270M decode (AMD EPYC, batch-invariant mode): no cost over
# 4-row tiles (float32 79.8 vs 79.1 ms/step at batch 1, bfloat16 41.6 vs 42.1): the weights' bytes dominate.
ROW_TILE = 32
# Query tokens per attention dot, so that (tokens x query heads per KV head) stays in one regime too, and
# rows per attention chunk (batched dots also change summation order with the batch size).
ATTN_M = 16
ATTN_ROWS = 4


@dataclasses.dataclass(frozen=True)
class RowTiles:
    """How batch-invariant mode tiles its dots; `forward_step(batch_invariant=...)` takes one (True means the
    default). Whether a tiling keeps a token's result independent of its step depends on the CPU's GEMM kernels
    (YNNPACK on XLA:CPU picks them by ISA), so the runner checks it on the machine it runs on and pads decode
    queries where attention needs it (models/invariance.py)."""

    # A one-token query goes through attention padded to the prefill chunk's query tile. Off by default: it
    # costs 2.2x per decode step (Gemma 3 270M float32, 180 vs 79 ms at batch 1); taken where the machine's
    # attention dots differ between the two shapes.
    pad_decode_queries: bool = False

    def __bool__(self) -> bool:
        return True


STRICT_TILES = RowTiles(pad_decode_queries=True)


def row_tiles(invariant) -> Optional[RowTiles]:
    """The RowTiles a `batch_invariant` / `invariant` argument stands for (None: not invariant)."""
    if not invariant:
        return None
    return invariant if isinstance(invariant, RowTiles) else RowTiles()


def attn_query_tile(cfg: ModelConfig) -> int:
    g = cfg.num_heads // cfg.num_kv_heads
    t = max(1, ATTN_M // g)
    return 1 << (t.bit_length() - 1)  # a power of two, so it divides every Q bucket


def dense(x, w, invariant: bool = False, out_dtype=None, transposed: bool = False):
    """x [..., K] @ w [K, N] (`transposed`: a float w [N, K]); with `invariant` (True or a RowTiles), on
    ROW_TILE-row tiles (fewer rows padded up; see ROW_TILE).

    `w` may be a quantized weight (models/quantized.py: Int8Weight / Int4Weight), then `w.matmul`; a float one
    goes through `linear.float_matmul`."""
    mm = (lambda a: w.matmul(a, out_dtype)) if is_quantized(w) else (lambda a: float_matmul(a, w, out_dtype, transposed))
    n_out = w.shape[0] if transposed and not is_quantized(w) else w.shape[-1]
    tiles = row_tiles(invariant)
    if tiles is None:
        return mm(x)
    lead, K = x.shape[:-1], x.shape[-1]
    M = math.prod(lead)
    x2 = x.reshape(M, K)
    pad = -M % ROW_TILE  # decode rows and the LM head's rows are padded up; prefill steps are whole tiles
    xp = jnp.pad(x2, ((0, pad), (0, 0))) if pad else x2
    if M + pad == ROW_TILE:
        y = mm(xp)[:M]
    else:
        y = jax.lax.map(mm, xp.reshape(-1, ROW_TILE, K)).reshape(M + pad, -1)[:M]
    return y.reshape(*lead, n_out)


# bf16 weights on XLA:CPU: the stacked layer weights are held as their bits (uint16) because XLA:CPU has no
# bf16 dynamic-slice: the layer scan's slice of a bf16 stack converted the whole stack to f32 on every step
# (~300 ms per Gemma 3 270M step). A uint16 slice is bitcast back to bf16 inside the scan, one layer at a time.
def pack_bf16_layers(params):
    """params with the bf16 leaves of params["layers"] stored as uint16 bits (XLA:CPU only; else unchanged)."""
    if jax.default_backend() != "cpu" or "layers" not in params:
        return params

    def conv(a):
        return a if is_quantized(a) or a.dtype != jnp.bfloat16 else jax.lax.bitcast_convert_type(a, jnp.uint16)

    return {**params, "layers": jax.tree.map(conv, params["layers"], is_leaf=is_quantized)}


def unpack_bf16(tree):
    """The inverse of `pack_bf16_layers` on any subtree: uint16 leaves back to bf16 (a bitcast)."""
    def conv(a):
        return jax.lax.bitcast_convert_type(a, jnp.bfloat16) if not is_quantized(a) and a.dtype == jnp.uint16 else a

    return jax.tree.map(conv, tree, is_leaf=is_quantized)


def fixed_order_sum(x):
    """Sum over the last axis as a fixed pairwise tree of elementwise adds, keepdims.

    XLA:CPU hands a reduce to a YNNPACK kernel once its operand reaches ~4096 elements and otherwise emits a
    loop (split into windows of 32); the two sum in different orders, so a plain `jnp.sum` over a row gives
    results that depend on how many rows share the op. Elementwise adds are exact whoever runs them.
    """
    while x.shape[-1] > 1:
        n = x.shape[-1]
        h = n // 2
        y = x[..., :h] + x[..., h:2 * h]
        x = jnp.concatenate([y, x[..., 2 * h:]], axis=-1) if n % 2 else y
    return x


def rms_norm(x, w, eps, invariant: bool = False):
    """RMSNorm with `w` the effective multiplier (Gemma's 1 + w is folded in at load time).

    With `invariant`, the mean of squares uses `fixed_order_sum` (batch invariance, see ROW_TILE)."""
    xf = x.astype(jnp.float32)
    if invariant:
        ms = fixed_order_sum(xf * xf) / xf.shape[-1]
    else:
        ms = jnp.mean(xf * xf, axis=-1, keepdims=True)
    y = xf * jax.lax.rsqrt(ms + eps)
    return (y * w.astype(jnp.float32)).astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Per-layer inverse RoPE frequencies f32[L, hd/2], with Llama-3 or linear scaling applied."""
    hd = cfg.head_dim
    rows = []
    for layer, theta in enumerate(cfg.layer_rope_thetas()):
        inv = 1.0 / (theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
        sc = cfg.rope_scaling
        # Scaling applies to global layers only (Gemma 3 keeps its local layers unscaled).
        if sc is not None and not cfg.layer_is_sliding(layer):
            if sc["rope_type"] == "linear":
                inv = inv / sc["factor"]
            elif sc["rope_type"] == "llama3":
                factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
                old_len = sc["original_max_position_embeddings"]
                wavelen = 2 * math.pi / inv
                smooth = (old_len / wavelen - lo) / (hi - lo)
                scaled = np.where(wavelen > old_len / lo, inv / factor, inv)
                mid = (1 - smooth) * inv / factor + smooth * inv
                is_mid = (wavelen <= old_len / lo) & (wavelen >= old_len / hi)
                inv = np.where(is_mid, mid, scaled)
            elif sc["rope_type"] == "freq_factors":  # llama.cpp's rope_freqs tensor, as a GGUF stores it
                inv = inv / np.asarray(sc["factors"], np.float64)
            else:
                raise ValueError(f"unsupported rope_type {sc['rope_type']!r}")
        rows.append(inv)
    return np.asarray(rows, dtype=np.float32)


def apply_rope(x, positions, inv_freq):
    """Rotate-half RoPE. x [..., T, H, hd], positions [..., T], inv_freq [hd/2]."""
    ang = positions[..., None].astype(jnp.float32) * inv_freq  # [..., T, hd/2]
    cos = jnp.cos(ang)[..., None, :]
    sin = jnp.sin(ang)[..., None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def activation(cfg: ModelConfig, x):
    if cfg.hidden_act == "gelu_tanh":
        return jax.nn.gelu(x, approximate=True)
    return jax.nn.silu(x)


def softcap(x, cap: Optional[float]):
    if cap is None:
        return x
    return cap * jnp.tanh(x / cap)


def embed_tokens(cfg: ModelConfig, params, tokens):
    e = params["embed"]  # a quantized embedding is stored as the LM head's [D, V] (models/quantized.py)
    if is_quantized(e):  # rows dequantized in f32, then the compute dtype (that of the float parameters)
        x = e.take_rows(tokens).astype(params["final_norm"].dtype)
    else:
        x = jnp.take(e, tokens, axis=0)
    if cfg.embed_scale:
        # Gemma multiplies by sqrt(D) rounded to the compute dtype.
        x = x * jnp.asarray(math.sqrt(cfg.hidden_size), dtype=x.dtype)
    return x


def lm_head(cfg: ModelConfig, params, x, inv: bool = False):
    """Final norm + vocabulary projection, logits in float32."""
    x = rms_norm(x, params["final_norm"], cfg.rms_norm_eps, inv)
    if "lm_head" in params:
        logits = dense(x, params["lm_head"], inv, out_dtype=jnp.float32)
    else:
        e = params["embed"]
        logits = dense(x, e, inv, out_dtype=jnp.float32, transposed=not is_quantized(e))
    return softcap(logits.astype(jnp.float32), cfg.final_logit_softcap)


def mlp(cfg: ModelConfig, lp, h, inv: bool = False):
    if cfg.is_moe:
        return moe_mlp(cfg, lp, h)
    return dense(activation(cfg, dense(h, lp["w_gate"], inv)) * dense(h, lp["w_up"], inv), lp["w_down"], inv)


# ----------------------------------------------------------------------------------------------
# Mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE): router -> top-k -> grouped matmuls over tokens sorted by expert
# ----------------------------------------------------------------------------------------------
#
# Layer weights: router [D, E]; experts_gate / experts_up [E, D, F]; experts_down [E, F, D]; Qwen2-MoE's shared
# expert shared_w_gate / shared_w_up [D, Fs], shared_w_down [Fs, D] and its sigmoid gate shared_expert_gate [D, 1].
# A step's T tokens make T*k (token, expert) rows, a static count per bucket: sorted by expert, the rows go through
# each expert's weights as one grouped matmul (`group_sizes` = rows per expert, data, not shape), so nothing
# recompiles however the router splits them and no token is multiplied by an expert it was not routed to
# (`grouped_matmul`: jax.lax.ragged_dot on TPU / GPU, a tiled loop on CPU).


def route(cfg: ModelConfig, lp, x):
    """x [T, D] -> (weights f32[T, k], experts i32[T, k]): softmax over all experts in float32, top-k, the k
    probabilities renormalised when `cfg.norm_topk_prob` (transformers' Mixtral / Qwen*Moe TopKRouter)."""
    logits = dense(x, lp["router"], out_dtype=jnp.float32).astype(jnp.float32)
    weights, experts = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), cfg.num_experts_per_tok)
    if cfg.norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts


# Rows per tile of the CPU grouped matmul (`grouped_matmul_tiles`).
GMM_TILE = 32


def grouped_matmul(x, w, group_sizes, impl: Optional[str] = None):
    """x [M, K], rows sorted by group, times w [G, K, N]: row i of group g gives x[i] @ w[g]; rows past
    sum(group_sizes) give zeros. Narrow floats (bf16) accumulate in float32.

    impl "ragged_dot": `jax.lax.ragged_dot` (TPU / GPU lower it to a grouped kernel). XLA:CPU has none: JAX lowers
    it there to a dense dot of every row with every group's weights, masked ([G, M, K] materialised: E times the
    work, 4 GiB per call for Qwen3-30B-A3B's 128 experts at 512 tokens), so impl None picks "tiles" on CPU."""
    if impl is None:
        impl = "tiles" if jax.default_backend() == "cpu" else "ragged_dot"
    if impl == "tiles":
        return grouped_matmul_tiles(x, w, group_sizes)
    if x.dtype == jnp.float32 and w.dtype == jnp.float32:
        return jax.lax.ragged_dot(x, w, group_sizes)
    return jax.lax.ragged_dot(x, w, group_sizes, preferred_element_type=jnp.float32).astype(x.dtype)


def grouped_matmul_tiles(x, w, group_sizes, tile: int = GMM_TILE):
    """`grouped_matmul` as a loop over (row tile, group) pairs (the work list of megablox's grouped matmul): a
    tile of `tile` sorted rows is multiplied by each group's weights that it overlaps, and rows outside that
    group are masked out. The trip count is data (a runtime `fori_loop` bound: the tiles plus one per group
    boundary inside a tile), so empty groups cost nothing and each used expert's weights are read once per tile
    that holds its rows: a decode step reads only the experts its tokens picked."""
    M, K = x.shape
    tm = min(tile, M)
    n_tiles = -(-M // tm)
    xp = jnp.pad(x, ((0, n_tiles * tm - M), (0, 0)))
    sizes = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    first = starts // tm
    count = jnp.where(sizes > 0, (ends - 1) // tm - first + 1, 0)  # tiles each group's rows touch
    work_end = jnp.cumsum(count)

    def body(i, out):
        g = jnp.searchsorted(work_end, i, side="right")  # the group of work item i
        r0 = (first[g] + i - (work_end[g] - count[g])) * tm
        rows = jax.lax.dynamic_slice_in_dim(xp, r0, tm)
        wg = jax.lax.dynamic_index_in_dim(w, g, keepdims=False)  # [K, N]
        y = rows @ wg if x.dtype == jnp.float32 and wg.dtype == jnp.float32 else float_matmul(rows, wg, jnp.float32)
        r = r0 + jnp.arange(tm)
        keep = (r >= starts[g]) & (r < ends[g])
        acc = jax.lax.dynamic_slice_in_dim(out, r0, tm)
        return jax.lax.dynamic_update_slice_in_dim(out, acc + jnp.where(keep[:, None], y, 0.0), r0, 0)

    out = jax.lax.fori_loop(0, work_end[-1], body, jnp.zeros((n_tiles * tm, w.shape[-1]), jnp.float32))
    return out[:M].astype(x.dtype)


def experts_mlp(cfg: ModelConfig, lp, x, weights, experts):
    """sum_j weights[t, j] * expert_{experts[t, j]}(x[t]) for x [T, D], weights / experts [T, k] -> [T, D].

    The T*k (token, expert) rows are sorted by expert (stable), run through three grouped matmuls (gate, up,
    down of each expert's SwiGLU), put back in (token, j) order and summed over j with the routing weights."""
    T, D = x.shape
    k = experts.shape[-1]
    flat = experts.reshape(-1)  # [T*k], row r = (token r // k, choice r % k)
    order = jnp.argsort(flat, stable=True)
    sizes = jnp.bincount(flat, length=cfg.num_experts).astype(jnp.int32)
    xs = x[order // k]  # [T*k, D] grouped by expert
    h = activation(cfg, grouped_matmul(xs, lp["experts_gate"], sizes)) * grouped_matmul(xs, lp["experts_up"], sizes)
    y = grouped_matmul(h, lp["experts_down"], sizes)
    y = y[jnp.argsort(order)].reshape(T, k, D)  # back to (token, choice) order
    return jnp.sum(y.astype(jnp.float32) * weights[..., None], axis=1).astype(x.dtype)


def moe_mlp(cfg: ModelConfig, lp, h):
    """The MoE MLP of one layer over h [..., D] (see `route`, `experts_mlp`); plus Qwen2-MoE's shared expert,
    sigmoid(h @ shared_expert_gate) * SwiGLU(h), on every token."""
    lead, D = h.shape[:-1], h.shape[-1]
    x = h.reshape(-1, D)
    weights, experts = route(cfg, lp, x)
    out = experts_mlp(cfg, lp, x, weights, experts)
    if cfg.shared_expert_intermediate_size:
        gated = activation(cfg, dense(x, lp["shared_w_gate"])) * dense(x, lp["shared_w_up"])
        shared = dense(gated, lp["shared_w_down"])
        out = out + jax.nn.sigmoid(dense(x, lp["shared_expert_gate"])) * shared
    return out.reshape(*lead, D)


def qkv(cfg: ModelConfig, lp, h, positions, inv_freq, inv: bool = False):
    """Project, (QK-norm), RoPE. h [..., T, D] -> q [..., T, Hq, hd], k/v [..., T, Hkv, hd]."""
    q, k, v = dense(h, lp["wq"], inv), dense(h, lp["wk"], inv), dense(h, lp["wv"], inv)
    if cfg.attention_bias:
        q, k, v = q + lp["bq"], k + lp["bk"], v + lp["bv"]
    lead = h.shape[:-1]
    q = q.reshape(*lead, cfg.num_heads, cfg.head_dim)
    k = k.reshape(*lead, cfg.num_kv_heads, cfg.head_dim)
    v = v.reshape(*lead, cfg.num_kv_heads, cfg.head_dim)
    if cfg.qk_norm:
        q = rms_norm(q, lp["q_norm"], cfg.rms_norm_eps, inv)
        k = rms_norm(k, lp["k_norm"], cfg.rms_norm_eps, inv)
    return apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq), v


# ----------------------------------------------------------------------------------------------
# Paged attention, XLA path: a flash-style loop over blocks of pages with a runtime trip count
# ----------------------------------------------------------------------------------------------


def paged_attention_xla(cfg, q, k_cache, v_cache, layer, block_tables, kv_lens, q_pos, window, *, page_size,
                        block_pages, batch_invariant: bool = False):
    """q [R, Q, Hq, hd] against the pages of each row; k/v_cache [L, slots, Hkv, hd] (all layers).

    With `batch_invariant`, rows go through in chunks of ATTN_ROWS (XLA:CPU's batched dots sum in an order
    that depends on the batch size) and queries in tiles of `attn_query_tile(cfg)` tokens.
    """
    tiles = row_tiles(batch_invariant)
    if tiles is None:
        return _paged_attention(cfg, q, k_cache, v_cache, layer, block_tables, kv_lens, q_pos, window,
                                page_size=page_size, block_pages=block_pages, q_tile=q.shape[1], invariant=False)
    Q = q.shape[1]
    q_tile = min(Q, attn_query_tile(cfg))
    if tiles.pad_decode_queries and Q % attn_query_tile(cfg):
        # Decode rows (and short chunks) go through the same query tile as a prefill chunk: padding queries
        # (position -1) see no keys and come out as zeros, dropped below.
        q_tile = attn_query_tile(cfg)
        qpad = -Q % q_tile
        q = jnp.pad(q, ((0, 0), (0, qpad), (0, 0), (0, 0)))
        q_pos = jnp.pad(q_pos, ((0, 0), (0, qpad)), constant_values=-1)
    R = q.shape[0]
    pad = -R % ATTN_ROWS
    rows = (q, block_tables, kv_lens, q_pos)
    if pad:  # padding rows have no keys (kv_len 0) and no valid queries
        rows = tuple(jnp.concatenate([a, jnp.full((pad,) + a.shape[1:], -1 if a is q_pos else 0, a.dtype)])
                     for a in rows)
    chunks = tuple(a.reshape((-1, ATTN_ROWS) + a.shape[1:]) for a in rows)
    out = jax.lax.map(lambda c: _paged_attention(cfg, c[0], k_cache, v_cache, layer, c[1], c[2], c[3], window,
                                                 page_size=page_size, block_pages=block_pages, q_tile=q_tile,
                                                 invariant=True),
                      chunks)
    return out.reshape((-1,) + q.shape[1:])[:R, :Q]


def _paged_attention(cfg, q, k_cache, v_cache, layer, block_tables, kv_lens, q_pos, window, *, page_size,
                     block_pages, q_tile, invariant):
    """The attention loop proper (see paged_attention_xla).

    The loop visits only blocks that hold visible keys: from the first block inside the sliding window of
    the batch's earliest query to the block holding the longest context (blocks that are fully masked for a
    row are exact no-ops for it). Reading the cache with a gather indexed by (layer, slot) avoids
    materialising a per-layer copy of the cache. Queries go through the score and value dots in tiles of
    `attn_query_tile(cfg)` tokens so a token's result does not depend on how many share its step.
    """
    R, Q, Hq, hd = q.shape
    Hkv = cfg.num_kv_heads
    G = Hq // Hkv
    B = block_pages * page_size
    qt = q_tile
    T = Q // qt
    qg = (q.astype(jnp.float32) * cfg.attn_scale).reshape(R, T, qt, Hkv, G, hd)
    qp = q_pos.reshape(R, T, qt)

    n_blocks = (jnp.max(kv_lens) + B - 1) // B
    min_q = jnp.min(jnp.where(q_pos >= 0, q_pos, jnp.iinfo(jnp.int32).max))
    first = jnp.where(window > 0, jnp.maximum(min_q - window + 1, 0) // B, 0)
    first = jnp.minimum(first, n_blocks)

    def update(qtile, pos, m, l, acc, kb, vb, kpos):
        # qtile [R, qt, Hkv, G, hd]; pos [R, qt]; m, l [R, qt, Hkv, G]; acc [R, qt, Hkv, G, hd]
        s = softcap(jnp.einsum("rqkgd,rbkd->rqkgb", qtile, kb), cfg.attn_logit_softcap)
        vis = (kpos[None, None, :] <= pos[:, :, None]) & (kpos[None, None, :] < kv_lens[:, None, None])
        vis &= (window <= 0) | (pos[:, :, None] - kpos[None, None, :] < window)
        s = jnp.where(vis[:, :, None, None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(s - m_safe[..., None])
        corr = jnp.exp(jnp.where(jnp.isfinite(m), m - m_safe, -jnp.inf))
        l = l * corr + (fixed_order_sum(p)[..., 0] if invariant else jnp.sum(p, axis=-1))
        acc = acc * corr[..., None] + jnp.einsum("rqkgb,rbkd->rqkgd", p, vb)
        return m_new, l, acc

    def body(b, carry):
        pages = jax.lax.dynamic_slice_in_dim(block_tables, b * block_pages, block_pages, axis=1)  # [R, bp]
        slot = (pages[:, :, None] * page_size + jnp.arange(page_size)[None, None, :]).reshape(R, B)
        kb = k_cache[layer, slot].astype(jnp.float32)  # [R, B, Hkv, hd]
        vb = v_cache[layer, slot].astype(jnp.float32)
        kpos = b * B + jnp.arange(B)
        if T == 1:
            m, l, acc = update(qg[:, 0], qp[:, 0], *(c[:, 0] for c in carry), kb, vb, kpos)
            return m[:, None], l[:, None], acc[:, None]
        tiles = jax.lax.map(lambda xs: update(*xs, kb, vb, kpos),
                            tuple(jnp.moveaxis(a, 1, 0) for a in (qg, qp) + carry))
        return tuple(jnp.moveaxis(a, 0, 1) for a in tiles)

    init = (
        jnp.full((R, T, qt, Hkv, G), -jnp.inf, jnp.float32),
        jnp.zeros((R, T, qt, Hkv, G), jnp.float32),
        jnp.zeros((R, T, qt, Hkv, G, hd), jnp.float32),
    )
    m, l, acc = jax.lax.fori_loop(first, n_blocks, body, init)
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]
    return out.reshape(R, Q, Hq, hd).astype(q.dtype)


# ----------------------------------------------------------------------------------------------
# One step
# ----------------------------------------------------------------------------------------------


def forward_step(cfg: ModelConfig, params, kv, inp: StepInputs, *, page_size: int, block_pages: int,
                 attention_fn=None, batch_invariant: bool = False, all_logits: bool = False,
                 return_hidden: bool = False, kv_layout=None):
    """Run R x Q new tokens through the model, writing their K/V into the pages.

    Returns (logits f32[R, V] of each row's last new token, updated kv). With `all_logits` (speculative
    verification), logits f32[R, Q, V] of every position instead (the LM head runs on all R x Q rows).
    With `return_hidden`, (logits, kv, hidden [R, Q, D]): the last layer's output at every position, before the
    final norm (`lm_head(hidden)` gives any position's logits: prompt logprobs).
    `kv_layout` (config.KVLayout): the cache's page groups; None or one plain group: layer l is cache row l.
    """
    R, Q = inp.tokens.shape
    attention_fn = attention_fn or paged_attention_xla
    x = embed_tokens(cfg, params, inp.tokens)  # [R, Q, D]
    windows = jnp.asarray(np.asarray(cfg.layer_windows(), np.int32))
    inv_freq = jnp.asarray(rope_inv_freq(cfg))
    grouped = kv_layout is not None and kv_layout.grouped
    layers = jnp.asarray(np.asarray(kv_layout.layer_index if grouped else range(cfg.num_layers), np.int32))
    groups = jnp.asarray(np.asarray(kv_layout.layer_group, np.int32)) if grouped else None
    x, kc, vc = decoder_layers(cfg, params["layers"], x, kv["k"], kv["v"], inp, windows, inv_freq, layers,
                               page_size=page_size, block_pages=block_pages, attention_fn=attention_fn,
                               batch_invariant=batch_invariant, groups=groups)
    inv = batch_invariant
    if all_logits:
        return lm_head(cfg, params, x, inv), {"k": kc, "v": vc}
    last = jnp.maximum(inp.q_lens - 1, 0)
    x_last = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]  # [R, D]
    if return_hidden:
        return lm_head(cfg, params, x_last, inv), {"k": kc, "v": vc}, x
    return lm_head(cfg, params, x_last, inv), {"k": kc, "v": vc}


def decoder_layers(cfg: ModelConfig, layer_params, x, kc, vc, inp: StepInputs, windows, inv_freq, layers, *,
                   page_size: int, block_pages: int, attention_fn=None, batch_invariant: bool = False, groups=None):
    """The stacked decoder layers over x [R, Q, D] (one lax.scan). `layer_params`, windows, inv_freq and `layers`
    (indices into the caches kc / vc) have a leading axis of the layers to run: all of them, or one pipeline
    stage's share (jaxserve/parallel/pipeline.py). `groups`: each layer's page group (config.KVLayout), whose
    block tables and slots (inp's [G, R, ...]) it uses; None: one table per row. Returns (x, kc, vc)."""
    R, Q = inp.tokens.shape
    attention_fn = attention_fn or paged_attention_xla
    grouped = groups is not None
    if not grouped:
        groups = jnp.zeros_like(layers)
    valid = jnp.arange(Q)[None, :] < inp.q_lens[:, None]
    q_pos = jnp.where(valid, inp.positions, -1)
    eps = cfg.rms_norm_eps
    inv = batch_invariant

    def layer_fn(carry, xs):
        x, kc, vc = carry
        lp, window, freq, layer, group = xs
        lp = unpack_bf16(lp)  # bf16 weights held as bits on CPU (pack_bf16_layers)
        block_tables = inp.block_tables[group] if grouped else inp.block_tables  # [R, P]: this layer's pages
        flat_slots = (inp.slots[group] if grouped else inp.slots).reshape(-1)
        h = rms_norm(x, lp["attn_norm"], eps, inv)
        q, k, v = qkv(cfg, lp, h, inp.positions, freq, inv)
        kc = write_kv(kc, layer, flat_slots, k.reshape(R * Q, cfg.num_kv_heads, cfg.head_dim))
        vc = write_kv(vc, layer, flat_slots, v.reshape(R * Q, cfg.num_kv_heads, cfg.head_dim))
        o = attention_fn(cfg, q, kc, vc, layer, block_tables, inp.kv_lens, q_pos, window,
                         page_size=page_size, block_pages=block_pages, batch_invariant=inv)
        o = dense(o.reshape(R, Q, cfg.q_size), lp["wo"], inv)
        if cfg.post_norms:
            o = rms_norm(o, lp["post_attn_norm"], eps, inv)
        x = x + o
        h = rms_norm(x, lp["mlp_norm"], eps, inv)
        m = mlp(cfg, lp, h, inv)
        if cfg.post_norms:
            m = rms_norm(m, lp["post_mlp_norm"], eps, inv)
        return (x + m, kc, vc), None

    (x, kc, vc), _ = jax.lax.scan(layer_fn, (x, kc, vc), (layer_params, windows, inv_freq, layers, groups))
    return x, kc, vc
