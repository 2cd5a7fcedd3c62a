"""Pallas kernels for jaxserve: paged decode attention, ragged prefill attention (both with an optional fused
KV-cache write and int8 KV), and weight-only int8 / int4 matmul; TPU (Mosaic) and GPU (Triton) variants, each
defined by a pure-jnp reference in `reference.py`. The engine calls them through `dispatch.py`."""

from .dispatch import (attention_backend, decode_attention, decode_attention_fused, matmul, prefill_attention,
                       prefill_attention_fused)

__all__ = ["attention_backend", "decode_attention", "decode_attention_fused", "prefill_attention",
           "prefill_attention_fused", "matmul"]
