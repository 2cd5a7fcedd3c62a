"""Sliding-window KV reclaim (config.KVLayout, BlockManager page groups, issue 19).

The block manager's page groups: a sliding group frees the pages its window no longer sees, a prefix hit is as
long as every group still has what its window needs, and the bookkeeping stays consistent under random
operations. The engine: tiny-gemma3 (24-token window on alternate layers) generates the same tokens and
logprobs with reclaim on as with it off (every layer keeping every token), past the window, through prefix-cache
hits and preemption, while its sliding group holds only about a window of pages.
"""

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxserve import SamplingParams
from jaxserve.config import PRESETS
from jaxserve.engine.block_manager import NULL_PAGE, BlockManager
from tests.conftest import TINY_KW, get_llm


# ------------------------------------------------------------------------------------------------ layouts

def test_layouts():
    g = PRESETS["gemma3-270m"].kv_layout()
    assert g.group_windows == (0, 512, 512, 512, 512, 512) and g.width == 3
    assert [i for i, gr in enumerate(g.layer_group) if gr == 0] == [5, 11, 17]  # the global layers
    # every (group, row) is one layer's
    assert len({(gr, j) for gr, j in zip(g.layer_group, g.layer_index)}) == 18
    assert not PRESETS["gemma3-270m"].kv_layout(reclaim=False).grouped
    assert not PRESETS["tiny-llama"].kv_layout().grouped  # no sliding layers: the plain layout
    t = PRESETS["tiny-gemma3"].kv_layout()
    assert (t.group_windows, t.width, t.layer_group) == ((0, 24), 2, (1, 0, 1, 0))


# ------------------------------------------------------------------------------------------ block manager

def test_trim_window_frees_pages_out_of_the_window():
    bm = BlockManager(200, 4, group_windows=(0, 8))
    bm.allocate_prompt(1, list(range(40)))
    assert bm.ensure_capacity(1, 40)
    assert bm.pages_held(1) == [10, 10]
    bm.commit_computed(1, list(range(40)), 40)
    # the next token (position 40) sees keys 33..40: pages 8, 9 (and 10 once allocated); 0..7 go
    assert bm.trim_window(1, 40) == 8
    assert bm.pages_held(1) == [10, 2]
    tables = bm.group_tables(1)
    assert tables[1][:8] == [NULL_PAGE] * 8 and NULL_PAGE not in tables[0]
    assert bm.block_table(1) == tables[0]
    assert bm.trim_window(1, 40) == 0  # idempotent
    bm.check_invariants()
    # the trimmed pages were computed and cached: they are evictable, not lost
    assert bm.stats()["evictable"] == 8
    assert bm.max_pages(40, 4) == 10 + min(10, 3 + 1)
    bm.free(1)
    bm.check_invariants()
    assert bm.stats()["used"] == 0


def test_prefix_hit_needs_the_window_pages_of_every_group():
    toks = list(range(100, 140))  # 10 pages of 4
    bm = BlockManager(200, 4, group_windows=(0, 8))
    bm.allocate_prompt(1, toks)
    bm.ensure_capacity(1, 40)
    bm.commit_computed(1, toks, 40)
    bm.trim_window(1, 40)
    bm.free(1)
    # all 20 pages cached; a new prompt of the same 40 tokens + 1 hits 10 pages (39 // 4 = 9 full before the last)
    assert bm.allocate_prompt(2, toks + [7]) == 40
    t = bm.group_tables(2)
    assert len(t[0]) == len(t[1]) == 10 and t[1][:8] == [NULL_PAGE] * 8  # only the window's pages revived
    bm.check_invariants()
    bm.free(2)
    # evict the sliding group's last pages: the hit shrinks to where its window's pages are still cached
    bm2 = BlockManager(200, 4, group_windows=(0, 8))
    bm2.allocate_prompt(1, toks)
    bm2.ensure_capacity(1, 40)
    bm2.commit_computed(1, toks, 40)
    last = bm2.group_tables(1)[1][9]
    bm2.free(1)
    key = bm2._page_hash[last]
    del bm2._hash_to_page[key]  # as if evicted
    bm2._page_hash[last] = None
    bm2._evictable.pop(last)
    bm2._free.append(last)
    bm2.check_invariants()
    got = bm2.allocate_prompt(2, toks + [7])
    assert got == 36  # 9 pages: the sliding group needs pages 7 and 8 at that point, both cached
    bm2.check_invariants()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 30), st.integers(0, 4)), min_size=1, max_size=40),
       st.sampled_from([(0,), (0, 6), (0, 6, 6), (9,)]), st.booleans())
