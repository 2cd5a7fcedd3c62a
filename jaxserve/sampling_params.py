"""Per-request sampling parameters (vLLM-shaped). Host side: validated here, applied on device."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Union

from jaxserve.errors import InvalidSamplingParamsError


MAX_LOGIT_BIAS = 300  # logit_bias entries per request (a fixed-shape sampler input)


@dataclass
class StructuredOutputsParams:
    """What the output must match (vLLM's `StructuredOutputsParams`); exactly one field is set.

    json: a JSON schema (dict or JSON text); json_object: any JSON object; regex: a regular expression (Rust
    `regex` syntax); choice: one of these strings; grammar: a Lark or GBNF (llama.cpp) grammar. Compiled with
    llguidance (jaxserve/engine/structured.py); a grammar that does not compile is refused at add_request.
    """

    json: Optional[Union[str, Dict[str, Any]]] = None
    json_object: bool = False
    regex: Optional[str] = None
    choice: Optional[Sequence[str]] = None
    grammar: Optional[str] = None

    def __post_init__(self) -> None:
        set_ = [k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None]
        set_ += ["json_object"] if self.json_object else []
        if len(set_) != 1:
            raise InvalidSamplingParamsError(
                "structured_outputs needs exactly one of json, json_object, regex, choice, grammar"
                + (f"; got {', '.join(set_)}" if set_ else ""))
        if self.json is not None and not isinstance(self.json, (str, dict)):
            raise InvalidSamplingParamsError("structured_outputs.json must be a JSON schema (object or JSON text)")
        if self.regex is not None and (not isinstance(self.regex, str) or not self.regex):
            raise InvalidSamplingParamsError("structured_outputs.regex must be a non-empty string")
        if self.grammar is not None and (not isinstance(self.grammar, str) or not self.grammar.strip()):
            raise InvalidSamplingParamsError("structured_outputs.grammar must be a non-empty string")
        if self.choice is not None:
            if isinstance(self.choice, str) or not all(isinstance(c, str) and c for c in self.choice) \
                    or not self.choice:
                raise InvalidSamplingParamsError("structured_outputs.choice must be a non-empty list of strings")
            self.choice = list(self.choice)

    def key(self) -> str:
        """A string naming this grammar (the compile cache's key)."""
        return json.dumps({"json": self.json, "json_object": self.json_object, "regex": self.regex,
                           "choice": self.choice, "grammar": self.grammar}, sort_keys=True)


@dataclass
class SamplingParams:
    """How to pick each next token, and when to stop.

    temperature 0 means greedy. top_k 0 (or -1) disables top-k; top_p 1 and min_p 0 disable theirs.
    repetition_penalty (> 1 discourages) applies to prompt and output tokens; presence/frequency penalties
    (OpenAI semantics) to output tokens. `seed` makes a request's samples reproducible whatever else is in
    its batch. `stop` strings are excluded from the returned text; `stop_token_ids` are added to the
    model's EOS ids unless `ignore_eos`. `logprobs=n` returns the sampled token's logprob and the top-n.

    Logit controls (OpenAI / vLLM semantics; applied after the penalties, before temperature and the filters;
    logprobs stay those of the raw model distribution): `logit_bias` {token id: bias in [-100, 100]} (at most
    MAX_LOGIT_BIAS entries) is added to the logits; `allowed_token_ids` restricts sampling to those ids;
    `bad_words` are never generated (a one-token word's id is banned; for a longer word, its last token is
    banned whenever the output ends with the rest of it; each word is matched as written and with a leading
    space).

    `structured_outputs` (a StructuredOutputsParams, or a dict of its fields) constrains the output to a JSON
    schema, any JSON object, a regex, a choice or a grammar; the sequence stops when the grammar is complete.

    `prompt_logprobs=n` (vLLM semantics) returns, per prompt token, the logprob of that token given the tokens
    before it (raw model distribution) and the top-n at its position (`RequestOutput.prompt_logprobs`; None for
    the first token); 0 returns the prompt tokens' own logprobs only. Such a request computes its whole prompt
    (no prefix-cache hits).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: Optional[int] = None
    max_tokens: Optional[int] = 16
    min_tokens: int = 0
    stop: Optional[Union[str, Sequence[str]]] = None
    stop_token_ids: Optional[Sequence[int]] = None
    ignore_eos: bool = False
    logprobs: Optional[int] = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: Optional[Dict[int, float]] = None
    allowed_token_ids: Optional[Sequence[int]] = None
    bad_words: Optional[Sequence[str]] = None
    structured_outputs: Optional[StructuredOutputsParams] = None
    prompt_logprobs: Optional[int] = None

    def __post_init__(self) -> None:
        if isinstance(self.structured_outputs, dict):
            try:
                self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
            except TypeError as e:
                raise InvalidSamplingParamsError(f"structured_outputs: {e}") from None
        elif self.structured_outputs is not None and not isinstance(self.structured_outputs,
                                                                    StructuredOutputsParams):
            raise InvalidSamplingParamsError("structured_outputs must be a StructuredOutputsParams or a dict")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = [int(t) for t in (self.stop_token_ids or [])]
        if self.top_k is None or self.top_k < 0:
            self.top_k = 0
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise InvalidSamplingParamsError("logit_bias must be a map of token id to bias")
            try:  # OpenAI clients send the ids as strings
                self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
            except (TypeError, ValueError):
                raise InvalidSamplingParamsError("logit_bias must map integer token ids to numbers") from None
        if self.allowed_token_ids is not None:
            try:
                self.allowed_token_ids = [int(t) for t in self.allowed_token_ids]
            except (TypeError, ValueError):
                raise InvalidSamplingParamsError("allowed_token_ids must be a list of integer token ids") from None
        if isinstance(self.bad_words, str):
            self.bad_words = [self.bad_words]
        if self.bad_words is not None:
            self.bad_words = list(self.bad_words)
        self.validate()

    def validate(self, max_logprobs: int = 20) -> None:
        def bad(msg):
            raise InvalidSamplingParamsError(msg)

        if not isinstance(self.n, int) or self.n < 1:
            bad(f"n must be an integer >= 1, got {self.n!r}")
        if self.temperature is None or not (self.temperature >= 0.0):
            bad(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not (0.0 < self.top_p <= 1.0):
            bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int):
            bad(f"top_k must be an integer (0 disables it), got {self.top_k!r}")
        if not (0.0 <= self.min_p <= 1.0):
            bad(f"min_p must be in [0, 1], got {self.min_p!r}")
        if not (self.repetition_penalty > 0.0):
            bad(f"repetition_penalty must be > 0 (1 disables it), got {self.repetition_penalty!r}")
        if not (-2.0 <= self.presence_penalty <= 2.0):
            bad(f"presence_penalty must be in [-2, 2], got {self.presence_penalty!r}")
        if not (-2.0 <= self.frequency_penalty <= 2.0):
            bad(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty!r}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens <= 0):
            bad(f"max_tokens must be a positive integer or None, got {self.max_tokens!r}")
        if self.min_tokens < 0 or (self.max_tokens is not None and self.min_tokens > self.max_tokens):
            bad(f"min_tokens must be in [0, max_tokens], got {self.min_tokens!r}")
        if self.logprobs is not None and not (0 <= self.logprobs <= max_logprobs):
            bad(f"logprobs must be in [0, {max_logprobs}], got {self.logprobs!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            bad(f"seed must be an integer, got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop must be a non-empty string or a list of non-empty strings")
        if self.logit_bias:
            if len(self.logit_bias) > MAX_LOGIT_BIAS:
                bad(f"logit_bias has {len(self.logit_bias)} entries; at most {MAX_LOGIT_BIAS} are allowed")
            if any(not (-100.0 <= v <= 100.0) for v in self.logit_bias.values()):
                bad("logit_bias values must be in [-100, 100]")
            if any(t < 0 for t in self.logit_bias):
                bad("logit_bias token ids must be >= 0")
        if self.allowed_token_ids is not None and (not self.allowed_token_ids or min(self.allowed_token_ids) < 0):
            bad("allowed_token_ids must be a non-empty list of token ids >= 0")
        if self.bad_words is not None and any(not isinstance(w, str) or not w.strip() for w in self.bad_words):
            bad("bad_words must be a list of non-empty strings")
        self._validate_prompt_logprobs(max_logprobs)

    def _validate_prompt_logprobs(self, max_logprobs: int) -> None:
        n = self.prompt_logprobs
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= max_logprobs):
            raise InvalidSamplingParamsError(
                f"prompt_logprobs must be None or an integer in [0, {max_logprobs}] (the engine's max_logprobs), "
                f"got {n!r}")

    def check_vocab(self, vocab_size: int) -> None:
        """The token ids named here exist in a vocabulary of `vocab_size` (the engine calls this)."""
        ids = list(self.logit_bias or ()) + list(self.allowed_token_ids or ())
        if ids and max(ids) >= vocab_size:
            raise InvalidSamplingParamsError(
                f"token id {max(ids)} in logit_bias / allowed_token_ids is outside the vocabulary [0, {vocab_size})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_token_mask(self) -> bool:
        """Whether some tokens are excluded outright (allowed_token_ids / bad_words)."""
        return bool(self.allowed_token_ids) or bool(self.bad_words)

    @property
    def uses_history(self) -> bool:
        """Whether sampling reads the tokens so far (repetition / presence / frequency penalties)."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
