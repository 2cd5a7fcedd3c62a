"""Multi-host serving (SPMD): process 0 serves and schedules, every other process runs the same steps.

In a multi-process run each step program spans every process's devices, so every process must run the same
programs on the same inputs in the same order. Serving cannot reach that by running the same requests
everywhere (HTTP arrives at one host, and scheduling depends on arrival times and measured step times), so:

- process 0 owns HTTP, tokenization, the scheduler and the block manager. Its runner's `mirror` sends each
  step's host inputs (which program set and bucket, StepInputs, SamplingTensors, rows, prompt-logprob spans;
  pickled, zlib-compressed) through the jax.distributed key-value store before running it (a pipeline's rotating
  decode calls as program set -1: the stages' stacked inputs, and the sampling tensors when a group leaves);
- every other process builds the same engine (so it compiled the same programs), then `follow`s: it reads
  step n, runs `runner.follow_step` (the same programs, its devices' shards of the KV cache kept in step) and
  drops the results. It heartbeats through the key-value store from a thread of its own.

Failure: with `jax_enable_recoverability` (set by `distributed.initialize(recoverable=True)`), a dead process
does not take the others down: process 0's next step fails at once (gloo: connection reset) and fails the
requests in it, and process 0's watchdog marks the group failed when a follower's heartbeat stops for
`dead_after_s`; the server then answers 503 (health and new requests). A follower whose process 0 is gone (the
coordination service lives there) exits with status 1.

`jax.experimental.multihost_utils.live_devices` / the client's `get_live_nodes` would be JAX's own liveness
check, but it is a barrier every live process must enter, so process 0 could not ask it while a follower waits
for the next step; the heartbeat keys stand in for it.
"""

from __future__ import annotations

import logging
import pickle
import threading
import time
import zlib
from typing import Optional

from jaxserve.errors import InvalidConfigError

log = logging.getLogger("jaxserve")

PREFIX = "jaxserve/spmd"
STOP = b"stop"


class ProcessGroupFailed(RuntimeError):
    """A process of the multi-host group died or stopped answering: the group can run no more steps."""


def _client():
    from jax._src import distributed  # the client multihost_utils itself uses (no public handle to it)

    client = distributed.global_state.client
    if client is None:
        raise InvalidConfigError("multi-host serving needs jax.distributed (--coordinator-address / --distributed)")
    return client


def _step_key(n: int) -> str:
    return f"{PREFIX}/step/{n}"


def _alive_key(process: int) -> str:
    return f"{PREFIX}/alive/{process}"


