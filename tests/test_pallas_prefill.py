"""Ragged prefill / chunked-prefill attention kernels (TPU Mosaic + GPU Triton, interpret mode) vs reference.py.

Batches mix fresh prompts (no context), chunked-prefill / prefix-hit segments (cached context + new tokens),
single-token segments (decode rows), empty segments, non-live trailing segments and padding tokens; contexts
cross page boundaries and fill the whole table; GQA ratios 1-8; windows shorter and longer than the context;
soft-capping; f32 / bf16; int8 KV; fused KV write. The cache is poisoned (NaN) wherever no live query may look
and outputs start as NaN (interpreters), so masking bugs and unwritten rows fail.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pallas_kernels import prefill_gpu, prefill_tpu, reference as ref
from pallas_kernels.testing import ATOL, GPU_INTERPRET, assert_pages_equal, f32, max_err, ragged_case, sweep_variant, tpu_interpret

SETTINGS = dict(deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
SEQS = 3
_STATIC = ("scale", "softcap")
REF = jax.jit(ref.ragged_prefill_attention, static_argnames=_STATIC)
REF_FUSED = jax.jit(ref.ragged_prefill_attention_fused, static_argnames=_STATIC)


@st.composite
def segment(draw, page_size, full):
    """(ctx_len, q_len) with ctx + q <= full."""
    q = draw(st.sampled_from([0, 1, page_size - 1, page_size + 1, 2 * page_size, full]) | st.integers(0, full))
    q = min(q, full)
    ctx = draw(st.sampled_from([0, 0, 1, page_size, full - q]) | st.integers(0, full - q))
    return min(ctx, full - q), q


@st.composite
def prefill_params(draw, gpu=False):
    page_size = draw(st.sampled_from([8, 16] if gpu else [4, 8]))
    pages_per_seq = draw(st.integers(2, 4))
    full = pages_per_seq * page_size
    batches = []
    for _ in range(3):
        segs = draw(st.lists(segment(page_size, full), min_size=SEQS, max_size=SEQS))
        batches.append(dict(ctx=[c for c, _ in segs], q=[q for _, q in segs],
                            num_seqs=draw(st.sampled_from([SEQS, SEQS - 1])),
                            # runtime data: shorter and longer than the contexts
                            window=draw(st.sampled_from([0, 1, 3, page_size + 2, 10 * full]))))
    hkv, group = draw(st.sampled_from([(1, 1), (1, 4), (2, 1), (2, 3), (1, 8), (2, 2), (1, 5), (3, 2)]))
    if gpu:
        hkv, group = draw(st.sampled_from([(1, 1), (1, 4), (2, 2), (1, 8), (2, 3)]))
    head_dim = draw(st.sampled_from([16, 64] if gpu else [32, 128]))
    return dict(batches=batches, page_size=page_size, pages_per_seq=pages_per_seq, hkv=hkv, group=group,
                head_dim=head_dim, softcap=draw(st.sampled_from([None, 4.0])),
                dtype=draw(st.sampled_from([jnp.float32, jnp.bfloat16])),
                num_tokens=SEQS * full + 3)


def _cases(p, seed, int8=False):
    rng = np.random.RandomState(seed)
    for b in p["batches"]:
        c = ragged_case(rng, b["q"], b["ctx"], num_heads=p["hkv"] * p["group"], num_kv_heads=p["hkv"],
                        head_dim=p["head_dim"], page_size=p["page_size"], window=b["window"],
                        num_seqs=b["num_seqs"], num_tokens=p["num_tokens"], dtype=p["dtype"], int8=int8,
                        pages_per_seq=p["pages_per_seq"])
        c["window"] = jnp.int32(b["window"])
        yield c


def _static(p):
    return dict(scale=p["head_dim"] ** -0.5, softcap=p["softcap"])


def _check_out(got, want, c, p, poisoned_padding=False):
    """Live rows: finite and within ATOL of the reference. Rows past the live segments: zero, or, for a kernel
    run with its output poisoned (GPU prefill's poison_output: the interpreter poisons the TPU kernels' output
    itself), still NaN, which shows the poison was in place for the live rows too."""
    assert got.shape == want.shape and got.dtype == want.dtype
    got, want = f32(got), f32(want)
    live_end = int(np.asarray(c["cu_q_lens"])[int(c["num_seqs"][0])])
    assert not np.isnan(got[:live_end]).any(), "NaN: a poisoned slot or an unwritten output row leaked"
    err = max_err(got[:live_end], want[:live_end])
    assert err <= ATOL[jnp.dtype(p["dtype"])], f"q {np.diff(np.asarray(c['cu_q_lens']))} kv " \
                                               f"{np.asarray(c['kv_lens'])}: max err {err}"
    if poisoned_padding:
        assert np.all(np.isnan(got[live_end:])), "the poisoned output buffer was not in place"
    else:
        assert np.all(got[live_end:] == 0.0), "padding / non-live rows must be zero"


def _poisoned(fn):
    return bool(getattr(fn, "keywords", {}).get("poison_output", False))


def check_prefill(fn, p, seed, int8=False):
    for c in _cases(p, seed, int8):
        args = (c["q"], c["k_pages"], c["v_pages"], c["block_tables"], c["cu_q_lens"], c["kv_lens"], c["num_seqs"])
        scales = dict(k_scales=c["k_scales"], v_scales=c["v_scales"])
        kw = dict(scales, window=c["window"], **_static(p))
        _check_out(fn(*args, **kw), REF(*args, **kw), c, p, _poisoned(fn))


def check_fused(fn, p, seed, int8=False):
    for c in _cases(p, seed, int8):
        quant = c["k_scales"] is not None
        args = (c["q"], c["k_new"], c["v_new"], c["k_pages"], c["v_pages"], c["slots"], c["block_tables"],
                c["cu_q_lens"], c["kv_lens"], c["num_seqs"])
        want = REF_FUSED(*args, k_scales=c["k_scales"], v_scales=c["v_scales"], window=c["window"], **_static(p))
        copies = [a.copy() if i in (3, 4) else a for i, a in enumerate(args)]   # the kernels donate the cache
        scales = dict(k_scales=c["k_scales"].copy(), v_scales=c["v_scales"].copy()) if quant else {}
        got = fn(*copies, **scales, window=c["window"], **_static(p))
        assert len(got) == len(want) == (5 if quant else 3)
        _check_out(got[0], want[0], c, p, _poisoned(fn))
        assert_pages_equal(got[1:], want[1:])


def _tpu(fused=False, **tuning):
    f = prefill_tpu.ragged_prefill_attention_fused if fused else prefill_tpu.ragged_prefill_attention
    return functools.partial(f, interpret=tpu_interpret(), **tuning)


def _gpu(p, fused=False, **tuning):
    f = prefill_gpu.ragged_prefill_attention_fused if fused else prefill_gpu.ragged_prefill_attention
    gp = 1 << max(0, (p["group"] - 1).bit_length())
    return functools.partial(f, interpret=GPU_INTERPRET, pages_per_block=max(1, 16 // p["page_size"]),
                             block_q=max(4, 16 // gp), poison_output=True, **tuning)


@settings(max_examples=3, **SETTINGS)
@given(p=prefill_params(), seed=st.integers(0, 2**16), bq=st.sampled_from([8, 16]), ppb=st.sampled_from([1, 2, 3]))
def test_prefill_tpu(p, seed, bq, ppb):
    check_prefill(_tpu(block_q=bq, pages_per_block=ppb), p, seed)


@settings(max_examples=3, **SETTINGS)
@given(p=prefill_params(gpu=True), seed=st.integers(0, 2**16))
def test_prefill_gpu(p, seed):
    check_prefill(_gpu(p), p, seed)


@settings(max_examples=3, **SETTINGS)
@given(p=prefill_params(), seed=st.integers(0, 2**16))
def test_prefill_tpu_int8_kv(p, seed):
    check_prefill(_tpu(block_q=8, pages_per_block=2), p, seed, int8=True)


@settings(max_examples=3, **SETTINGS)
@given(p=prefill_params(gpu=True), seed=st.integers(0, 2**16))
def test_prefill_gpu_int8_kv(p, seed):
    check_prefill(_gpu(p), p, seed, int8=True)


@settings(max_examples=3, **SETTINGS)
@given(p=prefill_params(), seed=st.integers(0, 2**16), int8=st.booleans())
def test_prefill_tpu_fused_write(p, seed, int8):
    check_fused(_tpu(fused=True, block_q=8, pages_per_block=2), p, seed, int8)


@settings(max_examples=3, **SETTINGS)
@given(p=prefill_params(gpu=True), seed=st.integers(0, 2**16), int8=st.booleans())
def test_prefill_gpu_fused_write(p, seed, int8):
    check_fused(_gpu(p, fused=True), p, seed, int8)


def test_prefill_q_len_one_equals_decode():
    """A batch of 1-token segments through the prefill kernel is a decode step."""
    from pallas_kernels import decode_tpu
    from pallas_kernels.testing import decode_case
    c = decode_case(np.random.RandomState(3), [5, 17, 32], num_heads=4, num_kv_heads=2, head_dim=32, page_size=8,
                    window=6, pages_per_seq=4)
    cu = jnp.arange(4, dtype=jnp.int32)
    kw = dict(scale=0.2, window=6, interpret=tpu_interpret())
    a = prefill_tpu.ragged_prefill_attention(c["q"], c["k_pages"], c["v_pages"], c["block_tables"], cu,
                                             c["kv_lens"], jnp.array([3], jnp.int32), block_q=8, **kw)
    b = decode_tpu.paged_attention_decode(c["q"], c["k_pages"], c["v_pages"], c["block_tables"], c["kv_lens"], **kw)
    assert max_err(a, b) < 1e-5


@pytest.mark.parametrize("variant", ["tpu", "gpu"])
def test_prefill_gqa_sweep(variant):
    """Every GQA ratio 1-8 (testing.sweep_variant: one or two KV heads; f32 / bf16; soft-cap; int8
    KV; fused write). Segments: a fresh 5-token prompt, a chunk of 6 after 6 cached tokens ending at the full
    table, one token after 3, an empty one, and padding; window 5 (shorter than most contexts)."""
    ps, hd = (4, 32) if variant == "tpu" else (8, 16)
    full = 3 * ps
    for g in range(1, 9):
        v = sweep_variant(g)
        p = dict(batches=[dict(ctx=[0, full - 6, 3, 0], q=[5, 6, 1, 0], num_seqs=4, window=5)], page_size=ps,
                 pages_per_seq=3, hkv=v["hkv"], group=g, head_dim=hd, softcap=v["softcap"], dtype=v["dtype"],
                 num_tokens=15)
        fn = _tpu(fused=v["fused"], block_q=8, pages_per_block=2) if variant == "tpu" else _gpu(p, fused=v["fused"])
        (check_fused if v["fused"] else check_prefill)(fn, p, g, int8=v["int8"])
