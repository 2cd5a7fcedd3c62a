#!/usr/bin/env python
"""Is this machine steady? Call one compiled decode step of Gemma 3 270M in a loop and print its time per window.

    python scripts/bench_step_noise.py [--seconds 150] [--batch 1] [--config fp32|bf16|int8+head|int8+head+bf16]

Every window of 40 calls prints the median and minimum step time, the process's CPU-seconds per wall-second
and its minor page faults. The program, its inputs and the process never change, so any change in step time
is the machine (README "Timing noise"). Writes bench_results/step_noise.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))


def _minor_faults() -> int:
    with open("/proc/self/stat") as f:
        return int(f.read().split(")")[1].split()[7])


def main(argv=None) -> int:
    from bench_decode import CONFIGS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=150.0)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--config", default="int8+head+bf16", choices=list(CONFIGS))
    ap.add_argument("--out", default=os.path.join(ROOT, "bench_results", "step_noise.json"))
    args = ap.parse_args(argv)

    import jax

    from jaxserve import LLM
    from jaxserve.engine.sampler import SamplingTensors
    from jaxserve.engine.sampling_inputs import build_sampling_arrays
    from jaxserve.sampling_params import SamplingParams

    B, pages = args.batch, 96
    llm = LLM("gemma3-270m", max_num_seqs=max(B, 1), max_model_len=1536, num_pages=B * pages + 1,
              step_mode="buckets", **CONFIGS[args.config])  # (it times a bucketed decode program)
    r = llm.engine.runner
    bucket = min(b for b, q in r.buckets() if q == 1 and b >= B)
    inp = r.step_inputs(bucket, 1, [([5], 300, t) for t in r.synthetic_tables(B, 301)])
    st = build_sampling_arrays([SamplingParams(temperature=0.0)] * bucket, [[]] * bucket, [0] * bucket, [0] * bucket,
                               [0] * bucket, [[]] * bucket, bucket, r.H, r.NB)
    prog = r.programs[(bucket, 1)]
    inputs = r.place_inputs((inp, SamplingTensors(**st)))
    windows = []
    t_end = time.time() + args.seconds
    while time.time() < t_end:
        ts, c0, w0, f0 = [], time.process_time(), time.perf_counter(), _minor_faults()
        for _ in range(40):
            t0 = time.perf_counter()
            out, r.kv = prog(r.params, r.kv, *inputs)
            jax.block_until_ready(out)
            ts.append(time.perf_counter() - t0)
        w = {"time": time.strftime("%H:%M:%S"), "median_ms": float(np.median(ts)) * 1e3,
             "min_ms": min(ts) * 1e3, "cpu_per_wall": (time.process_time() - c0) / (time.perf_counter() - w0),
             "minor_faults": _minor_faults() - f0}
        windows.append(w)
        print(f"{w['time']} median {w['median_ms']:.1f} ms  min {w['min_ms']:.1f}  cpu/wall {w['cpu_per_wall']:.2f}  "
              f"minor faults {w['minor_faults']}", flush=True)
    med = [w["median_ms"] for w in windows]
    res = {"command": " ".join(["python"] + sys.argv), "config": args.config, "batch": B, "windows": windows,
           "median_of_windows_ms": float(np.median(med)), "slowest_window_ms": max(med),
           "fastest_window_ms": min(med)}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"\n| windows | median of window medians (ms) | fastest | slowest | slowest / fastest |\n|---|---|---|---|---|\n"
          f"| {len(med)} | {res['median_of_windows_ms']:.1f} | {min(med):.1f} | {max(med):.1f} | {max(med) / min(med):.2f}x |")
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