class StepChannel:
    """Process 0's end (`lead`) or another process's end (`follow`) of the step stream of one engine.

    `heartbeat_s`: how often followers heartbeat and process 0 checks; `dead_after_s`: a follower silent that long
    is dead; `poll_s`: how long a follower waits for the next step before checking process 0 is still there."""

    def __init__(self, engine, *, heartbeat_s: float = 1.0, dead_after_s: float = 10.0, poll_s: float = 5.0,
                 ready_timeout_s: float = 900.0, client=None, process_id: Optional[int] = None,
                 num_processes: Optional[int] = None):
        import jax

        if not hasattr(engine, "runner"):
            raise InvalidConfigError("multi-host serving runs one replica (a mesh without a data axis > 1); "
                                     "data-parallel replicas each live on their own hosts' devices")
        # (A draft model's runner is not mirrored: build_engine allows only n-gram speculation on a mesh.)
        self.engine = engine
        self.runner = engine.runner
        # client / process_id / num_processes: jax.distributed's own unless given (tests/test_spmd_channel.py).
        self.process_id = jax.process_index() if process_id is None else process_id
        self.num_processes = jax.process_count() if num_processes is None else num_processes
        self.client = _client() if client is None else client
        self.heartbeat_s = heartbeat_s
        self.dead_after_s = dead_after_s
        self.poll_s = poll_s
        self.ready_timeout_s = ready_timeout_s
        self.steps = 0
        self.failure: Optional[str] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _ready(self) -> None:
        # Every process has built and compiled its engine before process 0 serves (and its watchdog starts).
        self.client.wait_at_barrier(f"{PREFIX}/ready", int(self.ready_timeout_s * 1000))

    # ------------------------------------------------------------------ process 0
    def lead(self) -> "StepChannel":
        """Start mirroring the engine's steps to the other processes and watching their heartbeats."""
        if self.process_id != 0:
            raise InvalidConfigError("only process 0 leads the step stream")
        self._ready()
        self.runner.mirror = self._publish
        self._thread = threading.Thread(target=self._watch, name="jaxserve-spmd-watchdog", daemon=True)
        self._thread.start()
        return self

    def _publish(self, program_set, bucket, inputs, sampling, num_rows, spans) -> None:
        if self.failure is not None:
            raise ProcessGroupFailed(self.failure)
        msg = zlib.compress(pickle.dumps((program_set, tuple(bucket), inputs, sampling, num_rows, spans),
                                         protocol=pickle.HIGHEST_PROTOCOL), 1)
        self.client.key_value_set_bytes(_step_key(self.steps), msg)
        if self.steps:  # every follower read step n - 1 before its collectives could let ours finish
            self.client.key_value_delete(_step_key(self.steps - 1))
        self.steps += 1

    def _watch(self) -> None:
        last = {p: (None, time.monotonic()) for p in range(1, self.num_processes)}
        while not self._stop.wait(self.heartbeat_s):
            now = time.monotonic()
            for p, (value, seen) in list(last.items()):
                try:
                    v = self.client.key_value_try_get_bytes(_alive_key(p))
                except Exception:  # noqa: BLE001 - not written yet (NOT_FOUND)
                    v = None
                if v is not None and v != value:
                    last[p] = (v, now)
                elif now - seen > self.dead_after_s and self.failure is None:
                    self.failure = f"process {p} of {self.num_processes} stopped answering ({now - seen:.0f} s)"
                    log.error("multi-host serving: %s; the server can run no more steps", self.failure)

    def health(self) -> Optional[str]:
        """None while every process answers; else why the group failed."""
        return self.failure

    def close(self) -> None:
        """Tell the followers to exit (process 0, at shutdown)."""
        self._stop.set()
        self.runner.mirror = None
        if self.failure is None:
            try:
                self.client.key_value_set_bytes(_step_key(self.steps), STOP)
            except Exception:  # noqa: BLE001 - the followers exit anyway once the service is gone
                log.exception("could not send the stop message")

    # ------------------------------------------------------------------ processes 1..n-1
    def follow(self) -> int:
        """Run process 0's steps until it stops (0) or is gone (1), or a step fails here (2). Blocks."""
        if self.process_id == 0:
            raise InvalidConfigError("process 0 leads; the other processes follow")
        beat = threading.Thread(target=self._heartbeat, name="jaxserve-spmd-heartbeat", daemon=True)
        beat.start()
        self._ready()
        try:
            while True:
                try:
                    msg = self.client.blocking_key_value_get_bytes(_step_key(self.steps), int(self.poll_s * 1000))
                except Exception as e:  # noqa: BLE001
                    if "DEADLINE_EXCEEDED" in str(e):
                        continue  # no step yet: an idle server
                    log.error("multi-host serving: process 0 is gone (%s)", e)
                    return 1
                if msg == STOP:
                    return 0
                try:
                    self.runner.follow_step(*pickle.loads(zlib.decompress(msg)))
                except Exception:  # noqa: BLE001
                    log.exception("multi-host serving: step %d failed on process %d", self.steps, self.process_id)
                    return 2
                self.steps += 1
        finally:
            self._stop.set()

    def _heartbeat(self) -> None:
        while not self._stop.is_set():
            try:
                self.client.key_value_increment(_alive_key(self.process_id), 1)
            except Exception:  # noqa: BLE001 - process 0 gone: `follow` notices and returns
                return
            self._stop.wait(self.heartbeat_s)
