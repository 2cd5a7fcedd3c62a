#!/usr/bin/env python
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
and prints Markdown tables. The functions are importable (model name is a parameter) so
`tests/test_bench_serving.py` runs them on a tiny random model.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DEFAULT_MODEL = "gemma3-270m"


# ---------------------------------------------------------------------------------------------- workload


@dataclass
class WorkloadSpec:
    """Length distributions in tokens. A log-normal with `median` and `sigma` (of the underlying normal),
    rounded and clipped to [min, max]."""

    num_requests: int = 64
    prompt_median: float = 128.0
    prompt_sigma: float = 1.0
    prompt_min: int = 16
    prompt_max: int = 1024
    output_median: float = 40.0
    output_sigma: float = 1.0
    output_min: int = 8
    output_max: int = 512
    seed: int = 0


@dataclass
class BenchRequest:
    index: int
    prompt_ids: list  # exactly prompt_len token ids (BOS first when the model has one)
    output_len: int  # tokens the request must produce

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)


def lognormal_lengths(rng: np.random.Generator, n: int, median: float, sigma: float, lo: int, hi: int) -> list:
    """`n` integer lengths from a log-normal (median `median`, log-space std `sigma`), clipped to [lo, hi]."""
    if not (1 <= lo <= hi):
        raise ValueError(f"need 1 <= lo <= hi, got lo={lo}, hi={hi}")
    x = rng.lognormal(mean=math.log(median), sigma=sigma, size=n)
    return [int(v) for v in np.clip(np.rint(x), lo, hi)]


