"""BlockManager: page accounting, prefix caching, and hypothesis state-machine tests. Host only, no JAX."""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from jaxserve.engine.block_manager import NULL_PAGE, BlockManager, BlockManagerError

PS = 4  # page size used by the unit tests


def run_prompt(bm: BlockManager, seq_id: int, tokens: list, extra_key: bytes = b"") -> int:
    """Admit, compute the whole prompt in one step and commit, like the engine. Returns cached tokens."""
    cached = bm.allocate_prompt(seq_id, tokens, extra_key=extra_key)
    assert bm.ensure_capacity(seq_id, len(tokens))
    bm.commit_computed(seq_id, tokens, len(tokens))
    bm.check_invariants()
    return cached


def pools(bm: BlockManager):
    return list(bm._free), list(bm._evictable)


# ---------------------------------------------------------------------------------------------- basics
def test_initial_state_and_null_page_never_handed_out():
    bm = BlockManager(num_pages=9, page_size=PS)
    assert bm.num_free_pages() == 8 and bm.usage() == 0.0
    bm.allocate_prompt(1, list(range(32)))
    assert bm.ensure_capacity(1, 32)  # all 8 usable pages
    assert sorted(bm.block_table(1)) == list(range(1, 9))
    assert NULL_PAGE not in bm.block_table(1)
    assert bm.num_free_pages() == 0 and bm.usage() == 1.0
    assert not bm.can_allocate(1) and not bm.ensure_capacity(1, 33)
    bm.check_invariants()
    s = bm.stats()
    assert (s["num_pages"], s["free"], s["evictable"], s["used"]) == (9, 0, 0, 8)


@pytest.mark.parametrize("kw", [dict(num_pages=1, page_size=4), dict(num_pages=4, page_size=0),
                                dict(num_pages=4, page_size=4, cache_salt="str")])
def test_bad_constructor_args(kw):
    with pytest.raises((ValueError, TypeError)):
        BlockManager(**kw)


def test_can_allocate_counts_free_and_evictable():
    bm = BlockManager(5, PS)
    assert bm.can_allocate(16) and not bm.can_allocate(17)
    run_prompt(bm, 1, [1] * 9)  # 3 pages, 2 full pages cached
    bm.free(1)
    assert bm.stats()["evictable"] == 2 and bm.stats()["free"] == 2
    assert bm.can_allocate(16) and bm.num_free_pages() == 4


def test_allocate_twice_raises_and_unknown_seq_raises():
    bm = BlockManager(8, PS)
    bm.allocate_prompt(1, [1, 2, 3])
    with pytest.raises(BlockManagerError, match="already has a block table"):
        bm.allocate_prompt(1, [1, 2, 3])
    for call in (lambda: bm.ensure_capacity(2, 4), lambda: bm.block_table(2),
                 lambda: bm.commit_computed(2, [1], 1)):
        with pytest.raises(BlockManagerError, match="no block table"):
            call()
    with pytest.raises(ValueError):
        bm.allocate_prompt(3, [])
    bm.check_invariants()


def test_free_unknown_and_double_free_are_noops():
    bm = BlockManager(8, PS)
    assert bm.free(42) is False  # never allocated (e.g. aborted while waiting)
    run_prompt(bm, 1, list(range(10)))
    run_prompt(bm, 2, list(range(10)))  # shares 2 cached pages with seq 1
    before = bm.stats()
    assert bm.free(1) is True
    after_first = (bm.stats(), pools(bm))
    assert bm.free(1) is False  # must not release seq 2's shared pages a second time
    assert (bm.stats(), pools(bm)) == after_first
    assert bm.stats()["used"] == before["used"] - 1  # only seq 1's private tail page went
    bm.check_invariants()


def test_ensure_capacity_is_all_or_nothing_and_never_shrinks():
    bm = BlockManager(6, PS)  # 5 usable pages
    bm.allocate_prompt(1, [0] * 8)
    assert bm.ensure_capacity(1, 8)  # 2 pages
    bm.allocate_prompt(2, [1] * 4)
    snap = (bm.block_table(1), bm.block_table(2), bm.stats(), pools(bm))
    assert not bm.ensure_capacity(2, 17)  # needs 5 pages, only 3 free
    assert (bm.block_table(1), bm.block_table(2), bm.stats(), pools(bm)) == snap
    assert bm.ensure_capacity(2, 12)  # 3 pages: exactly fits
    assert bm.num_free_pages() == 0
    assert bm.ensure_capacity(1, 3)  # smaller than what it holds: no-op
    assert len(bm.block_table(1)) == 2
    bm.check_invariants()


