"""Every kernel lowers for TPU (Mosaic custom call) and CUDA (Triton custom call) on this CPU-only machine.

jax.export runs the Pallas -> Mosaic / Pallas -> Triton-IR lowering in Python (block-shape rules, primitive
support, Triton's power-of-two sizes). The device compilers (libtpu's Mosaic passes, Triton -> PTX) only run on
the hardware, so a kernel that lowers here can still fail to compile there.

Shapes: Gemma 3 270M (4 q heads, 1 KV head, head_dim 256, window 512) and Llama 3 8B (32 / 8 heads, head_dim
128), bf16, page 16, with and without int8 KV and the fused write. Also through dispatch with platform=...
"""

import functools

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import decode_gpu, decode_tpu, dispatch, prefill_gpu, prefill_tpu, quant_matmul
from pallas_kernels.testing import export

MODELS = {
    "gemma3-270m": dict(hq=4, hkv=1, hd=256, window=512, softcap=None),
    "llama3-8b": dict(hq=32, hkv=8, hd=128, window=0, softcap=None),
    "softcapped": dict(hq=8, hkv=2, hd=128, window=64, softcap=50.0),
}
R, P, PS, NUM_PAGES, T = 4, 8, 16, 40, 48
MARK = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}
DECODE = {"tpu": decode_tpu, "cuda": decode_gpu}
PREFILL = {"tpu": prefill_tpu, "cuda": prefill_gpu}


