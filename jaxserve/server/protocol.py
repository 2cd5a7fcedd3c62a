"""OpenAI request parsing and response shaping, shared by the HTTP server and the offline batch job.

Plain Python (no FastAPI, no JAX): a request body (a dict) becomes a `ParsedRequest` (token-id prompts,
`SamplingParams`, output options), or an `APIError` in OpenAI's error shape
`{"error": {"message", "type", "param", "code"}}` saying what is wrong. Finished `RequestOutput`s become a
`text_completion` / `chat.completion` body; `StreamState` turns the engine's cumulative snapshots into
streaming chunks.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Optional

from jaxserve.errors import JaxserveError
from jaxserve.sampling_params import SamplingParams, StructuredOutputsParams
from jaxserve.server.tools import (ToolError, ToolSpec, may_be_tool_call, messages_for_template, parse_tool_calls,
                                   parse_tools, template_knows_tools, tool_grammar)

COMPLETIONS_URL = "/v1/completions"
CHAT_URL = "/v1/chat/completions"
_LOGPROB_FLOOR = -9999.0  # JSON has no -inf; OpenAI/vLLM clamp the same way
_CHAT_ROLES = {"system", "developer", "user", "assistant", "tool"}


class APIError(Exception):
    """An error answer: HTTP status + OpenAI's error object."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


@dataclass
class Limits:
    """Per-request limits of a server or batch job. None = derived from the engine (context length)."""

    max_body_bytes: int = 2 * 1024 * 1024
    max_prompt_tokens: Optional[int] = None  # default: max_model_len - 1
    max_tokens: Optional[int] = None  # largest max_tokens accepted; default: max_model_len
    max_n: int = 16
    max_prompts: int = 64  # prompts in one /v1/completions request
    max_stop: int = 16


@dataclass
class ParsedRequest:
    kind: str  # "completion" | "chat"
    model: str
    prompts: list  # token ids, one list per prompt
    prompt_texts: list  # text of each prompt (None for token-id prompts)
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    logprobs: Optional[int] = None  # top-n to report; None: no logprobs
    priority: Optional[str] = None  # "interactive" | "batch" | None (caller's default)
    tools: Optional[ToolSpec] = None  # chat: the offered tools and tool_choice (server/tools.py)
    echo_only: bool = False  # completions with echo and max_tokens 0: the prompt (and its logprobs) only
    prompt_logprobs: Optional[int] = None  # vLLM's extra `prompt_logprobs`: a per-choice top-level list

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.params.n


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex


# ------------------------------------------------------------------------------------------ field checks
def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(body: dict, key: str, default):
    v = body.get(key)
    if v is None:
        return default
    if not _is_num(v):
        raise bad_request(f"'{key}' must be a number, got {type(v).__name__}", key, "invalid_type")
    return float(v)


def _int(body: dict, key: str, default, lo: Optional[int] = None, hi: Optional[int] = None):
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not _is_int(v):
        raise bad_request(f"'{key}' must be an integer, got {type(v).__name__}", key, "invalid_type")
    if lo is not None and v < lo:
        raise bad_request(f"'{key}' must be >= {lo}, got {v}", key, "invalid_value")
    if hi is not None and v > hi:
        raise bad_request(f"'{key}' must be <= {hi}, got {v}", key, "invalid_value")
    return v


def _bool(body: dict, key: str, default: bool) -> bool:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad_request(f"'{key}' must be a boolean, got {type(v).__name__}", key, "invalid_type")
    return v


