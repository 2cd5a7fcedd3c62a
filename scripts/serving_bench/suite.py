"""Serving benchmark: continuous vs static batching, a max-batch-size sweep, prefix caching, and HF
transformers' batched `generate` as an outside baseline, on Gemma 3 270M (the embedded default model).

    python scripts/bench_serving.py                 # the full run (~24 min on 2 idle-ish cores)
    python scripts/bench_serving.py --quick         # smoke test: 16 requests, short lengths, sweep 1 4 16
    python scripts/bench_serving.py --no-hf --no-static --sweep 1 8 64 --rate 0.5

What is measured (every number comes from this run):
  1. A seeded workload (default 64 requests): prompt lengths log-normal clipped to [16, 1024] tokens, output
     lengths log-normal clipped to [8, 512]; prompts are windows of real English text (CPython's
     `pydoc_data.topics`, tokenized by the model's tokenizer). Every request is forced to produce exactly its
     output length (greedy, `ignore_eos=True`, `max_tokens=n`).
  2. Offline (all requests submitted at once) and Poisson arrivals (seeded exponential gaps at `--rate`
     requests/s, fed to `LLMEngine.add_request` as their arrival time passes, between `step()` calls).
  3. `scheduler="continuous"` vs `scheduler="static"` (separate engines, same EngineConfig otherwise): output
     tokens/s, requests/s, TTFT and TPOT p50/p99, and the continuous/static throughput ratio.
  4. HF transformers (torch CPU, float32) batched greedy `generate` on the same offline requests (left
     padded, `--hf-batch-size` rows per call, in a separate process). `--hf-max-requests N` (default 16;
     0 = all) runs it on the first N requests, and jaxserve is then also measured on that same subset.
  5. A sweep of `max_num_seqs` (continuous batching, offline workload): output tok/s against TPOT p50/p99,
     plotted to `<out-dir>/serving_sweep.png`.
  6. Prefix caching: requests sharing a long system prompt (default 32 x 1,024 tokens + a short distinct
     suffix, 8 output tokens), after one warming request: TTFT with `enable_prefix_caching` on vs off, both
     one request at a time (isolated TTFT) and all at once (burst), plus the engine's prefix hit rate.

Timing: throughput = output tokens / (last request finished - first submission); engine start-up and
compilation (and a short warm-up) happen before the clock starts. TTFT = first token - the request's
scheduled arrival (offline: the first submission), so it includes queueing and the wait for the engine loop
to notice an arrival; TPOT = (last token - first token) / (output tokens - 1) per request. Percentiles use
linear interpolation between order statistics (numpy's default), so p99 of 64 values is near the maximum.

Writes `<out-dir>/bench_serving.json` (command, machine, engine config of every run, per-request records)
and prints Markdown tables. Every piece is importable from scripts/serving_bench/ (the model name is a parameter),
so `tests/test_bench_serving.py` runs them on a tiny random model."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

from serving_bench.driver import (describe_engine, engine_kwargs, make_llm, release, replay_schedule,
                                       run_prefix_experiment, run_workload, run_workload_http, warm_up)
from serving_bench.hf import run_hf_subprocess
from serving_bench.report import _f, _loadavg, machine_info, offline_ceiling, plot_sweep, print_report
from serving_bench.workload import (WorkloadSpec, corpus_token_ids, decode_step_bound, make_prefix_workload,
                                         make_workload, poisson_arrivals, workload_stats)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
DEFAULT_MODEL = "gemma3-270m"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--random-weights", action="store_true", help="random weights for a preset (smoke tests)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 16 requests, prompts <= 256 and outputs <= 64 tokens, sweep 1 4 16, "
                         "8 prefix requests on a 512-token system prompt, HF on 4 requests")
    ap.add_argument("--num-requests", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompt-median", type=float)
    ap.add_argument("--output-median", type=float)
    ap.add_argument("--prompt-sigma", type=float, help="log-space std of prompt lengths (default 1.0)")
    ap.add_argument("--output-sigma", type=float, help="log-space std of output lengths (default 1.0)")
    ap.add_argument("--prompt-max", type=int)
    ap.add_argument("--output-max", type=int)
    ap.add_argument("--rate", type=float, help="Poisson arrival rate, requests/s (default 1.0; quick: 2)")
    ap.add_argument("--max-num-seqs", type=int, default=16,
                    help="max batch of the continuous/static runs (16: the sweep's best on this CPU)")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--dtype", default="float32", help="weight / compute dtype of every engine (float32, bfloat16)")
    ap.add_argument("--kv-cache-dtype", default="float32", help="KV cache dtype (float32, bfloat16, int8)")
    ap.add_argument("--sweep", type=int, nargs="*", help="max_num_seqs values (default 1 2 4 8 16 32 64)")
    ap.add_argument("--sweep-requests", type=int,
                    help="run sweep points on the first N workload requests (default: all)")
    ap.add_argument("--step-mode", default="auto", choices=["auto", "ragged", "buckets"],
                    help="EngineConfig.step_mode of the continuous engines (the static engine runs bucketed steps)")
    ap.add_argument("--compare-buckets", action="store_true",
                    help="also run the offline (and Poisson) workload on a continuous engine with step_mode='buckets' "
                         "(scheduler label 'continuous-buckets'), side by side with --step-mode's")
    ap.add_argument("--no-static", action="store_true")
    ap.add_argument("--no-poisson", action="store_true")
    ap.add_argument("--no-prefix", action="store_true")
    ap.add_argument("--prefix-requests", type=int)
    ap.add_argument("--system-prompt-len", type=int)
    ap.add_argument("--prefix-output-len", type=int, default=8)
    ap.add_argument("--no-prefix-burst", action="store_true", help="skip the all-at-once prefix run")
    ap.add_argument("--no-hf", action="store_true", help="skip the HF transformers baseline")
    ap.add_argument("--http", action="store_true",
                    help="also run the offline workload through the HTTP server (jaxserve serve's app) and report "
                         "its overhead against the in-process engine")
    ap.add_argument("--hf-max-requests", type=int, default=None,
                    help="run HF on the first N requests only (default 16, quick 4; 0 = all): HF pads every "
                         "call to its longest prompt and output, so all 64 requests take ~10 min here")
    ap.add_argument("--hf-batch-size", type=int, default=16, help="rows per HF generate call")
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "scripts", "results"))
    args = ap.parse_args(argv)
    q = args.quick
    spec = WorkloadSpec(
        num_requests=args.num_requests or (16 if q else 64), seed=args.seed,
        prompt_median=args.prompt_median or (64.0 if q else WorkloadSpec.prompt_median),
        prompt_max=args.prompt_max or (256 if q else WorkloadSpec.prompt_max),
        output_median=args.output_median or (24.0 if q else WorkloadSpec.output_median),
        output_max=args.output_max or (64 if q else WorkloadSpec.output_max),
        prompt_sigma=args.prompt_sigma or WorkloadSpec.prompt_sigma,
        output_sigma=args.output_sigma or WorkloadSpec.output_sigma)
    if args.sweep is None:
        args.sweep = [1, 4, 16] if q else [1, 2, 4, 8, 16, 32, 64]
    if args.rate is None:
        args.rate = 2.0 if q else 1.0
    args.prefix_requests = args.prefix_requests or (8 if q else 32)
    args.system_prompt_len = args.system_prompt_len or (512 if q else 1024)
    if args.hf_max_requests is None:
        args.hf_max_requests = 4 if q else 16
    return args, spec


def main(argv=None) -> int:
    args, spec = parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    t_all = time.monotonic()
    res: dict = {"command": " ".join(["python"] + [os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])
                 if argv is None else "main(" + repr(argv) + ")",
                 "model": args.model, "machine": machine_info(), "workload_spec": dataclasses.asdict(spec),
                 "poisson_rate_req_s": args.rate, "runs": [], "ratios": {}}
    json_path = os.path.join(args.out_dir, "bench_serving.json")
    res["json"] = os.path.relpath(json_path, ROOT)

    def save():
        res["total_wall_s"] = time.monotonic() - t_all
        with open(json_path, "w") as f:
            json.dump(res, f, indent=1)

    def log(msg):
        print(f"[{time.monotonic() - t_all:7.1f}s] {msg}", flush=True)

    prefix_len = args.system_prompt_len + 64 + args.prefix_output_len
    base_kw = engine_kwargs(spec, args.max_num_seqs, args.max_model_len, prefix_len=prefix_len,
                            dtype=args.dtype, kv_cache_dtype=args.kv_cache_dtype)

    log(f"building continuous engine {base_kw}")
    llm = make_llm(args.model, args.random_weights, scheduler="continuous", step_mode=args.step_mode, **base_kw)
    tok = llm.tokenizer
    bos = llm.model_config.bos_token_id
    corpus = corpus_token_ids(tok)
    reqs = make_workload(corpus, spec, bos_id=bos)
    res["workload"] = workload_stats(reqs)
    res["corpus_tokens"] = len(corpus)
    arrivals = poisson_arrivals(len(reqs), args.rate, seed=spec.seed + 1)
    res["poisson_arrivals_s"] = arrivals
    desc_cont = describe_engine(llm, args.model)
    replay_setup = (llm.engine_config, llm.engine.num_pages, llm.engine.max_model_len)
    replay_ragged = llm.engine.ragged  # (the continuous engine's steps; the static one's are bucketed)
    log(f"continuous engine ready (startup {desc_cont['startup_s']:.1f}s); corpus {len(corpus)} tokens; "
        f"{len(reqs)} requests, {res['workload']['output_tokens_total']} output tokens")
    warm_up(llm, corpus)

    def record(mode, scheduler, llm_, desc, r):
        entry = {"mode": mode, "scheduler": scheduler, "max_num_seqs": llm_.engine_config.max_num_seqs,
                 "engine_setup": desc, "loadavg_after": _loadavg(), **r}
        res["runs"].append(entry)
        s = r["summary"]
        log(f"{mode} {scheduler}: {s['output_tok_s']:.1f} out tok/s, {s['requests_s']:.3f} req/s, TTFT p50 "
            f"{s['ttft_ms_p50']:.0f} ms, TPOT p50 {_f(s['tpot_ms_p50'])} ms, wall {s['duration_s']:.1f}s, mean decode "
            f"batch {_f(r['engine']['mean_decode_batch'])}, prefill computed/real {_f(r['engine']['prefill_computed_ratio'])}")
        save()
        return entry

    results_by = {}
    results_by[("offline", "continuous")] = record("offline", "continuous", llm, desc_cont,
                                                    run_workload(llm, reqs, label="off-cont"))
    if not args.no_poisson:
        results_by[("poisson", "continuous")] = record(f"poisson {args.rate:g} req/s", "continuous", llm, desc_cont,
                                                        run_workload(llm, reqs, arrivals, label="poi-cont"))

    if args.compare_buckets:
        llm_b = make_llm(args.model, args.random_weights, scheduler="continuous", step_mode="buckets", **base_kw)
        desc_b = describe_engine(llm_b, args.model)
        warm_up(llm_b, corpus)
        results_by[("offline", "continuous-buckets")] = record("offline", "continuous-buckets", llm_b, desc_b,
                                                                run_workload(llm_b, reqs, label="off-buck"))
        if not args.no_poisson:
            results_by[("poisson", "continuous-buckets")] = record(
                f"poisson {args.rate:g} req/s", "continuous-buckets", llm_b, desc_b,
                run_workload(llm_b, reqs, arrivals, label="poi-buck"))
        release(llm_b)

    # jaxserve on the HF subset (same requests HF will run), for an apples-to-apples row.
    hf_n = min(args.hf_max_requests or len(reqs), len(reqs))  # 0 = all
    if not args.no_hf and hf_n < len(reqs):
        res["jaxserve_on_hf_subset"] = run_workload(llm, reqs[:hf_n], label="hfsub")
        save()

    # Prefix caching on (this engine) ...
    if not args.no_prefix:
        system, warm_prompt, pprompts = make_prefix_workload(corpus, args.prefix_requests, args.system_prompt_len,
                                                             16, 32, seed=spec.seed + 2, bos_id=bos)
        res["prefix"] = {"num_requests": args.prefix_requests, "system_prompt_tokens": len(system),
                         "suffix_tokens": [16, 32], "output_tokens": args.prefix_output_len}
        log("prefix caching on")
        res["prefix"]["on"] = run_prefix_experiment(llm, system, warm_prompt, pprompts, args.prefix_output_len,
                                                    label="pc-on", burst=not args.no_prefix_burst)
        res["prefix"]["on"]["engine_setup"] = desc_cont
        save()

    # The sweep reuses this engine's offline run when its max_num_seqs and requests match.
    sweep_reqs = reqs[:args.sweep_requests] if args.sweep_requests else reqs
    sweep_points = {}

    def sweep_point(b, llm_, desc, r):
        s, e = r["summary"], r["engine"]
        sweep_points[b] = {"max_num_seqs": b, "num_requests": s["num_requests"], "output_tok_s": s["output_tok_s"],
                           "requests_s": s["requests_s"], "tpot_ms_p50": s["tpot_ms_p50"],
                           "tpot_ms_p99": s["tpot_ms_p99"], "ttft_ms_p50": s["ttft_ms_p50"],
                           "ttft_ms_p99": s["ttft_ms_p99"], "duration_s": s["duration_s"],
                           "mean_decode_batch": e["mean_decode_batch"], "engine_setup": desc,
                           "loadavg_after": _loadavg()}
        log(f"sweep max_num_seqs={b}: {s['output_tok_s']:.1f} out tok/s, TPOT p50/p99 {_f(s['tpot_ms_p50'])}/"
            f"{_f(s['tpot_ms_p99'])} ms")

    if args.max_num_seqs in args.sweep:
        r = results_by[("offline", "continuous")] if len(sweep_reqs) == len(reqs) else \
            run_workload(llm, sweep_reqs, label="sweep-main")
        sweep_point(args.max_num_seqs, llm, desc_cont, r)
    if args.http:
        # The same offline workload through the HTTP server on this engine, against its in-process run above.
        log("HTTP mode: offline workload through /v1/completions (streaming)")
        h = run_workload_http(llm, reqs, model_name=args.model)
        ref = results_by[("offline", "continuous")]["summary"]
        hs = h["summary"]
        res["http"] = {"summary": hs, "requests": h["requests"], "in_process_summary": ref,
                       "throughput_overhead_pct": 100.0 * (ref["output_tok_s"] / hs["output_tok_s"] - 1.0),
                       "ttft_p50_overhead_pct": 100.0 * (hs["ttft_ms_p50"] / ref["ttft_ms_p50"] - 1.0),
                       "tpot_p50_overhead_pct": 100.0 * (hs["tpot_ms_p50"] / ref["tpot_ms_p50"] - 1.0)}
        log(f"HTTP: {hs['output_tok_s']:.1f} out tok/s vs {ref['output_tok_s']:.1f} in process "
            f"(throughput overhead {res['http']['throughput_overhead_pct']:+.1f}%), TTFT p50 {hs['ttft_ms_p50']:.0f} "
            f"vs {ref['ttft_ms_p50']:.0f} ms, TPOT p50 {_f(hs['tpot_ms_p50'])} vs {_f(ref['tpot_ms_p50'])} ms")
        save()
    release(llm)

    # ... and off (its own engine, otherwise identical).
    if not args.no_prefix:
        log("building engine with enable_prefix_caching=False")
        llm = make_llm(args.model, args.random_weights, scheduler="continuous", enable_prefix_caching=False,
                       step_mode=args.step_mode, **base_kw)
        warm_up(llm, corpus)
        res["prefix"]["off"] = run_prefix_experiment(llm, system, warm_prompt, pprompts, args.prefix_output_len,
                                                     label="pc-off", burst=not args.no_prefix_burst)
        res["prefix"]["off"]["engine_setup"] = describe_engine(llm, args.model)
        release(llm)
        pc = res["prefix"]
        pc["ttft_ratio_p50"] = {}
        pc["ttft_ratio_mean"] = {}
        for kind in ("sequential", "burst"):
            if kind in pc["on"]:
                on, off = pc["on"][kind]["summary"], pc["off"][kind]["summary"]
                pc["ttft_ratio_p50"][kind] = off["ttft_ms_p50"] / on["ttft_ms_p50"]
                pc["ttft_ratio_mean"][kind] = off["ttft_ms_mean"] / on["ttft_ms_mean"]
        log(f"prefix caching TTFT p50 ratio off/on: {pc['ttft_ratio_p50']}")
        save()

    if not args.no_static:
        log("building static engine")
        llm = make_llm(args.model, args.random_weights, scheduler="static", **base_kw)
        desc = describe_engine(llm, args.model)
        warm_up(llm, corpus)
        results_by[("offline", "static")] = record("offline", "static", llm, desc,
                                                    run_workload(llm, reqs, label="off-stat"))
        if not args.no_poisson:
            results_by[("poisson", "static")] = record(f"poisson {args.rate:g} req/s", "static", llm, desc,
                                                        run_workload(llm, reqs, arrivals, label="poi-stat"))
        release(llm)
        for mode in ("offline", "poisson"):
            if (mode, "static") in results_by:
                c = results_by[(mode, "continuous")]["summary"]["output_tok_s"]
                s = results_by[(mode, "static")]["summary"]["output_tok_s"]
                res["ratios"][mode] = c / s
                c = results_by[(mode, "continuous")]["summary"]["output_tok_per_cpu_s"]
                s = results_by[(mode, "static")]["summary"]["output_tok_per_cpu_s"]
                res["ratios_cpu"] = {**res.get("ratios_cpu", {}), mode: c / s}
                if (mode, "continuous-buckets") in results_by:
                    c = results_by[(mode, "continuous-buckets")]["summary"]["output_tok_s"]
                    s = results_by[(mode, "static")]["summary"]["output_tok_s"]
                    res["ratios_buckets"] = {**res.get("ratios_buckets", {}), mode: c / s}
        res["offline_ratio_bound"] = decode_step_bound([r.output_len for r in reqs], args.max_num_seqs)
        if ("offline", "static") in results_by:
            res["offline_replay"] = {m: replay_schedule(reqs, *replay_setup, m, ragged=replay_ragged and m == "continuous")
                                     for m in ("continuous", "static")}
            res["offline_ceiling"] = offline_ceiling(results_by[("offline", "continuous")],
                                                     results_by[("offline", "static")], args.max_num_seqs)
        save()

    for b in args.sweep:
        if b in sweep_points:
            continue
        log(f"building continuous engine max_num_seqs={b}")
        llm = make_llm(args.model, args.random_weights, scheduler="continuous", step_mode=args.step_mode,
                       **{**base_kw, "max_num_seqs": b})
        desc = describe_engine(llm, args.model)
        warm_up(llm, corpus)
        sweep_point(b, llm, desc, run_workload(llm, sweep_reqs, label=f"sweep{b}"))
        release(llm)
        res["sweep"] = [sweep_points[k] for k in sorted(sweep_points)]
        save()
    res["sweep"] = [sweep_points[k] for k in sorted(sweep_points)]
    res["sweep_requests"] = len(sweep_reqs)
    if res["sweep"]:
        png = os.path.join(args.out_dir, "serving_sweep.png")
        plot_sweep(res["sweep"], png)
        res["sweep_png"] = os.path.relpath(png, ROOT)
    save()

    if not args.no_hf:
        if args.model != DEFAULT_MODEL or args.random_weights:
            res["hf"] = {"error": f"HF baseline needs the real {DEFAULT_MODEL}"}
        else:
            log(f"HF transformers on {hf_n} requests, batch {args.hf_batch_size}")
            try:
                res["hf"] = run_hf_subprocess(reqs[:hf_n], args.hf_batch_size)
                cont = res["jaxserve_on_hf_subset"] if hf_n < len(reqs) else results_by[("offline", "continuous")]
                res["hf_ratio"] = cont["summary"]["output_tok_s"] / res["hf"]["output_tok_s"]
                log(f"HF: {res['hf']['output_tok_s']:.1f} out tok/s over {res['hf']['duration_s']:.1f}s")
            except ImportError as e:
                res["hf"] = {"error": f"skipped: {e} (pip install -e '.[bench]')"}
        save()

    res["machine"]["loadavg_at_end"] = _loadavg()
    save()
    print_report(res)
    return 0
