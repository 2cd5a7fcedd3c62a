"""The serving benchmark's numbers and report: percentiles, per-run summaries, the offline ceiling, the machine
description, the Markdown tables and the sweep plot."""

from __future__ import annotations

import math
import os
import platform
from typing import Optional, Sequence

import numpy as np


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
          "| TPOT p99 (ms) | mean decode batch / max running | wall (s) | output tok per CPU-s | prefill computed / real |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in res["runs"]:
        s, e = r["summary"], r["engine"]
        print(f"| {r['mode']} | jaxserve {r['scheduler']} (max_num_seqs {r['max_num_seqs']}) | "
              f"{_f(s['output_tok_s'])} | {_f(s['requests_s'], 3)} | {_f(s['ttft_ms_p50'], 0)} | "
              f"{_f(s['ttft_ms_p99'], 0)} | {_f(s['tpot_ms_p50'])} | {_f(s['tpot_ms_p99'])} | "
              f"{_f(e['mean_decode_batch'])} / {e['max_running']} | {_f(s['duration_s'])} | "
              f"{_f(s.get('output_tok_per_cpu_s'))} | {_f(e.get('prefill_computed_ratio'), 2)} |")
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
