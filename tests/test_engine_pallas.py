"""The engine with attention_impl="pallas" (the TPU kernels in interpret mode on this CPU) against the XLA path.

The whole engine on tiny random models: greedy tokens must be identical and logprobs close, over mixed-length
prompts in multi-row prefill steps, prompts longer than one prefill chunk (chunked prefill: later chunks read
earlier chunks' K/V from the pages), prefix-cache hits (context that was never computed in the step), and
tiny-gemma3's 24-token sliding window on alternate layers (a traced per-layer window inside the layer scan).
The engine attention adapter (pallas_kernels/engine.py) is also checked directly against the XLA attention.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve import SamplingParams
from jaxserve.config import EngineConfig, get_preset
from jaxserve.engine.runner import attention_fn_for
from jaxserve.errors import InvalidConfigError
from jaxserve.models.transformer import paged_attention_xla
from pallas_kernels.engine import engine_attention_fn

# A small ladder keeps the interpret-mode compiles short: decode R in {1, 2, 4}; prefill (1, 16), (2, 16),
# (1, 32). Prompts over 32 tokens are prefilled in chunks.
KW = dict(page_size=4, max_model_len=128, max_num_seqs=4, max_num_batched_tokens=32, max_prefill_seqs=2,
          min_prefill_tokens=16, num_pages=256, attn_block_pages=4)
# Both paths compute attention in float32 (the kernels' dots at HIGHEST precision); they differ only in
# summation order, ~1e-6 per attention output. Through the tiny models that is <~1e-5 on a logprob.
LOGPROB_ATOL = 1e-4
# With a bfloat16 KV cache (the same bf16 K/V values on both paths) the sampled tokens' logprobs still agree to
# ~1e-5, but the second-best logprobs far in the tail of tiny-gemma3's peaked distributions (-15 .. -20) were
# measured up to 4e-4 apart (~2e-5 relative); both paths match the bf16-KV reference forward to 1e-6 on the
# sampled tokens (tests/test_bf16.py checks the XLA path).
BF16_KV_LOGPROB_ATOL = 1e-3
# Attention outputs of the adapter vs the XLA path (float32, values ~1).
ATTN_ATOL = 2e-5


# --------------------------------------------------------------------------------------------- config
def _qw():
    from jaxserve.weights.quantize import quantize_int8

    return quantize_int8(np.eye(16, dtype=np.float32))


QW = _qw()


def test_attention_impl_resolution():
    cfg = get_preset("tiny-gemma3")
    assert attention_fn_for(cfg, EngineConfig(attention_impl="xla")) is None
    assert attention_fn_for(cfg, EngineConfig(attention_impl="auto")) is None        # CPU: the XLA path
    fn = attention_fn_for(cfg, EngineConfig(attention_impl="pallas"))
    assert callable(fn) and fn.kernel_family == "tpu" and fn.interpret is True        # interpreted on CPU
    with pytest.raises(InvalidConfigError, match="attention_impl"):
        attention_fn_for(cfg, EngineConfig(attention_impl="triton"))
    with pytest.raises(InvalidConfigError, match="attention_impl"):
        EngineConfig(attention_impl="Pallas").validate(cfg)
    # On TPU / GPU "auto" picks the kernels; Triton shapes it cannot take fall back under "auto" only.
    assert engine_attention_fn("auto", head_dim=256, page_size=16, platform="tpu").kernel_family == "tpu"
    assert engine_attention_fn("auto", head_dim=128, page_size=16, platform="cuda").kernel_family == "gpu"
    assert engine_attention_fn("auto", head_dim=48, page_size=16, platform="cuda") is None
    with pytest.raises(ValueError, match="power-of-two"):
        engine_attention_fn("pallas", head_dim=48, page_size=16, platform="cuda")


def test_llm_rejects_bad_attention_impl():
    from jaxserve import LLM
    with pytest.raises(InvalidConfigError, match="attention_impl"):
        LLM("tiny-llama", random_weights=True, attention_impl="mosaic", **KW)


def test_batch_invariant_takes_the_xla_path_or_refuses_pallas():
    """The kernels' reductions are tiled by the batch's shape, so batch_invariant=True resolves "auto" to the
    XLA path (invariant on fixed row tiles) on every backend and refuses an explicit "pallas" at start-up."""
    from jaxserve import LLM
    from jaxserve.engine.runner import bind_matmul_for

    cfg = get_preset("tiny-gemma3")
    inv = dict(batch_invariant=True)
    assert attention_fn_for(cfg, EngineConfig(attention_impl="auto", **inv), platform="tpu") is None
    assert callable(attention_fn_for(cfg, EngineConfig(attention_impl="auto"), platform="tpu"))
    for field in ("attention_impl", "matmul_impl"):
        with pytest.raises(InvalidConfigError, match=f"batch_invariant=True cannot be honoured with {field}"):
            LLM("tiny-llama", random_weights=True, quantization="int8", **{field: "pallas"}, **inv, **KW)
    params = {"layers": {}, "w": QW}
    assert bind_matmul_for(params, EngineConfig(matmul_impl="auto", **inv), platform="tpu")["w"].kernel is None
    assert bind_matmul_for(params, EngineConfig(matmul_impl="auto"), platform="tpu")["w"].kernel is not None


def test_matmul_impl_resolution():
    from jaxserve.engine.runner import bind_matmul_for

    params = {"layers": {"wq": QW}, "embed": np.zeros((4, 4), np.float32)}
    assert bind_matmul_for(params, EngineConfig(matmul_impl="xla"))["layers"]["wq"].kernel is None
    assert bind_matmul_for(params, EngineConfig(matmul_impl="auto"))["layers"]["wq"].kernel is None  # CPU
    k = bind_matmul_for(params, EngineConfig(matmul_impl="pallas"))["layers"]["wq"].kernel
    assert k.family == "tpu" and k.interpret is True and k.mesh is None                 # interpreted on CPU
    assert bind_matmul_for(params, EngineConfig(), platform="cuda")["layers"]["wq"].kernel.family == "gpu"
    assert bind_matmul_for(params, EngineConfig(), platform="tpu")["embed"] is params["embed"]  # float: as is
    with pytest.raises(InvalidConfigError, match="matmul_impl"):
        EngineConfig(matmul_impl="triton").validate(cfg := get_preset("tiny-llama"))
    with pytest.raises(InvalidConfigError, match="matmul_impl"):
        bind_matmul_for(params, EngineConfig(matmul_impl="cuda"))
    del cfg


@pytest.mark.parametrize("quant", [dict(quantization="int8", quantize_embed=True),
                                   dict(quantization="int4", quant_group_size=16)])
def test_engine_pallas_matmul_matches_xla(llm_factory, quant):
    """Every linear layer (and with int8 the tied LM head) through the Pallas quantized matmul (interpreted):
    the same greedy tokens as the XLA formulation; the step program contains the kernel."""
    xla = llm_factory("tiny-gemma3", matmul_impl="xla", **quant, **KW)
    pal = llm_factory("tiny-gemma3", matmul_impl="pallas", **quant, **KW)
    assert pal.engine.runner.params["layers"]["wq"].kernel is not None
    assert xla.engine.runner.params["layers"]["wq"].kernel is None
    bits = 8 if quant["quantization"] == "int8" else 4
    r = pal.engine.runner
    assert f"jaxserve_qmm_int{bits}_tpu" in (r.ragged_programs[1] if r.ragged else r.programs[(1, 1)]).as_text()
    sp = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=2)
    prompts = _prompts(xla.model_config.vocab_size, [1, 5, 23, 40], seed=13)
    _compare(xla.generate(prompts, sp), pal.generate(prompts, sp), 6)


# --------------------------------------------------------------------------------------------- adapter
def _attention_case(cfg, rng, q_lens, ctx_lens, Q, num_pages=40, page_size=4, P=8):
    L, hkv, hd, hq = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.num_heads
    R = len(q_lens)
    kc = jnp.asarray(rng.standard_normal((L, num_pages * page_size, hkv, hd)), jnp.float32)
    vc = jnp.asarray(rng.standard_normal((L, num_pages * page_size, hkv, hd)), jnp.float32)
    tables = np.zeros((R, P), np.int32)
    perm, o = rng.permutation(np.arange(1, num_pages)), 0
    pos = np.full((R, Q), -1, np.int32)
    for r in range(R):
        need = -(-(ctx_lens[r] + q_lens[r]) // page_size)
        tables[r, :need] = perm[o:o + need]
        o += need
        pos[r, :q_lens[r]] = ctx_lens[r] + np.arange(q_lens[r])
    q = jnp.asarray(rng.standard_normal((R, Q, hq, hd)), jnp.float32)
    kv_lens = jnp.asarray(np.asarray(ctx_lens) + np.asarray(q_lens), jnp.int32)
    return q, kc, vc, jnp.asarray(tables), kv_lens, jnp.asarray(pos)


@pytest.mark.parametrize("kernel", ["tpu", "gpu"])
@pytest.mark.parametrize("Q,q_lens,ctx_lens", [
    (8, [5, 0, 8, 1], [7, 0, 13, 0]),        # prefill rows: partial, padding row, full, one token; contexts
    (1, [1, 1, 0, 1], [0, 17, 0, 30]),       # decode rows (kv_len 1, page crossings, padding row, full table)
])
def test_adapter_matches_xla_attention(Q, q_lens, ctx_lens, kernel):
    """Layer selection by page-id offset, the [R, Q] <-> ragged packing, per-layer traced windows; the TPU
    kernels and the Triton ones (both interpreted here)."""
    cfg = get_preset("tiny-gemma3")
    q, kc, vc, tables, kv_lens, pos = _attention_case(cfg, np.random.default_rng(Q), q_lens, ctx_lens, Q)
    fn = engine_attention_fn("pallas", head_dim=cfg.head_dim, page_size=4, kernel=kernel)
    assert fn.kernel_family == kernel

    @jax.jit
    def run(layer, window):
        a = (cfg, q, kc, vc, layer, tables, kv_lens, pos, window)
        return fn(*a, page_size=4, block_pages=4), paged_attention_xla(*a, page_size=4, block_pages=4)

    for layer, window in [(0, 0), (2, 5), (3, 24), (1, 1)]:
        got, want = run(jnp.int32(layer), jnp.int32(window))
        assert got.shape == want.shape == q.shape
        assert float(jnp.abs(got - want).max()) < ATTN_ATOL, (layer, window)
        padding = np.asarray(pos) < 0
        assert np.all(np.asarray(got)[padding] == 0.0)


@pytest.mark.parametrize("kernel", ["tpu", "gpu"])
@pytest.mark.parametrize("Q,q_lens,ctx_lens", [(8, [5, 0, 8, 1], [7, 0, 13, 0]), (1, [1, 1, 0, 1], [0, 17, 0, 30])])
def test_adapter_int8_kv_matches_xla_attention(Q, q_lens, ctx_lens, kernel):
    """An int8 KV cache (Int8KV: values + per token-and-head scales) through the kernels' int8 pages and
    k_scales / v_scales, against the XLA path reading the same cache dequantized."""
    from jaxserve.models.kv_cache import Int8KV, quantize_kv_int8

    cfg = get_preset("tiny-gemma3")
    q, kc, vc, tables, kv_lens, pos = _attention_case(cfg, np.random.default_rng(10 + Q), q_lens, ctx_lens, Q)

    def int8(c):
        v, s = quantize_kv_int8(c.reshape(-1, *c.shape[2:]))
        return Int8KV(v.reshape(c.shape), s.reshape(c.shape[:-1]))

    kq, vq = int8(kc), int8(vc)
    fn = engine_attention_fn("pallas", head_dim=cfg.head_dim, page_size=4, kernel=kernel)

    @jax.jit
    def run(layer, window):
        a = (cfg, q, kq, vq, layer, tables, kv_lens, pos, window)
        return fn(*a, page_size=4, block_pages=4), paged_attention_xla(*a, page_size=4, block_pages=4)

    for layer, window in [(0, 0), (3, 24)]:
        got, want = run(jnp.int32(layer), jnp.int32(window))
        assert got.shape == want.shape == q.shape
        # The kernels scale logits / probabilities columns instead of dequantizing K / V first: same values,
        # another rounding order.
        assert float(jnp.abs(got - want).max()) < ATTN_ATOL, (layer, window, float(jnp.abs(got - want).max()))


# --------------------------------------------------------------------------------------------- engine
def _prompts(vocab, lengths, seed):
    r = np.random.default_rng(seed)
    return [[int(t) for t in r.integers(3, vocab, n)] for n in lengths]


def _compare(a, b, max_new, tail_atol=LOGPROB_ATOL):
    """Same greedy tokens; the sampled tokens' logprobs within LOGPROB_ATOL, the other top-k within `tail_atol`."""
    worst = worst_tail = 0.0
    for x, y in zip(a, b):
        cx, cy = x.outputs[0], y.outputs[0]
        assert len(cx.token_ids) == max_new
        assert cx.token_ids == cy.token_ids
        for tok, lx, ly in zip(cx.token_ids, cx.logprobs, cy.logprobs):
            assert lx.keys() == ly.keys()
            worst = max(worst, abs(lx[tok] - ly[tok]))
            worst_tail = max([worst_tail] + [abs(lx[t] - ly[t]) for t in lx if t != tok])
    assert worst < LOGPROB_ATOL, worst
    assert worst_tail < tail_atol, worst_tail
    print(f"max |logprob difference| pallas vs xla: sampled {worst:.2e}, other top-k {worst_tail:.2e}")
    return max(worst, worst_tail)


