"""Mixture-of-experts MLP (models/transformer.py: route, experts_mlp, moe_mlp) against a dense reference that runs
every expert on every token and combines them with the routing weights, in float64 numpy.

The grouped path sorts a step's T*k (token, expert) rows by expert and multiplies each group by its expert's weights
only; the reference shares none of that code. Tolerance: 1e-5 absolute on outputs of unit scale (float32
matmuls summed in another order). The rest: MoE models refuse what they do not support (batch invariance,
quantization, meshes, mixed dense/sparse layers) with InvalidConfigError, and a random-weight engine runs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.config import ModelConfig, get_preset
from jaxserve.errors import InvalidConfigError
from jaxserve.models.transformer import experts_mlp, grouped_matmul, grouped_matmul_tiles, moe_mlp, route
from jaxserve.weights.random_init import random_params

TOL = 1e-5


def _layer(cfg: ModelConfig, seed: int = 0) -> dict:
    """Layer 0's weights of a random model, float32 numpy."""
    return {k: np.asarray(v[0]) for k, v in random_params(cfg, seed)["layers"].items()}


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _all_experts(lp, x):
    """Every expert on every token: f64[E, T, D]."""
    g = np.einsum("td,edf->etf", x, lp["experts_gate"].astype(np.float64))
    u = np.einsum("td,edf->etf", x, lp["experts_up"].astype(np.float64))
    return np.einsum("etf,efd->etd", _silu(g) * u, lp["experts_down"].astype(np.float64))


def _combine(dense_out, weights, experts):
    T = weights.shape[0]
    return sum(weights[:, j, None] * dense_out[experts[:, j], np.arange(T)] for j in range(weights.shape[1]))


