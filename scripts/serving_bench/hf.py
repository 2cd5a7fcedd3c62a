"""HF transformers' batched `generate` on a workload, the outside baseline, always in a process of its own
(`python -m serving_bench.hf SRC DST BATCH` is the worker)."""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import sys
import time
from typing import Sequence

from serving_bench.workload import BenchRequest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository


def run_hf(requests: Sequence[BenchRequest], batch_size: int) -> dict:
    """HF transformers batched greedy `generate` (scripts/hf_baseline.py) on `requests`, `batch_size` rows per
    call, in workload order, EOS disabled so every row produces at least its requested length. Throughput
    counts the requested (useful) tokens; a call runs max(output_len) steps for all its rows.

    Call this in a process that has not run JAX (see `run_hf_subprocess`)."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from hf_baseline import hf_generate_batch, load_hf_gemma3
    import torch
    import transformers

    t0 = time.monotonic()
    model, tok = load_hf_gemma3()
    load_s = time.monotonic() - t0
    model.generation_config.eos_token_id = None  # like ignore_eos: rows never stop early
    warm = [list(requests[0].prompt_ids[:16])] * 2
    hf_generate_batch(model, tok, warm, [4, 4], stop_ids=())  # warm-up: the first generate call is slow
    calls = []
    t0 = time.monotonic()
    for s in range(0, len(requests), batch_size):
        chunk = list(requests[s:s + batch_size])
        outs, elapsed = hf_generate_batch(model, tok, [r.prompt_ids for r in chunk], [r.output_len for r in chunk],
                                          stop_ids=())
        short = [r.index for r, o in zip(chunk, outs) if len(o) != r.output_len]
        calls.append({"rows": len(chunk), "padded_prompt_len": max(r.prompt_len for r in chunk),
                      "steps": max(r.output_len for r in chunk), "elapsed_s": elapsed,
                      "useful_tokens": sum(len(o) for o in outs), "short_rows": short})
    wall = time.monotonic() - t0
    useful = sum(c["useful_tokens"] for c in calls)
    computed = sum(c["rows"] * c["steps"] for c in calls)
    del model
    gc.collect()
    return {"engine": f"HF transformers {transformers.__version__} (torch {torch.__version__} CPU, float32, "
                      f"eager attention)", "num_requests": len(requests), "batch_size": batch_size,
            "load_s": load_s, "duration_s": wall, "output_tokens": useful, "computed_tokens": computed,
            "output_tok_s": useful / wall, "requests_s": len(requests) / wall,
            "all_lengths_exact": all(not c["short_rows"] for c in calls), "calls": calls}


def run_hf_subprocess(requests: Sequence[BenchRequest], batch_size: int) -> dict:
    """`run_hf` in a fresh Python process. In a process where JAX has run, torch's batched generate was
    measured ~15x slower here (4 rows x 16 tokens: 38.9 s vs 2.5 s), so HF never shares the process."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        src, dst = os.path.join(d, "requests.json"), os.path.join(d, "hf.json")
        with open(src, "w") as f:
            json.dump([dataclasses.asdict(r) for r in requests], f)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.path.join(ROOT, "scripts"), ROOT,
                                                                         os.environ.get("PYTHONPATH")])))
        p = subprocess.run([sys.executable, "-m", "serving_bench.hf", src, dst, str(batch_size)],
                           cwd=ROOT, env=env, capture_output=True, text=True)
        if p.returncode != 0:
            tail = p.stderr.strip().splitlines()[-1:] or ["no output"]
            if "ModuleNotFoundError" in p.stderr or "ImportError" in p.stderr:
                raise ImportError(tail[0])
            raise RuntimeError(f"HF worker failed ({p.returncode}): {p.stderr[-3000:]}")
        with open(dst) as f:
            return json.load(f)


def _hf_worker(src: str, dst: str, batch_size: str) -> int:
    with open(src) as f:
        reqs = [BenchRequest(**r) for r in json.load(f)]
    out = run_hf(reqs, int(batch_size))
    with open(dst, "w") as f:
        json.dump(out, f)
    return 0


if __name__ == "__main__":
    sys.exit(_hf_worker(*sys.argv[1:]))
