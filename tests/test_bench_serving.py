"""scripts/serving_bench (scripts/bench_serving.py): the workload generator, the metric functions and the measuring loop, on a tiny
random model (fast; no torch)."""

import contextlib
import dataclasses
import math
from types import SimpleNamespace

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import serving_bench as bs  # noqa: E402
from tests.conftest import TINY_KW, get_llm  # noqa: E402

CORPUS = list(range(3, 500)) * 4  # token ids inside tiny-llama's 512-token vocabulary
SPEC = bs.WorkloadSpec(num_requests=12, prompt_median=24, prompt_sigma=1.0, prompt_min=4, prompt_max=64,
                       output_median=8, output_sigma=1.0, output_min=2, output_max=20, seed=3)


# ------------------------------------------------------------------------------------------ workload


def test_lognormal_lengths_seeded_and_clipped():
    a = bs.lognormal_lengths(np.random.default_rng(5), 2000, 100, 1.5, 16, 1024)
    b = bs.lognormal_lengths(np.random.default_rng(5), 2000, 100, 1.5, 16, 1024)
    c = bs.lognormal_lengths(np.random.default_rng(6), 2000, 100, 1.5, 16, 1024)
    assert a == b and a != c
    assert all(isinstance(x, int) and 16 <= x <= 1024 for x in a)
    assert min(a) == 16 and max(a) == 1024  # sigma 1.5 reaches both clips
    assert 80 <= np.median(a) <= 125  # median of the log-normal survives clipping
    with pytest.raises(ValueError):
        bs.lognormal_lengths(np.random.default_rng(0), 3, 10, 1, 8, 4)


def test_make_workload_deterministic_windows_within_bounds():
    w1 = bs.make_workload(CORPUS, SPEC, bos_id=1)
    w2 = bs.make_workload(CORPUS, SPEC, bos_id=1)
    w3 = bs.make_workload(CORPUS, bs.WorkloadSpec(**{**SPEC.__dict__, "seed": 4}), bos_id=1)
    assert [(r.prompt_ids, r.output_len) for r in w1] == [(r.prompt_ids, r.output_len) for r in w2]
    assert [r.prompt_ids for r in w1] != [r.prompt_ids for r in w3]
    assert len(w1) == SPEC.num_requests and [r.index for r in w1] == list(range(len(w1)))
    for r in w1:
        assert SPEC.prompt_min <= r.prompt_len <= SPEC.prompt_max
        assert SPEC.output_min <= r.output_len <= SPEC.output_max
        assert r.prompt_ids[0] == 1
        body = r.prompt_ids[1:]  # a contiguous window of the corpus
        assert any(CORPUS[o:o + len(body)] == body for o in range(len(CORPUS) - len(body) + 1))
    assert bs.make_workload(CORPUS, SPEC, bos_id=None)[0].prompt_len == w1[0].prompt_len


def test_default_workload_spec_meets_the_brief():
    spec = bs.WorkloadSpec()
    assert spec.num_requests >= 64
    assert (spec.prompt_min, spec.prompt_max, spec.output_min, spec.output_max) == (16, 1024, 8, 512)


def test_corpus_is_real_text_tokenized_by_the_model_tokenizer():
    from jaxserve.config import PRESETS
    from jaxserve.weights.tokenizer import tokenizer_for_config

    text = bs.corpus_text()
    assert len(text) > 100_000 and "the" in text.split()
    tok = tokenizer_for_config(PRESETS["tiny-llama"])
    ids = bs.corpus_token_ids(tok)
    assert len(ids) > 10_000 and all(0 <= t < 512 for t in ids[:1000])
    assert ids[0] != tok.bos_id or text.startswith(tok.bos_token)


