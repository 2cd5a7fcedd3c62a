"""The float matmul of the linear layers: float32, or bfloat16 multiplied with float32 accumulation (`dot_f32`).

`dot_f32` is also the dot inside the quantized weights' matmuls (models/quantized.py); `transformer.dense`
picks between `float_matmul` and a quantized weight's `matmul`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def dot_f32(a, w, dims=(((1,), (0,)), ((), ()))):
    """a [M, K] contracted with w by `dims` (default a @ w), accumulated and returned in float32.

    Two float32 operands: exactly `a @ w` (the reference numerics). With a narrow float (bf16) operand this is
    the fast XLA:CPU dot (AVX512-BF16); a dot with a bf16 *result* is upcast instead (both operands converted to
    f32 on every call). One-row bf16 dots take a slow matrix-vector path on XLA:CPU, so on CPU a single row is
    then computed as two. (`float_matmul` uses it for bf16 weights, the quantized matmuls of models/quantized.py
    for every activation dtype.)
    """
    narrow = a.dtype != jnp.float32 or w.dtype != jnp.float32
    one = narrow and a.shape[0] == 1 and jax.default_backend() == "cpu"
    if one:
        a = jnp.concatenate([a, a])
    y = jax.lax.dot_general(a, w, dims, preferred_element_type=jnp.float32)
    return y[:1] if one else y


def float_matmul(a, w, out_dtype=None, transposed: bool = False):
    """a [..., K] @ w [K, N] for float weights (`transposed`: w is [N, K], e.g. a tied embedding as LM head).
    Narrow floats (bf16) multiply with f32 accumulation, rounded to `out_dtype` (default a's dtype).

    XLA:CPU runs bf16 x bf16 -> f32 dots natively (AVX512-BF16 here: ~1.7x an f32 dot at 512 rows), but a dot
    with a bf16 result is upcast: every weight converted to f32 on every call (for Gemma 3 270M, the whole
    262,144 x 640 embedding each decode step). One-row bf16 -> f32 dots take a slow matrix-vector path on
    XLA:CPU (the LM head: ~180 ms vs ~12 ms at two rows), so on CPU a single row is computed as two; and a
    [N, K] weight is contracted on its K axis directly (`x @ w.T` as a dot of a transpose was upcast again).
    On TPU / GPU, bf16 inputs with f32 accumulation is the MXU / tensor-core dot anyway.
    """
    if a.dtype == jnp.float32 and w.dtype == jnp.float32:
        return a @ (w.T if transposed else w)
    lead, K = a.shape[:-1], a.shape[-1]
    N = w.shape[0] if transposed else w.shape[-1]
    dims = (((1,), (1,)), ((), ())) if transposed else (((1,), (0,)), ((), ()))
    y = dot_f32(a.reshape(-1, K), w, dims)
    return y.reshape(*lead, N).astype(out_dtype or a.dtype)