@pytest.mark.parametrize("kernel", ["tpu", "gpu"])
def test_ragged_adapter_matches_xla_attention(kernel):
    """The ragged step's attention (models/ragged.py) through the ragged kernel: rows gathered to layout order,
    chunk padding squeezed out and put back; a mix of chunks (tile-aligned, padded), decodes and a short row, per
    layer and window, against the XLA path's tiles."""
    from jaxserve.models.ragged import build_ragged_inputs, ragged_attention_xla

    cfg = get_preset("tiny-gemma3")
    rng = np.random.default_rng(5)
    ps, num_pages, P = 4, 60, 16
    L, hkv, hd, hq = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.num_heads
    kc = jnp.asarray(rng.standard_normal((L, num_pages * ps, hkv, hd)), jnp.float32)
    vc = jnp.asarray(rng.standard_normal((L, num_pages * ps, hkv, hd)), jnp.float32)
    perm, o, entries = rng.permutation(np.arange(1, num_pages)), 0, []
    for n, start in [(1, 9), (20, 3), (3, 0), (1, 30), (9, 14), (1, 0)]:  # decodes, chunks, a short row
        need = -(-(start + n) // ps)
        entries.append(([0] * n, start, list(perm[o:o + need]), True))
        o += need
    inp = jax.tree.map(jnp.asarray, build_ragged_inputs(entries, 64, 8, P, ps))
    q = jnp.asarray(rng.standard_normal((64, hq, hd)), jnp.float32)
    fn = engine_attention_fn("pallas", head_dim=hd, page_size=ps, kernel=kernel).ragged

    @jax.jit
    def run(layer, window):
        a = (cfg, q, kc, vc, layer, inp.block_tables, inp, window)
        return fn(*a, page_size=ps, block_pages=4), ragged_attention_xla(*a, page_size=ps, block_pages=4)

    real = np.asarray(inp.positions) >= 0
    for layer, window in [(0, 0), (2, 5), (3, 24), (1, 1)]:
        got, want = run(jnp.int32(layer), jnp.int32(window))
        assert got.shape == want.shape == q.shape
        assert float(jnp.abs(got - want)[real].max()) < ATTN_ATOL, (layer, window)
        assert np.all(np.asarray(got)[~real] == 0.0)


def test_engine_pallas_ragged_matches_xla(llm_factory):
    """An engine on ragged steps with attention_impl="pallas" (on request: step_mode="ragged"; interpreted here)
    gives the XLA ragged engine's greedy tokens and logprobs; "auto" keeps the Pallas engine on buckets."""
    xla = llm_factory("tiny-gemma3", attention_impl="xla", **KW)
    pal = llm_factory("tiny-gemma3", attention_impl="pallas", step_mode="ragged", **KW)
    assert xla.engine.ragged and pal.engine.ragged and pal.engine.runner.attention_fn is not None
    assert not llm_factory("tiny-gemma3", attention_impl="pallas", **KW).engine.ragged
    sp = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=2)
    prompts = _prompts(xla.model_config.vocab_size, [1, 5, 23, 40, 70], seed=21)
    _compare(*[llm.generate(prompts, sp) for llm in (xla, pal)], 6)


