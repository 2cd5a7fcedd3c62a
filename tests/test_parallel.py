"""Tensor, pipeline and data parallelism (jaxserve/parallel/).

Layouts run in subprocesses (`python tests/parallel_check.py`) with 8 forced host CPU devices: the device
count must be set before JAX is imported, and this pytest process may already have imported it. Each layout's
greedy tokens must equal the single-device engine's; sharded matmuls sum in another order, so logprobs may
differ in the last bits (asserted below LOGPROB_TOL and reported by the check tool).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxserve.config import PRESETS
from jaxserve.errors import InvalidConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOGPROB_TOL = 1e-3  # measured: <= 2e-6 (tiny models), see the README, "Running on many devices"
# With an int8 KV cache, a K/V value whose float input differs in the last bits between layouts can round to the
# neighbouring int8 level (1/127 of its row's absmax): measured 6.8e-3 on Gemma 3 270M, 2e-6 on tiny models; on
# a later machine of the same kind (AMX-BF16 CPU) 3.9e-2 for Gemma 3 270M at model=2, same greedy tokens.
KV_INT8_LOGPROB_TOL = 5e-2


def run_check(*args, timeout=1500) -> dict:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    # JAXSERVE_XLA_CACHE as this process has it: off (tests/conftest.py), or the CI runner's shared cache, where
    # each check's single-device reference and the layouts other checks built load instead of compiling
    cmd = [sys.executable, os.path.join(ROOT, "tests", "parallel_check.py"), *args]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{cmd} failed:\n{p.stderr[-4000:]}"
    return json.loads(p.stdout.strip().splitlines()[-1])


def assert_layouts(res: dict, tensor_parallel: tuple = (), tol: float = LOGPROB_TOL):
    assert res["devices"] == 8
    R = 2  # rows of the largest decode bucket (parallel_check.py: SMALL_KW max_num_seqs); pipeline micro-batches fewer
    single = res["single"]["tokens"]
    assert all(len(t) > 0 for t in single)
    for spec, e in res["layouts"].items():
        assert e["tokens"] == single, f"{spec}: tokens differ from single device"
        assert e["equal"]
        assert e["max_abs_logprob_diff"] < tol, (spec, e["max_abs_logprob_diff"])
        hlo = e["hlo"]
        assert hlo["weight_gathers"] == [], f"{spec}: a whole weight matrix is all-gathered: {hlo['weight_gathers']}"
        if spec in tensor_parallel:
            # Row-parallel wo / w_down and the vocab-parallel embedding reduce partial sums of the hidden state
            # ([R, Q, D] activations; XLA may drop the decode step's Q = 1 axis: [R, D]), not weights.
            assert hlo["collectives"]["all-reduce"] > 0, (spec, hlo)
            D = hlo["hidden_size"]
            assert any(len(s) in (2, 3) and s[-1] == D and s[0] <= R for s in hlo["all_reduce_shapes"]), \
                (spec, hlo["all_reduce_shapes"])
        if "stage=" in spec and "stage=1" not in spec:
            assert hlo["collectives"]["collective-permute"] > 0, (spec, hlo)  # activations between stages
            # decode groups rotated through the stages (pipeline_decode="rotate", the default)
            assert e["rotation"] == int(spec.split("stage=")[1].split(",")[0]), (spec, e)


# ------------------------------------------------------------------------------------------ host-only checks


def test_parse_mesh_spec():
    from jaxserve.parallel.mesh import format_mesh_spec, parse_mesh_spec, resolve_mesh_spec

    assert parse_mesh_spec("data=1,stage=2,model=4") == {"data": 1, "stage": 2, "model": 4}
    assert parse_mesh_spec({"model": 2}) == {"data": 1, "stage": 1, "model": 2}
    assert parse_mesh_spec(" model = 2 , data=2") == {"data": 2, "stage": 1, "model": 2}
    assert resolve_mesh_spec({"model": 2, "data": -1}, 8) == {"data": 4, "stage": 1, "model": 2}
    assert resolve_mesh_spec("model=2", 8) == {"data": 1, "stage": 1, "model": 2}  # first 2 of 8 devices
    assert format_mesh_spec({"data": 2, "model": 4}) == "data=2,stage=1,model=4"
    for bad in ("model", "model=x", "tensor=2", "model=0", "model=2,model=2", "", "data=-1,model=-1", "model=2.5"):
        with pytest.raises(InvalidConfigError):
            parse_mesh_spec(bad)
    with pytest.raises(InvalidConfigError, match="divide"):
        resolve_mesh_spec("model=3", 8)
    with pytest.raises(InvalidConfigError, match="divide"):
        resolve_mesh_spec("data=2,model=8", 8)


def test_model_must_fit_mesh():
    from jaxserve.parallel.mesh import check_model_fits_mesh

    gemma = PRESETS["gemma3-270m"]
    for t in (1, 2, 4, 8):  # 8 > 4 heads: attention replicated, vocab and FFN split
        check_model_fits_mesh(gemma, {"model": t})
    with pytest.raises(InvalidConfigError, match="query heads"):
        check_model_fits_mesh(gemma, {"model": 3})
    with pytest.raises(InvalidConfigError, match="layers"):
        check_model_fits_mesh(gemma, {"stage": 4})  # 18 layers
    check_model_fits_mesh(gemma, {"stage": 2, "model": 2})


def test_partition_rules_by_name():
    from jax.sharding import PartitionSpec as P

    from jaxserve.parallel import rules
    from jaxserve.weights.checkpoint import expected_shapes

    def specs(name, t, stage=None):
        cfg = PRESETS[name]
        shapes = expected_shapes(cfg)
        tree = {k: (np.empty(v) if k != "layers" else {n: np.empty((0,) * len(s)) for n, s in v.items()})
                for k, v in shapes.items() if k != "embed"}
        tree["embed"] = np.empty((0, 0))
        return cfg, rules.param_specs(cfg, tree, t, stage)

    cfg, s = specs("tiny-llama", 2)  # 4 heads, 2 KV heads
    L = s["layers"]
    assert L["wq"] == P(None, None, "model") and L["wk"] == P(None, None, "model")  # column-parallel
    assert L["wo"] == P(None, "model", None) and L["w_down"] == P(None, "model", None)  # row-parallel
    assert L["w_gate"] == P(None, None, "model") and L["w_up"] == P(None, None, "model")
    assert L["attn_norm"] == P(None, None)
    assert s["embed"] == P("model", None) and s["lm_head"] == P(None, "model")  # vocab-parallel
    assert rules.kv_spec(cfg, 2) == P(None, None, "model", None)  # KV cache over KV heads

    cfg, s = specs("gemma3-270m", 4)  # 4 heads, 1 KV head: KV replicated, queries split
    L = s["layers"]
    assert L["wq"] == P(None, None, "model") and L["wo"] == P(None, "model", None)
    assert L["wk"] == P(None, None, None) and L["wv"] == P(None, None, None)
    assert rules.kv_spec(cfg, 4) == P(None, None, None, None)
    cfg, s = specs("gemma3-270m", 8)  # more devices than heads: attention replicated, MLP / vocab split
    L = s["layers"]
    assert L["wq"] == P(None, None, None) and L["wo"] == P(None, None, None)
    assert L["w_up"] == P(None, None, "model") and s["embed"] == P("model", None)
    assert "attention replicated" in rules.describe(cfg, 8)
    cfg, s = specs("gemma3-270m", 2, "stage")  # pipeline: the stacked layer axis over stages
    assert s["layers"]["wq"] == P("stage", None, "model") and s["layers"]["attn_norm"] == P("stage", None)
    assert rules.kv_spec(cfg, 2, "stage") == P("stage", None, None, None)


def test_partition_rules_for_quantized_weights():
    """int8: values like the float weight, per-column scales with N. int4: packed values like the float weight,
    group scales split with N only. The embedding quantized as the LM head's [D, V] is vocab-parallel."""
    from jax.sharding import PartitionSpec as P

    from jaxserve.parallel import rules
    from jaxserve.weights.quantize import quantize_params
    from jaxserve.weights.random_init import random_params

    import jax

    for name, head in (("tiny-llama", "lm_head"), ("tiny-gemma3", "embed")):  # untied head / tied embedding
        cfg = PRESETS[name]
        params = random_params(cfg, seed=0)
        for scheme, scale_col, scale_row in (("int8", P(None, "model"), P(None, None)),
                                             ("int4", P(None, None, "model"), P(None, None, None))):
            q = quantize_params(params, scheme, 16, quantize_embed=True)
            s = rules.param_specs(cfg, q, 2)
            L = s["layers"]
            assert L["wq"].w_q == P(None, None, "model") and L["wq"].scales == scale_col  # column-parallel
            assert L["w_down"].w_q == P(None, "model", None) and L["w_down"].scales == scale_row  # row-parallel
            assert L["attn_norm"] == P(None, None)
            assert s[head].w_q == P(None, "model")  # [D, V], vocab-parallel
            assert s[head].scales == (P("model") if scheme == "int8" else P(None, "model"))
            # The spec tree has the params' structure: shardings and placement map over both together.
            assert jax.tree.structure(q) == jax.tree.structure(s, is_leaf=lambda x: isinstance(x, P))