def corpus_text() -> str:
    """Real English prose and code from CPython's own docs (always installed, no download)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def corpus_token_ids(tokenizer) -> list:
    """The corpus tokenized without BOS (prompts are windows of it, BOS added per prompt)."""
    return list(tokenizer.encode(corpus_text(), add_bos=False))


def _window(corpus_ids: Sequence[int], rng: np.random.Generator, length: int) -> list:
    if length > len(corpus_ids):
        raise ValueError(f"window of {length} tokens from a corpus of {len(corpus_ids)}")
    off = int(rng.integers(0, len(corpus_ids) - length + 1))
    return list(corpus_ids[off:off + length])


def make_workload(corpus_ids: Sequence[int], spec: WorkloadSpec, bos_id: Optional[int] = None) -> list:
    """Seeded requests: prompt i is BOS (if any) + a window of the corpus, `prompt_len` tokens in total."""
    rng = np.random.default_rng(spec.seed)
    plens = lognormal_lengths(rng, spec.num_requests, spec.prompt_median, spec.prompt_sigma,
                              spec.prompt_min, spec.prompt_max)
    olens = lognormal_lengths(rng, spec.num_requests, spec.output_median, spec.output_sigma,
                              spec.output_min, spec.output_max)
    head = [] if bos_id is None else [int(bos_id)]
    reqs = []
    for i, (p, o) in enumerate(zip(plens, olens)):
        reqs.append(BenchRequest(i, head + _window(corpus_ids, rng, p - len(head)), o))
    return reqs


def poisson_arrivals(n: int, rate: float, seed: int = 0) -> list:
    """Arrival offsets in seconds: the first at 0, then seeded exponential gaps of mean 1/rate."""
    if rate <= 0:
        raise ValueError(f"rate must be > 0 requests/s, got {rate}")
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=n)
    arr = np.concatenate([[0.0], np.cumsum(gaps[:-1])]) if n else np.zeros(0)
    return [float(a) for a in arr]


def make_prefix_workload(corpus_ids: Sequence[int], num_requests: int, system_len: int, suffix_min: int,
                         suffix_max: int, seed: int = 1, bos_id: Optional[int] = None) -> tuple:
    """(system prompt ids, warm prompt, [prompt ids] x 2*num_requests): every prompt = the shared system prompt
    (`system_len` tokens, BOS included) + a distinct suffix of suffix_min..suffix_max corpus tokens. The first
    `num_requests` prompts are for one-at-a-time runs, the rest for the burst (so no suffix page repeats)."""
    rng = np.random.default_rng(seed)
    head = [] if bos_id is None else [int(bos_id)]
    system = head + _window(corpus_ids, rng, system_len - len(head))

    def one():
        return system + _window(corpus_ids, rng, int(rng.integers(suffix_min, suffix_max + 1)))

    warm = one()
    return system, warm, [one() for _ in range(2 * num_requests)]


# ---------------------------------------------------------------------------------------------- metrics


def percentile(values: Sequence[float], q: float) -> Optional[float]:
    """q-th percentile (0..100) by linear interpolation between order statistics (numpy's default);
    None for no values."""
    xs = sorted(float(v) for v in values if v is not None)
    if not xs:
        return None
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"q must be in [0, 100], got {q}")
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _ms(x: Optional[float]) -> Optional[float]:
    return None if x is None else x * 1e3


def summarize(records: list, duration_s: float) -> dict:
    """Aggregate per-request records (from `run_workload`) measured over `duration_s` seconds."""
    n = len(records)
    out_toks = sum(r["output_tokens"] for r in records)
    ttft = [r["ttft_s"] for r in records if r["ttft_s"] is not None]
    tpot = [r["tpot_s"] for r in records if r["tpot_s"] is not None]
    e2e = [r["e2e_s"] for r in records if r["e2e_s"] is not None]
    return {
        "num_requests": n,
        "prompt_tokens": sum(r["prompt_tokens"] for r in records),
        "output_tokens": out_toks,
        "duration_s": duration_s,
        "output_tok_s": out_toks / duration_s if duration_s > 0 else None,
        "requests_s": n / duration_s if duration_s > 0 else None,
        "ttft_ms_p50": _ms(percentile(ttft, 50)), "ttft_ms_p99": _ms(percentile(ttft, 99)),
        "ttft_ms_mean": _ms(float(np.mean(ttft))) if ttft else None,
        "tpot_ms_p50": _ms(percentile(tpot, 50)), "tpot_ms_p99": _ms(percentile(tpot, 99)),
        "tpot_ms_mean": _ms(float(np.mean(tpot))) if tpot else None,
        "e2e_s_p50": percentile(e2e, 50), "e2e_s_p99": percentile(e2e, 99),
    }


def _engine_counters(engine) -> dict:
    s = engine.stats
    bm = engine.bm.stats()
    return {
        "steps": s.steps, "prefill_steps": s.prefill_steps, "decode_steps": s.decode_steps,
        "prefill_tokens": s.kind_tokens["prefill"], "decode_rows": s.kind_tokens["decode"],
        "prefill_s": s.kind_seconds["prefill"], "decode_s": s.kind_seconds["decode"], "busy_s": s.busy_seconds,
        "preemptions": engine.scheduler.num_preemptions,
        "prefix_query_tokens": bm["prefix_query_tokens"], "prefix_hit_tokens": bm["prefix_hit_tokens"],
    }


def _counter_delta(before: dict, after: dict) -> dict:
    d = {k: after[k] - before[k] for k in before}
    d["mean_decode_batch"] = d["decode_rows"] / d["decode_steps"] if d["decode_steps"] else None
    d["prefix_hit_rate"] = (d["prefix_hit_tokens"] / d["prefix_query_tokens"]) if d["prefix_query_tokens"] else 0.0
    return d


# ---------------------------------------------------------------------------------------------- driving the engine


def run_workload(llm, requests: Sequence[BenchRequest], arrivals: Optional[Sequence[float]] = None,
                 label: str = "run", reset_prefix_cache: bool = True) -> dict:
    """Serve `requests` on `llm.engine` and measure them.

    `arrivals=None`: offline, every request submitted at once. Otherwise `arrivals[i]` is request i's arrival
    offset in seconds from the start; it is added (`engine.add_request`) at the first loop turn after that
    time (between `step()` calls, as a server's engine loop would), and its TTFT counts from the scheduled
    arrival. `reset_prefix_cache`: first forget the prefix cache, so an earlier run of the same prompts on
    this engine cannot turn this run's prefills into cache hits.
    Returns {"summary", "engine" (step/batch counters of this run), "requests" (per-request records)}.
    """
    from jaxserve import SamplingParams

    eng = llm.engine
    if eng.has_unfinished_requests():
        raise RuntimeError("the engine has unfinished requests; run_workload needs an idle engine")
    n = len(requests)
    offs = [0.0] * n if arrivals is None else [float(a) for a in arrivals]
    if len(offs) != n:
        raise ValueError(f"{len(offs)} arrival times for {n} requests")
    if reset_prefix_cache:
        eng.bm.reset_prefix_cache()
    order = sorted(range(n), key=lambda i: (offs[i], i))
    params = [SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True) for r in requests]
    rid_to_i: dict = {}
    done: dict = {}
    running_samples: list = []
    before = _engine_counters(eng)
    nxt = 0
    t0 = time.monotonic()
    cpu0 = time.process_time()
    while len(done) < n:
        now = time.monotonic()
        while nxt < n and t0 + offs[order[nxt]] <= now:
            i = order[nxt]
            rid = eng.add_request(list(requests[i].prompt_ids), params[i], request_id=f"{label}-{i}",
                                  priority="batch")
            rid_to_i[rid] = i
            nxt += 1
        if eng.has_unfinished_requests():
            for ro in eng.step():
                if ro.finished and ro.request_id in rid_to_i:
                    done[rid_to_i[ro.request_id]] = ro
            running_samples.append(len(eng.scheduler.running))
        elif nxt < n:
            time.sleep(max(0.0, t0 + offs[order[nxt]] - time.monotonic()))
        else:
            raise RuntimeError(f"engine idle but only {len(done)}/{n} requests finished")
    cpu_s = time.process_time() - cpu0
    after = _engine_counters(eng)
    records = []
    t_end = t0
    for i in range(n):
        ro = done[i]
        m = ro.metrics
        sched = t0 + offs[i]
        first = None if m.ttft is None else m.arrival_time + m.ttft
        fin = None if m.e2e is None else m.arrival_time + m.e2e
        if fin is not None:
            t_end = max(t_end, fin)
        out = ro.outputs[0]
        records.append({
            "index": i, "arrival_offset_s": offs[i], "prompt_tokens": requests[i].prompt_len,
            "requested_tokens": requests[i].output_len, "output_tokens": len(out.token_ids),
            "finish_reason": out.finish_reason,
            "submit_delay_s": m.arrival_time - sched,  # scheduled arrival -> add_request (engine loop latency)
            "ttft_s": None if first is None else first - sched,
            "tpot_s": m.tpot, "e2e_s": None if fin is None else fin - sched,
            "num_cached_prompt_tokens": m.num_cached_prompt_tokens, "num_preemptions": m.num_preemptions,
        })
    eng_delta = _counter_delta(before, after)
    eng_delta["mean_running"] = float(np.mean(running_samples)) if running_samples else 0.0
    eng_delta["max_running"] = int(max(running_samples)) if running_samples else 0
    summary = summarize(records, t_end - t0)
    # CPU seconds of this process (all its threads) over the run: on a machine shared with other jobs the
    # wall clock stretches with their load, the work done by this process much less, so tokens per CPU-second
    # compare two runs made at different loads more fairly than tokens per wall-second.
    summary["cpu_s"] = cpu_s
    summary["output_tok_per_cpu_s"] = summary["output_tokens"] / cpu_s if cpu_s > 0 else None
    return {"summary": summary, "engine": eng_delta, "requests": records}


def run_workload_http(llm, requests: Sequence[BenchRequest], model_name: str = "bench") -> dict:
    """The offline workload through `jaxserve serve`'s app (uvicorn on 127.0.0.1, a free port) over HTTP.

    Every request is a streaming `/v1/completions` call (token-id prompt, greedy, `ignore_eos`, `max_tokens`),
    all sent at once from one asyncio client (httpx). TTFT is first streamed token - submission and TPOT
    (last - first) / (tokens - 1), measured by the client, so they include HTTP, JSON and SSE overhead.
    The engine must be idle; its prefix cache is reset first. Returns {"summary", "requests"} like
    `run_workload`.
    """
    import asyncio
    import json as _json
    import socket
    import threading

    import httpx
    import uvicorn

    from jaxserve.server.app import build_app

    eng = llm.engine
    if eng.has_unfinished_requests():
        raise RuntimeError("the engine has unfinished requests")
    eng.bm.reset_prefix_cache()
    app = build_app(llm, served_model_names=[model_name], default_priority="batch")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the HTTP server did not start")
        time.sleep(0.02)

    async def one(client, i, r):
        body = {"model": model_name, "prompt": list(r.prompt_ids), "max_tokens": r.output_len, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        times = []
        usage = None
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                raise RuntimeError(f"request {i}: HTTP {resp.status_code}: {(await resp.aread())[:300]!r}")
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = _json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    times.append(time.monotonic())
                if chunk.get("usage"):
                    usage = chunk["usage"]
        # a chunk may carry several tokens' text (or none, for half a character): the token count comes from
        # the streamed `usage`; timing uses the first and last text-bearing chunks
        return i, times, usage

    async def main_async():
        limits = httpx.Limits(max_connections=len(requests) + 8, max_keepalive_connections=len(requests) + 8)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=3600, limits=limits) as client:
            t0 = time.monotonic()
            res = await asyncio.gather(*(one(client, i, r) for i, r in enumerate(requests)))
            return t0, res

    try:
        t0, res = asyncio.run(main_async())
    finally:
        server.should_exit = True
        thread.join(60)
    records = []
    t_end = t0
    for i, times, usage in sorted(res, key=lambda x: x[0]):
        r = requests[i]
        if not times or not usage:
            raise RuntimeError(f"request {i} streamed no text or no usage")
        t_end = max(t_end, times[-1])
        n = int(usage["completion_tokens"])
        records.append({"index": i, "arrival_offset_s": 0.0, "prompt_tokens": r.prompt_len,
                        "requested_tokens": r.output_len, "output_tokens": n, "ttft_s": times[0] - t0,
                        "tpot_s": (times[-1] - times[0]) / (n - 1) if n > 1 else None, "e2e_s": times[-1] - t0})
    return {"summary": summarize(records, t_end - t0), "requests": records}


def warm_up(llm, corpus_ids: Sequence[int], lengths=(40, 300), output_len: int = 4) -> None:
    """A couple of short requests so first-call costs (allocation, Python paths) fall before the clock,
    then forget their prefix-cache entries."""
    ps = [list(corpus_ids[:min(n, len(corpus_ids))]) for n in lengths]
    ps = [p for p in ps if 0 < len(p) < llm.engine.max_model_len - output_len]
    run_workload(llm, [BenchRequest(i, p, output_len) for i, p in enumerate(ps)], label="warmup")
    llm.engine.bm.reset_prefix_cache()


def run_prefix_experiment(llm, system_ids: list, warm_prompt: list, prompts: list, output_len: int = 8,
                          label: str = "prefix", burst: bool = True) -> dict:
    """TTFT of requests sharing `system_ids`, after one warming request that fills the prefix cache.

    The first half of `prompts` runs one request at a time (isolated TTFT: prefill cost only); with
    `burst`, the second half is submitted all at once (TTFT includes waiting for the others' prefill).
    The prefix cache is reset first, so the warming request is the only source of hits.
    """
    eng = llm.engine
    eng.bm.reset_prefix_cache()
    half = len(prompts) // 2 if burst else len(prompts)
    warm = run_workload(llm, [BenchRequest(0, warm_prompt, output_len)], label=f"{label}-warm",
                        reset_prefix_cache=False)
    before = _engine_counters(eng)
    seq_records = []
    t0 = time.monotonic()
    for i, p in enumerate(prompts[:half]):
        r = run_workload(llm, [BenchRequest(i, p, output_len)], label=f"{label}-seq{i}", reset_prefix_cache=False)
        rec = r["requests"][0]
        rec["index"] = i
        seq_records.append(rec)
    seq_duration = time.monotonic() - t0
    seq_counters = _counter_delta(before, _engine_counters(eng))
    out = {
        "system_prompt_tokens": len(system_ids),
        "warm_request": warm["requests"][0],
        "sequential": {"summary": summarize(seq_records, seq_duration), "engine": seq_counters,
                       "requests": seq_records},
    }
    if burst:
        out["burst"] = run_workload(llm, [BenchRequest(i, p, output_len) for i, p in enumerate(prompts[half:])],
                                    label=f"{label}-burst", reset_prefix_cache=False)
    m = llm.get_metrics()
    out["engine_metrics"] = {k: m[k] for k in ("prefix_hit_rate", "num_preemptions", "kv_pages_total")}
    return out


# ---------------------------------------------------------------------------------------------- engines


def engine_kwargs(spec: WorkloadSpec, max_num_seqs: int, max_model_len: int, page_size: int = 16,
                  prefix_len: int = 0, **extra) -> dict:
    """EngineConfig fields sized so `max_num_seqs` of the longest possible requests fit in KV at once."""
    longest = min(max_model_len, max(spec.prompt_max + spec.output_max, prefix_len))
    pages_per_seq = -(-longest // page_size)
    num_pages = max(64, max_num_seqs) * pages_per_seq + 1  # + the null page
    return dict(max_num_seqs=max_num_seqs, max_model_len=max_model_len, page_size=page_size,
                num_pages=num_pages, **extra)


def make_llm(model: str, random_weights: bool = False, **kw):
    from jaxserve import LLM

    t0 = time.monotonic()
    llm = LLM(model, random_weights=random_weights, **kw)
    llm._bench_startup_s = time.monotonic() - t0
    return llm


def describe_engine(llm, model: str) -> dict:
    return {"model": model, "engine_config": dataclasses.asdict(llm.engine_config),
            "num_pages": llm.engine.num_pages,
            "kv_cache_bytes": int(llm.engine.num_pages * llm.engine_config.page_size
                                  * llm.model_config.kv_bytes_per_token(llm.engine_config.kv_cache_dtype)),
            "startup_s": getattr(llm, "_bench_startup_s", None), "compile_s": llm.compile_seconds}


def release(llm) -> None:
    """Drop an engine's device buffers (params, KV pages) before building the next one."""
    llm.engine.runner.params = None
    llm.engine.runner.kv = None
    del llm
    gc.collect()


# ---------------------------------------------------------------------------------------------- HF baseline


def run_hf(requests: Sequence[BenchRequest], batch_size: int) -> dict:
    """HF transformers batched greedy `generate` (scripts/hf_baseline.py) on `requests`, `batch_size` rows per
    call, in workload order, EOS disabled so every row produces at least its requested length. Throughput
    counts the requested (useful) tokens; a call runs max(output_len) steps for all its rows.

    Call this in a process that has not run JAX (see `run_hf_subprocess`)."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from hf_baseline import hf_generate_batch, load_hf_gemma3
    import torch
    import transformers

    t0 = time.monotonic()
    model, tok = load_hf_gemma3()
    load_s = time.monotonic() - t0
    model.generation_config.eos_token_id = None  # like ignore_eos: rows never stop early
    warm = [list(requests[0].prompt_ids[:16])] * 2
    hf_generate_batch(model, tok, warm, [4, 4], stop_ids=())  # warm-up: the first generate call is slow
    calls = []
    t0 = time.monotonic()
    for s in range(0, len(requests), batch_size):
        chunk = list(requests[s:s + batch_size])
        outs, elapsed = hf_generate_batch(model, tok, [r.prompt_ids for r in chunk], [r.output_len for r in chunk],
                                          stop_ids=())
        short = [r.index for r, o in zip(chunk, outs) if len(o) != r.output_len]
        calls.append({"rows": len(chunk), "padded_prompt_len": max(r.prompt_len for r in chunk),
                      "steps": max(r.output_len for r in chunk), "elapsed_s": elapsed,
                      "useful_tokens": sum(len(o) for o in outs), "short_rows": short})
    wall = time.monotonic() - t0
    useful = sum(c["useful_tokens"] for c in calls)
    computed = sum(c["rows"] * c["steps"] for c in calls)
    del model
    gc.collect()
    return {"engine": f"HF transformers {transformers.__version__} (torch {torch.__version__} CPU, float32, "
                      f"eager attention)", "num_requests": len(requests), "batch_size": batch_size,
            "load_s": load_s, "duration_s": wall, "output_tokens": useful, "computed_tokens": computed,
            "output_tok_s": useful / wall, "requests_s": len(requests) / wall,
            "all_lengths_exact": all(not c["short_rows"] for c in calls), "calls": calls}


def run_hf_subprocess(requests: Sequence[BenchRequest], batch_size: int) -> dict:
    """`run_hf` in a fresh Python process. In a process where JAX has run, torch's batched generate was
    measured ~15x slower here (4 rows x 16 tokens: 38.9 s vs 2.5 s), so HF never shares the process."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        src, dst = os.path.join(d, "requests.json"), os.path.join(d, "hf.json")
        with open(src, "w") as f:
            json.dump([dataclasses.asdict(r) for r in requests], f)
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "--hf-worker", src, dst, str(batch_size)],
                           cwd=ROOT, capture_output=True, text=True)
        if p.returncode != 0:
            tail = p.stderr.strip().splitlines()[-1:] or ["no output"]
            if "ModuleNotFoundError" in p.stderr or "ImportError" in p.stderr:
                raise ImportError(tail[0])
            raise RuntimeError(f"HF worker failed ({p.returncode}): {p.stderr[-3000:]}")
        with open(dst) as f:
            return json.load(f)


def _hf_worker(src: str, dst: str, batch_size: str) -> int:
    with open(src) as f:
        reqs = [BenchRequest(**r) for r in json.load(f)]
    out = run_hf(reqs, int(batch_size))
    with open(dst, "w") as f:
        json.dump(out, f)
    return 0


# ---------------------------------------------------------------------------------------------- report


def plot_sweep(points: list, path: str) -> None:
    """x = TPOT p50 and p99 (ms), y = output tok/s; each point labelled with its max_num_seqs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for key, style, name in (("tpot_ms_p50", "o-", "TPOT p50"), ("tpot_ms_p99", "s--", "TPOT p99")):
        pts = [(p[key], p["output_tok_s"], p["max_num_seqs"]) for p in points if p.get(key) is not None]
        if not pts:
            continue
        ax.plot([x for x, _, _ in pts], [y for _, y, _ in pts], style, label=name)
        for x, y, b in pts:
            ax.annotate(f"{b}", (x, y), textcoords="offset points", xytext=(5, 4), fontsize=9)
    ax.set_xlabel("time per output token (ms)")
    ax.set_ylabel("output tokens/s")
    ax.set_title("jaxserve continuous batching: max_num_seqs sweep (labels = max batch)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _f(x, nd=1) -> str:
    return "" if x is None else f"{x:,.{nd}f}"


def print_report(res: dict) -> None:
    w = res["workload"]
    print(f"\n## jaxserve serving benchmark ({res['model']}; {res['machine']['cpu_count']} CPUs)")
    print(f"command: {res['command']}")
    print(f"workload: {w['num_requests']} requests, prompt tokens p50/mean/max "
          f"{w['prompt_tokens_p50']:.0f}/{w['prompt_tokens_mean']:.0f}/{w['prompt_tokens_max']}, output tokens "
          f"p50/mean/max {w['output_tokens_p50']:.0f}/{w['output_tokens_mean']:.0f}/{w['output_tokens_max']}, "
          f"{w['output_tokens_total']} output tokens in total")
    print("\n| workload | engine | output tok/s | req/s | TTFT p50 (ms) | TTFT p99 (ms) | TPOT p50 (ms) "
          "| TPOT p99 (ms) | mean decode batch / max running | wall (s) | output tok per CPU-s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in res["runs"]:
        s, e = r["summary"], r["engine"]
        print(f"| {r['mode']} | jaxserve {r['scheduler']} (max_num_seqs {r['max_num_seqs']}) | "
              f"{_f(s['output_tok_s'])} | {_f(s['requests_s'], 3)} | {_f(s['ttft_ms_p50'], 0)} | "
              f"{_f(s['ttft_ms_p99'], 0)} | {_f(s['tpot_ms_p50'])} | {_f(s['tpot_ms_p99'])} | "
              f"{_f(e['mean_decode_batch'])} / {e['max_running']} | {_f(s['duration_s'])} | "
              f"{_f(s.get('output_tok_per_cpu_s'))} |")
    hf = res.get("hf")
    if hf and "output_tok_s" in hf:
        print(f"| offline, first {hf['num_requests']} requests | {hf['engine']}, batch {hf['batch_size']} | "
              f"{_f(hf['output_tok_s'])} | {_f(hf['requests_s'], 3)} | | | | | | {_f(hf['duration_s'])} |")
        sub = res.get("jaxserve_on_hf_subset")
        if sub:
            s = sub["summary"]
            print(f"| offline, first {hf['num_requests']} requests | jaxserve continuous | {_f(s['output_tok_s'])} | "
                  f"{_f(s['requests_s'], 3)} | {_f(s['ttft_ms_p50'], 0)} | {_f(s['ttft_ms_p99'], 0)} | "
                  f"{_f(s['tpot_ms_p50'])} | {_f(s['tpot_ms_p99'])} | {_f(sub['engine']['mean_decode_batch'])} / "
                  f"{sub['engine']['max_running']} | "
                  f"{_f(s['duration_s'])} |")
    elif hf:
        print(f"\nHF baseline: {hf.get('error')}")
    print()
    for mode, ratio in res["ratios"].items():
        cpu = res.get("ratios_cpu", {}).get(mode)
        print(f"continuous / static output tok/s, {mode}: {ratio:.2f}x"
              + (f" (per CPU-second of this process: {cpu:.2f}x)" if cpu else ""))
    b = res.get("offline_ratio_bound")
    if b:
        print(f"bound from decode steps alone (offline): static {b['static_decode_steps']} steps, continuous >= "
              f"{b['continuous_decode_steps_min']} -> continuous/static <= {b['ratio_bound']:.2f}x "
              "(prefill, paid in full by both, lowers the reachable ratio)")
    rp, ce = res.get("offline_replay"), res.get("offline_ceiling")
    if rp:
        measured = {r["scheduler"]: r["engine"]["decode_steps"] for r in res["runs"] if r["mode"] == "offline"}
        print(f"scheduler replay (no model): continuous {rp['continuous']['decode_steps']} decode steps "
              f"(measured {measured.get('continuous')}), static {rp['static']['decode_steps']} "
              f"(measured {measured.get('static')}); continuous decode buckets {rp['continuous']['decode_buckets']}")
    if ce:
        print(f"ceiling on measured step costs: a full {res['runs'][0]['max_num_seqs']}-row decode step takes "
              f"{ce['full_decode_step_s'] * 1e3:.0f} ms; with every continuous decode step full, continuous would "
              f"take {ce['continuous_prefill_s']:.1f} s prefill + {ce['ideal_continuous_decode_s']:.1f} s decode "
              f"(measured {ce['continuous_decode_s']:.1f} s) against static's {ce['static_s']:.1f} s: "
              f"continuous/static <= {ce['ceiling']:.2f}x")
    if res.get("hf_ratio"):
        print(f"jaxserve continuous / HF output tok/s on the HF requests: {res['hf_ratio']:.2f}x")
    if res.get("sweep"):
        print("\n| max_num_seqs | output tok/s | TPOT p50 (ms) | TPOT p99 (ms) | TTFT p50 (ms) | mean decode batch |")
        print("|---|---|---|---|---|---|")
        for p in res["sweep"]:
            print(f"| {p['max_num_seqs']} | {_f(p['output_tok_s'])} | {_f(p['tpot_ms_p50'])} | {_f(p['tpot_ms_p99'])} "
                  f"| {_f(p['ttft_ms_p50'], 0)} | {_f(p['mean_decode_batch'])} |")
        if res.get("sweep_png"):
            print(f"plot: {res['sweep_png']}")
    pc = res.get("prefix")
    if pc:
        print(f"\nPrefix caching: {pc['num_requests']} requests sharing a {pc['system_prompt_tokens']}-token system "
              f"prompt (+ {pc['suffix_tokens'][0]}-{pc['suffix_tokens'][1]} distinct tokens), "
              f"{pc['output_tokens']} output tokens each")
        print("\n| submission | prefix caching | TTFT p50 (ms) | TTFT p99 (ms) | TTFT mean (ms) | cached prompt tokens "
              "per request (mean) | prefix hit rate (engine) |")
        print("|---|---|---|---|---|---|---|")
        for kind in ("sequential", "burst"):
            for onoff in ("on", "off"):
                r = pc[onoff].get(kind)
                if not r:
                    continue
                s = r["summary"]
                cached = float(np.mean([q["num_cached_prompt_tokens"] for q in r["requests"]]))
                print(f"| {'one at a time' if kind == 'sequential' else 'all at once'} | {onoff} | "
                      f"{_f(s['ttft_ms_p50'], 1)} | {_f(s['ttft_ms_p99'], 1)} | {_f(s['ttft_ms_mean'], 1)} | "
                      f"{cached:.0f} | {r['engine']['prefix_hit_rate']:.3f} |")
        for kind, v in pc["ttft_ratio_p50"].items():
            print(f"TTFT p50 off/on, {kind}: {v:.1f}x")
    print(f"\nload average (1/5/15 min) at start {res['machine']['loadavg_at_start']}, at end "
          f"{res['machine'].get('loadavg_at_end')}; total wall {res.get('total_wall_s', 0):.0f} s")
    print(f"written {res['json']}")


def decode_step_bound(output_lens: Sequence[int], max_num_seqs: int) -> dict:
    """How much faster continuous batching can decode this offline workload than static batching, at most.

    Static batching decodes each batch of `max_num_seqs` requests (taken in arrival order) for as many steps as
    its longest request; continuous batching needs at least `ceil(total / max_num_seqs)` steps (every slot busy
    every step) and at least as many as the longest request. With equal step costs and prefill left out, the
    ratio of the two step counts bounds the continuous/static output tok/s; prefill, which both modes pay in
    full, pulls the measured ratio below it.
    """
    ol = list(output_lens)
    static = sum(max(ol[i:i + max_num_seqs]) for i in range(0, len(ol), max_num_seqs))
    continuous = max(-(-sum(ol) // max_num_seqs), max(ol))
    return {"static_decode_steps": static, "continuous_decode_steps_min": continuous,
            "ratio_bound": static / continuous}


def replay_schedule(reqs: Sequence[BenchRequest], engine_config, num_pages: int, max_len: int, scheduler: str) -> dict:
    """The steps an offline run of `reqs` takes, from the engine's own Scheduler and BlockManager with no model.

    Every request arrives at once (the offline mode); each scheduled row "computes" its tokens and a row that
    reaches the end of its known tokens emits one, until `output_len` (greedy with `ignore_eos` emits exactly
    that many). Which sequence runs in which step depends only on lengths, so the counts equal a real run's
    (checked by tests/test_bench_serving.py); the difference is that this takes milliseconds. It separates what
    the schedule costs (e.g. continuous batching's first-come-first-served order starting the longest request
    late) from what executing each step costs.
    """
    from jaxserve.engine.block_manager import BlockManager
    from jaxserve.engine.request import Priority, Sequence as Seq, Status
    from jaxserve.engine.scheduler import Scheduler
    from jaxserve.sampling_params import SamplingParams

    cfg = dataclasses.replace(engine_config, scheduler=scheduler)
    bm = BlockManager(num_pages, cfg.page_size, cfg.enable_prefix_caching)
    sch = Scheduler(cfg, bm, mode=scheduler)
    for i, r in enumerate(reqs):
        seq = Seq(i, str(i), 0, r.prompt_ids, SamplingParams(max_tokens=r.output_len, ignore_eos=True), 0,
                  Priority.INTERACTIVE, (), max_len)
        sch.add(seq)
    out = {"prefill_steps": 0, "decode_steps": 0, "decode_rows": 0, "prefill_padded_tokens": 0,
           "decode_buckets": {}}
    while sch.has_work():
        step = sch.schedule()
        if step is None:
            raise RuntimeError("the scheduler stalled with work left")
        R, Q = step.bucket
        if step.kind == "prefill":
            out["prefill_steps"] += 1
            out["prefill_padded_tokens"] += R * Q
        else:
            out["decode_steps"] += 1
            out["decode_rows"] += len(step.rows)
            out["decode_buckets"][R] = out["decode_buckets"].get(R, 0) + 1
        for row in step.rows:
            seq = row.seq
            seq.num_computed_tokens = row.start + row.num_new
            if row.samples:
                seq.output_token_ids.append(0)
                if len(seq.output_token_ids) >= seq.max_tokens:
                    seq.status = Status.FINISHED
            bm.commit_computed(seq.seq_id, seq.all_token_ids, seq.num_computed_tokens)
            if seq.finished:
                sch.finish(seq)
    out["decode_buckets"] = {str(k): v for k, v in sorted(out["decode_buckets"].items())}
    return out


def offline_ceiling(cont: dict, stat: dict, max_num_seqs: int) -> dict:
    """The most continuous batching could gain over static on this run's measured step costs.

    Static batching runs every decode step at the full `max_num_seqs` bucket, so its decode seconds per step is
    the measured cost of a full step; per row that is the cheapest decode there is here (smaller buckets cost
    more per row). With every continuous decode step full, continuous would spend output_tokens / max_num_seqs
    full steps decoding, plus the prefill it measured. Static's measured wall time over that is the ceiling.
    """
    full_step_s = stat["engine"]["decode_s"] / max(1, stat["engine"]["decode_steps"])
    ideal_decode_s = cont["summary"]["output_tokens"] / max_num_seqs * full_step_s
    cont_prefill_s = cont["engine"]["prefill_s"]
    return {"full_decode_step_s": full_step_s, "ideal_continuous_decode_s": ideal_decode_s,
            "continuous_prefill_s": cont_prefill_s, "continuous_decode_s": cont["engine"]["decode_s"],
            "static_s": stat["summary"]["duration_s"],
            "ceiling": stat["summary"]["duration_s"] / (cont_prefill_s + ideal_decode_s)}


def workload_stats(reqs: Sequence[BenchRequest]) -> dict:
    pl = [r.prompt_len for r in reqs]
    ol = [r.output_len for r in reqs]
    return {"num_requests": len(reqs), "prompt_tokens_p50": percentile(pl, 50), "prompt_tokens_mean": float(np.mean(pl)),
            "prompt_tokens_min": min(pl), "prompt_tokens_max": max(pl), "output_tokens_p50": percentile(ol, 50),
            "output_tokens_mean": float(np.mean(ol)), "output_tokens_min": min(ol), "output_tokens_max": max(ol),
            "prompt_tokens_total": sum(pl), "output_tokens_total": sum(ol),
            "prompt_lens": pl, "output_lens": ol}


def _loadavg() -> Optional[list]:
    """1/5/15-minute load averages: more than the CPU count means other jobs shared the cores."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def machine_info() -> dict:
    import jax

    info = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "jax": jax.__version__, "devices": [str(d) for d in jax.devices()],
            "loadavg_at_start": _loadavg()}
    try:
        with open("/proc/cpuinfo") as f:
            names = [l.split(":", 1)[1].strip() for l in f if l.startswith("model name")]
        info["cpu_model"] = names[0] if names else None
        with open("/proc/meminfo") as f:
            info["mem_total_kib"] = int(f.readline().split()[1])
    except OSError:
        pass
    return info


