#!/usr/bin/env python
"""Start N jaxserve processes on this machine joined by jax.distributed (a multi-host run, simulated locally).

    python scripts/launch_multihost.py -n 2 -- jaxserve generate --model tiny-llama --random-weights \\
        --mesh model=2 --prompt "Hello" --max-tokens 8

Each process gets JAXSERVE_COORDINATOR_ADDRESS (127.0.0.1 and a free port), JAXSERVE_NUM_PROCESSES and
JAXSERVE_PROCESS_ID in its environment (what `jaxserve.parallel.distributed.initialize` reads), and
`--devices-per-process` forced CPU devices (default 1). Every process runs the same command (SPMD); process 0's
output is printed, the others' only when they fail. On real hosts run the command on each host yourself with
the same three variables (or `--distributed` on a Cloud TPU VM slice, where JAX finds them itself).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--num-processes", type=int, default=2)
    ap.add_argument("--devices-per-process", type=int, default=1)
    ap.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
    ap.add_argument("--timeout", type=float, default=3600.0)
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command every process runs")
    args = ap.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        ap.error("give the command to run after --")
    if cmd[0] == "jaxserve" and shutil.which("jaxserve") is None:
        cmd = [sys.executable, "-m", "jaxserve.cli", *cmd[1:]]
    addr = f"127.0.0.1:{args.port or free_port()}"
    procs = []
    for i in range(args.num_processes):
        env = dict(os.environ, JAXSERVE_COORDINATOR_ADDRESS=addr, JAXSERVE_NUM_PROCESSES=str(args.num_processes),
                   JAXSERVE_PROCESS_ID=str(i), JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                            f" --xla_force_host_platform_device_count={args.devices_per_process}").strip()
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    rc = 0
    for i, p in enumerate(procs):
        try:
            out, err = p.communicate(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            print(f"[process {i}] timed out", file=sys.stderr)
        if i == 0:
            sys.stdout.write(out)
            sys.stderr.write(err)
        elif p.returncode:
            sys.stderr.write(f"[process {i}] exit {p.returncode}\n{err[-4000:]}")
        rc = rc or p.returncode
    return rc


if __name__ == "__main__":
    sys.exit(main())
