"""Structured output and tool calls on the real Gemma 3 270M, through the official `openai` client against a
real server (issue 17's checks): JSON-schema answers to 20 prompts parse and validate (`jsonschema`), a
guided_choice answer is one of the choices, a required tool call returns arguments that parse against the
function's schema, and streamed deltas reassemble to the non-streamed message."""

from __future__ import annotations

import concurrent.futures
import json

import pytest

from tests.conftest import serve_in_thread

pytestmark = pytest.mark.slow
jsonschema = pytest.importorskip("jsonschema")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

SCHEMA = {"type": "object",
          "properties": {"topic": {"type": "string", "maxLength": 40},
                         "difficulty": {"enum": ["easy", "medium", "hard"]},
                         "year": {"type": "integer", "minimum": 1990, "maximum": 2030},
                         "keywords": {"type": "array", "items": {"type": "string", "maxLength": 20},
                                      "minItems": 1, "maxItems": 3}},
          "required": ["topic", "difficulty", "year", "keywords"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}


def _topics(n):
    from pydoc_data.topics import topics

    return sorted(topics)[:n]


@pytest.fixture(scope="module")
def client(gemma):
    with serve_in_thread(gemma, "gemma") as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=300)


def _ask(client, topic):
    return client.chat.completions.create(
        model="gemma", temperature=0, max_tokens=160,
        messages=[{"role": "user", "content": f"Describe the Python documentation topic '{topic}' as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "topic", "schema": SCHEMA, "strict": True}})


def test_json_schema_answers_parse_and_validate(client):
    topics = _topics(20)
    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        answers = list(ex.map(lambda t: _ask(client, t), topics))
    for topic, r in zip(topics, answers):
        ch = r.choices[0]
        assert ch.finish_reason == "stop", (topic, ch.message.content)
        jsonschema.validate(json.loads(ch.message.content), SCHEMA)
    # the stream of one of them reassembles to the same message
    kw = dict(model="gemma", temperature=0, max_tokens=160, messages=[
        {"role": "user", "content": f"Describe the Python documentation topic '{topics[3]}' as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "topic", "schema": SCHEMA}})
    parts = [c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw) if c.choices]
    assert "".join(parts) == answers[3].choices[0].message.content


def test_guided_choice(client):
    choices = ["positive", "negative", "neutral"]
    for text in ("I loved this film, it was wonderful.", "The food was cold and the waiter was rude."):
        r = client.completions.create(model="gemma", prompt=f"Review: {text}\nSentiment:", max_tokens=8,
                                      temperature=0, extra_body={"guided_choice": choices})
        assert r.choices[0].text in choices and r.choices[0].finish_reason == "stop"


def test_required_tool_call_and_its_stream(client):
    kw = dict(model="gemma", temperature=0, max_tokens=80, tools=[WEATHER], tool_choice="required",
              messages=[{"role": "user", "content": "What is the weather like in Paris today?"}])
    r = client.chat.completions.create(**kw)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls" and ch.message.tool_calls, ch.message
    call = ch.message.tool_calls[0]
    assert call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, WEATHER["function"]["parameters"])
    chunks = list(client.chat.completions.create(stream=True, **kw))
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(deltas) == 1 and deltas[0].function.name == "get_weather"
    assert json.loads(deltas[0].function.arguments) == args
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
