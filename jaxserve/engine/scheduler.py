"""The scheduler: every step, decide which sequences run and with how many new tokens. Host side, no JAX.

With ragged steps (`ragged_ladder` set by the engine, models/ragged.py) every step is one *mixed* step: every
decoding sequence's next token, then prompt chunks in the rest of the token budget, in one flat array of T tokens.
Otherwise a step is either a *prefill* step (R rows x up to Q prompt tokens: chunks of prompts, resumed sequences'
recompute, prefix-cache continuations) or a *decode* step (R rows x 1 token). After a prefill step, if any
sequence is decoding, the next step is a decode step: a long prompt stalls running decodes for at most one
chunk. Admission follows priority (interactive before batch; batch ages so it never starves) within the
KV page budget and `max_num_seqs`. When pages run out, the lowest-priority, newest sequence is preempted
(its pages freed, recomputed later from its prompt + output so far).

The scheduler owns the `BlockManager`: it allocates pages when it schedules (a decode row of a speculative
engine also gets `num_lookahead_slots` extra slots for the drafts a verify step writes) and attaches each row's
block table; after the step, `update` commits the emitted tokens to their sequences, registers the computed
pages in the prefix cache, finishes sequences (stop tokens, length) and frees their pages.

On a pipeline whose runner rotates decode groups through S stages (`rotation`, parallel/pipeline.py), a decode
step sends one group of ~1/S of the decoding sequences into the pipeline and commits the group that left it
(scheduled S - 1 steps earlier); up to S decode steps run per prefill step.

`mode="static"` is the classic baseline: admit a batch only when nothing is running, run it to completion.
Like a static-batching engine's fixed batch tensor (HF `generate`), the batch keeps its decode bucket until its
last sequence finishes: finished rows are padding, their slots are not reused.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from jaxserve.engine.block_manager import BlockManager
from jaxserve.engine.request import Priority, Sequence, Status
from jaxserve.models.ragged_layout import TILE, ragged_size


@dataclass
class ScheduledRow:
    seq: Sequence
    start: int  # tokens already in the cache before this step
    num_new: int  # tokens computed this step
    block_table: list = field(default_factory=list)  # the sequence's pages (group 0's), attached when scheduled
    num_lookahead: int = 0  # extra KV slots reserved past its tokens: drafts a verify step may check
    group_tables: Optional[tuple] = None  # with page groups (config.KVLayout): one table per group

    def tables(self):
        """What the runner's step_inputs takes: the block table, or the tuple of the groups' tables."""
        return self.group_tables if self.group_tables is not None else self.block_table

    @property
    def is_decode(self) -> bool:
        """One new token past the prompt: a decode token (in a ragged step, beside prompt chunks)."""
        return self.num_new == 1 and self.start >= len(self.seq.prompt_token_ids)

    @property
    def samples(self) -> bool:
        """This row's chunk reaches the end of the known tokens, so the step samples its next token."""
        return self.start + self.num_new == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    kind: str  # "prefill" | "decode" | "mixed" (a ragged step: decodes and prompt chunks in one flat array)
    rows: list
    bucket: tuple  # (R, Q) program shape; a mixed step's (rows, T): T its flat token count
    preempted: list = field(default_factory=list)
    rotate: bool = False  # a decode group entering the pipeline (None bucket: nothing enters, it only advances)


@dataclass
class StepUpdate:
    """What `Scheduler.update` committed: output tokens appended, and the sequences that finished."""

    num_tokens: int = 0
    finished: list = field(default_factory=list)


def bucket_for(ladder, n):
    """The smallest bucket of a sorted ladder that holds `n` (None if none does)."""
    for v in ladder:
        if v >= n:
            return v
    return None


