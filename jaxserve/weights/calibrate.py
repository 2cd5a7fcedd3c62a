"""Calibrated int4: GPTQ (Frantar et al., 2022) on English text that ships with Python (`pydoc_data.topics`).

GPTQ quantizes a weight W [K, N] one input row at a time and spreads each row's rounding error over the rows not
yet quantized, weighted by the inverse Hessian of the layer's inputs H = X^T X (X: calibration activations
entering the layer). Here:

* Sequential over layers: layer l's input activations come from layers 0..l-1 already quantized, so the error
  compensation sees what the quantized model will compute. Within a layer, the four input groups
  (attention input -> wq/wk/wv, attention output -> wo, MLP input -> w_gate/w_up, gated activation -> w_down)
  are measured in one pass of the float layer (GPTQ's default, not its "true-sequential" option).
* Blocks of 128 rows with lazy batch updates; dampening 1% of the mean diagonal; no activation reordering.
* Group-wise symmetric int4 exactly as `quantize_int4` (scale = absmax / 7 of the group's current, error-updated
  rows), so the result is an `Int4Weight` in the Pallas kernels' packed format.

Calibration data: the `pydoc_data` topics split by topic with a seeded shuffle into a calibration part and a
held-out part (`split_topics`); scripts/eval_quality.py measures perplexity on the held-out part only.
"""

from __future__ import annotations

import functools
import logging
import random
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.config import ModelConfig
from jaxserve.errors import InvalidConfigError
from jaxserve.models.quantized import DEFAULT_GROUP_SIZE, Int4Weight, check_group_size, is_quantized, pack_int4
from jaxserve.weights.quantize import quantize_params

log = logging.getLogger("jaxserve")

HELDOUT_FRACTION = 0.25