def test_poisson_arrivals():
    a = bs.poisson_arrivals(20_000, rate=4.0, seed=1)
    assert a == bs.poisson_arrivals(20_000, rate=4.0, seed=1) != bs.poisson_arrivals(20_000, rate=4.0, seed=2)
    assert a[0] == 0.0 and all(y >= x for x, y in zip(a, a[1:]))
    gaps = np.diff(a)
    assert abs(gaps.mean() - 0.25) < 0.0125  # mean gap 1/rate
    assert abs(gaps.std() / gaps.mean() - 1.0) < 0.05  # exponential: coefficient of variation 1
    with pytest.raises(ValueError):
        bs.poisson_arrivals(3, rate=0)


def test_prefix_workload_shares_exactly_the_system_prompt():
    system, warm, prompts = bs.make_prefix_workload(CORPUS, 5, 40, 4, 8, seed=0, bos_id=1)
    assert len(system) == 40 and system[0] == 1 and len(prompts) == 10
    for p in [warm] + prompts:
        assert p[:40] == system and 4 <= len(p) - 40 <= 8
    assert len({tuple(p) for p in [warm] + prompts}) == 11


# ------------------------------------------------------------------------------------------ metrics


def test_percentile_matches_numpy_and_hand_values():
    assert bs.percentile([], 50) is None
    assert bs.percentile([7.0], 99) == 7.0
    assert bs.percentile([1, 2, 3, 4], 50) == 2.5
    assert bs.percentile(list(range(101)), 99) == 99.0
    assert bs.percentile([3, 1, 2], 0) == 1 and bs.percentile([3, 1, 2], 100) == 3
    rng = np.random.default_rng(0)
    for n in (2, 5, 64, 101):
        x = rng.exponential(size=n)
        for q in (0, 1, 50, 90, 99, 100):
            assert math.isclose(bs.percentile(x, q), float(np.percentile(x, q)), rel_tol=1e-12)
    with pytest.raises(ValueError):
        bs.percentile([1, 2], 101)


def test_summarize():
    recs = [{"prompt_tokens": 10, "output_tokens": 4, "ttft_s": 0.1, "tpot_s": 0.02, "e2e_s": 0.16},
            {"prompt_tokens": 20, "output_tokens": 1, "ttft_s": 0.3, "tpot_s": None, "e2e_s": 0.3},
            {"prompt_tokens": 30, "output_tokens": 5, "ttft_s": 0.2, "tpot_s": 0.04, "e2e_s": 0.36}]
    s = bs.summarize(recs, 2.0)
    assert s["num_requests"] == 3 and s["prompt_tokens"] == 60 and s["output_tokens"] == 10
    assert s["output_tok_s"] == 5.0 and s["requests_s"] == 1.5
    assert math.isclose(s["ttft_ms_p50"], 200.0) and math.isclose(s["ttft_ms_p99"], 298.0)
    assert math.isclose(s["tpot_ms_p50"], 30.0) and math.isclose(s["tpot_ms_mean"], 30.0)  # None skipped
    assert math.isclose(s["e2e_s_p50"], 0.3)


# ------------------------------------------------------------------------------------------ measuring, tiny model


@contextlib.contextmanager
def sibling(llm, **overrides):
    """An engine with other scheduler/cache settings on `llm`'s compiled runner (same program shapes), so the
    test compiles nothing more. The two engines share the KV pages, so `llm`'s prefix cache is dropped after."""
    from jaxserve.engine.engine import LLMEngine

    cfg = dataclasses.replace(llm.engine_config, **overrides)
    eng = LLMEngine(llm.model_config, cfg, None, llm.tokenizer, num_pages=llm.engine.num_pages,
                    runner=llm.engine.runner)
    llm.engine.bm.reset_prefix_cache()
    try:
        yield SimpleNamespace(engine=eng, engine_config=cfg, model_config=llm.model_config,
                              tokenizer=llm.tokenizer, get_metrics=eng.metrics)
    finally:
        llm.engine.bm.reset_prefix_cache()


