#!/usr/bin/env python
"""Data-parallel replicas, concurrent vs one after another, at equal total devices, on forced CPU devices (one run):

A = one replica over 2 devices (`mesh="model=2"`, tensor parallel);
B = two 1-device replicas (`mesh="data=2"`) stepped one after another from one thread (`concurrent=False`, how
    DataParallelEngine stepped before);
C = the same two replicas stepped at the same time, one worker thread each (the default).

Each runs the same offline workload through `LLM.generate` (prompts cut from CPython's pydoc topics, greedy,
`--new-tokens` each); B and C use one engine (switched between rounds) and alternate which goes first. Reported:
requests/s and generated tok/s (best round of each), and for B and C the replica step timeline: the fraction of
wall time in which both replicas were inside a step (`overlap`) and each replica's busy fraction.

    python scripts/bench_data_parallel.py [--model gemma3-270m] [--requests 32] [--new-tokens 32] [--rounds 2]

Forces `--devices` (default 8) host devices through XLA_FLAGS before JAX starts, as the tests do.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--model", default="gemma3-270m")
ap.add_argument("--dtype", default="float32")
ap.add_argument("--requests", type=int, default=32)
ap.add_argument("--new-tokens", type=int, default=32)
ap.add_argument("--rounds", type=int, default=2)
ap.add_argument("--devices", type=int, default=8)
ap.add_argument("--out", default=os.path.join("scripts", "results", "bench_data_parallel.json"))
args = ap.parse_args()
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={args.devices}"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxserve import LLM, SamplingParams  # noqa: E402


def prompts(n: int, tokenizer) -> list:
    """n prompts of 40-200 tokens cut from the pydoc topics (token ids, so every engine gets the same)."""
    from pydoc_data.topics import topics

    text = " ".join(topics[k] for k in sorted(topics))
    ids = tokenizer.encode(text) if tokenizer is not None else list(range(3, 20_000))
    out, pos = [], 0
    for i in range(n):
        length = 40 + (i * 37) % 161
        out.append(ids[pos:pos + length])
        pos += length
    return out


def overlap(timeline: list, t0: float, t1: float) -> dict:
    """Fraction of [t0, t1] in which both replicas were inside a step, and each replica's busy fraction."""
    events = sorted([(a, +1, r) for r, a, b in timeline if a >= t0] + [(b, -1, r) for r, a, b in timeline if a >= t0])
    both = 0.0
    active, last = 0, t0
    for t, d, _ in events:
        if active >= 2:
            both += t - last
        active += d
        last = t
    wall = t1 - t0
    busy = {r: sum(b - a for rr, a, b in timeline if rr == r and a >= t0) / wall for r in (0, 1)}
    return {"overlap": round(both / wall, 3), "busy": {str(k): round(v, 3) for k, v in busy.items()}}


def run(llm, ps, sp) -> tuple:
    t0 = time.perf_counter()
    outs = llm.generate(ps, sp, use_tqdm=False)
    t1 = time.perf_counter()
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return t0, t1, tokens, [o.outputs[0].token_ids for o in outs]


def main() -> int:
    # Prefix caching off: every round recomputes every prompt (the rounds reuse the prompts).
    kw = dict(dtype=args.dtype, max_model_len=512, max_num_seqs=16, max_num_batched_tokens=256, max_prefill_seqs=4,
              enable_prefix_caching=False)
    sp = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    tp = LLM(args.model, mesh="model=2", **kw)
    ps = prompts(args.requests, tp.tokenizer)
    dp = LLM(args.model, mesh="data=2", **kw)
    run(tp, ps[:4], sp)  # warm-up (first-call costs)
    run(dp, ps[:4], sp)
    res = {"command": " ".join(["python"] + sys.argv), "model": args.model, "dtype": args.dtype,
           "requests": args.requests, "new_tokens": args.new_tokens, "rounds": []}
    best = {}
    want = None
    for rnd in range(args.rounds):
        order = ["sequential", "concurrent"] if rnd % 2 == 0 else ["concurrent", "sequential"]
        row = {}
        t0, t1, tok, toks = run(tp, ps, sp)
        want = want or toks
        row["tp_model2"] = {"s": round(t1 - t0, 2), "req_per_s": round(len(ps) / (t1 - t0), 2),
                            "tok_per_s": round(tok / (t1 - t0), 1)}
        for mode in order:
            dp.engine.concurrent = mode == "concurrent"
            dp.engine.timeline.clear()
            t0, t1, tok, toks = run(dp, ps, sp)
            row[f"dp2_{mode}"] = {"s": round(t1 - t0, 2), "req_per_s": round(len(ps) / (t1 - t0), 2),
                                  "tok_per_s": round(tok / (t1 - t0), 1), **overlap(list(dp.engine.timeline), t0, t1),
                                  "same_tokens_as_tp": toks == want}
        res["rounds"].append(row)
        for k, v in row.items():
            if k not in best or v["req_per_s"] > best[k]["req_per_s"]:
                best[k] = v
        print(f"round {rnd}: " + json.dumps(row), flush=True)
    res["best"] = best
    print("\n| config (2 devices) | requests/s | tok/s | both replicas in a step |")
    print("|---|---|---|---|")
    for k, label in (("tp_model2", "1 replica, model=2"), ("dp2_sequential", "data=2, stepped one after another"),
                     ("dp2_concurrent", "data=2, stepped concurrently")):
        v = best[k]
        print(f"| {label} | {v['req_per_s']} | {v['tok_per_s']} | {v.get('overlap', '-')} |")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
