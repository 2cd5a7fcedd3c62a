"""Two OS processes joined by jax.distributed (gloo CPU collectives on 127.0.0.1) run a model=2 engine whose
mesh spans one CPU device of each process; their greedy tokens must equal a plain single-process run's."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOGPROB_TOL = 1e-3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ)
    for k in ("XLA_FLAGS", "JAX_COORDINATOR_ADDRESS", "JAXSERVE_COORDINATOR_ADDRESS"):
        env.pop(k, None)
    env["JAXSERVE_XLA_CACHE"] = "0"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def test_two_processes_model_parallel_match_one_process():
    common = [sys.executable, os.path.join(ROOT, "tests", "parallel_check.py"), "--model", "tiny-llama",
              "--devices", "1", "--max-tokens", "8"]
    # The reference: one process, one device, no mesh.
    ref = subprocess.run(common, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert ref.returncode == 0, ref.stderr[-3000:]
    ref_tokens = json.loads(ref.stdout.strip().splitlines()[-1])["single"]["tokens"]

    addr = f"127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen(common + ["--mesh", "model=2", "--coordinator-address", addr, "--num-processes", "2",
                                        "--process-id", str(i)],
                              cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=1200)
            outs.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rc, out, err in outs:
        assert rc == 0, err[-3000:]
    res = json.loads(outs[0][1].strip().splitlines()[-1])  # process 0 reports
    assert res["processes"] == 2 and res["devices"] == 2
    e = res["layouts"]["model=2"]
    assert e["tokens"] == ref_tokens
    assert e["max_abs_logprob_diff"] < LOGPROB_TOL
    assert e["wq_sharding"] == "P(None, None, 'model')"
    # The decode program reduces across the two processes (row-parallel matmuls).
    assert e["hlo"]["collectives"]["all-reduce"] > 0 and e["hlo"]["weight_gathers"] == []
