"""On-device sampling (jaxserve.engine.sampler, inputs from sampling_inputs) against numpy references.

Distribution tests draw thousands of samples with fixed seeds, so every outcome is deterministic; the stated
tolerance is what a *correct* sampler would fail with probability < 1e-4: the chi-square statistic of the
counts against the reference distribution must stay below its 99.99% quantile.
"""

from __future__ import annotations

import math
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hst

import jaxserve.engine.sampler as sampler
from jaxserve.engine.sampler import FIELDS, SampleResult, SamplingTensors, penalize, sample
from jaxserve.engine.sampling_inputs import build_sampling_arrays, seed_to_u32
from jaxserve.sampling_params import SamplingParams as SP

# Every call is padded to a few standard shapes so the whole file compiles only a handful of programs:
# rows to R_STD (or N_DRAW for distribution tests), vocab to at least V_STD with -inf logits (never sampled, zero
# probability), H_STD history slots, NB_STD banned slots, NMAX logprobs. pad=False keeps the natural shape.
NMAX, V_STD, R_STD, N_DRAW, H_STD, NB_STD = 4, 32, 8, 4096, 8, 4
_sample = jax.jit(sample, static_argnums=(2,), static_argnames=("top_k_cap", "row_chunk"))
_penalize = jax.jit(penalize)


def arrays_for(params, *, hist=None, out_start=None, steps=None, seeds=None, banned=None, R=None, H=H_STD,
               NB=NB_STD, masks=None):
    n = len(params)
    R = R or n
    return build_sampling_arrays(params, hist if hist is not None else [[]] * n,
                                 out_start if out_start is not None else [0] * n,
                                 steps if steps is not None else [0] * n,
                                 seeds if seeds is not None else list(range(n)),
                                 banned if banned is not None else [[]] * n, R, H, NB, masks=masks)


def pad_logits(logits, pad=True):
    logits = np.asarray(logits, np.float32)
    n, V = logits.shape
    if not pad:
        return logits
    R = R_STD if n <= R_STD else N_DRAW if n <= N_DRAW else n
    x = np.zeros((R, max(V, V_STD)), np.float32)
    x[:n] = -np.inf
    x[:n, :V] = logits
    return x


def run(logits, params, nmax=NMAX, top_k_cap=sampler.TOP_K_CAP, row_chunk=None, pad=True, **kw):
    n = len(params)
    x = pad_logits(logits, pad)
    st = SamplingTensors(**arrays_for(params, R=x.shape[0], **kw))
    res = _sample(x, st, nmax, top_k_cap=top_k_cap, row_chunk=row_chunk)
    return SampleResult(*(np.asarray(a)[:n] for a in res))


def draw(logit_row, params, n=N_DRAW, seed0=0, step=0, **kw):
    """n samples of one logits row: n rows with seeds seed0.. (same step)."""
    x = np.broadcast_to(np.asarray(logit_row, np.float32), (n, len(logit_row)))
    return run(x, [params] * n, seeds=list(range(seed0, seed0 + n)), steps=[step] * n, **kw).tokens


# ------------------------------------------------------------------------------------------------ references


def softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x[np.isfinite(x)].max())
    e[~np.isfinite(x)] = 0
    return e / e.sum()


def ref_nucleus(probs, p):
    """Smallest top set with mass >= p; a group of equal probabilities at the boundary is kept whole."""
    if p >= 1:
        return probs > 0
    order = np.argsort(-probs, kind="stable")
    cum = np.cumsum(probs[order])
    m = int(np.argmax(cum >= p))
    return (probs >= probs[order][m]) & (probs > 0)


def ref_keep(l, T, k=0, p=1.0, min_p=0.0, p_tol=0.0, min_p_tol=0.0):
    """Kept set and renormalised distribution for temperature -> top-k -> top-p -> min-p (same f32 scaling)."""
    s = (np.asarray(l, np.float32) / np.float32(T)).astype(np.float64)
    V = len(s)
    keep = np.isfinite(s)
    if 0 < k < V:
        kth = np.sort(s)[::-1][k - 1]
        keep &= s >= kth
    e = np.where(keep, np.exp(s - s[keep].max()), 0.0)
    keep &= ref_nucleus(e / e.sum(), min(1.0, p + p_tol))
    if min_p > 0:
        keep &= e >= min_p * (1 - min_p_tol) * e.max()
    probs = np.where(keep, e, 0.0)
    return keep, probs / probs.sum()


def ref_penalize(x, hist, out_start, rp=1.0, pp=0.0, fp=0.0, banned=()):
    l = np.array(x, np.float32)
    h = [int(t) for t in hist if t >= 0]
    for t in set(h):
        l[t] = l[t] / np.float32(rp) if l[t] > 0 else l[t] * np.float32(rp)
    for t, c in Counter(h[out_start:]).items():
        l[t] = l[t] - np.float32(fp) * np.float32(c) - np.float32(pp)
    for t in banned:
        l[t] = -np.inf
    return l


def chi2_quantile(dof, z=3.719):
    """Wilson-Hilferty approximation of the chi-square quantile (z = 3.719: 99.99%)."""
    a = 2.0 / (9.0 * dof)
    return dof * (1 - a + z * math.sqrt(a)) ** 3