def test_ensure_capacity_all_or_nothing_does_not_evict_on_failure():
    bm = BlockManager(5, PS)
    run_prompt(bm, 1, [7] * 9)
    bm.free(1)  # 2 evictable + 2 free
    bm.allocate_prompt(2, [3])
    snap = (bm.stats(), pools(bm))
    assert not bm.ensure_capacity(2, 20)  # 5 pages > 4
    assert (bm.stats(), pools(bm)) == snap and bm.stats()["evictions"] == 0
    bm.check_invariants()


# ---------------------------------------------------------------------------------------------- prefix cache
def test_hit_after_completed_identical_prompt():
    bm = BlockManager(16, PS)
    prompt = list(range(100, 113))  # 13 tokens: 3 full pages + 1
    assert run_prompt(bm, 1, prompt) == 0
    table1 = bm.block_table(1)
    bm.free(1)
    cached = bm.allocate_prompt(2, prompt)
    assert cached == 12
    assert bm.block_table(2) == table1[:3]  # the very same pages
    assert bm.ensure_capacity(2, len(prompt))
    s = bm.stats()
    assert s["prefix_query_tokens"] == 26 and s["prefix_hit_tokens"] == 12
    assert s["prefix_hit_rate"] == s["hit_rate"] == pytest.approx(12 / 26)
    bm.check_invariants()


def test_cached_prefix_pages_is_read_only():
    """The router's lookup: leading cached pages of a prompt, without reviving or referencing any of them."""
    bm = BlockManager(16, PS)
    prompt = list(range(100, 113))  # 13 tokens: 3 full pages + 1
    run_prompt(bm, 1, prompt)
    bm.free(1)  # pages evictable, still cached
    before = (bm.stats(), bm.num_free_pages(), list(bm._evictable))
    assert bm.cached_prefix_pages(bm.hash_pages(prompt)) == 3
    assert bm.cached_prefix_pages(bm.hash_pages(prompt[:8] + [0] * 4)) == 2  # diverges in the third page
    assert bm.cached_prefix_pages(bm.hash_pages([7] + prompt[1:])) == 0
    assert (bm.stats(), bm.num_free_pages(), list(bm._evictable)) == before  # nothing revived, LRU order kept
    assert BlockManager(16, PS, enable_prefix_caching=False).cached_prefix_pages(bm.hash_pages(prompt)) == 0
    bm.check_invariants()


def test_cap_keeps_last_prompt_token_uncomputed():
    bm = BlockManager(16, PS)
    prompt = list(range(12))  # exactly 3 full pages
    run_prompt(bm, 1, prompt + [99])  # caches pages for tokens 0..11
    bm.free(1)
    assert bm.allocate_prompt(2, prompt) == 8  # not 12: the last token must produce logits
    assert bm.allocate_prompt(3, prompt + [5]) == 12
    assert bm.allocate_prompt(4, prompt[:4]) == 0  # single full page prompt: nothing may be cached
    assert bm.allocate_prompt(5, prompt[:1]) == 0
    assert all(sid in bm for sid in (2, 3, 4, 5))
    bm.check_invariants()


def test_partial_prefix_hit():
    bm = BlockManager(32, PS)
    a = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]
    b = a[:8] + [0, 0, 0, 0, 0, 0]  # shares 2 pages, diverges in the 3rd
    c = a[:6] + [0] * 10  # diverges inside page 2: only page 1 matches
    run_prompt(bm, 1, a)
    assert bm.allocate_prompt(2, b) == 8
    assert bm.block_table(2) == bm.block_table(1)[:2]
    assert bm.allocate_prompt(3, c) == 4
    assert bm.allocate_prompt(4, [9] + a[1:]) == 0  # first page differs: chain never matches later pages
    assert bm.ref_count(bm.block_table(1)[0]) == 3
    bm.check_invariants()


def test_chain_depends_on_the_whole_prefix():
    """Same page content after different prefixes must not hit (the hash chains in the parent)."""
    bm = BlockManager(32, PS)
    run_prompt(bm, 1, [1, 1, 1, 1, 2, 2, 2, 2, 0])
    assert bm.allocate_prompt(2, [3, 3, 3, 3, 2, 2, 2, 2, 0]) == 0


