#!/usr/bin/env python
"""Run the test suite the way CI does (`.ci/run`, the README's test command).

    python scripts/run_tests.py                 # every tests/test_*.py, slow ones included, a process per file
    python scripts/run_tests.py -m "not slow"   # extra arguments go to pytest
    python scripts/run_tests.py tests/test_engine.py tests/test_api.py
    python scripts/run_tests.py --jobs 1        # one file at a time (default: 2 side by side, see _default_jobs)
    python scripts/run_tests.py --one-process   # the whole suite in one pytest process (not the default: below)

One pytest process per file is the default, the way CI has always run: a crash takes one file with it (a file
whose process dies by a signal is run once more and the crash reported; test failures are never rerun). Two
files run side by side by default, the longest first (LAST_SECONDS), each file's output printed when it ends.

`--one-process` shares the tiny models' compiled engines across files (tests/conftest.py). A plugin records
each file as it completes; if the process dies by a signal, the files it had not completed are rerun one
process per file. It is not the default because it aborts here (SIGABRT inside an XLA:CPU compile, no message;
jaxlib 0.10.2) when test_batch_invariance_real.py compiles its bfloat16 Gemma engines after the earlier files,
reproduced twice, cause not found; each file on its own passes. An earlier crash in long single processes (a
segfault) was most likely running out of memory mappings: every live XLA:CPU executable keeps its JIT code in
anonymous mappings of its own, JAX's caches keep every compiled program alive, and at vm.max_map_count (65,530)
LLVM fails ("Cannot allocate memory"); tests/conftest.py clears JAX's caches after each module for that, and
tests/test_memory_maps.py checks the mechanism.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CRASH_CODES = {134: "SIGABRT", 139: "SIGSEGV", 137: "SIGKILL", 135: "SIGBUS"}
OK_CODES = (0, 5)  # 5: nothing collected (e.g. -m filtered everything out)


def _crash_name(rc: int):
    if rc < 0:
        try:
            return signal.Signals(-rc).name
        except ValueError:
            return f"signal {-rc}"
    return CRASH_CODES.get(rc)


class ProgressPlugin:
    """Appends one JSON line per completed test file: {"file", "failed", "seconds"} (loaded with `-p`)."""

    def __init__(self, path: str):
        self.path = path
        self.last_of_file: dict = {}
        self.failed: dict = {}
        self.started: dict = {}

    def pytest_collection_modifyitems(self, session, config, items):
        for item in items:
            self.last_of_file[item.location[0]] = item.nodeid

    def pytest_runtest_logstart(self, nodeid, location):
        self.started.setdefault(location[0], time.monotonic())

    def pytest_runtest_logreport(self, report):
        if report.failed:
            self.failed[report.location[0]] = self.failed.get(report.location[0], 0) + 1

    def pytest_runtest_logfinish(self, nodeid, location):
        f = location[0]
        if self.last_of_file.get(f) == nodeid:
            rec = {"file": f, "failed": self.failed.get(f, 0), "seconds": time.monotonic() - self.started[f]}
            with open(self.path, "a") as fh:
                fh.write(json.dumps(rec) + "\n")


def _pytest_cmd(paths: list, extra: list) -> list:
    return [sys.executable, "-X", "faulthandler", "-m", "pytest", "-q", "-p", "no:cacheprovider", *paths, *extra]


def _run(paths: list, extra: list, progress: str = None) -> tuple:
    t0 = time.monotonic()
    cmd = _pytest_cmd(paths, extra)
    env = dict(os.environ)
    if progress is not None:
        # `-p scripts.run_tests_plugin` would need scripts/ importable; a tiny bootstrap module does the same.
        boot = os.path.join(os.path.dirname(progress), "jaxserve_progress_plugin.py")
        with open(boot, "w") as fh:
            fh.write(f"import sys\nsys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n"
                     f"from run_tests import ProgressPlugin\n"
                     f"def pytest_configure(config):\n"
                     f"    config.pluginmanager.register(ProgressPlugin({progress!r}), 'jaxserve-progress')\n")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(boot), env.get("PYTHONPATH")]))
        cmd[cmd.index("-q"):cmd.index("-q")] = ["-p", "jaxserve_progress_plugin"]
    rc = subprocess.call(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, env=env)
    return rc, time.monotonic() - t0


def _completed(progress: str) -> dict:
    done = {}
    if os.path.exists(progress):
        with open(progress) as fh:
            for line in fh:
                rec = json.loads(line)
                done[os.path.normpath(rec["file"])] = rec
    return done


def _summary(results: list, total: float) -> int:
    print("\n" + "-" * 78)
    for path, ok, dt, note in results:
        print(f"{path:48s} {dt:7.1f} s  {'ok' if ok else 'FAILED'}  {note}")
    failed = [p for p, ok, _, _ in results if not ok]
    print(f"{len(results)} files, {len(failed)} failed, {total / 60:.1f} min")
    return 1 if failed else 0


def run_one_process(files: list, extra: list) -> int:
    t_all = time.monotonic()
    tmp = tempfile.mkdtemp(prefix="jaxserve-tests-")
    progress = os.path.join(tmp, "progress.jsonl")
    rc, _ = _run(files, extra, progress)
    done = _completed(progress)
    results = []
    for f in files:
        rec = done.get(os.path.normpath(f))
        if rec is not None:
            results.append((f, rec["failed"] == 0, rec["seconds"], ""))
    crash = _crash_name(rc)
    rest = [f for f in files if os.path.normpath(f) not in done]
    if crash:
        print(f"!!! the pytest process died ({crash}); running the {len(rest)} files it had not completed "
              f"one process per file", flush=True)
        for f in rest:
            print(f"==> {f}", flush=True)
            rc_f, dt = _run([f], extra)
            results.append((f, rc_f in OK_CODES, dt, f"after the crash ({crash}): rc={rc_f}"))
    elif rc not in OK_CODES:
        # Failures are per file above; a non-zero exit with no failing file is an error outside the tests
        # (collection, a fixture at session scope, an internal error): report it as such.
        if all(ok for _, ok, _, _ in results):
            results.append(("(pytest session)", False, 0.0, f"rc={rc}"))
    for f in rest if not crash else []:
        results.append((f, rc == 5, 0.0, "no tests ran (deselected or not collected)"))
    return _summary(results, time.monotonic() - t_all)


# Seconds per file in the last full CI-style run (`.ci/run` on a clean clone, two files side by side, 2 cores,
# 2026-12-07: 57.1 min), to start the longest first; a file not listed counts as a minute. Only the order
# depends on it.
LAST_SECONDS = {
    "test_batch_invariance_real": 619, "test_speculative_distribution": 593, "test_speculative_real": 564,
    "test_parallel": 538, "test_parallel_real": 466, "test_engine_pallas": 360, "test_pallas_mesh": 343,
    "test_batch_invariance": 312, "test_quant": 303, "test_device_check": 207, "test_structured_real": 199,
    "test_bf16": 189, "test_prompt_logprobs": 186, "test_pallas_prefill": 146, "test_engine": 126,
    "test_no_torch": 126, "test_weights": 116, "test_sampling": 114, "test_families": 111,
    "test_families_gguf": 251, "test_kv_reclaim": 200,
    "test_batch_job": 100, "test_spmd_serving": 620, "test_spmd_channel": 200,
    "test_lm_eval_real": 95, "test_eval_quality": 91, "test_speculative": 89, "test_pallas_decode": 83,
    "test_moe": 78, "test_multihost": 78, "test_structured": 70, "test_tokenizer": 66, "test_ragged": 200,
}


def _default_jobs() -> int:
    """Two files side by side on a machine with 2+ cores and 16+ GiB: an XLA compile runs on one core, so a
    lone pytest process leaves the second core idle much of the time (each real-model process peaks at a few
    GiB)."""
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    except (ValueError, OSError):
        mem_gib = 0
    return 2 if (os.cpu_count() or 1) >= 2 and mem_gib >= 16 else 1


def _start(path: str, extra: list, log_dir: str):
    log = open(os.path.join(log_dir, os.path.basename(path) + ".log"), "w+")
    proc = subprocess.Popen(_pytest_cmd([path], extra), cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log,
                            stderr=subprocess.STDOUT)
    return proc, log, time.monotonic()


def run_per_file(files: list, extra: list, jobs: int = 1) -> int:
    """One pytest process per file, `jobs` of them at a time (longest first); each file's output is printed
    whole when it ends. A file whose process dies by a signal is run once more."""
    t_all = time.monotonic()
    log_dir = tempfile.mkdtemp(prefix="jaxserve-test-logs-")
    key = lambda f: -LAST_SECONDS.get(os.path.splitext(os.path.basename(f))[0], 60)  # noqa: E731
    todo = sorted(files, key=key) if jobs > 1 else list(files)
    running, done, reruns = {}, {}, {}
    while todo or running:
        while todo and len(running) < jobs:
            path = todo.pop(0)
            running[path] = _start(path, extra, log_dir)
        time.sleep(0.2)
        for path, (proc, log, t0) in list(running.items()):
            rc = proc.poll()
            if rc is None:
                continue
            del running[path]
            log.seek(0)
            print(f"==> {path}" + (" (rerun)" if path in reruns else ""), flush=True)
            sys.stdout.write(log.read())
            log.close()
            dt = time.monotonic() - t0 + reruns.get(path, (0.0, ""))[0]
            crash = _crash_name(rc)
            if crash and path not in reruns:
                print(f"!!! {path}: the pytest process died ({crash}); running the file once more", flush=True)
                reruns[path] = (dt, crash)
                todo.insert(0, path)
                continue
            note = f"crashed once ({reruns[path][1]}), rerun rc={rc}" if path in reruns else ""
            done[path] = (path, rc in OK_CODES, dt, note)
    return _summary([done[f] for f in files], time.monotonic() - t_all)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    one_process = "--one-process" in argv
    argv = [a for a in argv if a != "--one-process"]
    jobs = _default_jobs()
    if "--jobs" in argv:
        i = argv.index("--jobs")
        jobs = max(1, int(argv[i + 1]))
        del argv[i:i + 2]
    files = [a for a in argv if a.endswith(".py") and os.path.exists(os.path.join(ROOT, a))]
    extra = [a for a in argv if a not in files]
    files = files or sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "tests", "test_*.py")))
    if os.environ.get("CI") and "JAXSERVE_CACHE" not in os.environ:
        # CI: one private, initially empty cache (converted checkpoint, tokenizer, compiled programs) for all the
        # files. Compiling is most of the suite's time, and most files build the same tiny engines (and several
        # the same Gemma 3 engine): with the compilation cache on, the first process to compile a program writes
        # it and the others load it. Bounded (JAXSERVE_XLA_CACHE_MAX_BYTES), so JAX locks the directory around
        # each read and write: two files side by side never see an entry half written.
        os.environ["JAXSERVE_CACHE"] = tempfile.mkdtemp(prefix="jaxserve-ci-cache-")
        # the compiled programs also for the tests' subprocesses that convert into a JAXSERVE_CACHE of their own
        os.environ.setdefault("JAXSERVE_XLA_CACHE_DIR", os.path.join(os.environ["JAXSERVE_CACHE"], "xla"))
        os.environ.setdefault("JAXSERVE_XLA_CACHE", "1")
        os.environ.setdefault("JAXSERVE_XLA_CACHE_MAX_BYTES", str(32 << 30))
    return run_one_process(files, extra) if one_process else run_per_file(files, extra, jobs)


if __name__ == "__main__":
    sys.exit(main())
