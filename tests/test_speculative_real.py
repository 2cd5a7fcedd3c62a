"""Gemma 3 270M: greedy output with speculation is identical to without, for 16 prompts and every proposer,
in continuous batches (4 rows); and seeded sampling reproduces the target's draws. One engine per configuration,
built once for this file and dropped at the end (each holds ~1 GB)."""

import gc

import pytest

from jaxserve import LLM, SamplingParams

pytestmark = pytest.mark.slow

KW = dict(max_model_len=512, max_num_seqs=4, max_num_batched_tokens=128, max_prefill_seqs=2, num_pages=256)
PROMPTS = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "The capital of France is",
    "1. apples\n2. oranges\n3.",
    "Monday, Tuesday, Wednesday,",
    "Once upon a time, there was a",
    "import numpy as np\nimport pandas as pd\nimport",
    "Q: What is 2 + 2?\nA: 4\nQ: What is 3 + 3?\nA:",
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "<html>\n<head>\n<title>",
    "In machine learning, a neural network is",
    "Name: John Smith\nAge: 42\nCity: Boston\n\nName: Jane Doe\nAge:",
    "for i in range(10):\n    print(i)\nfor j in range(10):\n",
    "The Eiffel Tower is located in",
    "Translate to French: Hello, how are you?\nFrench:",
    "A, B, C, D, E, F, G,",
    "Water boils at 100 degrees Celsius and freezes at",
]
SPECS = {
    "ngram": {"method": "ngram", "num_tokens": 4, "adaptive": False},
    "self": {"method": "self", "num_tokens": 3, "num_layers": 6, "adaptive": False},
    # no smaller Gemma 3 with this vocabulary is installed: the target itself is the draft model
    "draft": {"method": "draft", "num_tokens": 3, "draft_model": "gemma3-270m", "adaptive": False},
}
GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)


@pytest.fixture(scope="module")
def baseline():
    llm = LLM("gemma3-270m", **KW)
    out = {
        "greedy": [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)],
        "sampled": [o.outputs[0].token_ids for o in llm.generate(PROMPTS[:4], _sampled())],
    }
    del llm
    gc.collect()
    return out


def _sampled():
    return [SamplingParams(temperature=0.8, top_p=0.95, top_k=64, seed=100 + i, max_tokens=24, ignore_eos=True)
            for i in range(4)]


@pytest.mark.parametrize("name", list(SPECS))
def test_greedy_identical_with_each_proposer(baseline, name):
    llm = LLM("gemma3-270m", speculative=SPECS[name], **KW)
    try:
        got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]
        m = llm.get_metrics()
        diff = [i for i, (a, b) in enumerate(zip(got, baseline["greedy"])) if a != b]
        assert not diff, f"prompts {diff} differ"
        assert m["spec_verify_steps"] > 0 and m["spec_accepted_tokens"] > 0
        if name == "draft":  # the target as its own draft: (almost) every draft accepted
            assert m["spec_acceptance_rate"] > 0.9
        sampled = [o.outputs[0].token_ids for o in llm.generate(PROMPTS[:4], _sampled())]
        assert sampled == baseline["sampled"]
        llm.engine.bm.check_invariants()
        print(name, {k: v for k, v in m.items() if k.startswith("spec_")})
    finally:
        del llm
        gc.collect()