def test_pipeline_micro_batches():
    from jaxserve.parallel.pipeline import num_micro_batches

    assert num_micro_batches(8, 2) == 2 and num_micro_batches(8, 4) == 4
    assert num_micro_batches(1, 4) == 1 and num_micro_batches(2, 4) == 2 and num_micro_batches(6, 4) == 3


def test_cli_bad_mesh_is_a_clear_error(capsys):
    from jaxserve.cli import main

    rc = main(["generate", "--model", "tiny-llama", "--random-weights", "--prompt", "hi", "--mesh", "model=two"])
    err = capsys.readouterr().err
    assert rc == 2 and "size of 'model' must be an integer" in err
    rc = main(["generate", "--model", "tiny-llama", "--random-weights", "--prompt", "hi", "--mesh", "pipeline=2"])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown mesh axis" in err and "data, stage, model" in err


def test_distributed_settings(monkeypatch):
    from jaxserve.parallel.distributed import distributed_settings, initialize

    for k in ("JAXSERVE_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS", "JAXSERVE_NUM_PROCESSES",
              "JAX_NUM_PROCESSES", "JAXSERVE_PROCESS_ID", "JAX_PROCESS_ID"):
        monkeypatch.delenv(k, raising=False)
    assert initialize() is False  # no coordinator: single process, nothing initialised
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAXSERVE_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    assert distributed_settings() == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}
    assert distributed_settings(process_id=1)["process_id"] == 1  # flags win over the environment
    with pytest.raises(InvalidConfigError, match="process_id"):
        distributed_settings(process_id=4)
    with pytest.raises(InvalidConfigError, match="host:port"):
        distributed_settings(coordinator_address="nohost")
    monkeypatch.setenv("JAXSERVE_NUM_PROCESSES", "two")
    with pytest.raises(InvalidConfigError, match="integer"):
        distributed_settings()


