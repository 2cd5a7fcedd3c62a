"""Model families against HF transformers: a tiny random model of each architecture is built by transformers from
a config, saved with `save_pretrained`, and loaded by jaxserve's own loader (`LLM(<directory>)`); the paged,
bucketed engine's greedy continuations of mixed-length prompts (past the sliding window where the family has
one) are then checked against transformers' forward pass over the same tokens (teacher forcing):

* every generated token is transformers' argmax at that position, or within 1e-4 of its max logit (a near-tie
  that float32 summation order may break either way);
* the logprob jaxserve reports for it equals transformers' log-softmax within 1e-4.

The mixture-of-experts families (Mixtral with a sliding window, Qwen2-MoE with its gated shared expert and
without top-k renormalisation, Qwen3-MoE with it) have 8 experts, top-2, so a step's tokens reach experts
unevenly (some none). No weights are downloaded. `initializer_range` is raised so that random logits are far from uniform (the
default 0.02 gives near-ties everywhere)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxserve import LLM, SamplingParams  # noqa: E402

V = 256
COMMON = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.25, bos_token_id=1,
              eos_token_id=2, pad_token_id=0)
WINDOW = 12  # sliding windows small enough that the prompts below run past them

FAMILIES = {
    "llama3": (transformers.LlamaForCausalLM, transformers.LlamaConfig(
        **COMMON, rope_theta=500_000.0, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32})),
    "mistral": (transformers.MistralForCausalLM, transformers.MistralConfig(
        **COMMON, sliding_window=WINDOW, tie_word_embeddings=False)),
    "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config(**COMMON, tie_word_embeddings=True)),
    "qwen3": (transformers.Qwen3ForCausalLM, transformers.Qwen3Config(**COMMON, head_dim=16,
                                                                       tie_word_embeddings=True)),
    "gemma2": (transformers.Gemma2ForCausalLM, transformers.Gemma2Config(
        **COMMON, head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=16, attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0)),
    "gemma3": (transformers.Gemma3ForCausalLM, transformers.Gemma3TextConfig(
        **{**COMMON, "num_hidden_layers": 6}, head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=16)),
    "mixtral": (transformers.MixtralForCausalLM, transformers.MixtralConfig(
        **{**COMMON, "intermediate_size": 32}, sliding_window=WINDOW, num_local_experts=8, num_experts_per_tok=2)),
    "qwen2_moe": (transformers.Qwen2MoeForCausalLM, transformers.Qwen2MoeConfig(
        **COMMON, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48,
        norm_topk_prob=False, tie_word_embeddings=False)),
    "qwen3_moe": (transformers.Qwen3MoeForCausalLM, transformers.Qwen3MoeConfig(
        **COMMON, head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
        tie_word_embeddings=True)),
}
MOE = ("mixtral", "qwen2_moe", "qwen3_moe")

ENGINE = dict(page_size=4, max_model_len=128, max_num_seqs=4, max_num_batched_tokens=32, max_prefill_seqs=2,
              num_pages=256, attn_block_pages=2)
NEW_TOKENS = 10


def _prompts():
    r = np.random.default_rng(0)
    return [[int(t) for t in r.integers(3, V, n)] for n in (3, 9, 17, 40, 26)]


def build_hf(family: str, out_dir, **config_changes):
    """transformers' tiny random model of `family` (norms and biases randomised too), saved to `out_dir`."""
    cls, cfg = FAMILIES[family]
    if config_changes:
        cfg = copy.deepcopy(cfg)
        for k, v in config_changes.items():
            setattr(cfg, k, v)
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)  # non-trivial norm weights (Gemma's 1 + w fold, Qwen3's q/k norms)
            elif "bias" in name:
                p.normal_(0.0, 0.3)
    model.save_pretrained(str(out_dir))
    return model


def check_greedy_against(model, llm, family: str, tol: float = 1e-4):
    """The engine's greedy continuations of mixed-length prompts: each token transformers' argmax (or within `tol`
    of its max logit) and its logprob transformers' log-softmax within `tol` (teacher forcing)."""
    prompts = _prompts()
    sp = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)
    outs = llm.generate(prompts, sp, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        toks = out.outputs[0].token_ids
        assert len(toks) == NEW_TOKENS
        with torch.no_grad():
            logits = model(torch.tensor([prompt + toks])).logits[0].double()
        lsm = torch.log_softmax(logits, dim=-1).numpy()
        for j, t in enumerate(toks):
            row = logits[len(prompt) - 1 + j].numpy()
            assert row[t] >= row.max() - tol, (family, len(prompt), j, t, int(row.argmax()), row.max() - row[t])
            got = out.outputs[0].logprobs[j][t]
            assert abs(got - lsm[len(prompt) - 1 + j, t]) < tol, (family, len(prompt), j, got,
                                                                   lsm[len(prompt) - 1 + j, t])


def check_config(jc, family: str, window=WINDOW):
    if family in ("mistral", "gemma2", "gemma3", "mixtral"):
        assert jc.sliding_window == window
    assert jc.qk_norm == (family in ("qwen3", "gemma3", "qwen3_moe"))
    assert jc.attention_bias == (family in ("qwen2", "qwen2_moe"))
    assert (jc.num_experts, jc.num_experts_per_tok) == ((8, 2) if family in MOE else (0, 0))
    assert jc.shared_expert_intermediate_size == (48 if family == "qwen2_moe" else 0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_greedy_matches_transformers(tmp_path, family):
    model = build_hf(family, tmp_path)
    llm = LLM(str(tmp_path), **ENGINE)
    check_config(llm.engine.model_cfg, family)
    check_greedy_against(model, llm, family)
