"""Weight-only quantized matmul kernels (TPU + GPU, interpret mode) and the quantization formats."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pallas_kernels import quant_matmul as qm, reference as ref
from pallas_kernels.testing import MATMUL_RTOL, f32, tpu_interpret

SETTINGS = dict(deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


def test_int8_roundtrip_and_range():
    w = jax.random.normal(jax.random.key(0), (64, 48))
    q, s = ref.quantize_int8(w)
    assert q.dtype == jnp.int8 and s.shape == (48,)
    assert int(jnp.abs(q.astype(jnp.int32)).max()) <= 127
    np.testing.assert_allclose(ref.dequantize_int8(q, s), w, atol=float(s.max()) / 2 + 1e-6)


def test_int4_packing_layout():
    """Byte i of column n: low nibble = row i, high nibble = row K/2 + i; two's complement in [-8, 7]."""
    k, n, g = 16, 3, 4
    vals = np.random.RandomState(0).randint(-8, 8, size=(k, n))
    vals[:, 0] = np.arange(k) % 16 - 8                                    # every nibble value
    scales = np.ones((k // g, n), np.float32)
    w = jnp.asarray(vals, jnp.float32) * jnp.repeat(jnp.asarray(scales), g, axis=0) * 7 / np.abs(vals).max(0).clip(1)
    q, s = ref.quantize_int4(w, g)
    assert q.dtype == jnp.uint8 and q.shape == (k // 2, n) and s.shape == (k // g, n)
    u = np.asarray(ref.unpack_int4(q))
    b = np.asarray(q).astype(np.int32)
    lo, hi = b & 0xF, b >> 4
    np.testing.assert_array_equal(np.where(lo >= 8, lo - 16, lo), u[: k // 2])
    np.testing.assert_array_equal(np.where(hi >= 8, hi - 16, hi), u[k // 2:])
    assert u.min() >= -8 and u.max() <= 7
    np.testing.assert_allclose(ref.dequantize_int4(q, s, g), w, atol=float(s.max()) / 2 + 1e-6)


def test_int4_requires_group_aligned_halves():
    with pytest.raises(ValueError):
        ref.quantize_int4(jnp.ones((96, 8)), 64)


@st.composite
def mm_params(draw, gpu=False):
    bits = draw(st.sampled_from([8, 4]))
    group = draw(st.sampled_from([32, 64, 128]))
    kdim = draw(st.sampled_from([256, 640, 1024] if not gpu else [256, 640, 512]))
    if bits == 4 and kdim % (2 * group):
        group = 64 if kdim % 128 == 0 else 32
    m = draw(st.sampled_from([1, 5, 16, 40, 300] if not gpu else [1, 5, 16, 40, 70]))
    n = draw(st.sampled_from([128, 384, 256]))
    dtype = draw(st.sampled_from([jnp.float32, jnp.bfloat16]))
    return dict(bits=bits, group=group, k=kdim, m=m, n=n, dtype=dtype)


def _check(fn, p, seed):
    rng = np.random.RandomState(seed)
    x = jnp.asarray(rng.standard_normal((p["m"], p["k"])), p["dtype"])
    w = jnp.asarray(rng.standard_normal((p["k"], p["n"])), jnp.float32)
    if p["bits"] == 8:
        wq, s = ref.quantize_int8(w)
    else:
        wq, s = ref.quantize_int4(w, p["group"])
    want = f32(ref.quantized_matmul(x, wq, s, bits=p["bits"], group_size=p["group"]))
    got = fn(x, wq, s, bits=p["bits"], group_size=p["group"])
    assert got.shape == want.shape and got.dtype == x.dtype
    got = f32(got)
    assert not np.isnan(got).any()
    rel = np.abs(got - want).max() / np.abs(want).max()
    assert rel <= MATMUL_RTOL[jnp.dtype(p["dtype"])], rel


@settings(max_examples=8, **SETTINGS)
@given(p=mm_params(), seed=st.integers(0, 1000))
def test_quantized_matmul_tpu(p, seed):
    _check(functools.partial(qm.quantized_matmul_tpu, interpret=tpu_interpret()), p, seed)


@settings(max_examples=6, **SETTINGS)
@given(p=mm_params(gpu=True), seed=st.integers(0, 1000))
def test_quantized_matmul_gpu(p, seed):
    _check(functools.partial(qm.quantized_matmul_gpu, interpret=True), p, seed)


def test_quantized_matmul_explicit_tiles():
    """Multi-tile grids in every dimension, incl. a ragged last M tile."""
    p = dict(bits=4, group=32, k=512, m=40, n=384, dtype=jnp.float32)
    _check(functools.partial(qm.quantized_matmul_tpu, tm=16, tn=128, tk=128, interpret=tpu_interpret()), p, 1)
    _check(functools.partial(qm.quantized_matmul_gpu, tm=16, tn=128, tk=64, interpret=True), p, 1)
    p8 = dict(p, bits=8)
    _check(functools.partial(qm.quantized_matmul_tpu, tm=16, tn=128, tk=128, interpret=tpu_interpret()), p8, 2)
