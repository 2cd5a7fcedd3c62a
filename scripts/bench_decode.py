#!/usr/bin/env python
"""Decode throughput on Gemma 3 270M at batch 1, 8 and 32, against this machine's memory bandwidth,
with HF transformers (CPU torch) at batch 1 on the same prompt in the same run; plus start-up time.

    python scripts/bench_decode.py [--batches 1 8 32] [--new-tokens 64] [--no-hf] [--no-startup]
                                   [--configs fp32 int8 int4 ...] [--rounds 3] [--e2e]

`--configs` runs the same measurement for each weight format in one process, in `--rounds` interleaved rounds:
fp32 (unquantized), int8 / int4 (weight-only, linear layers; round to nearest), `+head` variants that also
quantize the embedding / tied LM head, kv-int8 / kv-bf16 (float weights, int8 / bfloat16 KV cache), bf16
(bf16 weights and KV), int8+head+bf16 (int8 weights, bf16 activations and KV). See docs/quantization.md.

Writes bench_results/decode.json and prints a Markdown table. Decode tokens/s counts only decode steps
(prefill is timed separately), so batch sizes compare the memory-bound phase directly.

`--e2e` adds, per config and batch, two more figures beside the engine-step one: the compiled decode program
alone (called in a loop on fixed inputs, nothing else: the floor) and `LLM.generate` end to end (wall clock
from the last request's first token to the last token: scheduling, input building, the step, sampling
bookkeeping, detokenization), so the engine loop's share of a decode step is measured, not guessed.

`--llama-cpp DIR` (a llama.cpp build's bin directory with `llama-batched-bench`) runs llama.cpp on the same GGUF in
the same run, after jaxserve's rounds (interleaved with them when `--rounds` > 1: one llama.cpp run per round,
between jaxserve's): `llama-batched-bench -npp <prompt tokens> -ntg <new tokens> -npl <batches> -t <threads>`, its
decode speed (S_TG: generated tokens of all sequences / decode time) beside `LLM.generate`'s end-to-end decode
tok/s, and their ratio. Build it from the llama-cpp-python sdist's vendored tree (docs/performance.md).
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

PROMPT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
          "combined movable metal type, oil-based ink and a wooden press adapted from wine making. Within")


def measure_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """numpy copy bandwidth in bytes/s, counting read + write (the same convention as MEASURED.md)."""
    a = np.ones(nbytes // 4, np.float32)
    b = np.empty_like(a)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


# name -> LLM keyword arguments (docs/quantization.md)
CONFIGS = {
    "fp32": {},
    "int8": dict(quantization="int8"),
    "int4": dict(quantization="int4"),
    "int8+head": dict(quantization="int8", quantize_embed=True),
    "int4+head": dict(quantization="int4", quantize_embed=True),
    "kv-int8": dict(kv_cache_dtype="int8"),
    "kv-bf16": dict(kv_cache_dtype="bfloat16"),
    "bf16": dict(dtype="bfloat16", kv_cache_dtype="bfloat16"),
    "int8+head+bf16": dict(quantization="int8", quantize_embed=True, dtype="bfloat16", kv_cache_dtype="bfloat16"),
}


def _config_name(name: str) -> str:
    base, _, mode = name.partition(":")
    if base not in CONFIGS or mode not in ("", "ragged", "buckets", "auto"):
        raise argparse.ArgumentTypeError(f"unknown config {name!r}: one of {', '.join(CONFIGS)}, optionally with "
                                         f":ragged / :buckets / :auto")
    return name


def config_kwargs(name: str) -> dict:
    """LLM keyword arguments of a --configs entry (CONFIGS[base], plus step_mode from a ':mode' suffix)."""
    base, _, mode = name.partition(":")
    return {**CONFIGS[base], **({"step_mode": mode} if mode else {})}


def step_bytes(llm, batch: int, context: int) -> dict:
    """Bytes one decode step must read: every weight once + the visible KV of each sequence."""
    import jax

    cfg = llm.model_config
    weights = sum(x.nbytes for x in jax.tree.leaves(llm.engine.runner.params))
    per_layer_tok = cfg.kv_bytes_per_token(llm.engine_config.kv_cache_dtype) / cfg.num_layers  # int8: + scales
    visible = sum(min(context, w) if w else context for w in cfg.layer_windows())
    kv = batch * visible * per_layer_tok
    return {"weights": weights, "kv": kv, "total": weights + kv}


def run_steps(llm, batch: int, new_tokens: int) -> dict:
    from jaxserve import SamplingParams

    eng = llm.engine
    prompt_ids = llm.tokenizer.encode(PROMPT)
    sp = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    for i in range(batch):
        eng.add_request(prompt_ids, sp, request_id=f"bench-{batch}-{i}-{time.monotonic_ns()}")
    s0 = dict(eng.stats.kind_seconds), dict(eng.stats.kind_tokens)
    while eng.has_unfinished_requests():
        eng.step()
    dec_s = eng.stats.kind_seconds["decode"] - s0[0].get("decode", 0.0)
    dec_t = eng.stats.kind_tokens["decode"] - s0[1].get("decode", 0)
    pre_s = eng.stats.kind_seconds["prefill"] - s0[0].get("prefill", 0.0)
    pre_t = eng.stats.kind_tokens["prefill"] - s0[1].get("prefill", 0)
    return {"decode_tokens": dec_t, "decode_seconds": dec_s, "prefill_tokens": pre_t, "prefill_seconds": pre_s,
            "prompt_tokens": len(prompt_ids)}


def generate_e2e(llm, batch: int, new_tokens: int) -> dict:
    """`LLM.generate` on `batch` copies of the prompt: decode tok/s from the moment every request has its first
    token to the last token, as a user of the Python API sees it."""
    from jaxserve import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    st = llm.engine.stats
    steps0, host0, dev0 = st.steps, st.host_seconds, st.device_seconds
    outs = llm.generate([PROMPT] * batch, sp, use_tqdm=False)
    steps = st.steps - steps0
    first = max(o.metrics.arrival_time + o.metrics.ttft for o in outs)
    last = max(o.metrics.arrival_time + o.metrics.e2e for o in outs)
    # Every request's tokens but its first: exact when all first tokens come from the same prefill step
    # (batch <= max_prefill_seqs); with several prefill steps, a few decode tokens of the early requests fall
    # before `first` and the figure is slightly high (noted in the JSON).
    n = sum(len(o.outputs[0].token_ids) - 1 for o in outs)
    return {"decode_tokens": n, "decode_seconds": last - first, "decode_tok_s": n / (last - first),
            # every step of the call (prefill included): host work vs waiting on the device (LLMEngine.step)
            "host_ms_per_step": 1e3 * (st.host_seconds - host0) / steps,
            "device_ms_per_step": 1e3 * (st.device_seconds - dev0) / steps}


def llama_cpp_batched(bin_dir: str, gguf: str, prompt_tokens: int, new_tokens: int, batches: list,
                      threads: int) -> dict:
    """llama.cpp's `llama-batched-bench` on `gguf`: {batch: decode tok/s (S_TG)} plus its raw JSONL rows."""
    exe = os.path.join(bin_dir, "llama-batched-bench")
    ctx = max(batches) * (prompt_tokens + new_tokens) + 64
    cmd = [exe, "-m", gguf, "-c", str(ctx), "-b", "2048", "-ub", "512", "-npp", str(prompt_tokens),
           "-ntg", str(new_tokens), "-npl", ",".join(map(str, batches)), "-t", str(threads), "--output-format", "jsonl"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr[-2000:]}")
    rows = [json.loads(line) for line in (r.stdout + "\n" + r.stderr).splitlines() if line.startswith('{"n_kv_max"')]
    return {"command": " ".join(cmd), "decode_tok_s": {int(x["pl"]): x["speed_tg"] for x in rows}, "rows": rows}


