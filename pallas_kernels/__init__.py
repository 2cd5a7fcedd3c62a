"""Pallas kernels for jaxserve: paged decode attention, ragged prefill attention (both with an optional fused
KV-cache write and int8 KV), and weight-only int8 / int4 matmul; TPU (Mosaic) and GPU (Triton) variants, each
defined by a pure-jnp reference in `reference.py`. Callers use `dispatch.py`; the engine's attention_impl uses
`engine.py` (`engine_attention_fn`)."""

from .dispatch import (attention_backend, decode_attention, decode_attention_fused, matmul, prefill_attention,
                       prefill_attention_fused)
from .engine import engine_attention_fn

__all__ = ["attention_backend", "decode_attention", "decode_attention_fused", "prefill_attention",
           "prefill_attention_fused", "matmul", "engine_attention_fn"]
