"""The model runner: owns the device state (params, KV pages) and the ahead-of-time compiled step programs.

The executor contract: `compile(step_fn, buckets)` compiles a step function (`logits_step`, the engine's;
one built from `forward`, like the verify step; or, fused with its own sampling, `greedy_step`, a draft
model's) for every `(R, Q)` bucket ahead of time, and `run(programs, bucket, inputs, sampling, num_rows)` runs
one and returns a `StepResult` (numpy, per row). A step's logits are sampled by a separate sampler program, one
per row count, shared by every bucket and step kind with that many rows (`StepProgram`). `execute(kind, rows,
bucket)` is that for the scheduler's rows on the engine's own programs (`compile_all`). Programs compile at
start-up (in parallel threads; XLA compiles release the GIL) and load from JAX's persistent compilation cache on
later starts.
The KV pages are donated to each call, so the cache is updated in place. A compile counter turns any
compilation after warm-up into an error (or a warning), the way vLLM-TPU's ForbidCompile does.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
import time
from typing import Callable, NamedTuple, Optional

import jax
from jax._src import config as jax_config  # thread-local override of the cache threshold
import jax.numpy as jnp
import numpy as np

from jaxserve.config import EngineConfig, ModelConfig
from jaxserve.engine.placement import Placement
from jaxserve.engine.sampler import SampleResult, SamplingTensors, sample, target_logprobs
from jaxserve.engine.sampling_inputs import build_sampling_arrays, mask_words, step_token_mask
from jaxserve.engine.structured import fill_masks, grammar_mask
from jaxserve.errors import CompileWhileServingError, InvalidConfigError
from jaxserve.models.ragged import abstract_ragged_inputs, build_ragged_inputs, forward_ragged
from jaxserve.models.ragged_layout import ragged_layout
from jaxserve.models.transformer import StepInputs, forward_step, lm_head
from jaxserve.weights.quantize import ensure_quantized

log = logging.getLogger("jaxserve")


class StepResult(NamedTuple):
    """One step's results for its real rows (numpy): row i's sampled token, its logprob and the top-n ids and
    logprobs (top_ids[i, :n]; -1 padded). A step that samples every position (`compile(...,
    sampled_positions=True)`) has a position axis after the row axis: tokens[i, j] is position j's draw."""

    tokens: np.ndarray
    logprobs: np.ndarray
    top_ids: np.ndarray
    top_logprobs: np.ndarray


class StepProgram:
    """One bucket's compiled step (`ModelRunner.compile`), called like a jitted step: (params, kv, inputs,
    sampling) -> (SampleResult, kv), or ((SampleResult, extra), kv) for a step whose forward returns
    (logits, extra). The forward program (KV donated), then the runner's sampler program for its rows; both
    dispatch asynchronously, so the logits stay on the device. Fused (`sampler` None): one program of the whole
    step. `positions`: the sampler's rows are the bucket's R x Q positions (`compile(sampled_positions=True)`).

    Why two programs: XLA:CPU spends most of a fused step's compile time in the sampler (tiny-llama under
    `jax_log_compiles`, a loaded 2-core machine: forward 3-4 s, sampler 10-15 s per program), and the sampler
    only depends on the row count, so one sampler program per row count replaces one per bucket (and the
    persistent compilation cache shares it between engines of the same vocabulary and history width)."""

    def __init__(self, forward, sampler=None, positions: bool = False):
        self.forward = forward
        self.sampler = sampler
        self.positions = positions

    def __call__(self, params, kv, inputs, sampling):
        if self.sampler is None:
            return self.forward(params, kv, inputs, sampling)
        out, kv = self.forward(params, kv, inputs)
        if isinstance(out, tuple):  # (logits, extra)
            return (self.sampler(out[0], sampling),) + tuple(out[1:]), kv
        return self.sampler(out, sampling), kv

    def as_text(self) -> str:
        """The forward program's HLO (the model's collectives and kernels live there)."""
        return self.forward.as_text()


class SamplingRow(NamedTuple):
    """What the sampler needs of one row: params, token history (penalties; [] when no row uses them), where
    the output starts in it, the output index being sampled (the RNG step), seed, and the ids banned now."""

    params: object
    history: list
    output_start: int
    step: int
    seed: int
    banned: list
    mask: object = None  # packed token mask (sampling_inputs.step_token_mask) or None


class PromptLogprobs(NamedTuple):
    """Prompt logprobs of one row's span of positions (numpy): the next prompt token's logprob at each, and the
    top-n ids and logprobs (max_logprobs columns)."""

    logprobs: np.ndarray
    top_ids: np.ndarray
    top_logprobs: np.ndarray


