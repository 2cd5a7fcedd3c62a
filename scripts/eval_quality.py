#!/usr/bin/env python
"""Quality of quantized Gemma 3 270M: held-out perplexity and greedy agreement with the unquantized model.

    python scripts/eval_quality.py [--model gemma3-270m] [--configs fp32 int8 int4 gptq kv-int8 ...]
                                   [--prompts 32] [--new-tokens 64] [--ppl-seqs 16] [--ppl-len 512] [--seed 0]

Data (seeded, `jaxserve.weights.calibrate.split_topics`): the `pydoc_data.topics` texts that ship with Python,
split by topic into a calibration part (GPTQ's 32 x 256 tokens) and a disjoint held-out part. Perplexity:
`--ppl-seqs` windows of `--ppl-len` tokens of held-out text, full causal attention (the cache-free forward in
calibrate.perplexity, which uses the model's own quantized `dense`). Greedy agreement: `--prompts` prompts
(32-token windows of held-out text) x `--new-tokens` greedy tokens through the paged engine, compared with the
unquantized engine's tokens: "prefix" = mean fraction of tokens generated before the first difference,
"position" = fraction of equal tokens position by position. Resident weight bytes: the bytes of the device
buffers the engine holds for its params (all of them: norms, embedding, scales).

Writes bench_results/quality.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# name -> LLM keyword arguments (besides the shared engine settings)
CONFIGS = {
    "fp32": {},
    "int8": dict(quantization="int8"),
    "int4": dict(quantization="int4"),
    "gptq": dict(quantization="gptq"),
    "kv-int8": dict(kv_cache_dtype="int8"),
    "kv-bf16": dict(kv_cache_dtype="bfloat16"),
    "bf16": dict(dtype="bfloat16", kv_cache_dtype="bfloat16"),
    "int8+head": dict(quantization="int8", quantize_embed=True),
    "int4+head": dict(quantization="int4", quantize_embed=True),
    "gptq+head": dict(quantization="gptq", quantize_embed=True),
    "int8+head+bf16": dict(quantization="int8", quantize_embed=True, dtype="bfloat16", kv_cache_dtype="bfloat16"),
}
DEFAULT_CONFIGS = ["fp32", "int8", "int4", "gptq", "kv-int8", "int8+head"]


def greedy_agreement(ref: list, got: list) -> dict:
    """`ref`, `got`: lists of token-id lists (same prompts). Prefix and position agreement in [0, 1]."""
    prefix, pos, n = [], 0, 0
    for a, b in zip(ref, got):
        k = 0
        while k < min(len(a), len(b)) and a[k] == b[k]:
            k += 1
        prefix.append(k / max(len(a), 1))
        pos += sum(int(x == y) for x, y in zip(a, b))
        n += len(a)
    return {"prefix": float(np.mean(prefix)), "position": pos / max(n, 1)}


def evaluate(model: str, configs: list, *, prompts: int = 32, new_tokens: int = 64, ppl_seqs: int = 16,
             ppl_len: int = 512, seed: int = 0, engine_kw: dict | None = None, random_weights: bool = False,
             group_size: int | None = None, log=print, on_row=None) -> dict:
    """Run every config; returns {"rows": [...], "setup": {...}}. The first config is the agreement reference."""
    import jax

    from jaxserve import LLM, SamplingParams
    from jaxserve.weights.calibrate import perplexity, split_topics, token_windows, topic_text
    from jaxserve.weights.quantize import describe, resident_nbytes

    calib_topics, held_topics = split_topics(seed)
    engine_kw = dict(engine_kw or {})
    rows, ref_tokens, held, prompt_ids = [], None, None, None
    for name in configs:
        kw = dict(CONFIGS[name])
        if group_size is not None and "quantization" in kw and kw["quantization"] != "int8":
            kw["quant_group_size"] = group_size
        t0 = time.perf_counter()
        try:
            llm = LLM(model, random_weights=random_weights, seed=seed, **engine_kw, **kw)
        except Exception as e:  # report and go on with the other configs
            log(f"{name}: FAILED to build ({type(e).__name__}: {e})")
            rows.append({"config": name, "llm_kwargs": kw, "error": f"{type(e).__name__}: {e}"})
            continue
        t_load = time.perf_counter() - t0
        if held is None:
            texts = topic_text(held_topics)
            held = token_windows(llm.tokenizer, texts, ppl_seqs, ppl_len)
            windows = token_windows(llm.tokenizer, texts[::-1], prompts, 32)
            prompt_ids = [list(map(int, w)) for w in windows]
        params = llm.engine.runner.params
        t1 = time.perf_counter()
        ppl = perplexity(llm.model_config, params, held, kv_dtype=llm.engine_config.kv_cache_dtype)
        t_ppl = time.perf_counter() - t1
        sp = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
        t2 = time.perf_counter()
        outs = llm.generate(prompt_ids, sp, use_tqdm=False)
        t_gen = time.perf_counter() - t2
        toks = [list(o.outputs[0].token_ids) for o in outs]
        if ref_tokens is None:
            ref_tokens = toks
        agree = greedy_agreement(ref_tokens, toks)
        d = describe(params)
        row = {"config": name, "llm_kwargs": kw, "quantized": d, "perplexity": ppl,
               "agreement_prefix": agree["prefix"], "agreement_position": agree["position"],
               "resident_weight_bytes": resident_nbytes(params),
               "resident_layer_weight_bytes": resident_nbytes(params["layers"]),
               "kv_bytes_per_token": llm.model_config.kv_bytes_per_token(llm.engine_config.kv_cache_dtype),
               "seconds": {"load_quantize_compile": t_load, "perplexity": t_ppl, "generate": t_gen}}
        rows.append(row)
        if on_row is not None:
            on_row(rows)
        log(f"{name}: ppl {ppl:.3f}  agreement prefix {agree['prefix']:.3f} position {agree['position']:.3f}  "
            f"weights {row['resident_weight_bytes'] / 2**20:.1f} MiB  ({t_load:.0f} s load, {t_ppl:.0f} s ppl, "
            f"{t_gen:.0f} s generate)")
        del llm, params
        gc.collect()
        jax.clear_caches()
    setup = {"model": model, "seed": seed, "calibration_topics": len(calib_topics), "heldout_topics": len(held_topics),
             "ppl_tokens": int(held.shape[0] * (held.shape[1] - 1)), "ppl_seqs": int(held.shape[0]),
             "ppl_len": int(held.shape[1]), "prompts": len(prompt_ids), "new_tokens": new_tokens,
             "engine_kwargs": engine_kw}
    return {"rows": rows, "setup": setup}


def markdown(result: dict) -> str:
    base = result["rows"][0]
    lines = ["| config | weights resident | perplexity (held-out) | vs " + base["config"] +
             " | greedy agreement, prefix | position | KV bytes / token |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['config']} | failed: {r['error']} | | | | | |")
            continue
        rel = 100 * (r["perplexity"] / base["perplexity"] - 1)
        lines.append(f"| {r['config']} | {r['resident_weight_bytes'] / 2**20:,.1f} MiB "
                     f"(layers {r['resident_layer_weight_bytes'] / 2**20:,.1f} MiB) | {r['perplexity']:.3f} | "
                     f"{rel:+.2f}% | {r['agreement_prefix']:.3f} | {r['agreement_position']:.3f} | "
                     f"{r['kv_bytes_per_token']:,.0f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, choices=list(CONFIGS))
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--ppl-seqs", type=int, default=16)
    ap.add_argument("--ppl-len", type=int, default=512)
    ap.add_argument("--group-size", type=int, default=None, help="int4 / gptq group size (default: EngineConfig's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench_results", "quality.json"))
    a = ap.parse_args(argv)
    engine_kw = dict(max_model_len=1024, max_num_seqs=32, num_pages=2048, max_num_batched_tokens=128)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)

    def partial(rows):  # a long run keeps what it has measured so far
        with open(a.out + ".partial", "w") as f:
            json.dump({"rows": rows}, f, indent=1)

    res = evaluate(a.model, a.configs, prompts=a.prompts, new_tokens=a.new_tokens, ppl_seqs=a.ppl_seqs,
                   ppl_len=a.ppl_len, seed=a.seed, engine_kw=engine_kw, group_size=a.group_size, on_row=partial)
    res["command"] = "python " + " ".join([os.path.relpath(__file__, ROOT)] + (argv if argv is not None else sys.argv[1:]))
    res["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count()}
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    print(markdown(res))
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
