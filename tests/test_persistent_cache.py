"""A second start loads every engine program from JAX's persistent compilation cache.

Each start runs in a fresh subprocess (the cache is per machine, compiled programs are per process), with a
private cache directory, so this says nothing about the rest of the session's engines.
"""

import json
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import json, jax
    events = {}
    jax.monitoring.register_event_listener(lambda e, **kw: events.__setitem__(e, events.get(e, 0) + 1))
    from jaxserve import LLM, SamplingParams
    llm = LLM("tiny-gemma3", random_weights=True, page_size=4, max_model_len=64, max_num_seqs=2,
              max_num_batched_tokens=16, max_prefill_seqs=1, num_pages=64, attn_block_pages=4)
    out = llm.generate([[5, 6, 7, 8, 9]], SamplingParams(max_tokens=6, temperature=0.0), use_tqdm=False)
    print("RESULT " + json.dumps({"tokens": out[0].outputs[0].token_ids,
                                  "programs": len(llm.engine.runner.buckets()),
                                  "hits": events.get("/jax/compilation_cache/cache_hits", 0),
                                  "misses": events.get("/jax/compilation_cache/cache_misses", 0)}))
""")


def _start(cache_dir):
    env = dict(os.environ, JAXSERVE_CACHE=str(cache_dir), JAXSERVE_XLA_CACHE="1")
    env.pop("JAXSERVE_XLA_CACHE_DIR", None)  # (the CI runner's shared one)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def test_second_start_loads_engine_programs_from_cache(tmp_path):
    cold = _start(tmp_path)
    assert cold["hits"] == 0
    assert os.listdir(tmp_path / "xla"), "the first start wrote nothing to the persistent cache"
    warm = _start(tmp_path)
    assert warm["tokens"] == cold["tokens"]
    # every engine program (one per bucket) is a cache hit on the second start
    assert warm["hits"] >= warm["programs"] > 0, warm


def test_cache_can_be_turned_off(tmp_path):
    env = dict(os.environ, JAXSERVE_CACHE=str(tmp_path), JAXSERVE_XLA_CACHE="0")
    env.pop("JAXSERVE_XLA_CACHE_DIR", None)
    code = "from jaxserve.engine.runner import enable_persistent_cache as e; print(e())"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "None"
    assert not (tmp_path / "xla").exists()
