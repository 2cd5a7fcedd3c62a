"""Prompt logprobs of the real Gemma 3 270M against HF transformers' float32 Gemma 3 on the same GGUF.

Two references: tests/data/gemma3_270m_hf_reference.json (HF's greedy continuation of each prompt, with the
top-5 raw logits and logsumexp of every step; no torch needed): sent back as a prompt (prompt + HF's tokens),
the positions of the continuation are prompt positions whose logprobs HF recorded; and, where torch and
transformers (the test extra) and accelerate are installed, HF's full-sequence forward over a whole prompt. Tolerance as in
tests/test_gemma3_real.py: 0.02 nats (both float32, summed in different orders through 18 layers).
"""

import json
import os

import numpy as np
import pytest

from jaxserve import SamplingParams

pytestmark = pytest.mark.slow

REF = json.load(open(os.path.join(os.path.dirname(__file__), "data", "gemma3_270m_hf_reference.json")))
LOGPROB_ATOL = 0.02
N_TOKENS = 32


def test_prompt_logprobs_match_hf_reference(gemma):
    # The stored prompts include ones longer than a prefill chunk (512 tokens): chunked prefill is covered.
    prompts = [p["prompt_ids"] + p["generated_ids"][:N_TOKENS] for p in REF["prompts"]]
    outs = gemma.generate(prompts, SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=5))
    worst = 0.0
    for ref, prompt, out in zip(REF["prompts"], prompts, outs):
        plp = out.prompt_logprobs
        assert len(plp) == len(prompt) and plp[0] is None
        L = len(ref["prompt_ids"])
        for step, (ids, logits, lse) in enumerate(zip(ref["step_top_ids"][:N_TOKENS], ref["step_top_logits"],
                                                      ref["step_logsumexp"])):
            entry = plp[L + step]  # the logprobs at position L - 1 + step, which predicted HF's token `step`
            ref_lp = {int(t): float(v) - float(lse) for t, v in zip(ids, logits)}
            top = sorted(entry.items(), key=lambda kv: -kv[1])[:5]
            assert {t for t, _ in top} == set(ref_lp), (ref["name"], step, top, ref_lp)
            worst = max(worst, *(abs(entry[t] - lp) for t, lp in ref_lp.items()))
    assert worst < LOGPROB_ATOL, worst


def test_prompt_logprobs_match_hf_forward(gemma):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers' GGUF loading needs it (the bench extra has it)
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
    import hf_baseline

    model, _ = hf_baseline.load_hf_gemma3()
    prompt = max((p["prompt_ids"] for p in REF["prompts"]), key=len)[:600]  # > one 512-token chunk
    with torch.inference_mode():
        logits = model(torch.tensor([prompt]), use_cache=False).logits[0].float()
    ref = torch.log_softmax(logits, dim=-1).numpy()
    out = gemma.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=3))[0]
    got = np.array([out.prompt_logprobs[j][prompt[j]] for j in range(1, len(prompt))])
    want = ref[np.arange(len(prompt) - 1), prompt[1:]]
    assert np.abs(got - want).max() < LOGPROB_ATOL, np.abs(got - want).max()
