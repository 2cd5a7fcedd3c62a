"""Scheduler + block manager under random traffic, driven through the real LLMEngine with a fake runner.

The fake runner keeps a paged "KV cache" of token ids: each step writes every computed token's id into its
slot and checks that every earlier position of the row reads back the right token through its block table.
So prefix-cache hits, preemption + recompute, chunked prefill and page reuse are checked for correctness,
not only for bookkeeping. No JAX: these run in milliseconds.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from jaxserve.config import EngineConfig, get_preset
from jaxserve.engine.engine import LLMEngine
from jaxserve.engine.request import Priority
from jaxserve.sampling_params import SamplingParams

CFG = get_preset("tiny-llama")


class FakeRunner:
    def __init__(self, ecfg: EngineConfig, num_pages: int):
        self.ecfg = ecfg
        self.cache = np.full(num_pages * ecfg.page_size, -1, np.int64)
        self.steps = []
        self.buckets = []

    def execute(self, kind, rows, bucket):
        R, Q = bucket
        assert len(rows) <= R
        if kind == "decode":
            assert Q == 1 and R in self.ecfg.decode_buckets()
        else:
            assert (R, Q) in self.ecfg.prefill_buckets()
        ps = self.ecfg.page_size
        toks = []
        for row in rows:
            seq, bt = row.seq, row.block_table
            assert 1 <= row.num_new <= Q
            ids = seq.all_token_ids
            assert row.start + row.num_new <= len(ids)
            assert len(bt) * ps >= row.start + row.num_new
            assert 0 not in bt, "the null page was handed out"
            for p in range(row.start, row.start + row.num_new):
                self.cache[bt[p // ps] * ps + p % ps] = ids[p]
            # What attention would read: every visible position must hold this sequence's token.
            ctx = row.start + row.num_new
            read = [self.cache[bt[p // ps] * ps + p % ps] for p in range(ctx)]
            assert read == ids[:ctx], f"seq {seq.seq_id}: cache content differs from its tokens"
            toks.append((sum(ids[:ctx]) * 7 + ctx) % (CFG.vocab_size - 3) + 3)
        self.steps.append((kind, len(rows)))
        self.buckets.append((kind, bucket))
        n = len(rows)
        return np.array(toks), np.zeros(n), np.zeros((n, 20), np.int64), np.zeros((n, 20))


def make_engine(**kw):
    base = dict(page_size=4, max_model_len=128, max_num_seqs=8, max_num_batched_tokens=32, max_prefill_seqs=4,
                min_prefill_tokens=8,
                num_pages=40)
    base.update(kw)
    ecfg = EngineConfig(**base)
    runner = FakeRunner(ecfg, ecfg.num_pages)
    return LLMEngine(CFG, ecfg, params=None, tokenizer=None, runner=runner), runner


def drain(eng, max_steps=10_000):
    finished = {}
    for _ in range(max_steps):
        if not eng.has_unfinished_requests():
            break
        for ro in eng.step():
            if ro.finished:
                assert ro.request_id not in finished, "a request finished twice"
                finished[ro.request_id] = ro
        eng.bm.check_invariants()
    assert not eng.has_unfinished_requests(), "engine did not drain"
    return finished


def test_preemption_recompute_gives_identical_output():
    prompts = [[(i * 13 + j) % 50 + 3 for j in range(10 + 5 * i)] for i in range(6)]
    sp = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    outs = []
    for pages in (200, 24):  # 24 pages x 4 tokens: not enough for all six at once -> preemption
        eng, _ = make_engine(num_pages=pages)
        ids = [eng.add_request(p, sp) for p in prompts]
        fin = drain(eng)
        outs.append([fin[i].outputs[0].token_ids for i in ids])
        if pages == 24:
            assert eng.scheduler.num_preemptions > 0
        assert eng.bm.stats()["used"] == 0
    assert outs[0] == outs[1]


def test_prefix_cache_hits_skip_prefill():
    eng, runner = make_engine(num_pages=200)
    system = list(range(3, 3 + 40))
    sp = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    first = eng.add_request(system + [60], sp)
    drain(eng)
    computed_before = eng.stats.prompt_tokens_computed
    ids = [eng.add_request(system + [61 + i], sp) for i in range(4)]
    fin = drain(eng)
    # 40 shared tokens = 10 full pages hit for each of the 4 later requests: only the suffix is computed.
    assert eng.stats.prompt_tokens_computed - computed_before == 4 * 1
    assert all(fin[i].metrics.num_cached_prompt_tokens == 40 for i in ids)
    assert eng.bm.stats()["prefix_hit_rate"] > 0.5


def test_update_commits_tokens_reserves_lookahead_and_frees_finished():
    """Scheduler.update on its own (no engine): tokens appended up to a stop token, KV counted per appended
    token on a multi-token (verified) row, pages hashed and freed; decode rows get their lookahead slots."""
    from jaxserve.engine.request import SampledToken, Sequence
    from jaxserve.engine.scheduler import Scheduler

    ecfg = EngineConfig(page_size=4, max_model_len=128, max_num_seqs=8, max_num_batched_tokens=32,
                        max_prefill_seqs=4, num_pages=40)
    sch = Scheduler(ecfg, 40, num_lookahead_slots=3)
    seq = Sequence(1, "r", 0, list(range(3, 13)), SamplingParams(max_tokens=6, stop_token_ids=[99]), 0,
                   Priority.INTERACTIVE, (), 128)
    sch.add(seq)
    tok = lambda t: SampledToken(t, -0.5, np.zeros(0, np.int64), np.zeros(0))  # noqa: E731
    out = sch.schedule()
    assert out.kind == "prefill" and out.rows[0].block_table == sch.bm.block_table(1)
    upd = sch.update(out, [[tok(20)]], 1.0)
    assert upd.num_tokens == 1 and not upd.finished
    assert seq.output_token_ids == [20] and seq.num_computed_tokens == 10 and seq.metrics.first_token == 1.0
    out = sch.schedule()
    row = out.rows[0]
    assert out.kind == "decode" and row.num_lookahead == 3
    assert len(row.block_table) * 4 >= seq.num_tokens + 3  # the drafts' slots are already allocated
    upd = sch.update(out, [[tok(21), tok(22)]], 2.0)  # one accepted draft + the correction
    assert upd.num_tokens == 2 and seq.num_computed_tokens == 12 and seq.output_token_ids == [20, 21, 22]
    out = sch.schedule()
    assert out.rows[0].num_lookahead == 2  # never past max_tokens: 6 - 3 outputs - 1 bonus
    upd = sch.update(out, [[tok(23), tok(99), tok(24)]], 3.0)  # a stop token inside the accepted run
    assert upd.finished == [seq] and seq.finish_reason == "stop" and seq.stop_reason == 99
    assert seq.output_token_ids == [20, 21, 22, 23, 99] and seq.num_computed_tokens == 14
    assert not sch.has_work() and not sch.bm.has_seq(1) and sch.bm.stats()["used"] == 0
    sch.bm.check_invariants()


def test_long_prompt_never_stalls_decodes_more_than_one_chunk():
    eng, runner = make_engine(num_pages=200, max_num_batched_tokens=16)
    sp = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    eng.add_request([5, 6, 7], sp)
    eng.step()  # prefill of the short one
    eng.add_request(list(range(3, 103)), sp)  # 100 tokens = 7 chunks of 16
    kinds = []
    while eng.has_unfinished_requests():
        eng.step()
        kinds.append(runner.steps[-1][0])
    # While the long prompt is prefilling, no two prefill steps are adjacent (decodes run in between).
    for a, b in zip(kinds, kinds[1:]):
        assert not (a == "prefill" and b == "prefill")


def test_interactive_admitted_before_batch_and_preempts_it():
    eng, runner = make_engine(num_pages=200, max_num_seqs=2)
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    b1 = eng.add_request([5, 6, 7], sp, priority="batch")
    b2 = eng.add_request([8, 9, 10], sp, priority="batch")
    eng.step()
    eng.step()
    assert {s.request_id for s in eng.scheduler.running} == {b1, b2}
    i1 = eng.add_request([11, 12], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
                         priority="interactive")
    eng.step()
    running = {s.request_id for s in eng.scheduler.running}
    assert i1 in running, "interactive request did not preempt batch work"
    fin = drain(eng)
    assert set(fin) == {b1, b2, i1}
    assert fin[i1].metrics.e2e < fin[b2].metrics.e2e


def test_batch_work_ages_instead_of_starving():
    eng, runner = make_engine(num_pages=200, max_num_seqs=1)
    eng.scheduler.batch_aging_s = 0.0  # every batch request counts as aged at once
    sp = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    b = eng.add_request([5, 6], sp, priority="batch")
    for s in eng.scheduler.waiting:
        s.metrics.arrival -= 1.0  # arrived first
    i = eng.add_request([7, 8], sp, priority="interactive")
    eng.step()
    assert eng.scheduler.running[0].request_id == b


def test_static_mode_admits_only_when_idle():
    eng, runner = make_engine(num_pages=200, scheduler="static", max_num_seqs=4)
    sp = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    first = [eng.add_request([5 + i, 6], sp) for i in range(2)]
    eng.step()
    late = eng.add_request([9, 9, 9], sp)
    seen_late_running_with_first = False
    while eng.has_unfinished_requests():
        ids = {s.request_id for s in eng.scheduler.running}
        if late in ids and ids & set(first):
            seen_late_running_with_first = True
        eng.step()
    assert not seen_late_running_with_first


def test_request_that_can_never_fit_is_rejected():
    from jaxserve.errors import RequestTooLargeError

    eng, _ = make_engine(num_pages=10)  # 9 usable pages = 36 tokens
    with pytest.raises(RequestTooLargeError):
        eng.add_request(list(range(3, 33)), SamplingParams(max_tokens=20))


class EngineMachine(RuleBasedStateMachine):
    """Random arrivals, steps and aborts; invariants checked after every rule."""

    def __init__(self):
        super().__init__()
        self.eng, self.runner = make_engine(num_pages=30)
        self.live = set()
        self.finished = set()
        self.aborted = set()
        self.expected_len = {}

    @rule(prefix=st.sampled_from([[3, 4, 5, 6, 7, 8, 9, 10], [11, 12, 13, 14], []]),
          tail=st.lists(st.integers(3, 20), min_size=1, max_size=30),
          max_tokens=st.integers(1, 25), prio=st.sampled_from(["interactive", "batch"]))
    def add(self, prefix, tail, max_tokens, prio):
        rid = self.eng.add_request(prefix + tail, SamplingParams(temperature=0, max_tokens=max_tokens,
                                                                 ignore_eos=True), priority=prio)
        self.live.add(rid)
        self.expected_len[rid] = max_tokens

    @rule(n=st.integers(1, 6))
    def step(self, n):
        for _ in range(n):
            for ro in self.eng.step():
                if ro.finished:
                    assert ro.request_id not in self.finished
                    assert len(ro.outputs[0].token_ids) == self.expected_len[ro.request_id]
                    self.finished.add(ro.request_id)
                    self.live.discard(ro.request_id)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def abort(self, data):
        rid = data.draw(st.sampled_from(sorted(self.live)))
        assert self.eng.abort_request(rid)
        self.live.discard(rid)
        self.aborted.add(rid)

    @invariant()
    def pages_consistent(self):
        self.eng.bm.check_invariants()
        held = sum(len(self.eng.bm.block_table(s.seq_id)) for s in self.eng.scheduler.running)
        assert self.eng.bm.stats()["used"] <= held  # shared pages count once

    def teardown(self):
        fin = drain(self.eng)
        for rid in fin:
            assert rid not in self.finished
            self.finished.add(rid)
        assert self.finished | self.aborted == set(self.expected_len)
        assert not (self.finished & self.aborted)
        assert self.eng.bm.stats()["used"] == 0


TestEngineMachine = EngineMachine.TestCase
TestEngineMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None,
                                      suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("mode", ["static", "continuous"])
def test_static_batch_holds_its_decode_bucket(mode):
    """Static batching keeps the batch's width until its longest request ends; continuous shrinks (and refills)."""
    eng, runner = make_engine(scheduler=mode)
    r = np.random.default_rng(3)
    lens = [2, 3, 20, 4, 5, 9]  # 6 requests in a batch of up to 8: decode bucket 8
    for n in lens:
        eng.add_request([int(t) for t in r.integers(3, 200, 6)], SamplingParams(max_tokens=n, ignore_eos=True),
                        priority="batch")
    done = drain(eng)
    assert sorted(len(ro.outputs[0].token_ids) for ro in done.values()) == sorted(lens)
    decode_rows = [b[0] for kind, b in runner.buckets if kind == "decode"]
    live = [n for kind, n in runner.steps if kind == "decode"]
    assert min(live) == 1  # the longest request ends alone
    if mode == "static":
        assert set(decode_rows) == {8}
    else:
        assert decode_rows[-1] == 1 and max(decode_rows) == 8
