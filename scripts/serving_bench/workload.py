"""The serving benchmark's workloads: seeded request sets (log-normal prompt and output lengths, prompts cut
from real English text), Poisson arrivals, a shared-system-prompt set for prefix caching, and what a workload
allows continuous batching to gain at most."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from serving_bench.report import percentile


@dataclass
class WorkloadSpec:
    """Length distributions in tokens. A log-normal with `median` and `sigma` (of the underlying normal),
    rounded and clipped to [min, max]."""

    num_requests: int = 64
    prompt_median: float = 128.0
    prompt_sigma: float = 1.0
    prompt_min: int = 16
    prompt_max: int = 1024
    output_median: float = 40.0
    output_sigma: float = 1.0
    output_min: int = 8
    output_max: int = 512
    seed: int = 0


@dataclass
class BenchRequest:
    index: int
    prompt_ids: list  # exactly prompt_len token ids (BOS first when the model has one)
    output_len: int  # tokens the request must produce

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)


def lognormal_lengths(rng: np.random.Generator, n: int, median: float, sigma: float, lo: int, hi: int) -> list:
    """`n` integer lengths from a log-normal (median `median`, log-space std `sigma`), clipped to [lo, hi]."""
    if not (1 <= lo <= hi):
        raise ValueError(f"need 1 <= lo <= hi, got lo={lo}, hi={hi}")
    x = rng.lognormal(mean=math.log(median), sigma=sigma, size=n)
    return [int(v) for v in np.clip(np.rint(x), lo, hi)]


def corpus_text() -> str:
    """Real English prose and code from CPython's own docs (always installed, no download)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def corpus_token_ids(tokenizer) -> list:
    """The corpus tokenized without BOS (prompts are windows of it, BOS added per prompt)."""
    return list(tokenizer.encode(corpus_text(), add_bos=False))


def _window(corpus_ids: Sequence[int], rng: np.random.Generator, length: int) -> list:
    if length > len(corpus_ids):
        raise ValueError(f"window of {length} tokens from a corpus of {len(corpus_ids)}")
    off = int(rng.integers(0, len(corpus_ids) - length + 1))
    return list(corpus_ids[off:off + length])


def make_workload(corpus_ids: Sequence[int], spec: WorkloadSpec, bos_id: Optional[int] = None) -> list:
    """Seeded requests: prompt i is BOS (if any) + a window of the corpus, `prompt_len` tokens in total."""
    rng = np.random.default_rng(spec.seed)
    plens = lognormal_lengths(rng, spec.num_requests, spec.prompt_median, spec.prompt_sigma,
                              spec.prompt_min, spec.prompt_max)
    olens = lognormal_lengths(rng, spec.num_requests, spec.output_median, spec.output_sigma,
                              spec.output_min, spec.output_max)
    head = [] if bos_id is None else [int(bos_id)]
    reqs = []
    for i, (p, o) in enumerate(zip(plens, olens)):
        reqs.append(BenchRequest(i, head + _window(corpus_ids, rng, p - len(head)), o))
    return reqs


def poisson_arrivals(n: int, rate: float, seed: int = 0) -> list:
    """Arrival offsets in seconds: the first at 0, then seeded exponential gaps of mean 1/rate."""
    if rate <= 0:
        raise ValueError(f"rate must be > 0 requests/s, got {rate}")
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=n)
    arr = np.concatenate([[0.0], np.cumsum(gaps[:-1])]) if n else np.zeros(0)
    return [float(a) for a in arr]


def make_prefix_workload(corpus_ids: Sequence[int], num_requests: int, system_len: int, suffix_min: int,
                         suffix_max: int, seed: int = 1, bos_id: Optional[int] = None) -> tuple:
    """(system prompt ids, warm prompt, [prompt ids] x 2*num_requests): every prompt = the shared system prompt
    (`system_len` tokens, BOS included) + a distinct suffix of suffix_min..suffix_max corpus tokens. The first
    `num_requests` prompts are for one-at-a-time runs, the rest for the burst (so no suffix page repeats)."""
    rng = np.random.default_rng(seed)
    head = [] if bos_id is None else [int(bos_id)]
    system = head + _window(corpus_ids, rng, system_len - len(head))

    def one():
        return system + _window(corpus_ids, rng, int(rng.integers(suffix_min, suffix_max + 1)))

    warm = one()
    return system, warm, [one() for _ in range(2 * num_requests)]


def workload_stats(reqs: Sequence[BenchRequest]) -> dict:
    pl = [r.prompt_len for r in reqs]
    ol = [r.output_len for r in reqs]
    return {"num_requests": len(reqs), "prompt_tokens_p50": percentile(pl, 50), "prompt_tokens_mean": float(np.mean(pl)),
            "prompt_tokens_min": min(pl), "prompt_tokens_max": max(pl), "output_tokens_p50": percentile(ol, 50),
            "output_tokens_mean": float(np.mean(ol)), "output_tokens_min": min(ol), "output_tokens_max": max(ol),
            "prompt_tokens_total": sum(pl), "output_tokens_total": sum(ol),
            "prompt_lens": pl, "output_lens": ol}


def decode_step_bound(output_lens: Sequence[int], max_num_seqs: int) -> dict:
    """How much faster continuous batching can decode this offline workload than static batching, at most.

    Static batching decodes each batch of `max_num_seqs` requests (taken in arrival order) for as many steps as
    its longest request; continuous batching needs at least `ceil(total / max_num_seqs)` steps (every slot busy
    every step) and at least as many as the longest request. With equal step costs and prefill left out, the
    ratio of the two step counts bounds the continuous/static output tok/s; prefill, which both modes pay in
    full, pulls the measured ratio below it.
    """
    ol = list(output_lens)
    static = sum(max(ol[i:i + max_num_seqs]) for i in range(0, len(ol), max_num_seqs))
    continuous = max(-(-sum(ol) // max_num_seqs), max(ol))
    return {"static_decode_steps": static, "continuous_decode_steps_min": continuous,
            "ratio_bound": static / continuous}