# ------------------------------------------------------------------------------------------ 8 devices


def test_tiny_llama_layouts_match_single_device():
    """model=2/4 (heads split), model=8 (4 heads: attention replicated), stage=2/4, stage=2 x model=2, data=2."""
    tp = ("model=2", "model=4", "model=8", "stage=2,model=2")
    res = run_check("--model", "tiny-llama", "--max-tokens", "8", *sum((["--mesh", m] for m in
                    tp + ("stage=2", "data=2")), []))
    assert_layouts(res, tp)
    assert res["layouts"]["model=2"]["wq_sharding"] == "P(None, None, 'model')"
    assert res["layouts"]["stage=2"]["wq_sharding"] == "P('stage', None, None)"


def test_tiny_gemma3_layouts_match_single_device():
    """Gemma 3 features (1 KV head replicated under model>1, sliding windows, QK norm, tied vocab-parallel head);
    4 layers -> stage=4, and data=2 x model=2 x stage=2 uses all 8 devices."""
    tp = ("model=2", "model=4", "data=2,stage=2,model=2")
    res = run_check("--model", "tiny-gemma3", "--max-tokens", "8", *sum((["--mesh", m] for m in
                    tp + ("stage=4",)), []))
    assert_layouts(res, tp)


def test_sharded_checkpoint_restores_into_another_mesh(tmp_path):
    """Save from model=4 (orbax, shard by shard), restore straight into stage=2 x model=2: same tokens."""
    ckpt = tmp_path / "ckpt"
    res = run_check("--model", "tiny-llama", "--checkpoint-dir", str(ckpt), "--mesh", "model=4->stage=2,model=2",
                    "--no-hlo")
    e = res["layouts"]["model=4->stage=2,model=2"]
    assert e["tokens"] == res["single"]["tokens"] and e["max_abs_logprob_diff"] < LOGPROB_TOL
    assert e["wq_sharding"] == "P('stage', None, 'model')"
    # The checkpoint was written by shards: the params directory holds chunked arrays (zarr3), plus the
    # converted-checkpoint config and marker, so a single-device load works too.
    from jaxserve.weights.checkpoint import is_converted, load_converted_params, load_converted_config

    assert is_converted(str(ckpt))
    cfg = load_converted_config(str(ckpt))
    params = load_converted_params(str(ckpt), cfg)
    assert params["layers"]["wq"].shape == (cfg.num_layers, cfg.hidden_size, cfg.q_size)


