"""scripts/eval_quality.py's pieces: the batched perplexity forward against the cache-free reference, greedy
agreement, and one small end-to-end run on a tiny random model (the real-model numbers are in docs/quantization.md).
"""

import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.config import PRESETS
from jaxserve.models.reference import reference_forward
from jaxserve.weights import quantize as qz
from jaxserve.weights.calibrate import perplexity
from jaxserve.weights.random_init import random_params
from tests.test_quant import KV_STORED

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
from eval_quality import evaluate, greedy_agreement, markdown  # noqa: E402

PPL_RTOL = 1e-4  # float32 both ways; the two forwards differ only in summation order


def _ref_ppl(cfg, params, tokens):
    nll = 0.0
    for row in tokens:
        lg = np.asarray(reference_forward(cfg, params, row), np.float64)[:-1]
        lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
        nll += float((lse - lg[np.arange(len(row) - 1), row[1:]]).sum())
    return float(np.exp(nll / (tokens.shape[0] * (tokens.shape[1] - 1))))


@pytest.mark.parametrize("scheme", [None, "int8", "int4"])
def test_perplexity_matches_reference_forward(scheme):
    cfg = PRESETS["tiny-gemma3"]  # sliding window 24 < the 40-token rows
    p = random_params(cfg, 0, dtype=np.float32)
    if scheme:
        p = qz.quantize_params(p, scheme, 16, quantize_embed=True)
    p = qz.to_device(p, jnp.float32)
    toks = np.random.default_rng(0).integers(3, cfg.vocab_size, (3, 40)).astype(np.int32)
    got, want = perplexity(cfg, p, toks, batch=2), _ref_ppl(cfg, p, toks)
    assert abs(got / want - 1) < PPL_RTOL, (got, want)


@pytest.mark.parametrize("kv", ["int8", "bfloat16"])
def test_perplexity_low_precision_kv_matches_reference_with_that_kv(monkeypatch, kv):
    import jaxserve.models.reference as refmod

    cfg = PRESETS["tiny-gemma3"]
    p = qz.to_device(random_params(cfg, 1, dtype=np.float32), jnp.float32)
    toks = np.random.default_rng(1).integers(3, cfg.vocab_size, (2, 30)).astype(np.int32)
    got = perplexity(cfg, p, toks, kv_dtype=kv)
    plain = perplexity(cfg, p, toks)
    qkv = refmod.qkv

    store = KV_STORED[kv]

    def qkv_stored(*a, **kw):
        q, k, v = qkv(*a, **kw)
        return q, store(k), store(v)

    monkeypatch.setattr(refmod, "qkv", qkv_stored)
    want = _ref_ppl(cfg, p, toks)
    assert abs(got / want - 1) < PPL_RTOL and got != plain


def test_greedy_agreement():
    ref = [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert greedy_agreement(ref, ref) == {"prefix": 1.0, "position": 1.0}
    got = greedy_agreement(ref, [[1, 2, 9, 4], [0, 6, 7, 8]])
    assert got["prefix"] == pytest.approx((2 / 4 + 0) / 2) and got["position"] == pytest.approx(6 / 8)


def test_evaluate_tiny_end_to_end():
    from tests.conftest import TINY_KW

    res = evaluate("tiny-gemma3", ["fp32", "int8"], prompts=3, new_tokens=4, ppl_seqs=2, ppl_len=48,
                   engine_kw=TINY_KW, random_weights=True, log=lambda *a: None)
    fp, i8 = res["rows"]
    assert fp["agreement_prefix"] == 1.0 and fp["agreement_position"] == 1.0
    assert 0.0 <= i8["agreement_position"] <= 1.0 and np.isfinite(i8["perplexity"])
    assert abs(i8["perplexity"] / fp["perplexity"] - 1) < 0.05  # int8 per-channel: a small perturbation
    assert i8["resident_layer_weight_bytes"] < 0.3 * fp["resident_layer_weight_bytes"]
    assert i8["quantized"]["scheme"] == "int8" and fp["quantized"]["scheme"] is None
    assert res["setup"]["ppl_tokens"] == 2 * 47
    assert "| int8 |" in markdown(res)
