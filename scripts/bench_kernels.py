#!/usr/bin/env python
"""Benchmark the attention and quantized-matmul paths; print the rooflines of pallas_kernels/README.md.

    python scripts/bench_kernels.py [--model gemma3-270m llama3-8b] [--batch 8] [--context 1024]
                                    [--prefill-tokens 256] [--repeats 5] [--dtype auto|bf16|f32] [--quick]
                                    [--roofline] [--out PATH]

It times the XLA paths everywhere: "xla (engine)" is the engine's own attention (what attention_impl="xla"
runs: jaxserve.models.transformer.paged_attention_xla, a flash loop over the visible KV blocks) and
"xla (reference)" the pure-jnp definitions of pallas_kernels/reference.py (dispatch's impl="xla"; they gather
the whole block table and dequantize whole weights). On TPU / GPU it also times our Pallas kernels and JAX's
shipped kernels (TPU: paged_attention, ragged_paged_attention; GPU: paged_attention) on the same inputs. Every
row reports time, the bytes the call must move at minimum (visible KV once, weights once, activations in/out;
formulas in pallas_kernels/README.md), achieved bytes/s and the fraction of the device's memory bandwidth
(its spec on known TPUs / GPUs, else measured). Writes bench_results/kernels.json.

Activations and KV are bf16 on TPU / GPU and float32 on CPU (the engine's CPU default; XLA:CPU is slow in bf16)
unless --dtype says otherwise; bytes are counted for the dtype used. --quick: small shapes and 3 repeats (under
a minute on 2 CPU cores), for checking the script rather than for numbers. --roofline: only print the README's
roofline table (bf16, TPU v5e and H100, computed from the formulas below).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from pallas_kernels import reference as ref  # noqa: E402

MODELS = {
    # attention shapes of one layer + the MLP up-projection; window = sliding layers' window
    "gemma3-270m": dict(hq=4, hkv=1, hd=256, window=512, d=640, f=2048, group=64),
    "llama3-8b": dict(hq=32, hkv=8, hd=128, window=0, d=4096, f=14336, group=128),
}
# name: (HBM bytes/s, dense bf16 FLOP/s, int8 OP/s)
DEVICES = {
    "TPU v5e": (819e9, 197e12, 394e12),
    "H100 SXM": (3.35e12, 989e12, 1979e12),
}
_KNOWN_BW = [("v5 lite", 819e9), ("v5e", 819e9), ("v5p", 2765e9), ("v6", 1640e9), ("v4", 1228e9),
             ("h100", 3.35e12), ("h200", 4.8e12), ("a100", 2.0e12), ("l4", 300e9)]


# ------------------------------------------------------------------------------------------------------------
# bytes and FLOPs per call
# ------------------------------------------------------------------------------------------------------------

ACT_BYTES = {"bf16": 2, "f32": 4}


def kv_token_bytes(m, kv_dtype):
    """K + V bytes of one token in one layer (int8 adds one f32 scale per head for K and for V)."""
    if kv_dtype == "int8":
        return 2 * m["hkv"] * (m["hd"] + 4)
    return 2 * m["hkv"] * m["hd"] * ACT_BYTES[kv_dtype]


def decode_cost(m, batch, context, kv_dtype, window, act="bf16"):
    visible = min(context, window) if window else context
    act = 2 * batch * m["hq"] * m["hd"] * ACT_BYTES[act]          # q in, out
    return dict(bytes=batch * visible * kv_token_bytes(m, kv_dtype) + act,
                flops=4 * batch * m["hq"] * m["hd"] * visible)


def prefill_cost(m, tokens, context, kv_dtype, window, act="bf16"):
    """One segment of `tokens` new tokens after `context` cached ones; causal (+ window)."""
    kv_len = context + tokens
    pos = np.arange(context, kv_len)
    vis = np.minimum(pos + 1, window) if window else pos + 1
    read = min(kv_len, (window + tokens) if window else kv_len)  # every visible key read once (ideal tiling)
    act = 2 * tokens * m["hq"] * m["hd"] * ACT_BYTES[act]
    return dict(bytes=read * kv_token_bytes(m, kv_dtype) + act, flops=int(4 * m["hq"] * m["hd"] * vis.sum()))


def matmul_cost(m_rows, k, n, bits, group, act="bf16"):
    w = k * n * bits // 8 + (n * 4 if bits == 8 else (k // group) * n * 4)
    return dict(bytes=w + (m_rows * k + m_rows * n) * ACT_BYTES[act], flops=2 * m_rows * k * n)


def roofline_seconds(cost, device, int8_compute=False):
    bw, flops, iops = DEVICES[device]
    return max(cost["bytes"] / bw, cost["flops"] / (iops if int8_compute else flops))


def roofline_table():
    lines = ["| kernel | model | shape | bytes / call | FLOPs / call | TPU v5e | H100 SXM |",
             "|---|---|---|---|---|---|---|"]

    def row(kernel, model, shape, cost):
        t = [roofline_seconds(cost, d) for d in DEVICES]
        lines.append(f"| {kernel} | {model} | {shape} | {cost['bytes'] / 1e6:.2f} MB | {cost['flops'] / 1e9:.2f} G | "
                     f"{t[0] * 1e6:.1f} us | {t[1] * 1e6:.1f} us |")

    for name, m in MODELS.items():
        for kv in ("bf16", "int8"):
            for window, label in ((0, "global"), (m["window"], "sliding")):
                if label == "sliding" and not window:
                    continue
                row("decode attn", name, f"B=32, ctx 4096, {kv} KV, {label}{f' {window}' if window else ''}",
                    decode_cost(m, 32, 4096, kv, window))
        row("prefill attn", name, "2048 new tokens, ctx 0, bf16 KV, global", prefill_cost(m, 2048, 0, "bf16", 0))
        row("prefill attn", name, "512-token chunk after 3584, bf16 KV, global", prefill_cost(m, 512, 3584, "bf16", 0))
        for bits in (8, 4):
            for rows in (1, 32, 2048):
                row(f"int{bits} matmul", name, f"[{rows}, {m['d']}] x [{m['d']}, {m['f']}]",
                    matmul_cost(rows, m["d"], m["f"], bits, m["group"]))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------------------

def device_bandwidth():
    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", "").lower()
    for key, bw in _KNOWN_BW:
        if key in kind:
            return bw, f"{dev.device_kind} (spec)"
    if dev.platform == "cpu":   # same convention as scripts/bench_decode.py: numpy copy, read + write
        a = np.ones(1 << 28 >> 2, np.float32)
        b = np.empty_like(a)
        best = min(_timed(lambda: np.copyto(b, a)) for _ in range(5))
        return 2 * a.nbytes / best, "cpu (measured numpy copy)"
    # measure: copy of a 256 MB buffer, read + write
    x = jnp.ones((1 << 26,), jnp.float32)
    f = jax.jit(lambda a: a + 1)
    f(x).block_until_ready()
    best = min(_timed(lambda: f(x).block_until_ready()) for _ in range(3))
    return 2 * x.nbytes / best, f"{getattr(dev, 'device_kind', dev.platform)} (measured copy)"


def _timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench(fn, args, repeats):
    """(median seconds over `repeats` calls after a warm-up call, the warm-up call's output)."""
    out = fn(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return float(np.median(times)), out


def make_decode_inputs(m, batch, context, page_size, kv_dtype, seed=0, dtype=jnp.bfloat16):
    rng = np.random.default_rng(seed)
    pages_per_seq = -(-context // page_size)
    num_pages = 1 + batch * pages_per_seq
    tables = (1 + np.arange(batch * pages_per_seq).reshape(batch, pages_per_seq)).astype(np.int32)
    rng.shuffle(tables.reshape(-1))
    shape = (num_pages, page_size, m["hkv"], m["hd"])
    k = jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
    v = jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
    ks = vs = None
    if kv_dtype == "int8":
        (k, ks), (v, vs) = ref.quantize_kv_int8(k), ref.quantize_kv_int8(v)
    q = jnp.asarray(rng.standard_normal((batch, m["hq"], m["hd"]), np.float32), dtype)
    lens = jnp.full((batch,), context, jnp.int32)
    return q, k, v, jnp.asarray(tables), lens, ks, vs


def _engine_cfg(m, scale):
    """The three ModelConfig fields the engine's attention reads."""
    from types import SimpleNamespace
    return SimpleNamespace(num_heads=m["hq"], num_kv_heads=m["hkv"], attn_scale=scale, attn_logit_softcap=None)


ENGINE_BLOCK_PAGES = 16   # EngineConfig.attn_block_pages default


def _engine_tables(tables):
    """The engine's block tables are a whole number of attention blocks wide (EngineConfig.pages_per_seq)."""
    extra = -tables.shape[1] % ENGINE_BLOCK_PAGES
    return jnp.pad(tables, ((0, 0), (0, extra))) if extra else tables


def engine_decode_fn(m, scale, window, page_size):
    """The engine's XLA decode attention on one layer: cache [1, N*ps, Hkv, hd] (a free view of the pages)."""
    from jaxserve.models.transformer import paged_attention_xla
    cfg = _engine_cfg(m, scale)

    @jax.jit
    def f(q, k, v, tables, lens):
        n = k.shape[0]
        kc, vc = k.reshape(1, n * page_size, *k.shape[2:]), v.reshape(1, n * page_size, *v.shape[2:])
        out = paged_attention_xla(cfg, q[:, None], kc, vc, 0, _engine_tables(tables), lens, (lens - 1)[:, None],
                                  jnp.int32(window), page_size=page_size, block_pages=ENGINE_BLOCK_PAGES)
        return out[:, 0]
    return f


def engine_prefill_fn(m, scale, page_size):
    """The engine's XLA attention for one prefill segment: q [T, Hq, hd] as one row of T new tokens."""
    from jaxserve.models.transformer import paged_attention_xla
    cfg = _engine_cfg(m, scale)

    @jax.jit
    def f(q, k, v, tables, cu, kv_lens, num_seqs):
        n, t = k.shape[0], q.shape[0]
        kc, vc = k.reshape(1, n * page_size, *k.shape[2:]), v.reshape(1, n * page_size, *v.shape[2:])
        pos = (kv_lens[0] - t + jnp.arange(t, dtype=jnp.int32))[None]
        out = paged_attention_xla(cfg, q[None], kc, vc, 0, _engine_tables(tables), kv_lens, pos, jnp.int32(0),
                                  page_size=page_size, block_pages=ENGINE_BLOCK_PAGES)
        return out[0]
    return f


def run(args):
    platform = jax.default_backend()
    bw, bw_src = device_bandwidth()
    accel = platform in ("tpu", "gpu")
    act = args.dtype if args.dtype != "auto" else ("bf16" if accel else "f32")
    dtype = {"bf16": jnp.bfloat16, "f32": jnp.float32}[act]
    rows = []

    want = {}

    def record(kind, model, impl, shape, timed, cost):
        """One row. Every impl's output is compared with the reference's on the same inputs (max abs error,
        relative to max |reference|), so a timing of a wrong kernel shows up as such."""
        seconds, out = timed
        out = np.asarray(jnp.asarray(out, jnp.float32))
        key = (kind, model, shape)
        if impl == "xla (reference)":
            want[key] = out
        ref_out = want.get(key)
        err = None
        if ref_out is not None and ref_out.shape == out.shape:
            err = float(np.abs(out - ref_out).max() / max(float(np.abs(ref_out).max()), 1e-30))
        rows.append(dict(kind=kind, model=model, impl=impl, shape=shape, ms=seconds * 1e3, bytes=cost["bytes"],
                         flops=cost["flops"], gbps=cost["bytes"] / seconds / 1e9,
                         frac_bw=cost["bytes"] / seconds / bw, rel_err_vs_reference=err))

    for name in args.model:
        m = MODELS[name]
        scale = m["hd"] ** -0.5
        # ---------------- decode attention ----------------
        for kv_dtype, window in [(kv, w) for kv in (act, "int8") for w in sorted({0, m["window"]})]:
            q, k, v, tables, lens, ks, vs = make_decode_inputs(m, args.batch, args.context, args.page_size, kv_dtype,
                                                               dtype=dtype)
            shape = f"B={args.batch} ctx={args.context} {act} q, {kv_dtype} KV, window={window}"
            cost = decode_cost(m, args.batch, args.context, kv_dtype, window, act)
            impls = {"xla (reference)": jax.jit(functools.partial(ref.paged_attention_decode, scale=scale,
                                                                   window=window, k_scales=ks, v_scales=vs))}
            if kv_dtype != "int8":   # the engine's cache is bf16 / f32 (no int8 KV in the engine yet)
                impls["xla (engine)"] = engine_decode_fn(m, scale, window, args.page_size)
            if accel:
                from pallas_kernels import decode_gpu, decode_tpu
                mod = decode_tpu if platform == "tpu" else decode_gpu
                impls["pallas (ours)"] = functools.partial(mod.paged_attention_decode, scale=scale, window=window,
                                                           k_scales=ks, v_scales=vs)
                if kv_dtype != "int8" and not window:
                    impls.update(_jax_decode_baselines(platform, args.page_size, args.context))
            for impl, fn in impls.items():
                a = (q, k, v, tables, lens)
                if impl.startswith("jax"):
                    a = (q, jnp.transpose(k, (2, 0, 1, 3)), jnp.transpose(v, (2, 0, 1, 3)), tables, lens)
                record("decode attention", name, impl, shape, bench(fn, a, args.repeats), cost)
        # ---------------- ragged prefill attention ----------------
        t_new, ctx = args.prefill_tokens, args.context
        q, k, v, tables, _, _, _ = make_decode_inputs(m, 1, ctx + t_new, args.page_size, act, dtype=dtype)
        qp = jnp.asarray(np.random.default_rng(1).standard_normal((t_new, m["hq"], m["hd"]), np.float32), dtype)
        cu = jnp.array([0, t_new], jnp.int32)
        kvl = jnp.array([ctx + t_new], jnp.int32)
        ns = jnp.array([1], jnp.int32)
        cost = prefill_cost(m, t_new, ctx, act, 0, act)
        shape = f"{t_new} new tokens after {ctx}, {act} q and KV"
        impls = {"xla (reference)": jax.jit(functools.partial(ref.ragged_prefill_attention, scale=scale)),
                 "xla (engine)": engine_prefill_fn(m, scale, args.page_size)}
        if accel:
            from pallas_kernels import prefill_gpu, prefill_tpu
            mod = prefill_tpu if platform == "tpu" else prefill_gpu
            impls["pallas (ours)"] = functools.partial(mod.ragged_prefill_attention, scale=scale)
        for impl, fn in impls.items():
            record("prefill attention", name, impl, shape, bench(fn, (qp, k, v, tables, cu, kvl, ns), args.repeats),
                   cost)
        if platform == "tpu":
            from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ragged_paged_attention
            kv = jnp.stack([k, v], axis=3).reshape(*k.shape[:2], 2 * m["hkv"], m["hd"])
            fn = functools.partial(ragged_paged_attention, sm_scale=scale)
            record("prefill attention", name, "jax ragged_paged_attention", shape,
                   bench(fn, (qp, kv, kvl, tables, cu, ns), args.repeats), cost)
        # ---------------- quantized matmul ----------------
        rng = np.random.default_rng(2)
        w = jnp.asarray(rng.standard_normal((m["d"], m["f"]), np.float32))
        quant = {8: ref.quantize_int8(w), 4: ref.quantize_int4(w, m["group"])}
        for rows_m in (args.batch, args.prefill_tokens):
            x = jnp.asarray(rng.standard_normal((rows_m, m["d"]), np.float32), dtype)
            for bits, (wq, s) in quant.items():
                cost = matmul_cost(rows_m, m["d"], m["f"], bits, m["group"], act)
                shape = f"{act} [{rows_m}, {m['d']}] x int{bits} [{m['d']}, {m['f']}]"
                impls = {"xla (reference)": jax.jit(functools.partial(ref.quantized_matmul, bits=bits,
                                                                       group_size=m["group"]))}
                if accel:
                    from pallas_kernels import quant_matmul
                    f = quant_matmul.quantized_matmul_tpu if platform == "tpu" else quant_matmul.quantized_matmul_gpu
                    impls["pallas (ours)"] = functools.partial(f, bits=bits, group_size=m["group"])
                for impl, fn in impls.items():
                    record(f"int{bits} matmul", name, impl, shape, bench(fn, (x, wq, s), args.repeats), cost)
    return dict(platform=platform, device=bw_src, bandwidth=bw, rows=rows)


def _jax_decode_baselines(platform, page_size, context):
    pages = -(-context // page_size)
    ppcb = max(d for d in (1, 2, 4, 8, 16) if pages % d == 0)
    if platform == "tpu":
        from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention
        return {"jax tpu paged_attention": lambda q, k, v, t, l: paged_attention(q, k, v, l, t,
                                                                                  pages_per_compute_block=ppcb)}
    from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention
    splits = max(d for d in (1, 2, 4, 8, 16) if pages % d == 0)
    return {"jax gpu paged_attention": lambda q, k, v, t, l: paged_attention(q, k, v, t, l, k_splits=splits,
                                                                              pages_per_compute_block=1)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--prefill-tokens", type=int, default=256)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", choices=["auto", "bf16", "f32"], default="auto",
                    help="activations and KV (auto: bf16 on TPU/GPU; f32 on CPU, the engine's CPU default)")
    ap.add_argument("--quick", action="store_true", help="small shapes, 3 repeats: a smoke run of the script")
    ap.add_argument("--roofline", action="store_true", help="only print the README roofline table")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench_results", "kernels.json"))
    args = ap.parse_args()
    if args.quick:
        args.batch, args.context, args.prefill_tokens, args.repeats = 4, 256, 64, 3
    if args.roofline:
        print(roofline_table())
        return
    res = run(args)
    print(f"platform {res['platform']}, device {res['device']}, bandwidth {res['bandwidth'] / 1e9:.1f} GB/s\n")
    print("| kernel | model | impl | shape | ms | bytes moved | achieved GB/s | of bandwidth | rel. err vs ref |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in res["rows"]:
        err = "n/a" if r["rel_err_vs_reference"] is None else f"{r['rel_err_vs_reference']:.1e}"
        print(f"| {r['kind']} | {r['model']} | {r['impl']} | {r['shape']} | {r['ms']:.3f} | {r['bytes'] / 1e6:.2f} MB"
              f" | {r['gbps']:.1f} | {100 * r['frac_bw']:.1f}% | {err} |")
    res["args"] = vars(args)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
