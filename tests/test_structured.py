"""Structured output (JSON schema, JSON object, regex, choice, grammar) and tool calling, on a tiny random model:
whatever the weights say, the grammar decides what may be said. The engine side (SamplingParams.structured_outputs:
masks built on the host, applied by the same compiled step; neighbours unaffected; speculative drafts checked),
then the OpenAI surface through the official client against a real server (response_format, vLLM's guided_*
extras, tools / tool_choice, streaming). The real Gemma 3 270M checks are in tests/test_structured_real.py."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from jaxserve import SamplingParams, StructuredOutputsParams
from jaxserve.errors import InvalidSamplingParamsError
from jaxserve.server.tools import ToolError, ToolSpec, messages_for_template, parse_tool_calls, parse_tools
from tests.conftest import get_llm, serve_in_thread

jsonschema = pytest.importorskip("jsonschema")

KW = dict(page_size=4, max_model_len=1024, max_num_seqs=8, max_num_batched_tokens=64, max_prefill_seqs=4,
          num_pages=1024, attn_block_pages=4)
SCHEMA = {"type": "object",
          "properties": {"city": {"type": "string", "maxLength": 5}, "rank": {"type": "integer"},
                         "kind": {"enum": ["big", "small"]}, "tags": {"type": "array", "items": {"type": "boolean"},
                                                                      "maxItems": 3}},
          "required": ["city", "rank", "kind", "tags"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["utc", "local"]}},
                                       "required": ["zone"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def llm():
    return get_llm("tiny-llama", **KW)


# ------------------------------------------------------------------------------------------ parameters
@pytest.mark.parametrize("kw, match", [
    ({}, "exactly one"),
    (dict(json=SCHEMA, regex="a+"), "exactly one"),
    (dict(choice="yes"), "non-empty list"),
    (dict(choice=[]), "non-empty list"),
    (dict(regex=""), "non-empty string"),
    (dict(json=5), "JSON schema"),
])
def test_bad_structured_params_are_clear_errors(kw, match):
    with pytest.raises(InvalidSamplingParamsError, match=match):
        StructuredOutputsParams(**kw)
    with pytest.raises(InvalidSamplingParamsError):
        SamplingParams(structured_outputs=kw)


# ------------------------------------------------------------------------------------------ the engine
def test_outputs_follow_their_grammars_beside_a_free_neighbour(llm):
    free = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    alone = llm.generate(["plain text"], free, use_tqdm=False)[0].outputs[0]
    params = [
        SamplingParams(temperature=0, max_tokens=80, structured_outputs={"json": SCHEMA}),
        SamplingParams(temperature=1.0, seed=3, max_tokens=80, structured_outputs={"json_object": True}),
        SamplingParams(temperature=0.8, seed=4, max_tokens=20, structured_outputs={"choice": ["yes", "no", "maybe"]}),
        SamplingParams(temperature=1.0, seed=5, max_tokens=20, structured_outputs={"regex": r"[0-9]{3}-[a-z]{2}"}),
        SamplingParams(temperature=0, max_tokens=20, structured_outputs={
            "grammar": 'start: "(" item (", " item)* ")"\nitem: "a" | "b" | "c"'}),
        free,
    ]
    outs = [o.outputs[0] for o in llm.generate(["json", "object", "pick", "code", "list", "plain text"], params,
                                               use_tqdm=False)]
    doc = json.loads(outs[0].text)
    jsonschema.validate(doc, SCHEMA)
    assert outs[0].finish_reason == "stop" and outs[0].stop_reason is None
    if outs[1].finish_reason == "stop":  # (an unbounded object may run to max_tokens)
        assert isinstance(json.loads(outs[1].text), dict)
    else:
        assert outs[1].text.startswith("{")
    assert outs[2].text in ("yes", "no", "maybe") and outs[2].finish_reason == "stop"
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", outs[3].text)
    assert re.fullmatch(r"\([abc](, [abc])*\)", outs[4].text) or outs[4].finish_reason == "length"
    assert outs[5].token_ids == alone.token_ids  # the unconstrained row shares the batch, unchanged


def test_n_samples_each_follow_the_grammar_and_random_choices_vary(llm):
    sp = SamplingParams(n=6, temperature=1.5, seed=11, max_tokens=20,
                        structured_outputs=StructuredOutputsParams(choice=["red", "green", "blue", "grey"]))
    texts = [c.text for c in llm.generate(["colour"], sp, use_tqdm=False)[0].outputs]
    assert set(texts) <= {"red", "green", "blue", "grey"} and len(set(texts)) > 1


def test_a_bad_grammar_is_refused_and_the_engine_keeps_serving(llm):
    for so in ({"regex": "(unclosed"}, {"grammar": "start: undefined_rule"}, {"json": {"type": "nonsense"}}):
        with pytest.raises(InvalidSamplingParamsError, match="structured output"):
            llm.generate(["x"], SamplingParams(max_tokens=4, structured_outputs=so), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    out = llm.generate(["x"], SamplingParams(temperature=0, max_tokens=5, structured_outputs={"regex": "[a-c]{5}"}),
                       use_tqdm=False)[0].outputs[0]
    assert re.fullmatch("[a-c]{5}", out.text)


def test_grammar_combines_with_the_other_masks(llm):
    """allowed_token_ids / bad_words AND the grammar: a choice whose options start with a banned word."""
    sp = SamplingParams(temperature=0, max_tokens=10, bad_words=["alpha"],
                        structured_outputs={"choice": ["alpha", "beta gamma"]})
    tok = llm.tokenizer
    if len(tok.encode("alpha", add_bos=False)) != 1:  # the ban is only certain for a one-token word
        sp.bad_words = None
        sp.logit_bias = {tok.encode("alpha", add_bos=False)[0]: -100}
    assert llm.generate(["?"], sp, use_tqdm=False)[0].outputs[0].text == "beta gamma"


def test_speculative_drafts_are_checked_against_the_grammar():
    """An n-gram proposer drafts from a prompt full of tokens the grammar forbids: the verify step must still emit
    only grammatical tokens, and greedy output equals the non-speculative engine's."""
    from jaxserve import LLM

    kw = dict(KW, max_num_seqs=4, max_prefill_seqs=1)
    llm = LLM("tiny-gemma3", random_weights=True, speculative={"method": "ngram", "num_tokens": 3, "adaptive": False},
              **kw)
    plain = get_llm("tiny-gemma3", **kw)
    tok = llm.tokenizer
    prompt = tok.encode('{"a": 1, "b": [true, false]} {"a": 1, "b": [true, false]} {"a": 1, "b": [true')
    schema = {"type": "object", "properties": {"a": {"type": "integer"},
                                               "b": {"type": "array", "items": {"type": "boolean"}, "maxItems": 4}},
              "required": ["a", "b"], "additionalProperties": False}
    sp = SamplingParams(temperature=0, max_tokens=40, structured_outputs={"json": schema})
    got = llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0]
    ref = plain.generate([prompt], sp, use_tqdm=False)[0].outputs[0]
    assert got.token_ids == ref.token_ids
    if got.finish_reason == "stop":
        jsonschema.validate(json.loads(got.text), schema)
    assert llm.engine.speculator.proposed > 0