def assert_matches(tokens, probs):
    """Never outside the support, and a chi-square fit with the stated tolerance (categories expecting fewer
    than 5 draws are pooled into one bin)."""
    V = len(probs)
    assert tokens.min() >= 0 and tokens.max() < V
    counts = np.bincount(tokens, minlength=V)
    assert counts[probs == 0].sum() == 0, f"sampled outside the support: {np.nonzero(counts * (probs == 0))[0]}"
    n = counts.sum()
    exp = probs * n
    big = exp >= 5
    obs_b, exp_b = list(counts[big]), list(exp[big])
    if (~big & (probs > 0)).any():
        obs_b.append(counts[~big].sum())
        exp_b.append(exp[~big].sum())
    obs_b, exp_b = np.array(obs_b, np.float64), np.array(exp_b)
    if len(obs_b) <= 1:
        assert counts[probs > 0].sum() == n
        return
    stat = float(((obs_b - exp_b) ** 2 / exp_b).sum())
    assert stat < chi2_quantile(len(obs_b) - 1), f"chi2 {stat:.1f} for dof {len(obs_b) - 1}: {obs_b} vs {exp_b}"


def rand_logits(rng, R, V, scale=2.0):
    return (rng.standard_normal((R, V)) * scale).astype(np.float32)


# ------------------------------------------------------------------------------------------------ host arrays


def test_build_sampling_arrays_pads_and_encodes():
    params = [SP(temperature=0.7, top_k=5, top_p=0.9, min_p=0.1, repetition_penalty=1.2, seed=3, logprobs=2),
              SP(temperature=0.0, top_k=5, top_p=0.5, min_p=0.2, frequency_penalty=0.5)]
    a = build_sampling_arrays(params, [[5, 6, 7], list(range(12))], [2, 10], [4, 2], [3, 2**32 + 7],
                              [[1, 2], []], 4, 8, 3)
    assert set(a) == set(FIELDS)
    assert a["temperature"].dtype == np.float32 and a["seed"].dtype == np.uint32
    assert a["history"].shape == (4, 8) and a["banned"].shape == (4, 3)
    np.testing.assert_array_equal(a["temperature"], np.array([0.7, 0, 0, 0], np.float32))
    np.testing.assert_array_equal(a["top_k"], [5, 0, 0, 0])  # greedy rows keep the random-only filters off
    np.testing.assert_allclose(a["top_p"], [0.9, 1, 1, 1])
    np.testing.assert_allclose(a["min_p"], [0.1, 0, 0, 0])
    np.testing.assert_allclose(a["repetition_penalty"], [1.2, 1, 1, 1])
    np.testing.assert_allclose(a["frequency_penalty"], [0, 0.5, 0, 0])
    np.testing.assert_array_equal(a["history"][0], [5, 6, 7, -1, -1, -1, -1, -1])
    np.testing.assert_array_equal(a["history"][1], list(range(4, 12)))  # last H kept ...
    np.testing.assert_array_equal(a["output_start"], [2, 6, 0, 0])  # ... and output_start shifted
    np.testing.assert_array_equal(a["banned"], [[1, 2, -1], [-1, -1, -1], [-1, -1, -1], [-1, -1, -1]])
    np.testing.assert_array_equal(a["num_logprobs"], [2, -1, -1, -1])
    np.testing.assert_array_equal(a["step"], [4, 2, 0, 0])
    np.testing.assert_array_equal(a["seed"], [3, seed_to_u32(2**32 + 7), 0, 0])
    assert seed_to_u32(2**32 + 7) != 7 and seed_to_u32(-1) != seed_to_u32(0)
    assert seed_to_u32(123456) == 123456


def test_build_sampling_arrays_rejects_bad_input():
    with pytest.raises(ValueError):
        build_sampling_arrays([SP()], [[]], [0], [0], [0], [[1, 2, 3]], 1, 4, 2)  # too many banned ids
    with pytest.raises(ValueError):
        build_sampling_arrays([SP()] * 3, [[]] * 3, [0] * 3, [0] * 3, [0] * 3, [[]] * 3, 2, 4, 2)
    with pytest.raises(ValueError):
        build_sampling_arrays([SP()], [[]], [0, 0], [0], [0], [[]], 2, 4, 2)


def test_tiny_temperature_is_greedy_and_empty_build_works():
    a = build_sampling_arrays([SP(temperature=1e-7)], [[]], [0], [0], [0], [[]], 2, 4, 2)
    assert a["temperature"][0] == 0
    empty = build_sampling_arrays([], [], [], [], [], [], 4, 16, 8)
    assert all(v.shape[0] == 4 for v in empty.values())
    assert (empty["temperature"] == 0).all() and (empty["history"] == -1).all()


def test_abstract_lowering_like_the_runner():
    arrays = build_sampling_arrays([], [], [], [], [], [], 8, 32, 8)
    st = SamplingTensors(**{k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in arrays.items()})
    compiled = jax.jit(lambda x, st: sample(x, st, 5)).lower(jax.ShapeDtypeStruct((8, 40), jnp.float32), st).compile()
    x = np.random.default_rng(0).standard_normal((8, 40)).astype(np.float32)
    res = compiled(x, SamplingTensors(**arrays))
    np.testing.assert_array_equal(np.asarray(res.tokens), x.argmax(1))
    assert res.top_ids.shape == (8, 5) and res.top_logprobs.shape == (8, 5)