def parse_priority(value, param: str = "priority") -> Optional[str]:
    """'interactive' | 'batch' (any case) or 0 / 1 (vLLM-style integer priority: 0 = interactive)."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lower() in ("interactive", "batch"):
        return value.strip().lower()
    if _is_int(value) and value in (0, 1):
        return ("interactive", "batch")[value]
    if isinstance(value, str) and value.strip() in ("0", "1"):
        return ("interactive", "batch")[int(value.strip())]
    raise bad_request(f"priority must be 'interactive' or 'batch', got {value!r}", param, "invalid_value")


# ------------------------------------------------------------------------------------------ the service
class OpenAIServing:
    """Parses OpenAI bodies against one engine (its tokenizer, context length, vocabulary) and shapes answers."""

    def __init__(self, engine, served_model_names: list, limits: Optional[Limits] = None):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_names = list(served_model_names)
        self.limits = limits or Limits()
        self.max_model_len = engine.max_model_len
        self.max_prompt_tokens = min(self.limits.max_prompt_tokens or self.max_model_len - 1, self.max_model_len - 1)
        self.max_tokens_limit = self.limits.max_tokens or self.max_model_len
        self.max_logprobs = engine.cfg.max_logprobs
        self._token_str: dict = {}

    @property
    def model_name(self) -> str:
        return self.model_names[0]

    # -------------------------------------------------------------- requests
    def parse(self, kind: str, body, priority_header: Optional[str] = None) -> ParsedRequest:
        """Validate an OpenAI body (dict). Raises APIError (4xx) on any mistake; touches no engine state."""
        if not isinstance(body, dict):
            raise bad_request("the request body must be a JSON object", None, "invalid_type")
        model = body.get("model")
        if model is None:
            model = self.model_name
        if not isinstance(model, str):
            raise bad_request("'model' must be a string", "model", "invalid_type")
        if model not in self.model_names:
            raise APIError(404, f"The model `{model}` does not exist. Served models: {', '.join(self.model_names)}",
                           "invalid_request_error", "model", "model_not_found")
        self._reject_unsupported(kind, body)
        tools = None
        body, echo_only = self._echo_without_generation(kind, body)
        if kind == "chat":
            try:
                tools = parse_tools(body)
            except ToolError as e:
                raise bad_request(str(e), e.param, "invalid_value") from None
            texts = [self._chat_prompt(body.get("messages"), tools)]
            prompts = [self._tokenize(texts[0], "messages")]
        else:
            texts, prompts = self._completion_prompts(body.get("prompt"))
        params = self._sampling_params(kind, body)
        params.structured_outputs = self._structured_outputs(body, tools)
        stream = _bool(body, "stream", False)
        so = body.get("stream_options")
        if so is not None and not isinstance(so, dict):
            raise bad_request("'stream_options' must be an object", "stream_options", "invalid_type")
        include_usage = bool(so and _bool(so, "include_usage", False))
        echo = _bool(body, "echo", False) if kind == "completion" else False
        logprobs = None
        if kind == "chat":
            if _bool(body, "logprobs", False):
                logprobs = _int(body, "top_logprobs", 0, 0, self.max_logprobs)
            elif body.get("top_logprobs") is not None:
                raise bad_request("'top_logprobs' needs 'logprobs': true", "top_logprobs", "invalid_value")
        else:
            logprobs = _int(body, "logprobs", None, 0, self.max_logprobs)
        if logprobs is not None:
            params.logprobs = logprobs
        prompt_logprobs = self._prompt_logprobs(kind, body, params, echo, logprobs, stream)
        priority = parse_priority(body.get("priority")) or parse_priority(priority_header, "X-Priority")
        return ParsedRequest(kind, model, prompts, texts, params, stream, include_usage, echo, logprobs, priority,
                             tools if tools is not None and tools.active else None, echo_only, prompt_logprobs)

    # -------------------------------------------------------------- structured output (engine/structured.py)
    def _structured_outputs(self, body: dict, tools: Optional[ToolSpec]) -> Optional[StructuredOutputsParams]:
        """The request's output constraint: OpenAI `response_format`, vLLM's `guided_json` / `guided_regex` /
        `guided_choice` / `guided_grammar` or `structured_outputs`, or a forced tool call; at most one. The
        grammar is compiled here (400 if it does not) so the engine thread finds it in its cache."""
        found = []
        rf = body.get("response_format")
        if rf is not None:
            kind = rf.get("type") if isinstance(rf, dict) else None
            if kind == "json_object":
                found.append(("response_format", {"json_object": True}))
            elif kind == "json_schema":
                js = rf.get("json_schema")
                schema = js.get("schema") if isinstance(js, dict) else None
                if not isinstance(schema, dict):
                    raise bad_request("response_format json_schema needs {'json_schema': {'name': ..., 'schema': "
                                      "{...}}}", "response_format", "invalid_value")
                found.append(("response_format", {"json": schema}))
            elif kind != "text":
                raise bad_request("response_format type must be 'text', 'json_object' or 'json_schema'",
                                  "response_format", "invalid_value")
        for key, field_ in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                            ("guided_grammar", "grammar")):
            if body.get(key) is not None:
                found.append((key, {field_: body[key]}))
        if body.get("structured_outputs") is not None:
            if not isinstance(body["structured_outputs"], dict):
                raise bad_request("'structured_outputs' must be an object", "structured_outputs", "invalid_type")
            found.append(("structured_outputs", body["structured_outputs"]))
        forced = tool_grammar(tools) if tools is not None else None
        if forced is not None:
            found.append(("tool_choice", forced))
        if len(found) > 1:
            raise bad_request(f"only one output constraint per request; got {', '.join(k for k, _ in found)}",
                              found[1][0], "invalid_value")
        if not found:
            return None
        param, spec = found[0]
        try:
            so = spec if isinstance(spec, StructuredOutputsParams) else StructuredOutputsParams(**spec)
            grammars = getattr(self.engine, "grammars", None)
            if grammars is not None:
                grammars.compile(so)  # cached; raises on a bad schema / regex / grammar
        except TypeError as e:
            raise bad_request(f"{param}: {e}", param, "invalid_value") from None
        except JaxserveError as e:
            raise bad_request(str(e), param, "invalid_grammar") from None
        return so

    @staticmethod
    def _echo_without_generation(kind: str, body: dict) -> tuple:
        """Completions with echo and max_tokens 0 (lm-evaluation-harness's log-likelihood requests, OpenAI's
        legacy API): the prompt and its logprobs only. The engine generates one token, which is dropped (as vLLM
        does). Returns (body to parse, echo_only)."""
        if kind != "completion" or not _is_int(body.get("max_tokens")) or body["max_tokens"] != 0:
            return body, False
        if not _bool(body, "echo", False):
            raise bad_request("'max_tokens' 0 needs 'echo': true (it returns the prompt only)", "max_tokens",
                              "invalid_value")
        if _bool(body, "stream", False):
            raise bad_request("'max_tokens' 0 with 'echo' is not supported with 'stream'", "stream",
                              "unsupported_parameter")
        return {**body, "max_tokens": 1}, True

    def _prompt_logprobs(self, kind: str, body: dict, params: SamplingParams, echo: bool, logprobs, stream):
        """Set params.prompt_logprobs for completions' echo + logprobs (prompt tokens in the logprobs block) and
        for vLLM's extra `prompt_logprobs`; returns the latter (None when not sent)."""
        extra = _int(body, "prompt_logprobs", None, 0, self.max_logprobs)
        want = [n for n in (extra, logprobs if echo else None) if n is not None]
        if not want:
            return None
        if stream:
            raise bad_request("prompt logprobs ('echo' with 'logprobs', or 'prompt_logprobs') are not supported "
                              "with 'stream'", "stream", "unsupported_parameter")
        params.prompt_logprobs = max(want)  # (a placement without them: add_request's error, a 400 too)
        return extra

    # -------------------------------------------------------------- /tokenize, /detokenize (vLLM's shapes)
    def _check_model(self, body: dict) -> None:
        model = body.get("model")
        if model is not None and model not in self.model_names:
            raise APIError(404, f"The model `{model}` does not exist. Served models: {', '.join(self.model_names)}",
                           "invalid_request_error", "model", "model_not_found")

    def tokenize(self, body) -> dict:
        """{"prompt": text} or {"messages": [...]} (chat template applied; `add_special_tokens`, default true:
        BOS) -> {"count", "max_model_len", "tokens"}."""
        if not isinstance(body, dict):
            raise bad_request("the request body must be a JSON object", None, "invalid_type")
        self._check_model(body)
        if self.tokenizer is None:
            raise APIError(400, "this model has no tokenizer", "invalid_request_error", None, "no_tokenizer")
        add_special = _bool(body, "add_special_tokens", True)
        if "messages" in body:
            text = self._chat_prompt(body.get("messages"))
        else:
            text = body.get("prompt")
            if not isinstance(text, str):
                raise bad_request("'prompt' must be a string (or send 'messages')", "prompt", "invalid_type")
        ids = self.tokenizer.encode(text, add_bos=add_special)
        return {"count": len(ids), "max_model_len": self.engine.max_model_len, "tokens": ids}

    def tokenizer_info(self) -> dict:
        """vLLM's /tokenizer_info: the special tokens and chat template (what lm-evaluation-harness's remote
        tokenizer reads to tokenize on the server instead of fetching the tokenizer from a hub)."""
        if self.tokenizer is None:
            raise APIError(400, "this model has no tokenizer", "invalid_request_error", None, "no_tokenizer")
        tok = self.tokenizer
        pad = tok.id_to_token(tok.pad_id) if getattr(tok, "pad_id", None) is not None else None
        return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tok.bos_token or None,
                "eos_token": tok.eos_token or None, "pad_token": pad,
                "chat_template": tok.chat_template_source, "model_max_length": self.engine.max_model_len}

    def detokenize(self, body) -> dict:
        """{"tokens": [ids]} -> {"prompt": text} (special tokens kept, as vLLM does)."""
        if not isinstance(body, dict):
            raise bad_request("the request body must be a JSON object", None, "invalid_type")
        self._check_model(body)
        if self.tokenizer is None:
            raise APIError(400, "this model has no tokenizer", "invalid_request_error", None, "no_tokenizer")
        ids = body.get("tokens")
        V = self.engine.model_cfg.vocab_size
        if not isinstance(ids, list) or not all(_is_int(t) and 0 <= t < V for t in ids):
            raise bad_request(f"'tokens' must be a list of token ids in [0, {V})", "tokens", "invalid_value")
        return {"prompt": self.tokenizer.decode(ids, skip_special_tokens=False)}

    def _reject_unsupported(self, kind: str, body: dict) -> None:
        if body.get("suffix"):
            raise bad_request("'suffix' is not supported", "suffix", "unsupported_parameter")
        if body.get("functions"):
            raise bad_request("'functions' (deprecated) is not supported; use 'tools'", "functions",
                              "unsupported_parameter")
        if kind != "chat" and body.get("tools"):
            raise bad_request("'tools' is a chat completions parameter", "tools", "unsupported_parameter")
        best_of = body.get("best_of")
        if best_of is not None and best_of != body.get("n", 1):
            raise bad_request("'best_of' different from 'n' is not supported", "best_of", "unsupported_parameter")

    def _tokenize(self, prompt, param: str) -> list:
        try:
            ids = self.engine.tokenize_prompt(prompt)
        except JaxserveError as e:
            raise bad_request(str(e), param, "invalid_prompt") from None
        if len(ids) > self.max_prompt_tokens:
            raise bad_request(
                f"This model's maximum prompt length is {self.max_prompt_tokens} tokens (context "
                f"{self.max_model_len}); the prompt has {len(ids)} tokens. Shorten it.", param,
                "context_length_exceeded")
        return ids

    def _completion_prompts(self, prompt) -> tuple:
        if prompt is None:
            raise bad_request("'prompt' is required", "prompt", "missing_required_parameter")
        if isinstance(prompt, str):
            items = [prompt]
        elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
            items = [prompt]
        elif isinstance(prompt, list) and prompt and (all(isinstance(p, str) for p in prompt) or all(
                isinstance(p, list) and all(_is_int(t) for t in p) for p in prompt)):
            items = list(prompt)
        else:
            raise bad_request("'prompt' must be a string, a list of strings, a list of token ids or a list of "
                              "token-id lists (non-empty)", "prompt", "invalid_type")
        if len(items) > self.limits.max_prompts:
            raise bad_request(f"at most {self.limits.max_prompts} prompts per request, got {len(items)}", "prompt",
                              "invalid_value")
        ids = [self._tokenize(p, "prompt") for p in items]
        texts = [p if isinstance(p, str) else None for p in items]
        return texts, ids

    def _chat_prompt(self, messages, tools: Optional[ToolSpec] = None) -> str:
        if not isinstance(messages, list) or not messages:
            raise bad_request("'messages' must be a non-empty list of {role, content} objects", "messages",
                              "invalid_type" if messages is not None else "missing_required_parameter")
        clean = []
        for i, m in enumerate(messages):
            param = f"messages[{i}]"
            if not isinstance(m, dict):
                raise bad_request(f"{param} must be an object", param, "invalid_type")
            role = m.get("role")
            if role not in _CHAT_ROLES:
                raise bad_request(f"{param}.role must be one of {sorted(_CHAT_ROLES)}, got {role!r}",
                                  f"{param}.role", "invalid_value")
            content = m.get("content")
            if isinstance(content, list):
                for part in content:
                    if not isinstance(part, dict) or part.get("type", "text") != "text" or not isinstance(
                            part.get("text"), str):
                        raise bad_request(f"{param}.content: only text parts are supported", f"{param}.content",
                                          "unsupported_parameter")
            elif content is not None and not isinstance(content, str):
                raise bad_request(f"{param}.content must be a string or a list of text parts", f"{param}.content",
                                  "invalid_type")
            msg = {"role": "system" if role == "developer" else role, "content": content or ""}
            calls = m.get("tool_calls")
            if calls is not None:
                if role != "assistant" or not isinstance(calls, list) or not all(
                        isinstance(c, dict) and isinstance(c.get("function"), dict)
                        and isinstance(c["function"].get("name"), str) for c in calls):
                    raise bad_request(f"{param}.tool_calls must be a list of {{'function': {{'name', 'arguments'}}}} "
                                      "on an assistant message", f"{param}.tool_calls", "invalid_value")
                msg["tool_calls"] = calls
            if role == "tool" and m.get("tool_call_id") is not None:
                msg["tool_call_id"] = m["tool_call_id"]
            clean.append(msg)
        template = self.tokenizer.chat_template_source if self.tokenizer is not None else None
        native = template_knows_tools(template)
        clean = messages_for_template(clean, tools, native)
        try:
            return self.tokenizer.apply_chat_template(
                clean, add_generation_prompt=True,
                tools=tools.openai_tools() if native and tools is not None and tools.active else None)
        except JaxserveError as e:
            raise bad_request(str(e), "messages", "invalid_prompt") from None

    def _sampling_params(self, kind: str, body: dict) -> SamplingParams:
        lim = self.limits
        if kind == "chat":
            max_tokens = _int(body, "max_completion_tokens", None, 1)
            if max_tokens is None:
                max_tokens = _int(body, "max_tokens", None, 1)
        else:
            max_tokens = _int(body, "max_tokens", 16, 1)
        if max_tokens is not None and max_tokens > self.max_tokens_limit:
            raise bad_request(f"'max_tokens' is {max_tokens} but this server allows at most {self.max_tokens_limit}",
                              "max_tokens", "invalid_value")
        if max_tokens is None and self.limits.max_tokens is not None:
            max_tokens = self.limits.max_tokens
        stop = body.get("stop")
        if isinstance(stop, str):
            stop = [stop]
        if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop)):
            raise bad_request("'stop' must be a non-empty string or a list of non-empty strings", "stop",
                              "invalid_type")
        if stop and len(stop) > lim.max_stop:
            raise bad_request(f"at most {lim.max_stop} stop strings, got {len(stop)}", "stop", "invalid_value")
        stop_ids = body.get("stop_token_ids")
        if stop_ids is not None and (not isinstance(stop_ids, list) or not all(_is_int(t) for t in stop_ids)):
            raise bad_request("'stop_token_ids' must be a list of integers", "stop_token_ids", "invalid_type")
        seed = _int(body, "seed", None)
        if seed is not None:
            seed &= 0x7FFFFFFF  # any 64-bit seed maps onto the sampler's 31-bit one
        kw = dict(
            n=_int(body, "n", 1, 1, lim.max_n),
            temperature=_num(body, "temperature", 1.0),
            top_p=_num(body, "top_p", 1.0),
            top_k=_int(body, "top_k", 0),
            min_p=_num(body, "min_p", 0.0),
            repetition_penalty=_num(body, "repetition_penalty", 1.0),
            presence_penalty=_num(body, "presence_penalty", 0.0),
            frequency_penalty=_num(body, "frequency_penalty", 0.0),
            seed=seed,
            max_tokens=max_tokens,
            min_tokens=_int(body, "min_tokens", 0, 0),
            stop=stop,
            stop_token_ids=stop_ids,
            ignore_eos=_bool(body, "ignore_eos", False),
            skip_special_tokens=_bool(body, "skip_special_tokens", True),
            include_stop_str_in_output=_bool(body, "include_stop_str_in_output", False),
        )
        for key, kind_ in (("logit_bias", dict), ("allowed_token_ids", list), ("bad_words", list)):
            v = body.get(key)
            if v is not None and not isinstance(v, kind_):
                raise bad_request(f"'{key}' must be {'an object' if kind_ is dict else 'a list'}", key,
                                  "invalid_type")
            if v:
                kw[key] = v
        try:
            sp = SamplingParams(**kw)
            sp.validate(self.max_logprobs)
            sp.check_vocab(self.engine.model_cfg.vocab_size)
        except JaxserveError as e:
            msg = str(e)
            param = msg.split(" ", 1)[0] if msg.split(" ", 1)[0] in kw else None
            raise bad_request(msg, param, "invalid_value") from None
        if stop_ids and any(not (0 <= t < self.engine.model_cfg.vocab_size) for t in stop_ids):
            raise bad_request(f"'stop_token_ids' must be in [0, {self.engine.model_cfg.vocab_size})",
                              "stop_token_ids", "invalid_value")
        return sp

    # -------------------------------------------------------------- responses
    def token_str(self, token_id: int) -> str:
        s = self._token_str.get(token_id)
        if s is None:
            s = self.tokenizer.decode([token_id], skip_special_tokens=False) if self.tokenizer is not None \
                else str(token_id)
            self._token_str[token_id] = s
        return s

    def logprobs_block(self, kind: str, token_ids: list, entries: list, top_n: int, text_offset: int = 0):
        """OpenAI logprobs for generated tokens; `entries[i]` = {token_id: logprob} (sampled + top-n)."""
        if kind == "chat":
            content = []
            for tok, entry in zip(token_ids, entries):
                s = self.token_str(tok)
                top = sorted(entry.items(), key=lambda kv: -kv[1])[:top_n]
                content.append({
                    "token": s, "logprob": max(entry.get(tok, _LOGPROB_FLOOR), _LOGPROB_FLOOR),
                    "bytes": list(s.encode("utf-8")),
                    "top_logprobs": [{"token": self.token_str(t), "logprob": max(lp, _LOGPROB_FLOOR),
                                      "bytes": list(self.token_str(t).encode("utf-8"))} for t, lp in top],
                })
            return {"content": content}
        tokens, lps, tops, offsets = [], [], [], []
        off = text_offset
        for tok, entry in zip(token_ids, entries):
            s = self.token_str(tok)
            tokens.append(s)
            lps.append(max(entry.get(tok, _LOGPROB_FLOOR), _LOGPROB_FLOOR))
            top = sorted(entry.items(), key=lambda kv: -kv[1])[:top_n]
            tops.append({self.token_str(t): max(lp, _LOGPROB_FLOOR) for t, lp in top})
            offsets.append(off)
            off += len(s)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    def prompt_logprobs_block(self, kind: str, prompt_ids: list, entries: list, top_n: int) -> dict:
        """OpenAI completions logprobs of the prompt tokens (echo): the first token has null logprob and top."""
        lp = self.logprobs_block(kind, prompt_ids[1:], entries[1:], top_n)
        first = self.token_str(prompt_ids[0])
        return {"tokens": [first] + lp["tokens"], "token_logprobs": [None] + lp["token_logprobs"],
                "top_logprobs": [None] + lp["top_logprobs"],
                "text_offset": [0] + [o + len(first) for o in lp["text_offset"]]}

    def _echo_logprobs(self, req: ParsedRequest, i: int, ro, c) -> Optional[dict]:
        """A completion choice's logprobs with echo: the prompt's tokens, then the generated ones (none with
        max_tokens 0), text offsets running through both (vLLM's layout)."""
        if req.logprobs is None or ro.prompt_logprobs is None:
            return None
        block = self.prompt_logprobs_block(req.kind, req.prompts[i], ro.prompt_logprobs, req.logprobs)
        if req.echo_only or not c.token_ids or c.logprobs is None:
            return block
        off = block["text_offset"][-1] + len(block["tokens"][-1])
        gen = self.logprobs_block(req.kind, c.token_ids, c.logprobs, req.logprobs, off)
        return {k: block[k] + gen[k] for k in block}

    def vllm_prompt_logprobs(self, ro) -> Optional[list]:
        """vLLM's per-choice `prompt_logprobs`: None, then {id: {"logprob", "decoded_token"}} per prompt token."""
        if ro.prompt_logprobs is None:
            return None
        return [None if e is None else {str(t): {"logprob": max(lp, _LOGPROB_FLOOR), "decoded_token": self.token_str(t)}
                                        for t, lp in e.items()} for e in ro.prompt_logprobs]

    def usage(self, req: ParsedRequest, outputs: list) -> dict:
        prompt = sum(len(p) for p in req.prompts)
        completion = 0 if req.echo_only else sum(len(c.token_ids) for ro in outputs if ro is not None
                                                 for c in ro.outputs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _prompt_text(self, req: ParsedRequest, i: int) -> str:
        t = req.prompt_texts[i]
        return t if t is not None else self.tokenizer.decode(req.prompts[i])

    def response(self, req: ParsedRequest, outputs: list, request_id: str, created: Optional[int] = None) -> dict:
        """A non-streaming answer from the finished RequestOutput of each prompt (in prompt order)."""
        created = int(time.time()) if created is None else created
        choices = []
        for i, ro in enumerate(outputs):
            for c in ro.outputs:
                index = i * req.params.n + c.index
                lp = None
                if req.logprobs is not None and c.logprobs is not None:
                    lp = self.logprobs_block(req.kind, c.token_ids, c.logprobs, req.logprobs)
                if req.kind == "chat":
                    message, finish = {"role": "assistant", "content": c.text}, c.finish_reason
                    calls = parse_tool_calls(c.text, req.tools) if req.tools is not None else None
                    if calls:
                        message, finish = {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"
                    choices.append({"index": index, "message": message, "logprobs": lp, "finish_reason": finish})
                else:
                    text = (self._prompt_text(req, i) + c.text) if req.echo else c.text
                    if req.echo:
                        lp = self._echo_logprobs(req, i, ro, c)
                        if req.echo_only:
                            text = self._prompt_text(req, i)
                    choices.append({"index": index, "text": text, "logprobs": lp, "finish_reason": c.finish_reason,
                                    "stop_reason": c.stop_reason})
                if req.prompt_logprobs is not None:
                    choices[-1]["prompt_logprobs"] = self.vllm_prompt_logprobs(ro)
        choices.sort(key=lambda ch: ch["index"])
        return {
            "id": request_id,
            "object": "chat.completion" if req.kind == "chat" else "text_completion",
            "created": created,
            "model": req.model,
            "choices": choices,
            "usage": self.usage(req, outputs),
            "system_fingerprint": None,
        }


@dataclass
class StreamState:
    """Turns cumulative RequestOutput snapshots of one HTTP request into OpenAI streaming chunks."""

    serving: OpenAIServing
    req: ParsedRequest
    request_id: str
    created: int = field(default_factory=lambda: int(time.time()))
    sent_text: dict = field(default_factory=dict)  # choice index -> chars sent
    sent_tokens: dict = field(default_factory=dict)  # choice index -> tokens whose logprobs were sent
    finished: set = field(default_factory=set)
    latest: dict = field(default_factory=dict)  # prompt index -> latest RequestOutput
    released: set = field(default_factory=set)  # tools: choices whose text is known not to be a call

    def _holding(self, k: int, c) -> bool:
        """With tools offered, an answer that may still be a tool call is held back until it is known: a forced
        call always; under "auto", until its text starts like something else."""
        tools = self.req.tools
        if tools is None or k in self.released:
            return False
        if not tools.forced and not may_be_tool_call(c.text):
            self.released.add(k)
            return False
        return c.finish_reason is None

    def _chunk(self, choices: list, usage=None) -> dict:
        out = {"id": self.request_id,
               "object": "chat.completion.chunk" if self.req.kind == "chat" else "text_completion",
               "created": self.created, "model": self.req.model, "choices": choices}
        if usage is not None:
            out["usage"] = usage
        elif self.req.include_usage:
            out["usage"] = None
        return out

    def first_chunks(self) -> list:
        """Chat streams open with the assistant role (one chunk per choice); text completions with echo."""
        req = self.req
        if req.kind == "chat":
            return [self._chunk([{"index": k, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}]) for k in range(req.num_choices)]
        if req.echo:
            return [self._chunk([{"index": i * req.params.n + j, "text": self.serving._prompt_text(req, i),
                                  "logprobs": None, "finish_reason": None}])
                    for i in range(len(req.prompts)) for j in range(req.params.n)]
        return []

    def update(self, prompt_index: int, ro) -> list:
        """Chunks for what changed in this snapshot of prompt `prompt_index`."""
        self.latest[prompt_index] = ro
        chunks = []
        req = self.req
        for c in ro.outputs:
            k = prompt_index * req.params.n + c.index
            if k in self.finished:
                continue
            if self._holding(k, c):
                continue
            t0, n0 = self.sent_text.get(k, 0), self.sent_tokens.get(k, 0)
            delta = c.text[t0:]
            calls = None
            if req.tools is not None and k not in self.released and c.finish_reason is not None:
                calls = parse_tool_calls(c.text, req.tools)
            lp = None
            if req.logprobs is not None and c.logprobs is not None:
                new_toks = c.token_ids[n0:]
                if new_toks:
                    lp = self.serving.logprobs_block(req.kind, new_toks, c.logprobs[n0:len(c.token_ids)],
                                                     req.logprobs, t0)
                self.sent_tokens[k] = len(c.token_ids)
            done = c.finish_reason is not None
            if not delta and lp is None and not done:
                continue
            self.sent_text[k] = len(c.text)
            if calls:  # the whole call in one delta, then the finish chunk
                chunks.append(self._chunk([{"index": k, "delta": {"tool_calls": [
                    {"index": j, **call} for j, call in enumerate(calls)]}, "logprobs": lp, "finish_reason": None}]))
                choice = {"index": k, "delta": {}, "logprobs": None, "finish_reason": "tool_calls"}
            elif req.kind == "chat":
                choice = {"index": k, "delta": {"content": delta} if delta or not done else {}, "logprobs": lp,
                          "finish_reason": c.finish_reason}
            else:
                choice = {"index": k, "text": delta, "logprobs": lp, "finish_reason": c.finish_reason}
                if done:
                    choice["stop_reason"] = c.stop_reason
            if done:
                self.finished.add(k)
            chunks.append(self._chunk([choice]))
        return chunks

    @property
    def all_finished(self) -> bool:
        return len(self.finished) >= self.req.num_choices

    def usage_chunk(self) -> dict:
        outs = [self.latest.get(i) for i in range(len(self.req.prompts))]
        return self._chunk([], usage=self.serving.usage(self.req, outs))