def test_random_life_cycles_keep_invariants(ops, windows, caching):
    """Random admissions (with shared prefixes), chunked computation, window trims and frees: the invariants
    hold, a sliding group never holds more than max_pages, and every group's table covers the sequence."""
    ps = 4
    bm = BlockManager(64, ps, enable_prefix_caching=caching, group_windows=windows)
    live = {}  # seq id -> [tokens, computed]
    rng = random.Random(len(ops))
    next_id = 1
    for op, n, prefix in ops:
        if op <= 1 or not live:  # admit
            toks = [prefix] * (prefix * ps) + [rng.randrange(50) for _ in range(n)]
            sid, next_id = next_id, next_id + 1
            cached = bm.allocate_prompt(sid, toks)
            assert cached % ps == 0 and cached < len(toks)
            live[sid] = [toks, cached]
        elif op == 2:  # compute a chunk of one sequence (or free it when the pool is full)
            sid = rng.choice(sorted(live))
            toks, done = live[sid]
            end = min(len(toks), done + n)
            if bm.ensure_capacity(sid, end):
                bm.commit_computed(sid, toks, end)
                bm.trim_window(sid, end)
                live[sid][1] = end
                held = bm.pages_held(sid)
                assert sum(held) <= bm.max_pages(end, n)
                assert all(len(t) == bm.pages_for(end) for t in bm.group_tables(sid))
            else:
                bm.free(sid)
                del live[sid]
        else:
            sid = rng.choice(sorted(live))
            bm.free(sid)
            del live[sid]
        bm.check_invariants()
    for sid in list(live):
        bm.free(sid)
    bm.check_invariants()
    assert bm.stats()["used"] == 0


# ------------------------------------------------------------------------------------------------ engine

def _run(llm, prompts, sp):
    outs = llm.generate(prompts, sp)
    return [(o.outputs[0].token_ids, [lp for lp in o.outputs[0].logprobs]) for o in outs]


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(3)
    # shorter and longer than the 24-token window, page multiples and not
    return [rng.integers(3, 500, n).tolist() for n in (5, 24, 40, 77, 130)]


def test_engine_reclaim_equals_full_cache(tiny_gemma3, prompts):
    full = get_llm("tiny-gemma3", sliding_window_reclaim=False, **TINY_KW)
    assert tiny_gemma3.engine.runner.kv_layout.grouped and not full.engine.runner.kv_layout.grouped
    sp = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True, logprobs=2)
    got, want = _run(tiny_gemma3, prompts, sp), _run(full, prompts, sp)
    for (gt, glp), (wt, wlp) in zip(got, want):
        assert gt == wt
        assert glp == wlp  # the same K/V read in the same order: bit for bit
    # again: now the prompts hit the prefix cache (a sliding group revives only its window's pages)
    hits0 = tiny_gemma3.engine.bm.stats()["prefix_hit_tokens"]
    again = _run(tiny_gemma3, prompts, sp)
    assert tiny_gemma3.engine.bm.stats()["prefix_hit_tokens"] > hits0
    assert [t for t, _ in again] == [t for t, _ in want]
    tiny_gemma3.engine.bm.check_invariants()


