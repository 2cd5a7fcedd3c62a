"""Where a ragged step's rows sit in its flat token array (models/ragged.py): plain Python, no JAX, so the host-side
scheduler sizes its steps with the same rule the input builder lays them out by."""

from __future__ import annotations

from jaxserve.config import RAGGED_TILE

TILE = RAGGED_TILE  # tokens per attention tile of a ragged step (the chunk alignment)


def is_chunk(num_new: int, tile: int = TILE) -> bool:
    """Whether a row of `num_new` tokens is laid out as a chunk (tile-aligned, padded to whole tiles)."""
    return num_new >= max(2, tile // 2)


def ragged_layout(num_new, tile: int = TILE):
    """(order, offsets, size) of rows with `num_new` new tokens each: `order` the rows in layout order (chunks
    first, then packed rows, each group in the given order), `offsets[i]` where row i's first token sits, `size`
    the tokens the layout spans (chunks padded to whole tiles, packed rows not). The step's T is any power of two
    >= size (`ragged_size`)."""
    chunks = [i for i, n in enumerate(num_new) if is_chunk(n, tile)]
    packed = [i for i, n in enumerate(num_new) if not is_chunk(n, tile)]
    offsets = [0] * len(num_new)
    at = 0
    for i in chunks:
        offsets[i] = at
        at += -(-num_new[i] // tile) * tile
    for i in packed:
        offsets[i] = at
        at += num_new[i]
    return chunks + packed, offsets, at


def ragged_size(num_new, tile: int = TILE) -> int:
    """Tokens the layout of rows with `num_new` new tokens spans (see `ragged_layout`)."""
    return sum(-(-n // tile) * tile if is_chunk(n, tile) else n for n in num_new)
