"""Load a Hugging Face checkpoint directory (`config.json` + `*.safetensors`) into jaxserve's layout.

    config, params = load_hf_dir("path/to/Llama-3.2-1B")

Supports Llama, Mistral, Qwen2, Qwen3, Gemma 2 and Gemma 3 (text, or the text tower of the multimodal
checkpoint), and the mixture-of-experts Mixtral, Qwen2-MoE and Qwen3-MoE.
HF stores linear weights `[out, in]`; they are transposed to `[in, out]` and stacked over layers, float32.
Gemma's RMSNorm computes `x * (1 + w)`, so 1 is added to every Gemma norm weight here (Gemma 3's q/k norms
included; Qwen3's q/k norms are plain RMSNorm weights):
the stored param is the effective multiplier. HF Q/K are already in rotate-half order: no permutation.
"""

from __future__ import annotations

import json
import os
import re
from typing import Optional

import numpy as np

from jaxserve.config import ModelConfig
from jaxserve.errors import CheckpointError, InvalidConfigError

# Prefixes in front of `layers.N...`, `embed_tokens`, `norm` in the supported checkpoints
# (CausalLM: "model."; Gemma 3 multimodal: "language_model.model." or "model.language_model.").
_PREFIX = re.compile(r"^(?:model\.language_model\.|language_model\.model\.|language_model\.|model\.)")

# HF per-layer name -> (jaxserve name, is a matrix). Norm names differ between the families:
# Llama's `post_attention_layernorm` is the pre-MLP norm; Gemma 3's is the norm after attention.
_LAYER_COMMON = {
    "self_attn.q_proj.weight": ("wq", True),
    "self_attn.k_proj.weight": ("wk", True),
    "self_attn.v_proj.weight": ("wv", True),
    "self_attn.o_proj.weight": ("wo", True),
    "self_attn.q_proj.bias": ("bq", False),
    "self_attn.k_proj.bias": ("bk", False),
    "self_attn.v_proj.bias": ("bv", False),
    "mlp.gate_proj.weight": ("w_gate", True),
    "mlp.up_proj.weight": ("w_up", True),
    "mlp.down_proj.weight": ("w_down", True),
    "input_layernorm.weight": ("attn_norm", False),
}
_LAYER_LLAMA = {**_LAYER_COMMON, "post_attention_layernorm.weight": ("mlp_norm", False),
                "self_attn.q_norm.weight": ("q_norm", False),  # Qwen3 (plain RMSNorm weights)
                "self_attn.k_norm.weight": ("k_norm", False)}
_LAYER_GEMMA3 = {
    **_LAYER_COMMON,
    "post_attention_layernorm.weight": ("post_attn_norm", False),
    "pre_feedforward_layernorm.weight": ("mlp_norm", False),
    "post_feedforward_layernorm.weight": ("post_mlp_norm", False),
    "self_attn.q_norm.weight": ("q_norm", False),
    "self_attn.k_norm.weight": ("k_norm", False),
}

# Mixture of experts (models/transformer.py's moe_mlp layout). Router and shared expert as [out, in] matrices;
# experts one tensor per expert and projection (what transformers' save_pretrained writes: Mixtral's
# `block_sparse_moe.experts.J.w1/w3/w2`, Qwen's `mlp.experts.J.gate_proj/up_proj/down_proj`), or transformers 5's
# fused layout (`mlp.experts.gate_up_proj` [E, 2F, D], gate rows first; `mlp.experts.down_proj` [E, D, F]).
_LAYER_MOE = {
    "block_sparse_moe.gate.weight": ("router", True),  # Mixtral
    "mlp.gate.weight": ("router", True),  # Qwen2-MoE / Qwen3-MoE
    "mlp.shared_expert.gate_proj.weight": ("shared_w_gate", True),  # Qwen2-MoE
    "mlp.shared_expert.up_proj.weight": ("shared_w_up", True),
    "mlp.shared_expert.down_proj.weight": ("shared_w_down", True),
    "mlp.shared_expert_gate.weight": ("shared_expert_gate", True),
}
_EXPERT_KEY = re.compile(r"^(?:block_sparse_moe|mlp)\.experts\.(?:(\d+)\.(w1|w3|w2|gate_proj|up_proj|down_proj)\.weight"
                         r"|(gate_up_proj|down_proj))$")