def _check_run(r, reqs, arrivals=None):
    recs, s, e = r["requests"], r["summary"], r["engine"]
    assert [q["index"] for q in recs] == list(range(len(reqs)))
    for q, req in zip(recs, reqs):
        assert q["output_tokens"] == q["requested_tokens"] == req.output_len  # ignore_eos + max_tokens
        assert q["finish_reason"] == "length" and q["prompt_tokens"] == req.prompt_len
        assert 0 < q["ttft_s"] <= q["e2e_s"] <= s["duration_s"] + 1e-9
        assert q["submit_delay_s"] >= 0
        assert (q["tpot_s"] is None) == (req.output_len < 2)
        if arrivals is not None:
            assert q["arrival_offset_s"] == arrivals[q["index"]]
    assert s["num_requests"] == len(reqs)
    assert s["output_tokens"] == sum(r.output_len for r in reqs)
    assert s["prompt_tokens"] == sum(r.prompt_len for r in reqs)
    assert math.isclose(s["output_tok_s"], s["output_tokens"] / s["duration_s"])
    assert e["preemptions"] == 0 and e["prefix_hit_tokens"] == 0  # cache reset, distinct prompts
    # Counts add up: each request's first token comes from its last prefill chunk, every other from a
    # decode row; every prompt token was prefilled once.
    assert e["decode_rows"] + len(reqs) == s["output_tokens"]
    assert e["prefill_tokens"] == s["prompt_tokens"]
    assert 1 <= e["max_running"] <= len(reqs)


def test_run_workload_tiny_offline_poisson_static():
    llm = get_llm("tiny-llama", **TINY_KW)
    reqs = bs.make_workload(CORPUS, SPEC, bos_id=llm.model_config.bos_token_id)
    bs.warm_up(llm, CORPUS, lengths=(10, 40), output_len=3)
    off = bs.run_workload(llm, reqs, label="t-off")
    _check_run(off, reqs)
    assert off["engine"]["max_running"] == min(len(reqs), TINY_KW["max_num_seqs"])
    # Same prompts again: the prefix cache is reset first, so no hits leak in from the offline run.
    arr = bs.poisson_arrivals(len(reqs), rate=200.0, seed=0)
    poi = bs.run_workload(llm, reqs, arr, label="t-poi")
    _check_run(poi, reqs, arr)
    assert poi["summary"]["duration_s"] >= arr[-1]
    assert not llm.engine.has_unfinished_requests()

    # (the static scheduler runs bucketed steps: its sibling shares a bucketed engine's runner)
    with sibling(get_llm("tiny-llama", **TINY_KW, step_mode="buckets"), scheduler="static") as static:
        assert static.engine.scheduler.mode == "static"
        st = bs.run_workload(static, reqs, label="t-static")
    _check_run(st, reqs)
    assert st["engine"]["max_running"] <= TINY_KW["max_num_seqs"]
    # Same work, same tokens, whatever the scheduler.
    assert st["summary"]["output_tokens"] == off["summary"]["output_tokens"]
    # The host-only replay of the scheduler takes exactly the steps the real runs took.
    setup = (llm.engine_config, llm.engine.num_pages, llm.engine.max_model_len)
    for run, mode in ((off, "continuous"), (st, "static")):
        rp = bs.replay_schedule(reqs, *setup, mode, ragged=mode == "continuous" and llm.engine.ragged)
        for k in ("prefill_steps", "decode_steps", "decode_rows"):
            assert rp[k] == run["engine"][k], (mode, k, rp[k], run["engine"][k])
        assert sum(rp["decode_buckets"].values()) == rp["decode_steps"]
        assert rp["prefill_padded_tokens"] >= run["engine"]["prefill_tokens"]
    ce = bs.offline_ceiling(off, st, TINY_KW["max_num_seqs"])
    full = st["engine"]["decode_s"] / st["engine"]["decode_steps"]
    assert ce["full_decode_step_s"] == pytest.approx(full)
    assert ce["ceiling"] == pytest.approx(st["summary"]["duration_s"] / (
        off["engine"]["prefill_s"] + off["summary"]["output_tokens"] / TINY_KW["max_num_seqs"] * full))
    for run in (off, poi, st):  # this process's CPU time over the run, and tokens per CPU-second from it
        s = run["summary"]
        assert s["cpu_s"] > 0 and s["output_tok_per_cpu_s"] == pytest.approx(s["output_tokens"] / s["cpu_s"])


