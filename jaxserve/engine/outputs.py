"""What `LLM.generate` returns (vLLM-shaped)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class CompletionOutput:
    """One generated sample. `logprobs`: per output token, {token_id: logprob} of the sampled and top-n ids."""

    index: int
    text: str
    token_ids: list
    cumulative_logprob: Optional[float] = None
    logprobs: Optional[list] = None
    finish_reason: Optional[str] = None  # "stop" | "length" | "abort" | None while running
    stop_reason: object = None  # the stop string or stop token id that ended it (None for EOS)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """Seconds. TTFT = arrival to first token; TPOT = mean gap between later tokens."""

    arrival_time: float
    ttft: Optional[float] = None
    tpot: Optional[float] = None
    e2e: Optional[float] = None
    num_cached_prompt_tokens: int = 0
    num_preemptions: int = 0


@dataclass
class RequestOutput:
    """`prompt_logprobs` (when SamplingParams.prompt_logprobs is set, once the prompt is computed): per prompt
    token, None for the first, then {token_id: logprob} of the prompt token and the top-n at its position."""

    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list
    outputs: list = field(default_factory=list)
    finished: bool = False
    metrics: Optional[RequestMetrics] = None
    prompt_logprobs: Optional[list] = None
