"""Host side of sampling (numpy only): the per-row arrays of one step, built from each row's SamplingParams,
token history and seed. `sampler.SamplingTensors(**build_sampling_arrays(...))` is what the device samples with.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

GREEDY_EPS = 1e-5  # temperatures below this are treated as greedy (as vLLM does)


def seed_to_u32(seed) -> int:
    """Any Python int (or None -> 0) to a u32. Seeds in [0, 2**32) map to themselves."""
    if seed is None:
        return 0
    s = int(seed) % (1 << 64)
    lo, hi = s & 0xFFFFFFFF, s >> 32
    return lo ^ ((hi * 0x9E3779B1) & 0xFFFFFFFF)


def build_sampling_arrays(params_list: Sequence, histories: Sequence, output_starts: Sequence[int],
                          steps: Sequence[int], seeds: Sequence, banned_list: Sequence, R: int, H: int,
                          NB: int) -> dict:
    """Numpy arrays for `SamplingTensors(**arrays)`, padded to R rows (padding rows: greedy, no penalties).

    params_list[i] is a SamplingParams (anything with its attributes). histories[i]: prompt + output ids so far
    (may be empty when the row has no penalties); if longer than H only the last H are kept (output_start is
    shifted to match). banned_list[i]: ids to mask this step (at most NB). Temperatures < GREEDY_EPS are greedy.
    Seeds are reduced to u32 with `seed_to_u32`.
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
    return out
