"""Offline batch jobs in OpenAI's batch file format, resumable after a crash.

    jaxserve batch --input requests.jsonl --output results.jsonl [--model NAME ...]

Input: one JSON object per line, `{"custom_id": str, "method": "POST", "url": "/v1/chat/completions" |
"/v1/completions", "body": {...}}` (the body is what the HTTP server accepts; `stream` is ignored).
Output: one line per input line, in completion order,
`{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`: a request the server would
answer 4xx gets `status_code` 4xx and the error object as `body`; a line that is not a request at all (bad
JSON, no custom_id, wrong method/url, a duplicate custom_id) gets `response: null` and
`error: {"code", "message"}`.

Resuming: every result is appended and flushed as one line (fsync'd every `fsync_interval_s`). On start the
existing output is read, a torn last line (the process was killed mid-write) is cut off, and lines already
answered are skipped, so a job killed with SIGKILL and run again answers every custom_id exactly once.
Requests without a `seed` are seeded from their custom_id, so a resumed job samples what an uninterrupted one
would have (greedy output is the same anyway; bit-identical across batch compositions only with
`batch_invariant=True`). Duplicate custom_ids: the first line is run, later ones get an error line with
`custom_id: null`. An exclusive lock on the output file keeps a second job from writing to it.
"""

from __future__ import annotations

import json
import os
import sys
import time
import zlib
from dataclasses import dataclass, field
from typing import Optional

from jaxserve.errors import JaxserveError
from jaxserve.server.protocol import CHAT_URL, COMPLETIONS_URL, APIError, Limits, OpenAIServing

_KINDS = {COMPLETIONS_URL: "completion", CHAT_URL: "chat"}


def line_id(lineno: int) -> str:
    """The result `id` of input line `lineno` (1-based): stable across restarts."""
    return f"batch_req_{lineno:08d}"


# ------------------------------------------------------------------------------------------ output file
def recover_output(path: str) -> dict:
    """Read an existing output file, cutting off a torn last line. Returns what is already answered.

    `custom_ids`: custom_ids with a result; `ids`: result ids of lines answered without a custom_id;
    `torn_bytes`: bytes cut off the end; `bad_lines`: complete lines that are not JSON objects (kept).
    """
    info = {"custom_ids": set(), "ids": set(), "torn_bytes": 0, "bad_lines": 0, "lines": 0}
    if not os.path.exists(path):
        return info
    with open(path, "rb+") as f:
        data = f.read()
        end = data.rfind(b"\n") + 1  # 0 when there is no complete line
        if end < len(data):
            info["torn_bytes"] = len(data) - end
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    for raw in data[:end].splitlines():
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except ValueError:
            info["bad_lines"] += 1
            continue
        if not isinstance(obj, dict):
            info["bad_lines"] += 1
            continue
        info["lines"] += 1
        if isinstance(obj.get("custom_id"), str):
            info["custom_ids"].add(obj["custom_id"])
        elif isinstance(obj.get("id"), str):
            info["ids"].add(obj["id"])
    return info


