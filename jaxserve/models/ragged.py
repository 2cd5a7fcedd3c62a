"""The ragged step: one flat array of T new tokens that mixes decode tokens and prefill chunks of any lengths.

A bucketed step is R rows x Q tokens, so a decode row and a 300-token prompt chunk cannot share a step and every
row pads to Q. Here the step's tokens are one flat array, described per sequence (row) by where its tokens sit,
its context length and its block table; only T (a power-of-two ladder) is a program shape, so one program family
serves decode-only steps (T = the number of decodes), prefill-only steps and any mix (vLLM v1's and vLLM-TPU's
ragged step). Everything but attention runs on the flat tokens as they are; attention is the ragged part.

Layout (`ragged_layout`, the scheduler and the input builder share it): rows of at least TILE // 2 new tokens
("chunks") come first, each at a TILE-aligned offset and padded to whole tiles; the other rows (decodes, short
tails, verify rows) follow, packed one after the other; padding fills the array to T. Attention then goes tile by
tile (TILE tokens; T itself when T < TILE):
  * a tile of one chunk attends as a block of queries against that row's pages (keys read once per tile);
  * any other tile attends token by token, each token against its own row's pages (a decode token reads its
    row's context once, as a decode step does), so packing decodes costs no padding at all.
Padding tokens have position -1, write to the null page's slot 0 and attend to nothing.

The step returns the hidden state of each sampled row's last token (`sample_idx`) and of every token (for prompt
logprobs); the LM head and the sampler run on the sampled rows only, in a program per sampled-row count.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.config import ModelConfig
from jaxserve.models.ragged_layout import TILE, is_chunk, ragged_layout
from jaxserve.models.transformer import (StepInputs, _paged_attention, decoder_layers, embed_tokens,
                                         rope_inv_freq)

class RaggedInputs(NamedTuple):
    """One ragged step's inputs (host numpy or device arrays). T tokens, S rows (sequences), P pages per table,
    G page groups (config.KVLayout; the group axis is absent for one plain group)."""

    tokens: jax.Array  # i32[T]
    positions: jax.Array  # i32[T]     absolute position of each token; -1 for padding
    rows: jax.Array  # i32[T]          the row (index into the per-row arrays) of each token; 0 for padding
    kv_lens: jax.Array  # i32[S]       context length of each row after this step (cached + new); 0 padding rows
    block_tables: jax.Array  # i32[S, P] or [G, S, P]
    slots: jax.Array  # i32[T] or [G, T]   cache slot of each token (the null page's slot 0 for padding)
    tile_rows: jax.Array  # i32[T // tile]  the chunk row filling each tile, -1 for a token-by-token tile
    sample_idx: jax.Array  # i32[S]    flat index of the last token of each row that samples (in the caller's
    #                                  order of sampled rows; 0 past them)
    # For kernels that take rows back to back (the Pallas ragged kernel, pallas_kernels/engine.py): the rows in
    # layout order, their real tokens' cumulative counts, how many rows, and the two index maps between the flat
    # array and those tokens packed with no padding.
    kernel_rows: jax.Array  # i32[S]   row at each layout place (0 past the rows)
    cu_q_lens: jax.Array  # i32[S + 1] cumulative new tokens of the rows in layout order
    num_rows: jax.Array  # i32[1]
    compact_idx: jax.Array  # i32[T]   flat index of the j-th real token (layout order); 0 past them
    expand_idx: jax.Array  # i32[T]    each flat token's place among the real tokens (0 for padding)


def tile_size(T: int, tile: int = TILE) -> int:
    return min(T, tile)


def build_ragged_inputs(entries, T: int, S: int, P: int, page_size: int, groups: Optional[int] = None,
                        tile: int = TILE) -> RaggedInputs:
    """Host arrays of one ragged step. `entries`: per row, (token ids of its new positions, position of the first,
    block table or a tuple of one table per page group, whether it samples). `groups`: the KV layout's page groups
    (config.KVLayout.num_groups of a grouped layout: tables and slots get a group axis, even for one group); None:
    one plain table per row. Row i of the per-row arrays is entries[i] (the layout order only decides where tokens
    sit); `sample_idx` lists the sampling rows' last tokens in entry order. Raises ValueError when the rows do not
    fit T, S or P."""
    num_new = [len(e[0]) for e in entries]
    grouped, groups = groups is not None, groups or 1
    if len(entries) > S:
        raise ValueError(f"{len(entries)} rows do not fit a ragged step of {S} rows")
    if any(n <= 0 for n in num_new):
        raise ValueError("every row of a ragged step needs at least one new token")
    order, offsets, size = ragged_layout(num_new, tile)
    if size > T:
        raise ValueError(f"rows of {num_new} new tokens span {size} > T={T} tokens")
    ts = tile_size(T, tile)
    tokens = np.zeros((T,), np.int32)
    positions = np.full((T,), -1, np.int32)
    rows = np.zeros((T,), np.int32)
    kv_lens = np.zeros((S,), np.int32)
    block_tables = np.zeros((groups, S, P), np.int32)
    slots = np.zeros((groups, T), np.int32)
    tile_rows = np.full((T // ts,), -1, np.int32)
    sample_idx = np.zeros((S,), np.int32)
    n_sampled = 0
    kernel_rows = np.zeros((S,), np.int32)
    kernel_rows[:len(order)] = order
    cu_q_lens = np.zeros((S + 1,), np.int32)
    cu_q_lens[1:len(order) + 1] = np.cumsum([num_new[i] for i in order])
    cu_q_lens[len(order) + 1:] = cu_q_lens[len(order)]
    real = np.concatenate([np.arange(offsets[i], offsets[i] + num_new[i]) for i in order]).astype(np.int32)
    compact_idx = np.zeros((T,), np.int32)
    compact_idx[:len(real)] = real
    expand_idx = np.zeros((T,), np.int32)
    expand_idx[real] = np.arange(len(real), dtype=np.int32)
    for i, ((toks, start, bt, samples), off, n) in enumerate(zip(entries, offsets, num_new)):
        pos = np.arange(start, start + n, dtype=np.int32)
        tokens[off:off + n] = toks
        positions[off:off + n] = pos
        rows[off:off + n] = i
        kv_lens[i] = start + n
        tables = bt if isinstance(bt, tuple) else (bt,)
        if len(tables) != groups:
            raise ValueError(f"row {i}: {len(tables)} block table(s) for a KV layout of {groups} page groups")
        for g, t in enumerate(tables):
            if len(t) > P:
                raise ValueError(f"row {i}: a block table of {len(t)} pages > {P}")
            block_tables[g, i, :len(t)] = t
            slots[g, off:off + n] = block_tables[g, i][pos // page_size] * page_size + pos % page_size
        if T >= tile and is_chunk(n, tile):
            tile_rows[off // ts:(off + n + ts - 1) // ts] = i
        if samples:
            sample_idx[n_sampled] = off + n - 1
            n_sampled += 1
    if not grouped:
        block_tables, slots = block_tables[0], slots[0]
    return RaggedInputs(tokens, positions, rows, kv_lens, block_tables, slots, tile_rows, sample_idx, kernel_rows,
                        cu_q_lens, np.asarray([len(entries)], np.int32), compact_idx, expand_idx)


def abstract_ragged_inputs(T: int, S: int, P: int, groups: Optional[int] = None,
                           tile: int = TILE) -> RaggedInputs:
    """ShapeDtypeStructs of a (T, S) ragged step's inputs (`groups` None: one plain page group)."""
    i32 = jnp.int32
    sd = jax.ShapeDtypeStruct
    G = (groups,) if groups else ()
    return RaggedInputs(sd((T,), i32), sd((T,), i32), sd((T,), i32), sd((S,), i32), sd(G + (S, P), i32),
                        sd(G + (T,), i32), sd((T // tile_size(T, tile),), i32), sd((S,), i32), sd((S,), i32),
                        sd((S + 1,), i32), sd((1,), i32), sd((T,), i32), sd((T,), i32))


# ----------------------------------------------------------------------------------------------
# Attention over the flat tokens, XLA path
# ----------------------------------------------------------------------------------------------


def ragged_attention_xla(cfg: ModelConfig, q, k_cache, v_cache, layer, block_tables, inp: RaggedInputs, window, *,
                         page_size: int, block_pages: int):
    """q [T, Hq, hd] of the flat tokens against their rows' pages -> [T, Hq, hd] (see the module docstring);
    block_tables [S, P]: this layer's page group's tables; the rest of the layout from `inp`.

    Tile by tile (a lax.map): a chunk tile (`tile_rows[i]` >= 0) is one row's block of queries; any other tile
    goes token by token (each token its own row's table and its own causal length pos + 1). (The Pallas kernels'
    form of this function: pallas_kernels/engine.py, `engine_attention_fn(...).ragged`.)"""
    positions, rows, tile_rows = inp.positions, inp.rows, inp.tile_rows
    T = q.shape[0]
    ts = T // tile_rows.shape[0]
    qt = q.reshape(-1, ts, *q.shape[1:])
    pt = positions.reshape(-1, ts)
    rt = rows.reshape(-1, ts)
    kw = dict(page_size=page_size, block_pages=block_pages, invariant=False)

    def by_token(qi, pos, rws):
        tables = block_tables[rws]  # [ts, P]
        lens = jnp.where(pos >= 0, pos + 1, 0)
        out = _paged_attention(cfg, qi[:, None], k_cache, v_cache, layer, tables, lens, pos[:, None], window,
                               q_tile=1, **kw)
        return out[:, 0]

    def as_block(qi, pos, row):
        lens = (jnp.max(pos) + 1)[None]
        out = _paged_attention(cfg, qi[None], k_cache, v_cache, layer, block_tables[row][None], lens, pos[None],
                               window, q_tile=ts, **kw)
        return out[0]

    if T < TILE or tile_rows.shape[0] == 0:  # one tile of packed rows: no chunk tiles possible
        return by_token(q, positions, rows)

    def one(xs):
        qi, pos, rws, row = xs
        return jax.lax.cond(row >= 0, lambda: as_block(qi, pos, row), lambda: by_token(qi, pos, rws))

    return jax.lax.map(one, (qt, pt, rt, tile_rows)).reshape(q.shape)


# ----------------------------------------------------------------------------------------------
# The step
# ----------------------------------------------------------------------------------------------


def forward_ragged(cfg: ModelConfig, params, kv, inp: RaggedInputs, *, page_size: int, block_pages: int,
                   attention_fn=None, kv_layout=None):
    """Run the T flat tokens through the decoder layers, writing their K/V into the pages.

    Returns (hidden f32/compute-dtype [S, D] of the `sample_idx` tokens, updated kv, hidden [T, D] of every
    token), all before the final norm (models/transformer.py `lm_head` turns them into logits).
    `attention_fn` (ragged form, see `ragged_attention_xla`'s signature after `cfg`) defaults to the XLA path.
    """
    T = inp.tokens.shape[0]
    attn = attention_fn or ragged_attention_xla
    x = embed_tokens(cfg, params, inp.tokens)[None]  # [1, T, D]: one "row" for the per-token layers
    windows = jnp.asarray(np.asarray(cfg.layer_windows(), np.int32))
    inv_freq = jnp.asarray(rope_inv_freq(cfg))
    grouped = kv_layout is not None and kv_layout.grouped
    layers = jnp.asarray(np.asarray(kv_layout.layer_index if grouped else range(cfg.num_layers), np.int32))
    groups = jnp.asarray(np.asarray(kv_layout.layer_group, np.int32)) if grouped else None
    positions = inp.positions

    def attention(cfg_, q, k_cache, v_cache, layer, block_tables, kv_lens, q_pos, window, *, page_size,
                  block_pages, batch_invariant=False):
        out = attn(cfg_, q[0], k_cache, v_cache, layer, block_tables, inp, window, page_size=page_size,
                   block_pages=block_pages)
        return out[None]

    view = StepInputs(inp.tokens[None], positions[None], jnp.full((1,), T, jnp.int32), inp.kv_lens,
                      inp.block_tables, inp.slots[..., None, :])
    x, kc, vc = decoder_layers(cfg, params["layers"], x, kv["k"], kv["v"], view, windows, inv_freq, layers,
                               page_size=page_size, block_pages=block_pages, attention_fn=attention,
                               groups=groups)
    hidden = x[0]
    return hidden[inp.sample_idx], {"k": kc, "v": vc}, hidden