# ------------------------------------------------------------------------------------------------ greedy


@pytest.mark.parametrize("V,pad", [(16, True), (17, False), (1000, False)])
def test_greedy_is_argmax(V, pad):
    x = rand_logits(np.random.default_rng(V), 8, V)
    x[3, :] = 0.5  # all tied -> first index
    x[4, [2, 9, 11]] = 50.0  # tie at the max -> first of them
    res = run(x, [SP(temperature=0)] * 8, pad=pad)
    np.testing.assert_array_equal(res.tokens, x.argmax(1))
    assert res.tokens[3] == 0 and res.tokens[4] == 2


def test_greedy_rows_unaffected_by_random_rows():
    x = rand_logits(np.random.default_rng(1), 8, 32)
    params = [SP(temperature=0), SP(temperature=1.0, top_p=0.5), SP(temperature=0), SP(temperature=2.0, top_k=3)] * 2
    res = run(x, params)
    for i in (0, 2, 4, 6):
        assert res.tokens[i] == x[i].argmax()


def test_bf16_logits_accepted():
    x = rand_logits(np.random.default_rng(2), R_STD, V_STD)
    st = SamplingTensors(**arrays_for([SP(temperature=0)] * R_STD))
    xb = jnp.asarray(x, jnp.bfloat16)
    res = _sample(xb, st, NMAX)
    np.testing.assert_array_equal(np.asarray(res.tokens), np.asarray(xb.astype(jnp.float32)).argmax(1))


@pytest.mark.parametrize("k", [1, 20, 64])
def test_blocked_top_k_is_exact(k):
    """The two-stage top-k (top blocks by maximum, then top-k inside them) equals lax.top_k in values; without
    ties also in ids; with heavy ties the ids still point at the right values."""
    rng = np.random.default_rng(k)
    V = 1 << 16
    distinct = rng.permutation(V).astype(np.float32)[None].repeat(2, 0) / 7
    distinct[1] *= -1
    tied = np.round(rng.standard_normal((2, V)) * 2).astype(np.float32)  # ~15 distinct values
    for x in (distinct, tied):
        bm = x.reshape(2, -1, sampler.LEAF).max(2)
        v, i = jax.jit(sampler._top_k_blocked, static_argnums=(2,))(x, bm, k)
        rv, ri = jax.lax.top_k(x, k)
        np.testing.assert_array_equal(np.asarray(v), np.asarray(rv))
        np.testing.assert_array_equal(np.take_along_axis(x, np.asarray(i), 1), np.asarray(rv))
        assert all(len(set(r)) == k for r in np.asarray(i).tolist())
        if x is distinct:
            np.testing.assert_array_equal(np.asarray(i), np.asarray(ri))


# ------------------------------------------------------------------------------------------------ distributions


@pytest.mark.parametrize("T", [0.5, 1.0, 2.5])
def test_temperature_matches_softmax(T):
    l = rand_logits(np.random.default_rng(3), 1, 16, scale=1.5)[0]
    toks = draw(l, SP(temperature=T))
    assert_matches(toks, softmax(l.astype(np.float64) / T))


def test_temperature_distribution_over_steps():
    """One seed, many steps: the per-step keys are independent draws too."""
    l = rand_logits(np.random.default_rng(4), 1, 12)[0]
    n = N_DRAW
    x = np.broadcast_to(l, (n, 12))
    toks = run(x, [SP(temperature=1.0)] * n, seeds=[77] * n, steps=list(range(n))).tokens
    assert_matches(toks, softmax(l))


@pytest.mark.parametrize("k", [1, 4, 7])
def test_top_k_support_and_distribution(k):
    l = rand_logits(np.random.default_rng(5), 1, 32)[0]
    toks = draw(l, SP(temperature=1.0, top_k=k))
    keep, probs = ref_keep(l, 1.0, k=k)
    assert keep.sum() == k
    assert set(np.unique(toks)) <= set(np.argsort(-l)[:k])
    assert_matches(toks, probs)


def test_top_k_keeps_ties_at_the_kth_value():
    l = np.array([3.0, 1.0, 2.0, 2.0, 0.0, 2.0, -1.0, 1.5], np.float32)
    toks = draw(l, SP(temperature=1.0, top_k=2))
    keep, probs = ref_keep(l, 1.0, k=2)
    np.testing.assert_array_equal(np.nonzero(keep)[0], [0, 2, 3, 5])  # 2nd value 2.0 is tied three ways
    assert set(np.unique(toks)) == {0, 2, 3, 5}
    assert_matches(toks, probs)


@pytest.mark.parametrize("k", [5, 13, 40])
def test_top_k_beyond_cap_uses_exact_bisection(k):
    rng = np.random.default_rng(6)
    l = np.round(rand_logits(rng, 1, 48)[0] * 2) / 2  # many exact ties
    toks = draw(l, SP(temperature=1.0, top_k=k), top_k_cap=4)
    keep, probs = ref_keep(l, 1.0, k=k)
    assert_matches(toks, probs)
    kth = np.sort(l)[::-1][k - 1]
    assert (l[np.unique(toks)] >= kth).all()


