"""Host-side request state: one `Sequence` per sample being generated. Plain Python, no JAX."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

from jaxserve.sampling_params import SamplingParams


class Priority(enum.IntEnum):
    """Lower value = served first. Interactive traffic has a latency target; batch traffic wants throughput."""

    INTERACTIVE = 0
    BATCH = 1

    @classmethod
    def parse(cls, value) -> "Priority":
        if isinstance(value, Priority):
            return value
        if isinstance(value, str):
            try:
                return cls[value.upper()]
            except KeyError:
                pass
        if isinstance(value, int) and value in (0, 1):
            return cls(value)
        from jaxserve.errors import InvalidSamplingParamsError

        raise InvalidSamplingParamsError(f"priority must be 'interactive' or 'batch', got {value!r}")


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class SeqMetrics:
    """Wall-clock timestamps (seconds, time.monotonic) for TTFT/TPOT accounting."""

    arrival: float = field(default_factory=time.monotonic)
    first_scheduled: Optional[float] = None
    first_token: Optional[float] = None
    last_token: Optional[float] = None
    finished: Optional[float] = None
    num_preemptions: int = 0
    num_cached_prompt_tokens: int = 0

    @property
    def ttft(self) -> Optional[float]:
        return None if self.first_token is None else self.first_token - self.arrival

    def tpot(self, num_output_tokens: int) -> Optional[float]:
        if self.first_token is None or self.last_token is None or num_output_tokens < 2:
            return None
        return (self.last_token - self.first_token) / (num_output_tokens - 1)


class SampledToken(NamedTuple):
    """One token a step emitted for a row: the id, its logprob and the top-n (ids, logprobs) beside it."""

    token: int
    logprob: float
    top_ids: object  # int array [n]
    top_logprobs: object  # float array [n]


class Sequence:
    """One generated sample: prompt ids, output ids so far, and how many of them have KV in the cache."""

    def __init__(self, seq_id: int, request_id: str, index: int, prompt_token_ids: list, params: SamplingParams,
                 seed: int, priority: Priority, eos_ids: tuple, max_len: int):
        self.seq_id = seq_id
        self.request_id = request_id
        self.index = index  # which of the request's n samples
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list = []
        self.output_logprobs: list = []  # per token: {token_id: logprob} (sampled + top-n), when requested
        self.cumulative_logprob: Optional[float] = None
        self.params = params
        self.seed = seed
        self.priority = priority
        self.status = Status.WAITING
        self.num_computed_tokens = 0  # tokens whose KV is in the cache
        self.finish_reason: Optional[str] = None
        self.stop_reason = None
        self.output_text = ""
        self.detokenizer = None
        # allowed_token_ids / bad_words (sampling_inputs.request_token_mask; set by the engine at admission)
        self.token_mask = None
        self.bad_word_ids: list = []
        self.grammar = None  # structured output: this sequence's llguidance matcher (engine/structured.py)
        self.metrics = SeqMetrics()
        self.eos_token_ids = tuple(eos_ids)
        self.max_len = max_len  # the engine's context, tokens
        stop_ids = set() if params.ignore_eos else set(eos_ids)
        self.stop_token_ids = stop_ids | set(params.stop_token_ids)
        budget = max_len - len(self.prompt_token_ids)
        self.max_tokens = budget if params.max_tokens is None else min(params.max_tokens, budget)
        # Prompt logprobs (SamplingParams.prompt_logprobs), on the one sequence of a request that computes them
        # (the engine sets [None]: the first token has none); entry j is prompt token j's, from position j - 1.
        self.prompt_logprobs: Optional[list] = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def in_prefill(self) -> bool:
        """More than one token lacks KV: the next step for it is a prefill chunk, not a decode."""
        return self.num_uncomputed > 1

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def append_token(self, t: SampledToken, now: float) -> None:
        """The one place an output token joins the sequence (with its logprobs and the token timestamps)."""
        self.output_token_ids.append(t.token)
        if self.metrics.first_token is None:
            self.metrics.first_token = now
        self.metrics.last_token = now
        n = self.params.logprobs
        if n is not None:
            entry = {int(i): float(l) for i, l in zip(t.top_ids[:n], t.top_logprobs[:n])}
            entry[t.token] = t.logprob
            self.output_logprobs.append(entry)
            self.cumulative_logprob = (self.cumulative_logprob or 0.0) + t.logprob

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Prompt logprobs still to compute: its prompt must run through the model (no prefix-cache hits)."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt_token_ids)

    def prompt_logprob_span(self, start: int, num_new: int) -> Optional[tuple]:
        """(lo, hi): the positions of a chunk [start, start + num_new) whose next-token logprobs are prompt
        logprobs not computed yet (position p scores prompt token p + 1), or None. Positions scored before a
        preemption are not scored again."""
        if not self.needs_prompt_logprobs:
            return None
        lo = max(start, len(self.prompt_logprobs) - 1)
        hi = min(start + num_new, len(self.prompt_token_ids) - 1)
        if lo >= hi or lo != len(self.prompt_logprobs) - 1:
            return None  # nothing to score here (a gap cannot happen: such a prompt takes no prefix hits)
        return lo, hi

    def add_prompt_logprobs(self, lo: int, target_lps, top_ids, top_lps) -> None:
        """Append the entries of positions lo.. (numpy rows: target logprob, top-n ids and logprobs)."""
        assert lo == len(self.prompt_logprobs) - 1, (lo, len(self.prompt_logprobs))
        n = self.params.prompt_logprobs
        for k in range(len(target_lps)):
            entry = {int(i): float(v) for i, v in zip(top_ids[k, :n], top_lps[k, :n])}
            entry[self.prompt_token_ids[lo + k + 1]] = float(target_lps[k])
            self.prompt_logprobs.append(entry)

    def finish(self, reason: str, stop_reason=None) -> None:
        """Mark finished ("stop" | "length" | "abort"); a second call changes nothing."""
        if self.finished:
            return
        self.status = Status.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason
        self.metrics.finished = time.monotonic()

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, req={self.request_id!r}, {self.status.value}, "
                f"prompt={len(self.prompt_token_ids)}, out={len(self.output_token_ids)}, "
                f"computed={self.num_computed_tokens})")
