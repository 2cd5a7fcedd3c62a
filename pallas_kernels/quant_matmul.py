"""Weight-only quantized matmul: x [M, K] (f32/bf16) @ W, with W stored int8 per-output-channel or int4
group-wise (formats in reference.py). Weight tiles are dequantized on chip (VMEM / registers) right before the
dot; the full-precision weight never exists in device memory, so HBM traffic is K*N bytes (int8) or K*N/2
bytes (int4) plus scales.

int8: the per-column scale commutes with the K-sum, so the tile goes int8 -> x.dtype -> dot, and the scale
multiplies the f32 accumulator once at the end.
int4: packed byte row i holds weight rows i (low nibble) and K/2 + i (high nibble), so a packed tile of rows
[a, b) multiplies activation columns [a, b) and [K/2 + a, K/2 + b): x is read through two BlockSpecs (on TPU,
when K/2 is not a multiple of 128, x is first restacked as [2, M, K/2]). Each nibble tile is sign-extended,
scaled per (group, column) and fed to the dot.

TPU (Mosaic): grid (M/tm, N/tn, K/tk), K innermost and "arbitrary", f32 accumulator in VMEM scratch.
GPU (Triton): grid (M/tm, N/tn), the K loop runs inside the program (Triton programs cannot carry an
accumulator across grid steps); tiles must be powers of two.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from . import _common as C


def _unpack_nibbles(w_i8):
    """int8 [rows, N] of packed bytes -> (low, high) int32 nibbles sign-extended to [-8, 7]."""
    w = w_i8.astype(jnp.int32)
    lo = ((w & 0xF) ^ 8) - 8
    hi = (((w >> 4) & 0xF) ^ 8) - 8
    return lo, hi


def _scale_groups(w, s, group_size):
    """w [rows, N] f32, s [rows // group_size, N] -> w * s broadcast over each group of rows."""
    rows, n = w.shape
    return (w.reshape(rows // group_size, group_size, n) * s[:, None, :]).reshape(rows, n)


def _pick(dim, candidates, multiple_of=1):
    for c in candidates:
        if c <= dim and dim % c == 0 and c % multiple_of == 0:
            return c
    return dim


def _check(x, w_q, scales, bits, group_size):
    m, k = x.shape
    if bits == 8:
        if w_q.shape[0] != k or scales.shape != (w_q.shape[1],):
            raise ValueError(f"int8: need w_q [K, N], scales [N]; got {w_q.shape}, {scales.shape} for K={k}")
    elif bits == 4:
        if group_size is None or k % (2 * group_size):
            raise ValueError(f"int4 needs group_size with K % (2*group_size) == 0 (K={k}, group={group_size})")
        if w_q.shape[0] * 2 != k or scales.shape != (k // group_size, w_q.shape[1]):
            raise ValueError(f"int4: need w_q [K//2, N], scales [K//group, N]; got {w_q.shape}, {scales.shape}")
    else:
        raise ValueError(f"bits must be 8 or 4, got {bits}")


def _as_int8(w_q):
    return lax.bitcast_convert_type(w_q, jnp.int8) if w_q.dtype == jnp.uint8 else w_q


# ---------------------------------------------------------------------------------------------------------
# TPU
# ---------------------------------------------------------------------------------------------------------

def _tpu_int8_kernel(x_ref, w_ref, s_ref, o_ref, acc_ref):
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    x = x_ref[...]
    acc_ref[...] += C.dot_nn(x, w_ref[...].astype(x.dtype))

    @pl.when(k == pl.num_programs(2) - 1)
    def _():
        o_ref[...] = (acc_ref[...] * s_ref[...]).astype(o_ref.dtype)


def _tpu_int4_kernel(x_lo_ref, x_hi_ref, w_ref, s_ref, o_ref, acc_ref, *, group_size, packed_tile, k_blocks):
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    x_lo, x_hi = x_lo_ref[...], x_hi_ref[...]
    lo, hi = _unpack_nibbles(w_ref[...])
    groups = packed_tile // group_size
    s_lo = s_ref[pl.ds(k * groups, groups), :]
    s_hi = s_ref[pl.ds((k + k_blocks) * groups, groups), :]
    w_lo = _scale_groups(lo.astype(jnp.float32), s_lo, group_size).astype(x_lo.dtype)
    w_hi = _scale_groups(hi.astype(jnp.float32), s_hi, group_size).astype(x_hi.dtype)
    acc_ref[...] += C.dot_nn(x_lo, w_lo) + C.dot_nn(x_hi, w_hi)

    @pl.when(k == pl.num_programs(2) - 1)
    def _():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "tm", "tn", "tk", "interpret", "out_dtype"))
def quantized_matmul_tpu(x, w_q, scales, *, bits=8, group_size=None, tm=None, tn=None, tk=None, interpret=False,
                         out_dtype=None):
    """See reference.quantized_matmul. Tiles default to (<=256, <=512, <=512) dividing the dims. The output is
    `out_dtype` (default x.dtype), rounded once from the f32 accumulator (the engine's LM head asks for f32)."""
    _check(x, w_q, scales, bits, group_size)
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    m, kdim = x.shape
    n = w_q.shape[1]
    tm = tm or (m if m <= 256 else 256)
    tn = tn or _pick(n, (512, 256, 128))
    w = _as_int8(w_q)
    scales = scales.astype(jnp.float32)
    params = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))
    cost = pl.CostEstimate(flops=2 * m * n * kdim, transcendentals=0,
                           bytes_accessed=(w.size * pl.cdiv(m, tm) + x.nbytes * pl.cdiv(n, tn)
                                           + m * n * out_dtype.itemsize))
    if bits == 8:
        tk = tk or _pick(kdim, (512, 256, 128))
        grid = (pl.cdiv(m, tm), pl.cdiv(n, tn), kdim // tk)
        return pl.pallas_call(
            _tpu_int8_kernel, grid=grid,
            in_specs=[pl.BlockSpec((tm, tk), lambda i, j, k: (i, k)),
                      pl.BlockSpec((tk, tn), lambda i, j, k: (k, j)),
                      pl.BlockSpec((1, tn), lambda i, j, k: (0, j))],
            out_specs=pl.BlockSpec((tm, tn), lambda i, j, k: (i, j)),
            out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
            scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
            compiler_params=params, cost_estimate=cost, interpret=interpret, name="jaxserve_qmm_int8_tpu",
        )(x, w, scales.reshape(1, n))
    half = kdim // 2
    tkp = tk or _pick(half, (1024, 512, 256, 128), multiple_of=group_size)
    if half % tkp or tkp % group_size:
        raise ValueError(f"packed K tile {tkp} must divide K/2={half} and be a multiple of group_size={group_size}")
    k_blocks = half // tkp
    grid = (pl.cdiv(m, tm), pl.cdiv(n, tn), k_blocks)
    kernel = functools.partial(_tpu_int4_kernel, group_size=group_size, packed_tile=tkp, k_blocks=k_blocks)
    if tkp % 128 == 0:
        # Both halves read straight from x: column blocks k and k + K/2/tkp.
        x_args = (x, x)
        x_specs = [pl.BlockSpec((tm, tkp), lambda i, j, k: (i, k)),
                   pl.BlockSpec((tm, tkp), lambda i, j, k: (i, k + k_blocks))]
    else:
        # K/2 is not lane-aligned (e.g. K = 640): stack the halves as planes [2, M, K/2] (one activation copy).
        x2 = x.reshape(m, 2, half).transpose(1, 0, 2)
        x_args = (x2, x2)
        x_specs = [pl.BlockSpec((None, tm, tkp), lambda i, j, k: (0, i, k)),
                   pl.BlockSpec((None, tm, tkp), lambda i, j, k: (1, i, k))]
    return pl.pallas_call(
        kernel, grid=grid,
        in_specs=[*x_specs,
                  pl.BlockSpec((tkp, tn), lambda i, j, k: (k, j)),
                  pl.BlockSpec((kdim // group_size, tn), lambda i, j, k: (0, j))],   # all groups of a column tile
        out_specs=pl.BlockSpec((tm, tn), lambda i, j, k: (i, j)),
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
        compiler_params=params, cost_estimate=cost, interpret=interpret, name="jaxserve_qmm_int4_tpu",
    )(*x_args, w, scales)


# ---------------------------------------------------------------------------------------------------------
# GPU (Triton)
# ---------------------------------------------------------------------------------------------------------

def _gpu_kernel(x_ref, w_ref, s_ref, o_ref, *, bits, group_size, tk, k_blocks, half):
    tm = x_ref.shape[0]
    tn = o_ref.shape[1]

    def body(k, acc):
        if bits == 8:
            x = x_ref[:, pl.ds(k * tk, tk)]
            w = w_ref[pl.ds(k * tk, tk), :]
            return acc + C.dot_nn(x, w.astype(x.dtype))
        groups = tk // group_size
        x_lo = x_ref[:, pl.ds(k * tk, tk)]
        x_hi = x_ref[:, pl.ds(half + k * tk, tk)]
        lo, hi = _unpack_nibbles(w_ref[pl.ds(k * tk, tk), :])
        s_lo = s_ref[pl.ds(k * groups, groups), :]
        s_hi = s_ref[pl.ds((k + k_blocks) * groups, groups), :]
        w_lo = _scale_groups(lo.astype(jnp.float32), s_lo, group_size).astype(x_lo.dtype)
        w_hi = _scale_groups(hi.astype(jnp.float32), s_hi, group_size).astype(x_hi.dtype)
        return acc + C.dot_nn(x_lo, w_lo) + C.dot_nn(x_hi, w_hi)

    acc = lax.fori_loop(0, k_blocks, body, jnp.zeros((tm, tn), jnp.float32))
    if bits == 8:
        acc = acc * s_ref[...]
    o_ref[...] = acc.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "tm", "tn", "tk", "num_warps", "interpret",
                                             "out_dtype"))
def quantized_matmul_gpu(x, w_q, scales, *, bits=8, group_size=None, tm=None, tn=None, tk=None, num_warps=4,
                         interpret=False, out_dtype=None):
    """See reference.quantized_matmul. Power-of-two tiles: tm in [16, 64], tn 128, tk (packed rows for int4)
    the largest power of two <= 128 dividing K (K/2) and a multiple of group_size. Output in `out_dtype`
    (default x.dtype)."""
    _check(x, w_q, scales, bits, group_size)
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    m, kdim = x.shape
    n = w_q.shape[1]
    tm = tm or min(64, max(16, 1 << max(0, (m - 1).bit_length())))
    tn = tn or min(128, 1 << max(0, (n - 1).bit_length()))
    w = _as_int8(w_q)
    scales = scales.astype(jnp.float32)
    span = kdim if bits == 8 else kdim // 2
    tk = tk or _pick(span, (128, 64, 32, 16), multiple_of=group_size if bits == 4 else 1)
    if span % tk or (tk & (tk - 1)) or (bits == 4 and tk % group_size):
        raise ValueError(f"GPU quantized matmul: no power-of-two K tile for K={kdim}, bits={bits}, group={group_size}")
    kernel = functools.partial(_gpu_kernel, bits=bits, group_size=group_size, tk=tk, k_blocks=span // tk,
                               half=kdim // 2)
    if bits == 8:
        s_arg, s_spec = scales.reshape(1, n), pl.BlockSpec((1, tn), lambda i, j: (0, j))
    else:
        s_arg, s_spec = scales, pl.BlockSpec((kdim // group_size, tn), lambda i, j: (0, j))
    return pl.pallas_call(
        kernel, grid=(pl.cdiv(m, tm), pl.cdiv(n, tn)),
        in_specs=[pl.BlockSpec((tm, kdim), lambda i, j: (i, 0)),
                  pl.BlockSpec((w.shape[0], tn), lambda i, j: (0, j)),
                  s_spec],
        out_specs=pl.BlockSpec((tm, tn), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=3),
        interpret=interpret, name=f"jaxserve_qmm_int{bits}_gpu",
    )(x, w, s_arg)