def test_top_k_larger_than_vocab_is_off():
    l = rand_logits(np.random.default_rng(7), 1, V_STD)[0]
    toks = draw(l, SP(temperature=1.0, top_k=50))
    assert_matches(toks, softmax(l))


NUCLEUS_CASES = [
    # (probabilities, p, expected nucleus)
    ([0.5, 0.2, 0.15, 0.1, 0.05], 0.6, [0, 1]),
    ([0.5, 0.2, 0.15, 0.1, 0.05], 0.5, [0]),  # mass exactly p: stop there (check with tolerance below)
    ([0.3, 0.2, 0.2, 0.1, 0.1, 0.05, 0.05], 0.4, [0, 1, 2]),  # tie straddles the boundary: kept whole
    ([0.3, 0.2, 0.2, 0.1, 0.1, 0.05, 0.05], 0.75, [0, 1, 2, 3, 4]),
    ([0.25, 0.25, 0.25, 0.25], 0.3, [0, 1, 2, 3]),
    ([0.9, 0.04, 0.03, 0.02, 0.01], 0.95, [0, 1, 2]),
]


@pytest.mark.parametrize("probs,p,expect", NUCLEUS_CASES)
def test_top_p_matches_reference_nucleus(probs, p, expect):
    probs = np.array(probs, np.float64)
    l = np.log(probs).astype(np.float32)
    perm = np.random.default_rng(len(probs)).permutation(len(probs))  # not in sorted order on device
    l, expect = l[perm], sorted(np.argsort(perm)[expect].tolist())
    if p == 0.5:  # exact-boundary case: 0.5 vs cumulative 0.5 is decided by rounding; use a clear p
        p = 0.5 - 1e-3
    keep, ref = ref_keep(l, 1.0, p=p)
    np.testing.assert_array_equal(np.nonzero(keep)[0], expect)
    toks = draw(l, SP(temperature=1.0, top_p=p))
    assert set(np.unique(toks)) == set(expect)
    assert_matches(toks, ref)


def test_top_p_on_top_k_renormalised_distribution():
    l = np.log(np.array([0.3, 0.25, 0.2, 0.1, 0.1, 0.05])).astype(np.float32)
    # top-k 3 renormalises to [0.4, 0.333, 0.267]; p=0.6 then needs two tokens (on the raw dist. it would too,
    # but p=0.7 separates them: raw needs 3 tokens (0.75), renormalised needs 2 (0.733))
    keep, probs = ref_keep(l, 1.0, k=3, p=0.7)
    np.testing.assert_array_equal(np.nonzero(keep)[0], [0, 1])
    toks = draw(l, SP(temperature=1.0, top_k=3, top_p=0.7))
    assert_matches(toks, probs)


def test_top_p_exact_fallback_path(monkeypatch):
    """Flat distribution + small p: rejection mostly fails, rows go to the bisection threshold."""
    monkeypatch.setattr(sampler, "MAX_DRAWS", 1)
    f = jax.jit(lambda x, st: sample(x, st, NMAX))
    rng = np.random.default_rng(8)
    l = (rng.standard_normal(V_STD) * 0.3).astype(np.float32)
    l[[3, 17]] = l.max() + 0.2  # a tie at the top
    n = N_DRAW
    arr = arrays_for([SP(temperature=1.0, top_p=0.12)] * n, seeds=list(range(n)))
    toks = np.asarray(f(np.broadcast_to(l, (n, V_STD)), SamplingTensors(**arr)).tokens)
    keep, probs = ref_keep(l, 1.0, p=0.12)
    assert 3 <= keep.sum() <= 8
    assert_matches(toks, probs)


@pytest.mark.parametrize("min_p", [0.05, 0.3, 0.9])
def test_min_p(min_p):
    l = rand_logits(np.random.default_rng(9), 1, 24)[0]
    toks = draw(l, SP(temperature=1.3, min_p=min_p))
    keep, probs = ref_keep(l, 1.3, min_p=min_p)
    pr = softmax(l / 1.3)
    np.testing.assert_array_equal(keep, pr >= min_p * pr.max())
    assert_matches(toks, probs)


def test_all_filters_together():
    l = rand_logits(np.random.default_rng(10), 1, 64, scale=1.0)[0]
    params = SP(temperature=0.8, top_k=20, top_p=0.8, min_p=0.1)
    toks = draw(l, params)
    keep, probs = ref_keep(l, 0.8, k=20, p=0.8, min_p=0.1)
    assert 2 < keep.sum() < 20
    assert_matches(toks, probs)


def test_distribution_across_many_leaves_and_groups():
    """V = 5000 (not a multiple of 64, two 4096-token groups): mass spread over tokens in different groups."""
    V = 5000
    l = np.full(V, -30.0, np.float32)
    hot = [0, 63, 64, 1000, 4095, 4096, 4500, 4999]
    l[hot] = np.linspace(0.0, 1.5, len(hot)).astype(np.float32)
    for params, kw in ((SP(temperature=1.0), {}), (SP(temperature=1.0, top_p=0.7), dict(p=0.7))):
        toks = draw(l, params, pad=False)
        keep, probs = ref_keep(l, 1.0, **kw)
        assert set(np.unique(toks)) <= set(hot)
        assert_matches(toks, probs)


