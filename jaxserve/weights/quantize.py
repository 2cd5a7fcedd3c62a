"""Weight-only quantization: int8 per output channel and int4 group-wise, as pytree types the model consumes.

Formats are exactly those of `pallas_kernels/reference.py` (and so of `pallas_kernels.dispatch.matmul`):

* `Int8Weight`: `w_q` int8 `[..., K, N]`, `scales` f32 `[..., N]`; `w = w_q * scales` (symmetric, absmax / 127).
* `Int4Weight`: `w_q` uint8 `[..., K/2, N]`, two values per byte, `scales` f32 `[..., K/group, N]`; packed byte
  row i holds weight row i (low nibble) and row K/2 + i (high nibble), two's-complement nibbles in [-8, 7];
  `w = q * scales[group of the row]` (symmetric, absmax / 7). Needs K % (2 * group_size) == 0.

Leading axes (`...`) are the stacked-layer axis of `params["layers"]`: `lax.scan` and `x[i]` slice both arrays
alike, so a quantized leaf goes wherever a float `[L, K, N]` leaf went. `transformer.dense` calls
`w.matmul(x)` for these types; everything else in the model is unchanged.

The embedding / tied LM head (`params["embed"]`, float `[V, D]`) is quantized, when asked, as the LM head's
`[K=D, N=V]` matrix: one int8 scale per vocabulary row, which is also exactly a per-row quantization of the
embedding table, so one array serves the lookup (`take_rows`) and the projection.

CPU matmul formulation (see docs/quantization.md and scripts/bench_quant_matmul.py for the measurements):
XLA:CPU runs f32 matrix-vector products at memory bandwidth but int8/bf16 ones far slower, and a
dequantize-then-dot materializes the whole f32 weight. `matmul` instead walks N in column chunks in a loop,
dequantizing one chunk at a time so the f32 tile stays in cache and the int8 bytes are the only weight traffic
from memory.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.errors import InvalidConfigError

SCHEMES = ("int8", "int4", "gptq")  # EngineConfig.quantization (AWQ is not implemented)
DEFAULT_GROUP_SIZE = 64  # divides 2 x every K of Gemma 3 270M (640, 1024, 2048); 128 does not divide 640 / 2
# Linear layers of params["layers"] (every matmul weight; norms and biases stay float).
LINEAR_KEYS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
# Columns per chunk of the chunked CPU matmul (f32 tile of K x CHUNK stays in L2 for K <= 2048).
CHUNK_COLS = 2048


def dot_f32(a, w, dims=(((1,), (0,)), ((), ()))):
    """a [M, K] contracted with w by `dims` (default a @ w), accumulated and returned in float32.

    Two float32 operands: exactly `a @ w` (the reference numerics). With a narrow float (bf16) operand this is
    the fast XLA:CPU dot (AVX512-BF16); a dot with a bf16 *result* is upcast instead (both operands converted to
    f32 on every call). One-row bf16 dots take a slow matrix-vector path on XLA:CPU, so on CPU a single row is
    then computed as two. (`models.transformer.float_matmul` uses it for bf16 weights, the quantized matmuls
    below for every activation dtype.)
    """
    narrow = a.dtype != jnp.float32 or w.dtype != jnp.float32
    one = narrow and a.shape[0] == 1 and jax.default_backend() == "cpu"
    if one:
        a = jnp.concatenate([a, a])
    y = jax.lax.dot_general(a, w, dims, preferred_element_type=jnp.float32)
    return y[:1] if one else y


def _int8_block(x, w_q, scales):
    """x [M, K] @ (w_q * scales) for one block of columns, float32: the int8 values in x's dtype (exact in
    bf16 too) times x, accumulated in f32 (dot_f32), then the f32 scales."""
    return dot_f32(x, w_q.astype(x.dtype)) * scales.astype(jnp.float32)


def _int8_mm(x, w_q, scales, chunk):
    """x [M, K] @ (w_q int8 [K, N] * scales [N]) with N walked in chunks; float32 [M, N]."""
    K, N = w_q.shape
    if chunk is None or N <= chunk or N % chunk:
        return _int8_block(x, w_q, scales)
    return _column_chunks(x, N, chunk, lambda i: _int8_block(x, _cols(w_q, i, chunk), _cols(scales, i, chunk)))


def _cols(a, i, chunk):
    """Columns [i * chunk, (i + 1) * chunk) of a [..., N] array (a slice read in place, no copy of `a`)."""
    return jax.lax.dynamic_slice_in_dim(a, i * chunk, chunk, axis=a.ndim - 1)


def _column_chunks(x, N, chunk, block):
    """[M, N] output of `block(i)` -> [M, chunk] for column chunk i, walked by a loop over the N // chunk chunks.

    The loop slices the weight in place. (Reshaping it to [N // chunk, K, chunk] for a `lax.map` instead made
    XLA:CPU copy the whole weight into that layout on every call: for the quantized 262,144 x 640 LM head, whose
    array the embedding lookup also reads, that copy cost ~100 ms per decode step.)
    """
    def body(i, y):
        return jax.lax.dynamic_update_slice_in_dim(y, block(i), i * chunk, axis=1)

    # The output is float32 whatever x is: XLA:CPU has no bf16 dynamic-update-slice (it would convert the
    # whole [M, N] output to f32 and back at every chunk); callers round it once at the end.
    return jax.lax.fori_loop(0, N // chunk, body, jnp.zeros((x.shape[0], N), jnp.float32))


def unpack_int4(w_q):
    """uint8 [..., K/2, N] -> int8 [..., K, N] in [-8, 7] (the split-halves packing)."""
    b = w_q.astype(jnp.int32)
    lo = ((b & 0xF) ^ 8) - 8
    hi = (((b >> 4) & 0xF) ^ 8) - 8
    return jnp.concatenate([lo, hi], axis=-2).astype(jnp.int8)


def pack_int4(q):
    """int [..., K, N] values in [-8, 7] -> uint8 [..., K/2, N] (row i low nibble, row K/2 + i high nibble)."""
    q = np.asarray(q).astype(np.int32)
    k = q.shape[-2]
    if k % 2:
        raise InvalidConfigError(f"int4 packing needs an even number of rows, got {k}")
    if q.min(initial=0) < -8 or q.max(initial=0) > 7:
        raise InvalidConfigError("int4 values must lie in [-8, 7]")
    lo, hi = q[..., : k // 2, :], q[..., k // 2:, :]
    return ((lo & 0xF) | ((hi & 0xF) << 4)).astype(np.uint8)


def _int4_mm(x, w_q, scales, group_size):
    """x [M, K] @ int4 weight: two half-K dots (low nibbles take x[:, :K/2], high nibbles x[:, K/2:]); f32."""
    half = w_q.shape[0]
    b = w_q.astype(jnp.int32)
    lo = (((b & 0xF) ^ 8) - 8).astype(x.dtype)
    hi = ((((b >> 4) & 0xF) ^ 8) - 8).astype(x.dtype)
    s = jnp.repeat(scales.astype(x.dtype), group_size, axis=0)  # [K, N], dequantized in x's dtype
    return dot_f32(x[:, :half], lo * s[:half]) + dot_f32(x[:, half:], hi * s[half:])


def _int4_mm_chunked(x, w_q, scales, group_size, chunk):
    half, N = w_q.shape
    if chunk is None or N <= chunk or N % chunk:
        return _int4_mm(x, w_q, scales, group_size)
    return _column_chunks(x, N, chunk, lambda i: _int4_mm(x, _cols(w_q, i, chunk), _cols(scales, i, chunk),
                                                          group_size))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Int8Weight:
    """Symmetric int8, one f32 scale per output column. w_q int8 [..., K, N], scales f32 [..., N]."""

    w_q: jax.Array
    scales: jax.Array
    chunk: Optional[int] = dataclasses.field(default=CHUNK_COLS, metadata=dict(static=True))
    # The Pallas matmul this weight runs through (EngineConfig.matmul_impl; pallas_kernels/engine.py
    # bind_matmul_kernels), None for the XLA formulation below. Static: it picks the program, it holds no data.
    kernel: Optional[object] = dataclasses.field(default=None, metadata=dict(static=True))

    bits = 8
    group_size = None

    @property
    def shape(self):
        return tuple(self.w_q.shape)

    @property
    def ndim(self):
        return len(self.w_q.shape)

    def __getitem__(self, i):
        return Int8Weight(self.w_q[i], self.scales[i], self.chunk, self.kernel)

    def matmul(self, x, out_dtype=None):
        """x [..., K] -> [..., N] in `out_dtype` (default x.dtype), accumulated in float32."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if self.kernel is not None:
            return self.kernel(x2, self, out_dtype or x.dtype).reshape(*lead, self.shape[-1])
        y = _int8_mm(x2, self.w_q, self.scales, self.chunk)
        return y.reshape(*lead, self.shape[-1]).astype(out_dtype or x.dtype)

    def dequantize(self, dtype=jnp.float32):
        return (self.w_q.astype(jnp.float32) * self.scales[..., None, :].astype(jnp.float32)).astype(dtype)

    def take_rows(self, tokens):
        """Embedding lookup for an LM-head-shaped [D, V] weight: rows `tokens` of its [V, D] transpose."""
        cols = jnp.take(self.w_q, tokens, axis=-1)  # [D, *tokens.shape]
        s = jnp.take(self.scales, tokens, axis=-1)
        return jnp.moveaxis(cols, 0, -1).astype(jnp.float32) * s[..., None]

    @property
    def nbytes(self) -> int:
        return int(self.w_q.size * 1 + self.scales.size * self.scales.dtype.itemsize)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Int4Weight:
    """Symmetric int4, group-wise along K, two values per byte (split halves). See the module docstring."""

    w_q: jax.Array
    scales: jax.Array
    group_size: int = dataclasses.field(default=DEFAULT_GROUP_SIZE, metadata=dict(static=True))
    chunk: Optional[int] = dataclasses.field(default=CHUNK_COLS, metadata=dict(static=True))
    kernel: Optional[object] = dataclasses.field(default=None, metadata=dict(static=True))  # as Int8Weight's

    bits = 4

    @property
    def shape(self):
        s = tuple(self.w_q.shape)
        return s[:-2] + (2 * s[-2], s[-1])

    @property
    def ndim(self):
        return len(self.w_q.shape)

    def __getitem__(self, i):
        return Int4Weight(self.w_q[i], self.scales[i], self.group_size, self.chunk, self.kernel)

    def matmul(self, x, out_dtype=None):
        """x [..., K] -> [..., N] in `out_dtype` (default x.dtype), accumulated in float32."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if self.kernel is not None:
            return self.kernel(x2, self, out_dtype or x.dtype).reshape(*lead, self.shape[-1])
        y = _int4_mm_chunked(x2, self.w_q, self.scales, self.group_size, self.chunk)
        return y.reshape(*lead, self.shape[-1]).astype(out_dtype or x.dtype)

    def int_values(self):
        return unpack_int4(self.w_q)

    def dequantize(self, dtype=jnp.float32):
        q = unpack_int4(self.w_q).astype(jnp.float32)
        s = jnp.repeat(self.scales.astype(jnp.float32), self.group_size, axis=-2)
        return (q * s).astype(dtype)

    def take_rows(self, tokens):
        b = jnp.take(self.w_q, tokens, axis=-1).astype(jnp.int32)  # [K/2, *T]
        q = jnp.concatenate([((b & 0xF) ^ 8) - 8, (((b >> 4) & 0xF) ^ 8) - 8], axis=0).astype(jnp.float32)
        s = jnp.repeat(jnp.take(self.scales, tokens, axis=-1), self.group_size, axis=0)
        return jnp.moveaxis(q * s, 0, -1)

    @property
    def nbytes(self) -> int:
        return int(self.w_q.size + self.scales.size * self.scales.dtype.itemsize)


QuantizedWeight = (Int8Weight, Int4Weight)


def is_quantized(x) -> bool:
    return isinstance(x, QuantizedWeight)


# ------------------------------------------------------------------------------------------------ quantizers
def check_group_size(group_size, k: Optional[int] = None, where: str = "") -> int:
    """Validate an int4 group size (positive int; K % (2 * group_size) == 0 when K is given)."""
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) or group_size <= 0:
        raise InvalidConfigError(f"int4 group_size must be a positive integer, got {group_size!r}")
    if k is not None and k % (2 * group_size):
        ok = [g for g in (16, 32, 64, 128, 256) if k % (2 * g) == 0]
        raise InvalidConfigError(
            f"int4 group_size {group_size} does not fit {where or 'a weight'} with K={k}: K must be a multiple of "
            f"2 x group_size (two values per byte, groups within each half); group sizes that fit: {ok}")
    return int(group_size)


def _ref():
    # The formats' definition; imported lazily so the model never imports Pallas on CPU.
    from pallas_kernels import reference

    return reference


def _over_leading(fn, w):
    """Apply fn to each [K, N] matrix of w [..., K, N] (stacked layers)."""
    for _ in range(w.ndim - 2):
        fn = jax.vmap(fn)
    return fn(w)


def quantize_int8(w, chunk: Optional[int] = CHUNK_COLS) -> Int8Weight:
    """float [..., K, N] -> Int8Weight: pallas_kernels.reference.quantize_int8 (scale = absmax / 127 per output
    column, round to nearest) on each matrix."""
    w_q, scales = _over_leading(_ref().quantize_int8, jnp.asarray(w, jnp.float32))
    return Int8Weight(np.asarray(w_q), np.asarray(scales), chunk)


def quantize_int4(w, group_size: int = DEFAULT_GROUP_SIZE, chunk: Optional[int] = CHUNK_COLS) -> Int4Weight:
    """float [..., K, N] -> Int4Weight: pallas_kernels.reference.quantize_int4 (naive round to nearest, scale =
    absmax / 7 per group of `group_size` rows and column) on each matrix."""
    k = np.shape(w)[-2]
    check_group_size(group_size, k)
    fn = lambda m: _ref().quantize_int4(m, int(group_size))  # noqa: E731
    w_q, scales = _over_leading(fn, jnp.asarray(w, jnp.float32))
    return Int4Weight(np.asarray(w_q), np.asarray(scales), int(group_size), chunk)


def _map_layers(fn, params, keys):
    layers = dict(params["layers"])
    for k in keys:
        if k in layers:
            layers[k] = fn(k, layers[k])
    return {**params, "layers": layers}


def quantize_params(params: dict, scheme: str, group_size: int = DEFAULT_GROUP_SIZE, quantize_embed: bool = False,
                    int4_override: Optional[dict] = None) -> dict:
    """Quantize every linear layer of `params` with `scheme` ("int8" | "int4"); norms and biases stay float.

    `quantize_embed` also quantizes the embedding / LM head (tied: one [D, V] table; untied: lm_head [D, V];
    the untied input embedding then stays float). `int4_override` maps a layer key to a ready Int4Weight
    (calibrated weights from jaxserve.weights.calibrate).
    """
    if scheme not in ("int8", "int4"):
        raise InvalidConfigError(f"quantize_params takes 'int8' or 'int4' (calibrated schemes: calibrate.py), "
                                 f"got {scheme!r}")
    if any(is_quantized(v) for v in params["layers"].values()):
        raise InvalidConfigError("params are already quantized")

    def q(name, w):
        if int4_override and name in int4_override:
            return int4_override[name]
        if scheme == "int8":
            return quantize_int8(w)
        check_group_size(group_size, np.shape(w)[-2], name)
        return quantize_int4(w, group_size)

    out = _map_layers(q, params, LINEAR_KEYS)
    if quantize_embed:
        if "lm_head" in params:
            out["lm_head"] = q("lm_head", params["lm_head"])
        else:
            out["embed"] = q("embed", np.asarray(params["embed"], np.float32).T)
    return out


def params_nbytes(params) -> int:
    """Bytes of every array of a params pytree (quantized leaves: packed values + scales)."""
    leaves = jax.tree_util.tree_leaves(params)
    return int(sum(np.dtype(a.dtype).itemsize * math.prod(a.shape) for a in leaves))


def resident_nbytes(params) -> int:
    """Bytes of the device buffers actually held by `params` (jax arrays: their on-device buffers)."""
    total = 0
    for a in jax.tree_util.tree_leaves(params):
        if isinstance(a, jax.Array):
            total += sum(s.data.nbytes for s in a.addressable_shards)
        else:
            total += np.asarray(a).nbytes
    return int(total)


def describe(params) -> dict:
    """{"scheme", "group_size", "embed"} of a params pytree (None scheme when nothing is quantized)."""
    leaves = [v for v in params["layers"].values() if is_quantized(v)]
    head = params.get("lm_head", params.get("embed"))
    if not leaves:
        return {"scheme": None, "group_size": None, "embed": False}
    w = leaves[0]
    return {"scheme": "int8" if w.bits == 8 else "int4", "group_size": w.group_size, "embed": is_quantized(head)}


def to_device(params, dtype):
    """jnp arrays; float leaves cast to `dtype`, quantized leaves kept as they are (int values, f32 scales)."""
    def conv(a):
        if is_quantized(a):
            return jax.tree.map(jnp.asarray, a)
        arr = np.asarray(a) if not isinstance(a, jax.Array) else a
        return jnp.asarray(arr, dtype=dtype if jnp.issubdtype(arr.dtype, jnp.floating) else None)

    return jax.tree.map(conv, params, is_leaf=is_quantized)


# ------------------------------------------------------------------------------------------------ int8 KV cache
def quantize_kv_int8(x):
    """[..., Hkv, hd] float -> (int8 [..., Hkv, hd], f32 scales [..., Hkv]): symmetric, absmax / 127 per token and
    head (the formula of pallas_kernels.reference.quantize_kv_int8)."""
    x = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=-1)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    q = jnp.clip(jnp.round(x / scale[..., None]), -127, 127).astype(jnp.int8)
    return q, scale


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Int8KV:
    """One of the KV cache's K or V: int8 values [L, slots, Hkv, hd] and f32 scales [L, slots, Hkv].

    Per layer, `q` viewed as [num_pages, page_size, Hkv, hd] and `scales` as [num_pages, page_size, Hkv] are the
    Pallas kernels' int8 pages and k_scales / v_scales. Indexing (`cache[layer, slots]`) returns dequantized
    float32, so the attention code reads it like a float cache.
    """

    q: jax.Array
    scales: jax.Array

    @staticmethod
    def zeros(shape) -> "Int8KV":
        return Int8KV(jnp.zeros(shape, jnp.int8), jnp.ones(shape[:-1], jnp.float32))

    @property
    def shape(self):
        return tuple(self.q.shape)

    @property
    def dtype(self):
        return self.q.dtype

    def __getitem__(self, idx):
        return self.q[idx].astype(jnp.float32) * self.scales[idx][..., None]

    def write(self, layer, slots, x):
        q, s = quantize_kv_int8(x)
        return Int8KV(self.q.at[layer, slots].set(q), self.scales.at[layer, slots].set(s))

    @property
    def nbytes(self) -> int:
        return int(self.q.size + self.scales.size * 4)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Bf16KV:
    """One of a bfloat16 KV cache's K or V on XLA:CPU, stored as its bits: uint16 [L, slots, Hkv, hd].

    XLA:CPU has no bfloat16 gather, scatter or dynamic-update-slice: it converts the operand to float32 and
    back, i.e. the whole cache, at every layer of every step (Gemma 3 270M with 6,000 pages: ~5 s per step
    instead of ~0.1 s). The same ops on uint16 run in place; only the rows read or written are bitcast.
    Indexing returns bfloat16 (the attention code casts to float32); `write` stores x rounded to bfloat16.
    Other backends keep a plain bfloat16 array (jaxserve.models.transformer.init_kv_cache).
    """

    bits: jax.Array

    @staticmethod
    def used_for(dtype) -> bool:
        """Whether a KV cache of `dtype` is kept as a Bf16KV here (bfloat16 on XLA:CPU)."""
        return jnp.dtype(dtype) == jnp.bfloat16 and jax.default_backend() == "cpu"

    @staticmethod
    def zeros(shape) -> "Bf16KV":
        return Bf16KV(jnp.zeros(shape, jnp.uint16))

    @property
    def shape(self):
        return tuple(self.bits.shape)

    @property
    def dtype(self):
        return jnp.dtype(jnp.bfloat16)

    def __getitem__(self, idx):
        return jax.lax.bitcast_convert_type(self.bits[idx], jnp.bfloat16)

    def write(self, layer, slots, x):
        return Bf16KV(self.bits.at[layer, slots].set(jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.uint16)))

    def as_bfloat16(self):
        """The whole cache as a bfloat16 array (a bitcast; for the Pallas kernels, which take pages)."""
        return jax.lax.bitcast_convert_type(self.bits, jnp.bfloat16)

    @property
    def nbytes(self) -> int:
        return int(self.bits.size * 2)


def ensure_quantized(params, engine_cfg):
    """Apply `EngineConfig.quantization` ("int8" | "int4" round-to-nearest) to float params; params that are
    already quantized (a converted quantized checkpoint, or GPTQ from calibrate.py) must match it."""
    scheme = getattr(engine_cfg, "quantization", None)
    if scheme is None:
        return params
    if scheme not in SCHEMES:
        raise InvalidConfigError(f"unknown quantization {scheme!r}: use None, 'int8', 'int4' or 'gptq'")
    have = describe(params)["scheme"]
    if have is not None:
        want = "int8" if scheme == "int8" else "int4"
        if have != want:
            raise InvalidConfigError(f"the weights are already quantized as {have}; they cannot be served as "
                                     f"{scheme!r} (load the float checkpoint, or drop quantization=)")
        return params
    if scheme == "gptq":
        raise InvalidConfigError("quantization='gptq' needs calibration: use LLM(..., quantization='gptq') or "
                                 "`jaxserve convert --quant gptq`, not a bare engine")
    return quantize_params(params, scheme, engine_cfg.quant_group_size, engine_cfg.quantize_embed)


# ------------------------------------------------------------------------------------------------ checkpoints
QUANT_FILE = "jaxserve_quant.json"
QUANT_FORMAT = 1


def to_plain(params: dict, method: Optional[str] = None) -> tuple:
    """(params with each quantized leaf as {"w_q", "scales"} dicts of numpy, manifest dict or None) for orbax."""
    keys, groups, bits = [], set(), set()

    def conv(path, v):
        if is_quantized(v):
            keys.append(path)
            bits.add(v.bits)
            groups.add(v.group_size)
            return {"w_q": np.asarray(v.w_q), "scales": np.asarray(v.scales)}
        return v

    out = {k: ({lk: conv(f"layers/{lk}", lv) for lk, lv in v.items()} if k == "layers" else conv(k, v))
           for k, v in params.items()}
    if not keys:
        return out, None
    if len(bits) != 1 or len(groups) != 1:
        raise InvalidConfigError("mixed quantization formats in one checkpoint are not supported")
    b = bits.pop()
    meta = {"format": QUANT_FORMAT, "scheme": "int8" if b == 8 else "int4", "group_size": groups.pop(),
            "method": method or ("rtn" if b == 8 else "rtn-or-calibrated"), "keys": sorted(keys)}
    return out, meta


def from_plain(params: dict, meta: Optional[dict], where: str = "checkpoint") -> dict:
    """Inverse of `to_plain`: rebuild Int8Weight / Int4Weight leaves named in `meta` (no re-quantization)."""
    from jaxserve.errors import CheckpointError

    if meta is None:
        return params
    try:
        if meta.get("format") != QUANT_FORMAT or meta["scheme"] not in ("int8", "int4"):
            raise ValueError(f"unknown quantization manifest {meta!r}")
        out = {**params, "layers": dict(params["layers"])}
        for path in meta["keys"]:
            parts = path.split("/")
            holder = out["layers"] if parts[0] == "layers" else out
            d = holder[parts[-1]]
            w_q, scales = np.asarray(d["w_q"]), np.asarray(d["scales"])
            if meta["scheme"] == "int8":
                if w_q.dtype != np.int8 or scales.shape != w_q.shape[:-2] + w_q.shape[-1:]:
                    raise ValueError(f"{path}: int8 w_q {w_q.dtype}{w_q.shape} / scales {scales.shape} do not match")
                holder[parts[-1]] = Int8Weight(w_q, scales.astype(np.float32))
            else:
                g = int(meta["group_size"])
                if (w_q.dtype != np.uint8 or scales.shape[-1] != w_q.shape[-1]
                        or scales.shape[-2] * g != 2 * w_q.shape[-2]):
                    raise ValueError(f"{path}: int4 w_q {w_q.dtype}{w_q.shape} / scales {scales.shape} / group {g} "
                                     "do not match")
                holder[parts[-1]] = Int4Weight(w_q, scales.astype(np.float32), g)
        return out
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{where}: corrupt quantized weights ({e}); convert the model again") from None