def test_prefix_experiment_tiny():
    on = get_llm("tiny-llama", **TINY_KW)
    system, warm, prompts = bs.make_prefix_workload(CORPUS, 3, 32, 4, 8, seed=0, bos_id=1)
    r_on = bs.run_prefix_experiment(on, system, warm, prompts, output_len=3, label="t-pc-on")
    with sibling(on, enable_prefix_caching=False) as off:
        r_off = bs.run_prefix_experiment(off, system, warm, prompts, output_len=3, label="t-pc-off")
    for kind in ("sequential", "burst"):
        on_recs, off_recs = r_on[kind]["requests"], r_off[kind]["requests"]
        assert len(on_recs) == len(off_recs) == 3
        assert all(q["num_cached_prompt_tokens"] == 32 for q in on_recs)  # the whole system prompt (8 pages)
        assert all(q["num_cached_prompt_tokens"] == 0 for q in off_recs)
        assert all(q["output_tokens"] == 3 for q in on_recs + off_recs)
        hits, queried = r_on[kind]["engine"]["prefix_hit_tokens"], r_on[kind]["engine"]["prefix_query_tokens"]
        assert hits == 3 * 32 and queried == sum(len(p) for p in (prompts[:3] if kind == "sequential" else prompts[3:]))
        assert r_off[kind]["engine"]["prefix_hit_rate"] == 0.0
    assert r_on["warm_request"]["num_cached_prompt_tokens"] == 0
    assert 0 < r_on["engine_metrics"]["prefix_hit_rate"] <= 1


def test_engine_kwargs_fit_the_longest_requests():
    kw = bs.engine_kwargs(bs.WorkloadSpec(), 64, 2048, prefix_len=1100)
    assert kw["max_num_seqs"] == 64 and kw["max_model_len"] == 2048
    assert (kw["num_pages"] - 1) * kw["page_size"] >= 64 * (1024 + 512)


def test_plot_sweep_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    pts = [{"max_num_seqs": b, "output_tok_s": 10.0 * b, "tpot_ms_p50": 5.0 + b, "tpot_ms_p99": 9.0 + b}
           for b in (1, 4, 16)]
    path = tmp_path / "sweep.png"
    bs.plot_sweep(pts, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_args():
    args, spec = bs.parse_args(["--quick"])
    assert spec.num_requests == 16 and spec.prompt_max == 256 and args.sweep == [1, 4, 16]
    args, spec = bs.parse_args([])
    assert spec.num_requests == 64 and args.sweep == [1, 2, 4, 8, 16, 32, 64] and args.hf_max_requests == 16
    assert (spec.prompt_sigma, spec.output_sigma) == (1.0, 1.0)
    _, spec = bs.parse_args(["--output-sigma", "1.5", "--prompt-median", "64"])
    assert (spec.prompt_sigma, spec.output_sigma, spec.prompt_median) == (1.0, 1.5, 64.0)


def test_decode_step_bound_by_hand():
    # batches of 2 in arrival order: max(10, 2) + max(4, 4) = 14 static steps; continuous needs at least
    # max(ceil(20 / 2), 10) = 10 steps
    b = bs.decode_step_bound([10, 2, 4, 4], 2)
    assert b == {"static_decode_steps": 14, "continuous_decode_steps_min": 10, "ratio_bound": 1.4}
    # one batch holding everything: continuous can do no better than static
    assert bs.decode_step_bound([10, 2, 4, 4], 8)["ratio_bound"] == 1.0
    # the longest request bounds continuous from below even when slots are plentiful
    assert bs.decode_step_bound([30, 1, 1, 1], 2)["continuous_decode_steps_min"] == 30