def test_sharing_between_live_sequences():
    bm = BlockManager(16, PS)
    prompt = list(range(9))
    run_prompt(bm, 1, prompt)
    assert run_prompt(bm, 2, prompt) == 8
    shared = bm.block_table(1)[:2]
    assert bm.block_table(2)[:2] == shared and bm.block_table(1)[2] != bm.block_table(2)[2]
    assert [bm.ref_count(p) for p in shared] == [2, 2]
    bm.free(1)
    free, ev = pools(bm)
    assert not set(shared) & (set(free) | set(ev))  # still held by seq 2
    assert [bm.ref_count(p) for p in shared] == [1, 1]
    bm.free(2)
    assert set(pools(bm)[1]) == set(shared)
    bm.check_invariants()


def test_no_hit_on_a_different_salt():
    prompt = list(range(9))
    a = BlockManager(16, PS, cache_salt=b"model-a|bf16")
    b = BlockManager(16, PS, cache_salt=b"model-a|int8")
    assert a.hash_pages(prompt) != b.hash_pages(prompt)
    assert not set(a.hash_pages(prompt)) & set(b.hash_pages(prompt))
    # per-request salt within one manager
    run_prompt(a, 1, prompt, extra_key=b"tenant-1")
    assert a.allocate_prompt(2, prompt, extra_key=b"tenant-2") == 0
    assert a.allocate_prompt(3, prompt) == 0
    assert a.allocate_prompt(4, prompt, extra_key=b"tenant-1") == 8
    # salt framing: (salt=b"ab", extra=b"") must differ from (salt=b"a", extra=b"b")
    c = BlockManager(16, PS, cache_salt=b"a")
    d = BlockManager(16, PS, cache_salt=b"ab")
    assert c.hash_pages(prompt, extra_key=b"b") != d.hash_pages(prompt)


def test_hash_is_the_documented_stable_blake2b_chain():
    bm = BlockManager(4, 2, cache_salt=b"s")
    dom = b"jaxserve.prefix-cache.v1\x00"
    h = hashlib.blake2b(dom + (1).to_bytes(8, "little") + b"s" + (0).to_bytes(8, "little"), digest_size=32).digest()
    expect = []
    for page in ([5, -1], [2**40, 0]):
        h = hashlib.blake2b(h + struct.pack("<2q", *page), digest_size=32).digest()
        expect.append(h)
    assert bm.hash_pages([5, -1, 2**40, 0, 7]) == expect


def test_hash_is_stable_across_processes():
    code = ("from jaxserve.engine.block_manager import BlockManager;"
            "print(BlockManager(4, 3, cache_salt=b'x').hash_pages([1,2,3,4,5,6])[-1].hex())")
    outs = set()
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        outs.add(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                check=True, cwd=os.path.dirname(os.path.dirname(__file__))).stdout.strip())
    assert len(outs) == 1
    assert outs == {BlockManager(4, 3, cache_salt=b"x").hash_pages([1, 2, 3, 4, 5, 6])[-1].hex()}


def test_lru_eviction_order_and_free_list_first():
    bm = BlockManager(9, PS)  # 8 usable
    run_prompt(bm, 1, [1] * 12 + [0])  # 4 pages: 3 cached + 1 partial
    run_prompt(bm, 2, [2] * 8 + [0])  # 3 pages: 2 cached + 1 partial
    a, b = bm.block_table(1), bm.block_table(2)
    bm.free(1)  # first freed -> least recently used; tail first within a sequence
    bm.free(2)
    free, ev = pools(bm)
    assert ev == [a[2], a[1], a[0], b[1], b[0]]
    assert set(free) == {8, a[3], b[2]} and len(free) == 3
    bm.allocate_prompt(3, [9])
    assert bm.ensure_capacity(3, 3 * PS)  # 3 pages: exactly the free list, nothing evicted
    assert set(bm.block_table(3)) == set(free) and bm.stats()["evictions"] == 0
    assert bm.ensure_capacity(3, 5 * PS)  # two more: evict a's tail, then a's middle
    assert bm.block_table(3)[3:] == [a[2], a[1]]
    assert bm.stats()["evictions"] == 2 and not bm.is_cached(a[2])
    # a's first page survives, its chain stops after it; b is fully cached
    assert bm.allocate_prompt(4, [1] * 12 + [0]) == 4
    assert bm.allocate_prompt(5, [2] * 8 + [0]) == 8
    bm.check_invariants()


