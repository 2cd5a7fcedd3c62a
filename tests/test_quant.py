"""Quantized weights (int8 / int4 / GPTQ) and the int8 KV cache: formats, error bounds, matmul, engine.

Tolerances: a quantized matmul is compared with pallas_kernels.reference.quantized_matmul (same dequantized
weight, float32) at relative 1e-5 of the output's max; the paged engine with quantized weights against the
cache-free reference forward with the same quantized params at 2e-4 in logprobs (tests/test_engine.py's bound).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from jaxserve import SamplingParams
from jaxserve.config import PRESETS, EngineConfig
from jaxserve.errors import InvalidConfigError
from jaxserve.models.kv_cache import Bf16KV, Int8KV, quantize_kv_int8
from jaxserve.models.quantized import check_group_size, is_quantized, pack_int4, unpack_int4
from jaxserve.models.transformer import dense
from jaxserve.weights import quantize as qz
from jaxserve.weights.checkpoint import QUANT_FILE
from jaxserve.weights.calibrate import gptq_quantize, split_topics
from pallas_kernels import dispatch, reference as ref
from tests.conftest import TINY_KW
from tests.test_engine import _check_against_reference, _mixed_prompts

SETTINGS = dict(deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
MM_RTOL = 1e-5


def _w(seed, k, n, scale=1.0):
    return (np.random.default_rng(seed).standard_normal((k, n)) * scale).astype(np.float32)


floats = st.floats(-100, 100, allow_nan=False, allow_infinity=False, width=32)


# ------------------------------------------------------------------------------------------------ formats
@settings(max_examples=12, **SETTINGS)
@given(w=hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=24), elements=floats))
def test_int8_error_bound(w):
    """|w - dequant(quant(w))| <= scale / 2 per output column (round to nearest, no clipping at absmax/127)."""
    q = qz.quantize_int8(w)
    err = np.abs(w - np.asarray(q.dequantize()))
    bound = np.asarray(q.scales)[None, :] * 0.5 * (1 + 1e-5) + 1e-30
    assert (err <= bound).all()
    assert np.abs(np.asarray(q.w_q)).max(initial=0) <= 127


@settings(max_examples=12, **SETTINGS)
@given(groups=st.integers(1, 3), group=st.sampled_from([1, 2, 4, 8]), n=st.integers(1, 9), seed=st.integers(0, 99))
def test_int4_error_bound(groups, group, n, seed):
    """|w - dequant| <= group scale / 2, scales = absmax / 7 of each group of `group` rows per column."""
    k = 2 * groups * group
    w = _w(seed, k, n, scale=3.0)
    q = qz.quantize_int4(w, group)
    err = np.abs(w - np.asarray(q.dequantize()))
    s = np.repeat(np.asarray(q.scales), group, axis=0)
    assert (err <= s * 0.5 * (1 + 1e-5)).all()
    amax = np.abs(w.reshape(k // group, group, n)).max(1)
    np.testing.assert_allclose(np.asarray(q.scales), amax / 7, rtol=1e-6)


@settings(max_examples=40, **SETTINGS)
@given(q=hnp.arrays(np.int8, st.tuples(st.integers(1, 8).map(lambda h: 2 * h), st.integers(1, 8)),
                    elements=st.integers(-8, 7)))
def test_int4_pack_roundtrip(q):
    packed = pack_int4(q)
    assert packed.dtype == np.uint8 and packed.shape == (q.shape[0] // 2, q.shape[1])
    np.testing.assert_array_equal(np.asarray(unpack_int4(packed)), q)
    np.testing.assert_array_equal(np.asarray(ref.unpack_int4(packed)), q)  # the Pallas kernels' unpacking
    # Byte i: row i in the low nibble, row K/2 + i in the high nibble.
    h = q.shape[0] // 2
    np.testing.assert_array_equal(packed & 0xF, q[:h].astype(np.int32) & 0xF)
    np.testing.assert_array_equal(packed >> 4, q[h:].astype(np.int32) & 0xF)


def test_formats_equal_pallas_reference():
    """Our quantizers produce bit-identical arrays to pallas_kernels/reference.py's."""
    w = _w(0, 128, 96)
    q8 = qz.quantize_int8(w)
    r8, rs8 = ref.quantize_int8(jnp.asarray(w))
    np.testing.assert_array_equal(np.asarray(q8.w_q), np.asarray(r8))
    np.testing.assert_array_equal(np.asarray(q8.scales), np.asarray(rs8))
    q4 = qz.quantize_int4(w, 32)
    r4, rs4 = ref.quantize_int4(jnp.asarray(w), 32)
    np.testing.assert_array_equal(np.asarray(q4.w_q), np.asarray(r4))
    np.testing.assert_array_equal(np.asarray(q4.scales), np.asarray(rs4))


