"""Tool calling on /v1/chat/completions: OpenAI's `tools` / `tool_choice` in, `tool_calls` out.

How a tool call is asked for and read back:
- The prompt offers the tools. A chat template that knows tools (its jinja source reads `tools`: Llama 3.x,
  Qwen 2.5 / 3, ...) gets them as `tools=`; any other template (Gemma's, the family defaults) gets a system
  message listing the functions' JSON schemas and asking for a JSON object `{"name": ..., "arguments": {...}}`
  when a function is to be called (Gemma's documented prompt-based function calling).
- `tool_choice` "required" or a named function constrains the output with a JSON-schema grammar (engine
  structured output): a call to one of the allowed functions whose arguments match its `parameters` schema
  (closed to the declared properties when the schema leaves `additionalProperties` open, as strict mode does).
  "auto" leaves the model free and reads a call from its text when there is one (a bare JSON object, one inside a
  ```json fence, or Hermes/Qwen `<tool_call>...</tool_call>` blocks naming a declared function); "none" neither
  offers the tools nor reads calls.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Optional

from jaxserve.sampling_params import StructuredOutputsParams
from jaxserve.weights.tokenizer import _text  # message content (a string or text parts) as text

TOOL_CALL_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)
FENCE = re.compile(r"^```[a-zA-Z_]*\s*\n?(.*?)\n?```$", re.S)


class ToolError(ValueError):
    """A malformed `tools` / `tool_choice`; the message says what, `param` where."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass
class ToolSpec:
    """A request's tools (OpenAI `function` objects, normalised) and its choice: "auto" | "required" | "none" |
    the name of the one function that must be called."""

    functions: list  # [{"name", "description", "parameters"}]
    choice: str

    @property
    def names(self) -> list:
        return [f["name"] for f in self.functions]

    @property
    def active(self) -> bool:
        """The tools are offered and calls read back (every choice but "none")."""
        return self.choice != "none"

    @property
    def forced(self) -> bool:
        """The output must be a call ("required" or a named function)."""
        return self.choice not in ("auto", "none")

    def openai_tools(self) -> list:
        return [{"type": "function", "function": dict(f)} for f in self.functions]


