"""Partition rules by parameter name: which dimension of each weight (and of the KV cache) the `model` axis splits.

Megatron-style tensor parallelism, expressed as `PartitionSpec`s and left to XLA's SPMD partitioner (GSPMD):

    embed   [V, D]        vocab-parallel   P(model, -)      each device holds V/t rows (masked lookup + all-reduce)
    lm_head [D, V]        vocab-parallel   P(-, model)      logits stay split over V until sampling needs them
    wq/wk/wv [L, D, H*hd] column-parallel  P(-, -, model)   whole heads per device
    wo      [L, H*hd, D]  row-parallel     P(-, model, -)   partial sums, one all-reduce per layer
    w_gate/w_up [L, D, F] column-parallel  P(-, -, model)
    w_down  [L, F, D]     row-parallel     P(-, model, -)   partial sums, one all-reduce per layer
    norms, biases of replicated projections: replicated
    kv cache [L, slots, Hkv, hd]           P(-, -, model, -) over KV heads

Fallbacks (the rule applies only when the split is whole heads):
* `model` does not divide the KV heads (Gemma 3 270M: 1 KV head): wk/wv and the KV cache are replicated: every
  device computes and stores all KV heads (KV heads duplicated), the query heads are still split.
* `model` exceeds (and is a multiple of) the query heads: attention is replicated entirely; MLP, embedding and
  LM head are still split (the FFN and vocabulary divide). `mesh.check_model_fits_mesh` rejects the rest.
The leading layer axis is split over `stage` only by the pipeline (parallel/pipeline.py).
"""

from __future__ import annotations

import dataclasses

from jax.sharding import NamedSharding, PartitionSpec as P

from jaxserve.config import ModelConfig
from jaxserve.models.quantized import Int8Weight, is_quantized


def _div(n: int, t: int) -> bool:
    return t == 1 or n % t == 0


def attention_split(cfg: ModelConfig, t: int) -> tuple:
    """(query heads split?, KV heads split?) for model axis size t."""
    q = _div(cfg.num_heads, t)
    return q, q and _div(cfg.num_kv_heads, t)


def param_specs(cfg: ModelConfig, params: dict, t: int, stage_axis=None) -> dict:
    """A PartitionSpec per leaf of `params` (same tree). `t` = size of the `model` axis.

    `stage_axis` ("stage" or None) shards the leading layer dimension of every per-layer weight.
    """
    M = "model" if t > 1 else None
    q_ok, kv_ok = attention_split(cfg, t)
    f_ok = _div(cfg.intermediate_size, t)
    v_ok = _div(cfg.vocab_size, t)
    S = stage_axis

    col = lambda ok: P(S, None, M if ok else None)  # noqa: E731  [L, in, out]
    row = lambda ok: P(S, M if ok else None, None)  # noqa: E731
    vec = lambda ok: P(S, M if ok else None)  # noqa: E731  [L, out] biases

    layer_rules = {
        "wq": col(q_ok), "wk": col(kv_ok), "wv": col(kv_ok), "wo": row(q_ok),
        "bq": vec(q_ok), "bk": vec(kv_ok), "bv": vec(kv_ok),
        "w_gate": col(f_ok), "w_up": col(f_ok), "w_down": row(f_ok),
    }
    out = {}
    for k, v in params.items():
        if k == "layers":
            out[k] = {n: _spec_of(a, layer_rules.get(n, P(S, *([None] * (len(a.shape) - 1)))))
                      for n, a in v.items()}
        elif k == "embed" and not is_quantized(v):
            out[k] = P(M if v_ok else None, None)
        elif k in ("embed", "lm_head"):  # a quantized embedding is stored as the LM head's [D, V]
            out[k] = _spec_of(v, P(None, M if v_ok else None))
        else:
            out[k] = P(*([None] * len(v.shape)))
    return out


def _spec_of(w, spec: P):
    """`spec` for a float weight, the per-array specs of a quantized one."""
    return quantized_spec(w, spec) if is_quantized(w) else spec


def quantized_spec(w, spec: P):
    """The specs of a quantized weight (models/quantized.py) whose float [..., K, N] form would get `spec`.

    int8: `w_q` [..., K, N] as the float weight, per-column `scales` [..., N] split with N. int4: `w_q`
    [..., K/2, N] splits N like the float weight, and K (row-parallel wo / w_down) as whole packed rows: a
    packed row holds weight rows i and K/2 + i, so a device's share of K is two runs of rows that the partitioner
    matches to the activations (moving activations, never weights). Group `scales` [..., K/g, N] split with N
    and stay whole along K (K/g rows: small).
    """
    *lead, k_ax, n_ax = tuple(spec)
    if isinstance(w, Int8Weight):
        return dataclasses.replace(w, w_q=P(*lead, k_ax, n_ax), scales=P(*lead, n_ax))
    return dataclasses.replace(w, w_q=P(*lead, k_ax, n_ax), scales=P(*lead, None, n_ax))


def kv_spec(cfg: ModelConfig, t: int, stage_axis=None) -> P:
    """KV cache [L, slots, Hkv, hd]: split over KV heads when `model` divides them, else replicated."""
    _, kv_ok = attention_split(cfg, t)
    return P(stage_axis, None, "model" if (t > 1 and kv_ok) else None, None)


def shardings(mesh, specs):
    import jax

    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def describe(cfg: ModelConfig, t: int) -> str:
    """One line saying what the model axis splits (logged at start-up, quoted in the README)."""
    q_ok, kv_ok = attention_split(cfg, t)
    parts = [f"query heads {cfg.num_heads}/{t}" if q_ok else "attention replicated",
             f"KV heads {cfg.num_kv_heads}/{t}" if kv_ok else "KV heads replicated",
             f"FFN {cfg.intermediate_size}/{t}" if _div(cfg.intermediate_size, t) else "FFN replicated",
             f"vocab {cfg.vocab_size}/{t}" if _div(cfg.vocab_size, t) else "vocab replicated"]
    return f"model={t}: " + ", ".join(parts)
