"""The paged, bucketed engine against the cache-free reference forward (tiny random models)."""

import numpy as np
import pytest

from jaxserve import SamplingParams
from jaxserve.engine.runner import compile_count
from jaxserve.models.reference import reference_forward

# Logprobs of the paged engine vs the cache-free reference, float32 throughout.
LOGPROB_ATOL = 2e-4


def _params(llm):
    import jax

    return jax.tree.map(np.asarray, llm.engine.runner.params)


def _mixed_prompts(vocab, lengths, seed=0):
    r = np.random.default_rng(seed)
    return [[int(t) for t in r.integers(3, vocab, n)] for n in lengths]


def _check_against_reference(llm, prompts, outs, max_new):
    """Every generated token must be an argmax of the reference logits (within tolerance), and the engine's
    reported logprobs must equal the reference log-softmax."""
    cfg = llm.model_config
    params = _params(llm)
    exact = 0
    for prompt, out in zip(prompts, outs):
        c = out.outputs[0]
        assert len(c.token_ids) == max_new, (len(prompt), c.finish_reason)
        full = prompt + c.token_ids
        logits = np.asarray(reference_forward(cfg, params, full))
        mx = logits.max(-1, keepdims=True)
        lsm = logits - mx - np.log(np.exp(logits - mx).sum(-1, keepdims=True))
        for j, tok in enumerate(c.token_ids):
            row = lsm[len(prompt) - 1 + j]
            assert row[tok] >= row.max() - 1e-4, f"step {j}: token {tok} is not the reference argmax"
            got = c.logprobs[j][tok]
            assert abs(got - row[tok]) < LOGPROB_ATOL, (j, got, row[tok])
        exact += int(all(lsm[len(prompt) - 1 + j].argmax() == t for j, t in enumerate(c.token_ids)))
    assert exact >= len(prompts) - 1  # ties within 1e-4 are vanishingly rare with random weights


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gemma3", "tiny-qwen2"])
def test_greedy_matches_reference_mixed_batch(llm_factory, model):
    from tests.conftest import TINY_KW

    llm = llm_factory(model, **TINY_KW)
    # Lengths cross page (4) and block (16) boundaries, exceed one prefill chunk (64), and for tiny-gemma3
    # exceed its 24-token sliding window.
    lengths = [1, 3, 4, 5, 17, 31, 64, 65, 100, 150]
    prompts = _mixed_prompts(llm.model_config.vocab_size, lengths)
    max_new = 12
    sp = SamplingParams(temperature=0.0, max_tokens=max_new, ignore_eos=True, logprobs=1)
    outs = llm.generate(prompts, sp)
    assert [o.prompt_token_ids for o in outs] == prompts
    _check_against_reference(llm, prompts, outs, max_new)


def test_no_compilation_after_warmup(tiny_llama):
    llm = tiny_llama
    before = compile_count()
    prompts = _mixed_prompts(llm.model_config.vocab_size, [2, 9, 33, 70, 120, 7, 64, 5], seed=3)
    sps = [SamplingParams(temperature=t, top_p=p, top_k=k, max_tokens=m, seed=i, ignore_eos=True,
                          repetition_penalty=rp, logprobs=lp)
           for i, (t, p, k, m, rp, lp) in enumerate([(0, 1, 0, 5, 1, None), (0.7, 0.9, 0, 20, 1, 2),
                                                   (1.0, 1, 40, 9, 1.2, None), (0, 1, 0, 3, 1, 5),
                                                   (0.5, 0.5, 5, 30, 1, None), (1.3, 1, 0, 1, 1, None),
                                                   (0, 1, 0, 17, 1.1, 0), (0.9, 0.95, 50, 12, 1, 3)])]
    outs = llm.generate(prompts, sps)
    assert [len(o.outputs[0].token_ids) for o in outs] == [5, 20, 9, 3, 30, 1, 17, 12]
    assert compile_count() == before, "something compiled while serving"
    r = llm.engine.runner
    if r.ragged:  # (EngineConfig.step_mode "auto" on one device: ragged steps, models/ragged.py)
        assert sorted(r.ragged_programs) == r.ragged_ladder() and not r.compiled_buckets()
    else:
        assert set(r.compiled_buckets()) == set(r.buckets())


def test_one_device_is_a_one_device_mesh(tiny_llama):
    """Without a mesh the runner's placement is the 1 x 1 mesh of the first device; params and KV pages live on it."""
    import jax

    pl = tiny_llama.engine.runner.placement
    assert pl.mesh.size == 1 and pl.mesh.devices.flat[0] == jax.devices()[0] and (pl.t, pl.p) == (1, 1)
    for a in jax.tree.leaves((tiny_llama.engine.runner.params, tiny_llama.engine.runner.kv)):
        assert a.sharding.mesh == pl.mesh and a.sharding.is_fully_replicated


def test_pages_freed_after_generation(tiny_llama):
    llm = tiny_llama
    prompts = _mixed_prompts(llm.model_config.vocab_size, [10, 50, 90], seed=5)
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    stats = llm.engine.bm.stats()
    assert stats["used"] == 0
    llm.engine.bm.check_invariants()


def test_metrics_report_latency_percentiles(tiny_llama):
    from jaxserve.engine.engine import _percentiles

    assert _percentiles("x", []) == {"x_p50": None, "x_p99": None}
    assert _percentiles("x", [3.0, 1.0, 2.0]) == {"x_p50": 2.0, "x_p99": 3.0}
    assert _percentiles("x", list(range(1, 101))) == {"x_p50": 50, "x_p99": 99}
    llm = tiny_llama
    before = llm.engine.metrics()["requests_finished"]
    llm.generate(_mixed_prompts(llm.model_config.vocab_size, [5, 30], seed=9),
                 SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    m = llm.engine.metrics()
    assert m["requests_finished"] == before + 2
    assert m["num_running"] == 0 and m["kv_pages_used"] == 0
    assert 0 < m["ttft_s_p50"] <= m["ttft_s_p99"]
    assert 0 < m["tpot_s_p50"] <= m["tpot_s_p99"]


def test_step_time_split_into_host_and_device(tiny_llama):
    """Every step's wall time is split into the runner's device wait (dispatch -> sampled ids on the host) and the
    rest; both are counted, per step, and add up to the time spent inside step()."""
    import time

    llm = tiny_llama
    st, runner = llm.engine.stats, llm.engine.runner
    steps0, host0, dev0, run_dev0 = st.steps, st.host_seconds, st.device_seconds, runner.device_seconds
    t0 = time.perf_counter()
    llm.generate(_mixed_prompts(llm.model_config.vocab_size, [5, 30], seed=10),
                 SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    wall = time.perf_counter() - t0
    steps, host, dev = st.steps - steps0, st.host_seconds - host0, st.device_seconds - dev0
    assert steps > 0 and host > 0 and dev > 0
    assert dev == pytest.approx(runner.device_seconds - run_dev0)  # the runner's own count, nothing else
    assert host + dev <= wall
    m = llm.engine.metrics()
    assert m["host_ms_per_step"] == pytest.approx(1e3 * st.host_seconds / st.steps)
    assert m["device_ms_per_step"] == pytest.approx(1e3 * st.device_seconds / st.steps)
    assert m["step_device_seconds"] == st.device_seconds
