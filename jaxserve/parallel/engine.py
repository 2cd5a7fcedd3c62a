"""`build_engine`: a model name / path and an optional mesh -> a ready engine; the data-parallel front.

`LLM(model)` and `LLM(model, mesh={"data": d, "stage": p, "model": t})` both land here, one sequence:

1. the mesh spec (none: one device, the 1 x 1 x 1 mesh) is checked against `jax.devices()` and the model
   (jaxserve errors on a bad one, before any weights load);
2. weights load: a converted (orbax) float directory on a mesh is restored shard by shard straight into each
   replica's shardings (`parallel/checkpoint.py`, no full host copy); otherwise (and for quantized serving:
   int8 / int4 / GPTQ weights, quantized on the host first) they are loaded on the host once and each device
   receives its slices;
3. the device defaults (planner.engine_defaults) and the KV page budget (planner.num_kv_pages) per replica;
4. the mesh is cut into `d` disjoint (stage, model) sub-meshes; each replica is an `LLMEngine` (its own
   scheduler, block manager and KV cache) whose runner has a `ShardedPlacement`; with `d > 1` a
   `DataParallelEngine` routes requests to them.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import time
from collections import deque
from typing import Optional

from jaxserve.config import EngineConfig
from jaxserve.engine.engine import EngineStats, LLMEngine
from jaxserve.errors import InvalidConfigError, InvalidPromptError
from jaxserve.weights.checkpoint import QUANT_FILE

log = logging.getLogger("jaxserve")


def build_engine(model: str, engine_cfg: EngineConfig, mesh=None, *, random_weights=False, tokenizer=None,
                 devices=None, speculative=None, given=None):
    """-> (engine, model_config, tokenizer, seconds spent loading weights and placing them on the devices).

    `mesh`: None (one device), a spec `{"data": d, "stage": p, "model": t}` / `"data=1,stage=2,model=4"`, or
    "auto" (`mesh.default_mesh_spec`). `speculative`: a SpeculativeConfig or dict; on a mesh of several
    devices n-gram speculation on a single tensor-parallel replica only (no `stage` or `data` axis). `given`:
    the EngineConfig fields the user set; the others may take the device's defaults (planner.engine_defaults).
    The engine (an LLMEngine, or a DataParallelEngine for d > 1) is not compiled yet: `compile_engine`.
    """
    import jax

    from jaxserve.engine.runner import ModelRunner
    from jaxserve.parallel.mesh import (check_model_fits_mesh, default_mesh_spec, make_mesh, parse_mesh_spec,
                                        replica_meshes, resolve_mesh_spec)
    from jaxserve.parallel.placement import ShardedPlacement
    from jaxserve.planner import engine_defaults, num_kv_pages
    from jaxserve.speculative import speculator_factory
    from jaxserve.weights.checkpoint import is_converted

    t0 = time.monotonic()
    if devices is None:
        # No mesh: this process's first device (in a multi-process run jax.devices()[0] may be another's).
        devices = jax.local_devices()[:1] if mesh is None else jax.devices()
    devices = list(devices)
    auto = isinstance(mesh, str) and mesh.strip().lower() == "auto"
    if not auto:
        _check_speculative_mesh(speculative, parse_mesh_spec(mesh))
        spec = resolve_mesh_spec(mesh, len(devices))  # a bad mesh fails before any weights load
    quantization = engine_cfg.quantization
    # On a mesh a converted float checkpoint is restored by orbax straight into its shardings. Quantized serving
    # (quantization=..., or a checkpoint converted with --quant), and no mesh, go through the host copy
    # instead: quantize (or calibrate) there, then place shard by shard like any host params.
    sharded_restore = (mesh is not None and is_converted(model) and not random_weights and quantization is None
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
    if auto:
        spec = resolve_mesh_spec(default_mesh_spec(model_cfg, devices), len(devices))
        _check_speculative_mesh(speculative, spec)  # (an explicit mesh was checked before loading)
    check_model_fits_mesh(model_cfg, spec)
    if spec["stage"] > 1 and engine_cfg.sliding_window_reclaim:  # stages split the cache by layer: no page groups
        engine_cfg = dataclasses.replace(engine_cfg, sliding_window_reclaim=False)
    group = spec["model"] * spec["stage"]  # the devices of one replica
    if given is not None:
        defaults = engine_defaults(model_cfg, engine_cfg, devices[0], group, given)
        if defaults:
            engine_cfg = dataclasses.replace(engine_cfg, **defaults)
    engine_cfg.validate(model_cfg)
    tokenizer = tokenizer or tok
    if quantization is not None and host_params is not None:  # docs/quantization.md
        from jaxserve.weights.calibrate import quantize_for_engine

        host_params = quantize_for_engine(host_params, model_cfg, engine_cfg, tokenizer)
    # per replica: its own devices' share on an accelerator, the host's RAM split over replicas on CPU
    num_pages = num_kv_pages(model_cfg, engine_cfg, devices[0], num_devices=group, replicas=spec["data"])
    engines = []
    for rmesh in replica_meshes(make_mesh(spec, devices)):
        placement = ShardedPlacement(model_cfg, rmesh)
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


def compile_engine(engine, progress=None) -> float:
    """Compile an engine's programs ahead of time (its runner's buckets, then its speculator's: verify programs,
    a draft model's, measured step costs), or every replica's for a DataParallelEngine. Returns seconds."""
    if isinstance(engine, DataParallelEngine):
        return engine.compile_all(progress)
    seconds = engine.runner.compile_all(progress)
    if engine.speculator is not None:
        seconds += engine.speculator.compile_all()
    return seconds


def sum_stats(stats: list) -> EngineStats:
    """Several engines' EngineStats as one: counters and per-kind dicts summed, latency samples pooled."""
    out = EngineStats()
    for f in dataclasses.fields(EngineStats):
        vals = [getattr(s, f.name) for s in stats]
        if isinstance(vals[0], dict):
            setattr(out, f.name, {k: sum(v[k] for v in vals) for k in vals[0]})
        elif isinstance(vals[0], deque):
            setattr(out, f.name, deque((x for v in vals for x in v), maxlen=vals[0].maxlen))
        else:
            setattr(out, f.name, sum(vals))
    return out