_EXPERT_NAME = {"w1": "experts_gate", "gate_proj": "experts_gate", "w3": "experts_up", "up_proj": "experts_up",
                "w2": "experts_down", "down_proj": "experts_down"}


def _read_config(path: str) -> dict:
    cfg_path = os.path.join(path, "config.json")
    try:
        with open(cfg_path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not a HF model directory (no config.json)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{cfg_path}: cannot read config ({e})") from None


def normalize_hf_config(hf: dict) -> dict:
    """Rewrite a transformers-5 style config.json into the keys `ModelConfig.from_hf_config` reads.

    transformers >= 5 writes `rope_parameters` (per layer type for Gemma 3) instead of `rope_theta` /
    `rope_scaling` / `rope_local_base_freq`, and Gemma 3's `layer_types` list instead of
    `sliding_window_pattern`. Older configs pass through unchanged.
    """
    hf = dict(hf)
    if "text_config" in hf:  # Gemma 3 multimodal wrapper: normalize the text part
        hf["text_config"] = normalize_hf_config(hf["text_config"])
        return hf
    rp = hf.get("rope_parameters")
    if isinstance(rp, dict) and "rope_theta" not in hf:
        full = rp.get("full_attention", rp)
        hf["rope_theta"] = full.get("rope_theta", 10_000.0)
        if full.get("rope_type", "default") != "default" and "rope_scaling" not in hf:
            hf["rope_scaling"] = {k: v for k, v in full.items() if k != "rope_theta"}
        if "sliding_attention" in rp and "rope_local_base_freq" not in hf:
            hf["rope_local_base_freq"] = rp["sliding_attention"].get("rope_theta", 10_000.0)
    types = hf.get("layer_types")
    if str(hf.get("model_type", "")).startswith(("gemma2", "gemma3")) and types and "sliding_window_pattern" not in hf:
        full_at = [i for i, t in enumerate(types) if t == "full_attention"]
        pattern = full_at[0] + 1 if full_at else hf.get("_sliding_window_pattern", len(types) + 1)
        if any((t == "full_attention") != ((i + 1) % pattern == 0) for i, t in enumerate(types)):
            raise InvalidConfigError(f"Gemma layer_types {types} are not periodic; unsupported")
        hf["sliding_window_pattern"] = pattern
    return hf


def _safetensors_files(path: str) -> list:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"{index}: cannot read safetensors index ({e})") from None
    else:
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files")
    return [os.path.join(path, f) for f in files]


def is_hf_dir(path: str) -> bool:
    """A directory with a config.json and at least one *.safetensors file."""
    return (
        os.path.isdir(path)
        and os.path.isfile(os.path.join(path, "config.json"))
        and any(f.endswith(".safetensors") for f in os.listdir(path))
    )


