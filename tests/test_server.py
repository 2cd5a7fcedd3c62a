"""The OpenAI-compatible server: a real uvicorn server on 127.0.0.1 (background thread) over a tiny random model.

The official `openai` client for the happy paths (streaming and not, completions and chat, logprobs, stop,
seed, n), raw httpx for the error answers (each followed by a good request: the server keeps serving), a
bounded load test (64 concurrent streaming clients, some leaving mid-stream: everyone else's greedy text equals
offline `LLM.generate`, and no KV page is held afterwards, read from /metrics), and SIGTERM draining.

The engine runs with `batch_invariant=True`, so a request's greedy tokens do not depend on what shares its step
and the offline references (computed before the server takes the engine) are exact.
"""

import asyncio
import json
import re
import signal
import socket
import threading
import time

import pytest

from jaxserve import SamplingParams
from tests.conftest import get_llm

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

SERVER_KW = dict(page_size=4, max_model_len=256, max_num_seqs=4, max_num_batched_tokens=16, max_prefill_seqs=1,
                 min_prefill_tokens=16, num_pages=256, attn_block_pages=4, batch_invariant=True)
MODEL = "tiny-llama"
KEY = "sk-test-key"
MAX_BODY = 64 * 1024
MAX_PROMPT = 200
MAX_TOKENS = 64
N_LOAD, N_LEAVE = 64, 16
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]  # ~130 tokens here
# Token-id prompts as lm-evaluation-harness sends them (a batch); the first is longer than a prefill chunk (16).
ECHO_PROMPTS = [[1, 17, 300, 5, 42, 99, 7, 250, 31, 8, 120, 64, 3, 77, 200, 11, 90, 45, 60, 12, 140, 33, 9],
                [1, 88, 6, 410, 23]]


def _greedy(max_tokens):
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def _load_prompt(i):
    return f"client {i} asks about item {i * 7 % 13}"


class _Server:
    def __init__(self, llm):
        from jaxserve.server.app import build_app
        from jaxserve.server.protocol import Limits

        self.llm = llm
        # Offline references first: once the server starts, its engine thread owns the engine.
        self.ref = {
            "hello": llm.generate(["Hello there"], _greedy(8), use_tqdm=False)[0],
            "stop": llm.generate(["the quick brown"], _greedy(24), use_tqdm=False)[0].outputs[0].text,
            "chat": llm.chat(CHAT, _greedy(10), use_tqdm=False)[0],
            "bias": llm.generate(["Hello there"], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True,
                                                                 logit_bias={42: 8.0, 7: -100.0}),
                                 use_tqdm=False)[0].outputs[0].token_ids,
        }
        self.echo_ref = llm.generate(ECHO_PROMPTS, SamplingParams(temperature=0, max_tokens=1, logprobs=1,
                                                                  prompt_logprobs=1), use_tqdm=False)
        self.load_ref = [o.outputs[0].text for o in llm.generate(
            [_load_prompt(i) for i in range(N_LOAD)], [_greedy(6 + i % 7) for i in range(N_LOAD)], use_tqdm=False)]
        self.app = app = build_app(llm, served_model_names=[MODEL], api_key=KEY,
                        limits=Limits(max_body_bytes=MAX_BODY, max_prompt_tokens=MAX_PROMPT, max_tokens=MAX_TOKENS))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=20))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        self.http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)

    def stop(self):
        if self.thread.is_alive():
            self.server.should_exit = True
            self.thread.join(30)
        self.http.close()


@pytest.fixture(scope="module")
def srv():
    s = _Server(get_llm(MODEL, **SERVER_KW))
    yield s
    s.stop()
    assert not s.llm.engine.has_unfinished_requests()