@pytest.mark.parametrize("model,kv", [("tiny-gemma3", "float32"), ("tiny-llama", "float32"), ("tiny-gemma3", "int8"),
                                      ("tiny-gemma3", "bfloat16")])
def test_engine_pallas_matches_xla(llm_factory, model, kv):
    xla = llm_factory(model, attention_impl="xla", kv_cache_dtype=kv, **KW)
    pal = llm_factory(model, attention_impl="pallas", kv_cache_dtype=kv, **KW)
    assert xla.engine.runner.attention_fn is None and pal.engine.runner.attention_fn is not None
    V = xla.model_config.vocab_size
    max_new = 6
    sp = SamplingParams(temperature=0.0, max_tokens=max_new, ignore_eos=True, logprobs=2)
    # Round 1: lengths 1 .. 70: page-size multiples and not, past the 24-token window, 40 and 70 > one
    # 32-token chunk (chunked prefill), several prompts per prefill step.
    first = _prompts(V, [1, 5, 8, 23, 40, 70], seed=11)
    tail_atol = BF16_KV_LOGPROB_ATOL if kv == "bfloat16" else LOGPROB_ATOL
    outs = [llm.generate(first, sp) for llm in (xla, pal)]
    _compare(*outs, max_new, tail_atol)
    # Round 2: prompts sharing a 36- or 64-token prefix with round 1's (full pages: prefix-cache hits), so the
    # first prefill chunk already has context in the pages.
    ext = _prompts(V, [9, 3], seed=12)
    second = [first[4][:36] + ext[0], first[5][:64] + ext[1]]
    outs = [llm.generate(second, sp) for llm in (xla, pal)]
    for o in outs:
        assert [r.metrics.num_cached_prompt_tokens >= 32 for r in o] == [True, True], \
            [r.metrics.num_cached_prompt_tokens for r in o]
    _compare(*outs, max_new, tail_atol)
