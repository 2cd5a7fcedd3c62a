"""The engine's attention through the Pallas kernels: `EngineConfig.attention_impl` -> an `attention_fn` for
`jaxserve.models.transformer.forward_step`.

forward_step calls, once per layer inside its `lax.scan`,

    attention_fn(cfg, q, k_cache, v_cache, layer, block_tables, kv_lens, q_pos, window, *, page_size,
                 block_pages, batch_invariant)

with q [R, Q, Hq, hd], the whole cache k/v_cache [L, num_pages * page_size, Hkv, hd] (this step's K/V already
written), the traced layer index, block_tables [R, P], kv_lens [R] (context including the new tokens),
q_pos [R, Q] (-1 for padding slots) and the layer's window (traced). It returns [R, Q, Hq, hd].

No copy of a layer's cache is made: the cache is viewed (a free reshape of contiguous memory) as the pages of
all layers, `[L * num_pages, page_size, Hkv, hd]`, and the layer is selected by offsetting the page ids,
`block_tables + layer * num_pages` (an [R, P] int32 add). Table padding (page 0) becomes the layer's own null
page, which the kernels mask like any other invisible page. An int8 KV cache (`kv_cache_dtype="int8"`, an
`Int8KV` of int8 values and per token-and-head f32 scales) is viewed the same way: int8 pages plus the kernels'
`k_scales` / `v_scales`.

The engine's `attn_block_pages` is the TPU kernels' `pages_per_block` (KV pages per DMA'd block); the Triton
kernels keep their own power-of-two choice.

Decode steps (Q == 1) go to the paged decode kernel. Prefill steps pack the [R, Q] rows (row r has
q_len[r] = count(q_pos[r] >= 0) new tokens, left-aligned) into the ragged kernel's flat layout: a gather of q
to [R*Q, Hq, hd] with segments back to back (cu_q_lens = cumsum(q_len)), the trailing R*Q - sum(q_len) tokens
padding, and a gather back. Both gathers move q-sized data, small next to the KV the kernel reads.

"auto" is Pallas on TPU / GPU and the engine's own XLA path (returned as None) on CPU; "pallas" on CPU runs the
TPU kernels in interpret mode (JAX's HLO interpreter: slow, for tests). On GPU, shapes the Triton kernels cannot
take (non-power-of-two page_size or head_dim, head_dim < 16) give the XLA path under "auto" and a ValueError
under "pallas". `batch_invariant` never reaches these kernels: the runner (jaxserve/engine/runner.py
`_kernel_impl`) resolves "auto" to the XLA path under batch_invariant=True and refuses an explicit "pallas" (the
ragged kernel's query blocks can span sequences, and the matmul's M tile follows the row count).

On a mesh the kernels run under `jax.shard_map` (a Mosaic / Triton custom call cannot be partitioned by GSPMD):
see `engine_attention_fn`'s `mesh` and `QuantMatmulKernel`. The quantized weights' matmuls
(`EngineConfig.matmul_impl`) are bound here too: `bind_matmul_kernels` sets each Int8Weight / Int4Weight's
static `kernel`, which its `matmul` then calls.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from . import dispatch


def _shard_map(fn, mesh, in_specs, out_specs):
    """shard_map over the axes of `mesh` that are not manual yet. Inside the pipeline's shard_map over "stage"
    the context mesh (abstract, "stage" manual) must be used instead of the concrete one, and only "model" is
    left to map."""
    ctx = jax.sharding.get_abstract_mesh()
    m = ctx if (not ctx.empty and ctx.manual_axes) else mesh
    axes = frozenset(m.axis_names) - frozenset(ctx.manual_axes if not ctx.empty else ())
    return jax.shard_map(fn, mesh=m, in_specs=in_specs, out_specs=out_specs, axis_names=axes, check_vma=False)


def attention_split(num_heads: int, num_kv_heads: int, q_ok: bool, kv_ok: bool) -> tuple:
    """(q_split, kv_split) of the kernels' shard_map, from what the partition rules split (jaxserve/parallel/
    rules.attention_split). Query heads may be split while the KV heads are replicated only with one KV head:
    then every device's query heads read that head. With several replicated KV heads a device's query-head block
    would pair with the wrong KV heads, so attention runs replicated (queries gathered: q-sized traffic)."""
    if q_ok and kv_ok:
        return True, True
    if q_ok and num_kv_heads == 1:
        return True, False
    return False, False


def engine_attention_fn(impl: str, *, head_dim: int, page_size: int, platform: Optional[str] = None,
                        kernel: Optional[str] = None, interpret=None, mesh=None, q_split: bool = False,
                        kv_split: bool = False) -> Optional[Callable]:
    """The forward_step attention_fn for `impl` ("auto" | "xla" | "pallas"), or None for the engine's XLA path.

    `platform` defaults to jax.default_backend(); `kernel` forces a kernel family ("tpu" | "gpu", e.g. the
    Triton kernels interpreted on CPU); `interpret` overrides the interpret setting (e.g. a
    pltpu.InterpretParams). Raises ValueError for an unknown impl, or "pallas" with shapes the kernels cannot take.

    `mesh` (a replica's ("stage", "model") mesh): every kernel call runs under `jax.shard_map` over the mesh
    axes not already manual (a Mosaic / Triton custom call cannot be auto-partitioned by GSPMD): query heads
    split over "model" when `q_split`, KV heads (pages, scales) when `kv_split`, else replicated; block tables
    and lengths replicated. See `attention_split`.
    """
    backend = dispatch.attention_backend(impl, platform)
    if backend == "xla":
        return None
    fam, interp = dispatch._family(platform, kernel)
    if fam == "gpu" and not dispatch._gpu_shape_ok(page_size, head_dim):
        if impl == "auto":
            return None
        raise ValueError(f"attention_impl='pallas' on GPU needs a power-of-two page_size and head_dim >= 16 "
                         f"(Triton); got page_size={page_size}, head_dim={head_dim}")
    if interpret is not None:
        interp = interpret
    mod_decode, mod_prefill = dispatch.kernel_modules(fam)

    def prepare(cfg, k_cache, v_cache, layer, block_tables, window, block_pages):
        """(kernel_call, tables): the all-layer page view of the cache and the layer's page ids; kernel_call(fn, q_,
        *meta) runs a kernel on them (under shard_map on a mesh), q_ [N, Hq, hd] -> [N, Hq, hd]."""
        num_layers, slots, hkv, hd = k_cache.shape
        n = slots // page_size
        kw = dict(scale=float(cfg.attn_scale), window=jnp.asarray(window, jnp.int32),
                  softcap=cfg.attn_logit_softcap, interpret=interp)
        if hasattr(k_cache, "scales"):
            # An int8 KV cache (jaxserve.models.kv_cache.Int8KV): int8 values + f32 scales [L, slots, Hkv],
            # viewed as the kernels' int8 pages and k_scales / v_scales [pages, page_size, Hkv].
            kw["k_scales"] = k_cache.scales.reshape(num_layers * n, page_size, hkv)
            kw["v_scales"] = v_cache.scales.reshape(num_layers * n, page_size, hkv)
            k_cache, v_cache = k_cache.q, v_cache.q
        elif hasattr(k_cache, "bits"):  # a bfloat16 cache stored as bits on CPU (jaxserve.models.kv_cache.Bf16KV)
            k_cache, v_cache = k_cache.as_bfloat16(), v_cache.as_bfloat16()
        k_pages = k_cache.reshape(num_layers * n, page_size, hkv, hd)
        v_pages = v_cache.reshape(num_layers * n, page_size, hkv, hd)
        tables = block_tables.astype(jnp.int32) + jnp.asarray(layer, jnp.int32) * n
        if fam == "tpu" and block_pages:
            # Default 16 pages = the kernels' own default of 256 tokens at page_size 16. It also bounds the
            # kernels' unrolled per-page DMA code, which matters for interpret-mode compile time.
            kw["pages_per_block"] = int(block_pages)
        scales = (kw.pop("k_scales"), kw.pop("v_scales")) if "k_scales" in kw else ()
        window_arr = kw.pop("window")

        def kernel_call(fn, q_, *meta):
            def local(q_, kp, vp, win, *rest):
                sc = dict(zip(("k_scales", "v_scales"), rest[:len(scales)]))
                return fn(q_, kp, vp, *rest[len(scales):], window=win, **sc, **kw)

            args = (q_, k_pages, v_pages, window_arr, *scales, *meta)
            if mesh is None:
                return local(*args)
            hs, ks = ("model" if q_split else None), ("model" if kv_split else None)
            specs = (P(None, hs, None), P(None, None, ks, None), P(None, None, ks, None), P(),
                     *(P(None, None, ks) for _ in scales), *(P() for _ in meta))
            return _shard_map(local, mesh, specs, P(None, hs, None))(*args)

        return kernel_call, tables

    def attention_fn(cfg, q, k_cache, v_cache, layer, block_tables, kv_lens, q_pos, window, *, page_size,
                     block_pages=None, batch_invariant=False):
        del batch_invariant  # see the module docstring
        kernel_call, tables = prepare(cfg, k_cache, v_cache, layer, block_tables, window, block_pages)
        kv_lens = kv_lens.astype(jnp.int32)
        r, qn, hq, hd = q.shape
        if qn == 1:
            out = kernel_call(mod_decode.paged_attention_decode, q[:, 0], tables, kv_lens)
            return out[:, None]
        q_lens = jnp.sum(q_pos >= 0, axis=1).astype(jnp.int32)
        cu = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(q_lens).astype(jnp.int32)])
        t = r * qn
        tok = jnp.arange(t, dtype=jnp.int32)
        seq = jnp.minimum(jnp.searchsorted(cu[1:], tok, side="right"), r - 1).astype(jnp.int32)
        src = jnp.where(tok < cu[r], seq * qn + tok - cu[seq], 0)
        q_flat = q.reshape(t, hq, hd)[src]
        out_flat = kernel_call(mod_prefill.ragged_prefill_attention, q_flat, tables, cu, kv_lens,
                               jnp.full((1,), r, jnp.int32))
        valid = jnp.arange(qn, dtype=jnp.int32)[None, :] < q_lens[:, None]               # [R, Q]
        idx = jnp.where(valid, cu[:-1, None] + jnp.arange(qn, dtype=jnp.int32)[None, :], 0)
        out = out_flat[idx]                                                               # [R, Q, Hq, hd]
        return jnp.where(valid[:, :, None, None], out, jnp.zeros((), out.dtype))

    def ragged_fn(cfg, q, k_cache, v_cache, layer, block_tables, inp, window, *, page_size, block_pages=None):
        """The ragged step's attention (jaxserve.models.ragged: `ragged_attention_xla`'s signature) through the
        ragged kernel: q [T, Hq, hd] in the step's layout (chunks tile-aligned and padded) is gathered to its real
        tokens back to back (`inp.compact_idx`), the rows' tables and lengths to layout order (`inp.kernel_rows`),
        and the output gathered back (`inp.expand_idx`); padding tokens come out as zeros."""
        kernel_call, tables = prepare(cfg, k_cache, v_cache, layer, block_tables, window, block_pages)
        rows = inp.kernel_rows
        out = kernel_call(mod_prefill.ragged_prefill_attention, q[inp.compact_idx], tables[rows], inp.cu_q_lens,
                          inp.kv_lens.astype(jnp.int32)[rows], inp.num_rows)
        return jnp.where((inp.positions >= 0)[:, None, None], out[inp.expand_idx], jnp.zeros((), out.dtype))

    attention_fn.kernel_family = fam
    attention_fn.interpret = interp
    attention_fn.ragged = ragged_fn
    return attention_fn


# ------------------------------------------------------------------------------------------------------------
# Quantized matmuls: EngineConfig.matmul_impl
# ------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class QuantMatmulKernel:
    """How one quantized weight (jaxserve.models.quantized.Int8Weight / Int4Weight, its `kernel` field) runs
    its matmul through pallas_kernels/quant_matmul.py. Hashable: it is static pytree metadata of the weight.

    On a mesh, `k_axis` / `n_axis` name the mesh axis that splits the weight's K (row-parallel: wo, w_down) or
    N (column-parallel: wq/wk/wv, w_gate/w_up, the vocab-parallel LM head), read from the placed array's
    sharding; the kernel then runs under shard_map on each device's shard:
    * column-parallel: x replicated, w [K, N/t] -> y [M, N/t], left split over N;
    * row-parallel int8: x split over K like w -> f32 partial sums -> psum over "model";
    * row-parallel int4: packed row i holds weight rows i and K/2 + i, so a device's K/(2t) packed rows are two
      runs of K; its x is x[:, run 1] ++ x[:, run 2] (a local split-halves layout the kernel takes as it is)
      and its group scales are the matching rows of the (replicated along K) scale table;
    * replicated weight: every device runs the whole product.
    """

    family: str  # "tpu" | "gpu"
    interpret: object = False
    mesh: object = None
    k_axis: Optional[str] = None
    n_axis: Optional[str] = None

    def _local(self, x, w_q, scales, bits, group_size, out_dtype):
        from . import quant_matmul

        f = quant_matmul.quantized_matmul_tpu if self.family == "tpu" else quant_matmul.quantized_matmul_gpu
        return f(x, w_q, scales, bits=bits, group_size=group_size, interpret=self.interpret, out_dtype=out_dtype)

    def __call__(self, x, w, out_dtype):
        """x [M, K] @ w -> [M, N] in out_dtype."""
        bits, g = w.bits, w.group_size
        out_dtype = jnp.dtype(out_dtype)
        if self.mesh is None:
            return self._local(x, w.w_q, w.scales, bits, g, out_dtype)
        ka, na = self.k_axis, self.n_axis
        if ka is None:  # column-parallel (na set) or replicated (both None)
            s_spec = P(na) if bits == 8 else P(None, na)
            fn = lambda x_, q_, s_: self._local(x_, q_, s_, bits, g, out_dtype)  # noqa: E731
            return _shard_map(fn, self.mesh, (P(), P(None, na), s_spec), P(None, na))(x, w.w_q, w.scales)
        if bits == 8:
            def row8(x_, q_, s_):
                return jax.lax.psum(self._local(x_, q_, s_, 8, None, jnp.float32), ka)

            y = _shard_map(row8, self.mesh, (P(None, ka), P(ka, None), P(None)), P())(x, w.w_q, w.scales)
            return y.astype(out_dtype)
        half = w.w_q.shape[0]

        def row4(x_lo, x_hi, q_, s_):
            local_half = q_.shape[0]
            gl = local_half // g  # groups per local half
            d = jax.lax.axis_index(ka)
            s_lo = jax.lax.dynamic_slice_in_dim(s_, d * gl, gl, axis=0)
            s_hi = jax.lax.dynamic_slice_in_dim(s_, (half // g) + d * gl, gl, axis=0)
            xl = jnp.concatenate([x_lo, x_hi], axis=1)
            y = self._local(xl, q_, jnp.concatenate([s_lo, s_hi], axis=0), 4, g, jnp.float32)
            return jax.lax.psum(y, ka)

        y = _shard_map(row4, self.mesh, (P(None, ka), P(None, ka), P(ka, None), P()), P())(
            x[:, :half], x[:, half:], w.w_q, w.scales)
        return y.astype(out_dtype)


def matmul_backend(impl: str, platform: Optional[str] = None) -> str:
    """EngineConfig.matmul_impl -> "xla" | "pallas" ("auto": Pallas on TPU / GPU, XLA on CPU)."""
    if impl not in dispatch.IMPLS:
        raise ValueError(f"matmul_impl must be one of {dispatch.IMPLS}, got {impl!r}")
    return dispatch.attention_backend(impl, platform)


def bind_matmul_kernels(params, impl: str, *, platform: Optional[str] = None, kernel: Optional[str] = None,
                        interpret=None, mesh=None):
    """params with every quantized weight's `kernel` set for `impl` (None, the XLA formulation, for "xla").

    On a mesh each weight's split is read from its placed `w_q` sharding (jaxserve/parallel/rules.py decides
    it); a row-parallel int4 weight whose per-device share of K is not whole groups runs replicated (correct,
    but it gathers the weight), with a warning."""
    from jaxserve.models.quantized import is_quantized

    if matmul_backend(impl, platform) == "xla":
        return params
    fam, interp = dispatch._family(platform, kernel)
    if interpret is not None:
        interp = interpret

    def bind(w):
        if not is_quantized(w):
            return w
        ka = na = None
        if mesh is not None:
            spec = tuple(getattr(w.w_q.sharding, "spec", ()))
            spec = spec + (None,) * (w.w_q.ndim - len(spec))
            ka, na = spec[-2], spec[-1]
            if ka is not None and w.bits == 4:
                t = int(mesh.shape[ka])
                if (w.w_q.shape[-2] // t) % w.group_size:
                    import logging

                    logging.getLogger("jaxserve").warning(
                        "int4 weight %s: K/2/%d packed rows are not whole groups of %d; its Pallas matmul runs "
                        "replicated", w.shape, t, w.group_size)
                    ka = None
        return dataclasses.replace(w, kernel=QuantMatmulKernel(fam, interp, mesh, ka, na))

    return jax.tree.map(bind, params, is_leaf=is_quantized)