def test_hit_refreshes_lru_position():
    bm = BlockManager(5, PS)  # 4 usable
    run_prompt(bm, 1, [1] * 4 + [0])
    run_prompt(bm, 2, [2] * 4 + [0])
    p1, p2 = bm.block_table(1)[0], bm.block_table(2)[0]
    bm.free(1)
    bm.free(2)
    assert pools(bm)[1] == [p1, p2]
    assert bm.allocate_prompt(3, [1] * 4 + [0]) == 4  # revive p1 ...
    bm.free(3)  # ... and it goes back as most recently used
    assert pools(bm)[1] == [p2, p1]


def test_revival_of_evictable_page():
    bm = BlockManager(8, PS)
    prompt = [4] * 8 + [1]
    run_prompt(bm, 1, prompt)
    cached_pages = bm.block_table(1)[:2]
    bm.free(1)
    s = bm.stats()
    assert s["evictable"] == 2 and s["used"] == 0 and bm.num_free_pages() == 7
    assert bm.allocate_prompt(2, prompt) == 8
    assert [bm.ref_count(p) for p in cached_pages] == [1, 1]
    assert not set(cached_pages) & set(pools(bm)[1])
    s = bm.stats()
    assert s["evictable"] == 0 and s["used"] == 2 and bm.num_free_pages() == 5
    # a revived page is never handed out again while held
    assert bm.ensure_capacity(2, 7 * PS)
    assert len(set(bm.block_table(2))) == 7
    bm.check_invariants()


def test_duplicate_hash_keeps_existing_mapping_and_chain_continues():
    bm = BlockManager(16, PS)
    prompt = list(range(8))
    # both admitted in the same step: neither hits
    assert bm.allocate_prompt(1, prompt + [50]) == 0
    assert bm.allocate_prompt(2, prompt + [50]) == 0
    for sid in (1, 2):
        assert bm.ensure_capacity(sid, 9)
    assert bm.commit_computed(1, prompt + [50], 9) == 2
    assert bm.commit_computed(2, prompt + [50], 9) == 0  # duplicates: existing mapping wins
    t1, t2 = bm.block_table(1), bm.block_table(2)
    assert all(bm.is_cached(p) for p in t1[:2]) and not any(bm.is_cached(p) for p in t2)
    # seq 2 decodes further: its 3rd page is new content and registers although pages 1-2 did not
    toks2 = prompt + [50, 51, 52, 53, 54]
    assert bm.ensure_capacity(2, 13)
    assert bm.commit_computed(2, toks2, 12) == 1
    assert bm.is_cached(t2[2])
    bm.free(2)  # its uncached pages go to the free list, the cached one to the LRU
    assert pools(bm)[1] == [t2[2]]
    assert bm.allocate_prompt(3, toks2) == 12
    assert bm.block_table(3) == t1[:2] + [t2[2]]
    bm.check_invariants()


def test_lookup_stops_at_first_miss_even_if_later_pages_are_cached():
    """Page i evicted while page i+1 (registered by a duplicate-holding sequence) stays cached: a prompt
    must not hit page i+1, its table would be misaligned."""
    bm = BlockManager(7, PS)  # 6 usable
    prompt = list(range(8)) + [50]
    for sid in (1, 2):
        assert bm.allocate_prompt(sid, prompt) == 0
        assert bm.ensure_capacity(sid, 9)
    bm.commit_computed(1, prompt, 9)  # seq 1 owns pages 0-1 of the chain
    toks2 = prompt + [51, 52, 53, 54]
    bm.commit_computed(2, toks2, 12)  # seq 2: duplicates for pages 0-1, registers page 2
    bm.free(1)
    bm.allocate_prompt(3, [9])
    assert bm.ensure_capacity(3, 3 * PS) and bm.stats()["evictions"] == 2  # seq 1's pages evicted
    assert bm.is_cached(bm.block_table(2)[2])
    assert bm.allocate_prompt(4, toks2 + [0]) == 0
    assert bm.block_table(4) == []
    bm.check_invariants()


def test_commit_hashes_only_new_pages():
    """Per-token commits during a long decode hash each full page once (O(new pages), not O(all pages))."""
    bm = BlockManager(600, 4)
    calls = []
    chain = bm._chain
    bm._chain = lambda parent, toks: calls.append(1) or chain(parent, toks)
    toks = [1, 2, 3]
    bm.allocate_prompt(1, toks)
    for t in range(2000):
        toks.append(t)
        assert bm.ensure_capacity(1, len(toks))
        bm.commit_computed(1, toks, len(toks) - 1)
    assert len(calls) == (len(toks) - 1) // 4


