"""The Python API: bad input gets a clear jaxserve error and the engine keeps serving; stop strings, seeds,
stop tokens, max_tokens, logprobs, streaming, chat."""

import numpy as np
import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.errors import InvalidPromptError, InvalidSamplingParamsError, JaxserveError, UnknownModelError


def _finish_all(llm):
    done = {}
    while llm.engine.has_unfinished_requests():
        for ro in llm.engine.step():
            if ro.finished:
                done[ro.request_id] = ro
    return done


@pytest.mark.parametrize("kwargs", [
    dict(max_tokens=0), dict(max_tokens=-3), dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5),
    dict(min_p=2.0), dict(repetition_penalty=0.0), dict(presence_penalty=3.0), dict(logprobs=99), dict(n=0),
])
def test_bad_sampling_params_raise(kwargs):
    with pytest.raises(InvalidSamplingParamsError):
        SamplingParams(**kwargs)


def test_bad_input_keeps_other_requests_running(tiny_llama):
    llm = tiny_llama
    eng = llm.engine
    good = [eng.add_request([5, 6, 7, 8], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)),
            eng.add_request("hello world", SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))]
    eng.step()  # the good requests are mid-flight when the bad ones arrive
    too_long = list(range(3, 3 + eng.max_model_len))
    for bad_prompt in ["", [], too_long, [1, 2, 10**9], [-1]]:
        with pytest.raises(InvalidPromptError):
            eng.add_request(bad_prompt, SamplingParams(max_tokens=4))
    with pytest.raises(InvalidSamplingParamsError):
        eng.add_request([5, 6], SamplingParams(max_tokens=2), priority="urgent")
    with pytest.raises(InvalidSamplingParamsError):
        bad = SamplingParams(max_tokens=4)
        bad.temperature = -1.0  # mutated after construction: caught again at admission
        eng.add_request([5, 6], bad)
    done = _finish_all(llm)
    assert set(done) == set(good)
    assert [len(done[g].outputs[0].token_ids) for g in good] == [6, 4]
    assert eng.bm.stats()["used"] == 0


def test_generate_rejects_bad_prompt_atomically(tiny_llama):
    with pytest.raises(InvalidPromptError):
        tiny_llama.generate(["fine", ""], SamplingParams(max_tokens=2))
    assert not tiny_llama.engine.has_unfinished_requests()


def test_unknown_model_name():
    with pytest.raises(UnknownModelError) as e:
        LLM("no-such-model-xyz")
    assert "no-such-model-xyz" in str(e.value)
    assert isinstance(e.value, JaxserveError)


def test_unknown_engine_argument():
    with pytest.raises(TypeError):
        LLM("tiny-llama", random_weights=True, page_sise=4)


def test_max_tokens_and_finish_reason(tiny_llama):
    out = tiny_llama.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=7, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 7
    assert out.outputs[0].finish_reason == "length"


def test_stop_token_ids(tiny_llama):
    sp = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    base = tiny_llama.generate([[9, 10, 11]], sp)[0].outputs[0].token_ids
    stop_at = base[4]
    first = base.index(stop_at)
    out = tiny_llama.generate([[9, 10, 11]], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                                                            stop_token_ids=[stop_at]))[0].outputs[0]
    assert out.token_ids == base[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at


def test_min_tokens_bans_stop_ids(tiny_llama):
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    base = tiny_llama.generate([[9, 10, 11]], sp)[0].outputs[0].token_ids
    stop = base[0]
    out = tiny_llama.generate([[9, 10, 11]], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                            stop_token_ids=[stop], min_tokens=3))[0].outputs[0]
    assert stop not in out.token_ids[:3]


def test_stop_strings_excluded_from_text(tiny_llama):
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    full = tiny_llama.generate(["the quick brown"], sp)[0].outputs[0].text
    assert len(full) > 6
    stop = full[3:6]
    idx = full.index(stop)
    out = tiny_llama.generate(["the quick brown"], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                                               stop=[stop]))[0].outputs[0]
    assert out.text == full[:idx]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    inc = tiny_llama.generate(["the quick brown"], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                                               stop=[stop], include_stop_str_in_output=True))[0]
    assert inc.outputs[0].text == full[: idx + len(stop)]


def test_seed_reproducible_and_batch_independent(tiny_llama):
    sp = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=16, seed=1234, ignore_eos=True)
    alone = tiny_llama.generate([[7, 8, 9]], sp)[0].outputs[0].token_ids
    crowd = tiny_llama.generate([[3, 4]] * 3 + [[7, 8, 9]] + [[5]] * 2,
                                [SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)] * 3 + [sp]
                                + [SamplingParams(temperature=0.5, max_tokens=5, ignore_eos=True)] * 2)
    assert crowd[3].outputs[0].token_ids == alone
    other = tiny_llama.generate([[7, 8, 9]], SamplingParams(temperature=1.0, top_p=0.95, max_tokens=16, seed=99,
                                                            ignore_eos=True))[0].outputs[0].token_ids
    assert other != alone


def test_n_samples_differ(tiny_llama):
    out = tiny_llama.generate([[7, 8, 9]], SamplingParams(n=3, temperature=1.0, max_tokens=10, seed=5,
                                                          ignore_eos=True))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) == 3


def test_logprobs_topn(tiny_llama):
    out = tiny_llama.generate([[7, 8, 9]], SamplingParams(temperature=0, max_tokens=5, logprobs=3,
                                                          ignore_eos=True))[0].outputs[0]
    assert len(out.logprobs) == 5
    for tok, lp in zip(out.token_ids, out.logprobs):
        assert tok in lp and 3 <= len(lp) <= 4
        assert lp[tok] == pytest.approx(max(lp.values()), abs=1e-6)  # greedy picks the top logprob
        assert all(v <= 0.0 for v in lp.values())
    assert out.cumulative_logprob == pytest.approx(sum(lp[t] for t, lp in zip(out.token_ids, out.logprobs)), rel=1e-5)


def test_stream_matches_generate(tiny_llama):
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    full = tiny_llama.generate(["a streaming prompt"], sp)[0].outputs[0].text
    pieces = list(tiny_llama.stream("a streaming prompt", sp))
    assert "".join(pieces) == full
    assert len(pieces) >= 2


def test_abort_frees_pages(tiny_llama):
    eng = tiny_llama.engine
    rid = eng.add_request(list(range(5, 60)), SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    eng.step()
    assert eng.bm.stats()["used"] > 0
    assert eng.abort_request(rid)
    assert eng.bm.stats()["used"] == 0
    assert not eng.has_unfinished_requests()
