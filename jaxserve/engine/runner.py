"""The model runner: owns the device state (params, KV pages) and the ahead-of-time compiled step programs.

Every program is one `(R, Q)` bucket of `forward_step` + on-device sampling, compiled at start-up (in parallel
threads; XLA compiles release the GIL) and loaded from JAX's persistent compilation cache on later starts.
The KV pages are donated to each call, so the cache is updated in place. A compile counter turns any
compilation after warm-up into an error (or a warning), the way vLLM-TPU's ForbidCompile does.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
import time
from typing import Optional

import jax
from jax._src import config as jax_config  # thread-local override of the cache threshold
import jax.numpy as jnp
import numpy as np

from jaxserve.config import EngineConfig, ModelConfig
from jaxserve.engine.placement import Placement
from jaxserve.engine.sampling import SamplingTensors, build_sampling_arrays, sample
from jaxserve.errors import CompileWhileServingError, InvalidConfigError
from jaxserve.models.transformer import StepInputs
from jaxserve.weights.quantize import ensure_quantized

log = logging.getLogger("jaxserve")

# ------------------------------------------------------------------------------------------------
# Compilation accounting and the persistent cache
# ------------------------------------------------------------------------------------------------

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_compile_count = 0
_compile_lock = threading.Lock()
_listener_installed = False


def _on_event(event, duration, **kw):
    global _compile_count
    if event == _COMPILE_EVENT:
        with _compile_lock:
            _compile_count += 1


def compile_count() -> int:
    """Number of XLA backend compilations (including persistent-cache loads) in this process."""
    global _listener_installed
    if not _listener_installed:
        jax.monitoring.register_event_duration_secs_listener(_on_event)
        _listener_installed = True
    return _compile_count


def persistent_cache_enabled() -> bool:
    """`JAXSERVE_XLA_CACHE=0` turns the persistent compilation cache off (the test suite does)."""
    return os.environ.get("JAXSERVE_XLA_CACHE", "1").strip().lower() not in ("0", "false", "no", "off")


def enable_persistent_cache(path: Optional[str] = None) -> Optional[str]:
    """Point JAX's persistent compilation cache at ~/.cache/jaxserve/xla (or $JAXSERVE_CACHE/xla).

    Only the directory is set globally; the engine's own programs are written to it whatever their compile
    time (`compile_all` lowers the threshold for its own compiles only), while other jitted code in the
    process keeps JAX's default threshold, so the cache holds the engine's programs and little else. (A segfault
    once seen serializing a small CPU executable, in a test process that had compiled many programs, was most
    likely that process running out of memory mappings, not serialization: see scripts/run_tests.py.)
    Returns the directory, or None when disabled.
    """
    if not persistent_cache_enabled():
        return None
    root = os.environ.get("JAXSERVE_CACHE", os.path.expanduser("~/.cache/jaxserve"))
    path = path or os.path.join(root, "xla")
    os.makedirs(path, exist_ok=True)
    if jax.config.jax_compilation_cache_dir != path:
        jax.config.update("jax_compilation_cache_dir", path)
        # JAX decides once per process whether the cache is in use (at its first compile); start over so a
        # process that compiled something before building an engine still gets the cache.
        from jax.experimental.compilation_cache import compilation_cache as _cc

        _cc.reset_cache()
    return path


compile_count()  # install the listener before anything compiles


def _kernel_impl(engine_cfg: EngineConfig, field: str, platform: Optional[str] = None) -> str:
    """attention_impl / matmul_impl resolved against batch_invariant: the Pallas kernels' reductions are tiled
    by the batch (a query block of the ragged kernel can span sequences, the matmul's M tile follows the row
    count), so with batch_invariant=True "auto" takes the XLA path (invariant on fixed row tiles) and an explicit
    "pallas" is refused at start-up."""
    impl = getattr(engine_cfg, field)
    if impl not in ("auto", "xla", "pallas"):
        raise InvalidConfigError(f"{field} must be auto, xla or pallas, got {impl!r}")
    if engine_cfg.batch_invariant:
        if impl == "pallas":
            raise InvalidConfigError(
                f"batch_invariant=True cannot be honoured with {field}='pallas': the Pallas kernels' reductions "
                f"depend on the batch's shape. Use {field}='xla' (or 'auto', which then picks the XLA path).")
        return "xla"
    if impl == "auto" and (platform or jax.default_backend()) == "cpu":
        return "xla"
    return impl


def _mesh_split(model_cfg: ModelConfig, placement: Placement):
    """(mesh, q_split, kv_split) for the kernels' shard_map on a placement's mesh; no mesh on one device."""
    from pallas_kernels.engine import attention_split

    return (placement.kernel_mesh, *attention_split(model_cfg.num_heads, model_cfg.num_kv_heads,
                                                    *placement.heads_split))


def attention_fn_for(model_cfg: ModelConfig, engine_cfg: EngineConfig, placement: Optional[Placement] = None,
                     platform: Optional[str] = None):
    """`EngineConfig.attention_impl` -> forward_step's attention_fn; None is the XLA path.

    "xla": the XLA path. "auto": Pallas kernels on TPU / GPU, the XLA path on CPU. "pallas": the kernels of
    pallas_kernels/ (on CPU, the TPU kernels in interpret mode: slow, for tests). On a placement's mesh of
    several devices the kernels run under shard_map (default placement: one device). `platform` (default: this
    backend) lowers for another one (jax.export tests). See pallas_kernels/engine.py.
    """
    impl = _kernel_impl(engine_cfg, "attention_impl", platform)
    if impl == "xla":
        return None  # (without importing pallas_kernels)
    from pallas_kernels.engine import engine_attention_fn

    mesh, q_split, kv_split = _mesh_split(model_cfg, placement or Placement())
    try:
        return engine_attention_fn(impl, head_dim=model_cfg.head_dim, page_size=engine_cfg.page_size, mesh=mesh,
                                   q_split=q_split, kv_split=kv_split, platform=platform)
    except ValueError as e:
        raise InvalidConfigError(str(e)) from None


def bind_matmul_for(params, engine_cfg: EngineConfig, placement: Optional[Placement] = None,
                    platform: Optional[str] = None):
    """`EngineConfig.matmul_impl` applied to the (placed) params' quantized weights: "pallas" (or "auto" on
    TPU / GPU) runs them through pallas_kernels/quant_matmul.py (under shard_map on a placement's mesh of several
    devices; default placement: one device); "xla" keeps jaxserve.weights.quantize's formulation."""
    impl = _kernel_impl(engine_cfg, "matmul_impl", platform)
    if impl == "xla":
        return params
    from pallas_kernels.engine import bind_matmul_kernels

    return bind_matmul_kernels(params, impl, mesh=(placement or Placement()).kernel_mesh, platform=platform)