def test_bad_group_size_and_scheme_raise():
    w = _w(0, 640, 8)
    with pytest.raises(InvalidConfigError, match="group_size 128 does not fit"):
        qz.quantize_int4(w, 128)  # 640 % 256 != 0
    for bad in (0, -4, 3.5, True):
        with pytest.raises(InvalidConfigError, match="group_size"):
            check_group_size(bad)
    with pytest.raises(InvalidConfigError, match="unknown quantization"):
        EngineConfig(quantization="int3").validate(PRESETS["tiny-llama"])
    with pytest.raises(InvalidConfigError, match="kv_cache_dtype"):
        EngineConfig(kv_cache_dtype="int4").validate(PRESETS["tiny-llama"])
    with pytest.raises(InvalidConfigError, match="quant_group_size"):
        EngineConfig(quant_group_size=0).validate(PRESETS["tiny-llama"])


# ------------------------------------------------------------------------------------------------ matmul
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("m", [1, 5, 32])
@pytest.mark.parametrize("chunk", [None, 128])
def test_quantized_matmul_equals_reference(bits, m, chunk):
    k, n, g = 256, 512, 32
    w = _w(1, k, n)
    x = jnp.asarray(_w(2, m, k))
    qw = qz.quantize_int8(w, chunk=chunk) if bits == 8 else qz.quantize_int4(w, g, chunk=chunk)
    want = np.asarray(ref.quantized_matmul(x, qw.w_q, qw.scales, bits=bits, group_size=qw.group_size))
    got = np.asarray(jax.jit(dense)(x, qw))
    assert np.abs(got - want).max() <= MM_RTOL * np.abs(want).max()
    inv = np.asarray(jax.jit(lambda a, b: dense(a, b, True))(x, qw))  # batch-invariant row tiles
    assert np.abs(inv - want).max() <= MM_RTOL * np.abs(want).max()


@pytest.mark.parametrize("bits", [8, 4])
def test_pallas_dispatch_consumes_quantized_types(bits):
    """pallas_kernels.dispatch.matmul (TPU kernel in interpret mode here) takes our arrays as they are."""
    k, n, m = 256, 256, 8
    w = _w(3, k, n)
    x = jnp.asarray(_w(4, m, k))
    qw = qz.quantize_int8(w) if bits == 8 else qz.quantize_int4(w, 64)
    got = np.asarray(dispatch.matmul(x, qw.w_q, qw.scales, bits=qw.bits, group_size=qw.group_size, impl="pallas"))
    want = np.asarray(qw.matmul(x))
    assert np.abs(got - want).max() <= MM_RTOL * np.abs(want).max()


def test_embedding_lookup_of_quantized_head():
    """The quantized [D, V] head serves the embedding lookup: rows equal the dequantized transpose."""
    e = _w(5, 40, 16)  # [V, D]
    toks = jnp.asarray([[0, 7, 39], [3, 3, 1]])
    for qw in (qz.quantize_int8(e.T), qz.quantize_int4(e.T, 4)):
        want = np.asarray(qw.dequantize()).T[np.asarray(toks)]
        np.testing.assert_allclose(np.asarray(qw.take_rows(toks)), want, rtol=0, atol=1e-7)


