"""bfloat16 on XLA:CPU: the KV cache kept as bits (Bf16KV) and bf16 weights multiplied with f32 accumulation.

XLA:CPU has no bfloat16 gather / scatter / dynamic-slice and no bf16-output dot: it converts the operands to
float32, which for a KV cache or a stacked weight means the whole array on every step. These tests check the
values (same as a plain bf16 computation, close to float32) and the structure (no whole-array conversion in the
compiled step); the speed is measured in scripts/bench_decode.py (`--configs fp32 kv-bf16 bf16`).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve import SamplingParams
from jaxserve.models.kv_cache import Bf16KV
from jaxserve.models.linear import float_matmul
from jaxserve.models.quantized import is_quantized
from jaxserve.weights import quantize as qz
from tests.conftest import TINY_KW
from tests.test_engine import _mixed_prompts

BF16_LOGIT_TOL = 1e-3  # measured 1.3e-6 (the engine and the reference round the same products to bf16)


def test_bf16_kv_stores_bits_and_reads_back_bfloat16():
    shape = (3, 40, 2, 8)
    c = Bf16KV.zeros(shape)
    assert c.bits.dtype == jnp.uint16 and c.shape == shape and c.dtype == jnp.bfloat16 and c.nbytes == 2 * np.prod(shape)
    x = jax.random.normal(jax.random.PRNGKey(0), (5, 2, 8), jnp.float32) * 3
    slots = jnp.array([0, 7, 8, 21, 39])
    c = c.write(1, slots, x)
    got = c[1, slots]
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(x.astype(jnp.bfloat16), np.float32))
    # Everything else is still zero, and the whole-cache view agrees with indexing.
    full = np.asarray(c.as_bfloat16(), np.float32)
    assert np.count_nonzero(full[0]) == 0 and np.count_nonzero(full[2]) == 0
    np.testing.assert_array_equal(full[1][np.asarray(slots)], np.asarray(got, np.float32))


def _f32_copies(hlo: str, shapes) -> list:
    """HLO lines producing a float32 array of one of `shapes` (the KV cache's, a stacked layer weight's): XLA:CPU's
    upcast of a whole bf16 operand it cannot slice, gather or scatter in bf16."""
    pats = [re.compile(r"= f32\[" + ",".join(map(str, sh)) + r"\]") for sh in shapes]
    return [line.strip()[:200] for line in hlo.splitlines() if "convert" in line and any(p.search(line) for p in pats)]


@pytest.mark.parametrize("dtype,kv", [("float32", "bfloat16"), ("bfloat16", "bfloat16")])
def test_bf16_step_converts_no_whole_cache_or_layer_stack(llm_factory, dtype, kv):
    """The compiled decode and prefill steps convert neither the KV cache nor a stacked layer weight to float32
    (bf16 layer weights are held as bits on CPU and bitcast one layer at a time inside the scan)."""
    llm = llm_factory("tiny-gemma3", **TINY_KW, dtype=dtype, kv_cache_dtype=kv)
    r = llm.engine.runner
    layers = [a for a in jax.tree.leaves(r.params["layers"]) if a.ndim == 3]
    if dtype == "bfloat16":
        assert all(a.dtype == jnp.uint16 for a in layers)
    shapes = {tuple(r.kv["k"].shape)} | ({tuple(a.shape) for a in layers} if dtype == "bfloat16" else set())
    fn = r.jit_step(r.logits_step, sampling=False)  # the engine's step program (its sampler is another)
    p_abs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), r.params)
    kv_abs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), r.kv)
    for bucket in [(2, 1), r.buckets()[-1]]:
        hlo = fn.lower(p_abs, kv_abs, r.abstract_inputs(*bucket)[0]).compile().as_text()
        assert not _f32_copies(hlo, shapes), (bucket, _f32_copies(hlo, shapes)[:3])
    for T in ((2, r.ragged_ladder()[-1]) if r.ragged else ()):  # the engine's own ragged steps (models/ragged.py)
        hlo = r.ragged_programs[T].as_text()
        assert not _f32_copies(hlo, shapes), (T, _f32_copies(hlo, shapes)[:3])


# Weight-only quantization under dtype=bfloat16: the quantized values stay int8 / packed int4, the scales and
# the rest of the model are bf16 (the quantized matmul dequantizes and multiplies as for float32 weights).
BF16_QUANT = {"plain": {}, "int8+embed": dict(quantization="int8", quantize_embed=True),
              "int4": dict(quantization="int4", quant_group_size=16)}


@pytest.mark.parametrize("quant", list(BF16_QUANT))
def test_engine_bf16_weights_match_the_bf16_reference(llm_factory, quant):
    """bf16 weights + bf16 KV: every greedy token is within BF16_LOGIT_TOL of the argmax of the reference forward
    run on the same bf16 weights (bf16 rounds activations at 2^-8 relative; the two sum in different orders).
    Also with int8 (LM head included) and int4 weights on top of bf16."""
    from jaxserve.models.reference import reference_forward

    llm = llm_factory("tiny-gemma3", **TINY_KW, dtype="bfloat16", kv_cache_dtype="bfloat16", **BF16_QUANT[quant])
    cfg = llm.model_config
    layers = llm.engine.runner.params["layers"]
    if quant != "plain":
        assert all(is_quantized(layers[k]) for k in qz.LINEAR_KEYS)
        assert is_quantized(llm.engine.runner.params["embed"]) == ("embed" in quant)
    prompts = _mixed_prompts(cfg.vocab_size, [3, 30, 90], seed=5)
    sp = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=1)
    outs = llm.generate(prompts, sp)
    params = llm.engine.runner.params
    worst_gap = worst_lp = 0.0
    for prompt, out in zip(prompts, outs):
        c = out.outputs[0]
        logits = np.asarray(reference_forward(cfg, params, prompt + c.token_ids), np.float32)
        mx = logits.max(-1, keepdims=True)
        lsm = logits - mx - np.log(np.exp(logits - mx).sum(-1, keepdims=True))
        for j, tok in enumerate(c.token_ids):
            row = lsm[len(prompt) - 1 + j]
            worst_gap = max(worst_gap, float(row.max() - row[tok]))
            worst_lp = max(worst_lp, abs(c.logprobs[j][tok] - float(row[tok])))
    print(f"bf16 engine vs bf16 reference: argmax gap {worst_gap:.3g}, logprob diff {worst_lp:.3g}")
    assert worst_gap < BF16_LOGIT_TOL and worst_lp < BF16_LOGIT_TOL, (worst_gap, worst_lp)


def test_float_matmul_bf16_accumulates_in_f32():
    k1, k2 = jax.random.split(jax.random.PRNGKey(1))
    w = jax.random.normal(k1, (256, 96), jnp.float32).astype(jnp.bfloat16)
    for m in (1, 2, 7):
        a = jax.random.normal(k2, (m, 256), jnp.float32).astype(jnp.bfloat16)
        want = np.asarray(a, np.float32) @ np.asarray(w, np.float32)
        got = float_matmul(a, w, jnp.float32)
        assert got.dtype == jnp.float32 and got.shape == (m, 96)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4)
        got16 = float_matmul(a, w)
        assert got16.dtype == jnp.bfloat16
        # The bf16 result is the f32-accumulated product rounded once.
        np.testing.assert_array_equal(np.asarray(got16), np.asarray(got.astype(jnp.bfloat16)))
    a = jnp.ones((3, 256), jnp.float32)
    np.testing.assert_array_equal(np.asarray(float_matmul(a, w.astype(jnp.float32))),
                                  np.asarray(a @ w.astype(jnp.float32)))


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_matmul_with_bf16_activations_accumulates_in_f32(bits):
    """int8 / int4 weights times bf16 activations: bf16 dots accumulated in f32 (dot_f32), the chunked output
    kept in f32 and rounded once to the requested dtype. (Before, the chunk dots had a bf16 result, which
    XLA:CPU upcasts, and a quantized LM head returned bf16-rounded logits under dtype=bfloat16.)"""
    k1, k2 = jax.random.split(jax.random.PRNGKey(2))
    w = np.asarray(jax.random.normal(k1, (256, 4096), jnp.float32)) * 0.05  # two 2,048-column chunks
    qw = qz.quantize_int8(w) if bits == 8 else qz.quantize_int4(w, 64)
    qw = jax.tree.map(jnp.asarray, qw)
    if bits == 8:  # int8 values are exact in bf16; the f32 scales multiply the f32 sums
        deq = np.asarray(qw.dequantize(jnp.float32))
    else:  # the int4 path dequantizes its tile in the activations' dtype: bf16(q * bf16(scale))
        s16 = jnp.repeat(qw.scales.astype(jnp.bfloat16), 64, axis=0)
        deq = np.asarray((qw.int_values().astype(jnp.bfloat16) * s16).astype(jnp.float32))
    for m in (1, 3):
        x = jax.random.normal(k2, (m, 256), jnp.float32).astype(jnp.bfloat16)
        want = np.asarray(x, np.float32) @ deq
        got = qw.matmul(x, jnp.float32)
        assert got.dtype == jnp.float32 and got.shape == (m, 4096)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
        got16 = qw.matmul(x)
        assert got16.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(got16), np.asarray(got.astype(jnp.bfloat16)))
