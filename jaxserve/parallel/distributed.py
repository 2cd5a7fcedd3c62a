"""Multi-host start-up: `jax.distributed.initialize` from flags or the environment.

Every process of a multi-host run executes the same program (SPMD): the same engine, the same requests in the
same order, so their deterministic schedulers issue the same steps; each process feeds the devices it owns and
the mesh spans all of them (`jax.devices()` is global after initialisation).

Settings, first found wins: explicit arguments (the CLI's --coordinator-address / --num-processes /
--process-id), then JAXSERVE_COORDINATOR_ADDRESS / JAXSERVE_NUM_PROCESSES / JAXSERVE_PROCESS_ID, then JAX's
own JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID. On a Cloud TPU VM slice or a SLURM / Open MPI
cluster none are needed: `jax.distributed.initialize()` detects them (pass `auto=True` / `--distributed`).
On CPU the cross-process collectives use gloo.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

from jaxserve.errors import InvalidConfigError

log = logging.getLogger("jaxserve")

_initialized = False


def _env(*names) -> Optional[str]:
    for n in names:
        v = os.environ.get(n)
        if v not in (None, ""):
            return v
    return None


def distributed_settings(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
                         process_id: Optional[int] = None) -> dict:
    """The resolved settings (None where unset); raises InvalidConfigError on malformed values."""
    addr = coordinator_address or _env("JAXSERVE_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS")
    out = {"coordinator_address": addr}
    for key, val, names in (("num_processes", num_processes, ("JAXSERVE_NUM_PROCESSES", "JAX_NUM_PROCESSES")),
                            ("process_id", process_id, ("JAXSERVE_PROCESS_ID", "JAX_PROCESS_ID"))):
        if val is None:
            val = _env(*names)
        if val is not None:
            try:
                val = int(val)
            except (TypeError, ValueError):
                raise InvalidConfigError(f"{key} must be an integer, got {val!r} (flag or {names[0]})") from None
        out[key] = val
    if addr is not None:
        host, sep, port = addr.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise InvalidConfigError(f"coordinator address must be host:port, got {addr!r}")
    n, i = out["num_processes"], out["process_id"]
    if n is not None and n < 1:
        raise InvalidConfigError(f"num_processes must be >= 1, got {n}")
    if n is not None and i is not None and not 0 <= i < n:
        raise InvalidConfigError(f"process_id must be in [0, {n}), got {i}")
    return out


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, *, auto: bool = False,
               initialization_timeout: int = 300, recoverable: bool = False) -> bool:
    """Join the multi-host run (once per process). Returns True if jax.distributed was initialised.

    Nothing happens (False) when no coordinator is configured and `auto` is False: a single-process run.
    Must run before anything touches a JAX device. `recoverable` (a server: jaxserve/parallel/spmd.py): a process
    that dies does not take the others down with it (`jax_enable_recoverability`); its peers' collectives fail
    instead, and the server reports it.
    """
    global _initialized
    if _initialized:
        return True
    s = distributed_settings(coordinator_address, num_processes, process_id)
    if s["coordinator_address"] is None and not auto:
        return False
    if s["coordinator_address"] is not None and (s["num_processes"] is None or s["process_id"] is None):
        raise InvalidConfigError("a coordinator address needs the process count and this process's id "
                                 "(--num-processes / --process-id or JAXSERVE_NUM_PROCESSES / JAXSERVE_PROCESS_ID)")
    import jax

    if os.environ.get("JAX_PLATFORMS", "").strip().lower() in ("cpu",) or _cpu_only():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if recoverable:
        jax.config.update("jax_enable_recoverability", True)
        # The preemption service takes over SIGTERM (the process then dies of it); the server drains on SIGTERM.
        jax.config.update("jax_enable_preemption_service", False)
    kw = {k: v for k, v in s.items() if v is not None}
    jax.distributed.initialize(initialization_timeout=initialization_timeout, **kw)
    _initialized = True
    log.info("jax.distributed: process %d of %d, %d global devices (%d local)", jax.process_index(),
             jax.process_count(), jax.device_count(), jax.local_device_count())
    return True


def _cpu_only() -> bool:
    """True when no accelerator plugin is installed (decided without initialising a backend)."""
    import importlib.util

    return not any(importlib.util.find_spec(m) for m in ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin",
                                                          "jax_rocm60_plugin"))
