#!/usr/bin/env python
"""Sliding-window KV reclaim on Gemma 3 270M: KV per sequence and max batch, before and after, and one real run.

1. The planner (`jaxserve.planner.plan`, the engine's own page arithmetic): KV bytes per sequence at 8k and 32k
   tokens with every layer keeping every token (`sliding_window_reclaim=False`) and with the local layers'
   pages freed out of their 512-token window, and the max concurrent sequences on this CPU host's default
   2 GiB KV budget and on an 80 GB H100, bf16 and float32 KV.
2. The engine, both ways in one run: one `--prompt-tokens` prompt (CPython's pydoc topics) through
   `LLM.generate`, greedy; after every step, the pages the sequence holds per page group. Reported: the peak
   pages and KV bytes the sequence held, and whether both engines generated the same tokens.

    python scripts/bench_kv_reclaim.py [--prompt-tokens 2000] [--new-tokens 32]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--prompt-tokens", type=int, default=2000)
ap.add_argument("--new-tokens", type=int, default=32)
ap.add_argument("--dtype", default="float32")
ap.add_argument("--out", default=os.path.join("scripts", "results", "bench_kv_reclaim.json"))
args = ap.parse_args()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxserve import LLM, SamplingParams  # noqa: E402
from jaxserve.config import get_preset  # noqa: E402
from jaxserve.planner import CPU_DEFAULT_KV_BUDGET_BYTES, MiB, plan  # noqa: E402


def planner_rows():
    g = get_preset("gemma3-270m")
    rows = []
    for kv in ("float32", "bfloat16"):
        for ctx in (8192, 32768):
            for reclaim in (False, True):
                p = plan(g, "h100", dtype="bfloat16", kv_dtype=kv, context=ctx, reclaim=reclaim)
                rows.append({"kv_dtype": kv, "context": ctx, "reclaim": reclaim,
                             "kv_bytes_per_sequence": p.kv_bytes_per_sequence,
                             "max_seqs_cpu_2GiB": CPU_DEFAULT_KV_BUDGET_BYTES // p.kv_bytes_per_sequence,
                             "max_seqs_h100": p.max_concurrent_sequences})
    return rows


def engine_run(reclaim: bool, prompt_ids: list):
    ctx = len(prompt_ids) + args.new_tokens
    llm = LLM("gemma3-270m", dtype=args.dtype, max_model_len=-(-ctx // 512) * 512, max_num_seqs=1,
              max_prefill_seqs=1, sliding_window_reclaim=reclaim)
    eng = llm.engine
    row_bytes = eng.runner.kv["k"].nbytes * 2 // eng.num_pages // eng.runner.kv_layout.width  # K + V, one row
    rid = eng.add_request(prompt_ids, SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True))
    seq = eng.requests[rid].seqs[0]
    peak, peak_groups, tokens = 0, None, []
    t = time.perf_counter()
    while eng.has_unfinished_requests():
        for out in eng.step():
            tokens = out.outputs[0].token_ids
        if eng.bm.has_seq(seq.seq_id):
            held = eng.bm.pages_held(seq.seq_id)
            if sum(held) > peak:
                peak, peak_groups = sum(held), held
    seconds = time.perf_counter() - t
    width = eng.runner.kv_layout.width
    return {"reclaim": reclaim, "groups": list(eng.runner.kv_layout.group_windows), "rows_per_page": width,
            "peak_pages": peak, "peak_pages_by_group": peak_groups,
            "peak_kv_bytes": peak * width * row_bytes, "tokens": tokens, "seconds": round(seconds, 2)}


def main():
    from pydoc_data.topics import topics

    res = {"command": " ".join(["python"] + sys.argv), "planner": planner_rows()}
    print("| KV dtype | context | KV per sequence, full | with reclaim | ratio | max seqs in 2 GiB (CPU) full / "
          "reclaim | max seqs on H100 full / reclaim |")
    print("|---|---|---|---|---|---|---|")
    rows = res["planner"]
    for a, b in zip(rows[::2], rows[1::2]):
        print(f"| {a['kv_dtype']} | {a['context']:,} | {a['kv_bytes_per_sequence'] / MiB:,.1f} MiB | "
              f"{b['kv_bytes_per_sequence'] / MiB:,.1f} MiB | {a['kv_bytes_per_sequence'] / b['kv_bytes_per_sequence']:.2f}x | "
              f"{a['max_seqs_cpu_2GiB']} / {b['max_seqs_cpu_2GiB']} | {a['max_seqs_h100']:,} / {b['max_seqs_h100']:,} |")

    probe = LLM("gemma3-270m", max_model_len=512, max_num_seqs=1, max_prefill_seqs=1, num_pages=64)
    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = probe.engine.tokenize_prompt(text)[:args.prompt_tokens]
    del probe
    runs = [engine_run(False, ids), engine_run(True, ids)]
    res["engine"] = runs
    res["same_tokens"] = runs[0]["tokens"] == runs[1]["tokens"]
    print(f"\nLLM.generate, one {len(ids):,}-token prompt + {args.new_tokens} greedy tokens, {args.dtype} KV "
          f"(peak over the steps):")
    print("| reclaim | page groups (window) | peak pages by group | rows per page | peak KV held | wall s |")
    print("|---|---|---|---|---|---|")
    for r in runs:
        print(f"| {'on' if r['reclaim'] else 'off'} | {r['groups']} | {r['peak_pages_by_group']} | {r['rows_per_page']} "
              f"| {r['peak_kv_bytes'] / MiB:,.1f} MiB | {r['seconds']} |")
    print(f"same greedy tokens: {res['same_tokens']}")
    for r in runs:
        r.pop("tokens")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