def test_incremental_commit_matches_one_shot_hashing():
    bm = BlockManager(32, PS)
    toks = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2]
    bm.allocate_prompt(1, toks[:5])
    bm.ensure_capacity(1, len(toks))
    assert bm.commit_computed(1, toks[:5], 3) == 0
    assert bm.commit_computed(1, toks[:6], 5) == 1
    assert bm.commit_computed(1, toks[:6], 5) == 0  # idempotent
    assert bm.commit_computed(1, toks, 16) == 3
    assert bm.commit_computed(1, toks, 12) == 0  # going backwards is ignored
    hashes = bm.hash_pages(toks)
    assert [bm._page_hash[p] for p in bm.block_table(1)[:4]] == hashes
    with pytest.raises(ValueError):
        bm.commit_computed(1, toks[:3], 4)
    with pytest.raises(BlockManagerError, match="ensure_capacity"):
        bm.commit_computed(1, toks * 3, 40)
    bm.check_invariants()


def test_preempted_sequence_resumes_with_hits_on_its_output():
    bm = BlockManager(16, PS)
    prompt = [1, 2, 3, 4, 5, 6]
    cached = bm.allocate_prompt(7, prompt)
    toks = list(prompt)
    bm.ensure_capacity(7, len(toks))
    bm.commit_computed(7, toks, len(toks))
    for t in range(10, 17):  # decode 7 tokens: KV of each is computed the step after it is sampled
        toks.append(t)
        assert bm.ensure_capacity(7, len(toks))
        bm.commit_computed(7, toks, len(toks))
    assert cached == 0 and len(toks) == 13
    toks.append(99)  # sampled, KV not computed yet
    bm.free(7)  # preempted
    assert bm.allocate_prompt(7, toks) == 12  # prompt + output pages come back
    bm.check_invariants()


def test_prefix_caching_disabled():
    bm = BlockManager(8, PS, enable_prefix_caching=False)
    prompt = list(range(9))
    run_prompt(bm, 1, prompt)
    bm.free(1)
    assert bm.allocate_prompt(2, prompt) == 0
    s = bm.stats()
    assert s["evictable"] == 0 and s["cached_pages"] == 0 and s["prefix_query_tokens"] == 0
    bm.check_invariants()


def test_reset_prefix_cache():
    bm = BlockManager(16, PS)
    run_prompt(bm, 1, list(range(9)))
    run_prompt(bm, 2, [7] * 9)
    bm.free(1)
    assert bm.stats()["evictable"] == 2
    assert bm.reset_prefix_cache() == 4
    s = bm.stats()
    assert (s["evictable"], s["cached_pages"], s["free"], s["used"]) == (0, 0, 12, 3)
    assert bm.allocate_prompt(3, list(range(9))) == 0
    assert bm.allocate_prompt(4, [7] * 9) == 0
    # seq 2 was live across the reset: its later pages depend on pre-reset KV and are never registered
    toks2 = [7] * 9 + [1, 2, 3, 4]
    assert bm.ensure_capacity(2, 13)
    assert bm.commit_computed(2, toks2, 13) == 0 and bm.stats()["cached_pages"] == 0
    bm.free(2)  # its formerly cached pages now go to the free list
    assert bm.stats()["evictable"] == 0
    # sequences admitted after the reset cache normally
    run_prompt(bm, 5, [7] * 9)
    bm.free(5)
    assert bm.allocate_prompt(6, [7] * 9) == 8
    bm.check_invariants()


def test_stats_keys():
    s = BlockManager(8, PS).stats()
    for k in ("num_pages", "free", "evictable", "used", "prefix_query_tokens", "prefix_hit_tokens",
              "prefix_hit_rate", "hit_rate", "evictions", "cached_pages"):
        assert k in s
    assert s["prefix_hit_rate"] == 0.0 and s["free"] + s["evictable"] + s["used"] == 7


def test_check_invariants_catches_corruption():
    bm = BlockManager(8, PS)
    run_prompt(bm, 1, list(range(9)))
    bm._ref[bm.block_table(1)[0]] += 1
    with pytest.raises(AssertionError, match="refcount"):
        bm.check_invariants()
    bm = BlockManager(8, PS)
    run_prompt(bm, 1, list(range(9)))
    bm._free.append(bm.block_table(1)[2])
    with pytest.raises(AssertionError):
        bm.check_invariants()


