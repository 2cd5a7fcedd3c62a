"""One thread owns the `LLMEngine`; asyncio handlers talk to it through a command queue.

The engine is plain single-threaded Python, so nothing but the engine thread ever touches it: HTTP
handlers post commands (add these requests, abort that one, read the metrics), the thread runs them between
steps, steps the engine while it has work, and hands every step's `RequestOutput` snapshots back to the
event loop with one `call_soon_threadsafe` per step. A request's outputs go to its `Sink` (newest
snapshot per prompt index), so one HTTP request may own several engine requests (several prompts).

A command that raises (bad input the parser did not catch) fails only its own caller; an exception inside
`engine.step()` fails the requests then in flight and aborts them (their pages are freed), and the loop
keeps serving new requests.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from typing import Callable, Optional

log = logging.getLogger("jaxserve.server")


class EngineDead(RuntimeError):
    """The engine loop stopped (shutdown) or a step failed while this request was in flight."""


class Sink:
    """Receives the outputs of one HTTP request's engine requests (tagged with the prompt index), or an error.

    Only the newest snapshot per prompt is kept (snapshots are cumulative), so a client that reads slowly
    costs one RequestOutput per prompt, not one per generated token.
    """

    def __init__(self):
        self._latest: dict = {}
        self._error: Optional[BaseException] = None
        self._event = asyncio.Event()
        self.request_ids: list = []

    def push(self, prompt_index: int, ro) -> None:
        self._latest[prompt_index] = ro
        self._event.set()

    def fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        self._event.set()

    async def get_batch(self) -> list:
        """Wait for news; return `[(prompt_index, newest RequestOutput), ...]`. Raises a pending error."""
        while True:
            if self._error is not None:
                raise self._error
            if self._latest:
                items, self._latest = list(self._latest.items()), {}
                return items
            self._event.clear()
            await self._event.wait()


class EngineLoop:
    """Runs `engine.step()` in a background thread; `add` / `abort` / `call` are safe from the event loop."""

    def __init__(self, engine, on_finished: Optional[Callable] = None, idle_wait_s: float = 0.5):
        self.engine = engine
        self.on_finished = on_finished  # called on the engine thread with each finished RequestOutput
        self.idle_wait_s = idle_wait_s
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._routes: dict = {}  # engine request id -> (sink, prompt index)
        self._thread: Optional[threading.Thread] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._stopping = False

    # -------------------------------------------------------------- lifecycle
    def start(self, loop: Optional[asyncio.AbstractEventLoop] = None) -> None:
        if self.engine.has_unfinished_requests():
            raise RuntimeError("the engine already has requests in flight; give the server an idle engine")
        self._loop = loop or asyncio.get_running_loop()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="jaxserve-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def stop(self, timeout: float = 30.0) -> None:
        """Abort whatever is still in flight, then end the thread (blocking)."""
        if self._thread is None:
            return
        self._stopping = True
        self._inbox.put(None)  # wake it
        self._thread.join(timeout)
        self._thread = None

    # -------------------------------------------------------------- called from the event loop
    async def add(self, sink: Sink, requests: list, priority) -> None:
        """Enqueue `[(request_id, prompt_ids, SamplingParams), ...]` atomically: all or none.

        Raises the engine's error (e.g. a jaxserve error for a request the KV cache can never hold).
        """
        if not self.alive:
            raise EngineDead("the server is shutting down")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        ids = [rid for rid, _, _ in requests]

        def cmd():
            added = []
            try:
                for i, (rid, prompt_ids, params) in enumerate(requests):
                    self.engine.add_request(prompt_ids, params, request_id=rid, priority=priority)
                    added.append(rid)
                    self._routes[rid] = (sink, i)
            except BaseException as e:  # noqa: BLE001 - any failure rejects the whole HTTP request
                for rid in added:
                    self._routes.pop(rid, None)
                    self.engine.abort_request(rid)
                loop.call_soon_threadsafe(_resolve, fut, e)
                return
            loop.call_soon_threadsafe(_resolve, fut, None)

        sink.request_ids = ids
        self._inbox.put(cmd)
        try:
            await fut
        except asyncio.CancelledError:
            self.abort(ids)  # runs after `cmd` (the inbox is FIFO), so nothing leaks
            raise

    def abort(self, request_ids) -> None:
        """Stop these requests and free their KV pages (idempotent; unknown ids are ignored)."""
        ids = list(request_ids)

        def cmd():
            for rid in ids:
                self._routes.pop(rid, None)
                self.engine.abort_request(rid)

        self._inbox.put(cmd)

    async def call(self, fn: Callable, timeout: float = 5.0):
        """Run `fn(engine)` on the engine thread between steps and return its result."""
        if self._thread is None or not self._thread.is_alive():
            return fn(self.engine)
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def cmd():
            try:
                res = fn(self.engine)
            except BaseException as e:  # noqa: BLE001
                loop.call_soon_threadsafe(_resolve, fut, e)
                return
            loop.call_soon_threadsafe(_resolve, fut, None, res)

        self._inbox.put(cmd)
        return await asyncio.wait_for(fut, timeout)

    def fail_pending(self, exc: BaseException) -> None:
        """From the event loop: fail every request in flight now, even if the engine thread is stuck in a step
        (a peer process died inside a collective), and ask the engine thread to abort them."""
        for _ in range(3):  # the engine thread may add a route meanwhile
            try:
                routes = list(self._routes.items())
                break
            except RuntimeError:
                continue
        else:
            routes = []
        for sink in {id(s): s for _, (s, _) in routes}.values():
            sink.fail(exc)
        self.abort([rid for rid, _ in routes])

    # -------------------------------------------------------------- the thread
    def _run_commands(self, block: bool) -> None:
        try:
            cmd = self._inbox.get(timeout=self.idle_wait_s) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if cmd is not None:
                try:
                    cmd()
                except Exception:  # noqa: BLE001 - a command must never kill the loop
                    log.exception("engine command failed")
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _run(self) -> None:
        eng = self.engine
        while not self._stopping:
            self._run_commands(block=not eng.has_unfinished_requests())
            if self._stopping or not eng.has_unfinished_requests():
                continue
            try:
                outs = eng.step()
            except Exception as e:  # noqa: BLE001
                log.exception("engine step failed; aborting the requests in flight")
                self._fail_all(EngineDead(f"engine step failed: {type(e).__name__}: {e}"))
                continue
            self._deliver(outs)
        # Shutdown: whatever is left (only after the drain timeout) is aborted, its pages freed.
        self._run_commands(block=False)
        self._fail_all(EngineDead("the server is shutting down"))

    def _deliver(self, outs: list) -> None:
        batch = []
        for ro in outs:
            route = self._routes.get(ro.request_id)
            if ro.finished:
                self._routes.pop(ro.request_id, None)
                if self.on_finished is not None:
                    try:
                        self.on_finished(ro)
                    except Exception:  # noqa: BLE001
                        log.exception("on_finished callback failed")
            if route is not None:
                batch.append((route[0], (route[1], ro)))
        if batch:
            self._loop.call_soon_threadsafe(_dispatch, batch)

    def _fail_all(self, exc: BaseException) -> None:
        sinks = {}
        for rid, (sink, _) in list(self._routes.items()):
            sinks[id(sink)] = sink
            try:
                self.engine.abort_request(rid)
            except Exception:  # noqa: BLE001
                log.exception("abort failed for %s", rid)
        self._routes.clear()
        # Requests the engine holds without a route (should not happen) go too: leave the engine idle.
        for rid in list(getattr(self.engine, "requests", {})):
            try:
                self.engine.abort_request(rid)
            except Exception:  # noqa: BLE001
                pass
        if sinks and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(_dispatch, [(s, exc) for s in sinks.values()])


def _resolve(fut: asyncio.Future, exc: Optional[BaseException], result=None) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)


def _dispatch(batch: list) -> None:
    for sink, item in batch:
        if isinstance(item, BaseException):
            sink.fail(item)
        else:
            sink.push(*item)