def _reference_moe(cfg: ModelConfig, lp, x):
    """The whole MoE MLP, densely: softmax router, top-k by sorting, optional renormalisation, shared expert."""
    x = x.astype(np.float64)
    logits = x @ lp["router"].astype(np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    experts = np.argsort(-p, axis=-1, kind="stable")[:, :cfg.num_experts_per_tok]
    weights = np.take_along_axis(p, experts, -1)
    if cfg.norm_topk_prob:
        weights /= weights.sum(-1, keepdims=True)
    out = _combine(_all_experts(lp, x), weights, experts)
    if cfg.shared_expert_intermediate_size:
        s = (_silu(x @ lp["shared_w_gate"].astype(np.float64)) * (x @ lp["shared_w_up"].astype(np.float64))
             ) @ lp["shared_w_down"].astype(np.float64)
        out = out + s / (1.0 + np.exp(-(x @ lp["shared_expert_gate"].astype(np.float64))))
    return out, experts


def test_experts_mlp_uneven_routing_matches_dense():
    """Hand-made routing: experts 0, 5 and 7 get no rows, expert 2 gets most, every expert's rows are
    scattered over the tokens; two routings of the same shape run through one compiled program."""
    cfg = get_preset("tiny-mixtral")  # 8 experts, top-2
    lp = _layer(cfg)
    T, D = 13, cfg.hidden_size
    rng = np.random.default_rng(1)
    x = rng.standard_normal((T, D)).astype(np.float32)
    reference = _all_experts(lp, x.astype(np.float64))
    fn = jax.jit(lambda x, w, e: experts_mlp(cfg, lp, x, w, e))
    first = np.stack([np.full(T, 2), rng.choice([1, 3, 4, 6], T)], axis=1)  # expert 2 on every token
    second = np.stack([rng.choice([0, 7], T), rng.choice([5, 6], T)], axis=1)  # others unused
    for experts in (first, second, first[:, ::-1]):
        weights = rng.uniform(0.1, 1.0, (T, 2)).astype(np.float32)
        got = np.asarray(fn(x, weights, experts.astype(np.int32)))
        want = _combine(reference, weights.astype(np.float64), experts)
        np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    assert fn._cache_size() == 1  # group sizes are data: nothing recompiles


@pytest.mark.parametrize("sizes", [[0, 7, 0, 0, 12, 1, 0], [20, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 3],
                                   [1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0]])
def test_grouped_matmul_implementations(sizes):
    """ragged_dot and the tiled CPU loop (tiles of 4 and 32 rows: groups spanning tiles, several groups in one
    tile, empty groups, rows past the last group) against per-group numpy matmuls; 20 rows."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((20, 16)).astype(np.float32)
    w = rng.standard_normal((7, 16, 24)).astype(np.float32)
    want = np.zeros((20, 24))
    r = 0
    for g, n in enumerate(sizes):
        want[r:r + n] = x[r:r + n].astype(np.float64) @ w[g]
        r += n
    gs = jnp.asarray(sizes, jnp.int32)
    for got in (grouped_matmul(x, w, gs, impl="ragged_dot"), grouped_matmul(x, w, gs, impl="tiles"),
                jax.jit(lambda x, w, gs: grouped_matmul_tiles(x, w, gs, tile=4))(x, w, gs)):
        np.testing.assert_allclose(np.asarray(got), want, atol=TOL, rtol=0)


def test_experts_mlp_all_tokens_on_one_expert():
    cfg = get_preset("tiny-mixtral")
    lp = _layer(cfg, seed=3)
    x = np.random.default_rng(2).standard_normal((5, cfg.hidden_size)).astype(np.float32)
    experts = np.tile(np.array([[6, 6]], np.int32), (5, 1))  # both choices the same expert
    weights = np.full((5, 2), 0.5, np.float32)
    got = np.asarray(experts_mlp(cfg, lp, jnp.asarray(x), jnp.asarray(weights), jnp.asarray(experts)))
    np.testing.assert_allclose(got, _all_experts(lp, x.astype(np.float64))[6], atol=TOL, rtol=0)


@pytest.mark.parametrize("preset, norm_topk", [("tiny-mixtral", True), ("tiny-qwen2-moe", False),
                                               ("tiny-qwen2-moe", True)])
def test_moe_mlp_matches_dense_reference(preset, norm_topk):
    cfg = get_preset(preset).replace(norm_topk_prob=norm_topk)
    lp = _layer(cfg, seed=4)
    h = np.random.default_rng(5).standard_normal((3, 7, cfg.hidden_size)).astype(np.float32)  # [R, Q, D]
    got = np.asarray(jax.jit(lambda h: moe_mlp(cfg, lp, h))(h))
    want, experts = _reference_moe(cfg, lp, h.reshape(-1, cfg.hidden_size))
    np.testing.assert_allclose(got.reshape(-1, cfg.hidden_size), want, atol=TOL, rtol=0)
    _, got_experts = route(cfg, lp, jnp.asarray(h.reshape(-1, cfg.hidden_size)))
    np.testing.assert_array_equal(np.sort(np.asarray(got_experts), -1), np.sort(experts, -1))
    # the random router spreads 21 tokens x 2 choices over the experts unevenly
    counts = np.bincount(experts.reshape(-1), minlength=cfg.num_experts)
    assert counts.max() > counts.min()


def test_moe_bf16_close_to_float32():
    cfg = get_preset("tiny-qwen2-moe")
    lp = _layer(cfg, seed=6)
    x = np.random.default_rng(7).standard_normal((9, cfg.hidden_size)).astype(np.float32)
    ref = np.asarray(moe_mlp(cfg, lp, jnp.asarray(x)))
    lp16 = {k: jnp.asarray(v, jnp.bfloat16) for k, v in lp.items()}
    got = moe_mlp(cfg, lp16, jnp.asarray(x, jnp.bfloat16))
    assert got.dtype == jnp.bfloat16
    assert np.abs(np.asarray(got, np.float32) - ref).max() < 0.1 * np.abs(ref).max()


# ------------------------------------------------------------------------------------------------ config


def _hf_qwen_moe(**kw):
    hf = dict(model_type="qwen2_moe", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
              moe_intermediate_size=32, shared_expert_intermediate_size=48, norm_topk_prob=False,
              decoder_sparse_step=1, mlp_only_layers=[], eos_token_id=2)
    return {**hf, **kw}


def test_hf_config_parsing():
    c = ModelConfig.from_hf_config(_hf_qwen_moe())
    assert (c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size, c.shared_expert_intermediate_size,
            c.norm_topk_prob, c.attention_bias, c.qk_norm) == (4, 2, 32, 48, False, True, False)
    c = ModelConfig.from_hf_config(_hf_qwen_moe(model_type="qwen3_moe", norm_topk_prob=True, head_dim=16))
    assert (c.shared_expert_intermediate_size, c.norm_topk_prob, c.attention_bias, c.qk_norm) == (0, True, False, True)
    mix = dict(model_type="mixtral", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
               sliding_window=None)
    c = ModelConfig.from_hf_config(mix)
    assert (c.num_experts, c.moe_intermediate_size, c.norm_topk_prob, c.sliding_window) == (8, 128, True, None)


@pytest.mark.parametrize("kw", [dict(decoder_sparse_step=2), dict(mlp_only_layers=[1]), dict(use_sliding_window=True),
                                dict(hidden_act="gelu")])
def test_hf_config_refusals(kw):
    with pytest.raises(InvalidConfigError):
        ModelConfig.from_hf_config(_hf_qwen_moe(**kw))


def test_unsupported_engine_options_are_refused():
    from jaxserve import LLM

    common = dict(random_weights=True, num_pages=32, max_model_len=64, max_num_seqs=2, max_num_batched_tokens=32)
    with pytest.raises(InvalidConfigError, match="batch_invariant"):
        LLM("tiny-mixtral", batch_invariant=True, **common)
    with pytest.raises(InvalidConfigError, match="experts"):
        LLM("tiny-mixtral", quantization="int8", **common)


def test_meshes_refused():
    from jaxserve.parallel.mesh import check_model_fits_mesh

    cfg = get_preset("qwen3-30b-a3b")
    check_model_fits_mesh(cfg, {"data": 2, "model": 1, "stage": 1})  # replicas of a one-device model: fine
    for spec in ({"model": 2}, {"stage": 2}):
        with pytest.raises(InvalidConfigError, match="mixture-of-experts"):
            check_model_fits_mesh(cfg, spec)


def test_random_weight_engine_generates():
    """A random-weight MoE model through the paged engine: greedy prefill + decode equals the cache-free
    reference forward's argmax at every step."""
    from jaxserve import LLM, SamplingParams
    from jaxserve.models.reference import reference_forward

    llm = LLM("tiny-qwen2-moe", random_weights=True, num_pages=64, max_model_len=64, max_num_seqs=2,
              max_num_batched_tokens=32, max_prefill_seqs=2, page_size=4, attn_block_pages=2)
    prompt = [5, 9, 200, 31, 7, 77, 400]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    toks = out[0].outputs[0].token_ids
    params = random_params(get_preset("tiny-qwen2-moe"), 0)
    logits = np.asarray(reference_forward(get_preset("tiny-qwen2-moe"), params, prompt + toks[:-1]))
    np.testing.assert_array_equal(logits[len(prompt) - 1:].argmax(-1), toks)


# ------------------------------------------------------------------------------------------------ loading


def _write_hf_dir(path, cfg: ModelConfig, params, fused: bool, drop=()):
    """`params` written as a Qwen3-MoE-style HF directory: per-expert tensors (save_pretrained's layout) or
    transformers 5's fused expert stacks; keys in `drop` left out."""
    import json

    from safetensors.numpy import save_file

    lay = params["layers"]
    t = {"model.embed_tokens.weight": params["embed"], "model.norm.weight": params["final_norm"],
         "lm_head.weight": params["lm_head"].T}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        t |= {p + "input_layernorm.weight": lay["attn_norm"][i],
              p + "post_attention_layernorm.weight": lay["mlp_norm"][i], p + "self_attn.q_norm.weight": lay["q_norm"][i], p + "self_attn.k_norm.weight": lay["k_norm"][i],
              p + "mlp.gate.weight": lay["router"][i].T}
        for hf, ours in (("q", "wq"), ("k", "wk"), ("v", "wv"), ("o", "wo")):
            t[p + f"self_attn.{hf}_proj.weight"] = lay[ours][i].T
        if fused:
            gate_up = np.concatenate([lay["experts_gate"][i], lay["experts_up"][i]], axis=-1)  # [E, D, 2F]
            t[p + "mlp.experts.gate_up_proj"] = gate_up.transpose(0, 2, 1)
            t[p + "mlp.experts.down_proj"] = lay["experts_down"][i].transpose(0, 2, 1)
        else:
            for j in range(cfg.num_experts):
                for hf, ours in (("gate_proj", "experts_gate"), ("up_proj", "experts_up"),
                                 ("down_proj", "experts_down")):
                    t[p + f"mlp.experts.{j}.{hf}.weight"] = lay[ours][i, j].T
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in t.items() if k not in drop},
              str(path / "model.safetensors"))
    hf = dict(model_type="qwen3_moe", vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=128,
              num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
              head_dim=cfg.head_dim, num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_tok,
              moe_intermediate_size=cfg.moe_intermediate_size, norm_topk_prob=True, tie_word_embeddings=False,
              rms_norm_eps=cfg.rms_norm_eps, eos_token_id=2)
    (path / "config.json").write_text(json.dumps(hf))