class Scheduler:
    """Args:
        engine_cfg: the EngineConfig (ladders, budgets, page size, prefix caching).
        num_pages: KV pages in the cache, the null page included.
        mode: "continuous" or "static" (default: `engine_cfg.scheduler`).
        cache_salt: bytes mixed into every prefix-cache page hash (see BlockManager).
        num_lookahead_slots: KV slots reserved past each decode row's tokens (a speculative engine's k).
        group_windows: the KV layout's page groups (config.KVLayout.group_windows; default one full group).
    """

    def __init__(self, engine_cfg, num_pages: int, mode: Optional[str] = None, batch_aging_s: float = 30.0,
                 cache_salt: bytes = b"", num_lookahead_slots: int = 0, group_windows=(0,)):
        self.cfg = engine_cfg
        self.bm = BlockManager(num_pages, engine_cfg.page_size, engine_cfg.enable_prefix_caching,
                               cache_salt=cache_salt, group_windows=group_windows)
        self.grouped = tuple(group_windows) != (0,)
        self.mode = engine_cfg.scheduler if mode is None else mode
        self.num_lookahead_slots = num_lookahead_slots
        self.batch_aging_s = batch_aging_s
        self.waiting: list = []
        self.running: list = []
        self._last_kind: Optional[str] = None
        self.decode_ladder = engine_cfg.decode_buckets()
        self.prefill_ladder = sorted(engine_cfg.prefill_buckets(), key=lambda rq: (rq[1], rq[0]))
        self.q_ladder = sorted({q for _, q in self.prefill_ladder})
        self.num_preemptions = 0
        self._static_batch = 0  # static mode: sequences admitted into the current batch
        self._static_open = True  # static mode: the current batch still admits (nothing decoded yet)
        self._static_candidates: set = set()  # static mode: requests waiting when the batch opened
        # Pipelining across steps (set by the engine when its runner rotates decode groups through S pipeline
        # stages): a decode step schedules one group of about 1/S of the decoding sequences, whose tokens come back
        # S - 1 steps later; until then its sequences are `in_flight` (not scheduled, never preempted; an abort
        # frees their pages only when they leave the pipeline, whose later stages still write them).
        self.rotation = 0
        self.in_flight: dict = {}  # seq_id -> Sequence
        self._calls_since_prefill = 1 << 30
        # Ragged steps (set by the engine when its runner has them, models/ragged.py): every step is one "mixed"
        # step of T flat tokens from this ladder, all decodes first, then prompt chunks in the rest of the budget.
        self.ragged_ladder: Optional[list] = None

    # ---------------------------------------------------------------- queue management
    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.in_flight)

    def num_waiting(self, priority: Optional[Priority] = None) -> int:
        if priority is None:
            return len(self.waiting)
        return sum(1 for s in self.waiting if s.priority == priority)

    def abort(self, request_id: str) -> list:
        """Remove a request's sequences from both queues and free their pages at once."""
        hit = [s for s in self.waiting + self.running if s.request_id == request_id]
        for s in hit:
            if s.seq_id in self.in_flight:  # its pages stay until it leaves the pipeline (`update` frees them)
                self.running.remove(s)
            else:
                self._remove(s)
        return hit

    def _remove(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        self.bm.free(seq.seq_id)

    def _effective_priority(self, seq: Sequence, now: float) -> int:
        if seq.priority == Priority.BATCH and now - seq.metrics.arrival > self.batch_aging_s:
            return int(Priority.INTERACTIVE)  # aged batch work competes as interactive: no starvation
        return int(seq.priority)

    def _order_waiting(self) -> None:
        now = time.monotonic()
        # Preempted sequences keep their original arrival, so they go back near the front.
        self.waiting.sort(key=lambda s: (self._effective_priority(s, now), s.metrics.arrival, s.seq_id))

    def _preempt(self, victim: Sequence, out: list) -> None:
        self.running.remove(victim)
        self.bm.free(victim.seq_id)
        victim.status = Status.WAITING
        victim.num_computed_tokens = 0
        victim.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.append(victim)
        out.append(victim)

    def _pick_victim(self, exclude=()) -> Optional[Sequence]:
        cands = [s for s in self.running if s not in exclude]
        if not cands:
            return None
        return max(cands, key=lambda s: (int(s.priority), s.metrics.arrival, s.seq_id))

    # ---------------------------------------------------------------- the step decision
    def schedule(self) -> Optional[SchedulerOutput]:
        preempted: list = []
        if not self.running:
            self._static_batch = 0
            self._static_open = True
            self._static_candidates = {seq.seq_id for seq in self.waiting}  # the batch forms from these
        decodes = [s for s in self.running if not s.in_prefill]
        out = None
        if self.mode == "static":
            # Fill the batch (up to max_num_seqs and the page budget) and prefill all of it, then decode it
            # to the end; the next batch is admitted when nothing is left running.
            out = self._schedule_prefill(preempted)
            if out is None and decodes:
                self._static_open = False
                out = self._schedule_decode(preempted)
        elif self.ragged_ladder:
            out = self._schedule_mixed(preempted)
        else:
            # One decode step per prefill step; rotating decode groups: up to S (a call advances 1/S of the decodes).
            rotating = self.rotation and (self.in_flight or len(decodes) >= self.rotation)
            if not (self._calls_since_prefill < (self.rotation if rotating else 1) and decodes):
                out = self._schedule_prefill(preempted)
            if out is None and decodes:
                out = self._schedule_decode(preempted)
            if out is None and self.in_flight:  # every decode is in the pipeline: advance it, nothing enters
                out = SchedulerOutput("decode", [], None, rotate=True)
            if out is None:
                out = self._schedule_prefill(preempted)
        if out is not None:
            out.preempted = preempted
            self._last_kind = out.kind
            self._calls_since_prefill = 0 if out.kind == "prefill" else self._calls_since_prefill + 1
            if out.kind == "decode" and self.num_lookahead_slots:
                self._reserve_lookahead(out.rows)
            for row in out.rows:
                row.block_table = self.bm.block_table(row.seq.seq_id)
                if self.grouped:
                    row.group_tables = self.bm.group_tables(row.seq.seq_id)
        return out

    def _reserve_lookahead(self, rows: list) -> None:
        """Slots for the drafts a verify step writes past each row's last token: never past the row's
        max_tokens (its last emitted token is the bonus/correction), and never at another sequence's expense
        (a row whose slots do not fit verifies no drafts this step)."""
        for row in rows:
            s = row.seq
            k = min(self.num_lookahead_slots, s.max_tokens - len(s.output_token_ids) - 1)
            if k > 0 and self.bm.ensure_capacity(s.seq_id, s.num_tokens + k):
                row.num_lookahead = k

    def _admit(self, seq: Sequence) -> None:
        # A prompt whose logprobs are still to compute runs whole: a cached prefix has no hidden states.
        cached = self.bm.allocate_prompt(seq.seq_id, seq.all_token_ids, lookup=not seq.needs_prompt_logprobs)
        seq.num_computed_tokens = cached
        if seq.metrics.first_scheduled is None:
            seq.metrics.first_scheduled = time.monotonic()
            seq.metrics.num_cached_prompt_tokens = cached
        seq.status = Status.RUNNING
        self.waiting.remove(seq)
        self.running.append(seq)
        if self.mode == "static":
            self._static_batch += 1

    def _schedule_prefill(self, preempted: list) -> Optional[SchedulerOutput]:
        budget = self.cfg.max_num_batched_tokens
        rows: list = []
        q_bucket = None
        max_rows = self.cfg.max_prefill_seqs

        def try_add(seq: Sequence) -> bool:
            nonlocal q_bucket, max_rows
            remaining = seq.num_uncomputed
            if q_bucket is None:
                q_bucket = bucket_for(self.q_ladder, min(remaining, budget))
                max_rows = max(r for r, q in self.prefill_ladder if q == q_bucket)
            if len(rows) >= max_rows:
                return False
            n = min(remaining, q_bucket)
            if not self.bm.ensure_capacity(seq.seq_id, seq.num_computed_tokens + n):
                return False
            rows.append(ScheduledRow(seq, seq.num_computed_tokens, n))
            return True

        # 1) sequences already admitted and mid-prompt hold pages: finish them first.
        for seq in sorted((s for s in self.running if s.in_prefill), key=lambda s: (int(s.priority), s.metrics.arrival)):
            if len(rows) >= max_rows or not try_add(seq):
                break

        # 2) admit waiting sequences in priority order.
        can_admit = self.mode == "continuous" or self._static_open
        if can_admit and self.waiting:
            self._order_waiting()
            for seq in list(self.waiting):
                if len(rows) >= max_rows:
                    break
                if self.mode == "static" and seq.seq_id not in self._static_candidates:
                    continue  # arrived after this batch formed: it waits for the next one
                if not self._admit_with(seq, try_add, preempted, rows):
                    break
        if not rows:
            return None
        r_bucket = bucket_for([r for r, q in self.prefill_ladder if q == q_bucket], len(rows))
        return SchedulerOutput("prefill", rows, (r_bucket, q_bucket))

    def _admit_with(self, seq: Sequence, add: Callable[[Sequence], bool], preempted: list, rows: list) -> bool:
        """Admit a waiting sequence (room made under max_num_seqs if it may evict batch work) and schedule its first
        chunk with `add(seq)`. When it does not fit, it goes back to the queue (keeping the order) unless an
        interactive request can evict batch work: False (admission stops for this step)."""
        if len(self.running) >= self.cfg.max_num_seqs and not self._make_room_for(seq, preempted, rows):
            return False
        self._admit(seq)
        if add(seq) or (self._make_room_for(seq, preempted, rows) and add(seq)):
            return True
        self.running.remove(seq)
        self.bm.free(seq.seq_id)
        seq.status = Status.WAITING
        seq.num_computed_tokens = 0
        self.waiting.append(seq)
        return False

    def _make_room_for(self, seq: Sequence, preempted: list, rows: list) -> bool:
        """Interactive requests may preempt running batch work (newest first)."""
        if seq.priority != Priority.INTERACTIVE or self.mode != "continuous":
            return False
        scheduled = {r.seq for r in rows}
        batch_running = [s for s in self.running if s.priority == Priority.BATCH and s not in scheduled
                         and s is not seq and s.seq_id not in self.in_flight]
        if not batch_running:
            return False
        victim = max(batch_running, key=lambda s: (s.metrics.arrival, s.seq_id))
        self._preempt(victim, preempted)
        return True

    def _schedule_decode(self, preempted: list) -> Optional[SchedulerOutput]:
        decoding = sum(1 for s in self.running if not s.in_prefill)
        # One group of ~1/S of the decoding sequences; every group in flight shares its bucket. Fewer decoding
        # sequences than stages cannot keep them busy (a sequence's tokens depend on each other): one GPipe step
        # then gives the same stage use in one call instead of S.
        rotate = bool(self.rotation) and (decoding >= self.rotation or bool(self.in_flight))
        cap = self.cfg.max_num_seqs
        if rotate:
            cap = min(cap, -(-decoding // self.rotation))
        rows = self._decode_rows(preempted, cap)
        if not rows:
            return None
        width = len(rows)
        if self.mode == "static":  # the batch holds its slots until its last sequence finishes
            width = min(max(width, self._static_batch), self.decode_ladder[-1])
        if rotate:
            width = cap
            for row in rows:
                self.in_flight[row.seq.seq_id] = row.seq
        return SchedulerOutput("decode", rows, (bucket_for(self.decode_ladder, width), 1), rotate=rotate)

    def _decode_rows(self, preempted: list, cap: int) -> list:
        """One-token rows for up to `cap` decoding sequences (priority, then arrival order) whose next slot fits,
        preempting the lowest-priority newest sequences (never one in flight) to make room."""
        rows: list = []
        scheduled: set = set(self.in_flight.values())  # (never preempted: their pages are still being written)
        order = sorted((s for s in self.running if not s.in_prefill and s.seq_id not in self.in_flight),
                       key=lambda s: (int(s.priority), s.metrics.arrival, s.seq_id))
        for seq in order[:cap]:
            if seq.status is not Status.RUNNING:
                continue  # preempted earlier in this loop
            fits = self.bm.ensure_capacity(seq.seq_id, seq.num_tokens)
            while not fits:
                victim = self._pick_victim(exclude=scheduled)  # None: only sequences in flight left to evict
                if victim is None:
                    break
                self._preempt(victim, preempted)
                if victim is seq:
                    break
                fits = self.bm.ensure_capacity(seq.seq_id, seq.num_tokens)
            if fits:
                rows.append(ScheduledRow(seq, seq.num_computed_tokens, 1))
                scheduled.add(seq)
        return rows

    def _schedule_mixed(self, preempted: list) -> Optional[SchedulerOutput]:
        """A ragged step (vLLM v1's policy): every decoding sequence's next token first, then prompt chunks (those
        mid-prompt first, then admissions in priority order) in what is left of `max_num_batched_tokens`. A chunk
        cut short ends on a tile boundary (models/ragged.py lays chunks out tile-aligned), so only a prompt's last
        chunk pads; T is the smallest ladder entry holding the layout."""
        rows = self._decode_rows(preempted, self.cfg.max_num_seqs)
        sizes = [1] * len(rows)
        budget = self.cfg.max_num_batched_tokens
        cut_min = max(2, TILE // 2)

        def take(seq: Sequence) -> bool:
            left = budget - ragged_size(sizes)
            remaining = seq.num_uncomputed
            n = remaining
            if left <= 0:
                return False
            if ragged_size(sizes + [n]) > budget:
                n = left // TILE * TILE or min(left, cut_min - 1, remaining)
            if not self.bm.ensure_capacity(seq.seq_id, seq.num_computed_tokens + n):
                return False
            rows.append(ScheduledRow(seq, seq.num_computed_tokens, n))
            sizes.append(n)
            return True

        for seq in sorted((s for s in self.running if s.in_prefill), key=lambda s: (int(s.priority), s.metrics.arrival)):
            if not take(seq):
                break
        if self.waiting and ragged_size(sizes) < budget:
            self._order_waiting()
            for seq in list(self.waiting):
                if ragged_size(sizes) >= budget or not self._admit_with(seq, take, preempted, rows):
                    break
        if not rows:
            return None
        size = ragged_size([r.num_new for r in rows])
        return SchedulerOutput("mixed", rows, (self.cfg.max_num_seqs, bucket_for(self.ragged_ladder, size)))

    # ---------------------------------------------------------------- after the step
    def update(self, out: SchedulerOutput, emitted: list, now: float,
               stop_check: Optional[Callable[[Sequence, int], object]] = None) -> StepUpdate:
        """Commit a step's results. `emitted[i]`: the SampledTokens row i produced, in order (none for a prefill
        chunk short of the prompt's end, one for a sampled row, the accepted drafts + the bonus/correction for
        a verified row). Appends them to the sequence until it finishes (a stop token, `stop_check`, max_tokens
        or the context), advances `num_computed_tokens`, registers full computed pages in the prefix cache,
        and removes finished sequences (their pages freed).

        `stop_check(seq, token)` runs after each appended token that is not a stop token (the engine's
        detokenizer and stop strings); a non-None return (the stop string) finishes the sequence there.
        """
        res = StepUpdate()
        for row, toks in zip(out.rows, emitted):
            seq = row.seq
            if self.in_flight.pop(seq.seq_id, None) is not None and seq.finished:
                self.bm.free(seq.seq_id)  # aborted while in the pipeline
                continue
            n = 0
            for t in toks:
                if seq.finished:
                    break
                seq.append_token(t, now)
                n += 1
                self._check_finished(seq, t.token, stop_check)
            res.num_tokens += n
            # A row's KV covers its scheduled tokens; a verify step's, the last known token and the accepted
            # drafts, i.e. one position per appended token (rejected drafts' slots are simply rewritten later).
            seq.num_computed_tokens = row.start + max(row.num_new, n)
            self.bm.commit_computed(seq.seq_id, seq.all_token_ids, seq.num_computed_tokens)
            self.bm.trim_window(seq.seq_id, seq.num_computed_tokens)  # sliding groups: pages out of the window
            if seq.finished:
                self._remove(seq)
                res.finished.append(seq)
        return res

    @staticmethod
    def _check_finished(seq: Sequence, token: int, stop_check) -> None:
        if token in seq.stop_token_ids:  # the sampler bans them until min_tokens is met
            seq.finish("stop", None if token in seq.eos_token_ids else token)
            return
        if stop_check is not None:
            stop = stop_check(seq, token)
            if stop is not None:
                seq.finish("stop", stop or None)  # "": a structured output's grammar ended
                return
        if len(seq.output_token_ids) >= seq.max_tokens or seq.num_tokens >= seq.max_len:
            seq.finish("length")