def test_quantized_converted_checkpoint_on_a_mesh(tmp_path):
    """A checkpoint converted with --quant int8 serves on a mesh (loaded on the host, placed shard by shard)."""
    ckpt = tmp_path / "q8"
    p = subprocess.run([sys.executable, "-m", "jaxserve.cli", "convert", "tiny-llama", "--random-weights",
                        "--quant", "int8", "--out", str(ckpt)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    res = run_check("--model", str(ckpt), "--max-tokens", "6", "--mesh", "model=2", "--no-hlo")
    e = res["layouts"]["model=2"]
    assert e["tokens"] == res["single"]["tokens"] and e["max_abs_logprob_diff"] < LOGPROB_TOL
    assert e["wq_sharding"] == "P(None, None, 'model')"


def test_quantized_layouts_match_single_device():
    """int8 weights + int8 KV cache, and int4 (group 16) weights, on tensor- and pipeline-parallel meshes: the
    same greedy tokens as the same quantization on one device (which runs the chunked CPU matmul; the mesh runs
    the plain dequantize-and-dot per shard), no whole (packed) weight all-gathered. tiny-gemma3 adds the
    quantized tied embedding / LM head (vocab-parallel) and its single KV head (replicated int8 KV)."""
    tp = ("model=2", "stage=2,model=2")
    res = run_check("--model", "tiny-llama", "--max-tokens", "8", *sum((["--mesh", m] for m in tp), []),
                    "--engine-kw", json.dumps({"quantization": "int8", "kv_cache_dtype": "int8"}))
    assert_layouts(res, tp, KV_INT8_LOGPROB_TOL)
    assert res["layouts"]["model=2"]["wq_sharding"] == "P(None, None, 'model')"  # the int8 values' layout
    res = run_check("--model", "tiny-llama", "--max-tokens", "8", "--mesh", "model=4",
                    "--engine-kw", json.dumps({"quantization": "int4", "quant_group_size": 16}))
    assert_layouts(res, ("model=4",))
    res = run_check("--model", "tiny-gemma3", "--max-tokens", "8", "--mesh", "model=2",
                    "--engine-kw", json.dumps({"quantization": "int8", "quantize_embed": True,
                                               "kv_cache_dtype": "int8"}))
    assert_layouts(res, ("model=2",), KV_INT8_LOGPROB_TOL)


def test_bf16_kv_on_a_mesh_matches_single_device():
    """A bfloat16 KV cache on a mesh (stored as its bits on CPU: weights.quantize.Bf16KV, sharded like a float
    cache): the same greedy tokens as one device."""
    tp = ("model=2", "stage=2,model=2")
    res = run_check("--model", "tiny-llama", "--max-tokens", "8", *sum((["--mesh", m] for m in tp), []),
                    "--engine-kw", json.dumps({"kv_cache_dtype": "bfloat16"}))
    assert_layouts(res, tp, KV_INT8_LOGPROB_TOL)


SPEC_NGRAM = {"method": "ngram", "num_tokens": 3, "adaptive": False}


def test_ngram_speculation_on_a_tensor_parallel_mesh():
    """n-gram speculation with the target sharded (model=2, model=4): the verify programs run through the
    placement's shardings; same greedy tokens as single-device speculation, drafts proposed and accepted."""
    prompts = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7], [12, 13, 14, 12, 13, 14, 12, 13], list(range(20, 38)) + [20, 21, 22]]
    tp = ("model=2", "model=4")
    res = run_check("--model", "tiny-llama", "--max-tokens", "10", *sum((["--mesh", m] for m in tp), []),
                    "--speculative", json.dumps(SPEC_NGRAM), "--prompts", json.dumps(prompts))
    assert_layouts(res, tp)
    for spec in tp:
        m = res["layouts"][spec]["spec"]
        assert m["spec_verify_steps"] > 0 and m["spec_accepted_tokens"] > 0, (spec, m)


