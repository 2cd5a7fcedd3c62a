"""Pipeline parallelism: the stacked layers split into `stage` pieces, micro-batches in flight inside a step.

Layout. The layer axis of every per-layer weight and of the KV cache is split over the `stage` mesh axis
(`rules.param_specs(stage_axis="stage")`, `rules.kv_spec`): stage s holds layers [s*L/S, (s+1)*L/S) and their
K/V pages. Embedding and LM head stay outside the pipeline (tensor-parallel over `model` as usual).

Schedule (GPipe, inside one step program). The step's R rows are cut into `n_micro` micro-batches (n_micro =
min(S, R), R and S powers of two in practice). A `jax.shard_map` over "stage" (the `model` axis stays automatic,
so tensor parallelism composes) runs n_micro + S - 1 ticks; at tick t stage s runs its layers on micro-batch
t - s, then passes the activation to stage s + 1 with `lax.ppermute`. In the steady state every stage works on a
different micro-batch at the same time (the overlap), and the bubble is S - 1 ticks.

Continuous batching needs nothing special: every step is self-contained (a micro-batch's rows carry their own
positions, block tables and slots), so the scheduler may change the batch composition between any two steps.
A tick where a stage has no micro-batch (warm-up / drain of the pipeline) runs on a clamped micro-batch with
every KV write redirected to the null page (slot 0, the page padding tokens already write to) and its output
discarded, so it changes no state.

Across steps (decode, `EngineConfig.pipeline_decode="rotate"`, the default). GPipe leaves every stage idle S - 1
of its n + S - 1 ticks in every step (at most S / (2S - 1) busy). `make_rotation_forward` instead runs one tick
per call with the stages on different groups of decoding sequences: the scheduler sends a group of ~1/S of them
into stage 0, each stage runs what the stage before it produced in the previous call (a carry on device), and the
group leaving the last stage is sampled; its sequences are "in flight" until then (engine/scheduler.py). With S
groups every stage is busy on every call. Prefill steps stay GPipe passes.
"""

from __future__ import annotations

import numpy as np

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxserve.config import ModelConfig
from jaxserve.models.transformer import (StepInputs, decoder_layers, embed_tokens, lm_head,
                                         rope_inv_freq)


def num_micro_batches(rows: int, stages: int) -> int:
    """Largest m <= stages dividing rows (1 for a single-row step: nothing to overlap)."""
    m = min(rows, stages)
    while rows % m:
        m -= 1
    return m


def make_pipeline_forward(cfg: ModelConfig, mesh):
    """A `forward_step`-compatible function running the layers as a pipeline over mesh axis "stage"."""
    S = int(mesh.shape["stage"])
    L = cfg.num_layers
    Ls = L // S

    def forward(cfg_, params, kv, inp: StepInputs, *, page_size, block_pages, attention_fn=None,
                batch_invariant=False):
        R, Q = inp.tokens.shape
        n = num_micro_batches(R, S)
        mb = R // n
        inv = batch_invariant
        x = embed_tokens(cfg, params, inp.tokens)  # [R, Q, D]
        D = x.shape[-1]
        windows = jnp.asarray(np.asarray(cfg.layer_windows(), np.int32))
        inv_freq = jnp.asarray(rope_inv_freq(cfg))
        micro = lambda a: a.reshape((n, mb) + a.shape[1:])  # noqa: E731
        xs = micro(x)
        minp = StepInputs(*(micro(a) for a in inp))

        def stage_body(lparams, kc, vc, win, freq, xs, minp):
            s = lax.axis_index("stage")
            local_layers = jnp.arange(Ls, dtype=jnp.int32)

            def tick(t, carry):
                state, outs, kc, vc = carry
                m = t - s
                valid = (m >= 0) & (m < n)
                mi = jnp.clip(m, 0, n - 1)
                pick = lambda a: lax.dynamic_index_in_dim(a, mi, 0, keepdims=False)  # noqa: E731
                rows = StepInputs(*(pick(a) for a in minp))
                # Idle ticks write their (meaningless) K/V to the null page only.
                rows = rows._replace(slots=jnp.where(valid, rows.slots, 0))
                h = jnp.where(s == 0, pick(xs), state)
                y, kc, vc = decoder_layers(cfg, lparams, h, kc, vc, rows, win, freq, local_layers,
                                           page_size=page_size, block_pages=block_pages,
                                           attention_fn=attention_fn, batch_invariant=inv)
                keep = valid & (s == S - 1)
                outs = lax.dynamic_update_index_in_dim(outs, jnp.where(keep, y, pick(outs)), mi, 0)
                state = lax.ppermute(y, "stage", [(i, i + 1) for i in range(S - 1)])
                return state, outs, kc, vc

            state = jnp.zeros((mb, Q, D), xs.dtype)
            outs = jnp.zeros_like(xs)
            _, outs, kc, vc = lax.fori_loop(0, n + S - 1, tick, (state, outs, kc, vc))
            # Only the last stage holds results; the others contribute exact zeros.
            return lax.psum(outs, "stage"), kc, vc

        rep = P()
        st = P("stage")
        lp_specs = jax.tree.map(lambda _: st, params["layers"])
        run = jax.shard_map(
            stage_body, mesh=mesh, axis_names=frozenset({"stage"}),
            in_specs=(lp_specs, st, st, st, st, rep, StepInputs(*([rep] * len(inp)))),
            out_specs=(rep, st, st), check_vma=False)
        outs, kc, vc = run(params["layers"], kv["k"], kv["v"], windows, inv_freq, xs, minp)
        x = outs.reshape(R, Q, D)
        last = jnp.maximum(inp.q_lens - 1, 0)
        x_last = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
        return lm_head(cfg, params, x_last, inv), {"k": kc, "v": vc}

    return forward


