#!/usr/bin/env python
"""Speculative decoding on Gemma 3 270M at batch 1: latency per output token and acceptance, per proposer, on
predictable text (code, extraction/repetition, lists; greedy) and creative text (seeded sampling), side by side
with speculation off, in one run.

    python scripts/bench_speculative.py                       # off, ngram, self (adaptive)
    python scripts/bench_speculative.py --methods off ngram self draft --num-tokens 4 --max-tokens 96

Every configuration runs the same prompts one at a time (batch 1) on its own engine (built, warmed with one
request, measured, dropped). Latency per output token = (last token time - first token time) / (tokens - 1) of
each request (decode only: prefill is the same program with or without speculation), summed over the set.
Outputs are compared with speculation off (`same tokens` column: greedy on the predictable set, the
same seeds on the creative set, where speculation also reproduces the target's draws). `draft` uses the target itself as the
draft model (no smaller Gemma 3 with the same vocabulary is available here): a correctness configuration,
expected to be slower. Writes scripts/results/bench_speculative.json and .md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PREDICTABLE = [
    # code: a pattern to continue
    "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\ndef mul(a, b):\n    return a * b\n\n\n"
    "def div(a, b):\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n\n\nclass Size:\n"
    "    def __init__(self, width, height):\n",
    "SELECT id, name, email FROM users WHERE id = 1;\nSELECT id, name, email FROM users WHERE id = 2;\n"
    "SELECT id, name, email FROM users WHERE id = 3;\n",
    # extraction / repetition: the answer copies the context
    "Text: The meeting with Dr. Alice Johnson from Northwind Traders is on Tuesday, March 4 at 10:30 in room 214.\n"
    "Repeat the text exactly.\nText: The meeting with",
    "Input: the quick brown fox jumps over the lazy dog\nOutput: THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG\n"
    "Input: the quick brown fox jumps over the lazy cat\nOutput:",
    # lists
    "1. January\n2. February\n3. March\n4. April\n5.",
    "Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday, Monday, Tuesday,",
    "<ul>\n  <li>Apple</li>\n  <li>Banana</li>\n  <li>Cherry</li>\n",
]
CREATIVE = [
    "Once upon a time, in a kingdom at the edge of the sea,",
    "The old lighthouse keeper looked at the storm and",
    "Write a short poem about the colour of autumn leaves:\n",
    "In the year 2300, the first city on Mars",
    "She opened the letter, and the first line made her",
    "The recipe for happiness, according to my grandmother, is",
    "A dragon, a robot and a teacher walk into a library.",
    "The strangest thing about the island was",
]


def engine_kwargs(args) -> dict:
    return dict(max_model_len=1024, max_num_seqs=1, num_pages=256, max_num_batched_tokens=256, max_prefill_seqs=1)


def spec_for(method: str, args):
    if method == "off":
        return None
    d = {"method": method, "num_tokens": args.num_tokens, "adaptive": not args.no_adaptive}
    if method == "self":
        d["num_layers"] = args.self_layers
    if method == "draft":
        d["draft_model"] = args.draft_model
    return d


def run_set(llm, prompts, params) -> dict:
    outs, tpot_sum, toks = [], 0.0, 0
    for p in prompts:  # batch 1
        ro = llm.generate([p], params, use_tqdm=False)[0]
        n = len(ro.outputs[0].token_ids)
        if ro.metrics.tpot is not None:
            tpot_sum += ro.metrics.tpot * (n - 1)
            toks += n - 1
        outs.append(ro.outputs[0].token_ids)
    return {"outputs": outs, "decode_seconds": tpot_sum, "decode_tokens": toks,
            "ms_per_token": 1000 * tpot_sum / max(toks, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["off", "ngram", "self"])
    ap.add_argument("--num-tokens", type=int, default=4)
    ap.add_argument("--self-layers", type=int, default=6)
    ap.add_argument("--draft-model", default="gemma3-270m")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--no-adaptive", action="store_true")
    ap.add_argument("--out", default=os.path.join(ROOT, "scripts", "results", "bench_speculative"))
    args = ap.parse_args(argv)

    from jaxserve import LLM, SamplingParams

    greedy = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    creative = SamplingParams(temperature=0.8, top_p=0.95, seed=1234, max_tokens=args.max_tokens, ignore_eos=True)
    sets = {"predictable": (PREDICTABLE, greedy), "creative": (CREATIVE, creative)}
    results = {}
    for method in args.methods:
        t0 = time.monotonic()
        llm = LLM("gemma3-270m", speculative=spec_for(method, args), **engine_kwargs(args))
        startup = time.monotonic() - t0
        llm.generate(["Warm-up: one two three"], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
        r = {"startup_s": startup}
        for name, (prompts, params) in sets.items():
            m0 = llm.get_metrics()
            res = run_set(llm, prompts, params)
            m1 = llm.get_metrics()
            if method != "off":
                drafted = m1["spec_draft_tokens"] - m0["spec_draft_tokens"]
                accepted = m1["spec_accepted_tokens"] - m0["spec_accepted_tokens"]
                res["drafted"], res["accepted"] = drafted, accepted
                res["acceptance"] = accepted / drafted if drafted else None
                res["verify_steps"] = m1["spec_verify_steps"] - m0["spec_verify_steps"]
                res["plain_steps"] = m1["spec_plain_decode_steps"] - m0["spec_plain_decode_steps"]
                res["mean_accepted"] = accepted / res["verify_steps"] if res["verify_steps"] else None
                res["step_costs"] = {"decode_s": m1["spec_decode_step_s"], "verify_s": m1["spec_verify_step_s"],
                                     "draft_s_per_token": m1["spec_draft_s_per_token"]}
            r[name] = res
            print(f"{method:6s} {name:11s} {res['ms_per_token']:7.1f} ms/token "
                  f"acceptance={res.get('acceptance')}", flush=True)
        results[method] = r
        del llm
        gc.collect()
        write(args, sets, results)  # after every configuration: a partial run still leaves its numbers
    return 0


def write(args, sets, results) -> None:
    base = results.get("off")
    rows = []
    for method, r in results.items():
        for name in sets:
            res = r[name]
            same = None
            if base is not None and method != "off":
                same = sum(a == b for a, b in zip(res["outputs"], base[name]["outputs"]))
            speed = base[name]["ms_per_token"] / res["ms_per_token"] if base else None
            rows.append({"method": method, "set": name, "ms_per_token": res["ms_per_token"],
                         "speedup_vs_off": speed, "acceptance": res.get("acceptance"),
                         "mean_accepted_per_verify": res.get("mean_accepted"),
                         "verify_steps": res.get("verify_steps"), "plain_steps": res.get("plain_steps"),
                         "identical_to_off": None if same is None else f"{same}/{len(res['outputs'])}"})
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    meta = {"model": "gemma3-270m", "batch": 1, "num_tokens": args.num_tokens, "max_tokens": args.max_tokens,
            "self_layers": args.self_layers, "adaptive": not args.no_adaptive, "cpu_count": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv)}
    with open(args.out + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows, "raw": results}, f, indent=1, default=str)

    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    lines = ["| proposer | text | ms / output token | speedup vs off | acceptance | accepted / verify step | "
             "verify steps | plain steps | same tokens as off |", "|---|---|---|---|---|---|---|---|---|"]
    for w in rows:
        lines.append(f"| {w['method']} | {w['set']} | {w['ms_per_token']:.1f} | {fmt(w['speedup_vs_off'], '.2f')}x | "
                     f"{fmt(w['acceptance'], '.0%')} | {fmt(w['mean_accepted_per_verify'], '.2f')} | "
                     f"{fmt(w['verify_steps'], 'd')} | {fmt(w['plain_steps'], 'd')} | "
                     f"{w['identical_to_off'] or '-'} |")
    table = "\n".join(lines)
    with open(args.out + ".md", "w") as f:
        f.write(f"Gemma 3 270M, batch 1, k = {args.num_tokens}, {args.max_tokens} new tokens, {meta['date']}\n\n")
        f.write(table + "\n")
    print(table, flush=True)


if __name__ == "__main__":
    sys.exit(main())