class DataParallelEngine:
    """Data-parallel replicas behind one front. Each replica has its own scheduler, pages and prefix cache; a
    request keeps its id and is stepped on the replica it was routed to.

    Routing is prefix-cache aware: the prompt's first full pages (up to ROUTE_PAGES) are hashed as the block
    manager hashes them; the replica whose prefix cache holds the longest run of them now, or to which the longest
    run was routed before (requests sharing a prefix that arrive together, before any of it is computed), gets the
    request if its load (unfinished requests) is within `route_slack` of the least loaded replica's; otherwise,
    and for prompts shorter than a page, the least loaded replica does (ties: the lowest index).

    `step()` steps every replica that has work at the same time, each on a worker thread of its own: their programs
    run on disjoint devices, and XLA releases the GIL while a program runs and while the sampled ids are fetched,
    so one replica's device time overlaps the others' (and their host work). `concurrent=False` steps them one
    after another from the caller's thread (the benchmark's baseline). `timeline` keeps (replica, start, end) of
    recent steps (time.perf_counter seconds) to show the overlap.
    """

    ROUTE_PAGES = 64

    def __init__(self, engines: list, concurrent: bool = True, route_slack: Optional[int] = None):
        from collections import OrderedDict
        from concurrent.futures import ThreadPoolExecutor

        self.replicas = engines
        self.model_cfg = engines[0].model_cfg
        self.cfg = engines[0].cfg
        self.tokenizer = engines[0].tokenizer
        self.max_model_len = engines[0].max_model_len
        self.num_pages = engines[0].num_pages
        self.runners = [e.runner for e in engines]
        self._where: dict = {}  # request id -> replica index
        self._ids = itertools.count()
        self.concurrent = bool(concurrent)  # may be switched at any time between steps
        self._pool = ThreadPoolExecutor(len(engines), thread_name_prefix="jaxserve-replica")
        self.route_slack = max(1, self.cfg.max_num_seqs // 4) if route_slack is None else int(route_slack)
        self._routed: "OrderedDict[bytes, int]" = OrderedDict()  # page hash -> replica it was routed to (LRU)
        self.routed_by_prefix = 0  # requests sent to a replica for its (cached or routed) prefix
        self.timeline: deque = deque(maxlen=4096)

    @property
    def stats(self) -> EngineStats:
        """The replicas' stats summed (a new EngineStats each time)."""
        return sum_stats([e.stats for e in self.replicas])

    def compile_all(self, progress=None) -> float:
        """Compile every replica's programs (`compile_engine`). Returns seconds."""
        return sum(compile_engine(e, progress) for e in self.replicas)

    def tokenize_prompt(self, prompt):
        return self.replicas[0].tokenize_prompt(prompt)

    def route(self, prompt_ids=()) -> int:
        """The replica for a prompt of token ids `prompt_ids` (see the class docstring)."""
        loads = [len(e.requests) for e in self.replicas]
        least = loads.index(min(loads))
        bm0 = self.replicas[0].bm  # every replica hashes alike (same page size and salt)
        hashes = bm0.hash_pages(list(prompt_ids)[:self.ROUTE_PAGES * bm0.page_size])
        if not hashes:
            return least
        best, best_n = least, 0
        for i, e in enumerate(self.replicas):
            n = e.bm.cached_prefix_pages(hashes)
            if n > best_n:
                best, best_n = i, n
        n = 0
        while n < len(hashes) and hashes[n] in self._routed:  # a hash chain: a routed page implies its prefix
            n += 1
        if n > best_n:
            best, best_n = self._routed[hashes[n - 1]], n
        chosen = best if best_n and loads[best] - loads[least] <= self.route_slack else least
        self.routed_by_prefix += chosen == best and best_n > 0
        for h in hashes:
            self._routed[h] = chosen
            self._routed.move_to_end(h)
        while len(self._routed) > 1 << 16:
            self._routed.popitem(last=False)
        return chosen

    def add_request(self, prompt, params=None, request_id: Optional[str] = None, priority="interactive") -> str:
        if request_id is None:
            request_id = f"req-{next(self._ids)}"
        if request_id in self._where:
            raise InvalidPromptError(f"request_id {request_id!r} is already in use")
        # Tokenized here to route (a bad prompt fails here, before routing); the replica tokenizes it again.
        i = self.route(self.replicas[0].tokenize_prompt(prompt))
        rid = self.replicas[i].add_request(prompt, params, request_id=request_id, priority=priority)
        self._where[rid] = i
        return rid

    def abort_request(self, request_id: str) -> bool:
        i = self._where.pop(request_id, None)
        return False if i is None else self.replicas[i].abort_request(request_id)

    def has_unfinished_requests(self) -> bool:
        return any(e.has_unfinished_requests() for e in self.replicas)

    def _timed_step(self, i: int) -> list:
        t0 = time.perf_counter()
        out = self.replicas[i].step()
        self.timeline.append((i, t0, time.perf_counter()))
        return out

    def step(self) -> list:
        """One step of every replica with work (concurrently unless `concurrent=False`); their outputs, in replica
        order. If a replica's step raises, the others' steps still finish first; then the first error is raised."""
        busy = [i for i, e in enumerate(self.replicas) if e.has_unfinished_requests()]
        if self.concurrent and len(busy) > 1:
            from concurrent.futures import wait

            futures = [self._pool.submit(self._timed_step, i) for i in busy]
            wait(futures)
            outs = [ro for f in futures for ro in f.result()]
        else:
            outs = [ro for i in busy for ro in self._timed_step(i)]
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
        per_step = ("host_ms_per_step", "device_ms_per_step", "pipeline_stage_busy")
        for k, v in per[0].items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in per_step:  # ratios, percentiles:
                out[k] = sum(m[k] for m in per)  # replaced below
        st = self.stats
        out["host_ms_per_step"] = 1e3 * st.host_seconds / st.steps if st.steps else None
        out["device_ms_per_step"] = 1e3 * st.device_seconds / st.steps if st.steps else None
        total = sum(m["kv_pages_total"] for m in per)
        out["kv_usage"] = sum(m["kv_pages_used"] or 0 for m in per) / total if total else 0.0
        rates = [m["prefix_hit_rate"] for m in per if m.get("prefix_hit_rate") is not None]
        out["prefix_hit_rate"] = sum(rates) / len(rates) if rates else None
        out.update(_percentiles("ttft_s", [x for e in self.replicas for x in e.stats.ttfts]))
        out.update(_percentiles("tpot_s", [x for e in self.replicas for x in e.stats.tpots]))
        ticks = [getattr(e.runner, "stage_ticks", [0, 0]) for e in self.replicas]
        total = sum(t[1] for t in ticks)
        out["pipeline_stage_busy"] = sum(t[0] for t in ticks) / total if total else None
        out["routed_by_prefix"] = self.routed_by_prefix
        out["replicas"] = per
        return out