@pytest.mark.parametrize("k", [50, 100, 300, 1500])
def test_top_k_tiers_at_larger_vocab(k):
    """V = 5000: k = 50, 100, 300 use the top-k tiers 64 / 256 / 1024, k = 1500 (> TOP_K_CAP) the bisection."""
    l = rand_logits(np.random.default_rng(k), 1, 5000, scale=1.0)[0]
    l[[7, 4999]] = l.max()  # a tie at the top, far apart
    toks = draw(l, SP(temperature=0.9, top_k=k), pad=False)
    keep, probs = ref_keep(l, 0.9, k=k)
    assert keep.sum() == k
    assert_matches(toks, probs)


def test_gemma_sized_vocab_rows_stay_in_reference_sets():
    """V = 262144 with every feature in one batch: greedy rows are the penalised argmax, random rows stay in the
    reference kept set, and same seed + step gives the same token again."""
    rng = np.random.default_rng(20)
    V = 262144
    x = (rng.standard_normal((R_STD, V)) * 2.0 - 4.0).astype(np.float32)
    x[:, rng.choice(V, 40, replace=False)] += 9.0
    params = [SP(temperature=0), SP(temperature=0.8), SP(temperature=0.8, top_k=50), SP(temperature=0.8, top_p=0.9),
              SP(temperature=1.0, top_k=3000, top_p=0.5, min_p=0.02),
              SP(temperature=0, repetition_penalty=1.3, frequency_penalty=0.5, logprobs=2),
              SP(temperature=1.5, top_p=0.95, presence_penalty=1.0), SP(temperature=0.7, min_p=0.1, logprobs=0)]
    hist = [rng.integers(0, V, 6).tolist() + [int(x[i].argmax())] for i in range(R_STD)]
    banned = [[int(np.argsort(-x[i])[1])] for i in range(R_STD)]
    kw = dict(hist=hist, out_start=[3] * R_STD, banned=banned, seeds=list(range(100, 108)), steps=[9] * R_STD)
    res = run(x, params, pad=False, **kw)
    again = run(x, params, pad=False, **kw)
    np.testing.assert_array_equal(res.tokens, again.tokens)
    for i, p in enumerate(params):
        l = ref_penalize(x[i], hist[i], 3, p.repetition_penalty, p.presence_penalty, p.frequency_penalty,
                         banned[i])
        t = int(res.tokens[i])
        if p.temperature == 0:
            assert t == int(np.argmax(l))
        else:
            keep, _ = ref_keep(l, p.temperature, p.top_k, p.top_p, p.min_p, p_tol=1e-4, min_p_tol=1e-5)
            assert keep[t]
        if p.logprobs is not None:
            lsm = np.log(softmax(x[i]))
            np.testing.assert_allclose(res.logprob[i], lsm[t], rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------ penalties


def _penalty_case(rng, R=R_STD, V=V_STD, H=H_STD):
    x = rand_logits(rng, R, V)
    hists, starts, params = [], [], []
    for i in range(R):
        n = int(rng.integers(0, H + 1))
        hists.append(rng.integers(0, V, n).tolist())
        starts.append(int(rng.integers(0, n + 1)))
        params.append(SP(temperature=0.0, repetition_penalty=float(rng.choice([1.0, 1.3, 0.7])),
                         presence_penalty=float(rng.choice([0.0, 0.5, -1.0])),
                         frequency_penalty=float(rng.choice([0.0, 0.4, -0.3]))))
    return x, hists, starts, params


def test_penalties_match_reference():
    rng = np.random.default_rng(11)
    for _ in range(5):
        x, hists, starts, params = _penalty_case(rng)
        arr = arrays_for(params, hist=hists, out_start=starts)
        got = np.asarray(_penalize(x, SamplingTensors(**arr)))
        for i, p in enumerate(params):
            ref = ref_penalize(x[i], hists[i], starts[i], p.repetition_penalty, p.presence_penalty,
                               p.frequency_penalty)
            np.testing.assert_allclose(got[i], ref, rtol=1e-6, atol=1e-6)


def test_repetition_penalty_semantics():
    x = pad_logits([[2.0, -2.0, 1.0, -1.0, 0.5]])
    arr = arrays_for([SP(temperature=0, repetition_penalty=2.0)], hist=[[0, 1, 4]], out_start=[2], R=R_STD)
    got = np.asarray(_penalize(x, SamplingTensors(**arr)))[0, :5]
    np.testing.assert_allclose(got, [1.0, -4.0, 1.0, -1.0, 0.25])  # prompt and output tokens both penalised


def test_presence_frequency_only_on_output_and_by_count():
    x = pad_logits(np.zeros((1, 6), np.float32))
    arr = arrays_for([SP(temperature=0, presence_penalty=0.5, frequency_penalty=0.25)],
                     hist=[[1, 1, 2, 3, 3, 3, 1]], out_start=[3], R=R_STD)  # prompt [1,1,2], output [3,3,3,1]
    got = np.asarray(_penalize(x, SamplingTensors(**arr)))[0, :6]
    np.testing.assert_allclose(got, [0, -0.75, 0, -1.25, 0, 0])


def test_greedy_uses_penalised_logits_and_logprobs_use_raw():
    rng = np.random.default_rng(12)
    for _ in range(4):
        x, hists, starts, params = _penalty_case(rng)
        for p in params:
            p.logprobs = 2
        res = run(x, params, hist=hists, out_start=starts)
        lsm = x - np.log(np.exp(x - x.max(1, keepdims=True)).sum(1, keepdims=True)) - x.max(1, keepdims=True)
        for i, p in enumerate(params):
            ref = ref_penalize(x[i], hists[i], starts[i], p.repetition_penalty, p.presence_penalty,
                               p.frequency_penalty)
            assert res.tokens[i] == ref.argmax()
            np.testing.assert_allclose(res.logprob[i], lsm[i, res.tokens[i]], rtol=1e-5, atol=1e-5)


def test_penalties_change_the_sampled_distribution():
    l = np.zeros(8, np.float32)
    l[:4] = 1.0
    params = SP(temperature=1.0, repetition_penalty=3.0, frequency_penalty=0.5)
    n = N_DRAW
    toks = run(np.broadcast_to(l, (n, 8)), [params] * n, hist=[[0, 1, 1, 5]] * n, out_start=[1] * n,
               seeds=list(range(n))).tokens
    assert_matches(toks, softmax(ref_penalize(l, [0, 1, 1, 5], 1, 3.0, 0.0, 0.5)))


# ------------------------------------------------------------------------------------------------ banned ids


def test_banned_ids_never_sampled():
    rng = np.random.default_rng(13)
    V, n = 16, N_DRAW
    l = rand_logits(rng, 1, V)[0]
    ban = [int(l.argmax()), 3, 7]
    l[ban] += 20.0  # they would win almost always
    toks = draw(l, SP(temperature=1.0), n=n, banned=[ban] * n)
    assert not set(toks.tolist()) & set(ban)
    assert_matches(toks, softmax(ref_penalize(l, [], 0, banned=ban)))
    greedy = run(np.broadcast_to(l, (4, V)), [SP(temperature=0)] * 4, banned=[ban] * 4).tokens
    assert (greedy == ref_penalize(l, [], 0, banned=ban).argmax()).all()


def test_padding_in_banned_and_history_is_ignored():
    x = rand_logits(np.random.default_rng(14), 2, 16)
    res = run(x, [SP(temperature=0, repetition_penalty=1.5)] * 2, hist=[[], [int(x[1].argmax())]], banned=[[], []])
    assert res.tokens[0] == x[0].argmax()
    assert res.tokens[1] == ref_penalize(x[1], [int(x[1].argmax())], 0, 1.5).argmax()


# ------------------------------------------------------------------------------------------------ randomness


def test_same_seed_and_step_same_token_regardless_of_batch():
    rng = np.random.default_rng(15)
    V, n = V_STD, 24
    logits = rand_logits(rng, n, V, scale=0.7)  # flat enough that tokens vary
    kinds = [SP(temperature=1.0), SP(temperature=0.7, top_p=0.8), SP(temperature=1.2, top_k=10, min_p=0.05),
             SP(temperature=1.0, repetition_penalty=1.3, presence_penalty=0.3)]
    params = [kinds[i % 4] for i in range(n)]
    seeds = rng.integers(0, 2**31, n).tolist()
    steps = rng.integers(0, 1000, n).tolist()
    hist = [rng.integers(0, V, 5).tolist() for _ in range(n)]
    a = run(logits, params, seeds=seeds, steps=steps, hist=hist, out_start=[2] * n).tokens

    # the same rows, shuffled into a bigger batch among unrelated rows, then processed in other row chunks
    R = 64
    pos = rng.permutation(R)[:n]
    big = rand_logits(rng, R, V)
    bparams = [SP(temperature=float(rng.choice([0.0, 0.5, 1.5])), top_p=float(rng.choice([1.0, 0.3])),
                  top_k=int(rng.choice([0, 2])), frequency_penalty=0.5) for _ in range(R)]
    bseeds, bsteps = rng.integers(0, 2**31, R).tolist(), rng.integers(0, 1000, R).tolist()
    bhist, bstart = [rng.integers(0, V, 7).tolist() for _ in range(R)], [3] * R
    for j, i in enumerate(pos):
        big[i], bparams[i], bseeds[i], bsteps[i], bhist[i], bstart[i] = (logits[j], params[j], seeds[j],
                                                                           steps[j], hist[j], 2)
    for chunk in (None, 1, N_DRAW):
        b = run(big, bparams, seeds=bseeds, steps=bsteps, hist=bhist, out_start=bstart, row_chunk=chunk).tokens
        np.testing.assert_array_equal(b[pos], a)
    assert len(set(a.tolist())) > 5  # the check above compared real random draws, not a constant


def test_key_is_fold_in_of_seed_and_step():
    """Draw 0 of a row is uniform(fold_in(key(seed), step), (MAX_DRAWS + 1,))[0]: reproduce it on the host."""
    l = np.log(np.full(8, 1 / 8)).astype(np.float32)
    seed, step = 1234, 56
    tok = run(l[None], [SP(temperature=1.0)], seeds=[seed], steps=[step]).tokens[0]
    u = float(jax.random.uniform(jax.random.fold_in(jax.random.key(seed), step), (sampler.MAX_DRAWS + 1,))[0])
    assert tok == int(u * 8)


def test_different_seeds_and_steps_differ():
    l = np.zeros(V_STD, np.float32)
    by_seed = draw(l, SP(temperature=1.0))[:256]
    assert len(set(by_seed.tolist())) > 25
    x = np.broadcast_to(l, (256, V_STD))
    by_step = run(x, [SP(temperature=1.0)] * 256, seeds=[5] * 256, steps=list(range(256))).tokens
    assert len(set(by_step.tolist())) > 25
    again = run(x, [SP(temperature=1.0)] * 256, seeds=[5] * 256, steps=list(range(256))).tokens
    assert (by_step != by_seed).mean() > 0.9
    np.testing.assert_array_equal(by_step, again)


# ------------------------------------------------------------------------------------------------ logprobs


def test_logprobs_are_raw_log_softmax_and_top_n():
    rng = np.random.default_rng(16)
    x = rand_logits(rng, 6, V_STD)
    x[2, [5, 9, 30]] = 9.0  # tie among the top: lower id first
    params = [SP(temperature=0, logprobs=3), SP(temperature=1.0, logprobs=0), SP(temperature=0, logprobs=4),
              SP(temperature=0.8, top_k=3, logprobs=2, repetition_penalty=1.5), SP(temperature=0), SP(temperature=1.0)]
    res = run(x, params, nmax=4, hist=[[1, 2, 3]] * 6)
    lsm = x - (np.log(np.exp(x - x.max(1, keepdims=True)).sum(1, keepdims=True)) + x.max(1, keepdims=True))
    for i, p in enumerate(params):
        n = -1 if p.logprobs is None else p.logprobs
        if n < 0:
            assert res.logprob[i] == 0.0
        else:
            np.testing.assert_allclose(res.logprob[i], lsm[i, res.tokens[i]], rtol=1e-5, atol=1e-5)
        order = np.argsort(-x[i], kind="stable")
        m = max(n, 0)
        np.testing.assert_array_equal(res.top_ids[i, :m], order[:m])
        np.testing.assert_allclose(res.top_logprobs[i, :m], lsm[i, order[:m]], rtol=1e-5, atol=1e-5)
        assert (res.top_ids[i, m:] == -1).all() and np.isneginf(res.top_logprobs[i, m:]).all()
    np.testing.assert_array_equal(res.top_ids[2, :3], [5, 9, 30])


def test_no_logprobs_configured():
    x = rand_logits(np.random.default_rng(17), 2, V_STD)
    res = run(x, [SP(temperature=0, logprobs=0)] * 2, nmax=0)
    assert res.top_ids.shape == (2, 0)
    np.testing.assert_allclose(res.logprob, [np.log(softmax(x[i]))[x[i].argmax()] for i in range(2)], rtol=1e-5)


# ------------------------------------------------------------------------------------------------ properties


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          derandomize=True)
@given(data=hst.data())
def test_property_sample_within_reference_kept_set(data):
    """Any mix of parameters: greedy rows give the penalised argmax, random rows never leave the reference kept
    set (top-k exact; top-p and min-p with a 1e-4 / 1e-5 slack for float rounding at an exact boundary), and the
    logprob is the raw log-softmax."""
    V = data.draw(hst.sampled_from([7, 32, 40]), label="V")  # 7 is padded to V_STD; 40 runs as is
    R, H, NB = R_STD, H_STD, NB_STD
    grid = data.draw(hst.lists(hst.integers(-12, 12), min_size=R * V, max_size=R * V), label="logits")
    x = np.array(grid, np.float32).reshape(R, V) / 2
    params, hists, starts, banned, seeds, steps = [], [], [], [], [], []
    for _ in range(R):
        params.append(SP(temperature=data.draw(hst.sampled_from([0.0, 0.5, 1.0, 2.0])),
                         top_k=data.draw(hst.integers(0, V + 1)),
                         top_p=data.draw(hst.sampled_from([0.1, 0.3, 0.5, 0.9, 1.0])),
                         min_p=data.draw(hst.sampled_from([0.0, 0.1, 0.5])),
                         repetition_penalty=data.draw(hst.sampled_from([1.0, 1.5, 0.8])),
                         presence_penalty=data.draw(hst.sampled_from([0.0, 0.5])),
                         frequency_penalty=data.draw(hst.sampled_from([0.0, 0.3])),
                         logprobs=data.draw(hst.sampled_from([None, 0, 2, NMAX]))))
        h = data.draw(hst.lists(hst.integers(0, V - 1), max_size=H))
        hists.append(h)
        starts.append(data.draw(hst.integers(0, len(h))))
        banned.append(data.draw(hst.lists(hst.integers(0, V - 1), max_size=NB, unique=True)))
        seeds.append(data.draw(hst.integers(0, 2**32 - 1)))
        steps.append(data.draw(hst.integers(0, 10_000)))
    res = run(x, params, hist=hists, out_start=starts, banned=banned, seeds=seeds, steps=steps, pad=V != 40)
    for i, p in enumerate(params):
        l = ref_penalize(x[i], hists[i], starts[i], p.repetition_penalty, p.presence_penalty,
                         p.frequency_penalty, banned[i])
        t = int(res.tokens[i])
        if p.temperature == 0:
            assert t == int(np.argmax(l))
        else:
            keep, _ = ref_keep(l, p.temperature, p.top_k, p.top_p, p.min_p, p_tol=1e-4, min_p_tol=1e-5)
            assert keep[t], (i, t, l, p)
        lsm = np.log(softmax(x[i]))
        if p.logprobs is None:
            assert res.logprob[i] == 0
        else:
            np.testing.assert_allclose(res.logprob[i], lsm[t], rtol=1e-5, atol=1e-5)
            order = np.argsort(-x[i], kind="stable")[: p.logprobs]
            np.testing.assert_array_equal(res.top_ids[i, : p.logprobs], order)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(vals=hst.lists(hst.floats(-1e4, 1e4, width=32), min_size=1, max_size=V_STD))
