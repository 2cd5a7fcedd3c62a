"""Model and engine configuration: plain data, one source of truth for every size.

`ModelConfig` describes a decoder-only transformer (Llama family or Gemma 3). Named presets cover the
embedded default (`gemma3-270m`), published larger models (usable with random weights for planning and
sharding tests) and tiny configs for unit tests.

`EngineConfig` holds the serving knobs: page size, KV budget, batch limits and the bucket ladders that fix
the set of compiled programs.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Optional

from jaxserve.errors import InvalidConfigError

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1, "int4": 0.5}


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only transformer. Sizes are in elements, lengths in tokens."""

    name: str
    arch: str  # "llama" (Llama/Mistral/Qwen2/Qwen3), "gemma2" or "gemma3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10_000.0
    # {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    #  "original_max_position_embeddings"}, {"rope_type": "linear", "factor"} or {"rope_type": "freq_factors",
    #  "factors": [hd/2 divisors of the inverse frequencies]} (a GGUF's rope_freqs); applies to global layers.
    rope_scaling: Optional[dict] = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2-style q/k/v bias
    hidden_act: str = "silu"  # "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    # Sliding-window attention. `global_every=None`: every layer is sliding if `sliding_window` is set
    # (Mistral). `global_every=6`: layers 5, 11, 17, ... are global, the rest sliding (Gemma 3).
    sliding_window: Optional[int] = None
    global_every: Optional[int] = None
    rope_local_theta: Optional[float] = None  # RoPE base of sliding layers (Gemma 3: 10,000)
    query_pre_attn_scalar: Optional[float] = None  # attention scale = this ** -0.5 (default head_dim)
    embed_scale: bool = False  # multiply embeddings by sqrt(hidden_size) (Gemma)
    qk_norm: bool = False  # RMSNorm on q and k per head (Gemma 3)
    post_norms: bool = False  # RMSNorm after attention and after the MLP (Gemma 2/3 "sandwich")
    final_logit_softcap: Optional[float] = None
    attn_logit_softcap: Optional[float] = None
    bos_token_id: Optional[int] = 1
    eos_token_ids: tuple = (2,)
    pad_token_id: int = 0
    chat_template: Optional[str] = None  # name of a template in jaxserve.weights.tokenizer.CHAT_TEMPLATES
    # Mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE): with `num_experts` > 0 every layer's MLP is
    # `num_experts` SwiGLU experts of width `moe_intermediate_size` (`intermediate_size` is then unused);
    # a router picks `num_experts_per_tok` of them per token: softmax over all experts in float32, top-k, the
    # k probabilities renormalised to sum 1 when `norm_topk_prob` (Mixtral always). Qwen2-MoE adds a shared
    # expert of width `shared_expert_intermediate_size` on every token, scaled by sigmoid(x @ w).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    shared_expert_intermediate_size: int = 0  # 0: no shared expert

    # ---- derived quantities (the only place they are computed) ----
    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def layer_is_sliding(self, layer: int) -> bool:
        if self.sliding_window is None:
            return False
        if self.global_every is None:
            return True
        return (layer + 1) % self.global_every != 0

    def layer_windows(self) -> list:
        """Per-layer attention window in tokens (0 = unlimited)."""
        return [self.sliding_window if self.layer_is_sliding(i) else 0 for i in range(self.num_layers)]

    def kv_layout(self, reclaim: bool = True) -> "KVLayout":
        """How the layers share the paged KV cache (see KVLayout). `reclaim`: sliding-window layers get their own
        page groups, whose pages are freed once they fall out of the window."""
        kinds: dict = {}
        for layer, w in enumerate(self.layer_windows()):
            kinds.setdefault(w if reclaim else 0, []).append(layer)
        width = min(len(v) for v in kinds.values())
        group_windows, layer_group, layer_index = [], [0] * self.num_layers, [0] * self.num_layers
        for w in sorted(kinds):  # full attention (0) first: group 0 holds every position when any layer does
            layers = kinds[w]
            for c in range(0, len(layers), width):
                for j, layer in enumerate(layers[c:c + width]):
                    layer_group[layer], layer_index[layer] = len(group_windows), j
                group_windows.append(w)
        return KVLayout(tuple(group_windows), tuple(layer_group), tuple(layer_index), width)

    def layer_rope_thetas(self) -> list:
        local = self.rope_local_theta if self.rope_local_theta is not None else self.rope_theta
        return [local if self.layer_is_sliding(i) else self.rope_theta for i in range(self.num_layers)]

    @property
    def attn_scale(self) -> float:
        base = self.query_pre_attn_scalar if self.query_pre_attn_scalar is not None else self.head_dim
        return float(base) ** -0.5

    def kv_bytes_per_token(self, kv_dtype: str = "float32") -> float:
        """Bytes of KV cache one token occupies across all layers (GQA-aware).

        = 2 (K and V) x n_kv_heads x head_dim x bytes per element x n_layers; int8 KV adds one float32
        scale per token, head and K/V.
        """
        per_elem = DTYPE_BYTES[kv_dtype]
        scales = 2 * self.num_kv_heads * 4 if kv_dtype == "int8" else 0
        return (2 * self.num_kv_heads * self.head_dim * per_elem + scales) * self.num_layers

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def num_params(self, active: bool = False) -> int:
        """Parameters of the model; `active`: those one token uses (a MoE model's `num_experts_per_tok` experts
        instead of all of them; the same as the total for a dense model)."""
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        attn = d * self.q_size + 2 * d * self.kv_size + self.q_size * d
        if self.attention_bias:
            attn += self.q_size + 2 * self.kv_size
        mlp = 3 * d * f if not self.is_moe else self._moe_params(active)
        norms = 2 * d + (2 * d if self.post_norms else 0) + (2 * self.head_dim if self.qk_norm else 0)
        per_layer = attn + mlp + norms
        embed = v * d * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embed + d

    def _moe_params(self, active: bool) -> int:
        """One layer's MoE MLP: router [D, E], the experts (all, or the top-k a token uses), shared expert."""
        d = self.hidden_size
        experts = self.num_experts_per_tok if active else self.num_experts
        n = d * self.num_experts + experts * 3 * d * self.moe_intermediate_size
        if self.shared_expert_intermediate_size:
            n += 3 * d * self.shared_expert_intermediate_size + d  # + its sigmoid gate [D, 1]
        return n

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        if "eos_token_ids" in kw:
            kw["eos_token_ids"] = tuple(kw["eos_token_ids"])
        return cls(**kw)

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_hf_config(cls, hf: dict, name: str = "hf-model") -> "ModelConfig":
        """Build from a HF `config.json` dict (Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3 text)."""
        if "text_config" in hf:  # Gemma 3 multimodal wrapper
            hf = {**hf["text_config"], "model_type": hf["text_config"].get("model_type", "gemma3_text")}
        mt = hf.get("model_type", "llama")
        n_heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // n_heads
        eos = hf.get("eos_token_id", 2)
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
        common = dict(
            name=name,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=n_heads,
            num_kv_heads=hf.get("num_key_value_heads", n_heads),
            head_dim=head_dim,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=hf.get("rope_theta", 10_000.0),
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos,
            pad_token_id=hf.get("pad_token_id") or 0,
        )
        scaling = hf.get("rope_scaling")
        if scaling is not None:
            scaling = dict(scaling)
            scaling.setdefault("rope_type", scaling.pop("type", "default"))
            if scaling["rope_type"] == "default":
                scaling = None
        if mt.startswith("gemma2"):
            # Gemma 2: Gemma 3's layer but no q/k norms, logit soft-capping in attention and on the output,
            # every other layer sliding (layer 0 local), one RoPE base for both kinds of layer.
            return cls(
                arch="gemma2",
                hidden_act="gelu_tanh",
                rope_scaling=scaling,
                sliding_window=hf.get("sliding_window", 4096),
                global_every=hf.get("sliding_window_pattern", 2),
                query_pre_attn_scalar=hf.get("query_pre_attn_scalar", head_dim),
                embed_scale=True,
                post_norms=True,
                final_logit_softcap=hf.get("final_logit_softcapping"),
                attn_logit_softcap=hf.get("attn_logit_softcapping"),
                chat_template="gemma",
                **{**common, "tie_word_embeddings": hf.get("tie_word_embeddings", True)},
            )
        if mt.startswith("gemma3"):
            pattern = hf.get("sliding_window_pattern", 6)
            return cls(
                arch="gemma3",
                hidden_act="gelu_tanh",
                rope_scaling=scaling,
                sliding_window=hf.get("sliding_window", 512),
                global_every=pattern,
                rope_local_theta=hf.get("rope_local_base_freq", 10_000.0),
                query_pre_attn_scalar=hf.get("query_pre_attn_scalar", head_dim),
                embed_scale=True,
                qk_norm=True,
                post_norms=True,
                final_logit_softcap=hf.get("final_logit_softcapping"),
                attn_logit_softcap=hf.get("attn_logit_softcapping"),
                chat_template="gemma",
                **{**common, "tie_word_embeddings": hf.get("tie_word_embeddings", True)},
            )
        if mt in ("mixtral", "qwen2_moe", "qwen3_moe"):
            return cls._from_hf_moe(hf, mt, common, scaling)
        if mt not in ("llama", "mistral", "qwen2", "qwen3"):
            raise InvalidConfigError(f"unsupported model_type {mt!r} (supported: llama, mistral, qwen2, qwen3, "
                                     f"gemma2, gemma3, mixtral, qwen2_moe, qwen3_moe)")
        # Qwen2/3 declare a sliding window they only use with use_sliding_window (off in their releases).
        window = hf.get("sliding_window") if mt == "mistral" or hf.get("use_sliding_window") else None
        return cls(
            arch="llama",
            hidden_act="silu",
            rope_scaling=scaling,
            attention_bias=(mt == "qwen2") or bool(hf.get("attention_bias", False)),
            qk_norm=(mt == "qwen3"),  # Qwen3: RMSNorm over each head's q and k before RoPE
            sliding_window=window,
            chat_template={"qwen2": "chatml", "qwen3": "chatml", "mistral": "mistral"}.get(
                mt, "llama3" if hf["vocab_size"] > 100_000 else "llama2"),
            **common,
        )

    @classmethod
    def _from_hf_moe(cls, hf: dict, mt: str, common: dict, scaling) -> "ModelConfig":
        """Mixtral, Qwen2-MoE, Qwen3-MoE (transformers' modeling_{mixtral,qwen2_moe,qwen3_moe}.py)."""
        if hf.get("hidden_act", "silu") != "silu":
            raise InvalidConfigError(f"{mt}: hidden_act {hf['hidden_act']!r} is not supported (silu only)")
        # Mixtral's key is num_local_experts, Qwen's num_experts (transformers 5 writes Qwen3-MoE's under both names
        # or only num_local_experts).
        num_experts = hf["num_local_experts"] if "num_local_experts" in hf else hf["num_experts"]
        if not 0 < hf["num_experts_per_tok"] <= num_experts:
            raise InvalidConfigError(f"{mt}: num_experts_per_tok={hf['num_experts_per_tok']} must be in "
                                     f"1..{num_experts} (the number of experts)")
        if mt == "mixtral":
            # Every layer sparse; softmax -> top-k -> renormalise (MixtralTopKRouter); experts of intermediate_size.
            return cls(
                arch="llama", hidden_act="silu", rope_scaling=scaling, sliding_window=hf.get("sliding_window"),
                num_experts=num_experts, num_experts_per_tok=hf["num_experts_per_tok"],
                moe_intermediate_size=hf["intermediate_size"], norm_topk_prob=True, chat_template="mistral",
                **common,
            )
        # Qwen MoE: layers in mlp_only_layers, or not on the decoder_sparse_step grid, have a dense MLP instead.
        # The layer scan needs one parameter layout for every layer, so only all-sparse models are supported
        # (every released Qwen1.5/2/3 MoE checkpoint is).
        if hf.get("decoder_sparse_step", 1) != 1 or hf.get("mlp_only_layers"):
            raise InvalidConfigError(
                f"{mt}: models mixing dense and MoE layers (decoder_sparse_step="
                f"{hf.get('decoder_sparse_step', 1)}, mlp_only_layers={hf.get('mlp_only_layers')}) are not "
                f"supported; every layer must be sparse (decoder_sparse_step 1, mlp_only_layers [])")
        if hf.get("use_sliding_window"):
            raise InvalidConfigError(f"{mt}: use_sliding_window=True (per-layer windows from max_window_layers) "
                                     f"is not supported")
        return cls(
            arch="llama", hidden_act="silu", rope_scaling=scaling,
            attention_bias=bool(hf.get("qkv_bias", True)) if mt == "qwen2_moe" else bool(hf.get("attention_bias")),
            qk_norm=(mt == "qwen3_moe"),
            num_experts=num_experts, num_experts_per_tok=hf["num_experts_per_tok"],
            moe_intermediate_size=hf["moe_intermediate_size"], norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
            shared_expert_intermediate_size=(hf.get("shared_expert_intermediate_size", 0) if mt == "qwen2_moe"
                                             else 0),
            chat_template="chatml", **common,
        )


