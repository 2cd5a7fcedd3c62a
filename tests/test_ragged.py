"""The ragged step (models/ragged.py): its input builder (properties over random mixes of decodes, chunks and
short rows) and its forward against the cache-free reference on mixed steps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxserve.config import get_preset
from jaxserve.models.kv_cache import init_kv_cache
from jaxserve.models.ragged import build_ragged_inputs, forward_ragged, tile_size
from jaxserve.models.ragged_layout import TILE, is_chunk, ragged_layout, ragged_size
from jaxserve.models.reference import reference_forward
from jaxserve.models.transformer import lm_head
from jaxserve.weights.random_init import random_params


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@st.composite
def _rows(draw):
    """Random rows: (new tokens, start position, block tables per group, samples), distinct pages per row."""
    groups = draw(st.sampled_from([1, 2]))
    page_size = draw(st.sampled_from([1, 4, 16]))
    n_rows = draw(st.integers(1, 8))
    kinds = draw(st.lists(st.sampled_from(["decode", "chunk", "short", "verify"]), min_size=n_rows,
                          max_size=n_rows))
    rows, next_page = [], 1
    for kind in kinds:
        n = {"decode": 1, "chunk": draw(st.integers(TILE // 2, 70)), "short": draw(st.integers(2, TILE // 2 - 1)),
             "verify": draw(st.integers(2, 5))}[kind]
        start = draw(st.integers(0, 40))
        pages = -(-(start + n) // page_size)
        tables = []
        for _ in range(groups):
            tables.append(list(range(next_page, next_page + pages)))
            next_page += pages
        toks = draw(st.lists(st.integers(0, 500), min_size=n, max_size=n))
        rows.append((toks, start, tuple(tables) if groups > 1 else tables[0], draw(st.booleans())))
    return rows, groups, page_size


@settings(max_examples=150, deadline=None)
@given(_rows(), st.integers(0, 2))
def test_builder_places_every_token(case, extra):
    rows, groups, ps = case
    num_new = [len(r[0]) for r in rows]
    size = ragged_size(num_new)
    T = _pow2(size) << extra
    S = len(rows) + extra
    P = max(len(r[2][0] if groups > 1 else r[2]) for r in rows) + extra
    inp = build_ragged_inputs(rows, T, S, P, ps, groups=groups if groups > 1 else None)
    order, offsets, span = ragged_layout(num_new)
    assert span == size <= T
    slots = inp.slots if groups > 1 else inp.slots[None]
    tables = inp.block_tables if groups > 1 else inp.block_tables[None]
    owner = np.full(T, -1)
    for i, (toks, start, bt, _) in enumerate(rows):
        n, off = len(toks), offsets[i]
        assert (owner[off:off + n] == -1).all()  # no two rows share a token
        owner[off:off + n] = i
        np.testing.assert_array_equal(inp.tokens[off:off + n], toks)
        pos = np.arange(start, start + n)
        np.testing.assert_array_equal(inp.positions[off:off + n], pos)
        assert (inp.rows[off:off + n] == i).all()
        assert inp.kv_lens[i] == start + n
        for g, t in enumerate(bt if groups > 1 else (bt,)):
            np.testing.assert_array_equal(tables[g, i, :len(t)], t)
            # every token's cache slot is its position's page and offset in that row's table
            np.testing.assert_array_equal(slots[g, off:off + n], np.asarray(t)[pos // ps] * ps + pos % ps)
        if is_chunk(n):
            assert off % TILE == 0  # chunks start on a tile
    pad = owner == -1
    assert (inp.positions[pad] == -1).all() and (slots[:, pad] == 0).all()  # padding: no position, null slot
    # tiles: a chunk tile holds one row's tokens (or padding); every other tile is token by token
    ts = tile_size(T)
    assert inp.tile_rows.shape == (T // ts,)
    for t, r in enumerate(inp.tile_rows):
        own = owner[t * ts:(t + 1) * ts]
        if r >= 0:
            assert set(own[own >= 0]) == {r} and is_chunk(num_new[r]) and T >= TILE
        else:
            assert not any(is_chunk(num_new[o]) for o in own[own >= 0]) or T < TILE
    # sample_idx: the sampling rows' last tokens, in row order
    want = [offsets[i] + len(r[0]) - 1 for i, r in enumerate(rows) if r[3]]
    np.testing.assert_array_equal(inp.sample_idx[:len(want)], want)
    assert (inp.sample_idx[len(want):] == 0).all()


def test_builder_refuses_what_does_not_fit():
    rows = [([1] * 20, 0, [1, 2, 3, 4, 5], True)]
    with pytest.raises(ValueError, match="span"):
        build_ragged_inputs(rows, 16, 4, 8, 4)
    with pytest.raises(ValueError, match="rows"):
        build_ragged_inputs(rows * 2, 64, 1, 8, 4)
    with pytest.raises(ValueError, match="pages"):
        build_ragged_inputs(rows, 32, 1, 2, 4)
    # a grouped KV layout of one page group (every layer sliding, e.g. Mistral) keeps its group axis
    one = build_ragged_inputs(rows, 32, 2, 8, 4, groups=1)
    assert one.block_tables.shape == (1, 2, 8) and one.slots.shape == (1, 32)


# ----------------------------------------------------------------------------------------------------------------
# The forward on mixed steps against the cache-free reference
# ----------------------------------------------------------------------------------------------------------------


class _Pages:
    """Hands out distinct pages per sequence and group, as the block manager would."""

    def __init__(self, groups, page_size):
        self.groups, self.ps, self.next, self.tables = groups, page_size, 1, {}

    def table(self, sid, length):
        tabs = self.tables.setdefault(sid, [[] for _ in range(self.groups)])
        for t in tabs:
            while len(t) * self.ps < length:
                t.append(self.next)
                self.next += 1
        return tuple(list(t) for t in tabs) if self.groups > 1 else list(tabs[0])


@pytest.mark.parametrize("model,grouped", [("tiny-llama", False), ("tiny-gemma3", False), ("tiny-gemma3", True)])
def test_mixed_steps_match_the_reference(model, grouped):
    cfg = get_preset(model)
    params = jax.tree.map(jnp.asarray, random_params(cfg, seed=3))
    layout = cfg.kv_layout(True) if grouped else None
    G = layout.num_groups if grouped and layout.grouped else 1
    ps, P, bp = 4, 32, 2
    kv = init_kv_cache(cfg, 400, ps, jnp.float32, rows=layout.width if grouped and layout.grouped else None)
    pages = _Pages(G, ps)
    rng = np.random.default_rng(0)
    seqs = {s: list(rng.integers(3, cfg.vocab_size, size=n)) for s, n in enumerate([37, 3, 1, 20, 9])}
    done = {s: 0 for s in seqs}
    # steps of (sequence, new tokens): chunks, packed short rows and decodes mixed, chunk tails of any length
    plan = [
        [(0, 16), (1, 3), (2, 1), (3, 9)],
        [(0, 21), (1, 1), (2, 1), (3, 11), (4, 9)],
        [(1, 1), (2, 1), (3, 1), (4, 1), (0, 1)],
        [(0, 1), (4, 1)],
    ]
    fn = jax.jit(lambda params, kv, inp: forward_ragged(cfg, params, kv, inp, page_size=ps, block_pages=bp,
                                                        kv_layout=layout if grouped else None))
    for step in plan:
        entries = []
        for s, n in step:
            if done[s] + n > len(seqs[s]):  # decoding: extend the sequence with a token of its own
                seqs[s].append(int(rng.integers(3, cfg.vocab_size)))
            entries.append((seqs[s][done[s]:done[s] + n], done[s], pages.table(s, done[s] + n), True))
        T = _pow2(ragged_size([len(e[0]) for e in entries]))
        inp = build_ragged_inputs(entries, T, 8, P, ps, groups=G if grouped and layout.grouped else None)
        last, kv, hidden = fn(params, kv, jax.tree.map(jnp.asarray, inp))
        _, offsets, _ = ragged_layout([len(e[0]) for e in entries])
        got_last = lm_head(cfg, params, last[:len(entries)])
        got_all = lm_head(cfg, params, hidden)
        for i, (s, n) in enumerate(step):
            ref = reference_forward(cfg, params, seqs[s][:done[s] + n])  # [positions, V]
            np.testing.assert_allclose(got_last[i], ref[-1], atol=2e-4, rtol=2e-4)
            np.testing.assert_allclose(got_all[offsets[i]:offsets[i] + n], ref[done[s]:], atol=2e-4, rtol=2e-4)
            done[s] += n


# ----------------------------------------------------------------------------------------------------------------
# The scheduler's ragged steps (no model) and the engine on them
# ----------------------------------------------------------------------------------------------------------------


def _ragged_scheduler(num_pages=400, budget=64, max_seqs=8, prefix=False):
    from jaxserve.config import EngineConfig
    from jaxserve.engine.scheduler import Scheduler

    cfg = EngineConfig(page_size=4, max_num_seqs=max_seqs, max_num_batched_tokens=budget,
                       enable_prefix_caching=prefix)
    sch = Scheduler(cfg, num_pages)
    sch.ragged_ladder = [1 << i for i in range(8)]  # 1..128
    return sch


def _seq(i, n_prompt, out, rng):
    from jaxserve.engine.request import Priority, Sequence
    from jaxserve.sampling_params import SamplingParams

    return Sequence(i, str(i), 0, [int(t) for t in rng.integers(3, 500, n_prompt)],
                    SamplingParams(max_tokens=out, ignore_eos=True), 0, Priority.INTERACTIVE, (), 4096)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 300), st.integers(1, 20)), min_size=1, max_size=12),
       st.sampled_from([64, 128]), st.sampled_from([60, 400]))
def test_ragged_schedule_decodes_first_within_budget(reqs, budget, num_pages):
    """Every mixed step: each decoding sequence that fits gets its token (a long prompt never stalls them), the
    layout stays within max_num_batched_tokens and the step's T, a chunk cut short ends on a tile; everything
    finishes (with preemption when pages are short)."""
    import time

    from jaxserve.engine.request import SampledToken

    rng = np.random.default_rng(len(reqs))
    sch = _ragged_scheduler(num_pages=num_pages, budget=budget)
    seqs = [_seq(i, n, out, rng) for i, (n, out) in enumerate(reqs)]
    if any(-(-(n + o) // 4) > num_pages - 1 for n, o in reqs):
        return  # (a request larger than the whole cache is refused at admission by the engine)
    for s in seqs:
        sch.add(s)
    tok = SampledToken(5, 0.0, (), ())
    for _ in range(5000):
        if not sch.has_work():
            break
        decoding = [s for s in sch.running if not s.in_prefill]
        out = sch.schedule()
        assert out is not None and out.kind == "mixed"
        sizes = [r.num_new for r in out.rows]
        size = ragged_size(sizes)
        assert size <= max(budget, len(decoding)) and out.bucket[1] >= size and out.bucket[1] in sch.ragged_ladder
        scheduled = {r.seq.seq_id for r in out.rows}
        left = [s for s in decoding if s.status.name == "RUNNING" and s.seq_id not in scheduled]
        assert not left, "a decoding sequence was left out of a ragged step"
        for r in out.rows:
            if r.num_new > 1 and r.start + r.num_new < r.seq.num_tokens and is_chunk(r.num_new):
                assert r.num_new % TILE == 0, "a chunk cut short must end on a tile"
        sch.update(out, [[tok] if r.samples else [] for r in out.rows], time.monotonic())
    assert not sch.has_work() and all(s.finished for s in seqs)
    assert all(len(s.output_token_ids) == out for s, (_, out) in zip(seqs, reqs))


def _mixed_prompts(vocab, seed=0):
    rng = np.random.default_rng(seed)
    shared = [int(t) for t in rng.integers(3, vocab, 24)]  # a prefix-cache hit for the requests that share it
    lens = [5, 40, 1, 130, 17, 9, 70, 3, 2, 33]
    return [(shared if i % 3 == 0 else []) + [int(t) for t in rng.integers(3, vocab, n)] for i, n in enumerate(lens)]


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gemma3"])
def test_engine_ragged_steps_match_bucketed(llm_factory, model):
    """Greedy tokens of a mixed batch (prompts of 1 to 154 tokens, a shared prefix, outputs of several lengths) are
    the same whether the engine runs ragged or bucketed steps; the ragged engine really mixed decodes and
    chunks, computed no (R, Q) program and compiled nothing while serving."""
    from jaxserve import SamplingParams
    from jaxserve.engine.runner import compile_count
    from tests.conftest import TINY_KW

    ragged = llm_factory(model, **TINY_KW, step_mode="ragged")
    buckets = llm_factory(model, **TINY_KW, step_mode="buckets")
    assert ragged.engine.ragged and not buckets.engine.ragged and not ragged.engine.runner.programs
    prompts = _mixed_prompts(ragged.model_config.vocab_size)
    sps = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in [20, 3, 30, 8, 12, 1, 25, 6, 9, 14]]
    mixed0 = ragged.engine.stats.mixed_steps
    before = compile_count()
    got = [o.outputs[0].token_ids for o in ragged.generate(prompts, sps)]
    assert compile_count() == before
    want = [o.outputs[0].token_ids for o in buckets.generate(prompts, sps)]
    assert got == want
    assert ragged.engine.stats.mixed_steps > mixed0
    m = ragged.engine.metrics()
    assert m["step_mode"] == "ragged" and m["mixed_steps"] > mixed0 and m["prompt_padding_ratio"] >= 1.0
    assert buckets.engine.metrics()["step_mode"] == "buckets"


def test_engine_ragged_preemption_and_sampling(llm_factory):
    """Few pages: sequences are preempted and recomputed inside ragged steps; greedy tokens equal a roomy bucketed
    engine's, and seeded sampling is reproducible (the sampler sees the same rows, counters and seeds)."""
    from jaxserve import SamplingParams
    from tests.conftest import TINY_KW

    tight = llm_factory("tiny-llama", **{**TINY_KW, "num_pages": 64}, step_mode="ragged")
    roomy = llm_factory("tiny-llama", **TINY_KW, step_mode="buckets")
    prompts = _mixed_prompts(512, seed=2)[:6]
    sps = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    p0 = tight.engine.scheduler.num_preemptions
    got = [o.outputs[0].token_ids for o in tight.generate(prompts, sps)]
    assert tight.engine.scheduler.num_preemptions > p0
    assert got == [o.outputs[0].token_ids for o in roomy.generate(prompts, sps)]
    seeded = [SamplingParams(temperature=0.9, top_p=0.9, seed=7 + i, max_tokens=12) for i in range(len(prompts))]
    a = [o.outputs[0].token_ids for o in roomy.generate(prompts, seeded)]
    ragged = llm_factory("tiny-llama", **TINY_KW, step_mode="ragged")
    assert [o.outputs[0].token_ids for o in ragged.generate(prompts, seeded)] == a


def test_step_mode_config_errors():
    from jaxserve import LLM
    from jaxserve.errors import InvalidConfigError
    from tests.conftest import TINY_KW

    with pytest.raises(InvalidConfigError, match="step_mode"):
        LLM("tiny-llama", random_weights=True, **TINY_KW, step_mode="flat")
    with pytest.raises(InvalidConfigError, match="static"):
        LLM("tiny-llama", random_weights=True, **TINY_KW, step_mode="ragged", scheduler="static")
    from jaxserve.config import EngineConfig

    with pytest.raises(InvalidConfigError, match="token_bucket_step"):
        EngineConfig(token_bucket_step=48).validate(get_preset("tiny-llama"))
    with pytest.raises(InvalidConfigError, match="batch_invariant"):
        LLM("tiny-llama", random_weights=True, **TINY_KW, step_mode="ragged", batch_invariant=True)
