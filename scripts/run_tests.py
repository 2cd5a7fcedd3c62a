#!/usr/bin/env python
"""Run the test suite one file per pytest process, the way CI does (`.ci/run`, the README's test command).

    python scripts/run_tests.py                 # every tests/test_*.py, slow ones included
    python scripts/run_tests.py -m "not slow"   # extra arguments go to every pytest call
    python scripts/run_tests.py tests/test_engine.py tests/test_api.py

Why one process per file: it is how CI has always run, and a crash (if one came back) takes one file with it.
The crash once seen in a single long pytest process (a segfault in XLA native code at a test that passes on its
own; jaxlib 0.10.2) was most likely the process running out of memory mappings: every live XLA:CPU executable
keeps its JIT code in anonymous mappings of its own (3 to 12 for a small interpreted Pallas kernel), JAX's caches
keep every compiled program alive, and at vm.max_map_count (65,530) LLVM fails ("Cannot allocate memory") and
XLA segfaults in the C++ unwinder while raising that error. tests/conftest.py now clears JAX's caches after each
module, so one `python -m pytest` process stays bounded too (the Pallas files: ~20,000 mappings by the end
before, ~9,200 at most after); tests/test_memory_maps.py checks the mechanism. Engines are still shared within a
session (tests/conftest.py). A file whose process is killed by a signal is run once more and the crash is
reported in the summary; test failures are never rerun.
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CRASH_CODES = {134: "SIGABRT", 139: "SIGSEGV", 137: "SIGKILL", 135: "SIGBUS"}


def _crash_name(rc: int):
    if rc < 0:
        try:
            return signal.Signals(-rc).name
        except ValueError:
            return f"signal {-rc}"
    return CRASH_CODES.get(rc)


def _run(path: str, extra: list) -> tuple:
    t0 = time.monotonic()
    cmd = [sys.executable, "-X", "faulthandler", "-m", "pytest", "-q", "-p", "no:cacheprovider", path, *extra]
    rc = subprocess.call(cmd, cwd=ROOT, stdin=subprocess.DEVNULL)
    return rc, time.monotonic() - t0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    files = [a for a in argv if a.endswith(".py") and os.path.exists(os.path.join(ROOT, a))]
    extra = [a for a in argv if a not in files]
    files = files or sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "tests", "test_*.py")))
    if os.environ.get("CI") and "JAXSERVE_CACHE" not in os.environ:
        # CI: one private, initially empty cache (converted checkpoint, tokenizer) for all the files in turn.
        import tempfile

        os.environ["JAXSERVE_CACHE"] = tempfile.mkdtemp(prefix="jaxserve-ci-cache-")
    results = []
    t_all = time.monotonic()
    for path in files:
        print(f"==> {path}", flush=True)
        rc, dt = _run(path, extra)
        note = ""
        crash = _crash_name(rc)
        if crash:
            print(f"!!! {path}: the pytest process died ({crash}); running the file once more", flush=True)
            rc, dt2 = _run(path, extra)
            dt += dt2
            note = f"crashed once ({crash}), rerun rc={rc}"
        results.append((path, rc, dt, note))
    total = time.monotonic() - t_all
    print("\n" + "-" * 78)
    for path, rc, dt, note in results:
        status = "ok" if rc in (0, 5) else f"FAILED rc={rc}"  # 5: nothing collected (e.g. -m filtered all)
        print(f"{path:48s} {dt:7.1f} s  {status}  {note}")
    failed = [p for p, rc, _, _ in results if rc not in (0, 5)]
    print(f"{len(files)} files, {len(failed)} failed, {total / 60:.1f} min")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
