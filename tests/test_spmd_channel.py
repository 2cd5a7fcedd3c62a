"""The multi-host step stream (jaxserve/parallel/spmd.py) in one process: a leader engine mirrors every step
through an in-memory stand-in for the jax.distributed key-value store, a second engine with the same weights
follows it, and the follower's KV cache ends bit-identical to the leader's. This checks that every program the
engine runs (prefill, decode, the prompt-logprob scorer, sampled and greedy rows) goes through the mirror with
all it needs; tests/test_spmd_serving.py runs the real thing across processes."""

from __future__ import annotations

import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.parallel.spmd import ProcessGroupFailed, StepChannel
from tests.conftest import TINY_KW, get_llm


class FakeKV:
    """The subset of jax.distributed's client the channel uses, in memory (thread-safe).

    Across processes a step's collectives cannot finish before every follower has read that step's message, so
    process 0 deletes it safely once its own step is done; in one process nothing ties the two engines together,
    so `key_value_delete` waits here until the followers have read the key (what the collectives guarantee)."""

    def __init__(self, parties: int):
        self.store: dict = {}
        self.reads: dict = {}
        self.followers = parties - 1
        self.cond = threading.Condition()
        self.barrier = threading.Barrier(parties)
        self.max_keys = 0

    def key_value_set_bytes(self, key, value):
        with self.cond:
            self.store[key] = bytes(value)
            self.max_keys = max(self.max_keys, sum(k.startswith("jaxserve/spmd/step/") for k in self.store))
            self.cond.notify_all()

    def key_value_delete(self, key):
        with self.cond:
            assert self.cond.wait_for(lambda: self.reads.get(key, 0) >= self.followers, 60), f"{key} never read"
            self.store.pop(key, None)

    def blocking_key_value_get_bytes(self, key, timeout_ms):
        with self.cond:
            if not self.cond.wait_for(lambda: key in self.store, timeout_ms / 1000):
                raise RuntimeError(f"DEADLINE_EXCEEDED: GetKeyValue() timed out with key: {key}")
            self.reads[key] = self.reads.get(key, 0) + 1
            self.cond.notify_all()
            return self.store[key]

    def key_value_try_get_bytes(self, key):
        with self.cond:
            if key not in self.store:
                raise RuntimeError(f"NOT_FOUND: {key}")
            return self.store[key]

    def key_value_increment(self, key, increment):
        with self.cond:
            n = int(self.store.get(key, b"0")) + increment
            self.store[key] = str(n).encode()
            return n

    def wait_at_barrier(self, barrier_id, timeout_ms, process_ids=None):
        self.barrier.wait(timeout_ms / 1000)


@pytest.fixture(scope="module")
def pair():
    leader = get_llm("tiny-gemma3", **TINY_KW)
    follower = LLM("tiny-gemma3", random_weights=True, **TINY_KW)
    return leader, follower


def test_follower_kv_cache_matches_leader(pair):
    leader, follower = pair
    # The follower starts from the leader's cache (the shared leader engine has served other tests).
    follower.engine.runner.kv = jax.tree.map(jnp.copy, leader.engine.runner.kv)
    kv = FakeKV(2)
    lead = StepChannel(leader.engine, client=kv, process_id=0, num_processes=2, poll_s=0.2)
    follow = StepChannel(follower.engine, client=kv, process_id=1, num_processes=2, poll_s=0.2)
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("rc", follow.follow()), daemon=True)
    t.start()
    lead.lead()
    try:
        prompts = ["the quick brown fox " * 6, "hello", "one two three four five six seven eight nine ten " * 3]
        params = [SamplingParams(temperature=0, max_tokens=9, prompt_logprobs=1),
                  SamplingParams(temperature=0.8, seed=3, max_tokens=20, ignore_eos=True),
                  SamplingParams(temperature=0, max_tokens=12, logprobs=2)]
        outs = leader.generate(prompts, params, use_tqdm=False)
        assert [len(o.outputs[0].token_ids) for o in outs][1] == 20
        assert outs[0].prompt_logprobs is not None
        steps = lead.steps
        assert steps > 3
    finally:
        lead.close()
    t.join(60)
    assert result.get("rc") == 0 and follow.steps == steps
    assert kv.max_keys <= 2  # step n - 1's message goes once step n is sent
    lk, fk = jax.device_get(leader.engine.runner.kv), jax.device_get(follower.engine.runner.kv)
    for a, b in zip(jax.tree.leaves(lk), jax.tree.leaves(fk)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_silent_follower_fails_the_group(pair):
    leader, _ = pair
    kv = FakeKV(1)  # the follower never joins: only the leader waits at the barrier
    lead = StepChannel(leader.engine, client=kv, process_id=0, num_processes=2, heartbeat_s=0.05,
                       dead_after_s=0.3)
    lead.lead()
    try:
        deadline = time.monotonic() + 10
        while lead.health() is None:
            assert time.monotonic() < deadline, "a follower that never heartbeats was not reported"
            time.sleep(0.05)
        assert "process 1 of 2" in lead.health()
        rid = leader.engine.add_request("hello", SamplingParams(max_tokens=2))
        with pytest.raises(ProcessGroupFailed):
            leader.engine.step()
        leader.engine.abort_request(rid)
    finally:
        lead.close()
    assert leader.engine.runner.mirror is None
    assert not leader.engine.has_unfinished_requests()


def test_pipeline_rotation_calls_are_mirrored():
    """stage=2 engines on devices 0-1 (leader) and 2-3 (follower) of a 4-device subprocess: the rotating decode
    calls go through the stream too (program set -1), the follower's KV cache ends bit-identical (sabotage: a
    follower skipping them differs) and the leader's tokens equal one device's."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    p = subprocess.run([sys.executable, os.path.join(root, "tests", "spmd_rotation_check.py")], cwd=root, env=env,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["rotation_stages"] == 2 and res["stage_ticks"][0] > 0
    assert res["follower_rc"] == 0 and res["followed"] == res["steps"] > 10
    assert res["kv_identical"] and res["tokens_equal_one_device"], res