# ---------------------------------------------------------------------------------------------- main


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
    llm = make_llm(args.model, args.random_weights, scheduler="continuous", **base_kw)
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
            f"batch {_f(r['engine']['mean_decode_batch'])}")
        save()
        return entry

    results_by = {}
    results_by[("offline", "continuous")] = record("offline", "continuous", llm, desc_cont,
                                                    run_workload(llm, reqs, label="off-cont"))
    if not args.no_poisson:
        results_by[("poisson", "continuous")] = record(f"poisson {args.rate:g} req/s", "continuous", llm, desc_cont,
                                                        run_workload(llm, reqs, arrivals, label="poi-cont"))

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
                       **base_kw)
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
        res["offline_ratio_bound"] = decode_step_bound([r.output_len for r in reqs], args.max_num_seqs)
        if ("offline", "static") in results_by:
            res["offline_replay"] = {m: replay_schedule(reqs, *replay_setup, m) for m in ("continuous", "static")}
            res["offline_ceiling"] = offline_ceiling(results_by[("offline", "continuous")],
                                                     results_by[("offline", "static")], args.max_num_seqs)
        save()

    for b in args.sweep:
        if b in sweep_points:
            continue
        log(f"building continuous engine max_num_seqs={b}")
        llm = make_llm(args.model, args.random_weights, scheduler="continuous",
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


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--hf-worker":
        sys.exit(_hf_worker(*sys.argv[2:]))
    sys.exit(main())