def _gemma3(name, **kw) -> ModelConfig:
    base = dict(
        arch="gemma3",
        hidden_act="gelu_tanh",
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        rope_local_theta=10_000.0,
        global_every=6,
        embed_scale=True,
        qk_norm=True,
        post_norms=True,
        tie_word_embeddings=True,
        bos_token_id=2,
        eos_token_ids=(1, 106),  # <eos>, <end_of_turn>
        pad_token_id=0,
        chat_template="gemma",
    )
    base.update(kw)
    return ModelConfig(name=name, **base)


def _llama(name, **kw) -> ModelConfig:
    base = dict(arch="llama", hidden_act="silu", rms_norm_eps=1e-5, bos_token_id=1, eos_token_ids=(2,))
    base.update(kw)
    return ModelConfig(name=name, **base)


_LLAMA31_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

PRESETS: dict = {
    c.name: c
    for c in [
        _gemma3(
            "gemma3-270m", vocab_size=262_144, hidden_size=640, intermediate_size=2048, num_layers=18,
            num_heads=4, num_kv_heads=1, head_dim=256, sliding_window=512, query_pre_attn_scalar=256,
            max_position_embeddings=32_768,
        ),
        _gemma3(
            "gemma3-1b", vocab_size=262_144, hidden_size=1152, intermediate_size=6912, num_layers=26,
            num_heads=4, num_kv_heads=1, head_dim=256, sliding_window=512, query_pre_attn_scalar=256,
            max_position_embeddings=32_768,
        ),
        _gemma3(
            "gemma3-4b", vocab_size=262_208, hidden_size=2560, intermediate_size=10_240, num_layers=34,
            num_heads=8, num_kv_heads=4, head_dim=256, sliding_window=1024, query_pre_attn_scalar=256,
            rope_scaling={"rope_type": "linear", "factor": 8.0}, max_position_embeddings=131_072,
        ),
        _gemma3(
            "gemma3-27b", vocab_size=262_208, hidden_size=5376, intermediate_size=21_504, num_layers=62,
            num_heads=32, num_kv_heads=16, head_dim=128, sliding_window=1024, query_pre_attn_scalar=168,
            rope_scaling={"rope_type": "linear", "factor": 8.0}, max_position_embeddings=131_072,
        ),
        _llama(
            "llama2-7b", vocab_size=32_000, hidden_size=4096, intermediate_size=11_008, num_layers=32,
            num_heads=32, num_kv_heads=32, head_dim=128, max_position_embeddings=4096, chat_template="llama2",
        ),
        _llama(
            "llama2-70b", vocab_size=32_000, hidden_size=8192, intermediate_size=28_672, num_layers=80,
            num_heads=64, num_kv_heads=8, head_dim=128, max_position_embeddings=4096, chat_template="llama2",
        ),
        _llama(
            "llama3-8b", vocab_size=128_256, hidden_size=4096, intermediate_size=14_336, num_layers=32,
            num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500_000.0, max_position_embeddings=8192,
            bos_token_id=128_000, eos_token_ids=(128_001, 128_009), chat_template="llama3",
        ),
        _llama(
            "llama3-70b", vocab_size=128_256, hidden_size=8192, intermediate_size=28_672, num_layers=80,
            num_heads=64, num_kv_heads=8, head_dim=128, rope_theta=500_000.0, max_position_embeddings=8192,
            bos_token_id=128_000, eos_token_ids=(128_001, 128_009), chat_template="llama3",
        ),
        _llama(
            "llama3.1-8b", vocab_size=128_256, hidden_size=4096, intermediate_size=14_336, num_layers=32,
            num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500_000.0, rope_scaling=_LLAMA31_SCALING,
            max_position_embeddings=131_072, bos_token_id=128_000, eos_token_ids=(128_001, 128_008, 128_009),
            chat_template="llama3",
        ),
        _llama(
            "mistral-7b", vocab_size=32_000, hidden_size=4096, intermediate_size=14_336, num_layers=32,
            num_heads=32, num_kv_heads=8, head_dim=128, sliding_window=4096, max_position_embeddings=32_768,
            chat_template="mistral",
        ),
        _llama(
            "llama3.2-1b", vocab_size=128_256, hidden_size=2048, intermediate_size=8192, num_layers=16,
            num_heads=32, num_kv_heads=8, head_dim=64, rope_theta=500_000.0,
            rope_scaling=_LLAMA31_SCALING | {"factor": 32.0}, max_position_embeddings=131_072,
            tie_word_embeddings=True, bos_token_id=128_000, eos_token_ids=(128_001, 128_008, 128_009),
            chat_template="llama3",
        ),
        _llama(
            "llama3.2-3b", vocab_size=128_256, hidden_size=3072, intermediate_size=8192, num_layers=28,
            num_heads=24, num_kv_heads=8, head_dim=128, rope_theta=500_000.0,
            rope_scaling=_LLAMA31_SCALING | {"factor": 32.0}, max_position_embeddings=131_072,
            tie_word_embeddings=True, bos_token_id=128_000, eos_token_ids=(128_001, 128_008, 128_009),
            chat_template="llama3",
        ),
        _llama(
            "qwen2.5-7b", vocab_size=152_064, hidden_size=3584, intermediate_size=18_944, num_layers=28,
            num_heads=28, num_kv_heads=4, head_dim=128, attention_bias=True, rope_theta=1_000_000.0,
            rms_norm_eps=1e-6, max_position_embeddings=32_768, bos_token_id=151_643,
            eos_token_ids=(151_643, 151_645), chat_template="chatml",
        ),
        _llama(
            "qwen3-8b", vocab_size=151_936, hidden_size=4096, intermediate_size=12_288, num_layers=36,
            num_heads=32, num_kv_heads=8, head_dim=128, qk_norm=True, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
            max_position_embeddings=40_960, bos_token_id=151_643, eos_token_ids=(151_643, 151_645),
            chat_template="chatml",
        ),
        _gemma3(
            "gemma2-9b", arch="gemma2", vocab_size=256_000, hidden_size=3584, intermediate_size=14_336,
            num_layers=42, num_heads=16, num_kv_heads=8, head_dim=256, sliding_window=4096, global_every=2,
            rope_theta=10_000.0, rope_local_theta=None, qk_norm=False, query_pre_attn_scalar=256,
            attn_logit_softcap=50.0, final_logit_softcap=30.0, max_position_embeddings=8192,
            eos_token_ids=(1, 107),
        ),
        # Mixture of experts: Mistral AI's Mixtral-8x7B-v0.1 and Qwen's Qwen3-30B-A3B config.json.
        _llama(
            "mixtral-8x7b", vocab_size=32_000, hidden_size=4096, intermediate_size=14_336, num_layers=32,
            num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=1_000_000.0, max_position_embeddings=32_768,
            num_experts=8, num_experts_per_tok=2, moe_intermediate_size=14_336, chat_template="mistral",
        ),
        _llama(
            "qwen3-30b-a3b", vocab_size=151_936, hidden_size=2048, intermediate_size=6144, num_layers=48,
            num_heads=32, num_kv_heads=4, head_dim=128, qk_norm=True, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
            max_position_embeddings=40_960, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
            norm_topk_prob=True, bos_token_id=151_643, eos_token_ids=(151_643, 151_645), chat_template="chatml",
        ),
        # Tiny random-weight configs for unit tests: same code paths, milliseconds to run.
        _llama(
            "tiny-llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
            num_kv_heads=2, head_dim=16, rope_scaling=_LLAMA31_SCALING | {"original_max_position_embeddings": 64},
            max_position_embeddings=1024, eos_token_ids=(2,), chat_template="llama3",
        ),
        _llama(
            "tiny-qwen2", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
            num_kv_heads=1, head_dim=16, attention_bias=True, rope_theta=1_000_000.0,
            max_position_embeddings=1024, eos_token_ids=(2,), chat_template="chatml",
        ),
        _llama(
            "tiny-mixtral", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
            num_kv_heads=2, head_dim=16, max_position_embeddings=1024, num_experts=8, num_experts_per_tok=2,
            moe_intermediate_size=32, chat_template="mistral",
        ),
        _llama(
            "tiny-qwen2-moe", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
            num_kv_heads=2, head_dim=16, attention_bias=True, max_position_embeddings=1024, num_experts=6,
            num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=False, shared_expert_intermediate_size=48,
            chat_template="chatml",
        ),
        _gemma3(
            "tiny-gemma3", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4,
            num_kv_heads=1, head_dim=32, sliding_window=24, global_every=2, query_pre_attn_scalar=32,
            max_position_embeddings=1024, eos_token_ids=(1,),
        ),
    ]
}