# ------------------------------------------------------------------------------------------------ GPTQ
def test_gptq_beats_rtn_on_correlated_inputs():
    """GPTQ's output error ||X W - X W_q|| is below round-to-nearest's for the same int4 format."""
    rng = np.random.default_rng(0)
    k, n, g = 128, 64, 32
    mix = rng.standard_normal((k, k)) * 0.3 + np.eye(k)
    X = (rng.standard_normal((2048, k)) @ mix).astype(np.float32)
    X[:, :4] *= 10  # a few outlier input channels, as in LLM activations
    W = _w(6, k, n)
    H = X.T.astype(np.float64) @ X / len(X)
    err = lambda q: np.linalg.norm(X @ W - X @ np.asarray(q.dequantize()))  # noqa: E731
    e_rtn, e_gptq = err(qz.quantize_int4(W, g)), err(gptq_quantize(W, H, g))
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)
    q = gptq_quantize(W, H, g)
    assert q.w_q.dtype == np.uint8 and q.w_q.shape == (k // 2, n) and q.scales.shape == (k // g, n)


def test_calibration_split_is_disjoint_and_seeded():
    calib, held = split_topics(0)
    assert calib and held and not set(calib) & set(held)
    assert (calib, held) == split_topics(0) and split_topics(1) != (calib, held)


# ------------------------------------------------------------------------------------------------ int8 KV
def test_int8_kv_layout_matches_pallas_write_kv():
    from jaxserve.models.kv_cache import init_kv_cache, write_kv

    cfg = PRESETS["tiny-gemma3"]
    num_pages, ps = 6, 4
    kv = init_kv_cache(cfg, num_pages, ps, jnp.int8)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((5, cfg.num_kv_heads, cfg.head_dim)), jnp.float32)
    slots = jnp.asarray([4, 5, 9, 13, 22])
    c = write_kv(kv["k"], 2, slots, x)
    shape = (num_pages, ps, cfg.num_kv_heads, cfg.head_dim)
    pk, _, ks, _ = ref.write_kv(jnp.zeros(shape, jnp.int8), jnp.zeros(shape, jnp.int8), x, x, slots,
                                jnp.ones(shape[:-1]), jnp.ones(shape[:-1]))
    np.testing.assert_array_equal(np.asarray(c.q[2]).reshape(shape), np.asarray(pk))
    np.testing.assert_array_equal(np.asarray(c.scales[2]).reshape(shape[:-1]), np.asarray(ks))
    # Reading dequantizes within half a step of each (token, head) scale.
    got = np.asarray(c[2, slots])
    assert (np.abs(got - np.asarray(x)) <= np.asarray(c.scales[2, slots])[..., None] * 0.5 * (1 + 1e-5)).all()


def test_planner_counts_int8_kv():
    from jaxserve.planner import kv_pages_for_budget

    cfg = PRESETS["gemma3-270m"]
    f32 = kv_pages_for_budget(cfg, EngineConfig(), 1 << 30)
    i8 = kv_pages_for_budget(cfg, EngineConfig(kv_cache_dtype="int8"), 1 << 30)
    per_tok = cfg.kv_bytes_per_token("int8")
    assert per_tok == (2 * 1 * 256 * 1 + 2 * 1 * 4) * 18
    # a page holds 16 tokens of the KV layout's 3 rows (sliding-window page groups: 3 of the 18 layers)
    assert cfg.kv_layout().width == 3
    assert i8 == (1 << 30) // (per_tok * 3 // 18 * 16) and i8 > 3.8 * f32


# ------------------------------------------------------------------------------------------------ engine
# One engine per scheme (compiles are the cost): int8 with the LM head, int4 with the LM head in batch-invariant
# mode (row tiles through the quantized matmul), and GPTQ int4 of the linear layers only.
QUANT_CONFIGS = {
    "int8+embed": dict(quantization="int8", quantize_embed=True),
    "int4+embed+invariant": dict(quantization="int4", quant_group_size=16, quantize_embed=True,
                                 batch_invariant=True),
    "gptq": dict(quantization="gptq", quant_group_size=16),
}


