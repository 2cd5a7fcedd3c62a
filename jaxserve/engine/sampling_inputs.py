"""Host side of sampling (numpy only): the per-row arrays of one step, built from each row's SamplingParams,
token history and seed. `sampler.SamplingTensors(**build_sampling_arrays(...))` is what the device samples with.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from jaxserve.sampling_params import MAX_LOGIT_BIAS

GREEDY_EPS = 1e-5  # temperatures below this are treated as greedy (as vLLM does)


def seed_to_u32(seed) -> int:
    """Any Python int (or None -> 0) to a u32. Seeds in [0, 2**32) map to themselves."""
    if seed is None:
        return 0
    s = int(seed) % (1 << 64)
    lo, hi = s & 0xFFFFFFFF, s >> 32
    return lo ^ ((hi * 0x9E3779B1) & 0xFFFFFFFF)


def mask_words(vocab_size: int) -> int:
    """Width of a packed token mask: 32 ids per int32 word."""
    return -(-int(vocab_size) // 32)


def pack_token_mask(allowed_ids, vocab_size: int) -> np.ndarray:
    """int32[mask_words(V)] with bit (id % 32) of word (id // 32) set for each allowed id."""
    bits = np.zeros(mask_words(vocab_size) * 32, np.uint8)
    bits[np.asarray(list(allowed_ids), np.int64)] = 1
    return np.packbits(bits.reshape(-1, 32), axis=1, bitorder="little").view(np.int32).reshape(-1)


def clear_token_bits(mask: Optional[np.ndarray], ids, vocab_size: int) -> np.ndarray:
    """A copy of packed `mask` (None: every id allowed) with the bits of `ids` cleared (those ids excluded)."""
    out = mask.copy() if mask is not None else np.full(mask_words(vocab_size), -1, np.int32)
    words = out.view(np.uint32)
    for t in ids:
        words[t // 32] &= np.uint32(0xFFFFFFFF ^ (1 << (t % 32)))
    return out


def request_token_mask(params, vocab_size: int, encode=None):
    """(static packed mask or None, multi-token bad words as id tuples) of one request's `allowed_token_ids` and
    `bad_words`. `encode(text) -> ids` (no BOS) tokenizes the bad words, each as written and with a leading
    space (vLLM's rule); a word that tokenizes to one id bans that id outright."""
    mask, sequences = None, []
    if params.allowed_token_ids:
        mask = pack_token_mask(params.allowed_token_ids, vocab_size)
    if params.bad_words:
        if encode is None:
            raise ValueError("bad_words need the model's tokenizer")
        single = set()
        for word in params.bad_words:
            for text in dict.fromkeys((word, " " + word.lstrip())):
                ids = tuple(encode(text))
                if len(ids) == 1:
                    single.add(ids[0])
                elif ids:
                    sequences.append(ids)
        if single:
            mask = clear_token_bits(mask, sorted(single), vocab_size)
    return mask, sequences


def step_token_mask(static_mask, bad_sequences, output_ids, vocab_size: int):
    """A row's packed mask this step: the static one, and the last id of every multi-token bad word whose other
    ids end the output so far cleared. None: every id allowed."""
    hits = [seq[-1] for seq in bad_sequences
            if len(output_ids) >= len(seq) - 1 and tuple(output_ids[len(output_ids) - len(seq) + 1:]) == seq[:-1]]
    return clear_token_bits(static_mask, hits, vocab_size) if hits else static_mask


def build_sampling_arrays(params_list: Sequence, histories: Sequence, output_starts: Sequence[int],
                          steps: Sequence[int], seeds: Sequence, banned_list: Sequence, R: int, H: int,
                          NB: int, masks: Optional[Sequence] = None, W: int = 1) -> dict:
    """Numpy arrays for `SamplingTensors(**arrays)`, padded to R rows (padding rows: greedy, no penalties).

    params_list[i] is a SamplingParams (anything with its attributes). histories[i]: prompt + output ids so far
    (may be empty when the row has no penalties); if longer than H only the last H are kept (output_start is
    shifted to match). banned_list[i]: ids to mask this step (at most NB). Temperatures < GREEDY_EPS are greedy.
    Seeds are reduced to u32 with `seed_to_u32`. masks[i]: the row's packed token mask (`pack_token_mask`,
    int32[W]) or None (every id allowed); W: the mask width (`mask_words` of the vocabulary; ids past W * 32 are
    always allowed). Each row's `logit_bias` (at most MAX_LOGIT_BIAS entries) comes from its params.
    """
    n = len(params_list)
    if n > R:
        raise ValueError(f"{n} rows do not fit a bucket of {R}")
    for name, lst in (("histories", histories), ("output_starts", output_starts), ("steps", steps),
                      ("seeds", seeds), ("banned_list", banned_list)):
        if len(lst) != n:
            raise ValueError(f"{name} has {len(lst)} entries for {n} rows")
    f32, i32 = np.float32, np.int32
    out = {
        "temperature": np.zeros(R, f32),
        "top_k": np.zeros(R, i32),
        "top_p": np.ones(R, f32),
        "min_p": np.zeros(R, f32),
        "repetition_penalty": np.ones(R, f32),
        "presence_penalty": np.zeros(R, f32),
        "frequency_penalty": np.zeros(R, f32),
        "seed": np.zeros(R, np.uint32),
        "step": np.zeros(R, i32),
        "history": np.full((R, H), -1, i32),
        "output_start": np.zeros(R, i32),
        "banned": np.full((R, NB), -1, i32),
        "num_logprobs": np.full(R, -1, i32),
        "bias_ids": np.full((R, MAX_LOGIT_BIAS), -1, i32),
        "bias": np.zeros((R, MAX_LOGIT_BIAS), f32),
        "token_mask": np.full((R, W), -1, i32),
    }
    for i, p in enumerate(params_list):
        t = float(p.temperature)
        if t >= GREEDY_EPS:  # filters only matter to random rows; greedy rows keep them off
            out["temperature"][i] = t
            out["top_k"][i] = max(0, int(p.top_k or 0))
            out["top_p"][i] = min(1.0, float(p.top_p))
            out["min_p"][i] = float(p.min_p)
        out["repetition_penalty"][i] = float(p.repetition_penalty)
        out["presence_penalty"][i] = float(p.presence_penalty)
        out["frequency_penalty"][i] = float(p.frequency_penalty)
        out["seed"][i] = seed_to_u32(seeds[i])
        out["step"][i] = int(steps[i])
        hist = np.asarray(histories[i], dtype=np.int64).reshape(-1)
        start = int(output_starts[i])
        if hist.size > H:
            drop = hist.size - H
            hist = hist[drop:]
            start = max(0, start - drop)
        out["history"][i, :hist.size] = hist
        out["output_start"][i] = start
        ban = np.asarray(banned_list[i], dtype=np.int64).reshape(-1)
        if ban.size > NB:
            raise ValueError(f"row {i} bans {ban.size} ids but the engine allows {NB}")
        out["banned"][i, :ban.size] = ban
        out["num_logprobs"][i] = -1 if p.logprobs is None else int(p.logprobs)
        bias = getattr(p, "logit_bias", None)
        if bias:
            ids = np.fromiter(bias.keys(), np.int64)
            out["bias_ids"][i, :ids.size] = ids
            out["bias"][i, :ids.size] = np.fromiter(bias.values(), np.float64)
        if masks is not None and masks[i] is not None:
            out["token_mask"][i] = masks[i]
    return out