# ------------------------------------------------------------------------------------------------ data
def split_topics(seed: int = 0) -> tuple:
    """(calibration topic names, held-out topic names) of `pydoc_data.topics`: disjoint, seeded, sorted."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    random.Random(seed).shuffle(names)
    n_held = max(1, int(len(names) * HELDOUT_FRACTION))
    return sorted(names[n_held:]), sorted(names[:n_held])


def topic_text(names) -> list:
    from pydoc_data.topics import topics

    return [topics[n] for n in names]


def token_windows(tokenizer, texts, num_seqs: int, seq_len: int) -> np.ndarray:
    """int32 [num_seqs, seq_len]: BOS + consecutive tokens of the concatenated texts (fewer rows if short)."""
    stream = []
    for t in texts:
        stream.extend(tokenizer.encode(t, add_bos=False))
    body = seq_len - 1
    n = min(num_seqs, len(stream) // body)
    if n == 0:
        raise InvalidConfigError(f"calibration text too short for {seq_len}-token windows")
    bos = tokenizer.bos_id if tokenizer.bos_id is not None else stream[0]
    rows = [[bos] + stream[i * body:(i + 1) * body] for i in range(n)]
    return np.asarray(rows, np.int32)


def calibration_tokens(tokenizer, num_seqs: int = 32, seq_len: int = 256, seed: int = 0) -> np.ndarray:
    calib, _ = split_topics(seed)
    return token_windows(tokenizer, topic_text(calib), num_seqs, seq_len)


# ------------------------------------------------------------------------------------------------ GPTQ core
def gptq_quantize(w, H, group_size: int = DEFAULT_GROUP_SIZE, block: int = 128, damp: float = 0.01) -> Int4Weight:
    """GPTQ of one weight w [K, N] (rows = inputs) against the input Hessian H [K, K] -> Int4Weight."""
    W = np.array(w, np.float64)
    K, N = W.shape
    check_group_size(group_size, K)
    H = np.array(H, np.float64)
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[dead, :] = 0.0
    H[np.diag_indices(K)] += damp * np.mean(np.diag(H))
    # Upper Cholesky factor of H^-1 (as in the reference implementation).
    Hinv = np.linalg.inv(H)
    U = np.linalg.cholesky(Hinv).T
    block = group_size * max(1, block // group_size)
    Q = np.zeros((K, N), np.int8)
    scales = np.zeros((K // group_size, N), np.float64)
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1 = W[i1:i2].copy()
        E1 = np.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        s = None
        for i in range(i2 - i1):
            r = i1 + i
            if r % group_size == 0:
                amax = np.max(np.abs(W1[i:i + group_size]), axis=0)
                s = np.where(amax > 0, amax / 7.0, 1.0)
                scales[r // group_size] = s
            wrow = W1[i]
            q = np.clip(np.round(wrow / s), -8, 7)
            Q[r] = q
            err = (wrow - q * s) / U1[i, i]
            W1[i:] -= np.outer(U1[i, i:], err)
            E1[i] = err
        W[i2:] -= U[i1:i2, i2:].T @ E1
    scales = scales.astype(np.float32)
    return Int4Weight(pack_int4(Q), scales, int(group_size))


def _stack(ws) -> Int4Weight:
    return Int4Weight(np.stack([np.asarray(w.w_q) for w in ws]), np.stack([np.asarray(w.scales) for w in ws]),
                      ws[0].group_size)


# ------------------------------------------------------------------------------------------------ activations
def _layer_impl(cfg: ModelConfig, lp, x, inv_freq, window, kv_dtype: str = "float32"):
    """One decoder layer over x [S, T, D] with full causal attention (the math of models/reference.py, batched)
    -> (x, the inputs of its four groups of linear layers). `kv_dtype` "int8": K/V pass through the int8 KV
    cache's per-(token, head) quantization first, as the engine's attention reads them; "bfloat16": they are
    rounded to bfloat16 as the bf16 cache stores them."""
    from jaxserve.models.transformer import activation, dense, qkv, rms_norm, softcap
    from jaxserve.models.kv_cache import Int8KV, quantize_kv_int8

    S, T, _ = x.shape
    pos = jnp.arange(T)
    eps = cfg.rms_norm_eps
    G = cfg.num_heads // cfg.num_kv_heads
    h = rms_norm(x, lp["attn_norm"], eps)
    q, k, v = qkv(cfg, lp, h, pos, inv_freq)
    if kv_dtype == "int8":
        k, v = Int8KV(*quantize_kv_int8(k))[...], Int8KV(*quantize_kv_int8(v))[...]
    elif kv_dtype == "bfloat16":
        k, v = k.astype(jnp.bfloat16).astype(k.dtype), v.astype(jnp.bfloat16).astype(v.dtype)
    k = jnp.repeat(k, G, axis=2)
    v = jnp.repeat(v, G, axis=2)
    s = jnp.einsum("sqhd,skhd->shqk", q, k) * cfg.attn_scale
    s = softcap(s, cfg.attn_logit_softcap)
    mask = pos[None, :] <= pos[:, None]
    mask &= (window <= 0) | (pos[:, None] - pos[None, :] < window)
    s = jnp.where(mask[None, None], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    a_o = jnp.einsum("shqk,skhd->sqhd", p, v).reshape(S, T, cfg.q_size)
    o = dense(a_o, lp["wo"])
    if cfg.post_norms:
        o = rms_norm(o, lp["post_attn_norm"], eps)
    x = x + o
    h2 = rms_norm(x, lp["mlp_norm"], eps)
    a_d = activation(cfg, dense(h2, lp["w_gate"])) * dense(h2, lp["w_up"])
    m = dense(a_d, lp["w_down"])
    if cfg.post_norms:
        m = rms_norm(m, lp["post_mlp_norm"], eps)
    return x + m, {"attn": h, "o": a_o, "mlp": h2, "down": a_d}


def _hess(a):
    return jnp.einsum("stk,stj->kj", a, a, precision="highest")


@functools.partial(jax.jit, static_argnums=(0,))
def _layer(cfg: ModelConfig, lp, x, inv_freq, window):
    """(x after the layer, input Hessians X^T X of its four groups of linear layers)."""
    x, acts = _layer_impl(cfg, lp, x, inv_freq, window)
    return x, {k: _hess(a) for k, a in acts.items()}


@functools.partial(jax.jit, static_argnums=(0, 5))
def _layer_x(cfg: ModelConfig, lp, x, inv_freq, window, kv_dtype="float32"):
    return _layer_impl(cfg, lp, x, inv_freq, window, kv_dtype)[0]


@functools.partial(jax.jit, static_argnums=(0,))
def _nll(cfg: ModelConfig, params, x, tokens):
    """Summed next-token negative log-likelihood of tokens [S, T] given final hidden states x [S, T, D]."""
    from jaxserve.models.transformer import lm_head

    logits = lm_head(cfg, params, x[:, :-1])
    lse = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(lse - tgt)


def perplexity(cfg: ModelConfig, params: dict, tokens: np.ndarray, kv_dtype: str = "float32", batch: int = 4) -> float:
    """exp(mean next-token NLL) of `tokens` [S, T] under `params` (float or quantized; the model's own dense),
    full causal attention per row; K/V stored as the engine's `kv_dtype` cache stores them (int8, bfloat16)."""
    from jaxserve.models.transformer import embed_tokens, rope_inv_freq, unpack_bf16

    params = unpack_bf16(params)  # an engine's bf16 layer weights are held as bits on CPU
    inv_freq = rope_inv_freq(cfg)
    windows = cfg.layer_windows()
    total = 0.0
    for i in range(0, len(tokens), batch):
        t = jnp.asarray(tokens[i:i + batch])
        x = embed_tokens(cfg, params, t)
        for li in range(cfg.num_layers):
            lp = {k: v[li] for k, v in params["layers"].items()}
            x = _layer_x(cfg, lp, x, jnp.asarray(inv_freq[li]), jnp.int32(windows[li]), kv_dtype)
        total += float(_nll(cfg, {k: v for k, v in params.items() if k != "layers"}, x, t))
    return float(np.exp(total / (tokens.shape[0] * (tokens.shape[1] - 1))))


_INPUT_OF = {"wq": "attn", "wk": "attn", "wv": "attn", "wo": "o", "w_gate": "mlp", "w_up": "mlp", "w_down": "down"}


def gptq_params(cfg: ModelConfig, params: dict, tokens: np.ndarray, group_size: int = DEFAULT_GROUP_SIZE,
                quantize_embed: bool = False, batch: int = 8) -> dict:
    """GPTQ int4 of every linear layer (and optionally the LM head) with calibration `tokens` [S, T]."""
    from jaxserve.models.transformer import embed_tokens, rms_norm, rope_inv_freq

    if any(is_quantized(v) for v in params["layers"].values()):
        raise InvalidConfigError("params are already quantized")
    t0 = time.perf_counter()
    fparams = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    chunks = [jnp.asarray(tokens[i:i + batch]) for i in range(0, len(tokens), batch)]
    xs = [embed_tokens(cfg, fparams, c) for c in chunks]
    inv_freq = rope_inv_freq(cfg)
    windows = cfg.layer_windows()
    n_tok = tokens.size
    out_layers = {k: [] for k in _INPUT_OF if k in params["layers"]}
    for li in range(cfg.num_layers):
        lp = {k: v[li] for k, v in fparams["layers"].items()}
        args = (jnp.asarray(inv_freq[li]), jnp.int32(windows[li]))
        H = None
        for x in xs:
            _, h = _layer(cfg, lp, x, *args)
            H = h if H is None else jax.tree.map(jnp.add, H, h)
        qlp = dict(lp)
        for key in out_layers:
            wq = gptq_quantize(np.asarray(lp[key]), np.asarray(H[_INPUT_OF[key]]) / n_tok, group_size)
            out_layers[key].append(wq)
            qlp[key] = jax.tree.map(jnp.asarray, wq)
        xs = [_layer_x(cfg, qlp, x, *args) for x in xs]  # the next layer sees this layer quantized
        log.info("gptq: layer %d/%d done (%.1f s)", li + 1, cfg.num_layers, time.perf_counter() - t0)
    override = {k: _stack(v) for k, v in out_layers.items()}
    if quantize_embed:
        hf = sum(np.asarray(jnp.einsum("stk,stj->kj", h, h, precision="highest"))
                 for h in (rms_norm(x, fparams["final_norm"], cfg.rms_norm_eps) for x in xs))
        head = params["lm_head"] if "lm_head" in params else np.asarray(params["embed"], np.float32).T
        key = "lm_head" if "lm_head" in params else "embed"
        override[key] = gptq_quantize(head, hf / n_tok, group_size)
    return quantize_params(params, "int4", group_size, quantize_embed, int4_override=override)


def quantize_for_engine(params: dict, cfg: ModelConfig, engine_cfg, tokenizer, num_seqs: int = 32,
                        seq_len: int = 256) -> dict:
    """`EngineConfig.quantization` applied to float params: "int8" / "int4" (RTN) or "gptq" (calibrated)."""
    from jaxserve.weights.quantize import ensure_quantized, describe

    scheme = engine_cfg.quantization
    if scheme != "gptq" or describe(params)["scheme"] is not None:
        return ensure_quantized(params, engine_cfg)
    if tokenizer is None:
        raise InvalidConfigError("quantization='gptq' needs the model's tokenizer for its calibration text")
    toks = calibration_tokens(tokenizer, num_seqs, min(seq_len, engine_cfg.model_len(cfg)), seed=engine_cfg.seed)
    return gptq_params(cfg, params, toks, engine_cfg.quant_group_size, engine_cfg.quantize_embed)