def test_engine_sliding_group_holds_a_window(tiny_gemma3):
    """A 200-token sequence: the global group holds all its pages, the sliding group about window / page_size."""
    eng = tiny_gemma3.engine
    rng = np.random.default_rng(5)
    rid = eng.add_request(rng.integers(3, 500, 150).tolist(),
                          SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True))
    seq = eng.requests[rid].seqs[0]
    peak = 0
    while eng.has_unfinished_requests():
        eng.step()
        if eng.bm.has_seq(seq.seq_id):
            held = eng.bm.pages_held(seq.seq_id)
            peak = max(peak, held[1])
            assert held[0] == eng.bm.pages_for(seq.num_computed_tokens) or seq.num_computed_tokens % 4 == 0
    ps, window, chunk = 4, 24, TINY_KW["max_num_batched_tokens"]
    assert peak <= -(-(window - 1 + chunk) // ps) + 1  # at most the window + one prefill chunk
    assert eng.bm.check_invariants() is None


def test_engine_reclaim_under_preemption(prompts):
    """A cache too small for all rows at once: sequences are preempted and recomputed, same tokens."""
    sp = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    small = get_llm("tiny-gemma3", **{**TINY_KW, "num_pages": 80})
    full = get_llm("tiny-gemma3", sliding_window_reclaim=False, **TINY_KW)
    before = small.engine.scheduler.num_preemptions
    got = [o.outputs[0].token_ids for o in small.generate(prompts * 2, sp)]
    want = [o.outputs[0].token_ids for o in full.generate(prompts * 2, sp)]
    assert got == want
    assert small.engine.scheduler.num_preemptions > before
    small.engine.bm.check_invariants()


@pytest.mark.slow
def test_gemma3_2000_token_sequence_holds_a_window_of_local_pages():
    """The real Gemma 3 270M (3 global layers, 15 local of window 512, 16-token pages): a 2,000-token prompt
    + 16 greedy tokens. The global group holds every position's page; each of the 5 local groups at most the
    window plus one 512-token prefill chunk while prefilling, and 32-33 pages (512 tokens) once decoding."""
    from pydoc_data.topics import topics

    llm = get_llm("gemma3-270m", max_model_len=2048, max_num_seqs=1, max_prefill_seqs=1)
    eng = llm.engine
    assert eng.runner.kv_layout.group_windows == (0, 512, 512, 512, 512, 512)
    ids = eng.tokenize_prompt("\n\n".join(topics[k] for k in sorted(topics)))[:2000]
    rid = eng.add_request(ids, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))
    seq = eng.requests[rid].seqs[0]
    peak_local, decoding = 0, []
    while eng.has_unfinished_requests():
        eng.step()
        if not eng.bm.has_seq(seq.seq_id):
            break
        held = eng.bm.pages_held(seq.seq_id)
        n = seq.num_computed_tokens
        assert held[0] >= -(-n // 16)  # every computed position (and the next step's page)
        peak_local = max(peak_local, *held[1:])
        if n >= 2000:
            decoding.append(held)
    assert peak_local <= -(-(511 + 512) // 16) + 1 == 65
    assert decoding and all(h[0] >= 125 and max(h[1:]) <= 33 for h in decoding)
    eng.bm.check_invariants()


def test_one_block_tables_do_not_copy_the_cache():
    """Block tables are at least two attention blocks wide with page groups: with one, XLA:CPU unrolls the
    attention loop and fuses each layer's KV write into its gather, copying the whole cache twice per layer
    (Gemma 3 270M at max_model_len 256: 4.4 s per decode step with a 1 GiB cache). Checked on the compiled
    decode program: no copy of a cache-shaped array."""
    import re

    llm = get_llm("tiny-gemma3", page_size=4, max_model_len=16, attn_block_pages=4, max_num_seqs=1,
                  max_num_batched_tokens=16, min_prefill_tokens=16, max_prefill_seqs=1, num_pages=64)
    r = llm.engine.runner
    assert r.kv_layout.grouped and r.P == 8  # 16 tokens = 4 pages = one block, widened to two
    shape = ",".join(str(d) for d in r.kv["k"].shape)
    progs = [r.ragged_programs[t] for t in (1, 16)] if r.ragged else [r.programs[(1, 1)]]
    for prog in progs:  # (a ragged engine: its batch-1 decode program and one with a chunk tile)
        assert not re.search(r"\[" + shape + r"\]\{[\d,]*\} copy\(", prog.as_text())
    sp = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    want = get_llm("tiny-gemma3", sliding_window_reclaim=False, **TINY_KW).generate([[5, 6, 7, 8, 9]], sp)
    assert llm.generate([[5, 6, 7, 8, 9]], sp)[0].outputs[0].token_ids == want[0].outputs[0].token_ids
