"""Lower the engine's whole sharded step program for TPU or CUDA on this CPU machine (run by test_pallas_mesh.py).

    python tests/mesh_export.py --platform tpu --mesh stage=2,model=2 [--quant int8|int4] [--kv bfloat16|int8]

Builds a replica exactly as `LLM(..., mesh=...)` does (random tiny-gemma3 / tiny-llama weights placed on forced
host CPU devices), then swaps in what the runner would use on the target platform: the attention_fn for
`attention_impl="pallas"` and the quantized weights bound to `matmul_impl="pallas"` (both under shard_map), and
`jax.export`s `runner.sample_step` (forward + sampling, the KV cache donated) for every bucket kind (a decode and a
prefill bucket) with the placement's shardings, and on a pipeline the rotating decode call (`rotation_step`,
named "rotate<R>x1"). Prints one JSON line: per bucket, the custom-call targets
found in the exported module, the number of devices it was lowered for, and the sizes of the shard_map bodies.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MARK = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--platform", choices=("tpu", "cuda"), required=True)
    ap.add_argument("--model", default="tiny-gemma3")
    ap.add_argument("--mesh", default="model=2")
    ap.add_argument("--quant", default="int8", choices=("none", "int8", "int4"))
    ap.add_argument("--kv", default="bfloat16", choices=("bfloat16", "int8"))
    args = ap.parse_args(argv)
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ.setdefault("JAXSERVE_XLA_CACHE", "0")

    import dataclasses

    import jax
    import jax.numpy as jnp

    from jaxserve.config import EngineConfig
    from jaxserve.engine.runner import ModelRunner, attention_fn_for, bind_matmul_for
    from jaxserve.parallel.mesh import make_mesh, resolve_mesh_spec
    from jaxserve.models.kv_cache import Int8KV
    from jaxserve.parallel.placement import ShardedPlacement
    from jaxserve.weights.resolve import resolve_model

    res = resolve_model(args.model, random_weights=True, seed=0)
    cfg = res.config
    quant = None if args.quant == "none" else args.quant
    # bf16 weights, as on an accelerator; the CPU-side runner keeps the XLA paths (it is only used to place)
    ecfg = EngineConfig(page_size=16, max_model_len=256, max_num_seqs=4, max_num_batched_tokens=64,
                        max_prefill_seqs=2, min_prefill_tokens=32, num_pages=64, attn_block_pages=4,
                        dtype="bfloat16", kv_cache_dtype="float32", quantization=quant, quant_group_size=16,
                        attention_impl="xla", matmul_impl="xla")
    spec = resolve_mesh_spec(args.mesh, len(jax.devices()))
    mesh = make_mesh(spec)
    placement = ShardedPlacement(cfg, mesh)
    runner = ModelRunner(cfg, ecfg, res.load_params(), ecfg.num_pages, placement=placement)
    target = dataclasses.replace(ecfg, attention_impl="pallas", matmul_impl="pallas")
    runner.attention_fn = attention_fn_for(cfg, target, placement, platform=args.platform)

    def abstract(a):
        return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding)

    params = bind_matmul_for(jax.tree.map(abstract, runner.params), target, placement, platform=args.platform)
    shape = (cfg.num_layers, ecfg.num_pages * ecfg.page_size, cfg.num_kv_heads, cfg.head_dim)
    kv_sh = placement.kv_sharding
    if args.kv == "int8":
        s_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*tuple(kv_sh.spec)[:-1]))
        one = Int8KV(jax.ShapeDtypeStruct(shape, jnp.int8, sharding=kv_sh),
                     jax.ShapeDtypeStruct(shape[:-1], jnp.float32, sharding=s_sh))
    else:  # a plain bfloat16 cache (Bf16KV's bit storage is for XLA:CPU only)
        one = jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=kv_sh)
    kv = {"k": one, "v": one}
    step = placement.jit(runner.sample_step, params, kv)
    checks = [jax.export.DisabledSafetyCheck.custom_call(MARK["cuda"])] if args.platform == "cuda" else []
    out = {"platform": args.platform, "mesh": spec, "quant": args.quant, "kv": args.kv, "buckets": {}}
    buckets = [b for b in runner.buckets() if b[1] == 1][-1:] + [b for b in runner.buckets() if b[1] > 1][-1:]
    programs = [(f"{b[0]}x{b[1]}", step, runner.abstract_inputs(*b)) for b in buckets]
    if placement.p > 1:  # a pipeline's decode call with the stages on different groups (ModelRunner.rotation_step)
        R = buckets[0][0]
        carry, stacked = runner.rotation_inputs(R)
        carry = jax.ShapeDtypeStruct(carry.shape, carry.dtype, sharding=placement.stage_sharding)
        programs.append((f"rotate{R}x1", runner.rotation_step(params, kv), (carry, stacked)))
    for name, fn, args_ in programs:
        exp = jax.export.export(fn, platforms=(args.platform,), disabled_checks=checks)(params, kv, *args_)
        text = exp.mlir_module()
        if os.environ.get("MESH_EXPORT_DUMP"):
            open(os.environ["MESH_EXPORT_DUMP"] + f".{name}.mlir", "w").write(text)
        targets = sorted(set(re.findall(r"custom_call @([\w$.]+)", text)))
        out["buckets"][name] = {
            "custom_call_targets": targets,
            "kernel_calls": text.count(MARK[args.platform]),
            "kernels": sorted(set(re.findall(r"jaxserve_(?:paged_decode|ragged_prefill|qmm_int\d)_(?:tpu|gpu)", text))),
            "nr_devices": exp.nr_devices,
            "shard_map_bodies": text.count("sdy.manual_computation") + text.count("Sharding = \"{manual"),
            "other_platform_kernels": text.count(MARK["cuda" if args.platform == "tpu" else "tpu"]),
        }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
