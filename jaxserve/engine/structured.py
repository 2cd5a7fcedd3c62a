"""Structured output: grammars that constrain what a request may generate (host side, numpy + llguidance).

A request's `SamplingParams.structured_outputs` (a JSON schema, any JSON object, a regex, a choice of strings,
or a Lark / GBNF grammar) compiles once to an llguidance grammar; each sequence gets its own `LLMatcher`. Every
step the matcher's next-token bitmask (int32 words, bit id % 32 of word id // 32: the layout of the sampler's
`token_mask` input) is ANDed into the row's mask, so the compiled step program is the same with or without a
grammar and rows with and without grammars share a batch. Each sampled token is then consumed by the matcher
(the engine's stop check); a matcher that can go no further ends the sequence with finish_reason "stop".

Why llguidance rather than xgrammar (`python scripts/bench_sampling.py --grammar-engines`, Gemma 3's 262k-token
vocabulary): on a JSON schema without length bounds both fill a mask in ~0.02-0.04 ms per token; inside strings
with `maxLength` llguidance is slower (~1 ms per token there vs ~0.1 for xgrammar), which at batch 32 is a few ms
of a ~1 s CPU decode step. The deciding difference is the dependency: xgrammar's wheel requires torch,
transformers and triton at run time and jaxserve's runtime must not; llguidance needs nothing but its own native
library, reads the `tokenizers` JSON the engine already has, and can roll back (speculative drafts).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from collections import OrderedDict
from typing import Optional

import numpy as np

from jaxserve.errors import InvalidSamplingParamsError

log = logging.getLogger("jaxserve")

# JSON output without free whitespace (a small model given "any whitespace" can loop on newlines until
# max_tokens); separators as people write them, which tokenizes the way the model saw JSON in training.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
GRAMMAR_CACHE = 128  # compiled grammars kept (per engine), least recently used dropped


def _import_llguidance():
    try:
        import llguidance
    except ImportError:  # pragma: no cover - a core dependency; kept for a broken install's message
        raise InvalidSamplingParamsError(
            "structured output needs the 'llguidance' package (pip install llguidance)") from None
    return llguidance


def grammar_source(so) -> str:
    """An llguidance grammar (string) for a StructuredOutputsParams. Raises InvalidSamplingParamsError on
    input that cannot be a grammar (the grammar itself is checked by `GrammarCompiler.compile`)."""
    llg = _import_llguidance()
    M = llg.LLMatcher
    try:
        if so.json is not None:
            schema = json.loads(so.json) if isinstance(so.json, str) else so.json
            if not isinstance(schema, (dict, bool)):
                raise InvalidSamplingParamsError("a JSON schema must be an object")
            return M.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
        if so.json_object:
            return M.grammar_from_json_schema({"type": "object"}, overrides=JSON_OPTIONS)
        if so.regex is not None:
            return M.grammar_from_regex(so.regex)
        if so.choice is not None:
            return llg.grammar_from("choice", list(so.choice))
        if so.grammar is not None:
            return llg.grammar_from("grammar", so.grammar)
    except InvalidSamplingParamsError:
        raise
    except (ValueError, TypeError) as e:
        raise InvalidSamplingParamsError(f"structured output: {e}") from None
    raise InvalidSamplingParamsError("structured output needs one of json, json_object, regex, choice, grammar")


class GrammarCompiler:
    """One engine's grammar side: the llguidance tokenizer (built once, on first use: ~3 s for a 262k
    vocabulary) and an LRU of compiled grammars. `matcher(so)` -> a fresh LLMatcher for one sequence."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids):
        self.tokenizer = tokenizer
        self.vocab_size = int(vocab_size)
        self.eos_ids = [int(t) for t in eos_ids]
        self._lt = None
        self._lock = threading.Lock()
        self._cache: OrderedDict = OrderedDict()

    def ll_tokenizer(self):
        """The llguidance tokenizer over the engine's own (from its `tokenizers` JSON)."""
        with self._lock:
            if self._lt is None:
                if self.tokenizer is None:
                    raise InvalidSamplingParamsError("structured output needs a tokenizer; this engine has none")
                llg = _import_llguidance()
                with tempfile.TemporaryDirectory() as d:
                    path = os.path.join(d, "tokenizer.json")
                    with open(path, "w") as f:
                        f.write(self.tokenizer.to_json())
                    self._lt = llg.LLTokenizer(path, n_vocab=self.vocab_size, eos_token=self.eos_ids)
            return self._lt

    def warm(self) -> None:
        """Build the tokenizer now (a server calls this in a background thread at start-up)."""
        try:
            self.ll_tokenizer()
        except Exception:  # noqa: BLE001 - warming is best effort; the first request reports the error
            log.exception("building the structured-output tokenizer failed")

    def matcher(self, so):
        """A fresh matcher for one sequence (a copy of the compiled grammar's)."""
        return self.compile(so).deep_copy()

    def compile(self, so):
        """The compiled grammar's matcher in its start state (cached; never advanced: `matcher` copies it).
        Raises InvalidSamplingParamsError if the grammar does not compile. Thread-safe (the server compiles
        while parsing a request, the engine thread when adding it)."""
        key = so.key()
        with self._lock:
            template = self._cache.get(key)
            if template is not None:
                self._cache.move_to_end(key)
        if template is None:
            llg = _import_llguidance()
            template = llg.LLMatcher(self.ll_tokenizer(), grammar_source(so), log_level=0)
            if template.is_error():
                raise InvalidSamplingParamsError(
                    f"structured output: the grammar does not compile: {template.get_error()}")
            with self._lock:
                self._cache[key] = template
                while len(self._cache) > GRAMMAR_CACHE:
                    self._cache.popitem(last=False)
        return template


