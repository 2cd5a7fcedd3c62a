"""Building a sharded engine from a mesh spec, and the data-parallel front (one engine per `data` replica).

`LLM(model, mesh={"data": d, "stage": p, "model": t})` lands here:

1. the mesh spec is checked against `jax.devices()` and the model (jaxserve errors on a bad one);
2. the mesh is cut into `d` disjoint (stage, model) sub-meshes, one per replica;
3. weights go straight into each replica's shardings: a converted (orbax) float directory is restored shard by
   shard (`parallel/checkpoint.py`, no full host copy); other sources, and quantized serving (int8 / int4 /
   GPTQ weights, quantized on the host first), are loaded on the host once and each device receives its slices;
4. each replica is a normal `LLMEngine` (its own scheduler, block manager and KV cache) whose runner has a
   `Placement`; with `d > 1` a `DataParallelEngine` routes requests to them.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import time
from typing import Optional

from jaxserve.config import EngineConfig
from jaxserve.errors import InvalidConfigError, InvalidPromptError
from jaxserve.weights.checkpoint import QUANT_FILE

log = logging.getLogger("jaxserve")


def build_parallel_engine(model: str, mesh_spec, engine_cfg: EngineConfig, *, random_weights: bool = False,
                          tokenizer=None, devices=None, speculative=None, given=None):
    """-> (engine, model_config, tokenizer, seconds spent loading weights). `speculative`: n-gram speculation
    (a SpeculativeConfig or dict) on a single tensor-parallel replica (no `stage` or `data` axis). `given`: the
    EngineConfig fields the user set; the others may take the device's defaults (planner.engine_defaults)."""
    import jax

    from jaxserve.engine.engine import LLMEngine
    from jaxserve.engine.runner import ModelRunner
    from jaxserve.speculative import speculator_factory
    from jaxserve.parallel.mesh import check_model_fits_mesh, make_mesh, replica_meshes, resolve_mesh_spec
    from jaxserve.parallel.placement import Placement
    from jaxserve.weights.checkpoint import is_converted

    t0 = time.monotonic()
    devices = list(jax.devices() if devices is None else devices)
    auto = isinstance(mesh_spec, str) and mesh_spec.strip().lower() == "auto"
    if not auto:
        from jaxserve.parallel.mesh import parse_mesh_spec

        _check_speculative_mesh(speculative, parse_mesh_spec(mesh_spec))
        spec = resolve_mesh_spec(mesh_spec, len(devices))  # a bad mesh fails before any weights load
    quantization = engine_cfg.quantization
    # A converted float checkpoint is restored by orbax straight into the mesh's shardings. Quantized serving
    # (quantization=..., or a checkpoint converted with --quant) goes through the host copy instead: quantize
    # (or calibrate) there, then place shard by shard like any host params.
    sharded_restore = (is_converted(model) and not random_weights and quantization is None
                       and not os.path.exists(os.path.join(model, QUANT_FILE)))
    if sharded_restore:
        from jaxserve.parallel.checkpoint import load_config_and_tokenizer

        model_cfg, tok = load_config_and_tokenizer(model)
        host_params = None
    else:
        from jaxserve.weights.resolve import resolve_model

        resolved = resolve_model(model, random_weights=random_weights, seed=engine_cfg.seed)
        model_cfg, tok = resolved.config, resolved.tokenizer
        host_params = resolved.load_params()
    engine_cfg.validate(model_cfg)
    if auto:
        from jaxserve.parallel.mesh import default_mesh_spec

        spec = resolve_mesh_spec(default_mesh_spec(model_cfg, devices), len(devices))
        _check_speculative_mesh(speculative, spec)  # (an explicit mesh was checked before loading)
    check_model_fits_mesh(model_cfg, spec)
    if given is not None:
        from jaxserve.planner import engine_defaults

        defaults = engine_defaults(model_cfg, engine_cfg, devices[0], spec["model"] * spec["stage"], given)
        if defaults:
            engine_cfg = dataclasses.replace(engine_cfg, **defaults)
            engine_cfg.validate(model_cfg)
    tokenizer = tokenizer or tok
    if quantization is not None and host_params is not None:  # docs/quantization.md
        from jaxserve.weights.calibrate import quantize_for_engine

        host_params = quantize_for_engine(host_params, model_cfg, engine_cfg, tokenizer)
    mesh = make_mesh(spec, devices)
    num_pages = engine_cfg.num_pages
    if num_pages is None:
        from jaxserve.planner import default_kv_budget_bytes, kv_pages_for_budget

        # per replica: its own devices' share on an accelerator, the host's RAM split over replicas on CPU
        budget = (engine_cfg.kv_cache_bytes // spec["data"] if engine_cfg.kv_cache_bytes else default_kv_budget_bytes(
            model_cfg, engine_cfg, devices[0], num_devices=spec["model"] * spec["stage"], replicas=spec["data"]))
        num_pages = kv_pages_for_budget(model_cfg, engine_cfg, budget)
    engines = []
    for rmesh in replica_meshes(mesh):
        placement = Placement(model_cfg, rmesh)
        if sharded_restore:
            from jaxserve.parallel.checkpoint import restore_sharded

            params = restore_sharded(model, model_cfg, placement, engine_cfg.dtype)
        else:
            params = host_params
        runner = ModelRunner(model_cfg, engine_cfg, params, num_pages, placement=placement)
        engines.append(LLMEngine(model_cfg, engine_cfg, None, tokenizer, num_pages=num_pages, runner=runner,
                                 speculator=speculator_factory(speculative)))
        del params
    del host_params
    load_seconds = time.monotonic() - t0
    if len(engines) == 1:
        return engines[0], model_cfg, tokenizer, load_seconds
    return DataParallelEngine(engines), model_cfg, tokenizer, load_seconds