def get_preset(name: str) -> ModelConfig:
    from jaxserve.errors import UnknownModelError

    try:
        return PRESETS[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}"
        ) from None


def load_model_config(spec: str) -> ModelConfig:
    """A preset name, or a path to a HF `config.json` / jaxserve_config.json."""
    if spec in PRESETS:
        return PRESETS[spec]
    import os

    if os.path.exists(spec):
        with open(spec) as f:
            d = json.load(f)
        if "arch" in d:
            return ModelConfig.from_dict(d)
        return ModelConfig.from_hf_config(d, name=os.path.basename(os.path.dirname(os.path.abspath(spec))))
    return get_preset(spec)


RAGGED_TILE = 16  # tokens per attention tile of a ragged step (models/ragged.py): T >= 16 is a multiple of it


def _pow2_ladder(lo: int, hi: int) -> list:
    out, v = [], lo
    while v < hi:
        out.append(v)
        v *= 2
    out.append(hi)
    return sorted(set(out))


@dataclass(frozen=True)
class KVLayout:
    """Which pages hold which layer's KV (`ModelConfig.kv_layout`).

    The cache is `width` rows of pages ([width, slots, Hkv, hd] for K and for V). Layers are split into page
    groups of at most `width` layers of the same attention window; every group has its own block table per
    sequence, and layer l reads and writes row `layer_index[l]` at the pages of group `layer_group[l]`'s table.
    So a page holds `width` layers' KV and belongs to one group (the block manager's pool is shared).

    One group (`width` = all layers) is the plain layout. With sliding-window layers (Gemma 2/3, Mistral) each
    window gets its own groups, and a sliding group's pages that fall out of its window are freed
    (BlockManager.trim_window): Gemma 3 270M (3 global, 15 local layers of window 512) is 6 groups of 3 rows; a
    sequence holds its whole context in one group and at most ~512 tokens + one step's in each of the 5 others.
    Full-attention groups come first: group 0 holds every position whenever any layer attends to all of them.
    """

    group_windows: tuple  # per group: 0 = full attention, else the sliding window in tokens
    layer_group: tuple  # per layer
    layer_index: tuple  # per layer: its row of the cache
    width: int

    @property
    def num_groups(self) -> int:
        return len(self.group_windows)

    @property
    def grouped(self) -> bool:
        """Whether block tables are per group (anything but the plain one-group, full-attention layout)."""
        return self.num_groups > 1 or self.group_windows[0] > 0


