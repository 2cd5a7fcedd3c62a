"""Model families from GGUF files written by llama.cpp's own converter: tests/test_families.py's tiny random
transformers models (Llama 3.x with llama3 RoPE scaling, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3, and the mixtures of
experts Mixtral, Qwen2-MoE with its shared expert, Qwen3-MoE), saved with
`save_pretrained`, converted by llama.cpp's `convert_hf_to_gguf.py` (float32, tests/llama_cpp_convert.py) and
loaded by `LLM(<file>.gguf)` through jaxserve's GGUF loader; the engine's greedy continuations are checked against
transformers' forward pass exactly as for the HF directories (argmax within 1e-4, logprobs within 1e-4).

This checks what the converter does that a hand-written GGUF would not: its tensor names, the Q/K row permutation
of llama-architecture files, Gemma's `1 + w` norm fold, Llama 3's `rope_freqs` tensor, and the hyperparameters it
writes or leaves to llama.cpp's hard-coded rules (Gemma's window period and query scale, Qwen-MoE's top-k
renormalisation), and its [E, out, in] expert stacks. Mistral and Mixtral are converted without a sliding window:
llama.cpp converts them as the llama architecture, which records none (Mistral 7B v0.2/v0.3 and Mixtral have none). The converter comes from the llama-cpp-python sdist (downloaded once, pinned).
"""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from jaxserve import LLM  # noqa: E402
from tests.llama_cpp_convert import convert  # noqa: E402
from tests.test_families import ENGINE, build_hf, check_config, check_greedy_against  # noqa: E402

FAMILIES = ("llama3", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "mixtral", "qwen2_moe", "qwen3_moe")


def _save_tokenizer(out_dir, vocab_size: int):
    """A word-level tokenizer.json of `vocab_size` tokens: the Gemma 3 converter reads its size to trim the
    embedding's out-of-vocabulary rows (the vocabulary itself is not converted, see tests/llama_cpp_convert.py)."""
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0")).save(
        str(out_dir / "tokenizer.json"))


@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_family_greedy_matches_transformers(tmp_path, family):
    changes = {"sliding_window": None} if family in ("mistral", "mixtral") else {}
    model = build_hf(family, tmp_path / "hf", **changes)
    _save_tokenizer(tmp_path / "hf", model.config.vocab_size)
    path = convert(str(tmp_path / "hf"), str(tmp_path / f"{family}.gguf"))
    llm = LLM(path, **ENGINE)
    assert llm.tokenizer is None  # the tiny models have no vocabulary; prompts are token ids
    check_config(llm.engine.model_cfg, family, window=None if "sliding_window" in changes else 12)
    check_greedy_against(model, llm, family)
