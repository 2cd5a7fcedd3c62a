"""Paged-attention decode kernels (TPU Mosaic + GPU Triton, in interpret mode on CPU) against reference.py.

Randomized with hypothesis over: lengths 0, 1, page-size multiples and not, full table; GQA ratios 1-8 incl.
one KV head; sliding windows shorter and longer than the context; soft-capping; f32 / bf16; int8 KV; fused
KV write. Every KV slot a query may not see is NaN (poisoned cache) and kernel outputs start as NaN (the
interpreters' uninitialised memory), so a masked-read bug or an unwritten output element fails.

Each example fixes the shapes and static parameters (one compile) and runs several random length sets, which
are runtime data: that keeps the suite fast on 2 cores.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pallas_kernels import decode_gpu, decode_tpu, reference as ref
from pallas_kernels.testing import (ATOL, GPU_INTERPRET, assert_pages_equal, decode_case, f32, max_err, sweep_variant,
                                    tpu_interpret)

SETTINGS = dict(deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
ROWS = 3
_STATIC = ("scale", "softcap")
REF = jax.jit(ref.paged_attention_decode, static_argnames=_STATIC)
REF_FUSED = jax.jit(ref.paged_attention_decode_fused, static_argnames=_STATIC)


@st.composite
def decode_params(draw, gpu=False):
    page_size = draw(st.sampled_from([8, 16] if gpu else [4, 8]))
    pages_per_seq = draw(st.integers(2, 4))
    full = pages_per_seq * page_size
    special = st.sampled_from([0, 1, page_size - 1, page_size, page_size + 1, full])
    one_len = st.one_of(special, st.integers(0, full))
    lens_sets = draw(st.lists(st.lists(one_len, min_size=ROWS, max_size=ROWS), min_size=3, max_size=3))
    # the window is runtime data (no recompile): one per length set, shorter and longer than the contexts
    windows = draw(st.lists(st.sampled_from([0, 1, 3, page_size + 2, 10 * full]), min_size=3, max_size=3))
    hkv, group = draw(st.sampled_from([(1, 1), (1, 4), (2, 1), (2, 3), (1, 8), (2, 2), (1, 5), (2, 7), (3, 2)]))
    head_dim = draw(st.sampled_from([16, 64] if gpu else [32, 128]))
    softcap = draw(st.sampled_from([None, 4.0]))
    dtype = draw(st.sampled_from([jnp.float32, jnp.bfloat16]))
    return dict(lens_sets=lens_sets, windows=windows, page_size=page_size, pages_per_seq=pages_per_seq, hkv=hkv,
                group=group, head_dim=head_dim, softcap=softcap, dtype=dtype)


def _cases(p, seed, int8=False):
    rng = np.random.RandomState(seed)
    for lens, window in zip(p["lens_sets"], p["windows"]):
        c = decode_case(rng, lens, num_heads=p["hkv"] * p["group"], num_kv_heads=p["hkv"], head_dim=p["head_dim"],
                        page_size=p["page_size"], window=window, dtype=p["dtype"], int8=int8,
                        pages_per_seq=p["pages_per_seq"])
        c["window"] = jnp.int32(window)
        yield c


def _static(p):
    return dict(scale=p["head_dim"] ** -0.5, softcap=p["softcap"])


def check_decode(fn, p, seed, int8=False):
    for c in _cases(p, seed, int8):
        args = (c["q"], c["k_pages"], c["v_pages"], c["block_tables"], c["kv_lens"])
        scales = dict(k_scales=c["k_scales"], v_scales=c["v_scales"])
        want = REF(*args, **scales, window=c["window"], **_static(p))
        got = fn(*args, **scales, window=c["window"], **_static(p))
        assert got.shape == want.shape and got.dtype == want.dtype
        got, want = f32(got), f32(want)
        assert not np.isnan(got).any(), "NaN: a poisoned slot or an unwritten output element leaked"
        err = max_err(got, want)
        assert err <= ATOL[jnp.dtype(p["dtype"])], f"lens {np.asarray(c['kv_lens'])}: max err {err}"
        zero_rows = np.asarray(c["kv_lens"]) == 0                      # kv_len 0 -> exactly zero
        assert np.all(got[zero_rows] == 0.0)


def check_fused(fn, p, seed, int8=False):
    for c in _cases(p, seed, int8):
        quant = c["k_scales"] is not None
        args = (c["q"], c["k_new"], c["v_new"], c["k_pages"], c["v_pages"], c["slots"], c["block_tables"],
                c["kv_lens"])
        want = REF_FUSED(*args, k_scales=c["k_scales"], v_scales=c["v_scales"], window=c["window"], **_static(p))
        copies = [a.copy() if i in (3, 4) else a for i, a in enumerate(args)]   # the kernels donate the cache
        scales = dict(k_scales=c["k_scales"].copy(), v_scales=c["v_scales"].copy()) if quant else {}
        got = fn(*copies, **scales, window=c["window"], **_static(p))
        assert len(got) == len(want) == (5 if quant else 3)
        assert not np.isnan(f32(got[0])).any()
        err = max_err(got[0], want[0])
        assert err <= ATOL[jnp.dtype(p["dtype"])], f"attention max err {err}"
        assert_pages_equal(got[1:], want[1:])


def _tpu(fused=False, **tuning):
    f = decode_tpu.paged_attention_decode_fused if fused else decode_tpu.paged_attention_decode
    return functools.partial(f, interpret=tpu_interpret(), **tuning)


def _gpu(p, fused=False, **tuning):
    f = decode_gpu.paged_attention_decode_fused if fused else decode_gpu.paged_attention_decode
    return functools.partial(f, interpret=GPU_INTERPRET, pages_per_block=max(1, 16 // p["page_size"]), **tuning)


@settings(max_examples=3, **SETTINGS)
@given(p=decode_params(), seed=st.integers(0, 2**16), ppb=st.sampled_from([1, 2, 3]))
def test_decode_tpu(p, seed, ppb):
    check_decode(_tpu(pages_per_block=ppb), p, seed)


@settings(max_examples=3, **SETTINGS)
@given(p=decode_params(gpu=True), seed=st.integers(0, 2**16), splits=st.sampled_from([1, 2, 3]))
def test_decode_gpu(p, seed, splits):
    check_decode(_gpu(p, num_splits=splits), p, seed)


@settings(max_examples=3, **SETTINGS)
@given(p=decode_params(), seed=st.integers(0, 2**16))
def test_decode_tpu_int8_kv(p, seed):
    check_decode(_tpu(pages_per_block=2), p, seed, int8=True)


@settings(max_examples=3, **SETTINGS)
@given(p=decode_params(gpu=True), seed=st.integers(0, 2**16))
def test_decode_gpu_int8_kv(p, seed):
    check_decode(_gpu(p, num_splits=2), p, seed, int8=True)


@settings(max_examples=3, **SETTINGS)
@given(p=decode_params(), seed=st.integers(0, 2**16), int8=st.booleans())
def test_decode_tpu_fused_write(p, seed, int8):
    check_fused(_tpu(fused=True, pages_per_block=2), p, seed, int8)


@settings(max_examples=3, **SETTINGS)
@given(p=decode_params(gpu=True), seed=st.integers(0, 2**16), int8=st.booleans())
def test_decode_gpu_fused_write(p, seed, int8):
    check_fused(_gpu(p, fused=True, num_splits=2), p, seed, int8)


@pytest.mark.parametrize("variant", ["tpu", "gpu"])
def test_decode_gemma3_270m_shape(variant):
    """Gemma 3 270M attention: 4 query heads, 1 KV head, head_dim 256, window 512, bf16; contexts past it."""
    p = dict(lens_sets=[[0, 1, 37, 600]], windows=[512], page_size=16, pages_per_seq=40, hkv=1, group=4,
             head_dim=256, softcap=None, dtype=jnp.bfloat16)
    fn = _tpu(pages_per_block=8) if variant == "tpu" else _gpu(p, num_splits=4)
    check_decode(fn, p, 7)


@pytest.mark.parametrize("variant", ["tpu", "gpu"])
def test_decode_gqa_sweep(variant):
    """Every GQA ratio 1-8 (testing.sweep_variant: one or two KV heads; f32 / bf16; soft-cap; int8 KV; fused write);
    rows of length 0, 1, 7 (not a page multiple) and the full table; window 5 (shorter than 7 and 12, longer
    than 1)."""
    ps, hd = (4, 32) if variant == "tpu" else (8, 16)
    for g in range(1, 9):
        v = sweep_variant(g)
        p = dict(lens_sets=[[0, 1, 7, 3 * ps]], windows=[5], page_size=ps, pages_per_seq=3, hkv=v["hkv"], group=g,
                 head_dim=hd, softcap=v["softcap"], dtype=v["dtype"])
        fn = (_tpu(fused=v["fused"], pages_per_block=2) if variant == "tpu"
              else _gpu(p, fused=v["fused"], num_splits=2))
        (check_fused if v["fused"] else check_decode)(fn, p, g, int8=v["int8"])