def test_per_call_cost_does_not_scale_with_pool_size():
    """A million-page pool: 3000 admit/grow/commit/free cycles must stay fast (no O(num_pages) scans)."""
    bm = BlockManager(1_000_000, 16)
    prompt = list(range(200))
    t0 = time.perf_counter()
    for i in range(3000):
        toks = prompt + [i]
        c = bm.allocate_prompt(i, toks)
        bm.ensure_capacity(i, len(toks) + 16)
        bm.commit_computed(i, toks, len(toks))
        bm.block_table(i)
        bm.num_free_pages(), bm.usage(), bm.stats()
        if i % 2:
            bm.free(i)
        if i > 0:
            assert c == 192
    assert time.perf_counter() - t0 < 2.0  # an O(num_pages) scan per call would take minutes


# ---------------------------------------------------------------------------------------------- stateful
ALPHABET = st.sampled_from([0, 1])
POISON = ("poison",)
EXTRA = st.sampled_from([b"", b"", b"t2"])


class BlockManagerMachine(RuleBasedStateMachine):
    """Random admit / compute(+commit) / reserve / finish / preempt / abort / reset sequences.

    A fake KV store records, for each page slot, the identity of the token prefix whose KV was written there
    (written only by the sequence computing it, and only into pages it holds alone and that are not cached).
    After every step every live sequence's computed tokens must read back their own prefix identities: this
    catches wrong hits (hash chain bugs), writes into shared pages, and stale cache entries for reused pages.
    """

    @initialize(num_pages=st.integers(2, 40), page_size=st.sampled_from([1, 2, 2, 3, 4]),
                caching=st.sampled_from([True, True, True, False]))
    def setup(self, num_pages, page_size, caching):
        self.bm = BlockManager(num_pages, page_size, enable_prefix_caching=caching, cache_salt=b"m")
        self.ps = page_size
        self.caching = caching
        self.live = {}  # seq_id -> {"tokens", "computed", "extra"}
        self.lifetimes = {}  # seq_id -> [allocations, frees]
        self.next_id = 0
        self.kv = {}  # page -> list of prefix identities per slot
        self.committed = set()  # (extra, prefix tuple) of full pages committed since the last reset
        self.evictions_at_reset = 0
        self.history = [[0, 1, 0, 1, 1, 0, 0, 1]]

    # ------------------------------------------------------------------ helpers
    def _ident(self, s, j):
        return (s["extra"], tuple(s["tokens"][: j + 1]))

    def _expected_hit_tokens(self, tokens, extra):
        if not self.caching:
            return 0
        k, cap = 0, (len(tokens) - 1) // self.ps
        while k < cap and (extra, tuple(tokens[: (k + 1) * self.ps])) in self.committed:
            k += 1
        return k * self.ps

    def _admit(self, sid, tokens, extra):
        before_live_tables = {i: self.bm.block_table(i) for i in self.live}
        cached = self.bm.allocate_prompt(sid, tokens, extra_key=extra)
        assert cached % self.ps == 0 and 0 <= cached <= ((len(tokens) - 1) // self.ps) * self.ps
        expected = self._expected_hit_tokens(tokens, extra)
        event("admit: prefix hit" if cached else "admit: miss")
        if self.bm.stats()["evictions"] == self.evictions_at_reset:
            assert cached == expected, (cached, expected)  # nothing evicted: every committed prefix hits
        else:
            assert cached <= expected
        assert len(self.bm.block_table(sid)) == cached // self.ps
        assert {i: self.bm.block_table(i) for i in before_live_tables} == before_live_tables
        self.live[sid] = {"tokens": list(tokens), "computed": cached, "extra": extra, "cacheable": True}
        self.lifetimes.setdefault(sid, [0, 0])[0] += 1

    def _reserve(self, sid, total):
        """ensure_capacity with the all-or-nothing check; poisons newly handed out pages."""
        old = self.bm.block_table(sid)
        snap = (self.bm.stats(), pools(self.bm))
        room = self.bm.num_free_pages()
        ok = self.bm.ensure_capacity(sid, total)
        need = self.bm.pages_for(total) - len(old)
        event("reserve: " + ("ok" if ok else "no room"))
        if ok and snap[0]["evictions"] != self.bm.stats()["evictions"]:
            event("reserve: evicted cached pages")
        if not ok:
            assert need > room
            assert self.bm.block_table(sid) == old and (self.bm.stats(), pools(self.bm)) == snap
            return False
        new = self.bm.block_table(sid)
        assert new[: len(old)] == old and len(new) == max(len(old), self.bm.pages_for(total))
        for p in new[len(old):]:
            assert p != NULL_PAGE and self.bm.ref_count(p) == 1 and not self.bm.is_cached(p)
            self.kv[p] = [POISON] * self.ps  # previous owner's data is garbage now
        return True

    def _free(self, sid):
        others = {p for i in self.live if i != sid for p in self.bm.block_table(i)}
        assert self.bm.free(sid) is True
        del self.live[sid]
        self.lifetimes[sid][1] += 1
        free, ev = pools(self.bm)
        assert not others & (set(free) | set(ev)), "a page still held by a live sequence was released"

    def _live_ids(self, data):
        """A live seq_id, or None (the rule is then a no-op; preconditions make hypothesis give up)."""
        return data.draw(st.sampled_from(sorted(self.live))) if self.live else None

    # ------------------------------------------------------------------ rules
    def _draw_prompt(self, data):
        """A prompt sharing a random prefix with an earlier or running sequence (so pages get shared)."""
        candidates = self.history + [s["tokens"][: s["computed"]] for s in self.live.values()]
        base = data.draw(st.sampled_from(candidates))
        keep = data.draw(st.integers(0, len(base)))
        suffix = data.draw(st.lists(ALPHABET, min_size=0 if keep else 1, max_size=6))
        return base[:keep] + suffix

    @rule(data=st.data(), extra=EXTRA, chunk=st.sampled_from([0, 2, 8, 64]))
    def admit(self, data, extra, chunk):
        tokens = self._draw_prompt(data)
        sid = self.next_id
        self.next_id += 1
        self._admit(sid, tokens, extra)
        if chunk:  # the scheduler reserves and computes a first chunk right away
            self._compute(sid, chunk, True, tokens[0])

    @rule(data=st.data(), extra=EXTRA, chunk=st.sampled_from([1, 3, 64]), decode=st.integers(0, 6))
    def serve_request(self, data, extra, chunk, decode):
        """A whole request in one rule: admit, prefill in chunks, decode, finish (or abort if out of pages)."""
        tokens = self._draw_prompt(data)
        sid = self.next_id
        self.next_id += 1
        self._admit(sid, tokens, extra)
        s = self.live[sid]
        target = len(tokens) + decode
        while len(s["tokens"]) < target or s["computed"] < len(tokens):
            before = s["computed"]
            self._compute(sid, chunk, True, len(s["tokens"]) % 2)
            if s["computed"] == before:
                break  # out of pages
        self.finish_seq(sid)

    def _compute(self, sid, n, do_commit, sample):
        """One engine step for one sequence: reserve, write KV for n tokens, maybe sample, commit."""
        s = self.live[sid]
        c = s["computed"]
        n = min(n, len(s["tokens"]) - c)
        assert n >= 1
        if not self._reserve(sid, c + n):
            return
        table = self.bm.block_table(sid)
        for j in range(c, c + n):
            p = table[j // self.ps]
            assert self.bm.ref_count(p) == 1 and not self.bm.is_cached(p), "write into a shared/cached page"
            self.kv[p][j % self.ps] = self._ident(s, j)
        s["computed"] = c + n
        if s["computed"] == len(s["tokens"]):
            s["tokens"].append(sample)
        if do_commit:
            self.bm.commit_computed(sid, s["tokens"], s["computed"])
            if self.caching and s["cacheable"]:
                for k in range(1, s["computed"] // self.ps + 1):
                    self.committed.add((s["extra"], tuple(s["tokens"][: k * self.ps])))

    @rule(data=st.data(), n=st.integers(1, 8), do_commit=st.sampled_from([True, True, True, False]),
          sample=ALPHABET)
    def compute_one(self, data, n, do_commit, sample):
        sid = self._live_ids(data)
        if sid is not None:
            self._compute(sid, n, do_commit, sample)

    @rule(n=st.integers(1, 8), samples=st.lists(ALPHABET, min_size=8, max_size=8))
    def step_all(self, n, samples):
        """A step over every live sequence (prefill chunks of n, decodes of 1), committing each."""
        for i, sid in enumerate(sorted(self.live)):
            self._compute(sid, n, True, samples[i % len(samples)])

    @rule(data=st.data(), ahead=st.integers(0, 12))
    def reserve_ahead(self, data, ahead):
        """Grow a table beyond the known tokens (lookahead / speculative slots) without computing."""
        sid = self._live_ids(data)
        if sid is None:
            return
        self._reserve(sid, len(self.live[sid]["tokens"]) + ahead)

    @rule(data=st.data())
    def finish(self, data):
        sid = self._live_ids(data)
        if sid is not None:
            self.finish_seq(sid)

    def finish_seq(self, sid):
        self.history.append(list(self.live[sid]["tokens"]))
        self._free(sid)

    @rule(data=st.data())
    def preempt_and_resume(self, data):
        """Free (recompute-preemption) and re-admit the same seq_id with prompt + output so far."""
        sid = self._live_ids(data)
        if sid is None:
            return
        s = self.live[sid]
        tokens, extra = s["tokens"], s["extra"]
        self._free(sid)
        self._admit(sid, tokens, extra)

    @rule(data=st.data())
    def abort_mid_prefill(self, data):
        """Admit, reserve part of the prompt, write some KV, and abort before anything is committed."""
        tokens = data.draw(st.lists(ALPHABET, min_size=1, max_size=12))
        sid = self.next_id
        self.next_id += 1
        self._admit(sid, tokens, b"")
        s = self.live[sid]
        if self._reserve(sid, len(tokens)):
            table = self.bm.block_table(sid)
            for j in range(s["computed"], len(tokens)):
                self.kv[table[j // self.ps]][j % self.ps] = ("aborted", j)
            s["computed"] = len(tokens)  # computed but never committed: must not be cached
            s["tokens"] = s["tokens"] + [0]
        self._free(sid)

    @rule(data=st.data())
    def double_free_or_unknown(self, data):
        dead = sorted(set(self.lifetimes) - set(self.live)) + [10**9]
        sid = data.draw(st.sampled_from(dead))
        snap = (self.bm.stats(), pools(self.bm))
        assert self.bm.free(sid) is False
        assert (self.bm.stats(), pools(self.bm)) == snap

    @rule(data=st.data())
    def allocate_live_raises(self, data):
        sid = self._live_ids(data)
        if sid is None:
            return
        snap = (self.bm.stats(), pools(self.bm), self.bm.block_table(sid))
        with pytest.raises(BlockManagerError):
            self.bm.allocate_prompt(sid, [0, 1])
        assert (self.bm.stats(), pools(self.bm), self.bm.block_table(sid)) == snap

    @rule()
    def reset_prefix_cache(self):
        self.bm.reset_prefix_cache()
        self.committed.clear()
        for s in self.live.values():
            s["cacheable"] = False  # live sequences never register pages after a reset
        self.evictions_at_reset = self.bm.stats()["evictions"]

    # ------------------------------------------------------------------ invariants
    @invariant()
    def bookkeeping_is_consistent(self):
        if not hasattr(self, "bm"):
            return
        self.bm.check_invariants()
        s = self.bm.stats()
        assert s["free"] + s["evictable"] + s["used"] == self.bm.num_pages - 1
        held = {p for i in self.live for p in self.bm.block_table(i)}
        assert s["used"] == len(held) and NULL_PAGE not in held
        assert s["num_seqs"] == len(self.live)
        assert self.bm.usage() == pytest.approx(len(held) / (self.bm.num_pages - 1))

    @invariant()
    def every_computed_token_reads_back_its_own_kv(self):
        if not hasattr(self, "bm"):
            return
        for sid, s in self.live.items():
            assert len(s["tokens"]) - s["computed"] >= 1  # something left to compute: logits each step
            table = self.bm.block_table(sid)
            for j in range(s["computed"]):
                got = self.kv[table[j // self.ps]][j % self.ps]
                assert got == self._ident(s, j), f"seq {sid} token {j}: KV of {got!r}"

    def teardown(self):
        if not hasattr(self, "bm"):
            return
        for sid in list(self.live):
            self._free(sid)
        self.bm.check_invariants()
        s = self.bm.stats()
        assert s["used"] == 0 and s["free"] + s["evictable"] == self.bm.num_pages - 1
        assert all(a == f for a, f in self.lifetimes.values()), "a sequence was not freed exactly once"


BlockManagerMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestBlockManagerStateMachine = BlockManagerMachine.TestCase
