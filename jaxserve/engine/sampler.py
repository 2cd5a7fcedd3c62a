"""On-device sampling: runs inside the jitted prefill/decode step (pure jnp/lax, fixed shapes).

Its per-row inputs (`SamplingTensors`) are packed on the host by `sampling_inputs.build_sampling_arrays`.

Pipeline per row (vLLM order):

    raw logits ──▶ logprobs = log_softmax(raw), top-n ids    (the model's distribution: vLLM's default "raw" mode)
         │
         └─▶ penalties (repetition on prompt+output, presence/frequency on output) ─▶ + logit_bias
               ─▶ ids outside the token mask (allowed_token_ids, bad_words) and banned ids = -inf
               ├─▶ greedy rows: argmax (first index on ties)
               └─▶ / temperature ─▶ top-k ─▶ top-p ─▶ min-p ─▶ categorical draw

Exactness. Each filter keeps an *upper set* of the row's values; a group of equal values at the boundary is kept
whole (deterministic, no dependence on sort order):

* top-k keeps every token whose scaled logit is >= the k-th largest (vLLM semantics: more than k survive only on
  an exact tie at the k-th place). For k <= `top_k_cap` (1024) the k-th value comes from a blocked top-k
  (the top blocks of 64 by block maximum, then lax.top_k inside them: exact, and far cheaper than lax.top_k over
  V on CPU) in tiers of width 64 / 256 / 1024 chosen by the batch's largest k; larger k bisects the float's
  ordered bit pattern (exact, <= 32 counting passes; the slow path).
* top-p, on the distribution left by top-k, keeps token i iff the mass of tokens with strictly larger probability
  is < p * Z: the smallest top set with mass >= p. It is sampled by *rejection*: draw from the top-k/min-p
  distribution and accept if the token is in the nucleus (one masked-sum pass). Accepted draws are exactly
  nucleus-distributed, acceptance is >= p, so a row needs <= 1/p draws on average. A row rejected `MAX_DRAWS`
  times finds the nucleus threshold by bisection (exact) and draws once more.
* min-p keeps tokens with prob >= min_p * max prob (exp(s - max) >= min_p), after top-p as in vLLM v0; as a ratio
  test it does not depend on the renormalisation.
* The draw is an inverse CDF with one uniform per row over a three-level hierarchy (groups of 64 leaves of 64
  tokens): block sums, then three 64-wide cumsums. Tokens with zero mass are never returned. Draws resolve mass
  to ~2^-23 of the total (f32 uniform), so tokens with probability below ~1e-7 are mis-weighted.

Randomness: row key = fold_in(key(seed), step); draw a uses uniform(row key, (MAX_DRAWS + 1,))[a]. A row's
sample depends only on its seed, step and logits, not on its position or the other rows of the batch.

Speed (CPU XLA). Batch-wide flags, computed on device, gate every expensive stage with `lax.cond`: an all-greedy
batch costs one block-max pass, a temperature-only batch about one exp pass. On CPU, rows are processed in chunks
of CPU_ROW_CHUNK rows (`lax.map`) so each [rows, V] intermediate stays in cache: XLA:CPU materialises the producer
of every reduction, and one [32, 262144] temporary (32 MB) is several times slower than 8 chunks of 4 rows.
Whatever a `lax.cond` branch captures is materialised even when the branch is skipped, so [C, V] temporaries are
recomputed inside branches from the operand instead.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

TOP_K_TIERS = (64, 256)  # widths of the blocked top-k tiers below TOP_K_CAP (picked by the batch's largest k)
TOP_K_CAP = 1024  # largest tier; larger k bisects
MAX_DRAWS = 8  # top-p rejection draws before the exact bisection fallback
CPU_ROW_CHUNK = 4  # rows per lax.map step on CPU

_NEG_INF = float("-inf")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplingTensors:
    """Per-row sampling inputs of one step; every field has leading dim R (rows of the bucket).

    temperature        f32[R]     0 = greedy
    top_k              i32[R]     0 = off (k >= V is off too)
    top_p              f32[R]     1 = off
    min_p              f32[R]     0 = off
    repetition_penalty f32[R]     1 = off; applies to tokens of prompt + output
    presence_penalty   f32[R]     0 = off; output tokens
    frequency_penalty  f32[R]     0 = off; output tokens, times their count
    seed               u32[R]
    step               i32[R]     index of the token being sampled within its sequence's output
    history            i32[R, H]  prompt + output ids so far, -1 padded
    output_start       i32[R]     index in `history` of the first generated token
    banned             i32[R, NB] ids forced to -inf this step (min_tokens), -1 padded
    num_logprobs       i32[R]     -1 = none, 0 = sampled token's logprob only, n = also the top-n
    bias_ids           i32[R, NL] logit_bias ids, -1 padded
    bias               f32[R, NL] their biases (added to the logits)
    token_mask         i32[R, W]  packed allowed ids (bit id % 32 of word id // 32; -1 = all); ids past W * 32
                                  are allowed
    """

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    repetition_penalty: jax.Array
    presence_penalty: jax.Array
    frequency_penalty: jax.Array
    seed: jax.Array
    step: jax.Array
    history: jax.Array
    output_start: jax.Array
    banned: jax.Array
    num_logprobs: jax.Array
    bias_ids: jax.Array
    bias: jax.Array
    token_mask: jax.Array


FIELDS = tuple(f.name for f in dataclasses.fields(SamplingTensors))
MATRIX_FIELDS = ("history", "banned", "bias_ids", "bias", "token_mask")


class SampleResult(NamedTuple):
    tokens: jax.Array  # i32[R]
    logprob: jax.Array  # f32[R]: log_softmax(raw logits)[token]; 0 for rows with num_logprobs == -1
    top_ids: jax.Array  # i32[R, NMAX]: the num_logprobs most likely ids (raw logits), then -1
    top_logprobs: jax.Array  # f32[R, NMAX]: their logprobs, then -inf


def sample(logits: jax.Array, st: SamplingTensors, max_logprobs: int, *, top_k_cap: int = TOP_K_CAP,
           row_chunk: Optional[int] = None) -> SampleResult:
    """Sample one token per row. logits f32[R, V] (any float dtype; cast to f32). max_logprobs (static) = NMAX.

    row_chunk (static): rows processed together; None = CPU_ROW_CHUNK on the CPU backend, all rows elsewhere.
    """
    logits = jnp.asarray(logits).astype(jnp.float32)
    st = jax.tree.map(jnp.asarray, st)
    R, V = logits.shape
    for name in FIELDS:
        shape = getattr(st, name).shape
        if shape[:1] != (R,) or len(shape) != (2 if name in MATRIX_FIELDS else 1):
            raise ValueError(f"SamplingTensors.{name} has shape {shape}; logits have {R} rows")
    nmax = int(max_logprobs)
    if row_chunk is None:
        row_chunk = CPU_ROW_CHUNK if jax.default_backend() == "cpu" else R
    C = math.gcd(R, max(1, int(row_chunk)))
    fn = lambda x, s: _sample_rows(x, s, nmax, int(top_k_cap))
    if C == R:
        return fn(logits, st)
    G = R // C
    split = lambda a: a.reshape((G, C) + a.shape[1:])

    def chunked(x):
        res = lax.map(lambda a: fn(*a), (split(x), jax.tree.map(split, st)))
        return jax.tree.map(lambda a: a.reshape((R,) + a.shape[2:]), res)

    def plain_greedy(x):  # the whole batch in one argmax pass: no per-chunk slicing
        tok = _argmax(x)[0]
        return SampleResult(tok, jnp.zeros((R,), jnp.float32), jnp.full((R, nmax), -1, jnp.int32),
                            jnp.full((R, nmax), _NEG_INF, jnp.float32))

    simple = (jnp.all(st.temperature <= 0) & jnp.all(st.num_logprobs < 0) & jnp.all(st.banned < 0)
              & jnp.all(st.repetition_penalty == 1) & jnp.all(st.presence_penalty == 0)
              & jnp.all(st.frequency_penalty == 0) & jnp.all(st.bias_ids < 0) & jnp.all(st.token_mask == -1))
    return lax.cond(simple, plain_greedy, chunked, logits)


LEAF = 64  # block width of every two-level scan (argmax, top-k, inverse CDF)


def _leaves(a, fill):
    """[C, V] -> [C, ceil(V / LEAF), LEAF], padding the last block with `fill`."""
    C, V = a.shape
    Vp = -(-V // LEAF) * LEAF
    if Vp != V:
        a = jnp.pad(a, ((0, 0), (0, Vp - V)), constant_values=fill)
    return a.reshape(C, Vp // LEAF, LEAF)


def _take(a, idx):
    return jnp.take_along_axis(a, idx[:, None], axis=1)[:, 0]


def _first_max(a):
    """(first index of the row max, row max) with two plain reduces (XLA:CPU's variadic argmax is slow)."""
    n = a.shape[1]
    m = jnp.max(a, axis=1)
    i = jnp.min(jnp.where(a == m[:, None], jnp.arange(n, dtype=jnp.int32)[None, :], n), axis=1)
    return jnp.minimum(i, n - 1), m


def _argmax(l):
    """First index of the row max, the max, and the LEAF-block maxima [C, NB]."""
    lb = _leaves(l, _NEG_INF)
    bm = lax.optimization_barrier(jnp.max(lb, axis=2))  # else XLA folds max(max(.)) into a second full pass
    b, m = _first_max(bm)
    j, _ = _first_max(jnp.take_along_axis(lb, b[:, None, None], axis=1)[:, 0])
    return b * LEAF + j, m, bm


def _top_k_blocked(a, bm, k: int, sort_ids: bool = True):
    """Exactly the k largest values of each row (descending) and their ids, like lax.top_k(a, k), from the k
    LEAF-blocks with the largest maxima (bm = block maxima of a). Every value above the k-th largest block
    maximum lives in one of those blocks, so the values are exact; among ids tied at the k-th value the choice
    is deterministic (lowest block first) but not always the lowest id."""
    C, V = a.shape
    nb = bm.shape[1]
    if 4 * k * LEAF > V or k >= nb:
        v, i = lax.top_k(a, k)
        return v, i.astype(jnp.int32)
    _, blk = lax.top_k(bm, k)
    blk = blk.astype(jnp.int32)
    if sort_ids:  # ascending ids inside the gathered slab: lax.top_k then prefers lower ids among ties
        blk = jnp.sort(blk, axis=1)
    g = jnp.take_along_axis(_leaves(a, _NEG_INF), blk[:, :, None], axis=1).reshape(C, k * LEAF)
    v, j = lax.top_k(g, k)
    ids = jnp.take_along_axis(blk, j // LEAF, axis=1) * LEAF + j % LEAF
    return v, jnp.minimum(ids, V - 1)


def _apply_penalties(x, st: SamplingTensors):
    C, V = x.shape
    H = st.history.shape[1]
    rows = jnp.arange(C)[:, None]
    hist = st.history
    valid = (hist >= 0) & (hist < V)
    is_out = valid & (jnp.arange(H)[None, :] >= st.output_start[:, None])
    seen = jnp.zeros((C, V), jnp.bool_).at[rows, jnp.where(valid, hist, V)].set(True, mode="drop")
    cnt = jnp.zeros((C, V), jnp.float32).at[rows, jnp.where(is_out, hist, V)].add(1.0, mode="drop")
    rp = st.repetition_penalty[:, None]
    l = jnp.where(seen, jnp.where(x > 0, x / rp, x * rp), x)
    return l - st.frequency_penalty[:, None] * cnt - st.presence_penalty[:, None] * (cnt > 0)


def _apply_banned(l, banned):
    C, V = l.shape
    idx = jnp.where((banned >= 0) & (banned < V), banned, V)
    return l.at[jnp.arange(C)[:, None], idx].set(_NEG_INF, mode="drop")


def _apply_bias(l, bias_ids, bias):
    C, V = l.shape
    idx = jnp.where((bias_ids >= 0) & (bias_ids < V), bias_ids, V)
    return l.at[jnp.arange(C)[:, None], idx].add(bias, mode="drop")


def _allowed(token_mask, V):
    """bool[C, V] from packed int32[C, W] masks (ids past W * 32 allowed)."""
    C, W = token_mask.shape
    bits = (token_mask[:, :, None] >> jnp.arange(32, dtype=jnp.int32)[None, None, :]) & 1
    bits = bits.reshape(C, W * 32).astype(jnp.bool_)
    if W * 32 >= V:
        return bits[:, :V]
    return jnp.pad(bits, ((0, 0), (0, V - W * 32)), constant_values=True)


def _apply_mask(l, token_mask):
    return jnp.where(_allowed(token_mask, l.shape[1]), l, _NEG_INF)


def penalize(logits, st: SamplingTensors):
    """The logits greedy/random sampling works on: penalties, logit_bias, the token mask and banned ids applied
    (unconditional version of what `sample` does behind its batch-wide flags). f32[R, V]."""
    x = jnp.asarray(logits).astype(jnp.float32)
    st = jax.tree.map(jnp.asarray, st)
    l = _apply_bias(_apply_penalties(x, st), st.bias_ids, st.bias)
    return _apply_banned(_apply_mask(l, st.token_mask), st.banned)


def _ordered_u32(x):
    """Monotone map f32 -> u32 (a < b  =>  key(a) < key(b); -0 sits just below +0)."""
    b = lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(b >> 31 == 1, ~b, b | jnp.uint32(0x80000000))


def _from_ordered_u32(k):
    b = jnp.where(k >= jnp.uint32(0x80000000), k ^ jnp.uint32(0x80000000), ~k)
    return lax.bitcast_convert_type(b, jnp.float32)


def _bisect_max_key(keys, weights, target, lo, hi):
    """Per row, the largest key κ in [lo, hi) with sum(weights[keys >= κ]) >= target, assuming that holds at
    lo and fails at hi (rows with hi - lo <= 1 are left alone). keys u32[C, V] or i32 (nonneg), weights [C, V]."""

    def cond(c):
        lo, hi = c
        return jnp.any(hi - lo > 1)

    def body(c):
        lo, hi = c
        mid = lo + (hi - lo) // 2
        f = jnp.sum(jnp.where(keys >= mid[:, None], weights, jnp.zeros((), weights.dtype)), axis=1)
        ok = f >= target
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, _ = lax.while_loop(cond, body, (lo, hi))
    return lo


def _topk_threshold(s, bm, k, k_on, cap):
    """Exact k-th largest value per row (-inf where k_on is False). bm: LEAF-block maxima of s.

    The tier is picked at run time by the largest k in the batch: the k-th value is read off a blocked top-k of
    width 64, 256 or cap (cost grows with the width); larger k bisects. All exact."""
    C, V = s.shape
    caps = sorted({min(c, V) for c in TOP_K_TIERS + (cap,) if c <= cap})

    def tier(kc, last):
        def fn(s):
            vals, _ = _top_k_blocked(s, bm, kc, sort_ids=False)
            thr = jnp.where(k_on & (k <= kc), _take(vals, jnp.clip(k - 1, 0, kc - 1)), _NEG_INF)
            if not last:
                return thr
            big = k_on & (k > kc)

            def bisect(thr):
                keys = _ordered_u32(s)
                # count(s > vals[kc-1]) < kc < k: one past the kc-th value's key is a valid "too high" bound.
                hi = jnp.where(big, _ordered_u32(vals[:, kc - 1]) + 1, jnp.uint32(1))
                lo = jnp.zeros((C,), jnp.uint32)
                kth = _bisect_max_key(keys, jnp.ones(keys.shape, jnp.int32), k, lo, hi)
                return jnp.where(big, jnp.where(kth == 0, _NEG_INF, _from_ordered_u32(kth)), thr)

            return lax.cond(jnp.any(big), bisect, lambda t: t, thr)
        return fn

    branches = [tier(c, i == len(caps) - 1) for i, c in enumerate(caps)]
    if len(branches) == 1:
        return branches[0](s)
    kmax = jnp.max(jnp.where(k_on, k, 0))
    which = jnp.sum(kmax > jnp.array(caps[:-1], jnp.int32))
    return lax.switch(which, branches, s)


class _Dist(NamedTuple):
    e: jax.Array  # [C, Vp] unnormalised masses (0 = excluded), padded to a multiple of LEAF
    leaf: jax.Array  # [C, NL] sums of LEAF consecutive tokens, padded to a multiple of LEAF
    group: jax.Array  # [C, NG] sums of LEAF consecutive leaves
    cum: jax.Array  # [C, NG] inclusive cumsum of `group`
    total: jax.Array  # [C]


def _dist(e):
    C, V = e.shape
    Vp = -(-V // LEAF) * LEAF
    if Vp != V:
        e = jnp.pad(e, ((0, 0), (0, Vp - V)))
    leaf = lax.optimization_barrier(jnp.sum(e.reshape(C, Vp // LEAF, LEAF), axis=2))  # (see _argmax)
    NL = leaf.shape[1]
    NLp = -(-NL // LEAF) * LEAF
    if NLp != NL:
        leaf = jnp.pad(leaf, ((0, 0), (0, NLp - NL)))
    group = jnp.sum(leaf.reshape(C, NLp // LEAF, LEAF), axis=2)
    cum = jnp.cumsum(group, axis=1)
    return _Dist(e, leaf, group, cum, cum[:, -1])


def _pick(cum, w, target):
    """First i with cum[i] > target among entries with mass (else the last entry with mass), and the cumulative
    mass before it. Robust to a cumsum that is not exactly monotone: only entries with w > 0 are returned."""
    n = cum.shape[1]
    idx = jnp.arange(n, dtype=jnp.int32)[None, :]
    # one max-reduce: entries past the target score 2n - i (the first wins), others with mass score i (the
    # last wins), empty entries -1
    score = jnp.where(w > 0, jnp.where(cum > target[:, None], 2 * n - idx, idx), -1)
    best = jnp.max(score, axis=1)
    i = jnp.where(best >= n, 2 * n - best, jnp.maximum(best, 0))
    prev = jnp.where(i > 0, _take(cum, jnp.maximum(i - 1, 0)), 0.0)
    return i, prev


def _slab(a, start):
    """a[r, start[r] : start[r] + LEAF] for every row r."""
    return jax.vmap(lambda row, s0: lax.dynamic_slice_in_dim(row, s0, LEAF))(a, start)


def _draw(d: _Dist, u):
    """Inverse CDF: the token whose cumulative-mass interval contains u * total, found group -> leaf -> token
    with three 64-wide cumsums. Never a zero-mass token (when total > 0)."""
    target = u * d.total
    g, prev = _pick(d.cum, d.group, target)
    target = target - prev
    lw = _slab(d.leaf, g * LEAF)
    li, prev = _pick(jnp.cumsum(lw, axis=1), lw, target)
    target = target - prev
    leaf = g * LEAF + li
    ew = _slab(d.e, leaf * LEAF)
    j, _ = _pick(jnp.cumsum(ew, axis=1), ew, target)
    return leaf * LEAF + j


def _sample_rows(x, st: SamplingTensors, nmax: int, cap: int) -> SampleResult:
    C, V = x.shape
    sampled = st.temperature > 0
    rows = jnp.arange(C)[:, None]

    # --- logprobs of the raw model distribution (first: x must be dead once the penalties start, see below) ---
    want_lp = st.num_logprobs >= 0

    def lse_fn(x):
        m = jnp.max(x, axis=1)
        ms = jnp.where(jnp.isfinite(m), m, 0.0)
        return ms + jnp.log(jnp.sum(jnp.exp(x - ms[:, None]), axis=1))

    lse = lax.cond(jnp.any(want_lp), lse_fn, lambda a: jnp.zeros((C,), jnp.float32), x)
    if nmax > 0:
        n_top = min(nmax, V)

        def top_fn(x):
            v, i = _top_k_blocked(x, jnp.max(_leaves(x, _NEG_INF), axis=2), n_top)
            return i, v - lse[:, None]

        top_ids, top_lp = lax.cond(jnp.any(st.num_logprobs > 0), top_fn,
                                   lambda a: (jnp.full((C, n_top), -1, jnp.int32),
                                              jnp.full((C, n_top), _NEG_INF, jnp.float32)), x)
        if n_top < nmax:
            top_ids = jnp.pad(top_ids, ((0, 0), (0, nmax - n_top)), constant_values=-1)
            top_lp = jnp.pad(top_lp, ((0, 0), (0, nmax - n_top)), constant_values=_NEG_INF)
        col_on = jnp.arange(nmax)[None, :] < st.num_logprobs[:, None]
        top_ids = jnp.where(col_on, top_ids, -1)
        top_lp = jnp.where(col_on, top_lp, _NEG_INF)
    else:
        top_ids = jnp.zeros((C, 0), jnp.int32)
        top_lp = jnp.zeros((C, 0), jnp.float32)

    # --- penalties and banned ids (on raw logits) ---
    # The "off" branches return their operand unchanged. For XLA to alias instead of copying [C, V], nothing may
    # read x after these conds: the raw logit of the sampled token is rebuilt from l plus the original values of
    # the (few) ids the conds may have changed, gathered here.
    pen_on = (st.repetition_penalty != 1) | (st.presence_penalty != 0) | (st.frequency_penalty != 0)
    hist_ids = jnp.clip(st.history, 0, V - 1)
    ban_ids = jnp.clip(st.banned, 0, V - 1)
    x_hist = lax.cond(jnp.any(pen_on), lambda a: a[rows, hist_ids],
                      lambda a: jnp.zeros(hist_ids.shape, jnp.float32), x)
    x_ban = x[rows, ban_ids]
    bias_on = st.bias_ids >= 0
    x_bias = x[rows, jnp.clip(st.bias_ids, 0, V - 1)]
    # every other read of x feeds the predicate, so XLA must schedule them first (NaN logits merely take the
    # penalty branch, which is exact for rows without penalties)
    after = (jnp.any(jnp.isnan(lse)) | jnp.any(jnp.isnan(top_lp)) | jnp.any(jnp.isnan(x_hist))
             | jnp.any(jnp.isnan(x_ban)) | jnp.any(jnp.isnan(x_bias)))
    l = lax.cond(jnp.any(pen_on) | after, lambda a: _apply_penalties(a, st), lambda a: a, x)
    l = lax.cond(jnp.any(bias_on), lambda a: _apply_bias(a, st.bias_ids, st.bias), lambda a: a, l)
    l = lax.cond(jnp.any(st.token_mask != -1), lambda a: _apply_mask(a, st.token_mask), lambda a: a, l)
    l = lax.cond(jnp.any(st.banned >= 0), lambda a: _apply_banned(a, st.banned), lambda a: a, l)
    greedy_tok, lmax, bm = _argmax(l)

    # --- random rows ---
    tok = lax.cond(jnp.any(sampled), lambda a: _sample_random(a, lmax, bm, greedy_tok, st, cap),
                   lambda a: greedy_tok, l)

    # raw logit of the sampled token: l[tok], unless a penalty or the ban changed it (every match of tok in
    # x_hist / x_ban holds the same original value, so a max picks it)
    def original(ids, vals, valid):
        hit = (ids == tok[:, None]) & valid
        return jnp.any(hit, axis=1), jnp.max(jnp.where(hit, vals, _NEG_INF), axis=1)

    raw = _take(l, tok)
    in_ban, ban_val = original(st.banned, x_ban, st.banned >= 0)
    raw = jnp.where(in_ban, ban_val, raw)
    in_bias, bias_val = original(st.bias_ids, x_bias, bias_on)
    raw = jnp.where(in_bias, bias_val, raw)
    raw = lax.cond(jnp.any(pen_on), lambda r: jnp.where(*original(st.history, x_hist, pen_on[:, None]), r),
                   lambda r: r, raw)
    logprob = jnp.where(want_lp, raw - lse, 0.0)
    return SampleResult(tok, logprob, top_ids, top_lp)


def _sample_random(l, lmax, bm, greedy_tok, st: SamplingTensors, cap: int):
    C, V = l.shape
    sampled = st.temperature > 0
    T = jnp.where(sampled, st.temperature, 1.0)
    m = lmax / T  # == max(l / T): division by T > 0 is monotone, also after rounding (same for block maxima)
    # NB: [C, V] temporaries are recomputed from l inside branches rather than captured: whatever a cond or loop
    # captures is materialised even when the branch is not taken.

    # top-k threshold on the scaled logits
    k = st.top_k
    k_on = sampled & (k > 0) & (k < V)
    thr = lax.cond(jnp.any(k_on), lambda a: _topk_threshold(a / T[:, None], bm / T[:, None], k, k_on, cap),
                   lambda a: jnp.full((C,), _NEG_INF, jnp.float32), l)
    min_p = jnp.where(sampled, st.min_p, 0.0)

    def masses(l, with_min_p):
        s = l / T[:, None]
        ek = jnp.exp(s - m[:, None])  # the max element -> exactly 1
        keep = s >= thr[:, None]
        if with_min_p:
            keep = keep & (ek >= min_p[:, None])
        return jnp.where(keep, ek, 0.0)

    e = masses(l, True)
    d = _dist(e)
    valid = sampled & (d.total > 0) & jnp.isfinite(d.total)

    # all uniforms a row can need, from its own key: u[:, a] feeds draw a (a = MAX_DRAWS: the exact fallback)
    us = jax.vmap(lambda sd, stp: jax.random.uniform(jax.random.fold_in(jax.random.key(sd), stp),
                                                     (MAX_DRAWS + 1,)))(st.seed, st.step)

    def uniform(a):
        return lax.dynamic_index_in_dim(us, a, axis=1, keepdims=False)

    # Draw; rows with top-p keep a draw only if it lies in the nucleus (rejection), else draw again.
    p = st.top_p
    p_on = valid & (p < 1)

    def nucleus_target(_):
        # p times the mass of the top-k set (min-p removed nothing from it on rows with min_p == 0)
        zk = lax.cond(jnp.any(p_on & (min_p > 0)), lambda a: jnp.sum(masses(a, False), axis=1),
                      lambda a: d.total, l)
        return p * jnp.where(min_p > 0, zk, d.total)

    target = lax.cond(jnp.any(p_on), nucleus_target, lambda _: jnp.zeros((C,), jnp.float32), l)

    def in_nucleus(t):  # the mass of strictly more likely tokens is < p * Z
        et = _take(e, t)
        return jnp.sum(jnp.where(e > et[:, None], e, 0.0), axis=1) < target

    def more(c):
        a, _, done = c
        return (a < MAX_DRAWS) & jnp.any(~done)

    def draw_again(c):
        a, tok, done = c
        t = _draw(d, uniform(a))
        tok = jnp.where(done, tok, t)
        check = p_on & ~done
        ok = lax.cond(jnp.any(check), in_nucleus, lambda t: jnp.ones((C,), jnp.bool_), t)
        return a + 1, tok, done | ~check | ok

    _, tok, done = lax.while_loop(more, draw_again, (jnp.int32(0), greedy_tok, ~valid))

    def exact(tok):  # rows rejected MAX_DRAWS times: the nucleus threshold by bisection, then one draw
        ebits = lax.bitcast_convert_type(e, jnp.int32)  # e >= 0: its bits are monotone
        need = ~done
        lo = jnp.zeros((C,), jnp.int32)
        hi = jnp.where(need, lax.bitcast_convert_type(jnp.float32(1.0), jnp.int32) + 1, 1)
        tau = _bisect_max_key(ebits, e, target, lo, hi)
        d3 = _dist(jnp.where(ebits >= tau[:, None], e, 0.0))
        return jnp.where(need, _draw(d3, uniform(MAX_DRAWS)), tok)

    tok = lax.cond(jnp.any(~done), exact, lambda t: t, tok)
    return jnp.where(valid, tok, greedy_tok)


def target_logprobs(logits: jax.Array, targets: jax.Array, nmax: int):
    """Prompt logprobs of rows of logits f32[N, V]: (log_softmax(raw)[targets] f32[N], the nmax most likely ids
    i32[N, nmax] and their logprobs f32[N, nmax]), with the sampler's own log-softmax and top-n (the raw model
    distribution, like `sample`'s logprobs)."""
    x = jnp.asarray(logits).astype(jnp.float32)
    N, V = x.shape
    m = jnp.max(x, axis=1)
    ms = jnp.where(jnp.isfinite(m), m, 0.0)
    lse = ms + jnp.log(jnp.sum(jnp.exp(x - ms[:, None]), axis=1))
    target = _take(x, jnp.clip(targets, 0, V - 1)) - lse
    n_top = min(int(nmax), V)
    if n_top == 0:
        return target, jnp.zeros((N, 0), jnp.int32), jnp.zeros((N, 0), jnp.float32)
    v, i = _top_k_blocked(x, jnp.max(_leaves(x, _NEG_INF), axis=2), n_top)
    top_ids, top_lp = i, v - lse[:, None]
    if n_top < nmax:
        top_ids = jnp.pad(top_ids, ((0, 0), (0, nmax - n_top)), constant_values=-1)
        top_lp = jnp.pad(top_lp, ((0, 0), (0, nmax - n_top)), constant_values=_NEG_INF)
    return target, top_ids, top_lp
