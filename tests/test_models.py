"""Model configs and building blocks: RoPE scaling, Gemma 3 layer pattern, presets, KV bytes formula."""

import math

import numpy as np
import pytest

from jaxserve.config import PRESETS, ModelConfig, get_preset
from jaxserve.errors import UnknownModelError
from jaxserve.models.transformer import rope_inv_freq


def test_gemma3_270m_layer_pattern_and_rope_bases():
    cfg = get_preset("gemma3-270m")
    windows = cfg.layer_windows()
    assert [i for i, w in enumerate(windows) if w == 0] == [5, 11, 17]  # every 6th layer is global
    assert all(w == 512 for i, w in enumerate(windows) if i not in (5, 11, 17))
    inv = rope_inv_freq(cfg)
    hd = cfg.head_dim
    # Local layers use base 10,000, global layers 1,000,000: inv_freq[j] = base^(-2j/hd).
    np.testing.assert_allclose(inv[0], 10_000.0 ** (-np.arange(0, hd, 2) / hd), rtol=1e-6)
    np.testing.assert_allclose(inv[5], 1_000_000.0 ** (-np.arange(0, hd, 2) / hd), rtol=1e-6)
    assert cfg.attn_scale == pytest.approx(256 ** -0.5)
    assert cfg.num_params() == 268_098_176  # the GGUF's parameter count


def test_llama3_rope_scaling_bands():
    """Llama 3.1 scaling: high-frequency bands unchanged, low-frequency bands divided by `factor`, and a
    smooth interpolation in between (wavelength between orig/high and orig/low)."""
    cfg = get_preset("llama3.1-8b")
    sc = cfg.rope_scaling
    base = 500_000.0 ** (-np.arange(0, cfg.head_dim, 2) / cfg.head_dim)
    inv = rope_inv_freq(cfg)[0]
    wavelen = 2 * math.pi / base
    old = sc["original_max_position_embeddings"]
    high = wavelen < old / sc["high_freq_factor"]
    low = wavelen > old / sc["low_freq_factor"]
    mid = ~high & ~low
    assert high.any() and low.any() and mid.any()
    np.testing.assert_allclose(inv[high], base[high], rtol=1e-6)
    np.testing.assert_allclose(inv[low], base[low] / sc["factor"], rtol=1e-6)
    assert np.all(inv[mid] < base[mid]) and np.all(inv[mid] > base[mid] / sc["factor"])
    smooth = (old / wavelen[mid] - sc["low_freq_factor"]) / (sc["high_freq_factor"] - sc["low_freq_factor"])
    np.testing.assert_allclose(inv[mid], (1 - smooth) * base[mid] / sc["factor"] + smooth * base[mid], rtol=1e-6)


def test_linear_rope_scaling_only_on_global_layers():
    cfg = get_preset("gemma3-4b")
    inv = rope_inv_freq(cfg)
    hd = cfg.head_dim
    np.testing.assert_allclose(inv[5], 1_000_000.0 ** (-np.arange(0, hd, 2) / hd) / 8.0, rtol=1e-6)
    np.testing.assert_allclose(inv[0], 10_000.0 ** (-np.arange(0, hd, 2) / hd), rtol=1e-6)


@pytest.mark.parametrize("name,expected", [
    ("llama2-7b", 2 * 32 * 128 * 2 * 32),  # MHA: 32 KV heads
    ("llama2-70b", 2 * 8 * 128 * 2 * 80),  # GQA: 8 KV heads
    ("llama3-8b", 2 * 8 * 128 * 2 * 32),
    ("gemma3-270m", 2 * 1 * 256 * 2 * 18),
])
def test_kv_bytes_per_token_bf16(name, expected):
    assert PRESETS[name].kv_bytes_per_token("bfloat16") == expected


def test_published_parameter_counts():
    # Within 1% of the published sizes.
    for name, n in [("llama2-7b", 6.74e9), ("llama2-70b", 68.98e9), ("llama3-8b", 8.03e9), ("mistral-7b", 7.24e9),
                    ("gemma3-1b", 1.0e9)]:
        assert PRESETS[name].num_params() == pytest.approx(n, rel=0.01), name


def test_config_round_trip_and_unknown():
    cfg = get_preset("tiny-gemma3")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(UnknownModelError):
        get_preset("gpt-17")


def test_from_hf_config_gemma3_and_qwen2():
    hf = {"model_type": "gemma3_text", "vocab_size": 262144, "hidden_size": 640, "intermediate_size": 2048,
          "num_hidden_layers": 18, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
          "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0, "sliding_window": 512,
          "query_pre_attn_scalar": 256, "max_position_embeddings": 32768, "bos_token_id": 2, "eos_token_id": [1, 106]}
    cfg = ModelConfig.from_hf_config(hf, name="gemma3-270m")
    ref = get_preset("gemma3-270m")
    for f in ("num_layers", "head_dim", "sliding_window", "global_every", "rope_local_theta", "qk_norm", "post_norms",
              "embed_scale", "tie_word_embeddings", "eos_token_ids", "hidden_act"):
        assert getattr(cfg, f) == getattr(ref, f), f
    q = ModelConfig.from_hf_config({"model_type": "qwen2", "vocab_size": 1000, "hidden_size": 64,
                                    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                                    "num_key_value_heads": 2})
    assert q.attention_bias and q.arch == "llama"