def startup_times(python: str = sys.executable) -> dict:
    """Time LLM('gemma3-270m') -> first token in fresh processes: cold (empty caches) then warm."""
    import tempfile

    code = ("import time; t=time.monotonic(); from jaxserve import LLM, SamplingParams; "
            "llm=LLM('gemma3-270m', max_num_seqs=1); "
            "o=llm.generate(['Hello'], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False); "
            "import json; print(json.dumps({'first_token_s': time.monotonic()-t, 'compile_s': llm.compile_seconds}))")
    out = {}
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, JAXSERVE_CACHE=cache)
        for label in ("cold", "warm"):
            r = subprocess.run([python, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
            if r.returncode != 0:
                out[label] = {"error": r.stderr[-2000:]}
            else:
                out[label] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3,
                    help="interleaved rounds over the configs; the table shows the median step time")
    ap.add_argument("--no-hf", action="store_true", help="skip the HF transformers baseline")
    ap.add_argument("--no-startup", action="store_true", help="skip the cold/warm start-up measurement")
    ap.add_argument("--batch-invariant", action="store_true", help="run jaxserve in batch-invariant mode")
    ap.add_argument("--configs", nargs="+", default=["fp32", "int8", "int4"], type=_config_name,
                    help="weight / KV formats to measure side by side (default: fp32 int8 int4); a suffix "
                         ":ragged / :buckets sets that engine's EngineConfig.step_mode (e.g. fp32:ragged "
                         "fp32:buckets: ragged and bucketed steps side by side)")
    ap.add_argument("--step-mode", default="auto", choices=["auto", "ragged", "buckets"],
                    help="EngineConfig.step_mode of the engines whose config has no suffix")
    ap.add_argument("--e2e", action="store_true",
                    help="also the compiled decode step alone and LLM.generate end to end, per config and batch")
    ap.add_argument("--llama-cpp", metavar="DIR",
                    help="a llama.cpp bin directory with llama-batched-bench: llama.cpp on the same GGUF, same run")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="llama.cpp threads (default: all cores)")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench_results", "decode.json"))
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    args.e2e = args.e2e or bool(args.llama_cpp)  # llama.cpp is compared with LLM.generate end to end

    from jaxserve import LLM
    from jaxserve.config import get_preset

    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from device_check import time_compiled_step  # the compiled decode program alone, on fixed inputs

    result = {"machine": {"cpus": os.cpu_count()}, "rows": [], "command": " ".join(["python"] + sys.argv)}
    bw = measure_bandwidth()
    result["machine"]["copy_bandwidth_GBps"] = bw / 1e9
    # Every engine is built first and kept; then `--rounds` rounds each time every (config, batch) once, the
    # config order rotated per round. A machine may have slow phases (a step several times slower for seconds to
    # minutes, same process and executable), so configs timed one block after the other can land in different phases;
    # interleaved rounds and the median over rounds keep the side-by-side comparison fair.
    # (pages of each of the KV layout's page groups: sliding-window reclaim gives Gemma 3 six, of 3 layers each)
    per_seq_pages = (-(-(128 + args.new_tokens) // 16) + 1) * get_preset("gemma3-270m").kv_layout().num_groups
    engines = {}
    for config in args.configs:
        t0 = time.monotonic()
        engines[config] = LLM("gemma3-270m", max_num_seqs=max(args.batches), max_model_len=1024,
                              num_pages=max(args.batches) * per_seq_pages + 1,
                              batch_invariant=args.batch_invariant,
                              **{"step_mode": args.step_mode, **config_kwargs(config)})
        result.setdefault("jaxserve_startup_s", {})[config] = time.monotonic() - t0
        run_steps(engines[config], 1, 4)  # warm caches and allocator
    samples = {(c, b): [] for c in args.configs for b in args.batches}
    e2e = {(c, b): [] for c in args.configs for b in args.batches}
    prompt_tokens = len(engines[args.configs[0]].tokenizer.encode(PROMPT))
    ctx_mid = prompt_tokens + args.new_tokens // 2
    llama = []
    if args.llama_cpp:
        from jaxserve.weights.resolve import embedded_gguf_path

        gguf_path = embedded_gguf_path()
    for rnd in range(args.rounds):
        if args.llama_cpp:
            llama.append(llama_cpp_batched(args.llama_cpp, gguf_path, prompt_tokens, args.new_tokens, args.batches,
                                           args.threads))
            print("llama.cpp:", json.dumps(llama[-1]["decode_tok_s"]), flush=True)
        order = args.configs[rnd % len(args.configs):] + args.configs[:rnd % len(args.configs)]
        for config in order:
            for b in args.batches:
                samples[(config, b)].append(run_steps(engines[config], b, args.new_tokens))
                if args.e2e:
                    e2e[(config, b)].append(dict(generate_e2e(engines[config], b, args.new_tokens),
                                                 step_only_ms=1e3 * time_compiled_step(engines[config], b, ctx_mid, 10)))
    for config in args.configs:
        llm = engines[config]
        for b in args.batches:
            runs = samples[(config, b)]
            step_ms = sorted(r["decode_seconds"] / (r["decode_tokens"] / b) * 1e3 for r in runs)
            med = float(np.median(step_ms))
            r = runs[0]
            ctx = r["prompt_tokens"] + args.new_tokens // 2
            by = step_bytes(llm, b, ctx)
            pre = [x["prefill_tokens"] / x["prefill_seconds"] for x in runs if x["prefill_seconds"]]
            result["rows"].append({
                "engine": "jaxserve", "config": config, "batch": b,
                "decode_tok_s": b / (med / 1e3), "step_ms": med, "step_ms_rounds": step_ms,
                "bytes_per_step": by["total"], "weight_bytes": by["weights"],
                "kv_bytes": by["kv"], "achieved_GBps": by["total"] / (med / 1e3) / 1e9,
                "roofline_fraction": (by["total"] / (med / 1e3)) / bw,
                "prefill_tok_s": float(np.median(pre)) if pre else None,
            })
            if args.e2e:
                ee = e2e[(config, b)]
                only = float(np.median([x["step_only_ms"] for x in ee]))
                gen = float(np.median([x["decode_tok_s"] for x in ee]))
                result["rows"][-1].update({
                    "host_ms_per_step": float(np.median([x["host_ms_per_step"] for x in ee])),
                    "device_ms_per_step": float(np.median([x["device_ms_per_step"] for x in ee])),
                    "step_only_ms": only, "step_only_tok_s": b / (only / 1e3), "generate_decode_tok_s": gen,
                    "generate_vs_step_only": gen / (b / (only / 1e3)), "e2e_rounds": ee,
                    "e2e_note": "generate: tokens after each request's first / (last token - last first token)",
                })
            print(json.dumps(result["rows"][-1]), flush=True)
    if llama:
        per_batch = {b: float(np.median([x["decode_tok_s"][b] for x in llama])) for b in args.batches}
        result["llama_cpp"] = {"command": llama[0]["command"], "decode_tok_s": per_batch,
                               "decode_tok_s_rounds": [x["decode_tok_s"] for x in llama],
                               "rows": [x["rows"] for x in llama]}
        for r in result["rows"]:
            if r.get("generate_decode_tok_s") and r["batch"] in per_batch:
                r["llama_cpp_decode_tok_s"] = per_batch[r["batch"]]
                r["generate_vs_llama_cpp"] = r["generate_decode_tok_s"] / per_batch[r["batch"]]
    del engines, llm
    import gc

    import jax

    gc.collect()
    jax.clear_caches()

    if not args.no_hf:
        try:
            sys.path.insert(0, os.path.join(ROOT, "scripts"))
            from hf_baseline import hf_decode_tokens_per_s, load_hf_gemma3

            model, tok = load_hf_gemma3()
            ids = tok(PROMPT, return_tensors="pt").input_ids[0].tolist()
            tps = hf_decode_tokens_per_s(model, ids, 1, args.new_tokens)
            result["rows"].append({"engine": "hf-transformers (torch CPU, float32)", "batch": 1, "decode_tok_s": tps})
            print(json.dumps(result["rows"][-1]), flush=True)
        except ImportError as e:
            result["hf_error"] = f"HF baseline skipped: {e} (pip install -e '.[bench]')"
            print(result["hf_error"], file=sys.stderr)

    if not args.no_startup:
        result["startup"] = startup_times()
        print(json.dumps(result["startup"]), flush=True)

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print()
    print(f"Machine copy bandwidth: {bw / 1e9:.1f} GB/s (read + write)")
    print(f"Median over {args.rounds} interleaved rounds (step ms of every round in the JSON, `step_ms_rounds`)")
    print("| engine | weights | batch | decode tok/s | vs fp32 | step ms (min-max) | bytes/step | achieved GB/s | roofline |")
    print("|---|---|---|---|---|---|---|---|---|")
    base = {r["batch"]: r["decode_tok_s"] for r in result["rows"] if r.get("config") == "fp32"}
    for r in result["rows"]:
        if r["engine"] == "jaxserve":
            rel = f"{r['decode_tok_s'] / base[r['batch']]:.2f}x" if r["batch"] in base else ""
            spread = f"{min(r['step_ms_rounds']):.1f}-{max(r['step_ms_rounds']):.1f}"
            print(f"| jaxserve | {r['config']} | {r['batch']} | {r['decode_tok_s']:.1f} | {rel} | {r['step_ms']:.1f} ({spread}) | "
                  f"{r['bytes_per_step'] / 1e9:.2f} GB | {r['achieved_GBps']:.1f} | {r['roofline_fraction']:.0%} |")
        else:
            print(f"| {r['engine']} | float32 | {r['batch']} | {r['decode_tok_s']:.1f} | | | | | |")
    if args.e2e:
        print("\nEnd to end (median over rounds): the compiled decode program alone vs LLM.generate")
        print("| weights | batch | step alone ms | step alone tok/s | engine step tok/s | LLM.generate tok/s | "
              "generate / step alone | generate: host / device ms per step |")
        print("|---|---|---|---|---|---|---|---|")
        for r in result["rows"]:
            if "step_only_ms" in r:
                print(f"| {r['config']} | {r['batch']} | {r['step_only_ms']:.1f} | {r['step_only_tok_s']:.1f} | "
                      f"{r['decode_tok_s']:.1f} | {r['generate_decode_tok_s']:.1f} | {r['generate_vs_step_only']:.2f} | "
                      f"{r['host_ms_per_step']:.2f} / {r['device_ms_per_step']:.1f} |")
    if "llama_cpp" in result:
        print(f"\nllama.cpp on the same GGUF, same run (median of {len(llama)}): {result['llama_cpp']['command']}")
        print("| weights (jaxserve) | batch | LLM.generate decode tok/s | llama.cpp decode tok/s (S_TG) | jaxserve / llama.cpp |")
        print("|---|---|---|---|---|")
        for r in result["rows"]:
            if "generate_vs_llama_cpp" in r:
                print(f"| {r['config']} | {r['batch']} | {r['generate_decode_tok_s']:.1f} | "
                      f"{r['llama_cpp_decode_tok_s']:.1f} | {r['generate_vs_llama_cpp']:.2f} |")
    if "startup" in result:
        s = result["startup"]
        print(f"\nStart-up to first token: cold {s['cold'].get('first_token_s', float('nan')):.1f} s, "
              f"warm (converted checkpoint + compilation cache) {s['warm'].get('first_token_s', float('nan')):.1f} s")
    print(f"\nwritten {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