def test_mask_words_follow_the_sampler_layout(llm):
    """The grammar's bitmask has the sampler's packed layout: bit id % 32 of word id // 32."""
    from jaxserve.engine.structured import grammar_mask

    eng = llm.engine
    m = eng.grammars.matcher(StructuredOutputsParams(choice=["yes", "no"]))
    mask = grammar_mask(m, eng.runner.W)
    bits = ((mask.astype(np.int64)[:, None] >> np.arange(32)) & 1).reshape(-1)
    allowed = set(np.nonzero(bits)[0].tolist())
    firsts = {llm.tokenizer.encode(w, add_bos=False)[0] for w in ("yes", "no")}
    assert firsts <= allowed and len(allowed) < 50


# ------------------------------------------------------------------------------------------ tools (host side)
def test_tool_spec_parsing_and_errors():
    spec = parse_tools({"tools": [WEATHER, TIME], "tool_choice": {"type": "function", "function": {"name": "get_time"}}})
    assert spec.names == ["get_weather", "get_time"] and spec.choice == "get_time" and spec.forced
    assert parse_tools({"tools": [WEATHER]}).choice == "auto"
    assert parse_tools({}) is None
    for body, param in [({"tools": "x"}, "tools"), ({"tools": [{"type": "function"}]}, "tools[0]"),
                        ({"tools": [WEATHER, WEATHER]}, "tools"),
                        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
                         "tool_choice"),
                        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
                        ({"tool_choice": "required"}, "tool_choice")]:
        with pytest.raises(ToolError) as e:
            parse_tools(body)
        assert e.value.param == param, body