class _Appender:
    """Appends whole lines with one write each; fsyncs at most every `fsync_interval_s` seconds."""

    def __init__(self, path: str, fsync_interval_s: float):
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.fsync_interval_s = fsync_interval_s
        self._last_sync = time.monotonic()
        self._dirty = False
        try:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # not POSIX: no lock
            pass
        except OSError:
            os.close(self.fd)
            raise JaxserveError(f"{path} is locked by another running batch job") from None

    def write(self, obj: dict) -> None:
        data = (json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
        self._dirty = True
        if time.monotonic() - self._last_sync >= self.fsync_interval_s:
            self.sync()

    def sync(self) -> None:
        if self._dirty:
            os.fsync(self.fd)
            self._dirty = False
        self._last_sync = time.monotonic()

    def close(self) -> None:
        self.sync()
        os.close(self.fd)


# ------------------------------------------------------------------------------------------ the job
@dataclass
class _Job:
    lineno: int
    custom_id: str
    kind: str
    req: object  # ParsedRequest
    engine_ids: list
    finals: dict = field(default_factory=dict)


@dataclass
class BatchSummary:
    input_lines: int = 0
    already_done: int = 0
    written: int = 0
    succeeded: int = 0
    failed_requests: int = 0  # 4xx responses (bad body, prompt too long, ...)
    invalid_lines: int = 0  # error lines: bad JSON, no custom_id, wrong method/url
    duplicates: int = 0
    duplicate_custom_ids: list = field(default_factory=list)
    prompt_tokens: int = 0
    generation_tokens: int = 0
    elapsed_s: float = 0.0
    torn_bytes_repaired: int = 0

    @property
    def generation_tokens_per_s(self) -> float:
        return self.generation_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["generation_tokens_per_s"] = round(self.generation_tokens_per_s, 2)
        d["elapsed_s"] = round(self.elapsed_s, 3)
        return d

    def report(self) -> str:
        dup = ""
        if self.duplicates:
            dup = f" ({', '.join(self.duplicate_custom_ids[:5])}{', ...' if self.duplicates > 5 else ''})"
        return "\n".join([
            f"batch: {self.input_lines} input lines, {self.already_done} already answered, {self.written} written now",
            f"  succeeded {self.succeeded}, request errors {self.failed_requests}, invalid lines "
            f"{self.invalid_lines}, duplicate custom_ids {self.duplicates}{dup}",
            f"  {self.prompt_tokens} prompt + {self.generation_tokens} generated tokens in {self.elapsed_s:.1f} s: "
            f"{self.generation_tokens_per_s:.1f} generated tok/s, "
            f"{self.succeeded / self.elapsed_s if self.elapsed_s else 0.0:.2f} req/s",
        ])


def _error_line(lineno: int, custom_id, code: str, message: str) -> dict:
    return {"id": line_id(lineno), "custom_id": custom_id, "response": None,
            "error": {"code": code, "message": f"line {lineno}: {message}"}}


def _response_line(lineno: int, custom_id: str, status: int, request_id: str, body: dict) -> dict:
    return {"id": line_id(lineno), "custom_id": custom_id,
            "response": {"status_code": status, "request_id": request_id, "body": body}, "error": None}


def _count_lines(path: str) -> int:
    with open(path, "rb") as f:
        return sum(1 for raw in f if raw.strip())


def run_batch(llm, input_path: str, output_path: str, *, served_model_names: Optional[list] = None,
              limits: Optional[Limits] = None, priority: str = "batch", max_in_flight: Optional[int] = None,
              fsync_interval_s: float = 1.0, progress: bool = True, log=sys.stderr) -> BatchSummary:
    """Answer every line of `input_path` not yet answered in `output_path` (appending). Returns a summary.

    `llm`: an `LLM` or `LLMEngine` with no requests in flight; it is left idle on return (also on error).
    """
    engine = getattr(llm, "engine", llm)
    if engine.has_unfinished_requests():
        raise JaxserveError("the engine has requests in flight; run the batch on an idle engine")
    names = served_model_names or [engine.model_cfg.name]
    serving = OpenAIServing(engine, names, limits)
    max_in_flight = max_in_flight or 4 * engine.cfg.max_num_seqs
    t0 = time.monotonic()
    summary = BatchSummary()
    total = _count_lines(input_path)
    summary.input_lines = total

    writer = _Appender(output_path, fsync_interval_s)  # lock first, then read what is there
    done = recover_output(output_path)
    summary.torn_bytes_repaired = done["torn_bytes"]
    if done["torn_bytes"]:
        print(f"batch: cut a torn last line ({done['torn_bytes']} bytes) off {output_path}", file=log)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="batch", unit="req", dynamic_ncols=True, file=log)
    gen0 = engine.stats.generation_tokens
    jobs: dict = {}  # engine request id -> _Job
    seen: dict = {}  # custom_id -> first line number
    in_flight = 0

    def finish_line(obj: dict, kind: str) -> None:
        writer.write(obj)
        summary.written += 1
        if kind == "ok":
            summary.succeeded += 1
        elif kind == "request_error":
            summary.failed_requests += 1
        else:
            summary.invalid_lines += 1
        if bar is not None:
            bar.update(1)
            dt = time.monotonic() - t0
            bar.set_postfix(tok_s=f"{(engine.stats.generation_tokens - gen0) / max(dt, 1e-9):.1f}", refresh=False)

    def skip_done() -> None:
        summary.already_done += 1
        if bar is not None:
            bar.update(1)

    def admit(lineno: int, raw: bytes) -> int:
        """Handle one input line; returns the number of engine requests it queued."""
        if not raw.strip():
            return 0
        try:
            obj = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            if line_id(lineno) in done["ids"]:
                skip_done()
            else:
                finish_line(_error_line(lineno, None, "invalid_json_line", f"not valid JSON: {e}"), "invalid")
            return 0
        cid = obj.get("custom_id") if isinstance(obj, dict) else None
        if not isinstance(cid, str) or not cid:
            if line_id(lineno) in done["ids"]:
                skip_done()
            else:
                finish_line(_error_line(lineno, None, "invalid_custom_id",
                                        "each line must be a JSON object with a non-empty string 'custom_id'"),
                            "invalid")
            return 0
        if cid in seen:
            summary.duplicates += 1
            if len(summary.duplicate_custom_ids) < 100:
                summary.duplicate_custom_ids.append(cid)
            if line_id(lineno) in done["ids"]:
                skip_done()
            else:
                finish_line(_error_line(lineno, None, "duplicate_custom_id",
                                        f"custom_id {cid!r} was already used on line {seen[cid]}; only the first "
                                        f"is run"), "invalid")
            return 0
        seen[cid] = lineno
        if cid in done["custom_ids"]:
            skip_done()
            return 0
        method, url = obj.get("method", "POST"), obj.get("url")
        if not isinstance(method, str) or method.upper() != "POST":
            finish_line(_error_line(lineno, cid, "invalid_method", f"method must be POST, got {method!r}"), "invalid")
            return 0
        kind = _KINDS.get(url)
        if kind is None:
            finish_line(_error_line(lineno, cid, "invalid_url",
                                    f"url must be {COMPLETIONS_URL} or {CHAT_URL}, got {url!r}"), "invalid")
            return 0
        body = obj.get("body")
        request_id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-batch-{lineno:08d}"
        try:
            req = serving.parse(kind, body)
            if req.params.seed is None and not req.params.greedy:
                req.params.seed = zlib.crc32(cid.encode()) & 0x7FFFFFFF  # a resumed job samples the same
            ids = [f"{request_id}-{i}" for i in range(len(req.prompts))]
            added = []
            try:
                for rid, prompt_ids in zip(ids, req.prompts):
                    engine.add_request(prompt_ids, req.params, request_id=rid, priority=req.priority or priority)
                    added.append(rid)
            except JaxserveError as e:
                for rid in added:
                    engine.abort_request(rid)
                raise APIError(400, str(e), "invalid_request_error", None, "invalid_request") from None
        except APIError as e:
            finish_line(_response_line(lineno, cid, e.status, request_id, e.body()), "request_error")
            return 0
        job = _Job(lineno, cid, kind, req, ids)
        for rid in ids:
            jobs[rid] = job
        summary.prompt_tokens += sum(len(p) for p in req.prompts)
        return len(ids)

    try:
        with open(input_path, "rb") as f:
            lines = enumerate(f, start=1)
            exhausted = False
            while True:
                while not exhausted and in_flight < max_in_flight:
                    nxt = next(lines, None)
                    if nxt is None:
                        exhausted = True
                        break
                    in_flight += admit(*nxt)
                if not engine.has_unfinished_requests():
                    if exhausted:
                        break
                    continue
                for ro in engine.step():
                    if not ro.finished or ro.request_id not in jobs:
                        continue
                    job = jobs.pop(ro.request_id)
                    in_flight -= 1
                    job.finals[job.engine_ids.index(ro.request_id)] = ro
                    if len(job.finals) == len(job.engine_ids):
                        outs = [job.finals[i] for i in range(len(job.engine_ids))]
                        body = serving.response(job.req, outs, job.engine_ids[0].rsplit("-", 1)[0])
                        finish_line(_response_line(job.lineno, job.custom_id, 200, body["id"], body), "ok")
    finally:
        for rid in list(jobs):
            engine.abort_request(rid)
        writer.close()
        if bar is not None:
            bar.close()
        summary.generation_tokens = engine.stats.generation_tokens - gen0
        summary.elapsed_s = time.monotonic() - t0
    return summary