def load_hf_dir(path: str, name: Optional[str] = None) -> tuple:
    """Read a HF directory into `(ModelConfig, params)`; params float32 numpy in the stacked layout.

    Raises CheckpointError naming the file for a missing/corrupt config or weight file, a missing tensor,
    or a shape that disagrees with config.json.
    """
    import ml_dtypes  # noqa: F401  (registers numpy's "bfloat16" so safetensors can hand back BF16 tensors)
    from safetensors import safe_open

    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise CheckpointError(f"HF model directory not found: {path}")
    hf = _read_config(path)
    try:
        cfg = ModelConfig.from_hf_config(normalize_hf_config(hf), name=name or os.path.basename(path.rstrip("/")))
    except InvalidConfigError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        cfg_file = os.path.join(path, "config.json")
        raise CheckpointError(f"{cfg_file}: incomplete config ({type(e).__name__}: {e})") from None
    gemma = cfg.arch in ("gemma2", "gemma3")
    layer_map = _LAYER_GEMMA3 if gemma else _LAYER_LLAMA
    if cfg.is_moe:
        layer_map = {**layer_map, **_LAYER_MOE}

    L = cfg.num_layers
    from jaxserve.weights.checkpoint import expected_shapes

    shapes = expected_shapes(cfg)
    layers = {k: np.empty(s, np.float32) for k, s in shapes["layers"].items()}
    filled = {k: np.zeros(L, bool) for k in layers}
    for k in ("experts_gate", "experts_up", "experts_down"):
        if k in layers:  # MoE: filled per (layer, expert)
            filled[k] = np.zeros((L, cfg.num_experts), bool)
    params: dict = {"layers": layers}

    def put_layer(file, key, i, hf_suffix, x):
        name, is_matrix = layer_map[hf_suffix]
        if name not in layers:  # e.g. a bias the config says is absent
            return
        want = layers[name].shape[1:]  # [in, out] for matrices
        hf_want = want[::-1] if is_matrix else want
        if x.shape != hf_want:
            raise CheckpointError(f"{file}: {key} has shape {x.shape}, config.json implies {hf_want}")
        x = x.T if is_matrix else x
        layers[name][i] = x
        filled[name][i] = True

    def put_experts(file, key, i, m, x):
        """One expert's [out, in] projection, or a fused [E, ...] stack of them (see _EXPERT_KEY)."""
        E, F = cfg.num_experts, cfg.moe_intermediate_size
        if m.group(1) is not None:
            j, name = int(m.group(1)), _EXPERT_NAME[m.group(2)]
            want = layers[name].shape[2:][::-1]
            if j >= E or x.shape != want:
                raise CheckpointError(f"{file}: {key} has shape {x.shape} (expert {j}); config.json implies "
                                      f"{want} for each of {E} experts")
            layers[name][i, j] = x.T
            filled[name][i, j] = True
            return
        want = (E, 2 * F, cfg.hidden_size) if m.group(3) == "gate_up_proj" else (E, cfg.hidden_size, F)
        if x.shape != want:
            raise CheckpointError(f"{file}: {key} has shape {x.shape}, config.json implies {want}")
        x = x.transpose(0, 2, 1)  # [E, in, out]
        parts = {"experts_gate": x[..., :F], "experts_up": x[..., F:]} if m.group(3) == "gate_up_proj" else {
            "experts_down": x}
        for name, w in parts.items():
            layers[name][i] = w
            filled[name][i] = True

    for file in _safetensors_files(path):
        try:
            with safe_open(file, framework="numpy") as f:
                for key in f.keys():
                    short = _PREFIX.sub("", key)
                    m = re.match(r"^layers\.(\d+)\.(.+)$", short)
                    if m and m.group(2) in layer_map:
                        i = int(m.group(1))
                        if i >= L:
                            raise CheckpointError(f"{file}: {key} is beyond num_hidden_layers={L}")
                        put_layer(file, key, i, m.group(2), f.get_tensor(key).astype(np.float32))
                    elif m and cfg.is_moe and _EXPERT_KEY.match(m.group(2)):
                        i = int(m.group(1))
                        if i >= L:
                            raise CheckpointError(f"{file}: {key} is beyond num_hidden_layers={L}")
                        put_experts(file, key, i, _EXPERT_KEY.match(m.group(2)),
                                    f.get_tensor(key).astype(np.float32))
                    elif short == "embed_tokens.weight":
                        params["embed"] = f.get_tensor(key).astype(np.float32)
                    elif short == "norm.weight":
                        params["final_norm"] = f.get_tensor(key).astype(np.float32)
                    elif key.endswith("lm_head.weight") and not cfg.tie_word_embeddings:
                        params["lm_head"] = np.ascontiguousarray(f.get_tensor(key).astype(np.float32).T)
                    # anything else (vision tower, rotary caches) is not used
        except CheckpointError:
            raise
        except FileNotFoundError:
            raise CheckpointError(f"safetensors file not found: {file}") from None
        except Exception as e:  # safetensors raises SafetensorError (an Exception) for truncated/corrupt files
            raise CheckpointError(f"{file}: cannot read safetensors file ({type(e).__name__}: {e})") from None

    for k, done in filled.items():
        if not done.all():
            missing = np.flatnonzero(~done.reshape(L, -1).all(axis=1)).tolist()[:8]
            raise CheckpointError(f"{path}: missing weights for layers/{k} in layers {missing}")
    for k in ("embed", "final_norm") + (() if cfg.tie_word_embeddings else ("lm_head",)):
        if k not in params:
            raise CheckpointError(f"{path}: missing {k} weights")
        if params[k].shape != shapes[k]:
            raise CheckpointError(f"{path}: {k} has shape {params[k].shape}, expected {shapes[k]}")
    if gemma:  # (1 + w) -> effective multiplier
        params["final_norm"] += 1.0
        for k in ("attn_norm", "mlp_norm", "post_attn_norm", "post_mlp_norm", "q_norm", "k_norm"):
            if k in layers:  # (Gemma 2 has no q/k norms)
                layers[k] += 1.0
    return cfg, params
