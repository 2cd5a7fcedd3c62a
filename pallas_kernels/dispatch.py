"""Engine-facing entry points: pick the Pallas kernel for the platform or the XLA (pure jnp) path.

    LLM(..., attention_impl="auto" | "xla" | "pallas")

`attention_backend(impl)` resolves "auto" to "pallas" on TPU/GPU and "xla" on CPU. With "pallas" on CPU the TPU
kernels run in interpret mode (slow; for tests and debugging). The wrappers take `platform=` ("tpu", "cuda",
"rocm", "gpu", "cpu"; default: jax.default_backend()) so a program can be lowered for another platform, e.g.
`jax.export(jax.jit(partial(decode_attention, impl="pallas", platform="tpu", ...)), platforms=("tpu",))`, and
`kernel=` ("tpu" | "gpu") to force a kernel family (e.g. the Triton kernels in interpret mode on CPU).

With "auto", shapes a GPU kernel cannot take (Triton needs power-of-two head_dim / page_size) fall back to XLA;
with "pallas" they raise.
"""

from __future__ import annotations

import jax

from . import decode_gpu, decode_tpu, prefill_gpu, prefill_tpu, quant_matmul, reference

IMPLS = ("auto", "xla", "pallas")
_GPU_PLATFORMS = ("gpu", "cuda", "rocm")


def _platform(platform):
    return (platform or jax.default_backend()).lower()