def test_speculation_on_a_mesh_rejects_what_it_cannot_run():
    from jaxserve import LLM

    with pytest.raises(InvalidConfigError, match="ngram"):
        LLM("tiny-llama", random_weights=True, mesh="model=1", speculative={"method": "self", "num_layers": 1})
    with pytest.raises(InvalidConfigError, match="single tensor-parallel replica"):
        LLM("tiny-llama", random_weights=True, mesh="stage=2", speculative=SPEC_NGRAM)


def test_data_parallel_router_spreads_requests_and_pools_metrics():
    """The front with two tiny single-device replicas (each its own KV cache and scheduler; they reuse one set
    of compiled programs): least-loaded routing, ids unique across replicas, abort reaches the right replica,
    tokens equal the single engine's, metrics pooled."""
    from tests.conftest import TINY_KW, get_llm

    from jaxserve import SamplingParams
    from jaxserve.engine.engine import LLMEngine
    from jaxserve.engine.runner import ModelRunner
    from jaxserve.parallel.engine import DataParallelEngine

    base = get_llm("tiny-llama", **TINY_KW)
    r = base.engine.runner
    engines = []
    for _ in range(2):
        rr = ModelRunner(base.model_config, base.engine_config, r.params, r.num_pages)
        rr.share_programs(r)  # same shapes and shardings: the compiled programs apply as they are
        engines.append(LLMEngine(base.model_config, base.engine_config, None, base.tokenizer, num_pages=r.num_pages,
                                 runner=rr))
    dp = DataParallelEngine(engines)
    sp = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    prompts = [[5 + i, 6, 7] for i in range(4)]
    want = [o.outputs[0].token_ids for o in base.generate(prompts, sp)]
    ids = [dp.add_request(p, sp) for p in prompts]
    assert len(set(ids)) == 4
    assert [len(e.requests) for e in engines] == [2, 2]  # least loaded, alternating
    assert dp.abort_request(ids[1]) and not dp.abort_request("nope")
    assert [len(e.requests) for e in engines] == [2, 1]  # ids[1] was on replica 1
    done = {}
    while dp.has_unfinished_requests():
        for ro in dp.step():
            if ro.finished:
                done[ro.request_id] = ro.outputs[0].token_ids
    assert {i: done[i] for i in (ids[0], ids[2], ids[3])} == {ids[0]: want[0], ids[2]: want[2], ids[3]: want[3]}
    assert set(done) == {ids[0], ids[2], ids[3]}
    m = dp.metrics()
    assert m["requests_finished"] == 3 and m["generation_tokens"] == 9 == dp.stats.generation_tokens
    assert m["kv_pages_total"] == 2 * (r.num_pages - 1) and len(m["replicas"]) == 2
    assert m["ttft_s_p50"] is not None and 0.0 <= m["kv_usage"] <= 1.0