def _metrics(srv) -> dict:
    text = srv.http.get("/metrics").text
    out = {}
    for line in text.splitlines():
        m = re.match(r"^([a-z_]+)(\{[^}]*\})?\s+(\S+)$", line)
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def _assert_serving(srv):
    """A good request right after a bad one: the server (and its engine) still answers."""
    r = srv.client.completions.create(model=MODEL, prompt="Hello there", max_tokens=8, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert r.choices[0].text == srv.ref["hello"].outputs[0].text


# ------------------------------------------------------------------------------------------ happy paths
def test_health_and_models(srv):
    assert httpx.get(srv.url + "/health").json() == {"status": "ok"}
    models = srv.client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert srv.client.models.retrieve(MODEL).id == MODEL


def test_completion_equals_offline(srv):
    ref = srv.ref["hello"]
    r = srv.client.completions.create(model=MODEL, prompt="Hello there", max_tokens=8, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.model == MODEL
    assert r.choices[0].text == ref.outputs[0].text
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert r.usage.completion_tokens == 8 and r.usage.total_tokens == 8 + len(ref.prompt_token_ids)


def test_logit_bias_and_tokenizer_endpoints(srv):
    r = srv.client.completions.create(model=MODEL, prompt="Hello there", max_tokens=6, temperature=0,
                                      logit_bias={"42": 8, "7": -100}, extra_body={"ignore_eos": True})
    assert r.choices[0].text == srv.llm.tokenizer.decode(srv.ref["bias"])  # as LLM.generate with the same bias
    tok = srv.http.post("/tokenize", json={"model": MODEL, "prompt": "Hello there"}).json()
    assert tok["tokens"] == srv.llm.tokenizer.encode("Hello there") and tok["count"] == len(tok["tokens"])
    assert tok["max_model_len"] == srv.llm.engine.max_model_len
    chat = srv.http.post("/tokenize", json={"messages": CHAT}).json()["tokens"]
    assert chat == list(srv.ref["chat"].prompt_token_ids)  # the chat template, as /v1/chat/completions applies it
    back = srv.http.post("/detokenize", json={"tokens": tok["tokens"]}).json()["prompt"]
    assert back == srv.llm.tokenizer.decode(tok["tokens"], skip_special_tokens=False)


def test_completion_stream(srv):
    chunks = list(srv.client.completions.create(model=MODEL, prompt="Hello there", max_tokens=8, temperature=0,
                                                stream=True, stream_options={"include_usage": True},
                                                extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == srv.ref["hello"].outputs[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8


def test_chat_equals_offline_and_streams(srv):
    ref = srv.ref["chat"].outputs[0].text
    r = srv.client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=10, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == ref
    assert r.usage.prompt_tokens == len(srv.ref["chat"].prompt_token_ids)
    stream = srv.client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=10, temperature=0,
                                                stream=True, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref
    assert chunks[-1].choices[0].finish_reason == "length"


def test_logprobs(srv):
    r = srv.client.completions.create(model=MODEL, prompt="Hello there", max_tokens=5, temperature=0, logprobs=2,
                                      extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    for tok, tlp, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert tlp <= 0 and 1 <= len(top) <= 2
        assert tlp == pytest.approx(max(top.values()), abs=1e-5)  # greedy takes the top token
    assert "".join(lp.tokens) == r.choices[0].text
    c = srv.client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, temperature=0, logprobs=True,
                                           top_logprobs=3, extra_body={"ignore_eos": True})
    content = c.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 3 for t in content)
    # streamed logprobs arrive with their tokens
    chunks = list(srv.client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, temperature=0,
                                                     logprobs=True, stream=True, extra_body={"ignore_eos": True}))
    streamed = [t.logprob for ch in chunks if ch.choices and ch.choices[0].logprobs
                for t in ch.choices[0].logprobs.content]
    assert streamed == pytest.approx([t.logprob for t in content])


def test_echo_logprobs_for_loglikelihood(srv):
    """lm-evaluation-harness local-completions' log-likelihood request (0.4.x: token-id prompts in a batch, echo,
    logprobs 1, max_tokens 1; it reads token_logprobs[ctxlen:-1] and compares each with max(top_logprobs)), and
    max_tokens 0 (OpenAI's legacy API, older harnesses): the prompt's logprobs only."""
    for max_tokens in (1, 0):
        r = srv.http.post("/v1/completions", json={"model": MODEL, "prompt": ECHO_PROMPTS, "temperature": 0,
                                                   "max_tokens": max_tokens, "logprobs": 1, "seed": 1234,
                                                   "echo": True})
        assert r.status_code == 200, r.text
        body = r.json()
        choices = sorted(body["choices"], key=lambda c: c["index"])
        assert body["usage"]["completion_tokens"] == max_tokens * len(ECHO_PROMPTS)
        for prompt, ch, ref in zip(ECHO_PROMPTS, choices, srv.echo_ref):
            lp = ch["logprobs"]
            n = len(prompt) + max_tokens
            assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == n
            assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
            for j in range(1, len(prompt)):
                assert lp["token_logprobs"][j] == pytest.approx(ref.prompt_logprobs[j][prompt[j]], abs=1e-5)
                top = lp["top_logprobs"][j]
                assert len(top) == 1 and max(top.values()) >= lp["token_logprobs"][j] - 1e-6
            assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:k]) for k in range(n)]
            if max_tokens:
                gen = ref.outputs[0]
                assert lp["token_logprobs"][-1] == pytest.approx(gen.logprobs[0][gen.token_ids[0]], abs=1e-5)
                assert ch["text"].endswith(gen.text)
            else:
                assert ch["text"] == srv.llm.engine.tokenizer.decode(prompt)
    # vLLM's extra `prompt_logprobs`: a top-level list per choice (chat too)
    r = srv.http.post("/v1/completions", json={"model": MODEL, "prompt": ECHO_PROMPTS[1], "max_tokens": 2,
                                               "temperature": 0, "prompt_logprobs": 1})
    plp = r.json()["choices"][0]["prompt_logprobs"]
    assert plp[0] is None and len(plp) == len(ECHO_PROMPTS[1])
    assert plp[1][str(ECHO_PROMPTS[1][1])]["logprob"] == pytest.approx(
        srv.echo_ref[1].prompt_logprobs[1][ECHO_PROMPTS[1][1]], abs=1e-5)
    r = srv.http.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "max_tokens": 2,
                                                    "prompt_logprobs": 0})
    body = r.json()
    assert len(body["choices"][0]["prompt_logprobs"]) == body["usage"]["prompt_tokens"]
    _assert_serving(srv)