def test_property_greedy_argmax_any_floats(vals):
    x = np.zeros((2, V_STD), np.float32) - 3e38
    x[0, : len(vals)] = vals
    x[1, -len(vals):] = vals
    res = run(x, [SP(temperature=0)] * 2)
    np.testing.assert_array_equal(res.tokens, x.argmax(1))


def test_row_count_mismatch_is_a_clear_error():
    st = SamplingTensors(**arrays_for([SP()] * 4))
    with pytest.raises(ValueError, match="rows"):
        sample(jnp.zeros((8, 16)), st, NMAX)


def test_logprob_of_a_penalised_sampled_token_is_raw():
    """The sampled token's logprob is rebuilt from the pre-penalty value when a penalty changed its logit."""
    x = np.array([[4.0, 1.0, 0.5, 3.9] + [-2.0] * 12], np.float32)
    params = [SP(temperature=0, repetition_penalty=1.01, frequency_penalty=0.01, logprobs=1)]
    res = run(x, params, hist=[[0, 0, 2]], out_start=[1])
    assert res.tokens[0] == 0  # still the argmax after the (mild) penalties
    np.testing.assert_allclose(res.logprob[0], np.log(softmax(x[0]))[0], rtol=1e-6)
    np.testing.assert_array_equal(res.top_ids[0], [0, -1, -1, -1])


