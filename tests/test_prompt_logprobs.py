"""Prompt logprobs (SamplingParams.prompt_logprobs): the prefill steps' hidden states through the scorer program,
against the cache-free reference forward (tiny random models, float32), with chunked prefill, prefix caching,
preemption, n > 1 and requests that do not ask sharing the batch. The server's side is in tests/test_server.py.
"""

import numpy as np
import pytest

from jaxserve import SamplingParams
from jaxserve.engine.runner import compile_count
from jaxserve.errors import InvalidSamplingParamsError
from jaxserve.models.reference import reference_forward

# Prompt logprobs of the paged engine (chunked prefill, paged attention) vs the reference's log_softmax, float32.
ATOL = 1e-4


def _prompts(vocab, lengths, seed=0):
    r = np.random.default_rng(seed)
    return [[int(t) for t in r.integers(3, vocab, n)] for n in lengths]


def _ref_logprobs(llm, prompt):
    import jax

    params = jax.tree.map(np.asarray, llm.engine.runner.params)
    x = np.asarray(reference_forward(llm.model_config, params, prompt), np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _check(llm, prompt, plp, n):
    """plp: one entry per prompt token, None first; each the prompt token's logprob and the top-n, as the
    reference says."""
    assert len(plp) == len(prompt) and plp[0] is None
    lsm = _ref_logprobs(llm, prompt)
    for j in range(1, len(prompt)):
        row, entry, tok = lsm[j - 1], plp[j], prompt[j]
        top = set(np.argsort(-row)[:n].tolist())  # (random weights: no ties within ATOL at the n-th place)
        assert set(entry) == top | {tok}, (j, sorted(entry), sorted(top), tok)
        for t, lp in entry.items():
            assert abs(lp - row[t]) < ATOL, (j, t, lp, row[t])


def _same(plp, other, tol=1e-5):
    assert len(plp) == len(other) and plp[0] is None and other[0] is None
    for x, y in zip(plp[1:], other[1:]):
        assert x.keys() == y.keys() and all(abs(x[t] - y[t]) < tol for t in x), (x, y)


@pytest.mark.parametrize("model,step_mode", [("tiny-llama", "buckets"), ("tiny-gemma3", "buckets"),
                                             ("tiny-llama", "ragged"), ("tiny-gemma3", "ragged")])
def test_prompt_logprobs_match_reference(llm_factory, model, step_mode):
    """Mixed lengths in one batch (1 token; within a page; a prompt longer than a prefill chunk of 64, and than
    tiny-gemma3's sliding window), top-n of 0, 1 and 5; no compile while serving. Bucketed and ragged steps (the
    ragged step's flat hidden states, chunks at their layout offsets)."""
    from tests.conftest import TINY_KW

    llm = llm_factory(model, **TINY_KW, step_mode=step_mode)
    V = llm.model_config.vocab_size
    lengths = [1, 2, 7, 40, 64, 150]
    prompts = _prompts(V, lengths, seed=1)
    tops = [3, 0, 1, 5, 2, 4]
    sps = [SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, prompt_logprobs=n, logprobs=1) for n in tops]
    before = compile_count()
    outs = llm.generate(prompts, sps)
    assert compile_count() == before, "something compiled while serving"
    for prompt, out, n in zip(prompts, outs, tops):
        _check(llm, prompt, out.prompt_logprobs, n)
        # the last prompt position predicts the first output token: a normal (sampled) logprob, not a prompt one
        lsm = _ref_logprobs(llm, prompt + out.outputs[0].token_ids)
        tok = out.outputs[0].token_ids[0]
        assert abs(out.outputs[0].logprobs[0][tok] - lsm[len(prompt) - 1, tok]) < ATOL


def test_other_requests_unaffected_and_prefix_cache(tiny_llama):
    """A request without prompt logprobs beside one that asks gets the same tokens as alone, and bitwise the same
    tokens and logprobs as beside the same request not asking; a second identical request with prompt logprobs
    recomputes its cached prompt and gets the same values, while one without takes the cache hits."""
    llm = tiny_llama
    bm = llm.engine.bm
    V = llm.model_config.vocab_size
    a, b = _prompts(V, [70, 90], seed=2)
    plain = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=2)
    asks = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=2, prompt_logprobs=2)
    not_asking = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=2)
    alone = llm.generate([a], plain)[0].outputs[0]
    bm.reset_prefix_cache()  # the same schedule for both batches below: no prefix hits
    base = llm.generate([a, b], [plain, not_asking])
    bm.reset_prefix_cache()
    both = llm.generate([a, b], [plain, asks])
    assert both[0].outputs[0].token_ids == alone.token_ids  # (greedy on random weights: no near-ties)
    for x, y in zip(base, both):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids and x.outputs[0].logprobs == y.outputs[0].logprobs
    assert both[0].prompt_logprobs is None and base[1].prompt_logprobs is None
    first = both[1].prompt_logprobs
    _check(llm, b, first, 2)
    again = llm.generate([b], asks)[0]  # b's pages are in the prefix cache now
    assert again.metrics.num_cached_prompt_tokens == 0
    _same(again.prompt_logprobs, first)  # (alone, not beside a: the same up to the summation order)
    hit = llm.generate([b], plain)[0]
    assert hit.metrics.num_cached_prompt_tokens > 0 and hit.prompt_logprobs is None


def test_n_samples_report_once(tiny_llama):
    llm = tiny_llama
    (p,) = _prompts(llm.model_config.vocab_size, [30], seed=3)
    one = llm.generate([p], SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=1))[0]
    many = llm.generate([p], SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=2, prompt_logprobs=1))[0]
    assert len(many.outputs) == 3
    _same(many.prompt_logprobs, one.prompt_logprobs)  # (3 rows vs 1: the same up to the summation order)