def make_rotation_forward(cfg: ModelConfig, mesh):
    """One decode call of a pipeline whose stages work on different steps' groups (pipelining across steps).

    The running sequences are split into groups that rotate through the stages: every call, stage 0 takes a new
    group's tokens, stage s > 0 runs the activation stage s - 1 produced in the previous call (the `carry`), and
    the group leaving stage S - 1 gets its logits. With S groups in flight every stage works on every call (no
    bubble), while GPipe inside one step keeps S - 1 of its n + S - 1 ticks idle per stage.

    Returns `rotate(cfg, params, kv, carry, inp, *, page_size, block_pages, attention_fn, batch_invariant)` ->
    (logits f32[mb, V] of the group leaving the last stage, kv, carry). `carry`: [S, mb, 1, D] split over
    "stage" (stage s's input for the next call). `inp`: StepInputs with a leading [S] axis, inp[s] the group
    stage s runs now (inp[0].tokens its new tokens); an empty stage's rows write the null page only."""
    S = int(mesh.shape["stage"])
    Ls = cfg.num_layers // S

    def rotate(cfg_, params, kv, carry, inp: StepInputs, *, page_size, block_pages, attention_fn=None,
               batch_invariant=False):
        x0 = embed_tokens(cfg, params, inp.tokens[0])  # [mb, 1, D]
        windows = jnp.asarray(np.asarray(cfg.layer_windows(), np.int32))
        inv_freq = jnp.asarray(rope_inv_freq(cfg))

        def stage_body(lparams, kc, vc, win, freq, x0, carry, inp):
            s = lax.axis_index("stage")
            rows = StepInputs(*(a[0] for a in inp))  # this stage's group
            h = jnp.where(s == 0, x0, carry[0].astype(x0.dtype))
            y, kc, vc = decoder_layers(cfg, lparams, h, kc, vc, rows, win, freq, jnp.arange(Ls, dtype=jnp.int32),
                                       page_size=page_size, block_pages=block_pages, attention_fn=attention_fn,
                                       batch_invariant=batch_invariant)
            out = lax.psum(jnp.where(s == S - 1, y, jnp.zeros_like(y)), "stage")
            nxt = lax.ppermute(y, "stage", [(i, i + 1) for i in range(S - 1)])
            return out, kc, vc, nxt[None].astype(carry.dtype)

        rep, st = P(), P("stage")
        lp_specs = jax.tree.map(lambda _: st, params["layers"])
        run = jax.shard_map(
            stage_body, mesh=mesh, axis_names=frozenset({"stage"}),
            in_specs=(lp_specs, st, st, st, st, rep, st, StepInputs(*([st] * len(inp)))),
            out_specs=(rep, st, st, st), check_vma=False)
        out, kc, vc, carry = run(params["layers"], kv["k"], kv["v"], windows, inv_freq, x0, carry, inp)
        return lm_head(cfg, params, out[:, 0], batch_invariant), {"k": kc, "v": vc}, carry

    return rotate
