"""Proposers: where draft tokens come from. One interface, three kinds.

* `NgramProposer` - prompt lookup (no model): the tokens that followed the most recent earlier occurrence of
  the sequence's last n tokens (longest n first).
* `ModelDraftProposer` - a smaller model with the target's vocabulary, run greedily by the engine's own
  machinery: a `ModelRunner` (its programs: `greedy_step` over its own buckets) with its own paged KV cache of the same page count and page size, indexed by the
  *target's* block tables (a token's draft KV lives at the same slot as its target KV, so no second block
  manager is needed). `self_draft_model` builds the single-checkpoint variant: the target's first N layers +
  final norm + (tied) LM head, sharing the target's parameter arrays.

Every proposer is deterministic given the sequence's tokens (greedy drafts): the draft distribution q is a
point mass, which is what makes the verifier's accept-if-equal rule exact rejection sampling (verify.py).
Draft KV only ever affects acceptance, never what the target emits, so it may lag or be recomputed freely.
"""

from __future__ import annotations

import dataclasses

import time
from typing import Optional

import numpy as np

from jaxserve.engine.scheduler import bucket_for
from jaxserve.errors import InvalidConfigError


class Proposer:
    """Interface. `propose(seqs, max_lens, block_tables)` -> one list of <= max_lens[i] draft ids per sequence.

    `after_verify(seqs, starts, ks, accepted)` is told, per proposing row, the token count before the step,
    the drafts proposed and how many were accepted. `cost_per_token` (seconds per drafted token, measured) feeds
    the adaptive controller. `method` names the proposer in metrics.
    """

    method = "?"
    cost_per_token = 0.0

    def compile_all(self) -> float:
        return 0.0

    def propose(self, seqs: list, max_lens: list, block_tables: list) -> list:
        raise NotImplementedError

    def after_verify(self, seqs: list, starts: list, ks: list, accepted: list) -> None:
        pass

    def forget(self, seq_id: int) -> None:
        pass


# ------------------------------------------------------------------------------------------------
# n-gram prompt lookup
# ------------------------------------------------------------------------------------------------


class NgramProposer(Proposer):
    method = "ngram"

    def __init__(self, max_n: int = 4, min_n: int = 1):
        self.max_n, self.min_n = int(max_n), int(min_n)
        self._t, self._n = 0.0, 0

    @property
    def cost_per_token(self) -> float:
        return self._t / self._n if self._n else 0.0

    @staticmethod
    def lookup(tokens, k: int, max_n: int, min_n: int) -> list:
        """Up to k tokens following the most recent earlier match of the longest suffix n-gram (n in
        [min_n, max_n]) of `tokens`; [] when nothing matches."""
        if k <= 0:
            return []
        arr = np.asarray(tokens, dtype=np.int64)
        L = arr.size
        for n in range(min(max_n, L - 1), min_n - 1, -1):
            pat = arr[L - n:]
            # candidate starts i with i + n <= L - 1 (a continuation exists and the match is not the suffix)
            hay = arr[:L - 1]
            if hay.size < n:
                continue
            win = np.lib.stride_tricks.sliding_window_view(hay, n)
            hits = np.flatnonzero((win == pat).all(axis=1))
            if hits.size:
                # the most recent match that still has k tokens after it, else the earliest (longest tail)
                full = hits[hits + n + k <= L]
                i = int(full[-1] if full.size else hits[0]) + n
                return [int(t) for t in arr[i:i + k]]
        return []

    def propose(self, seqs, max_lens, block_tables):
        t0 = time.perf_counter()
        out = [self.lookup(s.all_token_ids, m, self.max_n, self.min_n) if m > 0 else [] for s, m in zip(seqs, max_lens)]
        n = sum(len(o) for o in out)
        if n:
            self._t = 0.9 * self._t + (time.perf_counter() - t0)
            self._n = 0.9 * self._n + n
        return out


# ------------------------------------------------------------------------------------------------
# A draft model (or the target's own first layers) on its own paged KV cache
# ------------------------------------------------------------------------------------------------


