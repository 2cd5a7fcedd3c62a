"""The serving benchmark (`python scripts/bench_serving.py`; what it measures: scripts/serving_bench/suite.py).

    workload.py   seeded request sets, Poisson arrivals, the shared-prefix set, the decode-step bound
    driver.py     running and measuring an engine on a workload (in process and over HTTP), the prefix-cache
                  experiment, engine construction, the host-only schedule replay
    hf.py         HF transformers' batched generate, the outside baseline (in a process of its own)
    report.py     percentiles, summaries, the offline ceiling, machine info, Markdown tables, the sweep plot
    suite.py      the full run: command-line arguments and `main`
"""

from serving_bench.driver import (describe_engine, engine_kwargs, make_llm, release, replay_schedule,
                                       run_prefix_experiment, run_workload, run_workload_http, warm_up)
from serving_bench.hf import run_hf, run_hf_subprocess
from serving_bench.report import (machine_info, offline_ceiling, percentile, plot_sweep, print_report,
                                       summarize)
from serving_bench.suite import DEFAULT_MODEL, main, parse_args
from serving_bench.workload import (BenchRequest, WorkloadSpec, corpus_text, corpus_token_ids,
                                         decode_step_bound, lognormal_lengths, make_prefix_workload, make_workload,
                                         poisson_arrivals, workload_stats)