def _run_with_preemption(llm, prompt, sp, when):
    """Step a request by hand; preempt its sequence (the scheduler's recompute path) once `when(seq)` holds."""
    eng = llm.engine
    rid = eng.add_request(prompt, sp)
    seq = eng.requests[rid].seqs[0]
    preempted, final = False, None
    while eng.has_unfinished_requests():
        if not preempted and seq in eng.scheduler.running and when(seq):
            eng.scheduler._preempt(seq, [])
            preempted = True
        for ro in eng.step():
            final = ro
    assert preempted and seq.metrics.num_preemptions == 1
    return final


def test_preemption_neither_duplicates_nor_loses(tiny_llama):
    llm = tiny_llama
    (p,) = _prompts(llm.model_config.vocab_size, [150], seed=4)
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, prompt_logprobs=2)
    clean = llm.generate([p], sp)[0]
    # mid-prompt (one 64-token chunk done): recomputed from the start, the first chunk's positions not rescored
    mid = _run_with_preemption(llm, p, sp, lambda s: 0 < s.num_computed_tokens < len(p))
    assert mid.prompt_logprobs == clean.prompt_logprobs
    assert mid.outputs[0].token_ids == clean.outputs[0].token_ids
    # after the prompt: the recompute may take prefix-cache hits, and scores nothing again
    hits = llm.engine.bm.stats()["prefix_hit_tokens"]
    late = _run_with_preemption(llm, p, sp, lambda s: len(s.output_token_ids) >= 2)
    assert late.prompt_logprobs == clean.prompt_logprobs
    assert late.outputs[0].token_ids == clean.outputs[0].token_ids
    assert llm.engine.bm.stats()["prefix_hit_tokens"] > hits


def test_bad_values_and_unsupported_placement(tiny_llama):
    for bad in (-1, 21, True, 1.5, "2"):
        with pytest.raises(InvalidSamplingParamsError, match="prompt_logprobs"):
            SamplingParams(prompt_logprobs=bad)
    eng = tiny_llama.engine
    with pytest.raises(InvalidSamplingParamsError, match="prompt_logprobs"):
        eng.add_request([5, 6, 7], SamplingParams(prompt_logprobs=eng.cfg.max_logprobs + 1))
    runner = eng.runner
    runner.supports_prompt_logprobs = False  # what a pipeline placement's runner says
    try:
        with pytest.raises(InvalidSamplingParamsError, match="placement"):
            eng.add_request([5, 6, 7], SamplingParams(prompt_logprobs=0))
    finally:
        runner.supports_prompt_logprobs = True
    assert not eng.has_unfinished_requests()


def test_sequence_span_bookkeeping():
    """Host side: which positions of a chunk a sequence still scores (no JAX)."""
    from jaxserve.engine.request import Priority, Sequence

    s = Sequence(1, "r", 0, list(range(10, 20)), SamplingParams(prompt_logprobs=1), 0, Priority.BATCH, (2,), 64)
    assert s.prompt_logprob_span(0, 4) is None  # not asked for (the engine sets the list)
    s.prompt_logprobs = [None]
    assert s.needs_prompt_logprobs and s.prompt_logprob_span(0, 4) == (0, 4)
    s.add_prompt_logprobs(0, np.zeros(4), np.full((4, 2), 7), np.full((4, 2), -1.0))
    assert len(s.prompt_logprobs) == 5 and s.prompt_logprobs[1] == {7: -1.0, 11: 0.0}
    assert s.prompt_logprob_span(0, 8) == (4, 8)  # recompute after a preemption: positions 0..3 not again
    assert s.prompt_logprob_span(4, 6) == (4, 9)  # the last prompt position predicts an output token
    s.add_prompt_logprobs(4, np.zeros(5), np.zeros((5, 2), int), np.zeros((5, 2)))
    assert not s.needs_prompt_logprobs and s.prompt_logprob_span(0, 10) is None


_MESH_SCRIPT = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from jaxserve import LLM, SamplingParams
from jaxserve.errors import InvalidSamplingParamsError
from tests.parallel_check import SMALL_KW
prompts = [list(range(20, 45)), [5, 6, 7]]
sp = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True, prompt_logprobs=2)
res = {}
for mesh in (None, "model=2", "stage=2"):
    llm = LLM("tiny-llama", random_weights=True, mesh=mesh, **SMALL_KW)
    try:
        res[str(mesh)] = [[None if e is None else {str(k): v for k, v in e.items()} for e in o.prompt_logprobs]
                          for o in llm.generate(prompts, sp)]
    except InvalidSamplingParamsError as e:
        res[str(mesh)] = str(e)
print(json.dumps(res))
"""


def test_tensor_parallel_mesh_and_pipeline_refusal():
    """model=2 (2 forced host devices): the same prompt logprobs as one device; stage=2 (the pipeline) refuses the
    request at add_request with a message that says why."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    p = subprocess.run([sys.executable, "-c", _MESH_SCRIPT, root], cwd=root, env=env, capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert "placement" in res["stage=2"] and "pipeline" in res["stage=2"]
    for one, tp in zip(res["None"], res["model=2"]):
        assert len(one) == len(tp) and one[0] is None and tp[0] is None
        for x, y in zip(one[1:], tp[1:]):
            assert x.keys() == y.keys() and all(abs(x[k] - y[k]) < 1e-4 for k in x), (x, y)
