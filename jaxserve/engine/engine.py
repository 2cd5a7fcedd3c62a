"""The engine loop: requests in, one scheduled step at a time, outputs out.

`LLMEngine.add_request` validates and enqueues (a bad request raises a `jaxserve` error and touches nothing
else); `step()` is schedule -> execute -> update -> outputs: the scheduler picks a batch (pages allocated, block
tables attached), the runner (or, for decode steps, the speculator) executes it, the scheduler's `update`
commits the emitted tokens and finishes and frees sequences, with the engine's detokenizer and stop strings
as its stop check, and the requests whose output changed are returned.
"""

from __future__ import annotations

import itertools
import math
import logging
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Optional, Union

from jaxserve.config import EngineConfig, ModelConfig
from jaxserve.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from jaxserve.engine.request import Priority, SampledToken, Sequence
from jaxserve.engine.sampling_inputs import request_token_mask
from jaxserve.engine.scheduler import Scheduler, StepUpdate
from jaxserve.engine.structured import GrammarCompiler, consume
from jaxserve.errors import (InvalidConfigError, InvalidPromptError, InvalidSamplingParamsError,
                             RequestTooLargeError)
from jaxserve.sampling_params import SamplingParams

log = logging.getLogger("jaxserve")


RECENT_LATENCIES = 10_000


@dataclass
class EngineStats:
    """Cumulative counters since start (tokens, steps, seconds)."""

    steps: int = 0
    prefill_steps: int = 0
    decode_steps: int = 0
    prompt_tokens_computed: int = 0
    generation_tokens: int = 0
    requests_finished: int = 0
    requests_aborted: int = 0
    busy_seconds: float = 0.0
    mixed_steps: int = 0  # ragged steps that computed prompt chunks and decode tokens together
    padded_prompt_tokens: int = 0  # token slots of prefill steps, padding included (R x Q; a ragged step's T - decodes)
    # Wall time of step() split in two: waiting on the device (the runner's dispatch -> sampled ids on the host)
    # and everything else (scheduling, input building, bookkeeping, detokenization, outputs).
    device_seconds: float = 0.0
    host_seconds: float = 0.0
    kind_seconds: dict = field(default_factory=lambda: {"prefill": 0.0, "decode": 0.0})
    kind_tokens: dict = field(default_factory=lambda: {"prefill": 0, "decode": 0})  # tokens computed
    # The most recent finished requests' latencies (bounded: a long-running server must not grow without end).
    ttfts: deque = field(default_factory=lambda: deque(maxlen=RECENT_LATENCIES))
    tpots: deque = field(default_factory=lambda: deque(maxlen=RECENT_LATENCIES))


class _Request:
    def __init__(self, request_id, prompt, prompt_ids, params, seqs):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_ids = prompt_ids
        self.params = params
        self.seqs = seqs


