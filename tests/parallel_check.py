"""Compare a mesh layout's greedy tokens with the single-device engine (run by tests/test_parallel.py,
test_pallas_mesh.py and test_multihost.py).

    python tests/parallel_check.py --model tiny-llama --devices 8 --mesh model=2 --mesh stage=2
    python tests/parallel_check.py --model gemma3-270m --devices 8 --mesh model=4 --max-tokens 6

Runs in a fresh process because the device count (`--devices`, XLA's forced host platform device count) must
be set before JAX is imported. Prints one JSON object (last line of stdout): per layout the tokens, whether they
equal the single-device tokens, the largest |logprob difference| of the generated tokens, and for tensor-parallel
layouts the collectives of the decode program's HLO and any all-gather whose result has a weight's shape.

Multi-host: `--coordinator-address H:P --num-processes N --process-id I` joins jax.distributed first (each
process then runs the same layouts over the global devices; only process 0 prints).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Small programs: 2 decode buckets and 1 prefill bucket per engine keep compiles short on a 2-core machine.
SMALL_KW = dict(page_size=4, max_model_len=128, max_num_seqs=2, max_num_batched_tokens=16, max_prefill_seqs=1,
                min_prefill_tokens=16, num_pages=96, attn_block_pages=4)
DEFAULT_PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], list(range(20, 45)), [99, 98, 97, 96]]
GEMMA_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at"]
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def _runners(llm) -> list:
    """The runner of each engine replica."""
    from jaxserve.parallel.engine import DataParallelEngine

    return llm.engine.runners if isinstance(llm.engine, DataParallelEngine) else [llm.engine.runner]


def hlo_report(llm) -> dict:
    """Collectives of the (R=max, Q=1) decode program, and all-gathers whose result is a whole weight."""
    from jaxserve.parallel.placement import full_matrix_shapes

    r0 = _runners(llm)[0]
    if r0.ragged:  # a one-device replica runs ragged steps (models/ragged.py): its largest decode-sized program
        bucket = (r0.cfg.max_num_seqs, min(t for t in r0.ragged_ladder() if t >= r0.cfg.max_num_seqs))
        txt = r0.ragged_programs[bucket[1]].as_text()
    else:
        bucket = max(b for b in r0.compiled_buckets() if b[1] == 1)
        txt = r0.programs[bucket].as_text()
    found = {c: len(re.findall(rf"= [^\n]*? {c}(?:-start)?\(", txt)) for c in COLLECTIVES}
    weights = full_matrix_shapes(r0.params)
    bad = []
    for m in re.finditer(r"= (\w+)\[([\d,]*)\][^\n]*? all-gather(?:-start)?\(", txt):
        shape = tuple(int(d) for d in m.group(2).split(",") if d)
        if shape in weights:
            bad.append(m.group(0)[:160])
    reduced = sorted({tuple(int(d) for d in m.group(1).split(",") if d)
                      for m in re.finditer(r"= f32\[([\d,]*)\][^\n]*? all-reduce(?:-start)?\(", txt)})
    # Pallas kernels by name (interpret mode on CPU inlines them as HLO loops whose op names keep the name)
    kernels = sorted(set(re.findall(r"jaxserve_(?:paged_decode|ragged_prefill|qmm_int\d)_(?:tpu|gpu)", txt)))
    return {"bucket": list(bucket), "collectives": found, "weight_gathers": bad,
            "all_reduce_shapes": [list(s) for s in reduced], "hidden_size": llm.model_config.hidden_size,
            "pallas_kernels": kernels}


def run_layouts(model: str, meshes: list, prompts, max_tokens: int, kw: dict, hlo: bool = True,
                checkpoint_dir=None, speculative=None, layout_kw=None) -> dict:
    """`kw`: engine settings of every engine; `layout_kw`: more settings for the mesh layouts only (e.g. the
    Pallas kernels on the mesh against the single-device XLA path)."""
    from jaxserve import LLM, SamplingParams

    # Different lengths, more prompts than decode rows (max_num_seqs=2): requests finish at different steps and
    # waiting ones join a running batch (continuous batching), a long prompt is prefilled in chunks.
    sp = [SamplingParams(temperature=0.0, max_tokens=max(1, max_tokens - 2 * (i % 3)), logprobs=1, ignore_eos=True)
          for i in range(len(prompts))]
    random_weights = model.startswith("tiny-")

    def gen(llm):
        outs = llm.generate(prompts, sp)
        toks = [list(o.outputs[0].token_ids) for o in outs]
        lps = [[float(d[t]["logprob"] if isinstance(d[t], dict) else getattr(d[t], "logprob", d[t]))
                for d, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)] for o in outs]
        return toks, lps

    result = {"model": model, "prompts": prompts if isinstance(prompts[0], str) else len(prompts), "layouts": {}}
    t = time.monotonic()
    if meshes and meshes[0] == "single":
        meshes = meshes[1:]
    if speculative is not None:
        kw = dict(kw, speculative=speculative)
    ref = LLM(model, random_weights=random_weights, **kw)
    ref_toks, ref_lps = gen(ref)
    result["single"] = {"tokens": ref_toks, "seconds": round(time.monotonic() - t, 1)}
    del ref
    for spec in meshes:
        t = time.monotonic()
        src = model
        if checkpoint_dir and "->" in spec:  # "A->B": save sharded from mesh A, restore into mesh B
            a, b = spec.split("->")
            llm_a = LLM(model, random_weights=random_weights, mesh=a, **kw)
            from jaxserve.parallel.checkpoint import save_sharded

            save_sharded(checkpoint_dir, llm_a.model_config, llm_a.engine.runner.params, llm_a.tokenizer,
                         source=f"{model} saved from mesh {a}")
            del llm_a
            src, mesh = checkpoint_dir, b
        else:
            mesh = spec
        llm = LLM(src, mesh=mesh, random_weights=random_weights and src == model, **{**kw, **(layout_kw or {})})
        toks, lps = gen(llm)
        diff = max((abs(a - b) for ra, rb in zip(lps, ref_lps) for a, b in zip(ra, rb)), default=0.0)
        entry = {"tokens": toks, "equal": toks == ref_toks, "max_abs_logprob_diff": diff,
                 "seconds": round(time.monotonic() - t, 1)}
        busy = llm.get_metrics().get("pipeline_stage_busy")
        if busy is not None:  # a pipeline: how its decode ran (rotating groups or GPipe) and its stages' work
            entry["rotation"] = _runners(llm)[0].rotation_stages
            entry["stage_busy"] = round(busy, 3)
        if speculative is not None:
            m = llm.get_metrics()
            entry["spec"] = {k: m.get(k) for k in ("spec_draft_tokens", "spec_accepted_tokens", "spec_verify_steps")}
        if hlo:
            entry["hlo"] = hlo_report(llm)
        p0 = jax_params_sharding(llm)
        if p0:
            entry["wq_sharding"] = p0
        result["layouts"][spec] = entry
        print(f"[check] {spec}: {json.dumps(entry)[:600]}", file=sys.stderr, flush=True)
        del llm
    return result


def jax_params_sharding(llm):
    r0 = _runners(llm)[0]
    try:
        wq = r0.params["layers"]["wq"]
        return str(getattr(wq, "w_q", wq).sharding.spec)  # a quantized weight: its value array
    except Exception:
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--devices", type=int, default=8, help="forced host-platform CPU devices")
    ap.add_argument("--mesh", action="append", default=[], help="a layout (repeatable); A->B = save/restore")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--prompts", default=None, help="JSON list of prompts (strings or token-id lists)")
    ap.add_argument("--checkpoint-dir", default=None)
    ap.add_argument("--no-hlo", action="store_true")
    ap.add_argument("--coordinator-address", default=None)
    ap.add_argument("--num-processes", type=int, default=None)
    ap.add_argument("--process-id", type=int, default=None)
    ap.add_argument("--engine-kw", default=None, help="JSON dict overriding the small engine settings")
    ap.add_argument("--layout-kw", default=None, help="JSON dict of settings for the mesh layouts only")
    ap.add_argument("--speculative", default=None, help="JSON speculative config for every engine (ngram)")
    args = ap.parse_args(argv)

    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.devices}".strip()
    os.environ.setdefault("JAXSERVE_XLA_CACHE", "0")
    if "jax" in sys.modules:
        print("warning: jax was imported before the device count was set", file=sys.stderr)
    from jaxserve.parallel.distributed import initialize

    initialize(args.coordinator_address, args.num_processes, args.process_id)
    import jax

    kw = dict(SMALL_KW)
    try:  # a sequence holds pages in each of the model's KV page groups (sliding-window reclaim): scale the pool
        from jaxserve.config import load_model_config

        kw["num_pages"] *= load_model_config(args.model).kv_layout().num_groups
    except Exception:  # (a converted checkpoint's directory: its own small pool is enough for its 4 tokens)
        pass
    if args.engine_kw:
        kw.update(json.loads(args.engine_kw))
    if args.prompts:
        prompts = json.loads(args.prompts)
    else:
        prompts = GEMMA_PROMPTS if not args.model.startswith("tiny-") else DEFAULT_PROMPTS
    res = run_layouts(args.model, args.mesh, prompts, args.max_tokens, kw, hlo=not args.no_hlo,
                      checkpoint_dir=args.checkpoint_dir,
                      speculative=json.loads(args.speculative) if args.speculative else None,
                      layout_kw=json.loads(args.layout_kw) if args.layout_kw else None)
    res["devices"] = jax.device_count()
    res["processes"] = jax.process_count()
    if jax.process_index() == 0:
        print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
