"""Offline batch jobs (`jaxserve batch`, `scripts/batch_generate.py`): malformed lines get error result lines,
and a job killed with SIGKILL and run again answers every custom_id exactly once, with the results of an
uninterrupted run.

The jobs run as subprocesses on a tiny random model with the persistent compilation cache on (as the CLI runs
by default), so only the first start compiles. `batch_invariant` makes greedy outputs independent of which
requests share a step, so the resumed run (different batches) must equal the uninterrupted one exactly.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from jaxserve.batch import _Appender, line_id, recover_output
from jaxserve.errors import JaxserveError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENGINE_ARGS = ["--model", "tiny-llama", "--random-weights", "--page-size", "4", "--max-model-len", "128",
               "--max-num-seqs", "4", "--max-num-batched-tokens", "16", "--max-prefill-seqs", "1",
               "--min-prefill-tokens", "16", "--num-pages", "256", "--attn-block-pages", "4", "--batch-invariant"]
N_GOOD = 48


def _line(cid, body, url="/v1/completions"):
    return json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body})


def _input_lines():
    lines = []
    for i in range(N_GOOD):
        body = {"model": "tiny-llama", "prompt": f"request {i}: tell me about {i * 3 % 11}", "max_tokens": 40 + i % 20,
                "temperature": 0, "ignore_eos": True}
        lines.append(_line(f"req-{i}", body))
        if i == 5:
            lines += [
                "this is not json",
                json.dumps({"method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}),  # no custom_id
                "[1, 2, 3]",
                "",  # blank: ignored
                _line("req-2", {"prompt": "duplicate"}),
                _line("bad-url", {"prompt": "x"}, url="/v1/embeddings"),
                _line("bad-temp", {"prompt": "x", "temperature": -1}),
                _line("too-long", {"prompt": list(range(3, 3 + 200))}),
                _line("bad-model", {"model": "gpt-9", "prompt": "x"}),
                _line("chat", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0},
                      url="/v1/chat/completions"),
                _line("sampled-n", {"prompt": "pick", "n": 2, "temperature": 1.0, "max_tokens": 12,
                                    "ignore_eos": True}),  # no seed: seeded from the custom_id
            ]
    return lines


def _run(args, env_extra=None, wait=True, script=False):
    # No persistent compilation cache: JAX writes its entries non-atomically, so a run killed with SIGKILL
    # mid-write could leave a torn entry for the next process to read.
    env = dict(os.environ, JAXSERVE_XLA_CACHE="0", **(env_extra or {}))
    cmd = ([sys.executable, os.path.join(ROOT, "scripts", "batch_generate.py")] if script
           else [sys.executable, "-m", "jaxserve.cli", "batch"]) + ENGINE_ARGS + args
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _read(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _by_key(results):
    """custom_id (or result id, for lines without a usable custom_id) -> what must not change on resume."""
    out = {}
    for r in results:
        key = r["custom_id"] if r["custom_id"] is not None else r["id"]
        assert key not in out, f"{key} answered twice"
        if r["response"] is None:
            out[key] = ("error", r["error"]["code"])
        else:
            body = r["response"]["body"]
            choices = [(c.get("text", c.get("message", {}).get("content")), c["finish_reason"])
                       for c in body.get("choices", [])]
            out[key] = (r["response"]["status_code"], choices, body.get("usage"), body.get("error"))
    return out


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    d = tmp_path_factory.mktemp("batch")
    inp = d / "in.jsonl"
    inp.write_text("\n".join(_input_lines()) + "\n")
    ref = d / "ref.jsonl"
    proc = _run(["--input", str(inp), "--output", str(ref), "--summary-json", str(d / "summary.json")])
    return d, inp, ref, proc


def test_malformed_lines_get_error_results(job):
    d, inp, ref, proc = job
    results = _read(ref)
    res = _by_key(results)
    n_input = sum(1 for line in inp.read_text().splitlines() if line.strip())
    assert len(results) == n_input  # every non-blank line answered once (blank lines ignored)
    assert sorted(k for k in res if k.startswith("req-")) == sorted(f"req-{i}" for i in range(N_GOOD))
    errors = {r["error"]["code"] for r in results if r["error"]}
    assert errors == {"invalid_json_line", "invalid_custom_id", "duplicate_custom_id", "invalid_url"}
    dup = [r for r in results if r["error"] and r["error"]["code"] == "duplicate_custom_id"]
    assert len(dup) == 1 and dup[0]["custom_id"] is None and "req-2" in dup[0]["error"]["message"]
    assert res["bad-url"] == ("error", "invalid_url")
    bad = {r["custom_id"]: r["response"] for r in results if r["custom_id"] in ("bad-temp", "too-long", "bad-model")}
    assert bad["bad-temp"]["status_code"] == 400 and bad["bad-temp"]["body"]["error"]["param"] == "temperature"
    assert bad["too-long"]["body"]["error"]["code"] == "context_length_exceeded"
    assert bad["bad-model"]["status_code"] == 404
    ok = {r["custom_id"]: r["response"] for r in results if r["response"] and r["response"]["status_code"] == 200}
    assert ok["chat"]["body"]["object"] == "chat.completion"
    assert [c["index"] for c in ok["sampled-n"]["body"]["choices"]] == [0, 1]
    body = ok["req-7"]["body"]
    assert body["object"] == "text_completion" and body["usage"]["completion_tokens"] == 40 + 7 % 20
    assert body["choices"][0]["finish_reason"] == "length" and body["choices"][0]["text"]
    summary = json.loads((d / "summary.json").read_text())
    assert summary["duplicates"] == 1 and summary["duplicate_custom_ids"] == ["req-2"]
    assert summary["succeeded"] == N_GOOD + 2 and summary["generation_tokens"] > 0
    assert "tok_s=" in proc.stderr and "generated tok/s" in proc.stderr  # progress bar and final summary


def test_resume_after_sigkill(job):
    d, inp, ref, _ = job
    out = d / "out.jsonl"
    # Killed partway (SIGKILL: no cleanup of any kind), by the script entry point.
    p = _run(["--input", str(inp), "--output", str(out), "--no-progress"], wait=False, script=True)
    deadline = time.monotonic() + 300
    try:
        while True:
            n_ok = out.read_text().count('"status_code":200') if out.exists() else 0
            if n_ok >= 8 or p.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.005)
        p.send_signal(signal.SIGKILL)
        p.wait(30)
    finally:
        p.stdout.close()
        p.stderr.close()
    assert p.returncode == -signal.SIGKILL, "the job ended before it could be killed"
    partial = _read(out)
    assert 8 <= len(partial) < len(_read(ref))
    with open(out, "a") as f:  # as if the kill had landed mid-write
        f.write('{"id": "batch_req_99999999", "custom_id": "req-4', )
    # Run again (the `jaxserve batch` entry point): finishes the job.
    proc = _run(["--input", str(inp), "--output", str(out), "--no-progress"])
    assert "torn last line" in proc.stderr
    final = _read(out)
    assert final[: len(partial)] == partial  # nothing answered before was rewritten
    assert _by_key(final) == _by_key(_read(ref))  # each custom_id once, same results as uninterrupted
    assert len({r["id"] for r in final}) == len(final)


# ---------------------------------------------------------------------------------- no engine needed
def test_recover_output_cuts_torn_line_and_keeps_good_ones(tmp_path):
    path = tmp_path / "out.jsonl"
    good = [{"id": line_id(1), "custom_id": "a", "response": None, "error": None},
            {"id": line_id(2), "custom_id": None, "response": None, "error": {"code": "x", "message": "y"}}]
    body = "".join(json.dumps(g) + "\n" for g in good)
    path.write_text(body + "not json\n" + '{"id": "batch_req_3", "cus')
    info = recover_output(str(path))
    assert info["custom_ids"] == {"a"} and info["ids"] == {line_id(2)}
    assert info["torn_bytes"] == len('{"id": "batch_req_3", "cus') and info["bad_lines"] == 1
    assert path.read_text() == body + "not json\n"
    assert recover_output(str(tmp_path / "missing.jsonl"))["custom_ids"] == set()


def test_output_is_locked_against_a_second_job(tmp_path):
    path = str(tmp_path / "out.jsonl")
    first = _Appender(path, 1.0)
    try:
        with pytest.raises(JaxserveError, match="locked"):
            _Appender(path, 1.0)
    finally:
        first.close()
    _Appender(path, 1.0).close()  # free again
