#!/usr/bin/env python
"""Pipeline parallelism at decode: GPipe inside each step vs decode groups rotating through the stages across
steps (`pipeline_decode="gpipe"` / `"rotate"`), beside one device, on forced CPU devices (one run):

A = one device (no mesh);
B = `mesh="stage=S"`, every decode step one GPipe pass (n micro-batches, n + S - 1 ticks: S - 1 idle per stage);
C = `mesh="stage=S"`, the decoding sequences split in groups that rotate through the stages (one group enters
    stage 0 per call, its tokens come out S - 1 calls later; every stage busy in the steady state).

Each runs the same offline workload through `LLM.generate` (prompts cut from CPython's pydoc topics, greedy,
`--new-tokens` each, `--requests` at once), best of `--rounds`. Reported per batch size: wall seconds, generated
tok/s, engine steps, the stage-busy fraction (stage-ticks with a (micro-)batch / all stage-ticks, from
ModelRunner.stage_ticks; "-" on one device) and whether the tokens equal one device's.

    python scripts/bench_pipeline.py [--model gemma3-270m] [--stages 2] [--batch 1 --batch 8] [--new-tokens 32]

Forces `--devices` (default 8) host devices through XLA_FLAGS before JAX starts, as the tests do. On this 2-core
machine the forced devices share two cores, so wall-clock figures say little about a real multi-chip pipeline;
the stage-busy fraction is the schedule's property that carries over.
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
ap.add_argument("--stages", type=int, default=2)
ap.add_argument("--batch", type=int, action="append", default=None, help="requests at once (repeatable)")
ap.add_argument("--new-tokens", type=int, default=32)
ap.add_argument("--rounds", type=int, default=2)
ap.add_argument("--devices", type=int, default=8)
ap.add_argument("--out", default=os.path.join("scripts", "results", "bench_pipeline.json"))
args = ap.parse_args()
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={args.devices}"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxserve import LLM, SamplingParams  # noqa: E402


def prompts(n: int, tokenizer) -> list:
    """n prompts of 16-47 tokens cut from the pydoc topics (token ids, so every engine gets the same)."""
    from pydoc_data.topics import topics

    text = " ".join(topics[k] for k in sorted(topics))
    ids = tokenizer.encode(text) if tokenizer is not None else list(range(3, 20_000))
    out, pos = [], 0
    for i in range(n):
        length = 16 + (i * 13) % 32
        out.append(ids[pos:pos + length])
        pos += length
    return out


def run(llm, ps, sp) -> dict:
    runner = llm.engine.runner
    ticks0, steps0 = list(runner.stage_ticks), llm.engine.stats.steps
    t0 = time.perf_counter()
    outs = llm.generate(ps, sp, use_tqdm=False)
    s = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    busy, total = (runner.stage_ticks[i] - ticks0[i] for i in (0, 1))
    return {"s": round(s, 3), "tok_per_s": round(tokens / s, 1), "steps": llm.engine.stats.steps - steps0,
            "stage_busy": round(busy / total, 3) if total else None,
            "tokens": [list(o.outputs[0].token_ids) for o in outs]}


def main() -> int:
    batches = args.batch or [1, 8]
    B = max(batches)
    kw = dict(dtype=args.dtype, max_model_len=256, max_num_seqs=max(8, B), max_num_batched_tokens=128,
              max_prefill_seqs=4, enable_prefix_caching=False)
    sp = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    mesh = f"stage={args.stages}"
    engines = {"one_device": LLM(args.model, **kw),
               "gpipe": LLM(args.model, mesh=mesh, pipeline_decode="gpipe", **kw),
               "rotate": LLM(args.model, mesh=mesh, pipeline_decode="rotate", **kw)}
    ps_all = prompts(B, engines["one_device"].tokenizer)
    for llm in engines.values():  # warm-up (first-call costs)
        run(llm, ps_all[:2], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    res = {"command": " ".join(["python"] + sys.argv), "model": args.model, "dtype": args.dtype, "stages": args.stages,
           "new_tokens": args.new_tokens, "devices": args.devices, "batches": {}}
    for b in batches:
        ps = ps_all[:b]
        best = {}
        for rnd in range(args.rounds):
            order = list(engines) if rnd % 2 == 0 else list(engines)[::-1]
            for name in order:
                r = run(engines[name], ps, sp)
                if name not in best or r["s"] < best[name]["s"]:
                    best[name] = r
        want = best["one_device"]["tokens"]
        for r in best.values():
            r["same_tokens_as_one_device"] = r.pop("tokens") == want
        res["batches"][str(b)] = best
        print(f"batch {b}: " + json.dumps(best), flush=True)
    print(f"\n| {args.model}, {mesh} on {args.devices} forced CPU devices | batch | s | tok/s | steps | stage-busy | "
          "tokens = one device |")
    print("|---|---|---|---|---|---|---|")
    for b, best in res["batches"].items():
        for name, label in (("one_device", "one device"), ("gpipe", "GPipe per step"),
                            ("rotate", "groups rotating across steps")):
            v = best[name]
            print(f"| {label} | {b} | {v['s']} | {v['tok_per_s']} | {v['steps']} | {v['stage_busy'] or '-'} | "
                  f"{v['same_tokens_as_one_device']} |")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
