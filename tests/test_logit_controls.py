"""logit_bias, allowed_token_ids and bad_words (SamplingParams; OpenAI / vLLM semantics), from the host arrays
to the engine: a restricted request gets only what it allows, and the requests sharing its batch are unchanged.
The sampler's own checks (bias values, raw logprobs, random rows under a mask) are in tests/test_sampling.py."""

from __future__ import annotations

import numpy as np
import pytest

from jaxserve import SamplingParams
from jaxserve.engine.sampling_inputs import (clear_token_bits, mask_words, pack_token_mask, request_token_mask,
                                             step_token_mask)
from jaxserve.errors import InvalidSamplingParamsError

KW = dict(page_size=4, max_model_len=128, max_num_seqs=8, max_num_batched_tokens=64, max_prefill_seqs=4,
          num_pages=256, attn_block_pages=4)


def _allowed_ids(mask, V):
    bits = ((np.asarray(mask, np.int64)[:, None] >> np.arange(32)) & 1).reshape(-1)[:V]
    return set(np.nonzero(bits)[0].tolist())


def test_mask_packing():
    V = 100
    assert mask_words(V) == 4 and mask_words(96) == 3
    m = pack_token_mask([0, 31, 32, 99], V)
    assert m.dtype == np.int32 and _allowed_ids(m, V) == {0, 31, 32, 99}
    assert _allowed_ids(clear_token_bits(m, [31, 99], V), V) == {0, 32}
    assert _allowed_ids(clear_token_bits(None, [5], V), V) == set(range(V)) - {5}
    assert _allowed_ids(m, V) == {0, 31, 32, 99}  # cleared on a copy


def test_bad_words_become_static_bans_and_tail_matches():
    vocab = {"bad": [7], " bad": [8], "two words": [3, 4], " two words": [5, 3, 4]}
    sp = SamplingParams(bad_words=["bad", "two words"])
    static, seqs = request_token_mask(sp, 64, encode=lambda t: vocab[t])
    assert _allowed_ids(static, 64) == set(range(64)) - {7, 8}
    assert seqs == [(3, 4), (5, 3, 4)]
    assert step_token_mask(static, seqs, [1, 2], 64) is static  # no tail matches
    assert _allowed_ids(step_token_mask(static, seqs, [1, 3], 64), 64) == set(range(64)) - {7, 8, 4}
    assert _allowed_ids(step_token_mask(None, [(5, 3, 4)], [5, 3], 64), 64) == set(range(64)) - {4}
    allowed, _ = request_token_mask(SamplingParams(allowed_token_ids=[1, 7, 9]), 64)
    assert _allowed_ids(allowed, 64) == {1, 7, 9}


@pytest.mark.parametrize("kw, match", [
    (dict(logit_bias={"x": 1}), "integer token ids"),
    (dict(logit_bias={5: 101}), r"\[-100, 100\]"),
    (dict(logit_bias={i: 1 for i in range(301)}), "at most 300"),
    (dict(allowed_token_ids=[]), "non-empty"),
    (dict(bad_words=[""]), "non-empty strings"),
])
def test_bad_parameters_are_clear_errors(kw, match):
    with pytest.raises(InvalidSamplingParamsError, match=match):
        SamplingParams(**kw)


def test_engine_honours_the_controls_and_leaves_other_rows_alone(llm_factory):
    llm = llm_factory("tiny-llama", **KW)
    V = llm.engine.model_cfg.vocab_size
    prompts = ["the quick brown fox", "hello there", "a b c d e f"]
    plain = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
    ref = [o.outputs[0] for o in llm.generate(prompts, plain, use_tqdm=False)]

    # logit_bias +100 on one id: greedy picks it every time; logprobs stay those of the raw distribution
    t = (ref[0].token_ids[0] + 17) % V
    biased = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2, logit_bias={t: 100})
    allowed = {3, 11, 200, 301}
    restricted = SamplingParams(temperature=1.0, seed=5, max_tokens=12, ignore_eos=True, allowed_token_ids=allowed)
    outs = llm.generate(prompts, [biased, restricted, plain], use_tqdm=False)
    assert outs[0].outputs[0].token_ids == [t] * 12
    assert all(lp[t] < 0 for lp in outs[0].outputs[0].logprobs)  # raw: not pushed to ~0 by the bias
    assert set(outs[1].outputs[0].token_ids) <= allowed
    assert outs[2].outputs[0].token_ids == ref[2].token_ids  # the unrestricted neighbour is unchanged
    assert outs[2].outputs[0].logprobs == ref[2].logprobs
    # -100 on the greedy choice moves greedy off it
    avoid = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, logit_bias={ref[1].token_ids[0]: -100})
    assert llm.generate([prompts[1]], avoid, use_tqdm=False)[0].outputs[0].token_ids[0] != ref[1].token_ids[0]

    # bad_words beat logit_bias: a one-token word pushed by +100 is still never said
    tok = llm.tokenizer
    b = next(i for i in range(300, V) if tok.decode([i]).strip() and tok.encode(tok.decode([i]), add_bos=False) == [i])
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logit_bias={b: 100}, bad_words=[tok.decode([b])])
    got = llm.generate([prompts[0]], sp, use_tqdm=False)[0].outputs[0].token_ids
    assert b not in got
    assert llm.generate([prompts[0]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, logit_bias={b: 100}),
                        use_tqdm=False)[0].outputs[0].token_ids == [b] * 3  # (the bias alone would say it)

    with pytest.raises(InvalidSamplingParamsError, match="outside the vocabulary"):
        llm.generate(["x"], SamplingParams(logit_bias={V: 1.0}), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


def test_speculative_verify_applies_the_mask():
    """A verify step samples every position under the mask as it stands after the drafts before it."""
    from jaxserve import LLM

    llm = LLM("tiny-gemma3", random_weights=True, speculative={"method": "ngram", "num_tokens": 3, "adaptive": False},
              **dict(KW, max_num_seqs=4, max_prefill_seqs=1))
    allowed = [5, 9, 12]
    # a repetitive prompt so the n-gram proposer drafts tokens, some of them outside the allowed set
    prompt = [5, 9, 12, 40, 41, 5, 9, 12, 40, 41, 5, 9, 12, 40, 41]
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, allowed_token_ids=allowed)
    out = llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0].token_ids
    assert set(out) <= set(allowed)
    # the same request without speculation gives the same tokens (greedy verification is exact)
    plain = LLM("tiny-gemma3", random_weights=True, **dict(KW, max_num_seqs=4, max_prefill_seqs=1))
    assert plain.generate([prompt], sp, use_tqdm=False)[0].outputs[0].token_ids == out
    assert llm.engine.speculator.proposed > 0
