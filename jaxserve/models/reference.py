"""Cache-free full-sequence forward in plain jnp: the definition the paged engine is tested against.

No pages, no buckets, no scan: one sequence, an explicit causal (and sliding-window) mask, a Python loop over
layers. Slow and obviously correct.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxserve.config import ModelConfig
from jaxserve.models.transformer import (dense, embed_tokens, lm_head, mlp, qkv, rms_norm, rope_inv_freq, softcap,
                                         unpack_bf16)


def reference_forward(cfg: ModelConfig, params, tokens) -> jnp.ndarray:
    """Logits f32[T, V] for every position of one sequence `tokens` [T]."""
    params = unpack_bf16(params)  # an engine's bf16 layer weights are held as bits on CPU
    tokens = jnp.asarray(tokens, jnp.int32)
    T = tokens.shape[0]
    pos = jnp.arange(T)
    x = embed_tokens(cfg, params, tokens)
    inv_freq = rope_inv_freq(cfg)
    G = cfg.num_heads // cfg.num_kv_heads
    for i, window in enumerate(cfg.layer_windows()):
        lp = {k: v[i] for k, v in params["layers"].items()}
        h = rms_norm(x, lp["attn_norm"], cfg.rms_norm_eps)
        q, k, v = qkv(cfg, lp, h, pos, jnp.asarray(inv_freq[i]))
        k = jnp.repeat(k, G, axis=1)  # [T, Hq, hd]
        v = jnp.repeat(v, G, axis=1)
        s = jnp.einsum("qhd,khd->hqk", q.astype(jnp.float32), k.astype(jnp.float32)) * cfg.attn_scale
        s = softcap(s, cfg.attn_logit_softcap)
        mask = pos[None, :] <= pos[:, None]
        if window:
            mask &= pos[:, None] - pos[None, :] < window
        s = jnp.where(mask[None], s, -jnp.inf)
        p = jnp.exp(s - s.max(-1, keepdims=True))
        p = p / p.sum(-1, keepdims=True)
        o = jnp.einsum("hqk,khd->qhd", p, v.astype(jnp.float32)).astype(x.dtype).reshape(T, cfg.q_size)
        o = dense(o, lp["wo"])
        if cfg.post_norms:
            o = rms_norm(o, lp["post_attn_norm"], cfg.rms_norm_eps)
        x = x + o
        m = mlp(cfg, lp, rms_norm(x, lp["mlp_norm"], cfg.rms_norm_eps))
        if cfg.post_norms:
            m = rms_norm(m, lp["post_mlp_norm"], cfg.rms_norm_eps)
        x = x + m
    return lm_head(cfg, params, x)