def _two_replicas(**dp_kw):
    """Two tiny single-device replicas sharing one set of compiled programs, behind a DataParallelEngine."""
    from tests.conftest import TINY_KW, get_llm

    from jaxserve.engine.engine import LLMEngine
    from jaxserve.engine.runner import ModelRunner
    from jaxserve.parallel.engine import DataParallelEngine

    base = get_llm("tiny-llama", **TINY_KW)
    r = base.engine.runner
    engines = []
    for _ in range(2):
        rr = ModelRunner(base.model_config, base.engine_config, r.params, r.num_pages)
        rr.share_programs(r)
        engines.append(LLMEngine(base.model_config, base.engine_config, None, base.tokenizer, num_pages=r.num_pages,
                                 runner=rr))
    return base, engines, DataParallelEngine(engines, **dp_kw)


def _drain(dp) -> dict:
    done = {}
    while dp.has_unfinished_requests():
        for ro in dp.step():
            if ro.finished:
                done[ro.request_id] = ro.outputs[0].token_ids
    return done


def test_data_parallel_prefix_aware_routing_and_concurrent_steps():
    """Requests sharing a prefix of full pages go to one replica (while its load is within route_slack of the least
    loaded); a prefix already in a replica's cache draws later requests there; otherwise least loaded. Stepping
    the replicas on threads gives the single engine's tokens, and every replica step lands in the timeline."""
    from jaxserve import SamplingParams

    base, engines, dp = _two_replicas(route_slack=2)
    assert dp.concurrent
    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    shared = list(range(10, 22))  # three full pages (page_size 4)
    a = [shared + [30 + i] for i in range(3)]  # share the prefix
    b = [[40 + i, 41, 42, 43, 44] for i in range(2)]  # a full page each, no common prefix
    ids_a = [dp.add_request(p, sp) for p in a]
    assert [dp._where[i] for i in ids_a] == [0, 0, 0]  # loads 1-0, 2-0: within the slack of 2
    ids_b = [dp.add_request(p, sp) for p in b]
    assert [dp._where[i] for i in ids_b] == [1, 1]  # no shared prefix: least loaded
    over = dp.add_request(shared + [50], sp)  # loads 3 vs 2: within the slack
    assert dp._where[over] == 0
    more = [dp.add_request(shared + [51 + i], sp) for i in range(2)]  # loads 4 vs 2, then 5 vs 2
    assert [dp._where[i] for i in more] == [0, 1]  # the first within the slack, the second not (5 - 2 > 2)
    assert dp.routed_by_prefix == 4  # a[1], a[2], over, more[0] (a[0] had nothing to follow)
    prompts = a + b + [shared + [50]] + [shared + [51 + i] for i in range(2)]
    want = [o.outputs[0].token_ids for o in base.generate(prompts, sp)]
    done = _drain(dp)
    assert [done[i] for i in ids_a + ids_b + [over] + more] == want
    steps = {r for r, _, _ in dp.timeline}
    assert steps == {0, 1} and all(t1 >= t0 for _, t0, t1 in dp.timeline)
    # Now cached on replica 0 (and on replica 1 through `more[1]`): the routed-prefix memory is cleared, so
    # only the caches draw the request; replica 0 holds all three pages.
    dp._routed.clear()
    assert engines[0].bm.cached_prefix_pages(engines[0].bm.hash_pages(shared)) == 3
    again = dp.add_request(shared + [60], sp)
    assert dp._where[again] == 0
    _drain(dp)
    assert dp.metrics()["routed_by_prefix"] == 5


def test_data_parallel_step_error_waits_for_the_other_replicas():
    """A replica whose step raises: the other replica's step still completes, then the error is raised."""
    from jaxserve import SamplingParams

    _, engines, dp = _two_replicas()
    sp = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    r0, r1 = dp.add_request([5, 6, 7], sp), dp.add_request([8, 9, 10], sp)
    assert (dp._where[r0], dp._where[r1]) == (0, 1)

    def boom():
        raise RuntimeError("replica 0 failed")

    engines[0].step = boom
    with pytest.raises(RuntimeError, match="replica 0 failed"):
        dp.step()
    assert engines[1].stats.generation_tokens == 1  # its prefill step ran to the end
    dp.abort_request(r0)
    dp.abort_request(r1)
    assert not dp.has_unfinished_requests()


