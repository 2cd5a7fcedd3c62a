"""`LLM(..., speculative={...})`: parsing and validation of the speculative-decoding settings.

    {"method": "ngram", "num_tokens": 4}                          # prompt lookup, no model
    {"method": "self", "num_tokens": 4, "num_layers": 6}          # the target's first 6 layers as draft
    {"method": "draft", "num_tokens": 4, "draft_model": "NAME"}   # any model with the target's vocabulary

Common keys: `adaptive` (default True: shrink k / switch speculation off when it does not pay),
`min_speedup` (default 1.0: the expected speedup below which speculation is switched off).
n-gram keys: `prompt_lookup_max` (default 4), `prompt_lookup_min` (default 1).
draft keys: `draft_model` (required), `draft_seed` (random-weight drafts only, default 0),
`draft_random_weights` (default False; tiny-* presets are always random).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from jaxserve.errors import InvalidConfigError

METHODS = ("draft", "ngram", "self")
MAX_NUM_TOKENS = 16

_COMMON = {"method", "num_tokens", "adaptive", "min_speedup"}
_KEYS = {
    "ngram": _COMMON | {"prompt_lookup_max", "prompt_lookup_min"},
    "self": _COMMON | {"num_layers"},
    "draft": _COMMON | {"draft_model", "draft_seed", "draft_random_weights"},
}


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str
    num_tokens: int = 4  # k: draft tokens verified per step (the verify programs are (R, k + 1))
    adaptive: bool = True
    min_speedup: float = 1.0
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 1
    num_layers: Optional[int] = None  # self-draft depth (None: a third of the target's layers)
    draft_model: Optional[str] = None
    draft_seed: int = 0
    draft_random_weights: bool = False

    @classmethod
    def parse(cls, spec) -> "SpeculativeConfig":
        """A dict (or a SpeculativeConfig) to a validated config; raises InvalidConfigError saying what to fix."""
        if isinstance(spec, SpeculativeConfig):
            return spec
        if not isinstance(spec, dict):
            raise InvalidConfigError(
                f"speculative must be a dict like {{'method': 'ngram', 'num_tokens': 4}}, got {type(spec).__name__}")
        method = spec.get("method")
        if method not in METHODS:
            raise InvalidConfigError(f"speculative['method'] must be one of {', '.join(METHODS)}; got {method!r}")
        unknown = set(spec) - _KEYS[method]
        if unknown:
            raise InvalidConfigError(f"unknown speculative key(s) {sorted(unknown)} for method {method!r}; "
                                     f"allowed: {sorted(_KEYS[method])}")
        kw = dict(spec)

        def as_int(key, lo, hi=None):
            if key not in kw or kw[key] is None:
                return
            v = kw[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
                rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
                raise InvalidConfigError(f"speculative[{key!r}] must be an integer in {rng}, got {v!r}")

        as_int("num_tokens", 1, MAX_NUM_TOKENS)
        as_int("prompt_lookup_max", 1, 64)
        as_int("prompt_lookup_min", 1, 64)
        as_int("num_layers", 1)
        as_int("draft_seed", 0)
        for key in ("adaptive", "draft_random_weights"):
            if key in kw and not isinstance(kw[key], bool):
                raise InvalidConfigError(f"speculative[{key!r}] must be True or False, got {kw[key]!r}")
        if "min_speedup" in kw:
            v = kw["min_speedup"]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise InvalidConfigError(f"speculative['min_speedup'] must be a number > 0, got {v!r}")
            kw["min_speedup"] = float(v)
        if method == "ngram" and kw.get("prompt_lookup_min", 1) > kw.get("prompt_lookup_max", 4):
            raise InvalidConfigError("speculative['prompt_lookup_min'] must be <= prompt_lookup_max")
        if method == "draft":
            name = kw.get("draft_model")
            if not isinstance(name, str) or not name:
                raise InvalidConfigError("speculative method 'draft' needs 'draft_model': a model name or path "
                                         "with the target's vocabulary")
        return cls(**kw)