def test_tool_calls_are_read_from_the_answer():
    spec = ToolSpec([WEATHER["function"], TIME["function"]], "auto")
    one = parse_tool_calls('{"name": "get_time", "arguments": {"zone": "utc"}}', spec)
    assert one[0]["type"] == "function" and one[0]["function"]["name"] == "get_time"
    assert json.loads(one[0]["function"]["arguments"]) == {"zone": "utc"} and one[0]["id"].startswith("call_")
    fenced = parse_tool_calls('```json\n{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "c"}}\n```', spec)
    assert json.loads(fenced[0]["function"]["arguments"])["city"] == "Oslo"
    hermes = parse_tool_calls('<tool_call>\n{"name": "get_time", "arguments": {"zone": "local"}}\n</tool_call>\n'
                              '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}</tool_call>',
                              spec)
    assert [c["function"]["name"] for c in hermes] == ["get_time", "get_weather"]
    for text in ("The weather is fine.", '{"name": "unknown", "arguments": {}}', '{"name": "get_time"',
                 '{"name": "get_time", "arguments": 5}'):
        assert parse_tool_calls(text, spec) is None, text


def test_templates_without_tool_support_get_the_tools_as_text():
    spec = ToolSpec([WEATHER["function"]], "auto")
    msgs = [{"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather",
                                                              "arguments": '{"city": "Oslo", "unit": "c"}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "12 degrees"}]
    out = messages_for_template(msgs, spec, native=False)
    assert out[0]["role"] == "system" and "get_weather" in out[0]["content"]
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert json.loads(out[2]["content"]) == {"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}
    assert "12 degrees" in out[3]["content"]
    assert messages_for_template(msgs, spec, native=True) is msgs


# ------------------------------------------------------------------------------------------ the server
@pytest.fixture(scope="module")
def server(llm):
    httpx = pytest.importorskip("httpx")
    openai = pytest.importorskip("openai")
    pytest.importorskip("uvicorn")
    with serve_in_thread(llm, "tiny") as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60), httpx.Client(base_url=url)


def test_server_response_format_and_guided_extras(server):
    client, _ = server
    msgs = [{"role": "user", "content": "Describe a city."}]
    r = client.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=80, response_format={
        "type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}})
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    r = client.completions.create(model="tiny", prompt="Answer:", max_tokens=10, temperature=0.7, seed=1,
                                  extra_body={"guided_choice": ["left", "right"]})
    assert r.choices[0].text in ("left", "right")
    r = client.completions.create(model="tiny", prompt="Code:", max_tokens=10, temperature=0,
                                  extra_body={"structured_outputs": {"regex": "[A-Z]{2}[0-9]{2}"}})
    assert re.fullmatch("[A-Z]{2}[0-9]{2}", r.choices[0].text)
    r = client.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=60,
                                       response_format={"type": "json_object"})
    assert r.choices[0].message.content.startswith("{")
    # streaming deltas reassemble to the non-streamed answer
    kw = dict(model="tiny", messages=msgs, temperature=0, max_tokens=80, response_format={
        "type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}})
    whole = client.chat.completions.create(**kw).choices[0].message.content
    parts = [ch.choices[0].delta.content or "" for ch in client.chat.completions.create(stream=True, **kw)
             if ch.choices]
    assert "".join(parts) == whole


def test_server_tool_calls(server):
    client, _ = server
    msgs = [{"role": "user", "content": "What's the weather in Paris?"}]
    r = client.chat.completions.create(model="tiny", messages=msgs, tools=[WEATHER, TIME], tool_choice="required",
                                       temperature=0, max_tokens=60)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls" and ch.message.content is None
    call = ch.message.tool_calls[0]
    assert call.function.name in ("get_weather", "get_time")
    schema = (WEATHER if call.function.name == "get_weather" else TIME)["function"]["parameters"]
    jsonschema.validate(json.loads(call.function.arguments), schema)
    named = client.chat.completions.create(model="tiny", messages=msgs, tools=[WEATHER, TIME], max_tokens=60,
                                           tool_choice={"type": "function", "function": {"name": "get_time"}},
                                           temperature=0)
    args = json.loads(named.choices[0].message.tool_calls[0].function.arguments)
    assert named.choices[0].message.tool_calls[0].function.name == "get_time" and args["zone"] in ("utc", "local")
    # streamed: one tool_calls delta that reassembles to the same call, then finish_reason tool_calls
    chunks = list(client.chat.completions.create(model="tiny", messages=msgs, tools=[WEATHER, TIME], max_tokens=60,
                                                 tool_choice={"type": "function", "function": {"name": "get_time"}},
                                                 temperature=0, stream=True))
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert [d.function.name for d in deltas] == ["get_time"]
    assert json.loads(deltas[0].function.arguments) == args
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # a follow-up turn carrying the call and its result renders and answers
    follow = msgs + [{"role": "assistant", "content": None, "tool_calls": [named.choices[0].message.tool_calls[0].model_dump()]},
                     {"role": "tool", "tool_call_id": named.choices[0].message.tool_calls[0].id, "content": "12:00"}]
    r = client.chat.completions.create(model="tiny", messages=follow, tools=[WEATHER, TIME], tool_choice="none",
                                       max_tokens=5, temperature=0)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "length"


def test_server_bad_structured_requests_are_400(server):
    _, http = server
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4}
    for extra, param in [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"guided_regex": "(unclosed"}, "guided_regex"),
        ({"guided_json": {"type": "nonsense"}}, "guided_json"),
        ({"guided_grammar": "start: nothing_here"}, "guided_grammar"),
        ({"guided_choice": "yes"}, "guided_choice"),
        ({"guided_choice": ["a"], "guided_regex": "a"}, "guided_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ]:
        r = http.post("/v1/chat/completions", json={**chat, **extra})
        assert r.status_code == 400, (extra, r.text)
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["param"] == param, (extra, err)
    r = http.post("/v1/chat/completions", json={**chat, "guided_choice": ["ok"]})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "ok"


def test_a_template_that_knows_tools_gets_them():
    """A jinja chat template that renders `tools` (as Qwen's and Llama 3.x's do) receives them; the tool-less
    family templates get them as a system message instead."""
    import types

    from jaxserve.server.protocol import OpenAIServing
    from jaxserve.weights.tokenizer import make_random_model_tokenizer

    template = ("{% if tools %}<tools>{% for t in tools %}{{ t.function.name }};{% endfor %}</tools>{% endif %}"
                "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>")
    for chat_template, native in ((template, True), ("llama3", False)):
        tok = make_random_model_tokenizer(512, bos_id=1, eos_ids=(2,), chat_template=chat_template)
        eng = types.SimpleNamespace(tokenizer=tok, max_model_len=4096, cfg=types.SimpleNamespace(max_logprobs=5),
                                    model_cfg=types.SimpleNamespace(vocab_size=512, name="stub"))
        eng.tokenize_prompt = lambda p, _t=tok: _t.encode(p)
        sv = OpenAIServing(eng, ["stub"])
        req = sv.parse("chat", {"messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER, TIME]})
        text = req.prompt_texts[0]
        assert ("<tools>get_weather;get_time;</tools>" in text) == native, text
        assert ("You can call these functions" in text) == (not native), text
        assert req.tools is not None and req.params.structured_outputs is None  # "auto": unconstrained
        forced = sv.parse("chat", {"messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER],
                                   "tool_choice": "required"})
        assert forced.params.structured_outputs.json["properties"]["name"] == {"const": "get_weather"}
        open_tool = {"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"x": {"type": "integer"}}}}}
        args = sv.parse("chat", {"messages": [{"role": "user", "content": "hi"}], "tools": [open_tool],
                                 "tool_choice": "required"}).params.structured_outputs.json["properties"]["arguments"]
        assert args["additionalProperties"] is False  # closed to the declared properties, as strict mode is
        none = sv.parse("chat", {"messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER],
                                 "tool_choice": "none"})
        assert none.tools is None and "get_weather" not in none.prompt_texts[0]
