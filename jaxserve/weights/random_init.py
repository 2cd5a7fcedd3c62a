"""Deterministic random weights for any ModelConfig (tests, planning, sharding experiments).

Two generators draw the same distribution into the same tree (`param_spec`):

* `random_params`: numpy on the host (the reference; what `random_weights=True` and the tests use).
* `random_params_device`: `jax.random` under jit on the default device, in the engine's dtype, so a large
  model's weights never exist on the host (Llama 3 8B in float32 would be 32 GB of host RAM and minutes of
  numpy). Different values from `random_params` (another generator), same shapes, scales and structure.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np

from jaxserve.config import ModelConfig


class Leaf(NamedTuple):
    """One weight. kind "linear": N(0, 1) / sqrt(fan_in), times `mult` after the cast to the weight dtype;
    kind "norm": 1 + 0.1 N(0, 1)."""

    kind: str
    shape: tuple
    fan_in: int = 1
    mult: float = 1.0


def param_spec(config: ModelConfig) -> dict:
    """The params tree (stacked layout of docs/architecture.md) with a `Leaf` per weight.

    Linear weights have std 1/sqrt(fan_in) so activations keep unit scale through the layers and logits are
    spread enough that greedy argmax ties are vanishingly rare; norms are near 1.
    """
    c = config
    L, D, F, V = c.num_layers, c.hidden_size, c.intermediate_size, c.vocab_size

    def w(*shape, fan_in, mult=1.0):
        return Leaf("linear", shape, fan_in, mult)

    def norm(*shape):
        return Leaf("norm", shape)

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
    if c.is_moe:
        _moe_spec(c, layers, w)
    if c.attention_bias:
        layers.update(bq=w(L, c.q_size, fan_in=D), bk=w(L, c.kv_size, fan_in=D), bv=w(L, c.kv_size, fan_in=D))
    if c.qk_norm:
        layers.update(q_norm=norm(L, c.head_dim), k_norm=norm(L, c.head_dim))
    if c.post_norms:
        layers.update(post_attn_norm=norm(L, D), post_mlp_norm=norm(L, D))
    spec = {"embed": w(V, D, fan_in=1, mult=0.5), "final_norm": norm(D), "layers": layers}
    if not c.tie_word_embeddings:
        spec["lm_head"] = w(D, V, fan_in=D)
    return spec


def _moe_spec(c: ModelConfig, layers: dict, w) -> None:
    """Mixture of experts (models/transformer.py's moe_mlp): the router and expert stacks replace w_gate / w_up /
    w_down; Qwen2-MoE's shared expert and its gate are added."""
    L, D, E = c.num_layers, c.hidden_size, c.num_experts
    F, Fs = c.moe_intermediate_size, c.shared_expert_intermediate_size
    for k in ("w_gate", "w_up", "w_down"):
        del layers[k]
    layers.update(router=w(L, D, E, fan_in=D), experts_gate=w(L, E, D, F, fan_in=D), experts_up=w(L, E, D, F, fan_in=D),
                  experts_down=w(L, E, F, D, fan_in=F))
    if Fs:
        layers.update(shared_w_gate=w(L, D, Fs, fan_in=D), shared_w_up=w(L, D, Fs, fan_in=D),
                      shared_w_down=w(L, Fs, D, fan_in=Fs), shared_expert_gate=w(L, D, 1, fan_in=D))


def _leaves(spec: dict):
    """(path, Leaf) in drawing order: the layers first, then the other top-level weights."""
    for k, leaf in spec["layers"].items():
        yield ("layers", k), leaf
    for k, leaf in spec.items():
        if k != "layers":
            yield (k,), leaf


def _build(spec: dict, draw) -> dict:
    out: dict = {}
    for i, (path, leaf) in enumerate(_leaves(spec)):
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = draw(i, leaf)
    return {k: out[k] for k in spec}  # embed, final_norm, layers[, lm_head]


def random_params(config: ModelConfig, seed: int = 0, dtype=np.float32) -> dict:
    """Scaled-normal weights (`param_spec`) drawn with numpy on the host, as `dtype` arrays."""
    rng = np.random.default_rng(seed)

    def draw(_, leaf: Leaf):
        x = rng.standard_normal(leaf.shape, dtype=np.float32)
        if leaf.kind == "norm":
            return (1.0 + 0.1 * x).astype(dtype)
        x = (x / np.sqrt(leaf.fan_in)).astype(dtype)
        return x * leaf.mult if leaf.mult != 1.0 else x

    return _build(param_spec(config), draw)


def random_params_device(config: ModelConfig, seed: int = 0, dtype=None) -> dict:
    """The `param_spec` tree drawn by `jax.random` on the default device, one jitted program per weight shape.

    dtype: the weights' dtype; None picks the engine's default for the backend (bfloat16 on TPU/GPU, float32
    on CPU). Each weight is drawn in float32 and cast inside its program, so only the cast result is kept.
    Leaf i uses `fold_in(key(seed), i)`: a weight does not change when another is added to the tree.
    """
    import jax
    import jax.numpy as jnp

    if dtype is None:
        dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    dtype = jnp.dtype(dtype)
    root = jax.random.key(seed)

    def draw(i, leaf: Leaf):
        norm = leaf.kind == "norm"
        return _draw_leaf(jax.random.fold_in(root, i), shape=tuple(leaf.shape), mean=1.0 if norm else 0.0,
                          std=0.1 if norm else float(1.0 / np.sqrt(leaf.fan_in)), mult=leaf.mult, dtype=dtype)

    return _build(param_spec(config), draw)


@functools.lru_cache(maxsize=None)
def _leaf_program():
    import jax
    import jax.numpy as jnp

    @functools.partial(jax.jit, static_argnames=("shape", "mean", "std", "mult", "dtype"))
    def draw(key, *, shape, mean, std, mult, dtype):
        x = jax.random.normal(key, shape, jnp.float32)
        return ((mean + std * x).astype(dtype) * jnp.asarray(mult, dtype)).astype(dtype)

    return draw


def _draw_leaf(key, **kw):
    return _leaf_program()(key, **kw)