def test_stop_seed_n(srv):
    full = srv.ref["stop"]
    stop = full[3:6]
    r = srv.client.completions.create(model=MODEL, prompt="the quick brown", max_tokens=24, temperature=0,
                                      stop=[stop], extra_body={"ignore_eos": True})
    assert r.choices[0].text == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in srv.client.completions.create(
        model=MODEL, prompt="the quick brown", max_tokens=24, temperature=0, stop=stop, stream=True,
        extra_body={"ignore_eos": True}))
    assert streamed == r.choices[0].text
    kw = dict(model=MODEL, prompt="Hello there", max_tokens=12, temperature=1.0, seed=7,
              extra_body={"ignore_eos": True})
    a, b = srv.client.completions.create(**kw), srv.client.completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text
    n = srv.client.completions.create(n=3, **kw)
    assert [c.index for c in n.choices] == [0, 1, 2]
    assert n.choices[0].text == a.choices[0].text  # sample i uses seed + i
    assert len({c.text for c in n.choices}) == 3
    assert n.usage.completion_tokens == 36
    two = srv.client.completions.create(model=MODEL, prompt=["the quick brown", "Hello there"], max_tokens=8,
                                        temperature=0, extra_body={"ignore_eos": True})
    assert [c.index for c in two.choices] == [0, 1] and two.choices[1].text == srv.ref["hello"].outputs[0].text