def parse_tools(body: dict) -> Optional[ToolSpec]:
    """The request's ToolSpec, or None without tools. Raises ToolError on malformed input."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is None or tools == []:
        if choice not in (None, "none", "auto"):
            raise ToolError("'tool_choice' needs 'tools'", "tool_choice")
        return None
    if not isinstance(tools, list):
        raise ToolError("'tools' must be a list of {type: function, function: {...}} objects", "tools")
    functions = []
    for i, t in enumerate(tools):
        param = f"tools[{i}]"
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(t.get("function"), dict):
            raise ToolError(f"{param} must be {{'type': 'function', 'function': {{...}}}}", param)
        f = t["function"]
        name = f.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", name):
            raise ToolError(f"{param}.function.name must be 1-64 letters, digits, '_', '.' or '-'", f"{param}.function.name")
        params = f.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise ToolError(f"{param}.function.parameters must be a JSON schema object", f"{param}.function.parameters")
        desc = f.get("description")
        if desc is not None and not isinstance(desc, str):
            raise ToolError(f"{param}.function.description must be a string", f"{param}.function.description")
        functions.append({"name": name, **({"description": desc} if desc else {}), "parameters": params})
    names = [f["name"] for f in functions]
    if len(set(names)) != len(names):
        raise ToolError("tool function names must be unique", "tools")
    if choice is None:
        choice = "auto"
    if isinstance(choice, dict):
        fn = choice.get("function") if choice.get("type", "function") == "function" else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str):
            raise ToolError("'tool_choice' must be 'none', 'auto', 'required' or "
                            "{'type': 'function', 'function': {'name': ...}}", "tool_choice")
        if name not in names:
            raise ToolError(f"tool_choice names function {name!r}, which is not in 'tools' ({', '.join(names)})",
                            "tool_choice")
        choice = name
    elif choice not in ("none", "auto", "required"):
        raise ToolError("'tool_choice' must be 'none', 'auto', 'required' or a named function", "tool_choice")
    return ToolSpec(functions, choice)


def _closed(schema: dict) -> dict:
    """An object schema that says nothing of `additionalProperties` gets `false`, as OpenAI's strict function
    calling requires: the arguments then hold only the declared properties (still valid against the schema as
    written), instead of a small model filling them with whatever it likes (often a copy of the schema itself)."""
    if isinstance(schema, dict) and "properties" in schema and "additionalProperties" not in schema \
            and schema.get("type", "object") == "object":
        return {**schema, "additionalProperties": False}
    return schema


def _call_schema(f: dict) -> dict:
    return {"type": "object", "properties": {"name": {"const": f["name"]}, "arguments": _closed(f["parameters"])},
            "required": ["name", "arguments"], "additionalProperties": False}


def tool_grammar(spec: ToolSpec) -> Optional[StructuredOutputsParams]:
    """The structured output that forces a call ("required": any declared function; a name: that one)."""
    if not spec.forced:
        return None
    fs = spec.functions if spec.choice == "required" else [f for f in spec.functions if f["name"] == spec.choice]
    schema = _call_schema(fs[0]) if len(fs) == 1 else {"anyOf": [_call_schema(f) for f in fs]}
    return StructuredOutputsParams(json=schema)


def template_knows_tools(template) -> bool:
    """Whether a chat template (a jinja string) renders `tools` itself."""
    return isinstance(template, str) and "{" in template and re.search(r"\btools\b", template) is not None


def tools_system_text(spec: ToolSpec) -> str:
    listing = "\n".join(json.dumps(f, ensure_ascii=False) for f in spec.functions)
    if spec.forced:
        ask = "Answer with a function call only: a JSON object {\"name\": <function name>, \"arguments\": {...}}."
    else:
        ask = ("If a function should be called, answer with only a JSON object "
               "{\"name\": <function name>, \"arguments\": {...}} and nothing else; otherwise answer normally.")
    return f"You can call these functions (JSON schemas):\n{listing}\n{ask}"


def messages_for_template(messages: list, spec: Optional[ToolSpec], native: bool) -> list:
    """The conversation as the chat template sees it. A template without tool support gets the tools as a
    system message, earlier assistant calls as their JSON, and tool results as user turns."""
    if native:
        return messages
    out = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = [{"name": c["function"]["name"], "arguments": _load_args(c["function"].get("arguments"))}
                     for c in m["tool_calls"]]
            text = json.dumps(calls[0] if len(calls) == 1 else calls, ensure_ascii=False)
            out.append({"role": "assistant", "content": ((m.get("content") or "") + "\n" + text).strip()})
        elif m["role"] == "tool":
            out.append({"role": "user", "content": f"Function result: {_text(m.get('content'))}"})
        else:
            out.append(m)
    if spec is not None and spec.active:
        text = tools_system_text(spec)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": _text(out[0].get("content")) + "\n\n" + text}
        else:
            out.insert(0, {"role": "system", "content": text})
    # consecutive user turns (a tool result after a user message) are merged: strict templates alternate roles
    merged = []
    for m in out:
        if merged and m["role"] == merged[-1]["role"] == "user":
            merged[-1] = {"role": "user", "content": _text(merged[-1].get("content")) + "\n\n" + _text(m.get("content"))}
        else:
            merged.append(m)
    return merged


def _load_args(args):
    if isinstance(args, str):
        try:
            return json.loads(args)
        except ValueError:
            return args
    return args


def _as_call(obj, names) -> Optional[dict]:
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    args = _load_args(args)
    if not isinstance(args, dict):
        return None
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)}}


def _calls_from(text: str, names) -> Optional[list]:
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    objs = obj if isinstance(obj, list) else [obj]
    calls = [_as_call(o, names) for o in objs]
    return calls if calls and all(calls) else None


def parse_tool_calls(text: str, spec: ToolSpec) -> Optional[list]:
    """OpenAI `tool_calls` read from a model's answer, or None when it is not (only) a call."""
    names = set(spec.names)
    s = text.strip()
    blocks = TOOL_CALL_BLOCK.findall(s)
    if blocks:
        calls = [c for b in blocks for c in (_calls_from(b, names) or [None])]
        return calls if calls and all(calls) else None
    fence = FENCE.match(s)
    if fence:
        s = fence.group(1).strip()
    return _calls_from(s, names)


def may_be_tool_call(text: str) -> bool:
    """Whether a partial answer could still turn into a tool call (a stream holds such text back)."""
    s = text.lstrip()
    return not s or s[0] in "{[`<"