# ------------------------------------------------------------------------------------------ command line
def add_arguments(p) -> None:
    p.add_argument("--input", "-i", required=True, help="OpenAI batch-format JSONL (custom_id, method, url, body)")
    p.add_argument("--output", "-o", required=True, help="results JSONL; appended to, resumable")
    p.add_argument("--served-model-name", action="append", default=None,
                   help="model name(s) accepted in request bodies (default: --model and the model's own name)")
    p.add_argument("--priority", default="batch", choices=["batch", "interactive"],
                   help="priority class of requests without their own 'priority'")
    p.add_argument("--max-in-flight", type=int, default=None,
                   help="engine requests queued at once (default 4 x max_num_seqs)")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="longest accepted prompt (tokens)")
    p.add_argument("--max-tokens-limit", type=int, default=None, help="largest accepted max_tokens")
    p.add_argument("--fsync-interval", type=float, default=1.0, help="seconds between fsyncs of the output")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--summary-json", default=None, help="also write the final summary as JSON here")


def run_from_args(args, llm) -> int:
    names = args.served_model_name or list(dict.fromkeys([args.model, llm.model_config.name]))
    limits = Limits(max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens_limit)
    summary = run_batch(llm, args.input, args.output, served_model_names=names, limits=limits,
                        priority=args.priority, max_in_flight=args.max_in_flight,
                        fsync_interval_s=args.fsync_interval, progress=not args.no_progress)
    print(summary.report(), file=sys.stderr)
    if args.summary_json:
        with open(args.summary_json, "w") as f:
            json.dump(summary.as_dict(), f, indent=1)
    return 0
