#!/usr/bin/env python
"""Serving benchmark: continuous vs static batching, a max-batch-size sweep, prefix caching, and HF
transformers' batched `generate` as an outside baseline, on Gemma 3 270M (the embedded default model).

    python scripts/bench_serving.py                 # the full run (~24 min on 2 idle-ish cores)
    python scripts/bench_serving.py --quick         # smoke test: 16 requests, short lengths, sweep 1 4 16
    python scripts/bench_serving.py --no-hf --no-static --sweep 1 8 64 --rate 0.5

`--help` says what is measured and lists the knobs. The code is the importable package scripts/serving_bench/
(workload, driver, hf, report, suite), which tests/test_bench_serving.py runs on a tiny random model.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from serving_bench.suite import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
