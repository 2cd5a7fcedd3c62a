"""Whether batch-invariant mode is bit-exact on the machine it runs on, and the attention tiling that makes it so.

`batch_invariant=True` promises that a token's logits and KV do not depend on what else shares its step. The
forward pass keeps that promise by running every dot on fixed tiles (models/transformer.py, ROW_TILE): every
dense layer on 32-row tiles, attention on query tiles of a fixed size. Whether that is enough is a property of
the backend's GEMM kernels, not of our code: XLA:CPU hands dots to YNNPACK, which picks its kernels by the CPU's
instruction set, and the shapes at which it switches kernels (and so summation order) differ between CPUs. Seen:
on one CPU (AMX) two rows summed differently from 3..32 rows; on one AMD EPYC the real-model preemption test
failed with 4..32-row dense tiles while it passed on another.

So the runner measures rather than assumes: `choose_row_tiles` runs each distinct dense weight of the model
(layer 0 and the LM head: the engine's own weights and kernels) at every row count its steps use and with the
rows of a tile moved, and the attention of one query as a decode row and inside a prefill chunk, and compares
bitwise. Where attention differs it pads decode queries to the chunk's tile (one shape for both; 2.2x per decode
step) and checks again; where a dense layer differs (nothing stricter to offer) or the padded attention still
differs, the engine refuses batch_invariant=True with what differed. Cached per model shape and engine layout.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.config import ModelConfig
from jaxserve.errors import InvalidConfigError
from jaxserve.models.quantized import is_quantized
from jaxserve.models.transformer import (ROW_TILE, STRICT_TILES, RowTiles, attn_query_tile, dense,
                                         paged_attention_xla, unpack_bf16)

log = logging.getLogger("jaxserve")

_DENSE = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
_CACHE: dict = {}


def _dense_weights(params) -> list:
    """(name, weight, transposed) for layer 0's dense weights and the LM head."""
    layers = params["layers"]
    out = [(n, unpack_bf16(layers[n][0]), False) for n in _DENSE if n in layers]
    if "lm_head" in params:
        out.append(("lm_head", params["lm_head"], False))
    else:
        e = params["embed"]
        out.append(("lm_head (tied embedding)", e, not is_quantized(e)))
    return out


def _in_features(w, transposed: bool) -> int:
    return w.shape[-1] if transposed else w.shape[-2]


def dense_violations(params, tiles: RowTiles, row_counts: Sequence[int]) -> list:
    """Dense weights whose rows differ between the row counts `row_counts` (each against the same rows run as
    a ROW_TILE-row tile) or when the rows of a tile are permuted. Empty: `tiles` is exact for them."""
    dtype = params["final_norm"].dtype
    rng = np.random.default_rng(0)
    found = []
    for name, w, transposed in _dense_weights(params):
        f = jax.jit(lambda a, w, t=transposed: dense(a, w, tiles, out_dtype=jnp.float32, transposed=t))
        x = jnp.asarray(rng.standard_normal((ROW_TILE, _in_features(w, transposed))), dtype)
        ref = np.asarray(f(x, w))
        for m in sorted(set(row_counts)):
            got = np.asarray(f(x[:m], w))
            if not np.array_equal(got, ref[:m]):
                found.append(f"{name}: {m} rows vs {ROW_TILE} (max |diff| {np.abs(got - ref[:m]).max():.3g})")
        perm = np.roll(np.arange(ROW_TILE), 7)
        got = np.asarray(f(x[perm], w))
        if not np.array_equal(got, ref[perm]):
            found.append(f"{name}: rows moved within a {ROW_TILE}-row tile")
    return found


def attention_violations(cfg: ModelConfig, tiles: RowTiles, page_size: int, block_pages: int) -> list:
    """Whether a query's attention output differs between a decode row (one token) and the same query at the
    end of a prefill chunk of `attn_query_tile` tokens (recomputation after preemption, prefix caching and
    chunking move a token between the two)."""
    qt = attn_query_tile(cfg)
    B = page_size * block_pages
    S = 2 * B + qt + 3  # crosses attention blocks, not page-aligned
    n_pages = -(-S // page_size)
    rng = np.random.default_rng(1)
    k = jnp.asarray(rng.standard_normal((1, n_pages * page_size, cfg.num_kv_heads, cfg.head_dim)), jnp.float32)
    v = jnp.asarray(rng.standard_normal(k.shape), jnp.float32)
    q = jnp.asarray(rng.standard_normal((1, qt, cfg.num_heads, cfg.head_dim)), jnp.float32)
    bt = jnp.arange(n_pages, dtype=jnp.int32)[None]
    kv_lens = jnp.asarray([S], jnp.int32)

    @jax.jit
    def attend(q, pos):
        return paged_attention_xla(cfg, q, k, v, 0, bt, kv_lens, pos, jnp.int32(0), page_size=page_size,
                                   block_pages=block_pages, batch_invariant=tiles)

    chunk = np.asarray(attend(q, jnp.arange(S - qt, S, dtype=jnp.int32)[None]))
    row = np.asarray(attend(q[:, -1:], jnp.asarray([[S - 1]], jnp.int32)))
    if np.array_equal(row[0, 0], chunk[0, -1]):
        return []
    return [f"attention: a decode query vs the same query in a {qt}-token chunk "
            f"(max |diff| {np.abs(row[0, 0] - chunk[0, -1]).max():.3g})"]


def choose_row_tiles(cfg: ModelConfig, params, page_size: int, block_pages: int,
                     row_counts: Sequence[int], platform: Optional[str] = None) -> RowTiles:
    """The tiling batch-invariant steps use here: the default where it measures exact, else decode queries padded
    (STRICT_TILES). `row_counts`: the dense row counts below a full tile that the engine's steps run (decode
    rows, and the rows of the LM head). Raises InvalidConfigError where no tiling is exact."""
    row_counts = tuple(sorted({int(m) for m in row_counts if 0 < m <= ROW_TILE}))
    leaf_kinds = tuple(sorted({type(a).__name__ + str(getattr(a, "dtype", "")) for a in
                               jax.tree.leaves(params, is_leaf=is_quantized)}))
    key = (repr(cfg), leaf_kinds, page_size, block_pages, row_counts, platform or jax.default_backend())
    if key in _CACHE:
        return _CACHE[key]
    default = RowTiles()
    if jax.process_count() > 1:
        # A multi-process mesh's weights are not all readable here; each process runs the same kernels as a
        # single-process run on its machine, which is where the check is meant to be made.
        log.warning("batch_invariant: the dot tiling is not checked in a multi-process run; using %s", default)
        return default
    bad = dense_violations(params, default, row_counts)
    tiles = default
    attn_bad = attention_violations(cfg, default, page_size, block_pages)
    if attn_bad and not bad:
        tiles = STRICT_TILES
        log.warning("batch_invariant: attention is not exact between decode rows and prefill chunks on this "
                    "machine (%s); padding decode queries to the chunk's tile", "; ".join(attn_bad))
        bad = attention_violations(cfg, tiles, page_size, block_pages)
    else:
        bad += attn_bad
    if bad:
        raise InvalidConfigError("batch_invariant=True cannot be honoured on this machine: its dot kernels give "
                                 "results that depend on the batch (" + "; ".join(bad) + ")")
    _CACHE[key] = tiles
    return tiles
