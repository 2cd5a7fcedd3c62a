"""The runtime needs neither torch nor transformers: the README's `jaxserve generate` and `jaxserve serve` run
in subprocesses where both are made unimportable, from an empty cache (so the embedded GGUF is converted and
its tokenizer built from the file, the path that once imported torch through transformers).

The test environment has torch and transformers installed (reference tests use them), so they are hidden
the way an absent package looks: `sys.modules[name] = None` in a `sitecustomize` put on PYTHONPATH, which
makes `import torch` raise ModuleNotFoundError and `importlib.util.find_spec("torch")` return None.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

HIDDEN = ("torch", "transformers")
REFERENCE = os.path.join(os.path.dirname(__file__), "data", "gemma3_270m_hf_reference.json")


def _hf_case(name: str = "capital_france") -> dict:
    """HF transformers' greedy ids for one prompt (tests/data, made by scripts/make_hf_reference.py)."""
    with open(REFERENCE) as f:
        return next(p for p in json.load(f)["prompts"] if p["name"] == name)


PROMPT = _hf_case()["text"]


@pytest.fixture(scope="module")
def no_torch_env(tmp_path_factory):
    site = tmp_path_factory.mktemp("hide")
    (site / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in HIDDEN)
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["JAXSERVE_CACHE"] = str(tmp_path_factory.mktemp("cache"))  # empty: convert + build the tokenizer
    # JAXSERVE_XLA_CACHE as this process has it (off, or CI's shared JAXSERVE_XLA_CACHE_DIR)
    return env


def _jaxserve() -> list:
    exe = shutil.which("jaxserve", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-m", "jaxserve.cli"]


def test_hiding_works(no_torch_env):
    """The environment really lacks torch: otherwise the tests below would prove nothing."""
    code = "import importlib.util, sys\nassert importlib.util.find_spec('torch') is None\nimport torch"
    r = subprocess.run([sys.executable, "-c", code], env=no_torch_env, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr, r.stderr


@pytest.mark.slow
def test_generate_without_torch(no_torch_env):
    r = subprocess.run([*_jaxserve(), "generate", "--prompt", PROMPT, "--max-tokens", "8", "--json"],
                       env=no_torch_env, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    case = _hf_case()
    assert out["prompt_token_ids"] == case["prompt_ids"]  # the tokenizer built from the GGUF here
    assert out["output_token_ids"] == case["generated_ids"][:8], out  # HF's greedy tokens
    assert out["text"] == case["generated_text"][:len(out["text"])] and out["text"].strip()
    cache = no_torch_env["JAXSERVE_CACHE"]
    assert any("tokenizer.json" in files for _, _, files in os.walk(cache))  # built here, not read from a cache


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_serve_without_torch(no_torch_env, tmp_path):
    port = _free_port()
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([*_jaxserve(), "serve", "--port", str(port), "--max-model-len", "256",
                             "--max-num-seqs", "4", "--log-level", "warning"],
                            env=no_torch_env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 900
        while True:
            assert proc.poll() is None, f"server exited: {(tmp_path / 'serve.log').read_text()[-4000:]}"
            assert time.monotonic() < deadline, "server did not become healthy"
            try:
                with urllib.request.urlopen(base + "/health", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                time.sleep(2)
        body = json.dumps({"model": "gemma3-270m", "prompt": PROMPT, "max_tokens": 8, "temperature": 0}).encode()
        req = urllib.request.Request(base + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as resp:
            out = json.load(resp)
        case = _hf_case()
        text = out["choices"][0]["text"]
        assert out["choices"][0]["finish_reason"] == "length" and out["usage"]["completion_tokens"] == 8, out
        assert out["usage"]["prompt_tokens"] == len(case["prompt_ids"])
        assert text.strip() and case["generated_text"].startswith(text), out  # HF's greedy text
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
