"""Time `jaxserve.engine.sampler.sample` on the current backend.

    python scripts/bench_sampling.py                 # R in {1, 32}, V = 262144 (Gemma 3 vocab)
    python scripts/bench_sampling.py --rows 1 8 32 --vocab 128256 --history 8192

Prints wall-clock min / median and process CPU time (all threads) per call, jitted, inputs already on device.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402

from jaxserve.engine.sampler import SamplingTensors, sample  # noqa: E402
from jaxserve.engine.sampling_inputs import build_sampling_arrays  # noqa: E402
from jaxserve.sampling_params import SamplingParams  # noqa: E402

SCENARIOS = {
    "all greedy": dict(temperature=0.0),
    "temperature only": dict(temperature=0.8),
    "top-k 50": dict(temperature=0.8, top_k=50),
    "top-p 0.9": dict(temperature=0.8, top_p=0.9),
    "top-k 50 + top-p 0.9 + min-p 0.05": dict(temperature=0.8, top_k=50, top_p=0.9, min_p=0.05),
    "top-k 1000": dict(temperature=0.8, top_k=1000),
    "top-k 5000 (bisection)": dict(temperature=0.8, top_k=5000),
    "penalties on (greedy)": dict(temperature=0.0, repetition_penalty=1.2, presence_penalty=0.5,
                                  frequency_penalty=0.5),
    "penalties + temperature": dict(temperature=0.8, repetition_penalty=1.2, presence_penalty=0.5,
                                    frequency_penalty=0.5),
    "greedy + logprobs 5": dict(temperature=0.0, logprobs=5),
}


def llm_like_logits(rng, R, V):
    """Roughly LLM-shaped: a heavy-tailed bulk plus a few strong candidates."""
    x = rng.standard_normal((R, V)).astype(np.float32) * 2.0 - 4.0
    for r in range(R):
        top = rng.choice(V, 32, replace=False)
        x[r, top] += rng.uniform(6.0, 14.0, 32).astype(np.float32)
    return x


def bench(fn, *args, reps=7, inner=3):
    """(min wall ms, median wall ms, median process-CPU ms) per call. CPU time (all threads) is the steadier
    number on a shared machine; wall time is the latency."""
    jax.block_until_ready(fn(*args))
    ts, cs = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        ts.append((time.perf_counter() - t0) / inner)
        cs.append((time.process_time() - c0) / inner)
    ts.sort()
    cs.sort()
    return ts[0] * 1e3, ts[len(ts) // 2] * 1e3, cs[len(cs) // 2] * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--vocab", type=int, default=262144)
    ap.add_argument("--history", type=int, default=4096, help="H: history width (filled to 3/4)")
    ap.add_argument("--max-logprobs", type=int, default=20)
    ap.add_argument("--row-chunk", type=int, default=None)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--only", nargs="*", default=None, help="substrings of scenario names to run")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    V, H = args.vocab, args.history
    fn = jax.jit(lambda x, st: sample(x, st, args.max_logprobs, row_chunk=args.row_chunk))
    print(f"backend={jax.default_backend()} devices={jax.device_count()} V={V} H={H} "
          f"max_logprobs={args.max_logprobs} jax={jax.__version__}")
    for R in args.rows:
        x = jax.device_put(llm_like_logits(rng, R, V))
        fill = 3 * H // 4
        hist = [rng.integers(0, V, fill).tolist() for _ in range(R)]
        for name, kw in SCENARIOS.items():
            if args.only and not any(o in name for o in args.only):
                continue
            params = [SamplingParams(**kw) for _ in range(R)]
            arrays = build_sampling_arrays(params, hist, [fill // 2] * R, [5] * R, list(range(R)),
                                           [[]] * R, R, H, 8)
            st = jax.device_put(SamplingTensors(**arrays))
            lo, med, cpu = bench(fn, x, st, reps=args.reps)
            print(f"R={R:3d}  {name:36s} wall min {lo:8.2f} ms  median {med:8.2f} ms   cpu {cpu:8.2f} ms",
                  flush=True)


if __name__ == "__main__":
    main()
