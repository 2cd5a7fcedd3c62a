"""Verification: k drafted tokens checked by one target forward over the paged cache, exactly.

A verify step is an (R, K + 1) program: row i feeds [last known token, d_1 .. d_k_i] (k_i <= K per row, the rest
padding), the model returns logits at every position, and the engine's own sampler (`engine/sampler.py: sample`, with the
row's temperature / top-k / top-p / min-p / penalties / banned ids / seed) draws y_j at every position j from
the target distribution given the prefix + d_1..d_j; penalty histories, `min_tokens` bans and the RNG step are
per position, exactly as if d_1..d_j had been emitted. The row keeps y_0..y_a where a is the first j with
d_(j+1) != y_j (a = k_i: all accepted, y_k is the bonus token).

Why this is exact. Every proposer here drafts deterministically from the tokens so far (n-gram lookup, greedy
draft models), so the draft distribution q is a point mass on d. Rejection sampling (Leviathan et al. 2023;
Chen et al. 2023) accepts d with probability min(1, p(d) / q(d)) = p(d) and otherwise samples the residual
norm(max(0, p - q)) = p conditioned on != d. Drawing y ~ p and accepting iff y == d realises exactly that:
P(accept) = p(d), and a rejected y is p conditioned on y != d. Greedy rows are the special case "accept iff d is
the argmax". Moreover the emitted token at output index s is always the sampler applied to (the true prefix,
the row's seed, step s), so a seeded request produces the same tokens with or without speculation (up to the
rounding differences of a Q-token forward against a 1-token one; `batch_invariant=True` removes those).
Logprobs are the target's, from the same sampler.

KV of rejected positions: their slots are simply overwritten later (attention never reads past kv_len), and
`num_computed_tokens` only counts verified tokens, so the block manager never hashes an unverified token.
"""

from __future__ import annotations

import logging
import time

from jaxserve.engine.request import SampledToken
from jaxserve.engine.runner import SamplingRow
from jaxserve.engine.structured import valid_prefix
from jaxserve.errors import InvalidConfigError
from jaxserve.speculative.adaptive import AdaptiveController
from jaxserve.speculative.config import SpeculativeConfig
from jaxserve.speculative.proposers import NgramProposer, Proposer

log = logging.getLogger("jaxserve")