def self_draft_model(model_cfg, params, num_layers: Optional[int]):
    """(config, params) of the target's first `num_layers` layers + final norm + LM head; the embedding, norm and
    head arrays are the target's own (no copy), the layer slices are small."""
    import jax

    L = model_cfg.num_layers
    n = max(1, L // 3) if num_layers is None else int(num_layers)
    if not 1 <= n < L:
        raise InvalidConfigError(f"speculative['num_layers'] must be in [1, {L - 1}] for a {L}-layer target, got {n}")
    cfg = model_cfg.replace(num_layers=n, name=f"{model_cfg.name}-first{n}")
    p = {k: v for k, v in params.items() if k != "layers"}
    p["layers"] = jax.tree.map(lambda a: a[:n], params["layers"])
    return cfg, p


class ModelDraftProposer(Proposer):
    """Greedy drafts from a model run on a `ModelRunner` of its own (programs: the target's decode ladder as
    (R, 1) and (R, 2) steps, plus its prefill ladder to catch the draft cache up with the target's tokens)."""

    def __init__(self, method: str, draft_cfg, draft_params, engine_cfg, num_pages: int, max_k: int):
        from jaxserve.engine.runner import ModelRunner

        self.method = method
        self.cfg = draft_cfg
        self.max_k = max_k
        decode = engine_cfg.decode_buckets()
        prefill = engine_cfg.prefill_buckets()
        # The draft's KV lives at the target's group-0 pages (every position): one row per layer, no page groups.
        self.runner = ModelRunner(draft_cfg, dataclasses.replace(engine_cfg, sliding_window_reclaim=False),
                                  draft_params, num_pages)
        # its programs: greedy steps over the decode ladder as (R, 1) and (R, 2) and the prefill ladder
        self.buckets = [(r, 1) for r in decode] + [(r, 2) for r in decode] + list(prefill)
        self._programs: dict = {}
        self.decode_ladder = decode
        self.prefill_ladder = sorted(prefill, key=lambda rq: (rq[1], rq[0]))
        self.q_ladder = sorted({q for _, q in prefill})
        self._computed: dict = {}  # seq_id -> (tokens with valid draft KV, preemption count when set)
        self._t, self._n = 0.0, 0.0

    @property
    def cost_per_token(self) -> float:
        return self._t / self._n if self._n else 0.0

    def compile_all(self) -> float:
        t0 = time.monotonic()
        todo = [b for b in self.buckets if b not in self._programs]
        self._programs.update(self.runner.compile(self.runner.greedy_step, todo, fused=True))
        return time.monotonic() - t0

    def forget(self, seq_id: int) -> None:
        self._computed.pop(seq_id, None)

    def _dc(self, seq) -> int:
        dc, npre = self._computed.get(seq.seq_id, (0, 0))
        if npre != seq.metrics.num_preemptions:  # its pages were freed: the draft KV went with them
            dc = 0
        return min(dc, seq.num_computed_tokens)

    def _run(self, rows: list, Q: int) -> list:
        """One greedy draft step; `rows`: (token ids of the new positions, position of the first, block table)."""
        R = bucket_for(self.decode_ladder if Q <= 2 else [r for r, q in self.prefill_ladder if q == Q], len(rows))
        r = self.runner
        res = r.run(self._programs, (R, Q), r.step_inputs(R, Q, rows), r.sampling_inputs([], R), len(rows))
        return [int(t) for t in res.tokens]

    def _sync(self, seqs, block_tables) -> None:
        """Catch the draft cache up to all but the last two known tokens (prefill chunks), so each row's first
        proposal step feeds at most 2 tokens."""
        while True:
            todo = []
            for s, bt in zip(seqs, block_tables):
                dc = self._dc(s)
                if s.num_tokens - dc > 2:
                    todo.append((s, bt, dc))
            if not todo:
                return
            need = max(s.num_tokens - 2 - dc for s, _, dc in todo)
            Q = bucket_for(self.q_ladder, need) or self.q_ladder[-1]
            max_r = max(r for r, q in self.prefill_ladder if q == Q)
            rows = []
            for s, bt, dc in todo[:max_r]:
                n = min(s.num_tokens - 2 - dc, Q)
                rows.append((s.all_token_ids[dc:dc + n], dc, bt))
            self._run(rows, Q)
            for (s, _, dc), (toks, _, _) in zip(todo[:max_r], rows):
                self._computed[s.seq_id] = (dc + len(toks), s.metrics.num_preemptions)

    def propose(self, seqs, max_lens, block_tables):
        out = [[] for _ in seqs]
        live = [i for i, m in enumerate(max_lens) if m > 0]
        if not live:
            return out
        t0 = time.perf_counter()
        self._sync([seqs[i] for i in live], [block_tables[i] for i in live])
        tokens = {i: list(seqs[i].all_token_ids) for i in live}  # known tokens + the drafts so far
        k_max = max(max_lens[i] for i in live)
        steps = 0
        for j in range(k_max):
            act = [i for i in live if max_lens[i] > j]
            rows = []
            for i in act:
                n = len(tokens[i])
                start = self._dc(seqs[i]) if j == 0 else n - 1
                rows.append((tokens[i][start:], start, block_tables[i]))
            toks = self._run(rows, 2 if j == 0 else 1)
            steps += 1
            for i, t in zip(act, toks):
                tokens[i].append(t)
                out[i].append(t)
        self._t = 0.9 * self._t + (time.perf_counter() - t0)
        self._n = 0.9 * self._n + steps
        return out

    def after_verify(self, seqs, starts, ks, accepted):
        # The draft fed the last known token (position start) and drafts 1..k-1: KV is right up to the first
        # rejected one.
        for s, n0, k, a in zip(seqs, starts, ks, accepted):
            if k > 0:
                self._computed[s.seq_id] = (n0 + min(a, k - 1), s.metrics.num_preemptions)


def draft_model_proposer(spec, model_cfg, engine_cfg, num_pages: int):
    """Resolve `spec.draft_model` and check its vocabulary against the target's."""
    from jaxserve.weights.resolve import resolve_model

    resolved = resolve_model(spec.draft_model, random_weights=spec.draft_random_weights, seed=spec.draft_seed)
    dcfg = resolved.config
    if dcfg.vocab_size != model_cfg.vocab_size:
        raise InvalidConfigError(
            f"draft model {spec.draft_model!r} has a vocabulary of {dcfg.vocab_size} tokens but the target "
            f"{model_cfg.name!r} has {model_cfg.vocab_size}: a draft must share the target's tokenizer")
    if engine_cfg.model_len(model_cfg) > dcfg.max_position_embeddings:
        raise InvalidConfigError(
            f"draft model {spec.draft_model!r} has a context of {dcfg.max_position_embeddings} tokens, shorter than "
            f"the engine's max_model_len {engine_cfg.model_len(model_cfg)}; lower max_model_len")
    return ModelDraftProposer("draft", dcfg, resolved.load_params(), engine_cfg, num_pages,
                              spec.num_tokens)