def test_priority_field_and_header(srv):
    body = dict(model=MODEL, prompt="Hello there", max_tokens=8, temperature=0, ignore_eos=True)
    assert srv.http.post("/v1/completions", json={**body, "priority": "batch"}).status_code == 200
    r = srv.http.post("/v1/completions", json=body, headers={"X-Priority": "batch"})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == srv.ref["hello"].outputs[0].text
    bad = srv.http.post("/v1/completions", json={**body, "priority": "urgent"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "priority"
    assert srv.http.post("/v1/completions", json=body, headers={"X-Priority": "soon"}).status_code == 400


# ------------------------------------------------------------------------------------------ errors
def _err(r, status, code=None, param=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err


def test_bad_requests_get_4xx_and_server_keeps_serving(srv):
    h, url = srv.http, "/v1/completions"
    good = dict(model=MODEL, prompt="hi", max_tokens=4)
    _err(h.post(url, content=b"{not json", headers={"Content-Type": "application/json"}), 400, "invalid_json")
    _err(h.post(url, content=b"[1, 2]"), 400)
    _err(h.post(url, json={**good, "max_tokens": "ten"}), 400, "invalid_type", "max_tokens")
    _err(h.post(url, json={**good, "prompt": 5}), 400, "invalid_type", "prompt")
    _err(h.post(url, json={**good, "temperature": "hot"}), 400, "invalid_type", "temperature")
    _err(h.post(url, json={**good, "temperature": -1}), 400, None, "temperature")
    _err(h.post(url, json={**good, "n": 0}), 400, None, "n")
    _err(h.post(url, json={**good, "stream": "yes"}), 400, None, "stream")
    _err(h.post(url, json={**good, "prompt": ""}), 400, "invalid_prompt")
    _err(h.post(url, json={**good, "prompt": [1, 2, 10 ** 9]}), 400, "invalid_prompt")
    _err(h.post("/v1/chat/completions", json={"model": MODEL, "messages": "hi"}), 400, None, "messages")
    _err(h.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}),
         400, None, "messages[0].role")
    _err(h.post(url, json={**good, "model": "gpt-9"}), 404, "model_not_found")
    _err(h.post(url, content=b'{"prompt": "' + b"a" * (MAX_BODY + 10) + b'"}'), 413, "request_too_large")
    _err(h.post(url, json={**good, "prompt": list(range(3, 3 + MAX_PROMPT + 1))}), 400, "context_length_exceeded")
    _err(h.post(url, json={**good, "prompt": "word " * 600}), 400, "context_length_exceeded")
    _err(h.post(url, json={**good, "max_tokens": MAX_TOKENS + 1}), 400, None, "max_tokens")
    _err(h.post(url, json={**good, "logit_bias": {"5": 300}}), 400, None, "logit_bias")
    _err(h.post(url, json={**good, "logit_bias": [5]}), 400, "invalid_type", "logit_bias")
    _err(h.post(url, json={**good, "allowed_token_ids": [10 ** 9]}), 400)
    _err(h.post("/tokenize", json={"prompt": 5}), 400, "invalid_type", "prompt")
    _err(h.post("/detokenize", json={"tokens": [-1]}), 400, None, "tokens")
    _err(h.post("/v1/nothing", json=good), 404)
    _err(h.post(url, json=good, headers={"Authorization": ""}), 401, "invalid_api_key")
    _err(httpx.post(srv.url + url, json=good), 401, "invalid_api_key")
    _err(httpx.post(srv.url + url, json=good, headers={"Authorization": "Bearer wrong"}), 401, "invalid_api_key")
    _err(httpx.get(srv.url + "/v1/models"), 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=srv.url + "/v1", api_key="nope", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError):
        srv.client.completions.create(model=MODEL, prompt="hi", max_tokens=-1)
    _assert_serving(srv)
    assert not srv.llm.engine.requests  # nothing half-queued by the rejected requests
    m = _metrics(srv)
    assert m['jaxserve_http_requests_total{endpoint="/v1/completions",status="400"}'] >= 10


def _wait_idle(srv, before, aborted):
    """Poll /metrics until the engine is idle; check `aborted` more requests were aborted since `before`."""
    deadline = time.monotonic() + 10
    while True:
        m = _metrics(srv)
        idle = (m["jaxserve_kv_pages_used"] == 0 and m["jaxserve_requests_running"] == 0
                and m['jaxserve_requests_waiting{priority="interactive"}'] == 0
                and m["jaxserve_http_requests_in_flight"] == 0)
        n_aborted = m["jaxserve_requests_aborted_total"] - before.get("jaxserve_requests_aborted_total", 0)
        if (idle and n_aborted >= aborted) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert idle and n_aborted == aborted, (n_aborted, m)
    assert m["jaxserve_client_disconnects_total"] - before.get("jaxserve_client_disconnects_total", 0) == aborted
    return m


def test_client_leaving_a_non_streaming_request_aborts_it(srv):
    before = _metrics(srv)
    # Hold the engine thread so the client surely leaves (after its request is read) before any token exists.
    srv.app.state.jaxserve.loop._inbox.put(lambda: time.sleep(2.0))
    with pytest.raises(httpx.ReadTimeout):
        srv.http.post("/v1/completions", json=dict(model=MODEL, prompt="Hello there", max_tokens=60, n=2,
                                                   ignore_eos=True), timeout=1.0)
    _wait_idle(srv, before, aborted=1)
    _assert_serving(srv)


# ------------------------------------------------------------------------------------------ load
async def _client(http, i, leave):
    body = dict(model=MODEL, prompt=_load_prompt(i), max_tokens=60 if leave else 6 + i % 7, temperature=0,
                ignore_eos=True, stream=True)
    text, chunks, done = "", 0, False
    async with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            ch = json.loads(line[6:])
            text += ch["choices"][0]["text"]
            chunks += 1
            if leave and chunks >= 2:
                return None  # leave mid-stream: closing the response drops the connection
    assert done
    return text


async def _load(srv):
    limits = httpx.Limits(max_connections=N_LOAD + 8, max_keepalive_connections=N_LOAD + 8)
    async with httpx.AsyncClient(base_url=srv.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120,
                                 limits=limits) as http:
        leave = set(range(3, N_LOAD, N_LOAD // N_LEAVE))
        clients = [_client(http, i, i in leave) for i in range(N_LOAD)]
        bad = [_bad_client(http, k) for k in range(8)]  # bad input while the others stream
        results = await asyncio.gather(*clients, *bad)
        return leave, results[:N_LOAD]


async def _bad_client(http, k):
    await asyncio.sleep(0.01 * k)
    bodies = [b"{", json.dumps({"model": MODEL, "prompt": list(range(3, 3 + MAX_PROMPT + 1))}).encode(),
              json.dumps({"model": MODEL, "prompt": "x", "temperature": -2}).encode(),
              json.dumps({"model": MODEL, "prompt": [1, 10 ** 9], "stream": True}).encode()]
    r = await http.post("/v1/completions", content=bodies[k % len(bodies)])
    assert r.status_code == 400, r.text


def test_concurrent_streams_with_disconnects(srv):
    before = _metrics(srv)
    leave, texts = asyncio.run(_load(srv))
    assert len(leave) == N_LEAVE
    for i, text in enumerate(texts):
        if i not in leave:
            assert text == srv.load_ref[i], f"client {i}"
    # The leavers' requests were aborted (pages freed); once idle, no page is held and nothing is queued.
    m = _wait_idle(srv, before, aborted=N_LEAVE)
    assert m["jaxserve_time_to_first_token_seconds_count"] >= N_LOAD - N_LEAVE
    assert m["jaxserve_generation_tokens_total"] > 0 and m["jaxserve_kv_pages_total"] == 255
    assert m["jaxserve_step_device_seconds_total"] > 0 and m["jaxserve_step_host_seconds_total"] > 0
    _assert_serving(srv)


# ------------------------------------------------------------------------------------------ shutdown (last)
def test_sigterm_drains_in_flight_requests(srv):
    """uvicorn's SIGTERM handler (`handle_exit`) stops accepting connections, lets the running stream finish,
    then the engine thread stops with nothing left in the engine."""
    body = dict(model=MODEL, prompt="Hello there", max_tokens=40, temperature=0, ignore_eos=True, stream=True,
                stream_options={"include_usage": True})
    text, done, usage = "", False, None
    with httpx.stream("POST", srv.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60) as r:
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            ch = json.loads(line[6:])
            if not ch["choices"]:
                usage = ch["usage"]
                continue
            if not text:
                # Hold the engine thread for a moment so the stream is surely unfinished while shutdown starts.
                srv.app.state.jaxserve.loop._inbox.put(lambda: time.sleep(1.5))
                srv.server.handle_exit(signal.SIGTERM, None)  # what uvicorn installs for SIGTERM
                deadline = time.monotonic() + 1.0
                while True:  # new connections are refused while this one drains
                    try:
                        httpx.get(srv.url + "/health", timeout=0.5)
                    except httpx.TransportError:
                        break
                    assert time.monotonic() < deadline, "still accepting connections after SIGTERM"
                    time.sleep(0.02)
                assert srv.thread.is_alive()
            text += ch["choices"][0]["text"]
    assert done and usage["completion_tokens"] == 40
    assert text.startswith(srv.ref["hello"].outputs[0].text)
    srv.thread.join(30)
    assert not srv.thread.is_alive()
    eng = srv.llm.engine
    assert not eng.has_unfinished_requests() and not eng.requests and eng.bm.stats()["used"] == 0


# ------------------------------------------------------------------------------------------ protocol only
class _StubEngine:
    """Just what `OpenAIServing` reads from an engine (no model, no compile)."""

    def __init__(self):
        import types

        from jaxserve.weights.tokenizer import make_random_model_tokenizer

        self.tokenizer = make_random_model_tokenizer(512, bos_id=1, eos_ids=(2,), chat_template="llama3")
        self.max_model_len = 256
        self.cfg = types.SimpleNamespace(max_logprobs=5)
        self.model_cfg = types.SimpleNamespace(vocab_size=512, name="stub")

    def tokenize_prompt(self, prompt):
        from jaxserve.engine.engine import LLMEngine

        return LLMEngine.tokenize_prompt(self, prompt)


def test_protocol_prompt_logprobs_parsing():
    from jaxserve.server.protocol import APIError, OpenAIServing

    sv = OpenAIServing(_StubEngine(), ["stub"])
    r = sv.parse("completion", {"prompt": "x", "echo": True, "logprobs": 2})
    assert r.params.prompt_logprobs == 2 and r.params.logprobs == 2 and not r.echo_only
    r = sv.parse("completion", {"prompt": "x", "echo": True, "logprobs": 1, "max_tokens": 0})
    assert r.echo_only and r.params.max_tokens == 1 and r.params.prompt_logprobs == 1
    r = sv.parse("completion", {"prompt": "x", "echo": True, "max_tokens": 0})  # the echo alone
    assert r.echo_only and r.params.prompt_logprobs is None
    assert sv.parse("completion", {"prompt": "x", "echo": True}).params.prompt_logprobs is None
    r = sv.parse("chat", {"messages": [{"role": "user", "content": "x"}], "prompt_logprobs": 3})
    assert r.prompt_logprobs == 3 and r.params.prompt_logprobs == 3
    for kind, body, param in [
        ("completion", {"prompt": "x", "max_tokens": 0}, "max_tokens"),  # nothing to return
        ("completion", {"prompt": "x", "echo": True, "max_tokens": 0, "stream": True}, "stream"),
        ("completion", {"prompt": "x", "echo": True, "logprobs": 1, "stream": True}, "stream"),
        ("completion", {"prompt": "x", "prompt_logprobs": 6}, "prompt_logprobs"),  # max_logprobs 5
        ("completion", {"prompt": "x", "prompt_logprobs": -1}, "prompt_logprobs"),
        ("chat", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
        ("chat", {"messages": [{"role": "user", "content": "x"}], "prompt_logprobs": 1, "stream": True}, "stream"),
    ]:
        with pytest.raises(APIError) as e:
            sv.parse(kind, body)
        assert e.value.status == 400 and e.value.param == param, (body, e.value.body())


def test_protocol_parsing_and_shaping():
    from jaxserve.engine.outputs import CompletionOutput, RequestOutput
    from jaxserve.server.protocol import APIError, OpenAIServing, StreamState

    sv = OpenAIServing(_StubEngine(), ["stub"])
    r = sv.parse("completion", {"prompt": [[5, 6], [7, 8, 9]], "n": 2, "seed": 2 ** 40 + 3, "echo": True})
    assert r.prompts == [[5, 6], [7, 8, 9]] and r.num_choices == 4 and r.params.seed == 3 and r.params.max_tokens == 16
    outs = [RequestOutput(f"x-{i}", None, p, [CompletionOutput(j, f"o{i}{j}", [10 + j], finish_reason="length")
                                                 for j in range(2)], True) for i, p in enumerate(r.prompts)]
    body = sv.response(r, outs, "cmpl-1")
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["choices"][3]["text"] == sv.tokenizer.decode([7, 8, 9]) + "o11"  # echo
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}
    st = StreamState(sv, r, "cmpl-1")
    assert len(st.first_chunks()) == 4  # the echoed prompts
    chunks = st.update(1, outs[1]) + st.update(0, outs[0])
    assert sorted(c["choices"][0]["index"] for c in chunks) == [0, 1, 2, 3] and st.all_finished
    chat = sv.parse("chat", {"messages": [{"role": "developer", "content": "be brief"},
                                          {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                             "logprobs": True, "top_logprobs": 2, "priority": 1})
    assert "system" in sv.tokenizer.decode(chat.prompts[0]) and chat.logprobs == 2 and chat.priority == "batch"
    assert chat.params.max_tokens is None  # chat: up to the context
    for kind, body, param in [
        ("chat", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
        ("completion", {"prompt": "x", "best_of": 3}, "best_of"),
        ("chat", {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools[0]"),
        ("chat", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
        ("completion", {"prompt": "x", "logprobs": 6}, "logprobs"),
        ("completion", {"prompt": "x", "stop_token_ids": [600]}, "stop_token_ids"),
        ("completion", {"prompt": "x", "max_tokens": 1.5}, "max_tokens"),
        ("completion", {"prompt": "x", "temperature": True}, "temperature"),
    ]:
        with pytest.raises(APIError) as e:
            sv.parse(kind, body)
        assert e.value.status == 400 and e.value.param == param, (body, e.value.body())