class Speculator:
    """Owns every decode step of an engine built with a speculator: asks the adaptive controller for k per row
    (at most the lookahead slots the scheduler reserved for it), the proposer for drafts, runs one verify
    program on the target's runner (or the plain decode program when no row drafts) and returns the tokens each
    row emits."""

    def __init__(self, spec: SpeculativeConfig, runner, proposer: Proposer):
        self.spec = spec
        self.runner = runner
        self.K = spec.num_tokens  # the scheduler reserves this many lookahead slots per decode row
        self.Q = self.K + 1
        self.proposer = proposer
        self.ctl = AdaptiveController(self.K, enabled=spec.adaptive, min_speedup=spec.min_speedup)
        self.decode_ladder = runner.cfg.decode_buckets()
        self._programs: dict = {}  # (R, K + 1) -> the verify program
        # metrics
        self.proposed = 0
        self.accepted = 0
        self.verify_rows = 0  # row-steps that verified >= 1 draft
        self.verify_steps = 0
        self.plain_steps = 0  # decode steps run without speculation (nothing drafted, or switched off)
        self.accept_hist = [0] * (self.K + 1)  # row-steps by number of accepted drafts

    # -------------------------------------------------------------- programs
    def _verify_step(self, params, kv, inp):
        """Logits at every position, [R * Q, V] row-major: the engine's sampler program samples each (R * Q
        sampling rows; `run` returns [R, Q] results)."""
        logits, kv = self.runner.forward(params, kv, inp, all_logits=True)
        R, Q, V = logits.shape
        return logits.reshape(R * Q, V), kv

    def compile_all(self) -> float:
        """Compile the (R, K + 1) verify programs (and the proposer's), then time them against the decode
        programs so the adaptive controller starts from measured costs. Seconds spent."""
        t0 = time.monotonic()
        todo = [(R, self.Q) for R in self.decode_ladder if (R, self.Q) not in self._programs]
        self._programs.update(self.runner.compile(self._verify_step, todo, sampled_positions=True))
        self.proposer.compile_all()
        self._time_programs()
        return time.monotonic() - t0

    def _time_programs(self, repeats: int = 3) -> None:
        """Seconds per decode and verify step for each R (padding-only inputs: writes go to the null page)."""
        r = self.runner
        for R in self.decode_ladder:
            for kind, programs, Q in (("decode", r.programs, 1), ("verify", self._programs, self.Q)):
                if (R, Q) not in programs:
                    continue
                inp = r.step_inputs(R, Q, [])
                st = r.sampling_inputs([], R if kind == "decode" else R * Q)
                best = float("inf")
                for _ in range(repeats):
                    t = time.perf_counter()
                    r.run(programs, (R, Q), inp, st, 0)
                    best = min(best, time.perf_counter() - t)
                self.ctl.observe_cost(kind, R, best, init=True)

    # -------------------------------------------------------------- one decode step
    def execute(self, rows: list, bucket: tuple) -> list:
        """Run the decode step for `rows` (ScheduledRow, num_new == 1, block tables and lookahead slots from the
        scheduler). Returns, per row, the emitted SampledTokens (accepted drafts + the bonus/correction)."""
        R = bucket[0]
        seqs = [row.seq for row in rows]
        ks = self.ctl.plan([s.seq_id for s in seqs], R, self.proposer.cost_per_token, self.K)
        # never more drafts than reserved slots (the scheduler caps those at max_tokens: the last emitted token
        # is the bonus/correction)
        ks = [min(k, row.num_lookahead) for k, row in zip(ks, rows)]
        drafts = [[] for _ in rows]
        if any(ks):
            drafts = self.proposer.propose(seqs, ks, [row.block_table for row in rows])
            # a structured-output row verifies only the drafts its grammar accepts
            drafts = [d if s.grammar is None or not d else valid_prefix(s.grammar, d) for s, d in zip(seqs, drafts)]
        if not any(drafts):
            t0 = time.perf_counter()
            res = self.runner.execute("decode", rows, bucket)
            self.ctl.observe_cost("decode", R, time.perf_counter() - t0)
            self.plain_steps += 1
            return [[SampledToken(int(res.tokens[i]), float(res.logprobs[i]), res.top_ids[i], res.top_logprobs[i])]
                    for i in range(len(rows))]
        t0 = time.perf_counter()
        res = self._verify(rows, drafts, R)
        self.ctl.observe_cost("verify", R, time.perf_counter() - t0)
        self.verify_steps += 1
        tok, lp, ti, tl = res
        out, starts, acc = [], [], []
        for i, (row, d) in enumerate(zip(rows, drafts)):
            a = 0
            while a < len(d) and d[a] == int(tok[i, a]):
                a += 1
            out.append([SampledToken(int(tok[i, j]), float(lp[i, j]), ti[i, j], tl[i, j]) for j in range(a + 1)])
            starts.append(row.seq.num_tokens)
            acc.append(a)
            if d:
                self.ctl.observe(row.seq.seq_id, len(d), a)
                self.proposed += len(d)
                self.accepted += a
                self.verify_rows += 1
                self.accept_hist[a] += 1
        self.proposer.after_verify(seqs, starts, [len(d) for d in drafts], acc)
        return out

    def _verify(self, rows: list, drafts: list, R: int):
        r = self.runner
        Q = self.Q
        # each row feeds its last emitted token (whose KV is not written yet) and its drafts
        inp = r.step_inputs(R, Q, [([row.seq.all_token_ids[-1]] + list(d), row.seq.num_tokens - 1, row.tables())
                                   for row, d in zip(rows, drafts)])
        entries = []
        need_hist = any(row.seq.params.uses_history for row in rows)
        for row, d in zip(rows, drafts):
            s = row.seq
            n0 = s.num_tokens
            full = s.all_token_ids + list(d) if need_hist else None
            n_out = len(s.output_token_ids)
            for j in range(Q):  # position j samples output token n_out + j given prefix + d_1..d_j
                jj = min(j, len(d))
                entries.append(SamplingRow(s.params, full[:n0 + jj] if need_hist else [], len(s.prompt_token_ids),
                                           n_out + jj, s.seed,
                                           sorted(s.stop_token_ids) if n_out + jj < s.params.min_tokens else [],
                                           r.token_mask(s, d[:jj])))
        return r.run(self._programs, (R, Q), inp, r.sampling_inputs(entries, R * Q), len(rows))

    # -------------------------------------------------------------- bookkeeping
    def forget(self, seq_id: int) -> None:
        self.ctl.forget(seq_id)
        self.proposer.forget(seq_id)

    def metrics(self) -> dict:
        return {
            "spec_method": self.proposer.method,
            "spec_num_tokens": self.K,
            "spec_draft_tokens": self.proposed,
            "spec_accepted_tokens": self.accepted,
            "spec_acceptance_rate": self.accepted / self.proposed if self.proposed else None,
            # accepted drafts per row-step that verified drafts (the bonus/correction token not counted)
            "spec_mean_accepted_length": self.accepted / self.verify_rows if self.verify_rows else None,
            "spec_verify_steps": self.verify_steps,
            "spec_plain_decode_steps": self.plain_steps,
            "spec_accepted_histogram": list(self.accept_hist),
            "spec_decode_step_s": dict(self.ctl.decode_s),
            "spec_verify_step_s": dict(self.ctl.verify_s),
            "spec_draft_s_per_token": self.proposer.cost_per_token,
        }


def build_speculator(spec, runner) -> Speculator:
    """`speculative` dict (or SpeculativeConfig) -> Speculator on the target's `runner`, with its proposer (the
    draft model, if any, is loaded here)."""
    spec = SpeculativeConfig.parse(spec)
    model_cfg, engine_cfg = runner.model_cfg, runner.cfg
    placement = runner.placement
    if placement.mesh.size > 1 and (spec.method != "ngram" or placement.p > 1):
        raise InvalidConfigError(
            f"on a mesh, speculative decoding supports method 'ngram' with tensor parallelism (no 'stage' axis); "
            f"got method {spec.method!r} with stage={placement.p}")
    if spec.method == "ngram":
        proposer = NgramProposer(spec.prompt_lookup_max, spec.prompt_lookup_min)
    elif spec.method == "self":
        from jaxserve.speculative.proposers import ModelDraftProposer, self_draft_model

        dcfg, dparams = self_draft_model(model_cfg, runner.params, spec.num_layers)
        proposer = ModelDraftProposer("self", dcfg, dparams, engine_cfg, runner.num_pages, spec.num_tokens)
    else:
        from jaxserve.speculative.proposers import draft_model_proposer

        proposer = draft_model_proposer(spec, model_cfg, engine_cfg, runner.num_pages)
    return Speculator(spec, runner, proposer)


def speculator_factory(spec):
    """`LLMEngine(speculator=...)` from a `speculative` dict: a callable `runner -> Speculator`, or None for None.
    The dict is validated here, before anything is loaded."""
    if spec is None:
        return None
    spec = SpeculativeConfig.parse(spec)
    return lambda runner: build_speculator(spec, runner)
