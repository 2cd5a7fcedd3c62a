"""The Pallas kernels on a mesh: attention (decode + ragged prefill) and quantized matmuls under shard_map.

On TPU / GPU the engine runs its attention and int8 / int4 matmuls through Mosaic / Triton custom calls, which
GSPMD cannot partition; pallas_kernels/engine.py wraps each call in `jax.shard_map` over the replica's mesh
(query / KV heads, output columns or K rows split as jaxserve/parallel/rules.py splits the operands). Checked
here on 8 forced CPU devices (subprocesses: the device count must be set before JAX starts):

* the kernels interpreted on CPU (`attention_impl="pallas"`, `matmul_impl="pallas"`) on model=2 and
  stage=2 x model=2 give the same greedy tokens as the single-device XLA path (tiny models, and Gemma 3 270M
  in a slow test), and the step programs contain the kernels (by name) and no all-gather of a whole weight;
* the whole sharded step (forward + sampling, with the mesh, the kernels and quantized weights) exports with
  `jax.export` for `tpu` and `cuda`, and the module holds the kernels' custom calls (tests/mesh_export.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.test_parallel import KV_INT8_LOGPROB_TOL, LOGPROB_TOL, run_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PALLAS = {"attention_impl": "pallas", "matmul_impl": "pallas"}
MESHES = ("model=2", "stage=2,model=2")
MARK = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}


def _mesh_args(meshes):
    return sum((["--mesh", m] for m in meshes), [])


def assert_pallas_layouts(res, meshes, kernels, tol=LOGPROB_TOL):
    single = res["single"]["tokens"]
    assert res["devices"] == 8 and all(len(t) > 0 for t in single)
    for spec in meshes:
        e = res["layouts"][spec]
        assert e["tokens"] == single, f"{spec}: Pallas-on-mesh tokens differ from the single-device XLA path"
        assert e["max_abs_logprob_diff"] < tol, (spec, e["max_abs_logprob_diff"])
        hlo = e["hlo"]
        assert set(kernels) <= set(hlo["pallas_kernels"]), (spec, hlo["pallas_kernels"])
        assert hlo["weight_gathers"] == [], f"{spec}: a whole weight is all-gathered: {hlo['weight_gathers']}"
        assert hlo["collectives"]["all-reduce"] > 0, (spec, hlo["collectives"])


def test_pallas_int8_on_meshes_matches_single_device_xla():
    """tiny-llama (4 query / 2 KV heads: both split over model=2), int8 weights: attention + every linear layer
    through the kernels, on a tensor-parallel and a pipeline x tensor-parallel mesh."""
    res = run_check("--model", "tiny-llama", "--max-tokens", "8", *_mesh_args(MESHES),
                    "--engine-kw", json.dumps({"quantization": "int8"}), "--layout-kw", json.dumps(PALLAS))
    assert_pallas_layouts(res, MESHES, ["jaxserve_paged_decode_tpu", "jaxserve_qmm_int8_tpu"])


def test_pallas_int4_and_quantized_head_on_meshes():
    """tiny-gemma3 (1 KV head: queries split, KV replicated; sliding window) with int4 weights (row-parallel
    wo / w_down: each device's packed rows are two runs of K) and the quantized tied LM head (vocab-parallel),
    an int8 KV cache (the kernels' k/v scales sharded like the pages)."""
    kw = {"quantization": "int4", "quant_group_size": 16, "quantize_embed": True, "kv_cache_dtype": "int8"}
    res = run_check("--model", "tiny-gemma3", "--max-tokens", "8", *_mesh_args(MESHES),
                    "--engine-kw", json.dumps(kw), "--layout-kw", json.dumps(PALLAS))

    assert_pallas_layouts(res, MESHES, ["jaxserve_paged_decode_tpu", "jaxserve_qmm_int4_tpu"], KV_INT8_LOGPROB_TOL)


def test_pallas_float_attention_on_model4():
    """Float weights (the kernels for attention only) with more devices than KV heads (tiny-llama: 2 KV heads,
    model=4, so the KV cache is replicated and the attention runs replicated under shard_map)."""
    res = run_check("--model", "tiny-llama", "--max-tokens", "8", "--mesh", "model=4",
                    "--layout-kw", json.dumps({"attention_impl": "pallas"}))
    assert_pallas_layouts(res, ("model=4",), ["jaxserve_paged_decode_tpu"])


@pytest.mark.slow
def test_gemma3_270m_pallas_on_meshes_matches_xla():
    """The real model, int8 weights: Pallas attention + matmuls interpreted on model=2 and stage=2 x model=2
    give the single-device XLA path's greedy tokens (measured: logprobs within 8e-6; ~4 min here)."""
    res = run_check("--model", "gemma3-270m", "--max-tokens", "6", *_mesh_args(MESHES),
                    "--engine-kw", json.dumps({"quantization": "int8"}), "--layout-kw", json.dumps(PALLAS),
                    timeout=3600)
    assert_pallas_layouts(res, MESHES, ["jaxserve_paged_decode_tpu", "jaxserve_qmm_int8_tpu"])


def run_export(*args) -> dict:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    p = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "mesh_export.py"), *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("mesh,quant,kv", [("model=2", "int8", "int8"), ("stage=2,model=2", "int4", "bfloat16")])
def test_whole_sharded_step_exports(platform, mesh, quant, kv):
    """jax.export of the engine's complete decode and prefill step on a mesh (and a pipeline's rotating decode
    call), for the accelerator: the kernels' custom calls are in the module (attention: paged decode / ragged prefill; the quantized matmuls), none of the
    other platform's, lowered for the mesh's device count."""
    res = run_export("--platform", platform, "--mesh", mesh, "--quant", quant, "--kv", kv)
    fam = "tpu" if platform == "tpu" else "gpu"
    n = 2 if mesh == "model=2" else 4
    decode = [b for b in res["buckets"] if b.endswith("x1")]
    prefill = [b for b in res["buckets"] if not b.endswith("x1")]
    assert decode and prefill, res
    assert any(b.startswith("rotate") for b in decode) == ("stage=" in mesh), res  # the pipeline's decode call
    for b, e in res["buckets"].items():
        assert MARK[platform] in e["custom_call_targets"], (b, e)
        assert e["other_platform_kernels"] == 0 and e["nr_devices"] == n, (b, e)
        assert e["shard_map_bodies"] > 0, (b, e)
        attn = f"jaxserve_paged_decode_{fam}" if b in decode else f"jaxserve_ragged_prefill_{fam}"
        assert {attn, f"jaxserve_qmm_{quant}_{fam}"} <= set(e["kernels"]), (b, e)
