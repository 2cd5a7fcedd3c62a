"""Driving an engine through a workload and measuring it: offline and Poisson runs through `LLMEngine`, the
same through `jaxserve serve`'s HTTP app, the prefix-cache experiment, engine construction and release, and a
host-only replay of the schedule (the engine's own Scheduler, no model)."""

from __future__ import annotations

import dataclasses
import gc
import time
from typing import Optional, Sequence

import numpy as np

from serving_bench.report import summarize
from serving_bench.workload import BenchRequest, WorkloadSpec


def _engine_counters(engine) -> dict:
    s = engine.stats
    bm = engine.bm.stats()
    return {
        "steps": s.steps, "prefill_steps": s.prefill_steps, "decode_steps": s.decode_steps,
        "prefill_tokens": s.kind_tokens["prefill"], "decode_rows": s.kind_tokens["decode"],
        "prefill_s": s.kind_seconds["prefill"], "decode_s": s.kind_seconds["decode"], "busy_s": s.busy_seconds,
        "preemptions": engine.scheduler.num_preemptions,
        "mixed_steps": s.mixed_steps, "prefill_computed_tokens": s.padded_prompt_tokens,
        "prefix_query_tokens": bm["prefix_query_tokens"], "prefix_hit_tokens": bm["prefix_hit_tokens"],
    }


def _counter_delta(before: dict, after: dict) -> dict:
    d = {k: after[k] - before[k] for k in before}
    d["mean_decode_batch"] = d["decode_rows"] / d["decode_steps"] if d["decode_steps"] else None
    # token slots the prefill (or ragged) programs computed per real prompt token (padding's cost)
    d["prefill_computed_ratio"] = d["prefill_computed_tokens"] / d["prefill_tokens"] if d["prefill_tokens"] else None
    d["prefix_hit_rate"] = (d["prefix_hit_tokens"] / d["prefix_query_tokens"]) if d["prefix_query_tokens"] else 0.0
    return d


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


def replay_schedule(reqs: Sequence[BenchRequest], engine_config, num_pages: int, max_len: int, scheduler: str,
                    ragged: bool = False) -> dict:
    """The steps an offline run of `reqs` takes, from the engine's own Scheduler and BlockManager with no model.

    Every request arrives at once (the offline mode); each scheduled row "computes" its tokens and a row that
    reaches the end of its known tokens emits one, until `output_len` (greedy with `ignore_eos` emits exactly
    that many). Which sequence runs in which step depends only on lengths, so the counts equal a real run's
    (checked by tests/test_bench_serving.py); the difference is that this takes milliseconds. It separates what
    the schedule costs (e.g. continuous batching's first-come-first-served order starting the longest request
    late) from what executing each step costs.
    """
    from jaxserve.engine.request import Priority, SampledToken, Sequence as Seq
    from jaxserve.engine.scheduler import Scheduler
    from jaxserve.sampling_params import SamplingParams

    cfg = dataclasses.replace(engine_config, scheduler=scheduler)
    sch = Scheduler(cfg, num_pages)
    if ragged:
        sch.ragged_ladder = cfg.token_buckets()
    for i, r in enumerate(reqs):
        seq = Seq(i, str(i), 0, r.prompt_ids, SamplingParams(max_tokens=r.output_len, ignore_eos=True), 0,
                  Priority.INTERACTIVE, (), max_len)
        sch.add(seq)
    out = {"prefill_steps": 0, "decode_steps": 0, "decode_rows": 0, "prefill_padded_tokens": 0,
           "decode_buckets": {}}
    token = SampledToken(0, 0.0, (), ())
    while sch.has_work():
        step = sch.schedule()
        if step is None:
            raise RuntimeError("the scheduler stalled with work left")
        R, Q = step.bucket
        if step.kind == "mixed":
            dec = sum(1 for row in step.rows if row.is_decode)
            if sum(row.num_new for row in step.rows) > dec:
                out["prefill_steps"] += 1
                out["prefill_padded_tokens"] += Q - dec
            else:
                out["decode_steps"] += 1
                out["decode_buckets"][Q] = out["decode_buckets"].get(Q, 0) + 1
            out["decode_rows"] += dec
        elif step.kind == "prefill":
            out["prefill_steps"] += 1
            out["prefill_padded_tokens"] += R * Q
        else:
            out["decode_steps"] += 1
            out["decode_rows"] += len(step.rows)
            out["decode_buckets"][R] = out["decode_buckets"].get(R, 0) + 1
        # every row that reaches the end of its known tokens emits one (token 0); the engine's own bookkeeping
        sch.update(step, [[token] if row.samples else [] for row in step.rows], time.monotonic())
    out["decode_buckets"] = {str(k): v for k, v in sorted(out["decode_buckets"].items())}
    return out
