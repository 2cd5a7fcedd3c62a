"""The quantized weight formats the model computes with: int8 per output channel, int4 group-wise (pytrees).

Formats are exactly those of `pallas_kernels/reference.py` (and so of `pallas_kernels.dispatch.matmul`):

* `Int8Weight`: `w_q` int8 `[..., K, N]`, `scales` f32 `[..., N]`; `w = w_q * scales` (symmetric, absmax / 127).
* `Int4Weight`: `w_q` uint8 `[..., K/2, N]`, two values per byte, `scales` f32 `[..., K/group, N]`; packed byte
  row i holds weight row i (low nibble) and row K/2 + i (high nibble), two's-complement nibbles in [-8, 7];
  `w = q * scales[group of the row]` (symmetric, absmax / 7). Needs K % (2 * group_size) == 0.

Leading axes (`...`) are the stacked-layer axis of `params["layers"]`: `lax.scan` and `x[i]` slice both arrays
alike, so a quantized leaf goes wherever a float `[L, K, N]` leaf went. `transformer.dense` calls
`w.matmul(x)` for these types; everything else in the model is unchanged. Making them from float weights
(quantize_int8 / quantize_int4 / quantize_params) is jaxserve/weights/quantize.py's job; saving and restoring
them, jaxserve/weights/checkpoint.py's.

The embedding / tied LM head (`params["embed"]`, float `[V, D]`) is quantized, when asked, as the LM head's
`[K=D, N=V]` matrix: one int8 scale per vocabulary row, which is also exactly a per-row quantization of the
embedding table, so one array serves the lookup (`take_rows`) and the projection.

CPU matmul formulation (see docs/quantization.md and scripts/bench_quant_matmul.py for the measurements):
XLA:CPU runs f32 matrix-vector products at memory bandwidth but int8/bf16 ones far slower, and a
dequantize-then-dot materializes the whole f32 weight. `matmul` instead walks N in column chunks in a loop,
dequantizing one chunk at a time so the f32 tile stays in cache and the int8 bytes are the only weight traffic
from memory.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.errors import InvalidConfigError
from jaxserve.models.linear import dot_f32

DEFAULT_GROUP_SIZE = 64  # divides 2 x every K of Gemma 3 270M (640, 1024, 2048); 128 does not divide 640 / 2
# Columns per chunk of the chunked CPU matmul (f32 tile of K x CHUNK stays in L2 for K <= 2048).
CHUNK_COLS = 2048


def _int8_block(x, w_q, scales):
    """x [M, K] @ (w_q * scales) for one block of columns, float32: the int8 values in x's dtype (exact in
    bf16 too) times x, accumulated in f32 (dot_f32), then the f32 scales."""
    return dot_f32(x, w_q.astype(x.dtype)) * scales.astype(jnp.float32)


def _int8_mm(x, w_q, scales, chunk):
    """x [M, K] @ (w_q int8 [K, N] * scales [N]) with N walked in chunks; float32 [M, N]."""
    K, N = w_q.shape
    if chunk is None or N <= chunk or N % chunk:
        return _int8_block(x, w_q, scales)
    return _column_chunks(x, N, chunk, lambda i: _int8_block(x, _cols(w_q, i, chunk), _cols(scales, i, chunk)))


def _cols(a, i, chunk):
    """Columns [i * chunk, (i + 1) * chunk) of a [..., N] array (a slice read in place, no copy of `a`)."""
    return jax.lax.dynamic_slice_in_dim(a, i * chunk, chunk, axis=a.ndim - 1)


def _column_chunks(x, N, chunk, block):
    """[M, N] output of `block(i)` -> [M, chunk] for column chunk i, walked by a loop over the N // chunk chunks.

    The loop slices the weight in place. (Reshaping it to [N // chunk, K, chunk] for a `lax.map` instead made
    XLA:CPU copy the whole weight into that layout on every call: for the quantized 262,144 x 640 LM head, whose
    array the embedding lookup also reads, that copy cost ~100 ms per decode step.)
    """
    def body(i, y):
        return jax.lax.dynamic_update_slice_in_dim(y, block(i), i * chunk, axis=1)

    # The output is float32 whatever x is: XLA:CPU has no bf16 dynamic-update-slice (it would convert the
    # whole [M, N] output to f32 and back at every chunk); callers round it once at the end.
    return jax.lax.fori_loop(0, N // chunk, body, jnp.zeros((x.shape[0], N), jnp.float32))


def unpack_int4(w_q):
    """uint8 [..., K/2, N] -> int8 [..., K, N] in [-8, 7] (the split-halves packing)."""
    b = w_q.astype(jnp.int32)
    lo = ((b & 0xF) ^ 8) - 8
    hi = (((b >> 4) & 0xF) ^ 8) - 8
    return jnp.concatenate([lo, hi], axis=-2).astype(jnp.int8)


def pack_int4(q):
    """int [..., K, N] values in [-8, 7] -> uint8 [..., K/2, N] (row i low nibble, row K/2 + i high nibble)."""
    q = np.asarray(q).astype(np.int32)
    k = q.shape[-2]
    if k % 2:
        raise InvalidConfigError(f"int4 packing needs an even number of rows, got {k}")
    if q.min(initial=0) < -8 or q.max(initial=0) > 7:
        raise InvalidConfigError("int4 values must lie in [-8, 7]")
    lo, hi = q[..., : k // 2, :], q[..., k // 2:, :]
    return ((lo & 0xF) | ((hi & 0xF) << 4)).astype(np.uint8)


def _int4_mm(x, w_q, scales, group_size):
    """x [M, K] @ int4 weight: two half-K dots (low nibbles take x[:, :K/2], high nibbles x[:, K/2:]); f32."""
    half = w_q.shape[0]
    b = w_q.astype(jnp.int32)
    lo = (((b & 0xF) ^ 8) - 8).astype(x.dtype)
    hi = ((((b >> 4) & 0xF) ^ 8) - 8).astype(x.dtype)
    s = jnp.repeat(scales.astype(x.dtype), group_size, axis=0)  # [K, N], dequantized in x's dtype
    return dot_f32(x[:, :half], lo * s[:half]) + dot_f32(x[:, half:], hi * s[half:])


def _int4_mm_chunked(x, w_q, scales, group_size, chunk):
    half, N = w_q.shape
    if chunk is None or N <= chunk or N % chunk:
        return _int4_mm(x, w_q, scales, group_size)
    return _column_chunks(x, N, chunk, lambda i: _int4_mm(x, _cols(w_q, i, chunk), _cols(scales, i, chunk),
                                                          group_size))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Int8Weight:
    """Symmetric int8, one f32 scale per output column. w_q int8 [..., K, N], scales f32 [..., N]."""

    w_q: jax.Array
    scales: jax.Array
    chunk: Optional[int] = dataclasses.field(default=CHUNK_COLS, metadata=dict(static=True))
    # The Pallas matmul this weight runs through (EngineConfig.matmul_impl; pallas_kernels/engine.py
    # bind_matmul_kernels), None for the XLA formulation below. Static: it picks the program, it holds no data.
    kernel: Optional[object] = dataclasses.field(default=None, metadata=dict(static=True))

    bits = 8
    group_size = None

    @property
    def shape(self):
        return tuple(self.w_q.shape)

    @property
    def ndim(self):
        return len(self.w_q.shape)

    def __getitem__(self, i):
        return Int8Weight(self.w_q[i], self.scales[i], self.chunk, self.kernel)

    def matmul(self, x, out_dtype=None):
        """x [..., K] -> [..., N] in `out_dtype` (default x.dtype), accumulated in float32."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if self.kernel is not None:
            return self.kernel(x2, self, out_dtype or x.dtype).reshape(*lead, self.shape[-1])
        y = _int8_mm(x2, self.w_q, self.scales, self.chunk)
        return y.reshape(*lead, self.shape[-1]).astype(out_dtype or x.dtype)

    def dequantize(self, dtype=jnp.float32):
        return (self.w_q.astype(jnp.float32) * self.scales[..., None, :].astype(jnp.float32)).astype(dtype)

    def take_rows(self, tokens):
        """Embedding lookup for an LM-head-shaped [D, V] weight: rows `tokens` of its [V, D] transpose."""
        cols = jnp.take(self.w_q, tokens, axis=-1)  # [D, *tokens.shape]
        s = jnp.take(self.scales, tokens, axis=-1)
        return jnp.moveaxis(cols, 0, -1).astype(jnp.float32) * s[..., None]

    @property
    def nbytes(self) -> int:
        return int(self.w_q.size * 1 + self.scales.size * self.scales.dtype.itemsize)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Int4Weight:
    """Symmetric int4, group-wise along K, two values per byte (split halves). See the module docstring."""

    w_q: jax.Array
    scales: jax.Array
    group_size: int = dataclasses.field(default=DEFAULT_GROUP_SIZE, metadata=dict(static=True))
    chunk: Optional[int] = dataclasses.field(default=CHUNK_COLS, metadata=dict(static=True))
    kernel: Optional[object] = dataclasses.field(default=None, metadata=dict(static=True))  # as Int8Weight's

    bits = 4

    @property
    def shape(self):
        s = tuple(self.w_q.shape)
        return s[:-2] + (2 * s[-2], s[-1])

    @property
    def ndim(self):
        return len(self.w_q.shape)

    def __getitem__(self, i):
        return Int4Weight(self.w_q[i], self.scales[i], self.group_size, self.chunk, self.kernel)

    def matmul(self, x, out_dtype=None):
        """x [..., K] -> [..., N] in `out_dtype` (default x.dtype), accumulated in float32."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if self.kernel is not None:
            return self.kernel(x2, self, out_dtype or x.dtype).reshape(*lead, self.shape[-1])
        y = _int4_mm_chunked(x2, self.w_q, self.scales, self.group_size, self.chunk)
        return y.reshape(*lead, self.shape[-1]).astype(out_dtype or x.dtype)

    def int_values(self):
        return unpack_int4(self.w_q)

    def dequantize(self, dtype=jnp.float32):
        q = unpack_int4(self.w_q).astype(jnp.float32)
        s = jnp.repeat(self.scales.astype(jnp.float32), self.group_size, axis=-2)
        return (q * s).astype(dtype)

    def take_rows(self, tokens):
        b = jnp.take(self.w_q, tokens, axis=-1).astype(jnp.int32)  # [K/2, *T]
        q = jnp.concatenate([((b & 0xF) ^ 8) - 8, (((b >> 4) & 0xF) ^ 8) - 8], axis=0).astype(jnp.float32)
        s = jnp.repeat(jnp.take(self.scales, tokens, axis=-1), self.group_size, axis=0)
        return jnp.moveaxis(q * s, 0, -1)

    @property
    def nbytes(self) -> int:
        return int(self.w_q.size + self.scales.size * self.scales.dtype.itemsize)


QuantizedWeight = (Int8Weight, Int4Weight)


def is_quantized(x) -> bool:
    return isinstance(x, QuantizedWeight)


def check_group_size(group_size, k: Optional[int] = None, where: str = "") -> int:
    """Validate an int4 group size (positive int; K % (2 * group_size) == 0 when K is given)."""
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) or group_size <= 0:
        raise InvalidConfigError(f"int4 group_size must be a positive integer, got {group_size!r}")
    if k is not None and k % (2 * group_size):
        ok = [g for g in (16, 32, 64, 128, 256) if k % (2 * g) == 0]
        raise InvalidConfigError(
            f"int4 group_size {group_size} does not fit {where or 'a weight'} with K={k}: K must be a multiple of "
            f"2 x group_size (two values per byte, groups within each half); group sizes that fit: {ok}")
    return int(group_size)