def test_row_count_not_a_multiple_of_the_chunk():
    x = rand_logits(np.random.default_rng(21), 6, 16)
    params = [SP(temperature=0), SP(temperature=1.0, top_p=0.5)] * 3
    a = run(x, params, pad=False)
    b = run(x, params, pad=False, row_chunk=6)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.tokens[::2], x[::2].argmax(1))


# ------------------------------------------------------------------------------------------------ logit controls


def test_logit_bias_moves_the_choice_and_logprobs_stay_raw():
    """Greedy follows the biased logits; the reported logprobs are those of the raw distribution (vLLM's
    default), for the sampled token too when the bias changed its logit."""
    rng = np.random.default_rng(3)
    x = rand_logits(rng, 3, 20)
    sps = [SP(temperature=0, logprobs=2, logit_bias={7: 100.0}), SP(temperature=0, logprobs=2,
           logit_bias={int(x[1].argmax()): -100.0}), SP(temperature=0, logprobs=2)]
    res = run(x, sps)
    second = np.argsort(-x[1])[1]
    assert res.tokens.tolist() == [7, second, x[2].argmax()]
    lsm = x - np.log(np.exp(x - x.max(1, keepdims=True)).sum(1, keepdims=True)) - x.max(1, keepdims=True)
    np.testing.assert_allclose(res.logprob, lsm[np.arange(3), res.tokens], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(res.top_ids[:, :2], np.argsort(-x, axis=1)[:, :2])  # raw top-n


def test_token_mask_restricts_greedy_and_random_rows():
    from jaxserve.engine.sampling_inputs import pack_token_mask

    V = 24
    allowed = [2, 5, 17]
    logits = np.linspace(3, 0, V).astype(np.float32)  # id 0 is the raw favourite
    m = pack_token_mask(allowed, V)
    res = run(np.stack([logits, logits]), [SP(temperature=0), SP(temperature=0)], masks=[m, None])
    assert res.tokens.tolist() == [2, 0]  # masked row: the best allowed id; its neighbour untouched
    toks = draw(logits, SP(temperature=1.0), masks=[m] * N_DRAW)
    counts = Counter(toks.tolist())
    assert set(counts) == set(allowed)
    p = softmax(logits[allowed])  # renormalised over the allowed ids
    chi2 = sum((counts[a] - N_DRAW * q) ** 2 / (N_DRAW * q) for a, q in zip(allowed, p))
    assert chi2 < 18.4  # chi-square, 2 degrees of freedom, 99.99%