def _check_speculative_mesh(speculative, spec: dict) -> None:
    if speculative is not None and (spec["data"] != 1 or spec["stage"] != 1):
        raise InvalidConfigError(f"speculative decoding on a mesh needs a single tensor-parallel replica "
                                 f"(data=1, stage=1); got {spec}")


class _Runners:
    """`engine.runner` of a data-parallel front: compiles and reports every replica's programs."""

    def __init__(self, engines):
        self.runners = [e.runner for e in engines]

    def compile_all(self, progress=None) -> float:
        return sum(r.compile_all(progress) for r in self.runners)

    def compiled_buckets(self) -> list:
        return self.runners[0].compiled_buckets()

    @property
    def placement(self):
        return self.runners[0].placement


class _SummedStats:
    def __init__(self, engines):
        self._engines = engines

    def __getattr__(self, name):
        vals = [getattr(e.stats, name) for e in self._engines]
        if isinstance(vals[0], (int, float)):
            return sum(vals)
        if isinstance(vals[0], dict):
            return {k: sum(v[k] for v in vals) for k in vals[0]}
        return [x for v in vals for x in v]


class DataParallelEngine:
    """Data-parallel replicas behind one front: a request goes to the replica with the fewest unfinished
    requests (ties: the lowest index), keeps its request id, and is stepped there; `step()` steps every replica
    that has work and returns all their outputs. Each replica has its own scheduler, pages and prefix cache.

    The replicas are stepped one after the other from this thread; their programs run on disjoint devices.
    """

    def __init__(self, engines: list):
        self.replicas = engines
        self.model_cfg = engines[0].model_cfg
        self.cfg = engines[0].cfg
        self.tokenizer = engines[0].tokenizer
        self.max_model_len = engines[0].max_model_len
        self.num_pages = engines[0].num_pages
        self.runner = _Runners(engines)
        self.speculator = None  # speculative decoding is per replica engine; not wired through the front
        self.stats = _SummedStats(engines)
        self._where: dict = {}  # request id -> replica index
        self._ids = itertools.count()

    def tokenize_prompt(self, prompt):
        return self.replicas[0].tokenize_prompt(prompt)

    def route(self) -> int:
        loads = [len(e.requests) for e in self.replicas]
        return loads.index(min(loads))

    def add_request(self, prompt, params=None, request_id: Optional[str] = None, priority="interactive") -> str:
        if request_id is None:
            request_id = f"req-{next(self._ids)}"
        if request_id in self._where:
            raise InvalidPromptError(f"request_id {request_id!r} is already in use")
        i = self.route()
        rid = self.replicas[i].add_request(prompt, params, request_id=request_id, priority=priority)
        self._where[rid] = i
        return rid

    def abort_request(self, request_id: str) -> bool:
        i = self._where.pop(request_id, None)
        return False if i is None else self.replicas[i].abort_request(request_id)

    def has_unfinished_requests(self) -> bool:
        return any(e.has_unfinished_requests() for e in self.replicas)

    def step(self) -> list:
        outs = []
        for e in self.replicas:
            if e.has_unfinished_requests():
                outs.extend(e.step())
        for ro in outs:
            if ro.finished:
                self._where.pop(ro.request_id, None)
        return outs

    def metrics(self) -> dict:
        """The engine metrics over all replicas: counters summed, KV usage and latency percentiles recomputed
        over the pooled figures; each replica's own dict under "replicas"."""
        from jaxserve.engine.engine import _percentiles

        per = [e.metrics() for e in self.replicas]
        out = {}
        for k, v in per[0].items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):  # ratios and percentiles: replaced below
                out[k] = sum(m[k] for m in per)
        total = sum(m["kv_pages_total"] for m in per)
        out["kv_usage"] = sum(m["kv_pages_used"] or 0 for m in per) / total if total else 0.0
        rates = [m["prefix_hit_rate"] for m in per if m.get("prefix_hit_rate") is not None]
        out["prefix_hit_rate"] = sum(rates) / len(rates) if rates else None
        out.update(_percentiles("ttft_s", [x for e in self.replicas for x in e.stats.ttfts]))
        out.update(_percentiles("tpot_s", [x for e in self.replicas for x in e.stats.tpots]))
        out["replicas"] = per
        return out