def fill_mask(matcher, out: np.ndarray) -> np.ndarray:
    """Write the matcher's next-token bitmask into `out` (int32[W], C-contiguous) and return it."""
    matcher.unsafe_compute_mask_ptr(out.ctypes.data, out.nbytes)
    return out


_executor = None


def fill_masks(matchers, words: int) -> np.ndarray:
    """int32[len(matchers), words]: each matcher's next-token bitmask, computed in parallel (llguidance's
    executor threads, outside the GIL) — a step's constrained rows at once."""
    global _executor
    out = np.empty((len(matchers), words), np.int32)
    if len(matchers) == 1:
        fill_mask(matchers[0], out[0])
        return out
    llg = _import_llguidance()
    if _executor is None:
        _executor = llg.LLExecutor()
    _executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)], out.ctypes.data, words * 4,
                                      len(matchers))
    return out


def grammar_mask(matcher, words: int, drafts=()) -> np.ndarray:
    """int32[words]: the allowed next tokens after `drafts` (tokens not yet consumed) are appended. The matcher is
    left as it was. Drafts the grammar refuses are a caller error (see `valid_prefix`)."""
    out = np.empty(words, np.int32)
    if not drafts:
        return fill_mask(matcher, out)
    n = matcher.try_consume_tokens(list(drafts))
    try:
        if n != len(drafts):
            raise ValueError(f"drafts {list(drafts)} leave the grammar after {n} tokens")
        return fill_mask(matcher, out)
    finally:
        if n:
            matcher.rollback(n)


def valid_prefix(matcher, drafts) -> list:
    """The longest prefix of `drafts` the grammar accepts from the matcher's state (nothing consumed)."""
    if not drafts:
        return list(drafts)
    return list(drafts[:matcher.validate_tokens(list(drafts))])


def consume(matcher, token: int) -> Optional[str]:
    """Advance the matcher by a sampled token. Returns None while the grammar can go on, "done" when it has
    ended (no token but EOS can follow), "error" if the token was not allowed."""
    if not matcher.consume_token(int(token)):
        return "error"
    return "done" if matcher.is_stopped() else None
