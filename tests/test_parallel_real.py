"""Tensor, pipeline and data parallelism on the real Gemma 3 270M (8 forced host CPU devices, in subprocesses;
see tests/test_parallel.py, whose helpers these use). A file of its own so the test runner can run it beside
the tiny-model layouts rather than after them (the two together were the suite's longest file)."""

from __future__ import annotations

import json

import pytest

from tests.test_parallel import KV_INT8_LOGPROB_TOL, LOGPROB_TOL, SPEC_NGRAM, assert_layouts, run_check

pytestmark = pytest.mark.slow


def test_gemma3_270m_quantized_layouts_match_single_device():
    """Gemma 3 270M, int8 weights + int8 KV (model=2, stage=2 x model=2) and int4 weights (model=4): the same
    greedy tokens as one device with the same quantization."""
    tp = ("model=2", "stage=2,model=2")
    res = run_check("--model", "gemma3-270m", "--max-tokens", "6", *sum((["--mesh", m] for m in tp), []),
                    "--engine-kw", json.dumps({"quantization": "int8", "kv_cache_dtype": "int8"}), timeout=3600)
    assert_layouts(res, tp, KV_INT8_LOGPROB_TOL)
    res = run_check("--model", "gemma3-270m", "--max-tokens", "6", "--mesh", "model=4",
                    "--engine-kw", json.dumps({"quantization": "int4"}), timeout=3600)
    assert_layouts(res, ("model=4",))


def test_gemma3_270m_ngram_speculation_on_a_mesh():
    prompts = ["1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,", "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n"]
    res = run_check("--model", "gemma3-270m", "--max-tokens", "12", "--mesh", "model=2", "--speculative",
                    json.dumps(SPEC_NGRAM), "--prompts", json.dumps(prompts), timeout=3600)
    assert_layouts(res, ("model=2",))
    m = res["layouts"]["model=2"]["spec"]
    assert m["spec_accepted_tokens"] >= 6, m  # predictable text: most drafts accepted


def test_gemma3_270m_layouts_match_single_device():
    tp = ("model=2", "model=4", "model=8", "stage=2,model=2")
    res = run_check("--model", "gemma3-270m", "--max-tokens", "6", *sum((["--mesh", m] for m in
                    tp + ("stage=2", "data=2")), []), timeout=3600)
    assert_layouts(res, tp)


def test_gemma3_270m_converted_checkpoint_restores_sharded():
    """The embedded model's converted orbax checkpoint (saved from host numpy) restored straight into a
    model=4 mesh: the same tokens as the single-device engine loading the same directory."""
    from jaxserve.weights.checkpoint import is_converted
    from jaxserve.weights.resolve import converted_cache_dir, resolve_model

    path = converted_cache_dir("gemma3-270m")
    if not is_converted(path):
        resolve_model("gemma3-270m")  # converts the embedded GGUF once
    assert is_converted(path)
    res = run_check("--model", path, "--max-tokens", "4", "--mesh", "model=4", "--no-hlo", timeout=3600)
    e = res["layouts"]["model=4"]
    assert e["tokens"] == res["single"]["tokens"] and e["max_abs_logprob_diff"] < LOGPROB_TOL
    assert e["wq_sharding"] == "P(None, None, 'model')"