SCORE_CHUNK = 32  # positions per LM-head pass of the prompt-logprob scorer (a [32, V] f32 logits temporary)

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
    """Point JAX's persistent compilation cache at ~/.cache/jaxserve/xla (or $JAXSERVE_CACHE/xla, or
    $JAXSERVE_XLA_CACHE_DIR: the test runner shares one between processes whose JAXSERVE_CACHE differs).

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
    path = path or os.environ.get("JAXSERVE_XLA_CACHE_DIR") or os.path.join(root, "xla")
    os.makedirs(path, exist_ok=True)
    max_bytes = os.environ.get("JAXSERVE_XLA_CACHE_MAX_BYTES")
    if max_bytes:  # a bounded cache: JAX then evicts LRU entries and takes a file lock around every read and write,
        # so processes sharing the directory never read an entry another one is still writing (needs `filelock`)
        jax.config.update("jax_compilation_cache_max_size", int(max_bytes))
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
        placement = placement or Placement()
        if placement.t > 1 and placement.p == 1:
            mesh, q_split, kv_split = _mesh_split(model_cfg, placement)
            if not kv_split:
                return replicated_kv_attention(mesh, q_split)
        return None  # (without importing pallas_kernels)
    from pallas_kernels.engine import engine_attention_fn

    mesh, q_split, kv_split = _mesh_split(model_cfg, placement or Placement())
    try:
        return engine_attention_fn(impl, head_dim=model_cfg.head_dim, page_size=engine_cfg.page_size, mesh=mesh,
                                   q_split=q_split, kv_split=kv_split, platform=platform)
    except ValueError as e:
        raise InvalidConfigError(str(e)) from None


def replicated_kv_attention(mesh, q_split: bool):
    """The XLA attention path under `shard_map` for a mesh whose `model` axis does not split the KV heads (the
    cache is replicated: Gemma 3's single KV head on any model > 1). Left to GSPMD, each device's query heads made
    the partitioner slice the whole cache to the KV head they read and gather it back, every layer of every step
    (tiny-llama model=4, 2 GiB cache: 184 s for 16 tokens instead of 0.2 s). Here every device reads its own
    replica: query heads split when `q_split` (one KV head: every query head reads it), else attention replicated
    like the Pallas path's (pallas_kernels/engine.py attention_split)."""
    from jax.sharding import PartitionSpec as P

    from jaxserve.models.transformer import paged_attention_xla

    heads = P(None, None, "model", None) if q_split else P()

    def attention_fn(cfg, q, k_cache, v_cache, layer, block_tables, kv_lens, q_pos, window, *, page_size,
                     block_pages, batch_invariant=False):
        def local(q_, kc, vc, layer_, tables, lens, pos, win):
            return paged_attention_xla(cfg, q_, kc, vc, layer_, tables, lens, pos, win, page_size=page_size,
                                       block_pages=block_pages, batch_invariant=batch_invariant)

        rep = P()
        return jax.shard_map(local, mesh=mesh, in_specs=(heads, rep, rep, rep, rep, rep, rep, rep), out_specs=heads,
                             check_vma=False)(q, k_cache, v_cache, layer, block_tables, kv_lens, q_pos, window)

    return attention_fn


def bind_matmul_for(params, engine_cfg: EngineConfig, placement: Optional[Placement] = None,
                    platform: Optional[str] = None):
    """`EngineConfig.matmul_impl` applied to the (placed) params' quantized weights: "pallas" (or "auto" on
    TPU / GPU) runs them through pallas_kernels/quant_matmul.py (under shard_map on a placement's mesh of several
    devices; default placement: one device); "xla" keeps the XLA formulation of models/quantized.py."""
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
        self.W = mask_words(model_cfg.vocab_size)  # packed token mask words per row
        self.max_logprobs = engine_cfg.max_logprobs
        self.attention_fn = (attention_fn if attention_fn is not None
                             else attention_fn_for(model_cfg, engine_cfg, placement))
        dtype = jnp.dtype(engine_cfg.dtype)
        t0 = time.monotonic()
        params = ensure_quantized(params, engine_cfg)  # no-op unless EngineConfig.quantization is set
        # Float leaves are cast to the engine dtype; quantized leaves (models/quantized.py) keep their own.
        self.params = bind_matmul_for(placement.place_params(params, dtype), engine_cfg, placement)
        # Page groups (config.KVLayout): sliding-window layers' pages are freed out of their window. Pipeline stages
        # split the cache by layer, so their forward keeps one row per layer.
        self.kv_layout = model_cfg.kv_layout(engine_cfg.sliding_window_reclaim and placement.forward is forward_step)
        self._layout_kw = {"kv_layout": self.kv_layout} if self.kv_layout.grouped else {}
        if self.P <= engine_cfg.attn_block_pages and (self.kv_layout.grouped or placement.mesh.devices.size > 1):
            # Block tables at least two attention blocks wide (the attention loop's trip count is data, so the extra
            # null pages cost nothing). With one block XLA:CPU unrolls the loop and fuses a layer's KV write into its
            # attention gather, which then copies the whole cache (shard) twice per layer: with page groups (Gemma 3
            # 270M, max_model_len 256: decode 4.4 s per token with a 1 GiB cache) and on a mesh (tiny-llama model=2,
            # max_model_len 256, 2 GiB cache: 1.5 s per token instead of 5 ms). One plain device does not copy.
            self.P = 2 * engine_cfg.attn_block_pages
        self.kv = placement.init_kv(model_cfg, num_pages, self.page_size, jnp.dtype(engine_cfg.kv_cache_dtype),
                                    rows=self.kv_layout.width)
        self.load_seconds = time.monotonic() - t0
        # batch_invariant: the dot tiling measured exact on this machine (models/invariance.py), else False.
        self.invariance = False
        if engine_cfg.batch_invariant:
            from jaxserve.models.invariance import choose_row_tiles

            rows = {r for r, _ in self.buckets()}  # the decode steps' dense rows and every step's LM-head rows
            self.invariance = choose_row_tiles(model_cfg, self.params, self.page_size, engine_cfg.attn_block_pages,
                                               rows)
        self._programs: dict = {}
        # Every program set `_run` takes (the engine's, then each `compile` result in call order): a multi-host
        # server names a step's programs by index here, the same on every process (jaxserve/parallel/spmd.py).
        self._program_sets: list = [self._programs]
        # Multi-host serving, process 0: called with every step before it runs, to send it to the other processes.
        self.mirror: Optional[Callable] = None
        self.device_seconds = 0.0  # summed over steps: dispatch to the sampled ids on the host (`_run`)
        self._samplers: dict = {}  # (logits shape, dtype) -> Future of the compiled sampler (_sampler_program)
        self._sampler_lock = threading.Lock()
        # Prompt logprobs: the prefill programs also return every position's hidden state (kept on device), and
        # one small "scorer" program turns the positions that ask into logprobs (score_step). The pipeline's
        # forward has no hidden-state output: the engine rejects such requests there.
        self.supports_prompt_logprobs = placement.forward is forward_step
        self.score_rows = -(-engine_cfg.max_num_batched_tokens // SCORE_CHUNK) * SCORE_CHUNK
        self._scorer = None
        # Pipelining across steps (`rotate`): {R: (decode call program, sampler)} per decode bucket, each bucket's
        # carry (the activations between stages), and the groups in the stages 1..S-1 (pushed 1..S-1 calls ago).
        self._rotation: dict = {}
        self._rot_carry: dict = {}
        self._rot_prev: list = [None] * max(placement.p - 1, 0)
        self._rot_bucket: Optional[int] = None
        # Pipeline stages' work, [stage-ticks with a (micro-)batch, all stage-ticks], summed over calls: GPipe steps
        # count n micro-batches of n + S - 1 ticks, rotation calls the stages holding a group.
        self.stage_ticks = [0, 0]
        self.rotation_calls = 0
        # Ragged steps (models/ragged.py; `enable_ragged`, set by the engine before `compile_all`): {T: forward
        # program} and {N: (LM-head program of N sampled rows, sampler)}.
        self.ragged = False
        self._ragged: dict = {}
        self._heads: dict = {}

    # -------------------------------------------------------------- step functions
    def forward(self, params, kv, inp: StepInputs, all_logits: bool = False):
        """The model over one step's inputs: (logits f32[R, V] of each row's last new token, or [R, Q, V] of
        every position with `all_logits`, updated kv). For step functions traced by `compile`."""
        if all_logits:  # (verify steps; the pipeline's forward has no all-positions variant)
            return forward_step(self.model_cfg, params, kv, inp, page_size=self.page_size,
                                block_pages=self.cfg.attn_block_pages, attention_fn=self.attention_fn,
                                batch_invariant=self.invariance, all_logits=True, **self._layout_kw)
        return self.placement.forward(self.model_cfg, params, kv, inp, page_size=self.page_size,
                                      block_pages=self.cfg.attn_block_pages, attention_fn=self.attention_fn,
                                      batch_invariant=self.invariance, **self._layout_kw)

    def sample(self, logits, st: SamplingTensors) -> SampleResult:
        """The engine's sampler over rows of logits f32[N, V] (N = the sampling tensors' rows)."""
        # Batch-invariant mode samples row by row: the sampler's [rows, vocab] reductions (log-softmax over a
        # 262k vocabulary) are summed in an order that depends on the row count on XLA:CPU.
        row_chunk = 1 if self.cfg.batch_invariant else None
        return sample(logits, st, self.max_logprobs, row_chunk=row_chunk)

    def logits_step(self, params, kv, inp: StepInputs):
        """The engine's step as it compiles: the forward, (logits f32[R, V], kv); the sampler program samples them."""
        return self.forward(params, kv, inp)

    def prefill_logits_step(self, params, kv, inp: StepInputs):
        """`logits_step` that also returns every position's hidden state [R, Q, D] (for prompt logprobs; the
        engine's prefill programs where the placement supports it): ((logits, hidden), kv)."""
        logits, kv, hidden = forward_step(self.model_cfg, params, kv, inp, page_size=self.page_size,
                                          block_pages=self.cfg.attn_block_pages, attention_fn=self.attention_fn,
                                          batch_invariant=self.invariance, return_hidden=True, **self._layout_kw)
        return (logits, hidden), kv

    def sample_step(self, params, kv, inp: StepInputs, st: SamplingTensors):
        """Forward + on-device sampling of each row's next token as one function (what `logits_step` and the
        sampler program compute together; `jax.export` of a whole step, tests/mesh_export.py)."""
        logits, kv = self.forward(params, kv, inp)
        return self.sample(logits, st), kv

    def score_step(self, params, hidden, targets, count):
        """The prompt-logprob scorer: hidden [N, D] (prefill steps' hidden states, packed), target ids i32[N],
        count (the first `count` rows are real) -> (target logprobs f32[N], top ids i32[N, max_logprobs], their
        logprobs). The same LM head as the step (soft-capping, batch-invariant tiling) and the sampler's raw
        log-softmax, SCORE_CHUNK rows at a time, only as many chunks as `count` needs."""
        N, K, C = hidden.shape[0], self.max_logprobs, SCORE_CHUNK

        def body(c, out):
            h = jax.lax.dynamic_slice_in_dim(hidden, c * C, C)
            t = jax.lax.dynamic_slice_in_dim(targets, c * C, C)
            res = target_logprobs(lm_head(self.model_cfg, params, h, self.invariance), t, K)
            return tuple(jax.lax.dynamic_update_slice_in_dim(o, r, c * C, axis=0) for o, r in zip(out, res))

        init = (jnp.zeros((N,), jnp.float32), jnp.full((N, K), -1, jnp.int32),
                jnp.full((N, K), -jnp.inf, jnp.float32))
        return jax.lax.fori_loop(0, (count + C - 1) // C, body, init)

    def compile_scorer(self):
        """`score_step` compiled ahead of time for `score_rows` positions (a step's token budget)."""
        p_sh = jax.tree.map(lambda a: a.sharding, self.params)
        rep = self.placement.replicated
        fn = jax.jit(self.score_step, in_shardings=(p_sh, rep, rep, rep), out_shardings=rep)
        p_abs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), self.params)
        S = jax.ShapeDtypeStruct
        N = self.score_rows
        with jax_config.persistent_cache_min_compile_time_secs(0.0):
            return fn.lower(p_abs, S((N, self.model_cfg.hidden_size), self.params["final_norm"].dtype),
                            S((N,), jnp.int32), S((), jnp.int32)).compile()

    def greedy_step(self, params, kv, inp: StepInputs, st: SamplingTensors):
        """An argmax instead of the full sampler (a fraction of the compile time); `st` is ignored, no logprobs.
        A draft model's step."""
        from jaxserve.engine.sampler import _argmax

        logits, kv = self.forward(params, kv, inp)
        R = logits.shape[0]
        return SampleResult(_argmax(logits)[0].astype(jnp.int32), jnp.zeros((R,), jnp.float32), jnp.zeros((R, 0), jnp.int32),
                            jnp.zeros((R, 0), jnp.float32)), kv

    # -------------------------------------------------------------- programs
    def abstract_inputs(self, R: int, Q: int, sampled_rows: Optional[int] = None):
        """Shapes of an (R, Q) step's (StepInputs, SamplingTensors); the sampler sees `sampled_rows` rows
        (default R; R * Q for a step that samples every position)."""
        i32 = jnp.int32
        S = jax.ShapeDtypeStruct
        G = (self.kv_layout.num_groups,) if self.kv_layout.grouped else ()
        inp = StepInputs(S((R, Q), i32), S((R, Q), i32), S((R,), i32), S((R,), i32), S(G + (R, self.P), i32),
                         S(G + (R, Q), i32))
        arrays = build_sampling_arrays([], [], [], [], [], [], R if sampled_rows is None else sampled_rows, self.H,
                                       self.NB, W=self.W)
        return inp, SamplingTensors(**{k: S(v.shape, v.dtype) for k, v in arrays.items()})

    def buckets(self) -> list:
        """The engine's (R, Q) step shapes: the decode ladder as (R, 1), then the prefill ladder."""
        return [(r, 1) for r in self.cfg.decode_buckets()] + list(self.cfg.prefill_buckets())

    def jit_step(self, step_fn, sampling: bool = True):
        """`step_fn(params, kv, inputs, sampling)` (or `step_fn(params, kv, inputs)`, `sampling=False`) under jit
        with the placement's shardings, KV donated. The engine's steps and the speculative verify steps both
        compile through here."""
        return self.placement.jit(step_fn, self.params, self.kv, sampling=sampling)

    def _sampler_program(self, logits_abs, st_abs):
        """The sampler compiled for logits of `logits_abs`'s shape (one program per row count, compiled once:
        threads of `compile` that need the same one wait for the first)."""
        key = (tuple(logits_abs.shape), str(logits_abs.dtype))
        with self._sampler_lock:
            fut = self._samplers.get(key)
            owner = fut is None
            if owner:
                fut = self._samplers[key] = concurrent.futures.Future()
        if owner:
            try:
                rep = self.placement.replicated
                fn = jax.jit(self.sample, in_shardings=(rep, rep), out_shardings=rep)
                with jax_config.persistent_cache_min_compile_time_secs(0.0):
                    fut.set_result(fn.lower(jax.ShapeDtypeStruct(logits_abs.shape, logits_abs.dtype),
                                            st_abs).compile())
            except BaseException as e:
                with self._sampler_lock:
                    del self._samplers[key]
                fut.set_exception(e)
                raise
        return fut.result()

    def place_inputs(self, inputs):
        """Host step inputs as a program takes them (`Placement.put_inputs`: replicated on its mesh)."""
        return self.placement.put_inputs(inputs)

    def compile(self, step_fn, buckets, sampled_positions: bool = False, progress=None,
                step_fns: Optional[dict] = None, fused: bool = False) -> dict:
        """Compile a step for every (R, Q) bucket ahead of time (in parallel threads; each program goes to the
        persistent cache when enabled, however fast it compiled). `step_fn(params, kv, StepInputs) -> (logits
        f32[N, V], kv)` or `((logits, extra), kv)`: each bucket's program is that step, then the sampler program
        for its N rows (see `StepProgram`). `sampled_positions`: N = R * Q (the logits have a row per position,
        row-major), and the results come back as [R, Q, ...]; else N = R. `fused`: `step_fn(params, kv,
        StepInputs, SamplingTensors) -> (result, kv)` samples by itself, one program (`greedy_step`).
        `step_fns`: {bucket: step function} for buckets that compile another step (the engine's prefill steps).
        Returns {bucket: StepProgram} for `run`."""
        jitted = {}

        def jit_for(bucket):
            f = (step_fns or {}).get(bucket, step_fn)
            if f not in jitted:
                jitted[f] = self.jit_step(f, sampling=fused)
            return jitted[f]

        fns = {b: jit_for(b) for b in buckets}
        p_abs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), self.params)
        kv_abs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), self.kv)

        def build(bucket):
            R, Q = bucket
            inp, st = self.abstract_inputs(R, Q, R * Q if sampled_positions else R)
            with jax_config.persistent_cache_min_compile_time_secs(0.0):
                if fused:
                    return bucket, StepProgram(fns[bucket].lower(p_abs, kv_abs, inp, st).compile())
                lowered = fns[bucket].lower(p_abs, kv_abs, inp)
                forward = lowered.compile()
            out = lowered.out_info[0]
            logits = out[0] if isinstance(out, tuple) else out
            return bucket, StepProgram(forward, self._sampler_program(logits, st), positions=sampled_positions)

        buckets = list(buckets)
        programs = {}
        workers = max(1, min(self.cfg.compile_workers, len(buckets)))
        with concurrent.futures.ThreadPoolExecutor(workers) as ex:
            for bucket, prog in ex.map(build, buckets):
                programs[bucket] = prog
                if progress is not None:
                    progress(bucket)
        self._program_sets.append(programs)
        return programs

    def compile_all(self, progress=None) -> float:
        """Compile the engine's step for every bucket ahead of time (`logits_step`; on the prefill ladder
        `prefill_logits_step`, and the prompt-logprob scorer beside them, where the placement supports prompt
        logprobs). Returns seconds spent."""
        t0 = time.monotonic()
        todo = [b for b in self.buckets() if b not in self._programs] if not self.ragged else []
        step_fns = {}
        scorer = None
        if self.supports_prompt_logprobs:
            step_fns = {b: self.prefill_logits_step for b in self.cfg.prefill_buckets()}
            if self._scorer is None:  # beside the step programs (XLA compiles release the GIL)
                scorer = concurrent.futures.ThreadPoolExecutor(1)
                future = scorer.submit(self.compile_scorer)
        if todo:
            self._programs.update(self.compile(self.logits_step, todo, progress=progress, step_fns=step_fns))
        if self.ragged:
            self.compile_ragged(progress)
        if self.placement.rotation is not None and self.cfg.pipeline_decode == "rotate":
            self.compile_rotation()
        if scorer is not None:
            self._scorer = future.result()
            scorer.shutdown()
        return time.monotonic() - t0

    # -------------------------------------------------------------- ragged steps
    def ragged_unsupported(self, explicit: bool = True) -> Optional[str]:
        """Why this runner cannot run ragged steps (models/ragged.py), or None when it can. `explicit` False (the
        engine's step_mode "auto"): also None only where ragged steps are the measured default, the XLA path; the
        Pallas kernels' ragged form (pallas_kernels/engine.py) runs on request (step_mode "ragged") until it has
        run on a device."""
        if self.placement.forward is not forward_step:
            return "pipeline stages run bucketed steps"
        if self.placement.mesh.devices.size > 1:
            return "a replica of several devices runs bucketed steps (ragged steps run on one device so far)"
        if self.cfg.batch_invariant:
            return "batch_invariant=True keeps bucketed steps (a ragged tile's rows change with the step's mix)"
        if self.attention_fn is not None:
            if getattr(self.attention_fn, "ragged", None) is None:
                return "this attention function has no ragged form"
            if not explicit:
                return "the Pallas attention kernels run ragged steps only on request (step_mode='ragged') so far"
        return None

    def enable_ragged(self) -> None:
        """Run ragged steps: `compile_all` compiles them (`ragged_ladder`) instead of the (R, Q) buckets."""
        why = self.ragged_unsupported()
        if why is not None:
            raise InvalidConfigError(f"ragged steps are not available here: {why}")
        self.ragged = True

    def ragged_ladder(self) -> list:
        """The ragged steps' token counts T (`EngineConfig.token_buckets`)."""
        return self.cfg.token_buckets()

    def ragged_step(self, params, kv, inp):
        """The ragged forward as it compiles: ((hidden of the sampled rows' last tokens [S, D], every token's
        hidden [T, D]), kv)."""
        last, kv, hidden = forward_ragged(self.model_cfg, params, kv, inp, page_size=self.page_size,
                                          block_pages=self.cfg.attn_block_pages,
                                          attention_fn=getattr(self.attention_fn, "ragged", None),
                                          kv_layout=self.kv_layout if self.kv_layout.grouped else None)
        return (last, hidden), kv

    def compile_ragged(self, progress=None) -> None:
        """The ragged step for every T of `ragged_ladder`, and the LM head + sampler for every count of sampled rows
        (the decode ladder), ahead of time."""
        fn = self.jit_step(self.ragged_step, sampling=False)
        p_abs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), self.params)
        kv_abs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), self.kv)
        groups = self.kv_layout.num_groups if self.kv_layout.grouped else None
        S = self.cfg.max_num_seqs
        # the forward's last-token hidden states [S, D], in the compute dtype (as the scorer's hidden input)
        last_abs = jax.ShapeDtypeStruct((S, self.model_cfg.hidden_size), self.params["final_norm"].dtype)

        def build(T):
            with jax_config.persistent_cache_min_compile_time_secs(0.0):
                prog = fn.lower(p_abs, kv_abs, abstract_ragged_inputs(T, S, self.P, groups)).compile()
            return T, prog

        p_sh = jax.tree.map(lambda a: a.sharding, self.params)
        rep = self.placement.replicated

        def build_head(N):
            head = jax.jit(lambda params, last: lm_head(self.model_cfg, params, last[:N]),
                           in_shardings=(p_sh, rep), out_shardings=rep)
            with jax_config.persistent_cache_min_compile_time_secs(0.0):
                lowered = head.lower(p_abs, last_abs)
                prog = lowered.compile()
            _, st = self.abstract_inputs(N, 1)
            return N, (prog, self._sampler_program(lowered.out_info, st))

        todo = [T for T in self.ragged_ladder() if T not in self._ragged]
        workers = max(1, min(self.cfg.compile_workers, len(todo) or 1))
        with concurrent.futures.ThreadPoolExecutor(workers) as ex:
            for T, prog in ex.map(build, todo):
                self._ragged[T] = prog
                if progress is not None:
                    progress((S, T))
            for N, progs in ex.map(build_head, [n for n in self.cfg.decode_buckets() if n not in self._heads]):
                self._heads[N] = progs

    def _run_ragged(self, rows: list, bucket: tuple, spans: dict):
        """One ragged step of the scheduler's rows (`execute_scored` for kind "mixed"): host inputs, then
        `_ragged_call`; the results of the rows that sample, in row order (zeros for the others)."""
        S, T = bucket
        groups = self.kv_layout.num_groups if self.kv_layout.grouped else None
        entries = [(row.seq.all_token_ids[row.start:row.start + row.num_new], row.start, row.tables(), row.samples)
                   for row in rows]
        inp = build_ragged_inputs(entries, T, S, self.P, self.page_size, groups=groups)
        sampled = [i for i, row in enumerate(rows) if row.samples]
        n = len(sampled)
        sampling = None
        if n:
            sampling = self._sampling_arrays([rows[i] for i in sampled], next(b for b in self.cfg.decode_buckets()
                                                                              if b >= n))
        offsets = ragged_layout([row.num_new for row in rows])[1] if spans else None
        res, scored = self._ragged_call(tuple(bucket), inp, sampling, n, spans, offsets)
        K = self.max_logprobs
        tokens = np.zeros((len(rows),), np.int32)
        lps = np.zeros((len(rows),), np.float32)
        top_ids = np.full((len(rows), K), -1, np.int32)
        top_lps = np.full((len(rows), K), -np.inf, np.float32)
        if n:
            tokens[sampled], lps[sampled], top_ids[sampled], top_lps[sampled] = res
        return StepResult(tokens, lps, top_ids, top_lps), scored

    def _ragged_call(self, bucket: tuple, inp, sampling: Optional[SamplingTensors], n: int, spans: dict = None,
                     offsets=None):
        """Run a ragged step's programs on host inputs: the forward of T tokens, then (n > 0) the LM head and the
        sampler on the first n of `sampling`'s rows, fetched; the prompt logprobs of `spans` ({row: (lo, hi, start,
        targets)}, the rows' flat `offsets`). Mirrored like `_run` (program set -2), so `follow_step` replays it.
        Returns (the n rows' (tokens, logprobs, top ids, top logprobs) or None, {row: PromptLogprobs})."""
        S, T = bucket
        prog = self._ragged.get(T)
        if prog is None:
            raise CompileWhileServingError(f"no compiled ragged step for T={T}; T: {sorted(self._ragged)}")
        if self.mirror is not None:
            self.mirror(-2, bucket, inp, sampling, n, (spans, offsets) if spans else None)
        placed, placed_st = self.place_inputs((inp, sampling))
        before = compile_count()
        t0 = time.perf_counter()
        (last, hidden), self.kv = prog(self.params, self.kv, placed)
        out = None
        if n:
            head, sampler = self._heads[sampling.temperature.shape[0]]
            res = sampler(head(self.params, last), placed_st)
            out = tuple(a[:n] for a in jax.device_get((res.tokens, res.logprob, res.top_ids, res.top_logprobs)))
        elif self.mirror is not None:
            last.block_until_ready()  # (a step the followers must have read before the next message: see _run)
        self.device_seconds += time.perf_counter() - t0
        scored = self._score_spans(hidden, spans, offsets) if spans else {}
        if compile_count() != before:
            raise CompileWhileServingError("an XLA compilation happened while serving")
        return out, scored

    # -------------------------------------------------------------- pipelining across steps
    @property
    def rotation_stages(self) -> int:
        """S when this runner's decode steps rotate groups through S pipeline stages (`rotate`), else 0: no stages,
        `pipeline_decode="gpipe"`, or not compiled."""
        return self.placement.p if self._rotation else 0

    @property
    def rotation_in_flight(self) -> bool:
        return any(e is not None for e in self._rot_prev)

    def compile_rotation(self) -> None:
        """The pipeline's decode call (`Placement.rotation`) for every decode bucket's group rows, ahead of time."""
        pl = self.placement
        S, D = pl.p, self.model_cfg.hidden_size
        dtype = jnp.dtype(self.cfg.dtype)
        fn = self.rotation_step(self.params, self.kv)
        p_abs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), self.params)
        kv_abs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), self.kv)
        carry_sh = pl.stage_sharding

        def build(R):
            inp, st = self.abstract_inputs(R, 1)
            with jax_config.persistent_cache_min_compile_time_secs(0.0):
                lowered = fn.lower(p_abs, kv_abs, *self.rotation_inputs(R))
                prog = lowered.compile()
            return R, (prog, self._sampler_program(lowered.out_info[0], st))

        rows = [r for r in self.cfg.decode_buckets() if r not in self._rotation]
        with concurrent.futures.ThreadPoolExecutor(max(1, min(self.cfg.compile_workers, len(rows)))) as ex:
            for R, progs in ex.map(build, rows):
                self._rotation[R] = progs
                zeros = np.zeros((S, R, 1, D), dtype)  # (built from every process's copy across processes)
                self._rot_carry[R] = jax.make_array_from_callback(zeros.shape, carry_sh, lambda idx: zeros[idx])

    def rotation_step(self, params, kv):
        """The decode pipeline's call `(params, kv, carry, stacked StepInputs) -> (logits, kv, carry)` under jit
        with the shardings `params` and `kv` carry (arrays, or ShapeDtypeStructs with shardings: tests/mesh_export.py
        exports it for TPU / GPU), KV and carry donated."""
        pl = self.placement

        def call(params, kv, carry, inp):
            return pl.rotation(self.model_cfg, params, kv, carry, inp, page_size=self.page_size,
                               block_pages=self.cfg.attn_block_pages, attention_fn=self.attention_fn,
                               batch_invariant=self.invariance)

        p_sh = jax.tree.map(lambda a: a.sharding, params)
        kv_sh = jax.tree.map(lambda a: a.sharding, kv)
        return jax.jit(call, donate_argnums=(1, 2), in_shardings=(p_sh, kv_sh, pl.stage_sharding, pl.replicated),
                       out_shardings=(pl.replicated, kv_sh, pl.stage_sharding))

    def rotation_inputs(self, R: int) -> tuple:
        """Shapes of a decode pipeline call's carry [S, R, 1, D] and stacked inputs ([S] x an (R, 1) step's)."""
        S = self.placement.p
        inp, _ = self.abstract_inputs(R, 1)
        carry = jax.ShapeDtypeStruct((S, R, 1, self.model_cfg.hidden_size), jnp.dtype(self.cfg.dtype))
        return carry, StepInputs(*(jax.ShapeDtypeStruct((S,) + a.shape, a.dtype) for a in inp))

    def rotate(self, rows: Optional[int], group=None) -> list:
        """One call of the decode pipeline (`compile_rotation`): `group` = (tag, ScheduledRows) enters stage 0
        (None: nothing enters, the stages still advance), `rows` its bucket. Returns [(tag, StepResult)] of the
        group that left the last stage (none while the pipeline fills). A group of another bucket than the ones in
        flight first drains them (calls with nothing entering), so this may return several."""
        done = []
        if rows is not None and rows != self._rot_bucket:
            while self.rotation_in_flight:
                done += self._rotate_once(None)
            self._rot_bucket = rows
        if self._rot_bucket is None:
            return done
        entry = None
        if group is not None:
            tag, srows = group
            R = self._rot_bucket
            inp = self.step_inputs(R, 1, [(row.seq.all_token_ids[row.start:row.start + 1], row.start, row.tables())
                                          for row in srows])
            entry = (tag, inp, self._sampling_arrays(srows, R), len(srows))
        if entry is None and not self.rotation_in_flight:
            return done
        return done + self._rotate_once(entry)

    def _rotate_once(self, entry) -> list:
        R = self._rot_bucket
        stages = [entry] + self._rot_prev  # stage s runs the group pushed s calls ago
        empty = None
        if any(e is None for e in stages):
            empty = self.step_inputs(R, 1, [])
        stacked = StepInputs(*(np.stack([(e[1] if e is not None else empty)[i] for e in stages])
                               for i in range(len(StepInputs._fields))))
        leaving, self._rot_prev = stages[-1], stages[:-1]
        self.stage_ticks[0] += sum(e is not None for e in stages)
        self.stage_ticks[1] += len(stages)
        if leaving is None:
            self._rotation_call(R, stacked, None, 0)
            return []
        tag, _, sampling, n = leaving
        return [(tag, self._rotation_call(R, stacked, sampling, n))]

    def _rotation_call(self, R: int, stacked: StepInputs, sampling: Optional[SamplingTensors], n: int):
        """Run the decode pipeline's program on stacked host inputs, and the sampler on the logits of the group
        leaving (its SamplingTensors; None: no group leaves). Mirrored like `_run` (program set -1)."""
        if self.mirror is not None:
            self.mirror(-1, (R, 1), stacked, sampling, n, None)
        prog, sampler = self._rotation[R]
        self.rotation_calls += 1
        placed, placed_st = self.place_inputs((stacked, sampling))
        before = compile_count()
        t0 = time.perf_counter()
        logits, self.kv, self._rot_carry[R] = prog(self.params, self.kv, self._rot_carry[R], placed)
        result = None
        if sampling is not None:
            res = sampler(logits, placed_st)
            out = jax.device_get((res.tokens, res.logprob, res.top_ids, res.top_logprobs))
            result = StepResult(*(a[:n] for a in out))
        elif self.mirror is not None:
            # Multi-host: the step stream deletes call n's message when it sends n + 1, which is safe once every
            # follower has read it; this call's collectives (the stages span the processes) prove that when it
            # finishes. A call nobody leaves returns nothing to wait for, so wait here (else process 0 runs ahead,
            # deletes a message a follower has not read yet, and the group hangs).
            logits.block_until_ready()
        self.device_seconds += time.perf_counter() - t0
        if compile_count() != before:
            raise CompileWhileServingError("an XLA compilation happened while serving")
        return result

    # -------------------------------------------------------------- one step
    def run(self, programs: dict, bucket: tuple, inputs: StepInputs, sampling: SamplingTensors,
            num_rows: int) -> StepResult:
        """Run the compiled program of `bucket` (from `compile`) on host inputs, KV updated in place. Returns
        the first `num_rows` rows' results as numpy. Raises CompileWhileServingError if anything compiles."""
        return self._run(programs, bucket, inputs, sampling, num_rows)[0]

    def _run(self, programs: dict, bucket: tuple, inputs: StepInputs, sampling: SamplingTensors, num_rows: int,
             spans: Optional[dict] = None):
        """`run`, and the prompt logprobs of `spans` {row: (lo, hi, first position of the row's chunk, target
        ids)} from the step's hidden states ({row: PromptLogprobs}; {} without spans)."""
        prog = programs.get(bucket)
        if prog is None:
            raise CompileWhileServingError(f"no compiled program for bucket {bucket}; buckets: {sorted(programs)}")
        if self.mirror is not None:
            index = next(i for i, p in enumerate(self._program_sets) if p is programs)
            self.mirror(index, bucket, inputs, sampling, num_rows, spans)
        placed = self.place_inputs((inputs, sampling))
        busy, total = self.placement.pipeline_ticks(bucket[0])
        self.stage_ticks[0] += busy
        self.stage_ticks[1] += total
        before = compile_count()
        t0 = time.perf_counter()
        res, self.kv = prog(self.params, self.kv, *placed)
        hidden = None
        if not isinstance(res, SampleResult):  # a prefill_logits_step program: (SampleResult, hidden)
            res, hidden = res
        out = jax.device_get((res.tokens, res.logprob, res.top_ids, res.top_logprobs))
        # From the dispatch to the sampled ids on the host: the step's device time as the host sees it (with
        # async dispatch the call returns at once and device_get waits for the programs).
        self.device_seconds += time.perf_counter() - t0
        if prog.positions:  # a row per position: [R * Q, ...] -> [R, Q, ...]
            out = tuple(a.reshape(tuple(bucket) + a.shape[1:]) for a in out)
        scored = self._score_spans(hidden, spans) if spans else {}
        if compile_count() != before:
            raise CompileWhileServingError("an XLA compilation happened while serving")
        return StepResult(*(a[:num_rows] for a in out)), scored

    def follow_step(self, program_set: int, bucket: tuple, inputs: StepInputs, sampling: SamplingTensors,
                    num_rows: int, spans: Optional[dict] = None) -> None:
        """Run a step process 0 mirrored (`mirror`): the same programs on the same host inputs, so this process's
        devices take part in the step's collectives and its KV shards stay in step; the results are dropped."""
        if program_set == -1:  # a pipeline's rotating decode call (`_rotation_call`)
            self._rotation_call(bucket[0], inputs, sampling, num_rows)
            return
        if program_set == -2:  # a ragged step (`_ragged_call`)
            self._ragged_call(tuple(bucket), inputs, sampling, num_rows, *(spans or ({}, None)))
            return
        self._run(self._program_sets[program_set], tuple(bucket), inputs, sampling, num_rows, spans)

    def _score_spans(self, hidden, spans: dict, offsets=None) -> dict:
        """Prompt logprobs of `spans` (see `_run`) through the scorer, in calls of `score_rows` positions.
        `offsets` (a ragged step, hidden [T, D]): where each row's first new token sits in the flat array."""
        if hidden is None or self._scorer is None:
            raise InvalidConfigError("this runner's prefill programs have no hidden-state output (prompt logprobs)")
        h = np.asarray(jax.device_get(hidden))  # [R, Q, D]; only steps that ask fetch it
        if h.ndim == 2:  # a ragged step's [T, D] (indexed on the host: an op on the device array would compile)
            h = h[None]
        pieces, targets, owners = [], [], []
        for i, (lo, hi, start, tgt) in spans.items():
            if offsets is not None:
                pieces.append(h[0, offsets[i] + lo - start:offsets[i] + hi - start])
            else:
                pieces.append(h[i, lo - start:hi - start])
            targets.append(np.asarray(tgt, np.int32))
            owners.append((i, hi - lo))
        hs, ts = np.concatenate(pieces), np.concatenate(targets)
        N = self.score_rows
        outs = []
        for a in range(0, len(ts), N):  # a prefill step's positions fit one call (N >= its token budget)
            n = min(N, len(ts) - a)
            hb = np.zeros((N, h.shape[-1]), h.dtype)
            hb[:n] = hs[a:a + n]
            tb = np.zeros((N,), np.int32)
            tb[:n] = ts[a:a + n]
            outs.append([x[:n] for x in jax.device_get(self._scorer(self.params, *self.place_inputs(
                (hb, tb, np.int32(n)))))])
        lp, ids, tlp = (np.concatenate(x) for x in zip(*outs))
        scored, a = {}, 0
        for i, n in owners:
            scored[i] = PromptLogprobs(lp[a:a + n], ids[a:a + n], tlp[a:a + n])
            a += n
        return scored

    def execute(self, kind: str, rows: list, bucket: tuple) -> StepResult:
        """Run one scheduled step of the engine's programs. `rows` are ScheduledRows (seq, start, num_new,
        block_table); `kind` ("prefill" | "decode") is the bucket's ladder, for fakes that check it."""
        return self.execute_scored(kind, rows, bucket, {})[0]

    def execute_scored(self, kind: str, rows: list, bucket: tuple, spans: dict):
        """`execute`, and the prompt logprobs of `spans` {row index: (lo, hi)} (positions lo..hi-1 of that
        row's chunk, each scored against the token after it): (StepResult, {row index: PromptLogprobs})."""
        full = {i: (lo, hi, rows[i].start, rows[i].seq.all_token_ids[lo + 1:hi + 1]) for i, (lo, hi) in spans.items()}
        if kind == "mixed":
            return self._run_ragged(rows, bucket, full)
        R, Q = bucket
        inp = self.step_inputs(R, Q, [(row.seq.all_token_ids[row.start:row.start + row.num_new], row.start,
                                       row.tables()) for row in rows])
        return self._run(self._programs, bucket, inp, self._sampling_arrays(rows, R), len(rows), full)

    def synthetic_tables(self, rows: int, context: int, start: Optional[int] = None) -> list:
        """Block tables of `rows` sequences of `context` tokens on pages of their own, as the block manager holds
        them when the next query is at position `start` (default context - 1: a decode step), sliding groups
        trimmed to their window: what `step_inputs` takes, for benchmarks that time a step on fixed inputs."""
        from jaxserve.engine.block_manager import BlockManager

        windows = self.kv_layout.group_windows if self.kv_layout.grouped else (0,)
        bm = BlockManager(self.num_pages, self.page_size, enable_prefix_caching=False, group_windows=windows)
        out = []
        for i in range(rows):
            bm.allocate_prompt(i, [0] * context)
            if not bm.ensure_capacity(i, context):
                raise ValueError(f"{rows} sequences of {context} tokens need more than the {self.num_pages - 1} "
                                 f"KV pages of this runner")
            bm.trim_window(i, context - 1 if start is None else start)
            out.append(bm.group_tables(i) if self.kv_layout.grouped else bm.block_table(i))
        return out

    def step_inputs(self, R: int, Q: int, entries) -> StepInputs:
        """Host arrays of one (R, Q) step. `entries`: per real row, (token ids of its new positions, position of
        the first, block table); with a grouped KV layout the block table is a tuple of one table per page group
        (BlockManager.group_tables). Padding rows and positions write to page 0 slot 0, the null page."""
        ps = self.page_size
        G = self.kv_layout.num_groups if self.kv_layout.grouped else 1
        tokens = np.zeros((R, Q), np.int32)
        positions = np.zeros((R, Q), np.int32)
        q_lens = np.zeros((R,), np.int32)
        kv_lens = np.zeros((R,), np.int32)
        block_tables = np.zeros((G, R, self.P), np.int32)
        slots = np.zeros((G, R, Q), np.int32)
        for i, (toks, start, bt) in enumerate(entries):
            m = len(toks)
            tokens[i, :m] = toks
            pos = np.arange(start, start + m, dtype=np.int32)
            positions[i, :m] = pos
            q_lens[i] = m
            kv_lens[i] = start + m
            tables = bt if isinstance(bt, tuple) else (bt,)
            if len(tables) != G:
                raise ValueError(f"row {i}: {len(tables)} block table(s) for a KV layout of {G} page groups "
                                 f"(give one per group: BlockManager.group_tables, or EngineConfig("
                                 f"sliding_window_reclaim=False) for one table)")
            for g, t in enumerate(tables):
                block_tables[g, i, :len(t)] = t
                slots[g, i, :m] = block_tables[g, i][pos // ps] * ps + pos % ps
        if not self.kv_layout.grouped:
            return StepInputs(tokens, positions, q_lens, kv_lens, block_tables[0], slots[0])
        return StepInputs(tokens, positions, q_lens, kv_lens, block_tables, slots)

    def sampling_inputs(self, entries, R: int) -> SamplingTensors:
        """Host sampling arrays of R rows. `entries`: per real row, a SamplingRow (params, token history for
        penalties, where the output starts in it, output index being sampled, seed, banned ids); padding rows
        are greedy."""
        cols = list(zip(*entries)) if entries else [[]] * 7
        return SamplingTensors(**build_sampling_arrays(*cols[:6], R, self.H, self.NB, masks=cols[6], W=self.W))

    def _sampling_arrays(self, rows: list, R: int) -> SamplingTensors:
        need_hist = any(r.seq.params.uses_history for r in rows)
        # the structured-output rows' grammar masks, computed together (in parallel); rows that sample nothing
        # this step (a prefill chunk short of the prompt's end) need none
        constrained = [r.seq for r in rows if r.seq.grammar is not None and r.start + r.num_new >= r.seq.num_tokens]
        grammar = dict(zip((s.seq_id for s in constrained),
                           fill_masks([s.grammar for s in constrained], self.W))) if constrained else {}
        entries = []
        for r in rows:
            s = r.seq
            entries.append(SamplingRow(
                s.params, s.all_token_ids[: r.start + r.num_new] if need_hist else [], len(s.prompt_token_ids),
                len(s.output_token_ids), s.seed,
                sorted(s.stop_token_ids) if len(s.output_token_ids) < s.params.min_tokens else [],
                None if s.grammar is not None and s.seq_id not in grammar  # (samples nothing this step)
                else self.token_mask(s, grammar=grammar.get(s.seq_id))))
        return self.sampling_inputs(entries, R)

    def token_mask(self, seq, drafts=(), grammar=None):
        """The packed token mask (allowed_token_ids, bad_words, the structured-output grammar) of a sequence's
        next sample, after `drafts` (a verify step's draft tokens before the sampled position, which the grammar
        must accept) are appended to its output; None: none. `grammar`: the grammar's mask, if already computed
        (`structured.fill_masks`)."""
        mask = None
        if seq.token_mask is not None or seq.bad_word_ids:
            out = list(seq.output_token_ids) + list(drafts) if drafts else seq.output_token_ids
            mask = step_token_mask(seq.token_mask, seq.bad_word_ids, out, self.model_cfg.vocab_size)
        if seq.grammar is not None:
            g = grammar if grammar is not None else grammar_mask(seq.grammar, self.W, drafts)
            mask = g if mask is None else np.bitwise_and(mask, g)
        return mask

    @property
    def programs(self) -> dict:
        """The engine's compiled programs, {(R, Q): program} (`compile_all`), for `run`."""
        return self._programs

    def share_programs(self, other: "ModelRunner") -> None:
        """Use `other`'s compiled programs (a runner of the same model, config and placement shapes: the programs
        apply as they are), instead of compiling them again (tests build replicas this way)."""
        self._programs = dict(other._programs)
        self._program_sets[0] = self._programs
        self._ragged, self._heads = dict(other._ragged), dict(other._heads)
        self._samplers, self._scorer = dict(other._samplers), other._scorer

    @property
    def ragged_programs(self) -> dict:
        """The compiled ragged steps' forward programs, {T: program} (`compile_ragged`)."""
        return self._ragged

    def compiled_buckets(self) -> list:
        return sorted(self._programs)