@dataclass
class EngineConfig:
    """Serving knobs. Lengths in tokens, memory in bytes.

    Steps run over fixed shapes: a decode step is `[R, 1]` tokens with R from `decode_buckets()`; a prefill
    step is `[R, Q]` tokens (R sequences, Q new tokens each) from `prefill_buckets()`. Attention walks the
    paged KV cache in blocks with a runtime trip count, so context length never picks a program.
    """

    page_size: int = 16
    kv_cache_bytes: Optional[int] = None  # None: planner's share of this device's memory
    num_pages: Optional[int] = None  # overrides kv_cache_bytes (tests)
    max_model_len: Optional[int] = None  # None: min(model context, 8192)
    max_num_seqs: int = 32  # requests per decode step (largest decode bucket)
    max_num_batched_tokens: int = 512  # tokens per prefill step = prefill chunk budget
    # Fewer prefill buckets = faster start-up (each program is traced at start-up even when its compiled
    # form comes from the persistent cache): rows x tokens from 1 x 32 up to 4 x 128 and 1 x 512.
    max_prefill_seqs: int = 4
    min_prefill_tokens: int = 32  # smallest prefill Q bucket
    attn_block_pages: int = 16  # pages per attention block (the loop step over the KV cache)
    dtype: str = "float32"  # compute/weight dtype; float32 = the reference numerics; bfloat16 is faster on CPU (README)
    kv_cache_dtype: str = "float32"  # or "bfloat16", or "int8" (per token and head scales; XLA and Pallas paths)
    # Weight-only quantization of the linear layers (jaxserve/weights/quantize.py, docs/quantization.md):
    # None | "int8" (per output channel) | "int4" (group-wise RTN) | "gptq" (calibrated int4). Off by default.
    quantization: Optional[str] = None
    quant_group_size: int = 64  # int4 / gptq rows per scale; K % (2 * group) == 0 for every layer
    quantize_embed: bool = False  # also the embedding / tied LM head (measured separately)
    # "auto" (Pallas kernels on TPU/GPU, the XLA path on CPU) | "xla" | "pallas" (on CPU: interpret mode, slow);
    # see pallas_kernels/engine.py and ModelRunner's attention_fn_for.
    attention_impl: str = "auto"
    # Quantized (int8 / int4) weight matmuls: "auto" (the Pallas kernels of pallas_kernels/quant_matmul.py on
    # TPU/GPU, the XLA column-chunk loop on CPU) | "xla" | "pallas" (on CPU: interpret mode, slow; for tests).
    matmul_impl: str = "auto"
    # Bit-identical outputs whatever else shares a request's step (see models/transformer.py ROW_TILE);
    # on XLA:CPU it costs batch-1 decode speed (a 2-row GEMM replaces the matrix-vector kernel).
    batch_invariant: bool = False
    scheduler: str = "continuous"  # "continuous" | "static"
    # "ragged": every step is one flat array of decode tokens and prompt chunks (models/ragged.py), bucketed by its
    # token count only; "buckets": separate (R, 1) decode and (R, Q) prefill steps; "auto": ragged where the engine
    # supports it (one device, XLA attention, continuous scheduler, no speculation, not batch_invariant).
    step_mode: str = "auto"
    # Ragged steps' token counts T: powers of two up to this, then its multiples up to max_num_batched_tokens
    # (smaller: less padding when a prompt's last chunk leaves the step part full, more programs to compile).
    token_bucket_step: int = 64
    # On a pipeline (stage > 1): "rotate" = decode groups rotate through the stages across steps (every stage busy,
    # parallel/pipeline.py make_rotation_forward); "gpipe" = each decode step is a GPipe pass (S - 1 idle ticks).
    pipeline_decode: str = "rotate"
    enable_prefix_caching: bool = True
    # Sliding-window layers keep only their window's pages (config.KVLayout; Gemma 2/3, Mistral). Off: every
    # layer keeps the whole context (what pipeline stages, which split the cache by layer, use).
    sliding_window_reclaim: bool = True
    max_logprobs: int = 20
    seed: int = 0
    compile_workers: int = 2

    def validate(self, model: ModelConfig) -> None:
        if self.page_size <= 0 or self.page_size & (self.page_size - 1):
            raise InvalidConfigError(f"page_size must be a positive power of two, got {self.page_size}")
        if self.max_num_seqs <= 0 or self.max_num_batched_tokens <= 0:
            raise InvalidConfigError("max_num_seqs and max_num_batched_tokens must be positive")
        if self.attention_impl not in ("auto", "xla", "pallas"):
            raise InvalidConfigError(f"attention_impl must be auto, xla or pallas, got {self.attention_impl!r}")
        if self.matmul_impl not in ("auto", "xla", "pallas"):
            raise InvalidConfigError(f"matmul_impl must be auto, xla or pallas, got {self.matmul_impl!r}")
        if self.scheduler not in ("continuous", "static"):
            raise InvalidConfigError(f"scheduler must be 'continuous' or 'static', got {self.scheduler!r}")
        if self.token_bucket_step <= 0 or self.token_bucket_step & (self.token_bucket_step - 1):
            raise InvalidConfigError(f"token_bucket_step must be a positive power of two, got {self.token_bucket_step}")
        if self.step_mode not in ("auto", "ragged", "buckets"):
            raise InvalidConfigError(f"step_mode must be 'auto', 'ragged' or 'buckets', got {self.step_mode!r}")
        if self.pipeline_decode not in ("rotate", "gpipe"):
            raise InvalidConfigError(f"pipeline_decode must be 'rotate' or 'gpipe', got {self.pipeline_decode!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise InvalidConfigError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.kv_cache_dtype not in ("float32", "bfloat16", "int8"):
            raise InvalidConfigError(
                f"kv_cache_dtype must be float32, bfloat16 or int8, got {self.kv_cache_dtype!r}")
        if self.quantization not in (None, "int8", "int4", "gptq"):
            raise InvalidConfigError(
                f"unknown quantization {self.quantization!r}: use None, 'int8', 'int4' or 'gptq'")
        if (isinstance(self.quant_group_size, bool) or not isinstance(self.quant_group_size, int)
                or self.quant_group_size <= 0):
            raise InvalidConfigError(f"quant_group_size must be a positive integer, got {self.quant_group_size!r}")
        if model.is_moe:
            self._validate_moe(model)
        if self.model_len(model) > model.max_position_embeddings:
            raise InvalidConfigError(
                f"max_model_len {self.max_model_len} exceeds the model's context {model.max_position_embeddings}"
            )

    def _validate_moe(self, model: ModelConfig) -> None:
        """What mixture-of-experts models (models/transformer.py's moe_mlp) do not support yet."""
        if self.batch_invariant:
            raise InvalidConfigError(
                f"batch_invariant=True is not supported for the mixture-of-experts model {model.name}: its grouped "
                f"expert matmuls (jax.lax.ragged_dot) are not tiled to fixed row counts, so a token's result may "
                f"depend on what shares its step; use batch_invariant=False")
        if self.quantization is not None:
            raise InvalidConfigError(
                f"quantization={self.quantization!r} is not supported for the mixture-of-experts model "
                f"{model.name}: its expert weights have no quantized form yet; use quantization=None")

    def model_len(self, model: ModelConfig) -> int:
        if self.max_model_len is not None:
            return self.max_model_len
        return min(model.max_position_embeddings, 8192)

    def pages_per_seq(self, model: ModelConfig) -> int:
        """Width of every block table: enough pages for `max_model_len` tokens, rounded to whole blocks."""
        pages = math.ceil(self.model_len(model) / self.page_size)
        return math.ceil(pages / self.attn_block_pages) * self.attn_block_pages

    def token_buckets(self) -> list:
        """A ragged step's token counts T (models/ragged.py): powers of two up to `token_bucket_step`, then its
        multiples, up to max(max_num_batched_tokens, max_num_seqs) (every decoding sequence fits one step)."""
        top = max(self.max_num_batched_tokens, self.max_num_seqs)
        step = self.token_bucket_step
        out = _pow2_ladder(1, min(step, top))
        t = out[-1]
        while t < top:
            t = (t // step + 1) * step
            out.append(t)
        return sorted({t if t < RAGGED_TILE else -(-t // RAGGED_TILE) * RAGGED_TILE for t in out})

    def decode_buckets(self) -> list:
        return _pow2_ladder(1, self.max_num_seqs)

    def prefill_buckets(self) -> list:
        """(R, Q) shapes: R sequences x Q new tokens, R*Q <= max_num_batched_tokens."""
        qs = _pow2_ladder(min(self.min_prefill_tokens, self.max_num_batched_tokens), self.max_num_batched_tokens)
        rs = _pow2_ladder(1, self.max_prefill_seqs)
        return [(r, q) for q in qs for r in rs if r * q <= self.max_num_batched_tokens]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))
