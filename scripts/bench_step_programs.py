#!/usr/bin/env python
"""A/B of how the engine's steps compile, on the real Gemma 3 270M, one process:
A = fused: forward + sampler as one program per bucket (`compile(sample_step, fused=True)`, how every bucket
    compiled before the sampler became a program of its own);
B = split: the engine's programs (`compile_all`): per bucket the forward program, then one sampler program per
    row count (`runner.StepProgram`).

Reports the compile time of all the engine's buckets each way (persistent cache off, samplers compiled afresh
for B) and the step time of decode buckets, interleaved A/B (alternating which runs first), greedy and sampled
(temperature 0.8, top-p 0.9, top-k 50) rows, end to end through `runner.run` (the host copy of the results
included).

    python scripts/bench_step_programs.py [--dtype float32] [--reps 20] [--out scripts/results/bench_step_programs.json]

Measured (2-core AMD EPYC, float32, 2026-12-07, `--reps 20`, the order alternating): compiling the 7 buckets
32.5 s fused vs 24.4 s split (4 sampler programs; a first run: 39.7 vs 25.5 s). Decode step medians, fused /
split, greedy and sampled: R=1 75.1 / 74.1 and 71.7 / 71.2 ms; R=2 124.5 / 126.8, 140.4 / 141.3; R=4 172.8 /
168.8, 166.0 / 166.0; R=8 187.5 / 188.4, 169.5 / 162.7: no difference beyond the noise (+-3 %, both ways). The
greedy R=1 sampler program alone: 1.2 ms median (0.8 min), mostly dispatch and the argmax over 262k logits.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ["JAXSERVE_XLA_CACHE"] = "0"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from jaxserve import LLM, SamplingParams  # noqa: E402
from jaxserve.engine.runner import SamplingRow  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--max-num-seqs", type=int, default=8)
    ap.add_argument("--out", default=os.path.join("scripts", "results", "bench_step_programs.json"))
    args = ap.parse_args()

    llm = LLM("gemma3-270m", dtype=args.dtype, max_model_len=1024, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=256, max_prefill_seqs=2, min_prefill_tokens=128, num_pages=600,
              step_mode="buckets")  # (it studies the bucketed programs)
    r = llm.engine.runner
    buckets = r.buckets()
    # B: the engine's way, afresh (its sampler programs too)
    r._samplers = {}
    t = time.monotonic()
    split = r.compile(r.logits_step, buckets, step_fns={b: r.prefill_logits_step for b in r.cfg.prefill_buckets()})
    split_s = time.monotonic() - t
    t = time.monotonic()
    fused = r.compile(r.sample_step, buckets, fused=True)
    fused_s = time.monotonic() - t
    res = {"command": " ".join(["python"] + sys.argv), "dtype": args.dtype, "buckets": [list(b) for b in buckets],
           "compile_s": {"fused": round(fused_s, 1), "split": round(split_s, 1)},
           "sampler_programs": len(r._samplers), "decode": []}
    print(f"compile all {len(buckets)} buckets: fused {fused_s:.1f} s, split {split_s:.1f} s "
          f"({len(r._samplers)} sampler programs)", flush=True)

    rng = np.random.default_rng(0)
    sampled = SamplingParams(temperature=0.8, top_p=0.9, top_k=50)
    for R in r.cfg.decode_buckets():
        bucket = (R, 1)
        tables = r.synthetic_tables(R, 21)
        inp = r.step_inputs(R, 1, [([int(rng.integers(3, 5000))], 20, t) for t in tables])
        for mode, sp in (("greedy", SamplingParams(temperature=0.0)), ("sampled", sampled)):
            st = r.sampling_inputs([SamplingRow(sp, [], 0, 0, i, []) for i in range(R)], R)
            ts = {"fused": [], "split": []}
            for _ in range(2):  # warm-up
                r.run(fused, bucket, inp, st, R)
                r.run(split, bucket, inp, st, R)
            for i in range(args.reps):
                pair = (("fused", fused), ("split", split))
                for name, progs in (pair if i % 2 else pair[::-1]):  # alternate which runs first
                    t0 = time.perf_counter()
                    r.run(progs, bucket, inp, st, R)
                    ts[name].append(time.perf_counter() - t0)
            row = {"R": R, "mode": mode, **{f"{k}_median_ms": round(float(np.median(v)) * 1e3, 2)
                                           for k, v in ts.items()},
                   **{f"{k}_min_ms": round(float(np.min(v)) * 1e3, 2) for k, v in ts.items()}}
            res["decode"].append(row)
            print(f"decode R={R:3d} {mode:8s} fused {row['fused_median_ms']:8.2f} ms  split "
                  f"{row['split_median_ms']:8.2f} ms (medians of {args.reps})", flush=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
