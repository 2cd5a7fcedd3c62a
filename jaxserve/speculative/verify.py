"""Verification: k drafted tokens checked by one target forward over the paged cache, exactly.

A verify step is an (R, K + 1) program: row i feeds [last known token, d_1 .. d_k_i] (k_i <= K per row, the rest
padding), the model returns logits at every position, and the engine's own sampler (`sampling.sample`, with the
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

import concurrent.futures
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import config as jax_config

from jaxserve.engine.runner import compile_count
from jaxserve.engine.sampling import SamplingTensors, build_sampling_arrays, sample
from jaxserve.errors import CompileWhileServingError, InvalidConfigError
from jaxserve.models.transformer import StepInputs, forward_step
from jaxserve.speculative.adaptive import AdaptiveController
from jaxserve.speculative.config import SpeculativeConfig
from jaxserve.speculative.proposers import NgramProposer, Proposer

log = logging.getLogger("jaxserve")


class Speculator:
    """Owns every decode step of an engine built with `speculative=...`: asks the adaptive controller for k per
    row, the proposer for drafts, runs one verify program (or the plain decode program when no row drafts) and
    returns the tokens each row emits."""

    def __init__(self, spec: SpeculativeConfig, runner, block_manager, max_model_len: int, proposer: Proposer):
        self.spec = spec
        self.runner = runner
        self.bm = block_manager
        self.max_model_len = max_model_len
        self.K = spec.num_tokens
        self.Q = self.K + 1
        self.proposer = proposer
        self.ctl = AdaptiveController(self.K, enabled=spec.adaptive, min_speedup=spec.min_speedup)
        self.decode_ladder = runner.cfg.decode_buckets()
        self._programs: dict = {}
        # metrics
        self.proposed = 0
        self.accepted = 0
        self.verify_rows = 0  # row-steps that verified >= 1 draft
        self.verify_steps = 0
        self.plain_steps = 0  # decode steps run without speculation (nothing drafted, or switched off)
        self.emitted = 0
        self.accept_hist = [0] * (self.K + 1)  # row-steps by number of accepted drafts

    # -------------------------------------------------------------- programs
    def _verify_fn(self, params, kv, inp: StepInputs, st: SamplingTensors):
        r = self.runner
        logits, kv = forward_step(r.model_cfg, params, kv, inp, page_size=r.page_size,
                                  block_pages=r.cfg.attn_block_pages, attention_fn=r.attention_fn,
                                  batch_invariant=r.cfg.batch_invariant, all_logits=True)
        R, Q, V = logits.shape
        res = sample(logits.reshape(R * Q, V), st, r.max_logprobs, row_chunk=1 if r.cfg.batch_invariant else None)
        return jax.tree.map(lambda a: a.reshape((R, Q) + a.shape[1:]), res), kv

    def _abstract(self, R: int):
        inp, _ = self.runner._abstract_inputs(R, self.Q)
        _, st = self.runner._abstract_inputs(R * self.Q, 1)
        return inp, st

    def compile_all(self) -> float:
        """Compile the (R, K + 1) verify programs (and the proposer's), then time them against the decode
        programs so the adaptive controller starts from measured costs. Seconds spent."""
        t0 = time.monotonic()
        r = self.runner
        fn = r.jit_step(self._verify_fn)  # on a tensor-parallel mesh: the runner's shardings
        p_abs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), r.params)
        kv_abs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), r.kv)

        def build(R):
            inp, st = self._abstract(R)
            with jax_config.persistent_cache_min_compile_time_secs(0.0):
                return R, fn.lower(p_abs, kv_abs, inp, st).compile()

        todo = [R for R in self.decode_ladder if R not in self._programs]
        with concurrent.futures.ThreadPoolExecutor(max(1, min(r.cfg.compile_workers, len(todo) or 1))) as ex:
            for R, prog in ex.map(build, todo):
                self._programs[R] = prog
        self.proposer.compile_all()
        self._time_programs()
        return time.monotonic() - t0

    def _time_programs(self, repeats: int = 3) -> None:
        """Seconds per decode and verify step for each R (padding-only inputs: writes go to the null page)."""
        r = self.runner
        for R in self.decode_ladder:
            for kind, Q in (("decode", 1), ("verify", self.Q)):
                prog = r._programs.get((R, 1)) if kind == "decode" else self._programs[R]
                if prog is None:
                    continue
                inp, _ = r._abstract_inputs(R, Q)
                _, st = r._abstract_inputs(R if kind == "decode" else R * Q, 1)
                inp = StepInputs(*(np.zeros(a.shape, a.dtype) for a in inp))
                st = SamplingTensors(**build_sampling_arrays([], [], [], [], [], [], st.temperature.shape[0],
                                                             r.H, r.NB))
                inp, st = r.place_inputs((inp, st))
                best = float("inf")
                for _ in range(repeats):
                    t = time.perf_counter()
                    res, r.kv = prog(r.params, r.kv, inp, st)
                    jax.block_until_ready(res)
                    best = min(best, time.perf_counter() - t)
                self.ctl.observe_cost(kind, R, best, init=True)

    # -------------------------------------------------------------- one decode step
    def execute(self, rows: list, bucket: tuple) -> list:
        """Run the decode step for `rows` (ScheduledRow, num_new == 1). Returns, per row, the emitted tokens as
        a list of (token, logprob, top_ids, top_logprobs)."""
        R = bucket[0]
        seqs = [row.seq for row in rows]
        limits = []
        for s in seqs:
            # never draft past max_tokens or the context: the last emitted token is the bonus/correction
            lim = min(self.K, s.max_tokens - len(s.output_token_ids) - 1, self.max_model_len - s.num_tokens - 1)
            limits.append(max(0, lim))
        ks = self.ctl.plan([s.seq_id for s in seqs], R, self.proposer.cost_per_token, self.K)
        ks = [min(k, m) for k, m in zip(ks, limits)]
        for i, (row, k) in enumerate(zip(rows, ks)):
            if k > 0 and not self.bm.ensure_capacity(row.seq.seq_id, row.seq.num_tokens + k):
                ks[i] = 0
            row.block_table = self.bm.block_table(row.seq.seq_id)
        drafts = [[] for _ in rows]
        if any(ks):
            drafts = self.proposer.propose(seqs, ks, [row.block_table for row in rows])
        if not any(drafts):
            t0 = time.perf_counter()
            tok, lp, ti, tl = self.runner.execute("decode", rows, bucket)
            self.ctl.observe_cost("decode", R, time.perf_counter() - t0)
            self.plain_steps += 1
            self.emitted += len(rows)
            return [[(int(tok[i]), float(lp[i]), ti[i], tl[i])] for i in range(len(rows))]
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
            out.append([(int(tok[i, j]), float(lp[i, j]), ti[i, j], tl[i, j]) for j in range(a + 1)])
            starts.append(row.seq.num_tokens)
            acc.append(a)
            if d:
                self.ctl.observe(row.seq.seq_id, len(d), a)
                self.proposed += len(d)
                self.accepted += a
                self.verify_rows += 1
                self.accept_hist[a] += 1
            self.emitted += a + 1
        self.proposer.after_verify(seqs, starts, [len(d) for d in drafts], acc)
        return out

    def _verify(self, rows: list, drafts: list, R: int):
        r = self.runner
        Q = self.Q
        # each row feeds its last emitted token (whose KV is not written yet) and its drafts
        inp = r.step_inputs(R, Q, [([row.seq.all_token_ids[-1]] + list(d), row.seq.num_tokens - 1, row.block_table)
                                   for row, d in zip(rows, drafts)])
        params, hist, out_start, steps, seeds, banned = [], [], [], [], [], []
        need_hist = any(row.seq.params.uses_history for row in rows)
        for row, d in zip(rows, drafts):
            s = row.seq
            n0 = s.num_tokens
            full = s.all_token_ids + list(d) if need_hist else None
            n_out = len(s.output_token_ids)
            for j in range(Q):  # position j samples output token n_out + j given prefix + d_1..d_j
                jj = min(j, len(d))
                params.append(s.params)
                hist.append(full[:n0 + jj] if need_hist else [])
                out_start.append(len(s.prompt_token_ids))
                steps.append(n_out + jj)
                seeds.append(s.seed)
                banned.append(sorted(s.stop_token_ids) if n_out + jj < s.params.min_tokens else [])
        st = build_sampling_arrays(params, hist, out_start, steps, seeds, banned, R * Q, r.H, r.NB)
        prog = self._programs.get(R)
        if prog is None:
            raise CompileWhileServingError(f"no compiled verify program for {R} rows; have {sorted(self._programs)}")
        inputs = r.place_inputs((inp, SamplingTensors(**st)))
        before = compile_count()
        res, r.kv = prog(r.params, r.kv, *inputs)
        out = jax.device_get((res.tokens, res.logprob, res.top_ids, res.top_logprobs))
        if compile_count() != before:
            raise CompileWhileServingError("an XLA compilation happened while serving (verify step)")
        return out

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


def build_speculator(spec, model_cfg, engine_cfg, runner, block_manager, max_model_len: int) -> Speculator:
    """`speculative` dict -> Speculator with its proposer (the draft model, if any, is loaded here)."""
    spec = SpeculativeConfig.parse(spec)
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
    return Speculator(spec, runner, block_manager, max_model_len, proposer)
