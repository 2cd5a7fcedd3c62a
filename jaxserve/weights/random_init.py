"""Deterministic random weights for any ModelConfig (tests, planning, sharding experiments)."""

from __future__ import annotations

import numpy as np

from jaxserve.config import ModelConfig


def random_params(config: ModelConfig, seed: int = 0, dtype=np.float32) -> dict:
    """Scaled-normal weights in the stacked layout of docs/architecture.md; norms near 1.

    Linear weights have std 1/sqrt(fan_in) so activations keep unit scale through the layers and logits
    are spread enough that greedy argmax ties are vanishingly rare.
    """
    rng = np.random.default_rng(seed)
    c = config
    L, D, F, V = c.num_layers, c.hidden_size, c.intermediate_size, c.vocab_size

    def w(*shape, fan_in):
        return (rng.standard_normal(shape, dtype=np.float32) / np.sqrt(fan_in)).astype(dtype)

    def norm(*shape):
        return (1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(dtype)

    layers = {
        "attn_norm": norm(L, D),
        "wq": w(L, D, c.q_size, fan_in=D),
        "wk": w(L, D, c.kv_size, fan_in=D),
        "wv": w(L, D, c.kv_size, fan_in=D),
        "wo": w(L, c.q_size, D, fan_in=c.q_size),
        "mlp_norm": norm(L, D),
        "w_gate": w(L, D, F, fan_in=D),
        "w_up": w(L, D, F, fan_in=D),
        "w_down": w(L, F, D, fan_in=F),
    }
    if c.attention_bias:
        layers.update(bq=w(L, c.q_size, fan_in=D), bk=w(L, c.kv_size, fan_in=D), bv=w(L, c.kv_size, fan_in=D))
    if c.qk_norm:
        layers.update(q_norm=norm(L, c.head_dim), k_norm=norm(L, c.head_dim))
    if c.post_norms:
        layers.update(post_attn_norm=norm(L, D), post_mlp_norm=norm(L, D))
    params = {"embed": w(V, D, fan_in=1) * 0.5, "final_norm": norm(D), "layers": layers}
    if not c.tie_word_embeddings:
        params["lm_head"] = w(D, V, fan_in=D)
    return params
