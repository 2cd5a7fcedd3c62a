"""A pipeline's rotating decode calls through the multi-host step stream, in one process with 4 forced CPU devices
(run by tests/test_spmd_channel.py): a leader engine on `stage=2` over devices 0-1 mirrors every step (GPipe
prefills and rotation calls, program set -1) through the in-memory key-value store; a follower engine with the
same weights on devices 2-3 replays them. Prints one JSON line: steps sent and followed, the leader's stage-busy
ticks, whether both KV caches are bit-identical and the leader's tokens equal a one-device engine's.

    python tests/spmd_rotation_check.py
"""

from __future__ import annotations

import json
import os
import sys
import threading

os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4".strip()
os.environ.setdefault("JAXSERVE_XLA_CACHE", "0")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

KW = dict(page_size=4, max_model_len=128, max_num_seqs=4, max_num_batched_tokens=16, max_prefill_seqs=1,
          min_prefill_tokens=16, num_pages=96, attn_block_pages=4)
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], list(range(20, 45)), [99, 98, 97, 96], [3, 4, 5]]


def run(engine, params) -> list:
    ids = [engine.add_request(p, sp) for p, sp in zip(PROMPTS, params)]
    done = {}
    while engine.has_unfinished_requests():
        for ro in engine.step():
            if ro.finished:
                done[ro.request_id] = list(ro.outputs[0].token_ids)
    return [done[i] for i in ids]


def main() -> int:
    import jax
    import numpy as np

    from jaxserve.config import EngineConfig
    from jaxserve.parallel.engine import build_engine, compile_engine
    from jaxserve.parallel.spmd import StepChannel
    from jaxserve.sampling_params import SamplingParams
    from tests.test_spmd_channel import FakeKV

    def engine(mesh, devices):
        eng = build_engine("tiny-llama", EngineConfig(**KW), mesh, random_weights=True, devices=devices)[0]
        compile_engine(eng)
        return eng

    devs = jax.devices()
    leader, follower = engine("stage=2", devs[:2]), engine("stage=2", devs[2:4])
    params = [SamplingParams(temperature=0, max_tokens=10, ignore_eos=True) if i % 2 == 0
              else SamplingParams(temperature=0.8, seed=i, max_tokens=12, ignore_eos=True) for i in range(len(PROMPTS))]
    kv = FakeKV(2)
    lead = StepChannel(leader, client=kv, process_id=0, num_processes=2, poll_s=0.2)
    follow = StepChannel(follower, client=kv, process_id=1, num_processes=2, poll_s=0.2)
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("rc", follow.follow()), daemon=True)
    t.start()
    lead.lead()
    try:
        tokens = run(leader, params)
        steps = lead.steps
    finally:
        lead.close()
    t.join(120)
    same_kv = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
                  zip(jax.tree.leaves(jax.device_get(leader.runner.kv)),
                      jax.tree.leaves(jax.device_get(follower.runner.kv))))
    single = engine(None, devs[:1])
    print(json.dumps({"follower_rc": result.get("rc"), "steps": steps, "followed": follow.steps,
                      "rotation_stages": leader.runner.rotation_stages, "stage_ticks": leader.runner.stage_ticks,
                      "kv_identical": same_kv, "tokens_equal_one_device": tokens == run(single, params)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