class LLMEngine:
    """Args:
        runner: the executor (default: a ModelRunner on `params`); anything with `execute(kind, rows, bucket)`
            returning a StepResult-like (tokens, logprobs, top_ids, top_logprobs) tuple of numpy arrays.
        speculator: None, or a factory `runner -> Speculator` (jaxserve.speculative.speculator_factory): the
            speculator then runs every decode step, and the scheduler reserves its lookahead slots.
    """

    def __init__(self, model_cfg: ModelConfig, engine_cfg: EngineConfig, params, tokenizer,
                 num_pages: Optional[int] = None, runner=None, speculator=None):
        engine_cfg.validate(model_cfg)
        self.model_cfg = model_cfg
        self.cfg = engine_cfg
        self.tokenizer = tokenizer
        self.max_model_len = engine_cfg.model_len(model_cfg)
        if num_pages is None:
            from jaxserve.planner import num_kv_pages

            num_pages = num_kv_pages(model_cfg, engine_cfg)
        self.num_pages = num_pages
        if runner is None:
            from jaxserve.engine.runner import ModelRunner

            runner = ModelRunner(model_cfg, engine_cfg, params, num_pages)
        self.runner = runner
        # Speculative decoding (jaxserve/speculative, docs/speculative.md): owns every decode step when set.
        self.speculator = speculator(runner) if speculator is not None else None
        salt = f"{model_cfg.name}|{engine_cfg.dtype}|{engine_cfg.kv_cache_dtype}".encode()
        layout = getattr(runner, "kv_layout", None)  # (a fake runner: one plain group)
        self.scheduler = Scheduler(engine_cfg, num_pages, cache_salt=salt,
                                   num_lookahead_slots=self.speculator.K if self.speculator is not None else 0,
                                   group_windows=layout.group_windows if layout is not None else (0,))
        # Ragged steps (EngineConfig.step_mode, models/ragged.py): decodes and prompt chunks share every step.
        self.ragged = False
        if engine_cfg.step_mode != "buckets":
            why = self._ragged_unsupported()
            if why is None:
                runner.enable_ragged()
                self.scheduler.ragged_ladder = runner.ragged_ladder()
                self.ragged = True
            elif engine_cfg.step_mode == "ragged":
                raise InvalidConfigError(f"step_mode='ragged' is not available: {why}")
        self.requests: dict = {}
        self.stats = EngineStats()
        self._seq_ids = itertools.count(1)
        self._req_ids = itertools.count()
        self._rng = random.Random(engine_cfg.seed)
        self.grammars = GrammarCompiler(tokenizer, model_cfg.vocab_size, model_cfg.eos_token_ids)

    def _ragged_unsupported(self):
        """Why this engine cannot run ragged steps, or None."""
        if self.cfg.scheduler != "continuous":
            return "the static scheduler runs bucketed steps (its fixed batch is the baseline it stands for)"
        if self.speculator is not None:
            return "speculative decoding verifies in bucketed steps so far"
        check = getattr(self.runner, "ragged_unsupported", None)
        if check is None:
            return "this runner has no ragged steps"
        return check(explicit=self.cfg.step_mode == "ragged")

    @property
    def bm(self):
        """The scheduler's BlockManager (read here for metrics and tests)."""
        return self.scheduler.bm

    # ------------------------------------------------------------------ requests
    def tokenize_prompt(self, prompt: Union[str, list]) -> list:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidPromptError("prompt is empty: pass at least one character or token id")
            return self.tokenizer.encode(prompt)
        ids = list(prompt)
        if not ids:
            raise InvalidPromptError("prompt token list is empty")
        V = self.model_cfg.vocab_size
        bad = [t for t in ids if not isinstance(t, (int,)) and not hasattr(t, "__index__")]
        if bad or any(not (0 <= int(t) < V) for t in ids):
            raise InvalidPromptError(f"prompt token ids must be integers in [0, {V}); got e.g. {ids[:8]!r}")
        return [int(t) for t in ids]

    def add_request(self, prompt: Union[str, list], params: Optional[SamplingParams] = None,
                    request_id: Optional[str] = None, priority="interactive") -> str:
        """Validate and enqueue. Raises a jaxserve error (and enqueues nothing) on bad input."""
        params = params or SamplingParams()
        params.validate(self.cfg.max_logprobs)
        priority = Priority.parse(priority)
        if params.min_tokens and len(set(params.stop_token_ids) | set(self.model_cfg.eos_token_ids)) > 16:
            raise InvalidSamplingParamsError("min_tokens supports at most 16 stop token ids (EOS included)")
        params.check_vocab(self.model_cfg.vocab_size)
        self._check_prompt_logprobs(params)
        token_mask, bad_word_ids = None, []
        if params.has_token_mask:
            if params.bad_words and self.tokenizer is None:
                raise InvalidSamplingParamsError("bad_words need a tokenizer; this engine has none")
            token_mask, bad_word_ids = request_token_mask(
                params, self.model_cfg.vocab_size,
                encode=(lambda t: self.tokenizer.encode(t, add_bos=False)) if self.tokenizer is not None else None)
        grammar = None
        if params.structured_outputs is not None:  # compile (or fetch) the grammar; refused here if it is bad
            grammar = self.grammars.matcher(params.structured_outputs)
        prompt_ids = self.tokenize_prompt(prompt)
        if len(prompt_ids) >= self.max_model_len:
            raise InvalidPromptError(
                f"prompt has {len(prompt_ids)} tokens but the context is {self.max_model_len} tokens "
                f"(at least one must be left to generate); shorten the prompt or raise max_model_len")
        need = min(len(prompt_ids) + (params.max_tokens or self.max_model_len), self.max_model_len)
        step = self.cfg.max_num_batched_tokens + self.scheduler.num_lookahead_slots
        pages = self.bm.max_pages(need, step)  # every page group's (sliding ones: their window's)
        if pages > self.num_pages - 1:
            raise RequestTooLargeError(
                f"request needs {pages} KV pages ({need} tokens) but the cache has {self.num_pages - 1}; "
                f"lower max_tokens or give the engine a larger kv_cache_bytes")
        if request_id is None:
            request_id = f"req-{next(self._req_ids)}"
        if request_id in self.requests:
            raise InvalidPromptError(f"request_id {request_id!r} is already in use")
        seqs = []
        for i in range(params.n):
            seed = params.seed + i if params.seed is not None else self._rng.getrandbits(31)
            seq = Sequence(next(self._seq_ids), request_id, i, prompt_ids, params, seed, priority,
                           self.model_cfg.eos_token_ids, self.max_model_len)
            seq.token_mask, seq.bad_word_ids = token_mask, bad_word_ids
            if grammar is not None:
                seq.grammar = grammar if i == 0 else grammar.deep_copy()
            if self.tokenizer is not None:
                from jaxserve.weights.tokenizer import IncrementalDetokenizer

                seq.detokenizer = IncrementalDetokenizer(self.tokenizer, prompt_ids, params.skip_special_tokens)
            seqs.append(seq)
        if params.prompt_logprobs is not None:
            seqs[0].prompt_logprobs = [None]  # computed once, by the first sample (n > 1 reports them once)
        self.requests[request_id] = _Request(request_id, prompt if isinstance(prompt, str) else None,
                                             prompt_ids, params, seqs)
        for s in seqs:
            self.scheduler.add(s)
        return request_id

    def _check_prompt_logprobs(self, params: SamplingParams) -> None:
        """prompt_logprobs need a runner whose prefill steps return hidden states (not the pipeline's)."""
        if params.prompt_logprobs is not None and not getattr(self.runner, "supports_prompt_logprobs", False):
            raise InvalidSamplingParamsError(
                "prompt_logprobs are not supported by this engine's placement (a pipeline over stages, or a runner "
                "without hidden-state outputs); send the request without prompt_logprobs or serve without "
                "pipeline stages")

    def abort_request(self, request_id: str) -> bool:
        """Stop a waiting or running request; its pages are freed immediately."""
        req = self.requests.get(request_id)
        if req is None:
            return False
        self.scheduler.abort(request_id)
        for s in req.seqs:
            s.finish("abort")
            if self.speculator is not None:
                self.speculator.forget(s.seq_id)
        # No step reports an aborted request, so drop it here (a long-running server would leak it).
        self.requests.pop(request_id, None)
        self.stats.requests_aborted += 1
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work()

    # ------------------------------------------------------------------ the step
    def step(self) -> list:
        """Run one scheduled step; return RequestOutputs of requests that changed (finished ones last time)."""
        start, device0 = time.perf_counter(), getattr(self.runner, "device_seconds", 0.0)
        sched = self.scheduler
        if sched.mode == "continuous" and self.speculator is None and not sched.in_flight:
            sched.rotation = getattr(self.runner, "rotation_stages", 0)  # (a pipeline's runner, once compiled)
        out = sched.schedule()
        if out is None:
            return []
        t0 = time.monotonic()
        if out.rotate:  # the groups leaving the pipeline (rows pushed S - 1 calls ago)
            done = [(o, self._emitted(o, res)) for o, res in
                    self.runner.rotate(out.bucket[0] if out.bucket else None, (out, out.rows) if out.rows else None)]
        else:
            done = [(out, self._execute(out))]
        now = time.monotonic()
        upd = StepUpdate()
        for o, emitted in done:
            u = sched.update(o, emitted, now, stop_check=self._detokenize)
            upd.num_tokens += u.num_tokens
            upd.finished += u.finished
        self._record(out, upd, now - t0)
        changed = dict.fromkeys(row.seq.request_id for o, _ in done for row in o.rows)
        outputs = [self._request_output(self.requests[rid]) for rid in changed if rid in self.requests]
        device = getattr(self.runner, "device_seconds", 0.0) - device0
        self.stats.device_seconds += device
        self.stats.host_seconds += time.perf_counter() - start - device
        return outputs

    def _execute(self, out) -> list:
        """Per row, the SampledTokens the step emitted (decode steps go to the speculator when there is one)."""
        if out.kind == "decode" and self.speculator is not None:
            return self.speculator.execute(out.rows, out.bucket)
        spans = self._prompt_logprob_spans(out)
        if spans:
            (tokens, lps, top_ids, top_lps), scored = self.runner.execute_scored(out.kind, out.rows, out.bucket,
                                                                                  spans)
            for i, (lo, _) in spans.items():
                out.rows[i].seq.add_prompt_logprobs(lo, *scored[i])
        else:
            return self._emitted(out, self.runner.execute(out.kind, out.rows, out.bucket))
        return self._emitted(out, (tokens, lps, top_ids, top_lps))

    @staticmethod
    def _emitted(out, result) -> list:
        tokens, lps, top_ids, top_lps = result
        return [[SampledToken(int(tokens[i]), float(lps[i]), top_ids[i], top_lps[i])] if row.samples else []
                for i, row in enumerate(out.rows)]

    @staticmethod
    def _prompt_logprob_spans(out) -> dict:
        """{row index: (lo, hi)}: the prompt positions of a prefill step whose logprobs are still to compute."""
        if out.kind == "decode":
            return {}
        spans = {}
        for i, row in enumerate(out.rows):
            span = row.seq.prompt_logprob_span(row.start, row.num_new)
            if span is not None:
                spans[i] = span
        return spans

    def _detokenize(self, seq: Sequence, token: int):
        """The scheduler's stop check: extend the text and advance the grammar; the stop string that ended it
        (or the grammar's end, stop_reason None), or None."""
        ended = False
        if seq.grammar is not None:
            state = consume(seq.grammar, token)
            if state == "error":  # cannot happen for a masked sample; stop rather than emit ungrammatical text
                log.warning("sequence %s: token %d is outside its grammar (%s); stopping it", seq.seq_id, token,
                            seq.grammar.get_error())
            ended = state is not None
        stop = None
        if seq.detokenizer is not None:
            delta = seq.detokenizer.add(token)
            if delta:
                seq.output_text += delta
                stop = self._check_stop_strings(seq, len(delta)) if seq.params.stop else None
        if stop is None and ended:
            return ""  # (stop strings are never empty: the scheduler reports this one as stop_reason None)
        return stop

    def _record(self, out, upd, seconds: float) -> None:
        st = self.stats
        st.busy_seconds += seconds
        st.steps += 1
        if out.kind == "mixed":
            # A ragged step counts as a prefill step when it computes any prompt chunk (its time goes there; its
            # decode rows' tokens still count as decode tokens), else as a decode step.
            dec = sum(1 for r in out.rows if r.is_decode)
            pre = sum(r.num_new for r in out.rows) - dec
            kind = "prefill" if pre else "decode"
            st.kind_tokens["prefill"] += pre
            st.kind_tokens["decode"] += dec
            st.prompt_tokens_computed += pre
            st.padded_prompt_tokens += out.bucket[1] - dec if pre else 0
            if pre and dec:
                st.mixed_steps += 1
        else:
            kind = out.kind
            st.kind_tokens[kind] += sum(r.num_new for r in out.rows)
            if kind == "prefill":
                st.prompt_tokens_computed += sum(r.num_new for r in out.rows)
                st.padded_prompt_tokens += out.bucket[0] * out.bucket[1]
        st.kind_seconds[kind] += seconds
        if kind == "prefill":
            st.prefill_steps += 1
        else:
            st.decode_steps += 1
        st.generation_tokens += upd.num_tokens
        for seq in upd.finished:
            self._finished(seq)

    def _check_stop_strings(self, seq: Sequence, delta_len: int):
        text = seq.output_text
        best = None
        for stop in seq.params.stop:
            idx = text.find(stop, max(0, len(text) - delta_len - len(stop) + 1))
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, stop)
        if best is None:
            return None
        idx, stop = best
        seq.output_text = text[: idx + (len(stop) if seq.params.include_stop_str_in_output else 0)]
        return stop

    def _finished(self, seq: Sequence) -> None:
        """Count a sequence that finished (not aborted) and let the speculator forget it."""
        self.stats.requests_finished += 1
        if seq.metrics.ttft is not None:
            self.stats.ttfts.append(seq.metrics.ttft)
        tpot = seq.metrics.tpot(len(seq.output_token_ids))
        if tpot is not None:
            self.stats.tpots.append(tpot)
        if self.speculator is not None:
            self.speculator.forget(seq.seq_id)

    # ------------------------------------------------------------------ outputs
    def _visible_text(self, seq: Sequence) -> str:
        """Text safe to show now: while running, hold back a tail that could still become a stop string."""
        if seq.finished or not seq.params.stop:
            return seq.output_text
        hold = max(len(s) for s in seq.params.stop) - 1
        return seq.output_text[: max(0, len(seq.output_text) - hold)]

    def _request_output(self, req: _Request) -> RequestOutput:
        outs = []
        for s in req.seqs:
            outs.append(CompletionOutput(
                index=s.index,
                text=self._visible_text(s),
                token_ids=list(s.output_token_ids),
                cumulative_logprob=s.cumulative_logprob,
                logprobs=list(s.output_logprobs) if s.params.logprobs is not None else None,
                finish_reason=s.finish_reason,
                stop_reason=s.stop_reason,
            ))
        finished = all(s.finished for s in req.seqs)
        first = req.seqs[0].metrics
        m = RequestMetrics(
            arrival_time=first.arrival,
            ttft=first.ttft,
            tpot=first.tpot(len(req.seqs[0].output_token_ids)),
            e2e=(first.finished - first.arrival) if first.finished else None,
            num_cached_prompt_tokens=first.num_cached_prompt_tokens,
            num_preemptions=sum(s.metrics.num_preemptions for s in req.seqs),
        )
        ro = RequestOutput(req.request_id, req.prompt, list(req.prompt_ids), outs, finished, m)
        ro.prompt_logprobs = self._prompt_logprobs_of(req)
        if finished:
            self.requests.pop(req.request_id, None)
        return ro

    @staticmethod
    def _prompt_logprobs_of(req: _Request) -> Optional[list]:
        """The request's prompt logprobs once all computed (None before, or when not asked for)."""
        s = req.seqs[0]
        if s.prompt_logprobs is None or s.needs_prompt_logprobs:
            return None
        return s.prompt_logprobs

    # ------------------------------------------------------------------ metrics
    def metrics(self) -> dict:
        bm = self.bm.stats()
        return {
            "num_waiting": len(self.scheduler.waiting),
            "num_waiting_interactive": self.scheduler.num_waiting(Priority.INTERACTIVE),
            "num_waiting_batch": self.scheduler.num_waiting(Priority.BATCH),
            "num_running": len(self.scheduler.running),
            "kv_pages_total": self.num_pages - 1,
            "kv_pages_used": bm.get("used"),
            "kv_usage": self.bm.usage(),
            "prefix_hit_rate": bm.get("hit_rate"),
            "num_preemptions": self.scheduler.num_preemptions,
            "steps": self.stats.steps,
            # ragged steps (models/ragged.py): steps that mixed prompt chunks and decodes, and the token slots the
            # prefill-carrying steps computed per real prompt token (padding's cost; bucketed steps: R x Q)
            "step_mode": "ragged" if self.ragged else "buckets",
            "mixed_steps": self.stats.mixed_steps,
            "prompt_padding_ratio": (self.stats.padded_prompt_tokens / self.stats.prompt_tokens_computed
                                     if self.stats.prompt_tokens_computed else None),
            "generation_tokens": self.stats.generation_tokens,
            "prompt_tokens_computed": self.stats.prompt_tokens_computed,
            "generation_tokens_per_s": self.stats.generation_tokens / self.stats.busy_seconds if self.stats.busy_seconds else 0.0,
            "requests_finished": self.stats.requests_finished,
            "requests_aborted": self.stats.requests_aborted,
            "step_host_seconds": self.stats.host_seconds,
            "step_device_seconds": self.stats.device_seconds,
            # pipeline stages (stage > 1): stage-ticks with work / all stage-ticks (ModelRunner.stage_ticks)
            "pipeline_stage_busy": _ratio(getattr(self.runner, "stage_ticks", None)),
            "pipeline_rotation_calls": getattr(self.runner, "rotation_calls", 0),
            "host_ms_per_step": 1e3 * self.stats.host_seconds / self.stats.steps if self.stats.steps else None,
            "device_ms_per_step": 1e3 * self.stats.device_seconds / self.stats.steps if self.stats.steps else None,
            **_percentiles("ttft_s", self.stats.ttfts),
            **_percentiles("tpot_s", self.stats.tpots),
            **(self.speculator.metrics() if self.speculator is not None else {}),
        }


def _ratio(pair):
    return pair[0] / pair[1] if pair and pair[1] else None


def _percentiles(name: str, values) -> dict:
    """p50/p99 over the recent finished requests (None before any finished)."""
    vals = sorted(values)
    if not vals:
        return {f"{name}_p50": None, f"{name}_p99": None}

    def q(p):  # nearest-rank percentile
        return vals[min(len(vals), max(1, math.ceil(p / 100 * len(vals)))) - 1]

    return {f"{name}_p50": q(50), f"{name}_p99": q(99)}