# ------------------------------------------------------------------------------------------------
# The runner
# ------------------------------------------------------------------------------------------------


class ModelRunner:
    def __init__(self, model_cfg: ModelConfig, engine_cfg: EngineConfig, params, num_pages: int,
                 attention_fn=None, placement: Optional[Placement] = None):
        self.model_cfg = model_cfg
        # Where params, KV pages and step inputs live; default: one device (a 1 x 1 mesh). A sharded replica:
        # jaxserve.parallel.placement.ShardedPlacement.
        self.placement = placement = placement or Placement()
        self.cfg = engine_cfg
        self.num_pages = num_pages
        self.page_size = engine_cfg.page_size
        self.P = engine_cfg.pages_per_seq(model_cfg)
        self.H = engine_cfg.model_len(model_cfg)  # history width for penalties
        self.NB = 16  # banned ids per row (EOS/stop ids while min_tokens is unmet; checked at admission)
        self.max_logprobs = engine_cfg.max_logprobs
        self.attention_fn = (attention_fn if attention_fn is not None
                             else attention_fn_for(model_cfg, engine_cfg, placement))
        dtype = jnp.dtype(engine_cfg.dtype)
        t0 = time.monotonic()
        params = ensure_quantized(params, engine_cfg)  # no-op unless EngineConfig.quantization is set
        # Float leaves are cast to the engine dtype; quantized leaves (weights/quantize.py) keep their own.
        self.params = bind_matmul_for(placement.place_params(params, dtype), engine_cfg, placement)
        self.kv = placement.init_kv(model_cfg, num_pages, self.page_size, jnp.dtype(engine_cfg.kv_cache_dtype))
        self.load_seconds = time.monotonic() - t0
        self._programs: dict = {}
        self._warm_count: Optional[int] = None
        self._empty_history = {}

    # -------------------------------------------------------------- programs
    def _step(self, params, kv, inp: StepInputs, st: SamplingTensors):
        logits, kv = self.placement.forward(self.model_cfg, params, kv, inp, page_size=self.page_size,
                                            block_pages=self.cfg.attn_block_pages, attention_fn=self.attention_fn,
                                            batch_invariant=self.cfg.batch_invariant)
        # Batch-invariant mode samples row by row: the sampler's [rows, vocab] reductions (log-softmax over a
        # 262k vocabulary) are summed in an order that depends on the row count on XLA:CPU.
        row_chunk = 1 if self.cfg.batch_invariant else None
        return sample(logits, st, self.max_logprobs, row_chunk=row_chunk), kv

    def _abstract_inputs(self, R: int, Q: int):
        i32 = jnp.int32
        S = jax.ShapeDtypeStruct
        inp = StepInputs(S((R, Q), i32), S((R, Q), i32), S((R,), i32), S((R,), i32), S((R, self.P), i32),
                         S((R, Q), i32))
        arrays = build_sampling_arrays([], [], [], [], [], [], R, self.H, self.NB)
        st = SamplingTensors(**{k: S(v.shape, v.dtype) for k, v in arrays.items()})
        return inp, st

    def buckets(self) -> list:
        return [(r, 1) for r in self.cfg.decode_buckets()] + list(self.cfg.prefill_buckets())

    def jit_step(self, step_fn):
        """`step_fn(params, kv, inputs, sampling)` under jit with the placement's shardings, KV donated.
        The engine's steps and the speculative verify steps both compile through here."""
        return self.placement.jit(step_fn, self.params, self.kv)

    def place_inputs(self, inputs):
        """Host step inputs as a program takes them (`Placement.put_inputs`: replicated on its mesh)."""
        return self.placement.put_inputs(inputs)

    def compile_all(self, progress=None) -> float:
        """Compile every bucket ahead of time. Returns seconds spent."""
        t0 = time.monotonic()
        fn = self.jit_step(self._step)
        p_abs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), self.params)
        kv_abs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), self.kv)

        def build(bucket):
            inp, st = self._abstract_inputs(*bucket)
            # Every engine program goes to the persistent cache (when enabled), however fast it compiled.
            with jax_config.persistent_cache_min_compile_time_secs(0.0):
                return bucket, fn.lower(p_abs, kv_abs, inp, st).compile()

        todo = [b for b in self.buckets() if b not in self._programs]
        workers = max(1, min(self.cfg.compile_workers, len(todo)))
        with concurrent.futures.ThreadPoolExecutor(workers) as ex:
            for bucket, prog in ex.map(build, todo):
                self._programs[bucket] = prog
                if progress is not None:
                    progress(bucket)
        self._warm_count = compile_count()
        return time.monotonic() - t0

    # -------------------------------------------------------------- one step
    def execute(self, kind: str, rows: list, bucket: tuple):
        """Run one scheduled step. `rows` are ScheduledRow-like (seq, start, num_new).

        Returns numpy (tokens [n], logprob [n], top_ids [n, K], top_logprobs [n, K]) for the real rows.
        """
        R, Q = bucket
        n = len(rows)
        inp = self.step_inputs(R, Q, [(row.seq.all_token_ids[row.start:row.start + row.num_new], row.start,
                                       row.block_table) for row in rows])
        st = self._sampling_arrays(rows, R)
        prog = self._programs.get(bucket)
        if prog is None:
            raise CompileWhileServingError(f"no compiled program for bucket {bucket}; buckets: {sorted(self._programs)}")
        inputs = self.place_inputs((inp, SamplingTensors(**st)))
        before = compile_count()
        res, self.kv = prog(self.params, self.kv, *inputs)
        out = jax.device_get((res.tokens, res.logprob, res.top_ids, res.top_logprobs))
        if compile_count() != before:
            raise CompileWhileServingError("an XLA compilation happened while serving")
        return tuple(a[:n] for a in out)

    def step_inputs(self, R: int, Q: int, entries) -> StepInputs:
        """Host arrays of one (R, Q) step. `entries`: per real row, (token ids of its new positions, position of
        the first, block table). Padding rows and positions write to page 0 slot 0, the null page."""
        ps = self.page_size
        tokens = np.zeros((R, Q), np.int32)
        positions = np.zeros((R, Q), np.int32)
        q_lens = np.zeros((R,), np.int32)
        kv_lens = np.zeros((R,), np.int32)
        block_tables = np.zeros((R, self.P), np.int32)
        slots = np.zeros((R, Q), np.int32)
        for i, (toks, start, bt) in enumerate(entries):
            m = len(toks)
            tokens[i, :m] = toks
            pos = np.arange(start, start + m, dtype=np.int32)
            positions[i, :m] = pos
            q_lens[i] = m
            kv_lens[i] = start + m
            block_tables[i, :len(bt)] = bt
            slots[i, :m] = block_tables[i][pos // ps] * ps + pos % ps
        return StepInputs(tokens, positions, q_lens, kv_lens, block_tables, slots)

    def _sampling_arrays(self, rows: list, R: int) -> dict:
        params, hist, out_start, steps, seeds, banned = [], [], [], [], [], []
        need_hist = any(r.seq.params.uses_history for r in rows)
        for r in rows:
            s = r.seq
            params.append(s.params)
            hist.append(s.all_token_ids[: r.start + r.num_new] if need_hist else [])
            out_start.append(len(s.prompt_token_ids))
            steps.append(len(s.output_token_ids))
            seeds.append(s.seed)
            banned.append(sorted(s.stop_token_ids) if len(s.output_token_ids) < s.params.min_tokens else [])
        return build_sampling_arrays(params, hist, out_start, steps, seeds, banned, R, self.H, self.NB)

    def compiled_buckets(self) -> list:
        return sorted(self._programs)