def _sds(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


def _kv(m, int8):
    dt = jnp.int8 if int8 else jnp.bfloat16
    pages = _sds((NUM_PAGES, PS, m["hkv"], m["hd"]), dt)
    scales = _sds((NUM_PAGES, PS, m["hkv"]), jnp.float32) if int8 else None
    return pages, scales


def _static(m):
    return dict(scale=m["hd"] ** -0.5, window=m["window"], softcap=m["softcap"])


def _with_scales(fn, **static):
    """Array arguments positionally (kwargs of the exported function would become constants); the last two
    positional arguments, when int8, are the K and V scales."""
    def f(*args, quantized):
        if quantized:
            *args, ks, vs = args
            return fn(*args, k_scales=ks, v_scales=vs, **static)
        return fn(*args, **static)
    return f


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("fused", [False, True])
def test_decode_lowers(platform, model, int8, fused):
    m = MODELS[model]
    pages, scales = _kv(m, int8)
    q = _sds((R, m["hq"], m["hd"]), jnp.bfloat16)
    tables, lens = _sds((R, P), jnp.int32), _sds((R,), jnp.int32)
    extra = (scales, scales) if int8 else ()
    mod = DECODE[platform]
    if fused:
        new = _sds((R, m["hkv"], m["hd"]), jnp.bfloat16)
        fn = _with_scales(mod.paged_attention_decode_fused, **_static(m))
        text = export(fn, platform, q, new, new, pages, pages, _sds((R,), jnp.int32), tables, lens, *extra,
                      quantized=int8)
    else:
        fn = _with_scales(mod.paged_attention_decode, **_static(m))
        text = export(fn, platform, q, pages, pages, tables, lens, *extra, quantized=int8)
    assert MARK[platform] in text


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("fused", [False, True])
def test_prefill_lowers(platform, model, int8, fused):
    m = MODELS[model]
    pages, scales = _kv(m, int8)
    q = _sds((T, m["hq"], m["hd"]), jnp.bfloat16)
    meta = (_sds((R, P), jnp.int32), _sds((R + 1,), jnp.int32), _sds((R,), jnp.int32), _sds((1,), jnp.int32))
    kw = _static(m)
    if platform == "tpu":
        kw["block_q"] = 16
    extra = (scales, scales) if int8 else ()
    mod = PREFILL[platform]
    if fused:
        new = _sds((T, m["hkv"], m["hd"]), jnp.bfloat16)
        fn = _with_scales(mod.ragged_prefill_attention_fused, **kw)
        text = export(fn, platform, q, new, new, pages, pages, _sds((T,), jnp.int32), *meta, *extra, quantized=int8)
    else:
        fn = _with_scales(mod.ragged_prefill_attention, **kw)
        text = export(fn, platform, q, pages, pages, *meta, *extra, quantized=int8)
    assert MARK[platform] in text


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("bits,k,n,group", [(8, 640, 1024, None), (4, 640, 1024, 64), (8, 4096, 14336, None),
                                            (4, 4096, 14336, 128)])
@pytest.mark.parametrize("m", [8, 512])
def test_quantized_matmul_lowers(platform, bits, k, n, group, m):
    x = _sds((m, k), jnp.bfloat16)
    if bits == 8:
        w, s = _sds((k, n), jnp.int8), _sds((n,), jnp.float32)
    else:
        w, s = _sds((k // 2, n), jnp.uint8), _sds((k // group, n), jnp.float32)
    fn = quant_matmul.quantized_matmul_tpu if platform == "tpu" else quant_matmul.quantized_matmul_gpu
    assert MARK[platform] in export(functools.partial(fn, bits=bits, group_size=group), platform, x, w, s)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_dispatch_lowers_for_platform(platform):
    """dispatch with platform=... picks that platform's kernel even when tracing on CPU."""
    m = MODELS["llama3-8b"]
    pages, _ = _kv(m, False)
    q = _sds((R, m["hq"], m["hd"]), jnp.bfloat16)
    fn = functools.partial(dispatch.decode_attention, impl="auto", platform=platform, **_static(m))
    assert MARK[platform] in export(fn, platform, q, pages, pages, _sds((R, P), jnp.int32), _sds((R,), jnp.int32))
    x, w, s = _sds((8, 256), jnp.bfloat16), _sds((256, 256), jnp.int8), _sds((256,), jnp.float32)
    fn = functools.partial(dispatch.matmul, bits=8, impl="pallas", platform=platform)
    assert MARK[platform] in export(fn, platform, x, w, s)


def test_xla_path_lowers_without_custom_calls():
    m = MODELS["gemma3-270m"]
    pages, _ = _kv(m, False)
    q = _sds((R, m["hq"], m["hd"]), jnp.bfloat16)
    fn = functools.partial(dispatch.decode_attention, impl="xla", platform="tpu", **_static(m))
    text = export(fn, "tpu", q, pages, pages, _sds((R, P), jnp.int32), _sds((R,), jnp.int32))
    assert "stablehlo.custom_call" not in text


@pytest.fixture(scope="module")
def tiny_gemma3_params():
    from jaxserve.weights.resolve import resolve_model
    res = resolve_model("tiny-gemma3", random_weights=True, seed=0)
    params = res.params() if callable(res.params) else res.params
    return res.config, jax.tree.map(
        lambda a: _sds(a.shape, jnp.bfloat16 if jnp.issubdtype(a.dtype, jnp.floating) else a.dtype), params)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("R,Q", [(4, 1), (2, 16)])
def test_engine_forward_step_lowers(tiny_gemma3_params, platform, R, Q):
    """The engine's whole step (forward_step: layer scan, sliding + global layers, KV scatter) with
    attention_impl="pallas" lowers for the accelerator: the adapter of pallas_kernels/engine.py (all-layer cache
    view, page-id offset by the traced layer, [R, Q] <-> ragged packing) around the decode (Q = 1) and ragged
    prefill kernels."""
    from jaxserve.models.transformer import StepInputs, forward_step
    from pallas_kernels.engine import engine_attention_fn
    cfg, p_abs = tiny_gemma3_params
    ps, n, p = 16, 32, 8
    kv_abs = {k: _sds((cfg.num_layers, n * ps, cfg.num_kv_heads, cfg.head_dim), jnp.bfloat16) for k in ("k", "v")}
    fn = engine_attention_fn("pallas", head_dim=cfg.head_dim, page_size=ps, platform=platform)
    i32 = jnp.int32
    inp = StepInputs(_sds((R, Q), i32), _sds((R, Q), i32), _sds((R,), i32), _sds((R,), i32), _sds((R, p), i32),
                     _sds((R, Q), i32))

    def step(params, kv, inp):
        return forward_step(cfg, params, kv, inp, page_size=ps, block_pages=4, attention_fn=fn)

    text = export(step, platform, p_abs, kv_abs, inp)
    assert MARK[platform] in text
    assert MARK["cuda" if platform == "tpu" else "tpu"] not in text


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("T", [8, 64])
def test_engine_ragged_step_lowers(tiny_gemma3_params, platform, T):
    """The engine's ragged step (models/ragged.py forward_ragged: flat tokens, sliding + global layers) with the
    Pallas kernels' ragged attention (pallas_kernels/engine.py `.ragged`) lowers for the accelerator."""
    from jaxserve.models.ragged import abstract_ragged_inputs, forward_ragged
    from pallas_kernels.engine import engine_attention_fn

    cfg, p_abs = tiny_gemma3_params
    ps, n, p = 16, 32, 8
    kv_abs = {k: _sds((cfg.num_layers, n * ps, cfg.num_kv_heads, cfg.head_dim), jnp.bfloat16) for k in ("k", "v")}
    fn = engine_attention_fn("pallas", head_dim=cfg.head_dim, page_size=ps, platform=platform)

    def step(params, kv, inp):
        return forward_ragged(cfg, params, kv, inp, page_size=ps, block_pages=4, attention_fn=fn.ragged)

    text = export(step, platform, p_abs, kv_abs, abstract_ragged_inputs(T, 4, p))
    assert MARK[platform] in text
    assert MARK["cuda" if platform == "tpu" else "tpu"] not in text