@pytest.mark.parametrize("fused", [False, True])
def test_safetensors_round_trip(tmp_path, fused):
    from jaxserve.weights.safetensors_loader import load_hf_dir

    cfg = get_preset("tiny-mixtral").replace(qk_norm=True, norm_topk_prob=True, rms_norm_eps=1e-6)
    params = random_params(cfg, 2)
    _write_hf_dir(tmp_path, cfg, params, fused)
    got_cfg, got = load_hf_dir(str(tmp_path))
    assert (got_cfg.num_experts, got_cfg.moe_intermediate_size, got_cfg.qk_norm) == (8, 32, True)
    assert set(got["layers"]) == set(params["layers"])
    for k, v in params["layers"].items():
        np.testing.assert_array_equal(got["layers"][k], v, err_msg=k)


def test_safetensors_missing_expert(tmp_path):
    from jaxserve.errors import CheckpointError
    from jaxserve.weights.safetensors_loader import load_hf_dir

    cfg = get_preset("tiny-mixtral").replace(qk_norm=True, norm_topk_prob=True)
    _write_hf_dir(tmp_path, cfg, random_params(cfg, 2), False, drop={"model.layers.1.mlp.experts.5.up_proj.weight"})
    with pytest.raises(CheckpointError, match=r"experts_up in layers \[1\]"):
        load_hf_dir(str(tmp_path))