def attention_backend(impl: str = "auto", platform: str | None = None) -> str:
    """"auto" -> "pallas" on TPU/GPU, "xla" on CPU; "xla" and "pallas" pass through."""
    if impl not in IMPLS:
        raise ValueError(f"attention_impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    return "pallas" if _platform(platform) in ("tpu", *_GPU_PLATFORMS) else "xla"


def _family(platform, kernel):
    """Which kernel family runs, and whether in interpret mode."""
    p = _platform(platform)
    if kernel is not None:
        if kernel not in ("tpu", "gpu"):
            raise ValueError(f"kernel must be 'tpu' or 'gpu', got {kernel!r}")
        native = (kernel == "tpu" and p == "tpu") or (kernel == "gpu" and p in _GPU_PLATFORMS)
        return kernel, not native
    if p == "tpu":
        return "tpu", False
    if p in _GPU_PLATFORMS:
        return "gpu", False
    return "tpu", True                                       # CPU: TPU kernels, interpreted


def _pow2(x):
    return x > 0 and (x & (x - 1)) == 0


def _gpu_shape_ok(page_size, head_dim):
    return _pow2(page_size) and _pow2(head_dim) and head_dim >= 16


def _gpu_attention_ok(k_pages):
    _, ps, _, hd = k_pages.shape
    return _gpu_shape_ok(ps, hd)


def kernel_modules(family):
    """(decode module, prefill module) of a kernel family ("tpu" | "gpu")."""
    return (decode_tpu, prefill_tpu) if family == "tpu" else (decode_gpu, prefill_gpu)


def _resolve(impl, platform, kernel, gpu_ok):
    backend = attention_backend(impl, platform)
    if backend == "xla":
        return None, False
    fam, interpret = _family(platform, kernel)
    if fam == "gpu" and not gpu_ok and impl == "auto":
        return None, False
    return fam, interpret


def decode_attention(q, k_pages, v_pages, block_tables, kv_lens, *, scale, window=0, softcap=None, k_scales=None,
                     v_scales=None, impl="auto", platform=None, kernel=None, **tuning):
    """reference.paged_attention_decode through the chosen backend. `tuning`: kernel block-size knobs."""
    fam, interpret = _resolve(impl, platform, kernel, _gpu_attention_ok(k_pages))
    kw = dict(scale=scale, window=window, softcap=softcap, k_scales=k_scales, v_scales=v_scales)
    if fam is None:
        return reference.paged_attention_decode(q, k_pages, v_pages, block_tables, kv_lens, **kw)
    mod = decode_tpu if fam == "tpu" else decode_gpu
    return mod.paged_attention_decode(q, k_pages, v_pages, block_tables, kv_lens, interpret=interpret, **kw, **tuning)


def decode_attention_fused(q, k_new, v_new, k_pages, v_pages, slots, block_tables, kv_lens, *, scale, window=0,
                           softcap=None, k_scales=None, v_scales=None, impl="auto", platform=None, kernel=None,
                           **tuning):
    """Write new K/V [R, Hkv, hd] at slots [R], then decode. Returns (out, k_pages, v_pages[, k_scales, v_scales])."""
    fam, interpret = _resolve(impl, platform, kernel, _gpu_attention_ok(k_pages))
    kw = dict(scale=scale, window=window, softcap=softcap, k_scales=k_scales, v_scales=v_scales)
    if fam is None:
        return reference.paged_attention_decode_fused(q, k_new, v_new, k_pages, v_pages, slots, block_tables,
                                                      kv_lens, **kw)
    mod = decode_tpu if fam == "tpu" else decode_gpu
    return mod.paged_attention_decode_fused(q, k_new, v_new, k_pages, v_pages, slots, block_tables, kv_lens,
                                            interpret=interpret, **kw, **tuning)


def prefill_attention(q, k_pages, v_pages, block_tables, cu_q_lens, kv_lens, num_seqs, *, scale, window=0,
                      softcap=None, k_scales=None, v_scales=None, impl="auto", platform=None, kernel=None, **tuning):
    """reference.ragged_prefill_attention through the chosen backend."""
    fam, interpret = _resolve(impl, platform, kernel, _gpu_attention_ok(k_pages))
    kw = dict(scale=scale, window=window, softcap=softcap, k_scales=k_scales, v_scales=v_scales)
    if fam is None:
        return reference.ragged_prefill_attention(q, k_pages, v_pages, block_tables, cu_q_lens, kv_lens, num_seqs, **kw)
    mod = prefill_tpu if fam == "tpu" else prefill_gpu
    return mod.ragged_prefill_attention(q, k_pages, v_pages, block_tables, cu_q_lens, kv_lens, num_seqs,
                                        interpret=interpret, **kw, **tuning)


def prefill_attention_fused(q, k_new, v_new, k_pages, v_pages, slots, block_tables, cu_q_lens, kv_lens, num_seqs, *,
                            scale, window=0, softcap=None, k_scales=None, v_scales=None, impl="auto", platform=None,
                            kernel=None, **tuning):
    """Write new K/V [T, Hkv, hd] at slots [T], then ragged prefill. Returns (out, k_pages, v_pages[, scales...])."""
    fam, interpret = _resolve(impl, platform, kernel, _gpu_attention_ok(k_pages))
    kw = dict(scale=scale, window=window, softcap=softcap, k_scales=k_scales, v_scales=v_scales)
    if fam is None:
        return reference.ragged_prefill_attention_fused(q, k_new, v_new, k_pages, v_pages, slots, block_tables,
                                                        cu_q_lens, kv_lens, num_seqs, **kw)
    mod = prefill_tpu if fam == "tpu" else prefill_gpu
    return mod.ragged_prefill_attention_fused(q, k_new, v_new, k_pages, v_pages, slots, block_tables, cu_q_lens,
                                              kv_lens, num_seqs, interpret=interpret, **kw, **tuning)


def matmul(x, w_q, scales, *, bits=8, group_size=None, impl="auto", platform=None, kernel=None, out_dtype=None,
           **tuning):
    """reference.quantized_matmul through the chosen backend (x [M, K] @ int8/int4 weights -> [M, N], in
    `out_dtype`, default x.dtype)."""
    fam, interpret = _resolve(impl, platform, kernel, True)
    if fam is None:
        # (the reference computes in f32 and rounds to its x's dtype: give it f32 x, round once to out_dtype)
        y = reference.quantized_matmul(x.astype("float32"), w_q, scales, bits=bits, group_size=group_size)
        return y.astype(out_dtype or x.dtype)
    f = quant_matmul.quantized_matmul_tpu if fam == "tpu" else quant_matmul.quantized_matmul_gpu
    return f(x, w_q, scales, bits=bits, group_size=group_size, interpret=interpret, out_dtype=out_dtype, **tuning)