@pytest.mark.parametrize("name", list(QUANT_CONFIGS))
def test_engine_quantized_matches_reference(llm_factory, name):
    """Paged engine with quantized weights == cache-free reference forward with the same quantized params."""
    llm = llm_factory("tiny-gemma3", **TINY_KW, **QUANT_CONFIGS[name])
    params = llm.engine.runner.params
    want = "int8" if name.startswith("int8") else "int4"
    assert all(is_quantized(params["layers"][k]) and params["layers"][k].bits == (8 if want == "int8" else 4)
               for k in qz.LINEAR_KEYS)
    assert is_quantized(params["embed"]) == ("embed" in name)
    lengths = [1, 5, 17, 40, 70]
    prompts = _mixed_prompts(llm.model_config.vocab_size, lengths, seed=3)
    sp = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=1)
    _check_against_reference(llm, prompts, llm.generate(prompts, sp), 6)


def test_quantized_weights_shrink_resident_bytes():
    from jaxserve.weights.random_init import random_params

    cfg = PRESETS["tiny-gemma3"]
    p = random_params(cfg, 0, dtype=np.float32)
    f = qz.resident_nbytes(qz.to_device(p, jnp.float32)["layers"])
    i8 = qz.resident_nbytes(qz.to_device(qz.quantize_params(p, "int8"), jnp.float32)["layers"])
    i4 = qz.resident_nbytes(qz.to_device(qz.quantize_params(p, "int4", 16), jnp.float32)["layers"])
    lin = sum(np.asarray(p["layers"][k]).size for k in qz.LINEAR_KEYS)
    assert f - i8 == lin * 3 - sum(np.asarray(p["layers"][k]).shape[-1] * cfg.num_layers * 4 for k in qz.LINEAR_KEYS)
    assert i4 < i8 < 0.3 * f


# How each KV cache dtype stores a K/V value (what the engine's attention reads back).
KV_STORED = {"int8": lambda t: Int8KV(*quantize_kv_int8(t))[...],
             "bfloat16": lambda t: t.astype(jnp.bfloat16).astype(t.dtype)}


@pytest.mark.parametrize("kv", ["int8", "bfloat16"])
def test_engine_low_precision_kv_matches_reference_with_that_kv(llm_factory, monkeypatch, kv):
    """Engine with an int8 (per token and head) or bf16 KV cache == the reference forward whose K/V are stored
    the same way. On CPU the bf16 cache holds its bits (Bf16KV; tests/test_bf16.py)."""
    import jaxserve.models.reference as refmod

    llm = llm_factory("tiny-gemma3", **TINY_KW, kv_cache_dtype=kv)
    c = llm.engine.runner.kv["k"]
    if kv == "int8":
        assert c.q.dtype == jnp.int8 and c.scales.shape == c.q.shape[:-1]
    else:
        assert isinstance(c, Bf16KV) and c.bits.dtype == jnp.uint16
    prompts = _mixed_prompts(llm.model_config.vocab_size, [3, 30, 90], seed=5)
    sp = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=1)
    outs = llm.generate(prompts, sp)
    qkv, store = refmod.qkv, KV_STORED[kv]

    def qkv_stored(*a, **kw):
        q, k, v = qkv(*a, **kw)
        return q, store(k), store(v)

    monkeypatch.setattr(refmod, "qkv", qkv_stored)
    _check_against_reference(llm, prompts, outs, 6)


