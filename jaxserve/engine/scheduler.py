"""The scheduler: every step, decide which sequences run and with how many new tokens. Host side, no JAX.

A step is either a *prefill* step (R rows x up to Q prompt tokens: chunks of prompts, resumed sequences'
recompute, prefix-cache continuations) or a *decode* step (R rows x 1 token). After a prefill step, if any
sequence is decoding, the next step is a decode step: a long prompt stalls running decodes for at most one
chunk. Admission follows priority (interactive before batch; batch ages so it never starves) within the
KV page budget and `max_num_seqs`. When pages run out, the lowest-priority, newest sequence is preempted
(its pages freed, recomputed later from its prompt + output so far).

`mode="static"` is the classic baseline: admit a batch only when nothing is running, run it to completion.
Like a static-batching engine's fixed batch tensor (HF `generate`), the batch keeps its decode bucket until its
last sequence finishes: finished rows are padding, their slots are not reused.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

from jaxserve.engine.request import Priority, Sequence, Status


@dataclass
class ScheduledRow:
    seq: Sequence
    start: int  # tokens already in the cache before this step
    num_new: int  # tokens computed this step
    block_table: list = field(default_factory=list)  # filled by the engine just before the step runs

    @property
    def samples(self) -> bool:
        """This row's chunk reaches the end of the known tokens, so the step samples its next token."""
        return self.start + self.num_new == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    kind: str  # "prefill" | "decode"
    rows: list
    bucket: tuple  # (R, Q) program shape
    preempted: list = field(default_factory=list)


def bucket_for(ladder, n):
    """The smallest bucket of a sorted ladder that holds `n` (None if none does)."""
    for v in ladder:
        if v >= n:
            return v
    return None


class Scheduler:
    def __init__(self, engine_cfg, block_manager, mode: str = "continuous", batch_aging_s: float = 30.0):
        self.cfg = engine_cfg
        self.bm = block_manager
        self.mode = mode
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

    # ---------------------------------------------------------------- queue management
    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def num_waiting(self, priority: Optional[Priority] = None) -> int:
        if priority is None:
            return len(self.waiting)
        return sum(1 for s in self.waiting if s.priority == priority)

    def abort(self, request_id: str) -> list:
        """Remove a request's sequences from both queues and free their pages at once."""
        hit = [s for s in self.waiting + self.running if s.request_id == request_id]
        for s in hit:
            self._remove(s)
        return hit

    def finish(self, seq: Sequence) -> None:
        self._remove(seq)

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
        else:
            if not (self._last_kind == "prefill" and decodes):
                out = self._schedule_prefill(preempted)
            if out is None and decodes:
                out = self._schedule_decode(preempted)
            if out is None:
                out = self._schedule_prefill(preempted)
        if out is not None:
            out.preempted = preempted
            self._last_kind = out.kind
        return out

    def _admit(self, seq: Sequence) -> None:
        cached = self.bm.allocate_prompt(seq.seq_id, seq.all_token_ids)
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
                if len(self.running) >= self.cfg.max_num_seqs:
                    if not self._make_room_for(seq, preempted, rows):
                        break
                self._admit(seq)
                if not try_add(seq):
                    # Not enough pages: put it back (keeping the order) unless interactive can evict batch.
                    if self._make_room_for(seq, preempted, rows, need_pages=True) and try_add(seq):
                        continue
                    self.running.remove(seq)
                    self.bm.free(seq.seq_id)
                    seq.status = Status.WAITING
                    seq.num_computed_tokens = 0
                    self.waiting.append(seq)
                    break
        if not rows:
            return None
        r_bucket = bucket_for([r for r, q in self.prefill_ladder if q == q_bucket], len(rows))
        return SchedulerOutput("prefill", rows, (r_bucket, q_bucket))

    def _make_room_for(self, seq: Sequence, preempted: list, rows: list, need_pages: bool = False) -> bool:
        """Interactive requests may preempt running batch work (newest first)."""
        if seq.priority != Priority.INTERACTIVE or self.mode != "continuous":
            return False
        scheduled = {r.seq for r in rows}
        batch_running = [s for s in self.running if s.priority == Priority.BATCH and s not in scheduled and s is not seq]
        if not batch_running:
            return False
        victim = max(batch_running, key=lambda s: (s.metrics.arrival, s.seq_id))
        self._preempt(victim, preempted)
        return True

    def _schedule_decode(self, preempted: list) -> Optional[SchedulerOutput]:
        rows: list = []
        scheduled: set = set()
        order = sorted((s for s in self.running if not s.in_prefill),
                       key=lambda s: (int(s.priority), s.metrics.arrival, s.seq_id))
        for seq in order[: self.cfg.max_num_seqs]:
            if seq.status is not Status.RUNNING:
                continue  # preempted earlier in this loop
            while not self.bm.ensure_capacity(seq.seq_id, seq.num_tokens):
                victim = self._pick_victim(exclude=scheduled)
                self._preempt(victim, preempted)
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                rows.append(ScheduledRow(seq, seq.num_computed_tokens, 1))
                scheduled.add(seq)
        if not rows:
            return None
        width = len(rows)
        if self.mode == "static":  # the batch holds its slots until its last sequence finishes
            width = min(max(width, self._static_batch), self.decode_ladder[-1])
        return SchedulerOutput("decode", rows, (bucket_for(self.decode_ladder, width), 1))
