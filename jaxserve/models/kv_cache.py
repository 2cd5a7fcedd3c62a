"""The paged KV cache's storage: float arrays, int8 values with per-token scales (`Int8KV`), or bfloat16 kept as
its bits on XLA:CPU (`Bf16KV`); `init_kv_cache` makes one, `write_kv` stores a step's K / V into its slots.

Layout: K and V each [L, slots, Hkv, hd] over all layers, slot = page * page_size + offset in the page; the
attention code (models/transformer.py) reads `cache[layer, slots]`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxserve.config import ModelConfig


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
    Other backends keep a plain bfloat16 array (init_kv_cache below).
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


def write_kv(cache, layer, slots, x):
    """Write x [T, Hkv, hd] at (layer, slots) of a float cache or an Int8KV (quantized per token and head)."""
    if isinstance(cache, (Int8KV, Bf16KV)):
        return cache.write(layer, slots, x)
    return cache.at[layer, slots].set(x.astype(cache.dtype))


def init_kv_cache(cfg: ModelConfig, num_pages: int, page_size: int, dtype=jnp.float32, rows=None):
    """{"k", "v"}: float [L, slots, Hkv, hd], or for dtype int8 an Int8KV (int8 values + f32 scales [L, slots, Hkv],
    the Pallas kernels' k_scales / v_scales layout), or for bfloat16 on XLA:CPU a Bf16KV (the bits as uint16).
    `rows`: the first axis when it is not one row per layer (a grouped config.KVLayout's `width`)."""
    shape = (cfg.num_layers if rows is None else rows, num_pages * page_size, cfg.num_kv_heads, cfg.head_dim)
    if jnp.dtype(dtype) == jnp.int8:
        return {"k": Int8KV.zeros(shape), "v": Int8KV.zeros(shape)}
    if Bf16KV.used_for(dtype):
        return {"k": Bf16KV.zeros(shape), "v": Bf16KV.zeros(shape)}
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
