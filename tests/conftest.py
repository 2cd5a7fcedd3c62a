"""Shared fixtures: one compiled engine per (model, settings) per test session.

Compiling a program set takes seconds, so engines are cached here and reused by every test that asks for
the same configuration. Tests must leave the engine idle (no unfinished requests) when they return.
"""

import contextlib
import os
import sys

import pytest

if os.environ.get("CI") and "JAXSERVE_CACHE" not in os.environ:
    # CI starts from an empty converted-checkpoint and compilation cache of its own: a cache shared with
    # other processes on the machine was once seen torn (an XLA abort while reading an entry).
    import tempfile

    os.environ["JAXSERVE_CACHE"] = tempfile.mkdtemp(prefix="jaxserve-ci-cache-")
# The test session shares compiled engines in memory (below), so it needs no persistent compilation cache;
# tests/test_persistent_cache.py checks that cache in subprocesses of its own.
os.environ.setdefault("JAXSERVE_XLA_CACHE", "0")
os.environ.setdefault("JAXSERVE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "jaxserve"))

_ENGINES: dict = {}

# Small ladders keep tiny-model compiles to a few seconds; page_size 4 makes sequences cross many pages.
TINY_KW = dict(page_size=4, max_model_len=256, max_num_seqs=8, max_num_batched_tokens=64, max_prefill_seqs=4,
               num_pages=512, attn_block_pages=4)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's caches of compiled programs after each test module.

    Each live XLA:CPU executable holds its JIT code in its own anonymous memory mappings (3 to 12 for a small
    interpreted Pallas kernel), and JAX's caches keep every program a process compiled alive. A one-process
    run of many modules grows the mapping table without bound (the Pallas modules alone reach ~20,000); at
    vm.max_map_count (65,530) LLVM fails with "Cannot allocate memory" and XLA segfaults raising the error.
    Engines are not affected: their programs are compiled ahead of time and held by the runner, not the cache.
    """
    yield
    # Real-model engines (a gigabyte or more each) are not kept past their module: in one-process runs
    # (scripts/run_tests.py) they would otherwise add up; the tiny engines are shared by the whole session.
    for key in [k for k in _ENGINES if not k[0].startswith("tiny-")]:
        del _ENGINES[key]
    if "jax" in sys.modules:  # host-only modules never import JAX; don't do it for them
        import gc

        gc.collect()
        sys.modules["jax"].clear_caches()


def get_llm(model: str, **kw):
    from jaxserve import LLM

    key = (model, tuple(sorted(kw.items())))
    if key not in _ENGINES:
        random_weights = kw.pop("random_weights", model.startswith("tiny-"))
        _ENGINES[key] = LLM(model, random_weights=random_weights, **kw)
    llm = _ENGINES[key]
    assert not llm.engine.has_unfinished_requests(), "a previous test left requests in the engine"
    return llm


@pytest.fixture(scope="session")
def llm_factory():
    return get_llm


@pytest.fixture(scope="session")
def tiny_llama():
    return get_llm("tiny-llama", **TINY_KW)


@pytest.fixture(scope="session")
def tiny_gemma3():
    return get_llm("tiny-gemma3", **TINY_KW)


@pytest.fixture(scope="module")
def gemma():
    """The real Gemma 3 270M, shared by the slow tests of a module (freed after it, see above)."""
    return get_llm("gemma3-270m", max_model_len=1024, max_num_seqs=8, num_pages=1024)


@contextlib.contextmanager
def serve_in_thread(llm, name: str, timeout: float = 60.0):
    """A real uvicorn server over `llm` (build_app, as `jaxserve serve` runs it) on a free 127.0.0.1 port, in a
    daemon thread; yields its base URL ("http://127.0.0.1:PORT") and shuts it down on exit."""
    import socket
    import threading
    import time

    import uvicorn

    from jaxserve.server.app import build_app

    app = build_app(llm, served_model_names=[name])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(30)
