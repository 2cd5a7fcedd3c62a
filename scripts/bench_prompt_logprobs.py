#!/usr/bin/env python
"""A/B of the engine's prefill step program on the real Gemma 3 270M, one process, interleaved:
A = sample_step (the step every prefill bucket compiled before this change; unchanged code),
B = prefill_step (what the prefill buckets compile now: the same + every position's hidden state as an output).
Also: the scorer's compile time, and a step that scores all its positions (prompt logprobs on).

    python scripts/bench_prompt_logprobs.py [float32|bfloat16]     # REPS=20 in the environment: repetitions

Measured (2-core AMD EPYC CPU, float32, n=20, quiet machine): (1, 256) A median 495.8 / min 461.4 ms, B 489.4 /
463.0 ms; (2, 128) A 588.7 / 484.4 ms, B 563.1 / 484.7 ms: no measurable difference. Scoring all 255 positions:
1620 ms median (the LM head over a 262k vocabulary for 255 rows).
"""
import os
import sys
import time

import numpy as np
os.environ.setdefault("JAXSERVE_XLA_CACHE", "0")
from jaxserve import LLM, SamplingParams
from jaxserve.engine.runner import SamplingRow

dtype = sys.argv[1] if len(sys.argv) > 1 else "float32"
t0 = time.time()
llm = LLM("gemma3-270m", dtype=dtype, max_model_len=1024, max_num_seqs=2, max_num_batched_tokens=256,
          max_prefill_seqs=2, min_prefill_tokens=128, num_pages=600, step_mode="buckets")
print(f"{dtype}: engine built (compile_all incl. scorer) in {time.time() - t0:.1f}s", flush=True)
r = llm.engine.runner
t = time.time(); r.compile_scorer(); print(f"scorer compile alone: {time.time() - t:.1f}s", flush=True)
for bucket in [(1, 256), (2, 128)]:
    R, Q = bucket
    A = r.compile(r.logits_step, [bucket])
    B = r.programs
    rng = np.random.default_rng(0)
    entries = [([int(x) for x in rng.integers(3, 5000, Q)], 0, t) for t in r.synthetic_tables(R, Q, start=0)]
    inp = r.step_inputs(R, Q, entries)
    st = r.sampling_inputs([SamplingRow(SamplingParams(temperature=0), [], Q, 0, 0, [])] * R, R)
    spans = {0: (0, Q - 1, 0, entries[0][0][1:])}
    for _ in range(3):
        r.run(A, bucket, inp, st, R); r.run(B, bucket, inp, st, R); r._run(B, bucket, inp, st, R, spans)
    ta, tb, ts = [], [], []
    for _ in range(int(os.environ.get("REPS", 15))):
        for prog, acc in ((A, ta), (B, tb)):
            t = time.perf_counter(); r.run(prog, bucket, inp, st, R); acc.append(time.perf_counter() - t)
        t = time.perf_counter(); r._run(B, bucket, inp, st, R, spans); ts.append(time.perf_counter() - t)
    f = lambda a: f"median {np.median(a) * 1e3:7.1f} ms  min {np.min(a) * 1e3:7.1f} ms"
    print(f"{dtype} prefill {bucket}: A sample_step (before) {f(ta)} | B prefill_step (after) {f(tb)} | "
          f"B + scoring {Q - 1} positions {f(ts)}  (n={len(ta)})", flush=True)