def test_default_mesh():
    from jaxserve.parallel.mesh import default_mesh_spec

    llama8b, gemma = PRESETS["llama3-8b"], PRESETS["gemma3-270m"]
    # One 8-chip TPU VM host / an 8-GPU box: 8-way tensor parallel for 32 heads; Gemma's 4 heads -> 4 x 2 replicas.
    assert default_mesh_spec(llama8b, 8, local_device_count=8) == {"data": 1, "stage": 1, "model": 8}
    assert default_mesh_spec(gemma, 8, local_device_count=8) == {"data": 2, "stage": 1, "model": 4}
    # A v5e-16 slice (4 hosts x 4 chips): no data axis across hosts (each process runs every step); the 32
    # heads take all 16 devices. Gemma's 4 heads leave 4 stages, which do not divide its 18 layers: an error.
    assert default_mesh_spec(llama8b, 16, local_device_count=4) == {"data": 1, "stage": 1, "model": 16}
    assert default_mesh_spec(PRESETS["llama2-70b"], 128, local_device_count=8) == {"data": 1, "stage": 2, "model": 64}
    with pytest.raises(InvalidConfigError, match="explicit mesh"):
        default_mesh_spec(gemma, 16, local_device_count=4)
    assert default_mesh_spec(gemma, 1, local_device_count=1) == {"data": 1, "stage": 1, "model": 1}



_CACHE_COPY_CHECK = """
import re, sys
from jaxserve import LLM, SamplingParams
llm = LLM("tiny-llama", random_weights=True, mesh=sys.argv[1], page_size=4, max_model_len=int(sys.argv[2]),
          attn_block_pages=16, max_num_seqs=1, max_num_batched_tokens=16, min_prefill_tokens=16, max_prefill_seqs=1,
          num_pages=256)
r = llm.engine.runner
slots = r.kv["v"].shape[1]
hlo = r.programs[(1, 1)].as_text()
# A cache-sized array (whole cache or one device's shard) made anew: copied, sliced, gathered.
made = re.findall(r"\\[\\d+," + str(slots) + r",\\d+,\\d+\\]\\{[\\d,]*\\} (?:copy|dynamic-slice|all-gather|all-to-all)\\(", hlo)
out = llm.generate([[5, 6, 7, 8, 9]], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
print(r.P, len(made), len(out[0].outputs[0].token_ids))
"""


@pytest.mark.parametrize("mesh, devices, max_model_len, width", [
    ("model=2", 2, 64, 32),   # KV heads split; 16 pages = one attention block, widened to two
    ("model=4", 4, 256, 64),  # tiny-llama's 2 KV heads replicated over 4 devices
])
def test_decode_program_on_a_mesh_does_not_copy_the_cache(mesh, devices, max_model_len, width):
    """The compiled decode program on a mesh makes no cache-sized array (no copy, slice or gather of the cache):
    - with block tables of one attention block (max_model_len <= page_size x attn_block_pages), XLA:CPU fused each
      layer's V write into the unrolled attention gather and copied the cache shard twice per layer (tiny-llama
      model=2, max_model_len 256, 2 GiB cache: 25 s for 16 tokens instead of 0.07 s): tables are now >= 2 blocks;
    - with KV heads replicated (model does not divide them), GSPMD sliced the whole cache to each device's KV head
      and gathered it back every layer (model=4: 184 s vs 0.11 s): attention now runs under shard_map on each
      device's replica (runner.replicated_kv_attention)."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    p = subprocess.run([sys.executable, "-c", _CACHE_COPY_CHECK, mesh, str(max_model_len)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    got_width, made, generated = map(int, p.stdout.strip().splitlines()[-1].split())
    assert (got_width, made, generated) == (width, 0, 6)
