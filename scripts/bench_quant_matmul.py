#!/usr/bin/env python
"""Quantized matmul formulations on XLA:CPU at Gemma 3 270M's shapes, side by side with float32 in one run.

    python scripts/bench_quant_matmul.py [--shapes lm_head mlp_up mlp_down] [--batches 1 32] [--repeats 7]
                                         [--no-xnnpack]

For each weight shape [K, N] and batch M, times x f32[M, K] @ W with W stored as:
  f32                  the baseline (XLA's f32 GEMV/GEMM)
  bf16                 x and W in bf16, a bf16 result (and again with XLA_FLAGS=--xla_cpu_use_xnnpack=true, in a
                       subprocess)
  bf16, f32 accumulation (engine)  jaxserve's float_matmul for dtype="bfloat16": a bf16 x bf16 -> f32 dot, one
                       row computed as two on CPU
  int8 naive           dequantize the whole int8 weight to f32, then dot
  int8 chunked (ours)  jaxserve's Int8Weight.matmul: N walked in column chunks inside lax.map, each chunk
                       dequantized right before its dot so the f32 tile stays in cache
  int8 W8A8            x quantized per row to int8 on the fly, int8 x int8 -> int32 dot_general (a different
                       scheme: activations are quantized too)
  int4 naive           unpack + scale the whole weight, then dot
  int4 chunked (ours)  jaxserve's Int4Weight.matmul with the chunking above
Median of `--repeats` calls after a warm-up call. Writes bench_results/quant_matmul.json and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHAPES = {"lm_head": (640, 262144), "mlp_up": (640, 2048), "mlp_down": (2048, 640), "attn_q": (640, 1024)}


def _cases(K, N, xnnpack_only=False):
    import dataclasses

    import jax
    import jax.numpy as jnp

    from jaxserve.models.linear import float_matmul
    from jaxserve.weights import quantize as qz

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((K, N)) * 0.02).astype(np.float32)
    W = jnp.asarray(w)
    WB = W.astype(jnp.bfloat16)
    q8 = jax.tree.map(jnp.asarray, qz.quantize_int8(w))
    q4 = jax.tree.map(jnp.asarray, qz.quantize_int4(w, 64))

    def w8a8(x):
        a = jnp.max(jnp.abs(x), -1, keepdims=True) / 127
        a = jnp.where(a > 0, a, 1.0)
        xq = jnp.clip(jnp.round(x / a), -127, 127).astype(jnp.int8)
        y = jax.lax.dot_general(xq, q8.w_q, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
        return y.astype(jnp.float32) * a * q8.scales

    bf16 = {"bf16": lambda x: (x.astype(jnp.bfloat16) @ WB).astype(jnp.float32)}
    if xnnpack_only:
        return {"bf16 + xnnpack": bf16["bf16"]}, (W.nbytes, q8, q4)
    return {
        "f32": lambda x: x @ W,
        **bf16,
        "int8 naive (dequantize, dot)": lambda x: x @ q8.dequantize(),
        "int8 chunked (ours)": lambda x: q8.matmul(x),
        "int8 W8A8 int32 dot": w8a8,
        "int4 naive (unpack, dot)": lambda x: x @ q4.dequantize(),
        "int4 chunked (ours)": lambda x: q4.matmul(x),
        "int4 unchunked two-half dot": lambda x: dataclasses.replace(q4, chunk=None).matmul(x),
        # Timed last: timed before the chunked int8 / int4 cases, it slowed them in the same process.
        "bf16, f32 accumulation (engine)": lambda x: float_matmul(x.astype(jnp.bfloat16), WB, jnp.float32),
    }, (W.nbytes, q8, q4)


def run(shapes, batches, repeats, xnnpack_only=False) -> list:
    import jax
    import jax.numpy as jnp

    rows = []
    for sname in shapes:
        K, N = SHAPES[sname]
        cases, (f32_bytes, q8, q4) = _cases(K, N, xnnpack_only)
        wbytes = {"f32": f32_bytes, "bf16": f32_bytes // 2, "int8": q8.nbytes, "int4": q4.nbytes}
        for name, f in cases.items():
            fj = jax.jit(f)
            for M in batches:
                x = jnp.asarray(np.random.default_rng(1).standard_normal((M, K)).astype(np.float32))
                fj(x).block_until_ready()
                ts = []
                for _ in range(repeats):
                    t = time.perf_counter()
                    fj(x).block_until_ready()
                    ts.append(time.perf_counter() - t)
                ms = float(np.median(ts) * 1e3)
                kind = name.split()[0]
                rows.append({"shape": sname, "K": K, "N": N, "batch": M, "formulation": name, "ms": ms,
                             "weight_bytes": wbytes.get(kind), "GBps": wbytes.get(kind, 0) / ms / 1e6})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["lm_head", "mlp_up", "mlp_down"], choices=list(SHAPES))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--no-xnnpack", action="store_true", help="skip the bf16 + XNNPACK subprocess")
    ap.add_argument("--xnnpack-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench_results", "quant_matmul.json"))
    a = ap.parse_args(argv)
    if a.xnnpack_child:
        rows = run(a.shapes, a.batches, a.repeats, xnnpack_only=True)
        print("ROWS " + json.dumps(rows))
        return
    rows = run(a.shapes, a.batches, a.repeats)
    if not a.no_xnnpack:
        env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_cpu_use_xnnpack=true").strip())
        cmd = [sys.executable, __file__, "--xnnpack-child", "--shapes", *a.shapes, "--batches",
               *map(str, a.batches), "--repeats", str(a.repeats)]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("ROWS ")]
        if lines:
            rows += json.loads(lines[-1][5:])
        else:
            print("xnnpack run failed:", r.stderr[-1000:], file=sys.stderr)
    res = {"command": "python " + " ".join([os.path.relpath(__file__, ROOT)] + (argv or sys.argv[1:])),
           "cpus": os.cpu_count(), "load_average": os.getloadavg(), "rows": rows}
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    print(markdown(res))


def markdown(res) -> str:
    rows = res["rows"]
    batches = sorted({r["batch"] for r in rows})
    out = ["| shape [K, N] | formulation | " + " | ".join(f"B={b} ms (vs f32)" for b in batches) + " |",
           "|---|---|" + "---|" * len(batches)]
    for shape in dict.fromkeys(r["shape"] for r in rows):
        base = {r["batch"]: r["ms"] for r in rows if r["shape"] == shape and r["formulation"] == "f32"}
        for form in dict.fromkeys(r["formulation"] for r in rows if r["shape"] == shape):
            cells = []
            for b in batches:
                m = [r["ms"] for r in rows if r["shape"] == shape and r["formulation"] == form and r["batch"] == b]
                cells.append(f"{m[0]:.2f} ({base[b] / m[0]:.2f}x)" if m and b in base else "")
            K, N = SHAPES[shape]
            out.append(f"| {shape} [{K}, {N}] | {form} | " + " | ".join(cells) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