def test_gptq_without_tokenizer_or_mismatch_raises():
    from jaxserve.engine.runner import ModelRunner
    from jaxserve.weights.random_init import random_params

    cfg = PRESETS["tiny-llama"]
    p = random_params(cfg, 0, dtype=np.float32)
    with pytest.raises(InvalidConfigError, match="gptq"):
        ModelRunner(cfg, EngineConfig(quantization="gptq", **TINY_KW), p, 16)
    p8 = qz.quantize_params(p, "int8")
    with pytest.raises(InvalidConfigError, match="already quantized as int8"):
        ModelRunner(cfg, EngineConfig(quantization="int4", quant_group_size=16, **TINY_KW), p8, 16)
    with pytest.raises(InvalidConfigError, match="does not fit"):
        ModelRunner(cfg, EngineConfig(quantization="int4", quant_group_size=48, **TINY_KW), p, 16)


# ------------------------------------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_checkpoint_roundtrip_without_requantizing(tmp_path, scheme, monkeypatch):
    from jaxserve.weights.checkpoint import load_converted_params, save_converted
    from jaxserve.weights.random_init import random_params

    cfg = PRESETS["tiny-gemma3"]
    p = qz.quantize_params(random_params(cfg, 0, dtype=np.float32), scheme, 16, quantize_embed=True)
    save_converted(str(tmp_path), cfg, p, source="test", quant_method="rtn")

    def no_requant(*a, **k):
        raise AssertionError("loading must not quantize")

    monkeypatch.setattr(qz, "quantize_int8", no_requant)
    monkeypatch.setattr(qz, "quantize_int4", no_requant)
    got = load_converted_params(str(tmp_path), cfg)
    for a, b in zip(jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(got)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert jax.tree_util.tree_structure(p) == jax.tree_util.tree_structure(got)


def test_corrupt_quantized_checkpoint_raises(tmp_path):
    import json

    from jaxserve.errors import CheckpointError
    from jaxserve.weights.checkpoint import load_converted_params, save_converted
    from jaxserve.weights.random_init import random_params

    cfg = PRESETS["tiny-llama"]
    save_converted(str(tmp_path), cfg, qz.quantize_params(random_params(cfg, 0, dtype=np.float32), "int4", 16))
    mpath = tmp_path / QUANT_FILE
    meta = json.loads(mpath.read_text())
    mpath.write_text(json.dumps(dict(meta, group_size=8)))  # scales no longer match the packed rows
    with pytest.raises(CheckpointError, match="corrupt quantized weights"):
        load_converted_params(str(tmp_path), cfg)
    mpath.write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt quantization manifest"):
        load_converted_params(str(tmp_path), cfg)


def test_cli_convert_quant_then_load(tmp_path):
    """`jaxserve convert --quant int8` writes a checkpoint that LLM() serves as int8 without re-quantizing."""
    from jaxserve.cli import main
    from jaxserve.engine.runner import ModelRunner
    from jaxserve.weights.resolve import resolve_model

    out = str(tmp_path / "q")
    assert main(["convert", "tiny-llama", "--out", out, "--quant", "int8", "--random-weights"]) == 0
    assert (tmp_path / "q" / QUANT_FILE).exists()
    params = resolve_model(out).load_params()
    assert qz.describe(params) == {"scheme": "int8", "group_size": None, "embed": False}
    # The engine keeps the loaded int8 arrays as they are (no cast, no second quantization).
    runner = ModelRunner(PRESETS["tiny-llama"], EngineConfig(quantization="int8", **TINY_KW), params, 16)
    np.testing.assert_array_equal(np.asarray(runner.params["layers"]["wq"].w_q), params["layers"]["wq"].w_q)


def test_int8_kv_runs_on_the_pallas_kernels_too():
    """The Pallas attention adapter takes the int8 cache as int8 pages + k_scales / v_scales (tested against the
    XLA path in tests/test_engine_pallas.py); only `attention_impl` picks the path."""
    from jaxserve.engine.runner import attention_fn_for

    fn = attention_fn_for(PRESETS["tiny-llama"], EngineConfig(kv_cache_dtype="int8", attention_impl="pallas"))
    assert callable(fn)
    assert attention_fn_for(PRESETS["tiny-llama"], EngineConfig(kv_cache_dtype="int8", attention_impl="xla")) is None