#!/usr/bin/env python
"""One command for a fresh GPU / TPU VM: are the kernels right, does the engine agree with itself, how fast is it.

    python scripts/device_check.py [--out DIR] [--budget-s 480] [--models gemma3-270m llama3-8b]
                                   [--batches 1 32 128] [--skip kernels engine int8 hf] [--smoke]

In order, each section skipped (and recorded as such) once the time budget is near:

a. kernels: every Pallas kernel (paged decode, ragged prefill, their fused-write variants, int8 KV, f32 / bf16,
   int8 / int4 weight matmuls) compiled for this platform through `pallas_kernels.dispatch` with impl="pallas"
   (Triton on GPU, Mosaic on TPU; interpreted TPU kernels on CPU) at the attention shapes of Gemma 3 270M and
   Llama 3 8B, each against the pure-jnp reference with pallas_kernels/testing.py's tolerances and NaN-poisoned
   caches. A kernel that fails to compile or run is recorded with its traceback's last line; the run goes on.
b. engine: `LLM(preset, random_weights="device", dtype="bfloat16", kv_cache_dtype="bfloat16")` with
   attention_impl "pallas" and "xla" on the same prompts (chunked prefill, sliding windows): greedy tokens must
   agree, or first differ where the two top logprobs were a near-tie. Weights are drawn on the device
   (random_init.random_params_device). Then once with quantization="int8", matmul_impl "pallas" vs "xla".
c. speed, on the "pallas" engines: decode tok/s at each batch through LLM.generate (wall clock, and the decode
   steps alone from the engine's stats), the compiled decode step alone, and prefill tok/s (128 prompts x 512
   tokens), each beside its roofline: bytes read per step (weights + visible KV, scripts/bench_decode.step_bytes)
   over the device's memory bandwidth (planner table by device_kind, else measured), and for prefill also FLOPs
   over the device's peak.
d. HF transformers + torch on the same device (a subprocess, after JAX is done), same shapes, random init in
   bf16: decode tok/s at the same batches (generate with min_new_tokens = max_new_tokens) and prefill tok/s.
   Skipped, with the reason, without torch, transformers or CUDA.

Writes `report.json` and `report.md` to --out (default $OUT when set, else bench_results/device/) and prints the
Markdown. Exits 1 when a correctness check failed or a section raised.

--smoke: the same code paths on this CPU in a few minutes (JAX_PLATFORMS=cpu; kernels interpreted at small
shapes, each variant once at alternating models' head_dim and GQA ratio with one KV head; each preset shrunk to
2 layers, hidden 128 and a 512-token vocabulary with its head counts and head_dim kept; batch 1; HF on CPU with
the same tiny configs). tests/test_device_check.py runs it. `--kernel gpu` with --smoke interprets the Triton
kernels instead of the TPU ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import math
import os
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

MODELS = ("gemma3-270m", "llama3-8b")

# Dense bf16 peak FLOP/s by planner DEVICES key (published specs; prefill's compute roofline only).
PEAK_BF16_FLOPS = {"h100": 989e12, "h200": 989e12, "a100-80gb": 312e12, "a100-40gb": 312e12,
                   "tpu-v4": 275e12, "tpu-v5e": 197e12, "tpu-v5p": 459e12, "tpu-v6e": 918e12}

# Engine agreement (section b): the two paths may pick different greedy tokens only where the reference's top
# two were this close (nats; the flip needs both runs' logit differences to sum below it). bf16 logits of two
# attention formulations differ by ~1e-2 on the smoke models; a wrong mask or window shows up as flips at gaps
# of whole nats.
NEAR_TIE_NATS = 0.25


# ------------------------------------------------------------------------------------------------------------
# settings: the full run and the CPU smoke run differ only in sizes
# ------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Sizes:
    """Shapes, lengths (tokens) and batch sizes of every section; the defaults are the device run's."""

    page_size: int = 16
    kernel_decode_lens: tuple = (0, 1, 15, 16, 17, 300, 1000, 2048)
    kernel_prefill: tuple = ((300, 0), (1, 999), (64, 512), (0, 10), (17, 700), (128, 1000))  # (new, cached)
    kernel_window: int = 256          # for models without one (Llama: windows are runtime data, Mistral-style)
    matmul_rows: tuple = (8, 512)
    matmul_shape: tuple = None        # (K, N, int4 group); None: the model's MLP up-projection
    # engine
    max_model_len: int = 1024
    max_num_batched_tokens: int = 2048
    min_prefill_tokens: int = 512
    max_prefill_seqs: int = 4
    check_prompt_lens: tuple = (3, 17, 64, 130, 257, 511, 700, 900)
    check_new_tokens: int = 32
    check_max_seqs: int = 8           # the reference engine's batch (the measured engine's is max(batches))
    batches: tuple = (1, 32, 128)
    decode_prompt_len: int = 128
    decode_new_tokens: int = 64
    step_repeats: int = 20
    prefill_prompts: int = 128
    prefill_len: int = 512
    shrink: bool = False              # smoke: 2 layers, small hidden and vocabulary
    kernels_per_model: bool = True    # smoke: each kernel variant at one model's shapes, alternating
    kernel_kv_heads: int = 0          # smoke: this many KV heads in the kernel checks (GQA ratio, head_dim kept)


SMOKE = Sizes(page_size=16, kernel_decode_lens=(0, 1, 17, 40), kernel_prefill=((9, 0), (1, 30), (0, 3), (20, 17)),
              kernel_window=12, matmul_rows=(3,), matmul_shape=(256, 128, 32), max_model_len=128,
              max_num_batched_tokens=32, min_prefill_tokens=32, max_prefill_seqs=1, check_prompt_lens=(5, 45),
              check_new_tokens=6, check_max_seqs=1, batches=(1,), decode_prompt_len=8, decode_new_tokens=4,
              step_repeats=3, prefill_prompts=2, prefill_len=20, shrink=True, kernels_per_model=False,
              kernel_kv_heads=1)


def model_config(name, sizes):
    """The preset, or (smoke) the preset shrunk to 2 layers with its head counts, head_dim and layer kinds kept,
    registered in config.PRESETS under "smoke-<name>" so that LLM(name, random_weights=...) resolves it."""
    from jaxserve import config as jc

    cfg = jc.PRESETS[name]
    if not sizes.shrink:
        return name, cfg
    small = cfg.replace(name=f"smoke-{name}", num_layers=2, hidden_size=128, intermediate_size=256, vocab_size=512,
                        max_position_embeddings=1024, bos_token_id=2, eos_token_ids=(1,), pad_token_id=0,
                        rope_scaling=None)
    if cfg.sliding_window:                            # one sliding and one global layer, a window the prompts exceed
        small = small.replace(sliding_window=24, global_every=2)
    jc.PRESETS[small.name] = small
    return small.name, small


# ------------------------------------------------------------------------------------------------------------
# the report
# ------------------------------------------------------------------------------------------------------------

class Report:
    """Everything the run found: sections (ran / skipped / error), correctness checks, speed rows."""

    def __init__(self, budget_s):
        self.t0 = time.monotonic()
        self.budget_s = budget_s
        self.sections, self.checks, self.perf, self.hf, self.info = [], [], [], [], {}

    def remaining(self):
        return self.budget_s - (time.monotonic() - self.t0)

    def check(self, section, name, passed, err=None, tol=None, detail=""):
        """passed: True / False, or None for a check the time budget left no room for (not a failure)."""
        self.checks.append(dict(section=section, name=name, passed=None if passed is None else bool(passed),
                                max_err=err, tol=tol, detail=detail))
        mark = "skip" if passed is None else "ok  " if passed else "FAIL"
        print(f"[{time.monotonic() - self.t0:6.1f}s] {mark} {section}: {name} err={err} {detail}", flush=True)

    def skip(self, name, reason):
        self.sections.append(dict(name=name, status="skipped", seconds=0.0, reason=reason))

    def section(self, name, fn, need_s):
        """Run fn() unless fewer than need_s seconds of the budget are left; an exception is recorded, not raised."""
        left = self.remaining()
        if left < need_s:
            self.skip(name, f"time budget: {left:.0f} s left, section needs ~{need_s:.0f} s")
            print(f"skipped {name}: {self.sections[-1]['reason']}", flush=True)
            return
        t = time.monotonic()
        print(f"--- {name} ({left:.0f} s of budget left)", flush=True)
        try:
            reason = fn()
            status = "skipped" if reason else "ok"
        except Exception as e:  # noqa: BLE001  (one section's failure must not end the run)
            traceback.print_exc()
            status, reason = "error", last_line(e)
        self.sections.append(dict(name=name, status=status, seconds=round(time.monotonic() - t, 1),
                                  reason=reason or ""))

    @property
    def passed(self):
        return (all(c["passed"] is not False for c in self.checks)
                and not any(s["status"] == "error" for s in self.sections))

    def to_json(self):
        return dict(passed=self.passed, wall_s=round(time.monotonic() - self.t0, 1), budget_s=self.budget_s,
                    info=self.info, sections=self.sections, checks=self.checks, perf=self.perf, hf=self.hf)

    def markdown(self):
        i = self.info
        lines = [f"# device check: {i.get('device_kind')} ({i.get('platform')}), jax {i.get('jax')}",
                 "", f"bandwidth {i.get('bandwidth_GBps', 0):.0f} GB/s ({i.get('bandwidth_source')}); "
                 f"{sum(c['passed'] is True for c in self.checks)}/{len(self.checks)} checks passed; "
                 f"{time.monotonic() - self.t0:.0f} s of {self.budget_s:.0f} s", "",
                 "| section | check | result | max err | tol | detail |", "|---|---|---|---|---|---|"]
        for c in self.checks:
            result = "not run" if c["passed"] is None else "pass" if c["passed"] else "**FAIL**"
            lines.append(f"| {c['section']} | {c['name']} | {result} | "
                         f"{_num(c['max_err'])} | {_num(c['tol'])} | {c['detail']} |")
        lines += ["", "| engine | model | what | batch | tok/s | roofline tok/s | of roofline | ms / step |",
                  "|---|---|---|---|---|---|---|---|"]
        for p in self.perf + self.hf:
            lines.append(f"| {p['engine']} | {p['model']} | {p['what']} | {p.get('batch', '')} | "
                         f"{_num(p.get('tok_s'))} | {_num(p.get('roofline_tok_s'))} | "
                         f"{_pct(p.get('tok_s'), p.get('roofline_tok_s'))} | {_num(p.get('step_ms'))} |")
        lines += ["", "| section | status | seconds | note |", "|---|---|---|---|"]
        for s in self.sections:
            lines.append(f"| {s['name']} | {s['status']} | {s['seconds']} | {s['reason']} |")
        return "\n".join(lines)


def last_line(e):
    """The last line of an exception's traceback: `Type: message` (first line of the message)."""
    msg = traceback.format_exception_only(type(e), e)[-1].strip().splitlines()
    return msg[0][:400] if msg else type(e).__name__


def _num(x):
    if x is None:
        return ""
    if isinstance(x, str):
        return x
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"


def _pct(a, b):
    return f"{100 * a / b:.0f}%" if a and b else ""


# ------------------------------------------------------------------------------------------------------------
# the device
# ------------------------------------------------------------------------------------------------------------

def describe_device(report):
    """Platform, device kind, memory bandwidth (planner's table by device_kind, else bench_kernels' table or a
    measured copy) and peak bf16 FLOP/s where known."""
    import jax

    from jaxserve import planner

    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", dev.platform)
    key = planner.device_key_from_kind(dev.platform, kind)
    if key and key != "cpu":
        bw, src = planner.DEVICES[key].bandwidth_bytes_per_s, f"{planner.DEVICES[key].name} spec (planner)"
    else:
        from bench_kernels import device_bandwidth

        bw, src = device_bandwidth()
    report.info.update(platform=jax.default_backend(), device_kind=kind, device_key=key, jax=jax.__version__,
                       bandwidth=bw, bandwidth_GBps=bw / 1e9, bandwidth_source=src,
                       peak_bf16_flops=PEAK_BF16_FLOPS.get(key))


# ------------------------------------------------------------------------------------------------------------
# a. kernels against the reference
# ------------------------------------------------------------------------------------------------------------

def kernel_variants():
    """(name, options) of every kernel configuration checked at each model's attention shape."""
    import jax.numpy as jnp

    bf16, f32 = jnp.bfloat16, jnp.float32
    out = []
    for kind in ("decode", "prefill"):
        out += [(f"{kind} bf16", dict(kind=kind, dtype=bf16)),
                (f"{kind} f32 softcap", dict(kind=kind, dtype=f32, softcap=30.0)),
                (f"{kind} bf16 window", dict(kind=kind, dtype=bf16, window=True)),
                (f"{kind} bf16 int8-KV", dict(kind=kind, dtype=bf16, int8=True)),
                (f"{kind} fused bf16", dict(kind=kind, dtype=bf16, fused=True)),
                (f"{kind} fused int8-KV window", dict(kind=kind, dtype=bf16, int8=True, fused=True, window=True))]
    out += [("matmul int8 bf16", dict(kind="matmul", dtype=bf16, bits=8)),
            ("matmul int8 f32", dict(kind="matmul", dtype=f32, bits=8)),
            ("matmul int4 bf16", dict(kind="matmul", dtype=bf16, bits=4))]
    return out


def attention_case(shape, sizes, opts, seed):
    """Inputs (testing.decode_case / ragged_case: NaN-poisoned invisible slots) and the window, for one check."""
    import numpy as np

    from pallas_kernels import testing

    window = (shape["window"] or sizes.kernel_window) if opts.get("window") else 0
    kw = dict(num_heads=shape["hq"], num_kv_heads=shape["hkv"], head_dim=shape["hd"], page_size=sizes.page_size,
              window=window, dtype=opts["dtype"], int8=opts.get("int8", False))
    rng = np.random.RandomState(seed)
    if opts["kind"] == "decode":
        return testing.decode_case(rng, list(sizes.kernel_decode_lens), **kw), window
    new, cached = zip(*sizes.kernel_prefill)
    return testing.ragged_case(rng, list(new), list(cached), **kw), window


def check_attention(shape, sizes, opts, impl_kw, seed):
    """(max abs error, tolerance, detail) of one attention kernel against the reference; fused variants also
    compare the written pages (bit-exact except the null page)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pallas_kernels import dispatch, reference as ref, testing

    c, window = attention_case(shape, sizes, opts, seed)
    static = dict(scale=shape["hd"] ** -0.5, softcap=opts.get("softcap"))
    scales = dict(k_scales=c["k_scales"], v_scales=c["v_scales"])
    decode, fused = opts["kind"] == "decode", opts.get("fused", False)
    pages = (c["k_pages"], c["v_pages"])
    tail = (c["block_tables"], c["kv_lens"]) if decode else (c["block_tables"], c["cu_q_lens"], c["kv_lens"],
                                                              c["num_seqs"])
    if fused:
        args = (c["q"], c["k_new"], c["v_new"], *pages, c["slots"], *tail)
        ref_fn = ref.paged_attention_decode_fused if decode else ref.ragged_prefill_attention_fused
        fn = dispatch.decode_attention_fused if decode else dispatch.prefill_attention_fused
    else:
        args = (c["q"], *pages, *tail)
        ref_fn = ref.paged_attention_decode if decode else ref.ragged_prefill_attention
        fn = dispatch.decode_attention if decode else dispatch.prefill_attention
    want = jax.jit(functools.partial(ref_fn, **static))(*args, window=jnp.int32(window), **scales)
    # the fused kernels donate (and alias) the page buffers: give them copies
    copy = (lambda a: a.copy() if a is not None else None) if fused else (lambda a: a)
    got = fn(*[copy(a) if i in ((3, 4) if fused else (1, 2)) else a for i, a in enumerate(args)],
             window=jnp.int32(window), k_scales=copy(c["k_scales"]), v_scales=copy(c["v_scales"]), **static,
             **impl_kw)
    out, want_out = (got[0], want[0]) if fused else (got, want)
    tol = testing.ATOL[jnp.dtype(opts["dtype"])]
    o = testing.f32(out)
    if np.isnan(o).any():
        return float("nan"), tol, "NaN in the output (a poisoned slot was read, or an output row was not written)"
    err = testing.max_err(out, want_out)
    detail = []
    if not np.abs(testing.f32(want_out)).max() > 0:
        detail.append("the reference output is all zeros: the case checks nothing")
        err = float("inf")
    zero = np.asarray(c["kv_lens"]) == 0 if decode else None
    if decode and not np.all(o[zero] == 0):
        detail.append("kv_len-0 rows not zero")
        err = max(err, float("inf"))
    if fused:
        try:
            testing.assert_pages_equal(got[1:], want[1:])
            detail.append("pages equal")
        except AssertionError:
            detail.append("written pages differ from the reference")
            err = float("inf")
    return err, tol, ", ".join(detail)


def check_matmul(shape, sizes, opts, impl_kw, seed):
    """(max error relative to max |reference| over the row counts, tolerance, per-row-count detail) of one
    quantized matmul; a row count that raises is recorded in the detail and fails the check."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pallas_kernels import dispatch, reference as ref, testing

    k, n, group = sizes.matmul_shape or (shape["d"], shape["f"], shape["group"])
    key = jax.random.key(seed)
    w = jax.random.normal(key, (k, n), jnp.float32)
    wq, s = ref.quantize_int8(w) if opts["bits"] == 8 else ref.quantize_int4(w, group)
    gs = None if opts["bits"] == 8 else group
    worst, detail = 0.0, [f"K={k}, N={n}"]
    for m in sizes.matmul_rows:
        try:
            x = jax.random.normal(jax.random.fold_in(key, m), (m, k), jnp.float32).astype(opts["dtype"])
            want = jax.jit(functools.partial(ref.quantized_matmul, bits=opts["bits"], group_size=gs))(
                x.astype(jnp.float32), wq, s)
            g = testing.f32(dispatch.matmul(x, wq, s, bits=opts["bits"], group_size=gs, **impl_kw))
            err = (float("nan") if g.shape != want.shape or np.isnan(g).any()
                   else testing.max_err(g, want) / max(float(jnp.abs(want).max()), 1e-30))
            detail.append(f"M={m}: {err:.2e}")
        except Exception as e:  # noqa: BLE001
            err = float("inf")
            detail.append(f"M={m}: {last_line(e)}")
        worst = err if math.isnan(err) or err > worst else worst
    return worst, testing.MATMUL_RTOL[jnp.dtype(opts["dtype"])], ", ".join(detail)


def run_kernels(report, sizes, args):
    """Every kernel variant at each model's shapes; a failure is recorded and the next kernel runs."""
    import jax

    from bench_kernels import MODELS as SHAPES
    from pallas_kernels import dispatch

    impl_kw = dict(impl="pallas", kernel=args.kernel)
    fam = args.kernel or dispatch._family(None, None)[0]
    report.info["kernel_family"] = f"{fam}{' (interpreted)' if dispatch._family(None, args.kernel)[1] else ''}"
    for m, model in enumerate(args.models):
        shape = dict(SHAPES[model])
        if sizes.kernel_kv_heads:
            group = shape["hq"] // shape["hkv"]
            shape.update(hkv=sizes.kernel_kv_heads, hq=group * sizes.kernel_kv_heads)
        for i, (name, opts) in enumerate(kernel_variants()):
            if not sizes.kernels_per_model and i % len(args.models) != m:
                continue
            label = f"{model} {name}"
            if report.remaining() < 20:
                report.check("kernels", label, None, detail="not run: time budget exhausted")
                continue
            try:
                check = check_matmul if opts["kind"] == "matmul" else check_attention
                err, tol, detail = check(shape, sizes, opts, impl_kw, seed=i)
                report.check("kernels", label, tol is not None and err <= tol, err, tol, detail)
            except Exception as e:  # noqa: BLE001
                report.check("kernels", label, False, detail=last_line(e))
            jax.clear_caches()


# ------------------------------------------------------------------------------------------------------------
# b. the engine: pallas vs xla on the same prompts
# ------------------------------------------------------------------------------------------------------------

def build_llm(name, cfg, sizes, max_num_seqs, **kw):
    """LLM on device-drawn random weights, bf16, with a KV budget sized to this check (not the device)."""
    from jaxserve import LLM

    groups = cfg.kv_layout().num_groups  # a sequence's pages in each page group (sliding-window reclaim)
    pages = max_num_seqs * math.ceil(sizes.max_model_len / sizes.page_size) * groups + 1
    return LLM(name, random_weights="device", dtype="bfloat16", kv_cache_dtype="bfloat16",
               page_size=sizes.page_size, max_model_len=sizes.max_model_len, max_num_seqs=max_num_seqs,
               num_pages=pages, max_num_batched_tokens=sizes.max_num_batched_tokens,
               min_prefill_tokens=sizes.min_prefill_tokens, max_prefill_seqs=sizes.max_prefill_seqs,
               compile_workers=min(8, len(os.sched_getaffinity(0))), **kw)


def random_prompts(cfg, lens, seed):
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(3, cfg.vocab_size, n).tolist() for n in lens]


def greedy_run(llm, prompts, new_tokens):
    """Per prompt: (greedy token ids, [{token id: logprob} of the sampled and top-2 ids per position])."""
    from jaxserve import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True, logprobs=2)
    outs = llm.generate(prompts, sp, use_tqdm=False)
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]


def compare_greedy(ref_runs, runs):
    """Agreement of two engines' greedy runs: (passed, summary dict).

    Positions after a sequence's first difference are not comparable (the contexts differ); a difference passes
    when it is a near-tie: the reference's margin for its token plus the other run's margin for its own, in
    nats, at most NEAR_TIE_NATS. Logprob differences are measured over the common prefixes."""
    same = total = 0
    prefix_tokens = 0
    max_lp, first, worst_flip = 0.0, None, 0.0
    for r, ((ta, la), (tb, lb)) in enumerate(zip(ref_runs, runs)):
        n = min(len(ta), len(tb))
        total += max(len(ta), len(tb))
        same += sum(a == b for a, b in zip(ta, tb))
        j = next((i for i in range(n) if ta[i] != tb[i]), n)
        prefix_tokens += j
        for i in range(j):
            max_lp = max(max_lp, abs(la[i][ta[i]] - lb[i][tb[i]]))
        if j < n:
            a, b = ta[j], tb[j]
            flip = (la[j][a] - la[j].get(b, -math.inf)) + (lb[j][b] - lb[j].get(a, -math.inf))
            worst_flip = max(worst_flip, flip)
            if first is None or j < first["position"]:
                first = dict(request=r, position=j, ref_token=a, token=b, flip_nats=round(flip, 4))
    summary = dict(match_fraction=same / max(total, 1), common_prefix_fraction=prefix_tokens / max(total, 1),
                   max_logprob_diff=max_lp, first_divergence=first, worst_flip_nats=worst_flip)
    return worst_flip <= NEAR_TIE_NATS, summary


def engine_pair(report, section, name, cfg, sizes, args, variants, perf_on):
    """Build each variant's engine in turn (one at a time: two Llama 3 8B copies need not fit), run the same greedy
    prompts, measure speed on `perf_on`, then compare every variant with the first (the reference)."""
    prompts = random_prompts(cfg, sizes.check_prompt_lens, seed=1)
    runs = {}
    for label, kw in variants:
        if report.remaining() < 30:
            report.check(section, f"{name} {label}", None, detail="not run: time budget exhausted")
            continue
        seqs = max(sizes.batches) if label == perf_on else min(len(prompts), sizes.check_max_seqs)
        llm = build_llm(name, cfg, sizes, seqs, **kw)
        report.info.setdefault("startup_s", {})[f"{name} {label}"] = round(llm.startup_seconds, 1)
        runs[label] = greedy_run(llm, prompts, sizes.check_new_tokens)
        if label == perf_on:
            measure_speed(report, llm, name, label, sizes)
        del llm
        gc.collect()
    ref_label = variants[0][0]
    for label, _ in variants[1:]:
        if ref_label in runs and label in runs:
            ok, s = compare_greedy(runs[ref_label], runs[label])
            fd = s["first_divergence"]
            where = "no divergence" if fd is None else (f"first divergence: request {fd['request']} token "
                                                        f"{fd['position']} (flip {fd['flip_nats']} nats)")
            report.check(section, f"{name} {label} vs {ref_label}", ok, s["max_logprob_diff"], None,
                         f"tokens match {s['match_fraction']:.1%}, common prefix {s['common_prefix_fraction']:.1%}, "
                         f"{where}")
            report.info.setdefault("engine_agreement", {})[f"{name} {label} vs {ref_label}"] = s


# ------------------------------------------------------------------------------------------------------------
# c. speed beside the roofline
# ------------------------------------------------------------------------------------------------------------

def decode_roofline(report, llm, batch, context):
    """(bytes one decode step reads at minimum, tok/s if it ran at memory bandwidth)."""
    from bench_decode import step_bytes

    b = step_bytes(llm, batch, context)["total"]
    return b, batch / (b / report.info["bandwidth"])


def prefill_roofline(report, llm, prompt_len, tokens_per_step):
    """Prefill tok/s bound: the slower of bandwidth (weights + the step's KV writes per step) and compute (2 FLOPs
    per weight per token, the LM head once per prompt, plus causal attention; peak bf16 FLOP/s)."""
    import jax

    cfg = llm.model_config
    weights = sum(x.nbytes for x in jax.tree.leaves(llm.engine.runner.params))
    kv = tokens_per_step * cfg.kv_bytes_per_token(llm.engine_config.kv_cache_dtype)
    bw_tok_s = tokens_per_step / ((weights + kv) / report.info["bandwidth"])
    peak = report.info.get("peak_bf16_flops")
    if not peak:
        return bw_tok_s
    head = cfg.hidden_size * cfg.vocab_size
    body = cfg.num_params() - head * (1 if cfg.tie_word_embeddings else 2)
    # 4 Hq hd FLOPs per (query, visible key) and layer; the mean visible keys of a causal (windowed) prompt
    visible = [sum(min(i + 1, w or prompt_len) for i in range(prompt_len)) / prompt_len for w in cfg.layer_windows()]
    attn = 4 * cfg.num_heads * cfg.head_dim * sum(visible)
    flops_per_tok = 2 * body + attn + 2 * head / prompt_len
    return min(bw_tok_s, peak / flops_per_tok)


def measure_speed(report, llm, name, label, sizes):
    """Decode at each batch (LLM.generate wall clock, decode steps alone, the compiled step alone) and prefill."""
    cfg = llm.model_config
    engine = f"jaxserve {label}"
    for b in sizes.batches:
        if report.remaining() < 15:
            break
        # warm-up (allocator, first runs) on other prompts: the same ones would hit the prefix cache
        timed_generate(llm, random_prompts(cfg, [sizes.decode_prompt_len] * b, seed=200 + b), 2)
        prompts = random_prompts(cfg, [sizes.decode_prompt_len] * b, seed=100 + b)
        wall, stats = timed_generate(llm, prompts, sizes.decode_new_tokens)
        ctx = sizes.decode_prompt_len + sizes.decode_new_tokens // 2
        nbytes, roof = decode_roofline(report, llm, b, ctx)
        dec_tok_s = stats["decode_tokens"] / max(stats["decode_seconds"], 1e-9)
        report.perf += [
            dict(engine=engine, model=name, what=f"decode, LLM.generate wall (prompt {sizes.decode_prompt_len}, "
                 f"+{sizes.decode_new_tokens})", batch=b, tok_s=b * sizes.decode_new_tokens / wall),
            dict(engine=engine, model=name, what=f"decode steps (ctx ~{ctx})", batch=b, tok_s=dec_tok_s,
                 roofline_tok_s=roof, bytes_per_step=nbytes, step_ms=1e3 * b / dec_tok_s)]
        step_s = time_compiled_step(llm, b, ctx, sizes.step_repeats)
        report.perf.append(dict(engine=engine, model=name, what=f"compiled decode step alone (ctx {ctx})", batch=b,
                                tok_s=b / step_s, roofline_tok_s=roof, bytes_per_step=nbytes, step_ms=1e3 * step_s))
    if report.remaining() < 15:
        return
    timed_generate(llm, random_prompts(cfg, [sizes.prefill_len] * 2, seed=8), 1)
    prompts = random_prompts(cfg, [sizes.prefill_len] * sizes.prefill_prompts, seed=7)
    wall, stats = timed_generate(llm, prompts, 1)
    tokens = sizes.prefill_prompts * sizes.prefill_len
    roof = prefill_roofline(report, llm, sizes.prefill_len, sizes.max_num_batched_tokens)
    what = f"prefill {sizes.prefill_prompts} x {sizes.prefill_len}"
    report.perf += [
        dict(engine=engine, model=name, what=f"{what}, LLM.generate wall (1 new token)", tok_s=tokens / wall),
        dict(engine=engine, model=name, what=f"{what}, prefill steps", roofline_tok_s=roof,
             tok_s=stats["prefill_tokens"] / max(stats["prefill_seconds"], 1e-9))]


def timed_generate(llm, prompts, new_tokens):
    """(wall seconds of LLM.generate, the engine's prefill / decode step seconds and tokens in that call)."""
    from jaxserve import SamplingParams

    st = llm.engine.stats
    s0, t0 = dict(st.kind_seconds), dict(st.kind_tokens)
    sp = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    t = time.perf_counter()
    llm.generate(prompts, sp, use_tqdm=False)
    wall = time.perf_counter() - t
    return wall, {f"{k}_{u}": (st.kind_seconds if u == "seconds" else st.kind_tokens)[k] -
                  (s0 if u == "seconds" else t0)[k] for k in ("prefill", "decode") for u in ("seconds", "tokens")}


def time_compiled_step(llm, batch, context, repeats):
    """Median seconds of the engine's compiled decode program for `batch` rows (the smallest decode bucket that
    holds them) on fixed inputs: each row at `context` on pages of its own, greedy sampling. Run with the engine
    idle; it overwrites those pages' last slots. (scripts/bench_decode.py --e2e uses it too.)"""
    import jax
    import numpy as np

    from jaxserve import SamplingParams
    from jaxserve.engine.runner import SamplingRow

    runner = llm.engine.runner
    tables = runner.synthetic_tables(batch, context)  # (sliding groups: their window's pages, as when serving)
    if getattr(runner, "ragged", False):  # a ragged engine: its T-token forward, then the head + sampler of N rows
        return _time_ragged_decode(runner, tables, context, repeats)
    bucket = min(b for b, q in runner.buckets() if q == 1 and b >= batch)
    inp = runner.step_inputs(bucket, 1, [([5], context - 1, t) for t in tables])
    st = runner.sampling_inputs([SamplingRow(SamplingParams(temperature=0.0), [], 0, 0, None, [])] * batch, bucket)
    prog = runner.programs[(bucket, 1)]          # the engine's own executable for this bucket
    inputs = runner.place_inputs((inp, st))
    times = []
    for _ in range(repeats + 1):
        t = time.perf_counter()
        res, runner.kv = prog(runner.params, runner.kv, *inputs)
        jax.block_until_ready(res.tokens)
        times.append(time.perf_counter() - t)
    return float(np.median(times[1:]))


def _time_ragged_decode(runner, tables, context, repeats):
    """`time_compiled_step` for a ragged engine: its programs for one decode token per table."""
    import jax
    import numpy as np

    from jaxserve import SamplingParams
    from jaxserve.engine.runner import SamplingRow
    from jaxserve.models.ragged import build_ragged_inputs

    batch = len(tables)
    T = min(t for t in runner.ragged_ladder() if t >= batch)
    N = min(n for n in runner.cfg.decode_buckets() if n >= batch)
    groups = runner.kv_layout.num_groups if runner.kv_layout.grouped else None
    inp = build_ragged_inputs([([5], context - 1, t, True) for t in tables], T, runner.cfg.max_num_seqs, runner.P,
                              runner.page_size, groups=groups)
    st = runner.sampling_inputs([SamplingRow(SamplingParams(temperature=0.0), [], 0, 0, None, [])] * batch, N)
    prog, (head, sampler) = runner._ragged[T], runner._heads[N]
    times = []
    for _ in range(repeats + 1):
        t = time.perf_counter()
        (last, _), runner.kv = prog(runner.params, runner.kv, inp)
        jax.block_until_ready(sampler(head(runner.params, last), st).tokens)
        times.append(time.perf_counter() - t)
    return float(np.median(times[1:]))


# ------------------------------------------------------------------------------------------------------------
# d. HF transformers baseline (subprocess)
# ------------------------------------------------------------------------------------------------------------

def hf_config(cfg):
    """A transformers config of the same shapes as a jaxserve ModelConfig (Llama or Gemma 3 text)."""
    import transformers

    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                  num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                  num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                  max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
                  tie_word_embeddings=cfg.tie_word_embeddings, bos_token_id=cfg.bos_token_id,
                  eos_token_id=list(cfg.eos_token_ids), pad_token_id=cfg.pad_token_id)
    v5 = int(transformers.__version__.split(".")[0]) >= 5
    if cfg.arch == "gemma3":
        types = ["sliding_attention" if cfg.layer_is_sliding(i) else "full_attention" for i in range(cfg.num_layers)]
        rope = ({"full_attention": {"rope_type": "default", "rope_theta": cfg.rope_theta},
                 "sliding_attention": {"rope_type": "default", "rope_theta": cfg.rope_local_theta}} if v5
                else {"rope_theta": cfg.rope_theta, "rope_local_base_freq": cfg.rope_local_theta})
        return transformers.Gemma3TextConfig(**common, **(dict(rope_parameters=rope) if v5 else rope),
                                             query_pre_attn_scalar=cfg.query_pre_attn_scalar,
                                             sliding_window=cfg.sliding_window, layer_types=types)
    rope = dict(rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}) if v5 else \
        dict(rope_theta=cfg.rope_theta)
    return transformers.LlamaConfig(**common, **rope)


def hf_child(spec):
    """Runs in the subprocess: one JSON line per measurement on stdout (so a timeout keeps what was measured)."""
    import torch
    import transformers

    if spec["device"] == "cuda" and not torch.cuda.is_available():
        print(json.dumps(dict(skipped="torch has no CUDA device")), flush=True)
        return
    dev = torch.device(spec["device"])
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    print(json.dumps(dict(info=dict(torch=torch.__version__, transformers=transformers.__version__,
                                    device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"))),
          flush=True)
    for name, cfg_dict in spec["models"]:
        from jaxserve.config import ModelConfig

        cfg = ModelConfig.from_dict(cfg_dict)
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)              # weights created in bf16, on the device
        try:
            with dev:
                model = transformers.AutoModelForCausalLM.from_config(hf_config(cfg)).to(torch.bfloat16).eval()
        finally:
            torch.set_default_dtype(default)
        n_params = sum(p.numel() for p in model.parameters())   # shapes as jaxserve's (tied weights once)
        print(json.dumps(dict(params={name: [n_params, cfg.num_params()]})), flush=True)
        gen = torch.Generator().manual_seed(0)

        @torch.inference_mode()
        def generate(b, plen, n):
            ids = torch.randint(3, cfg.vocab_size, (b, plen), generator=gen).to(dev)
            sync()
            t = time.perf_counter()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, use_cache=True, pad_token_id=cfg.pad_token_id)
            sync()
            assert out.shape[1] == plen + n, out.shape
            return time.perf_counter() - t

        n = spec["new_tokens"]
        for b in spec["batches"]:
            try:
                generate(b, spec["prompt_len"], 2)                   # warm-up
                t1 = generate(b, spec["prompt_len"], 1)              # prefill + one token
                tn = generate(b, spec["prompt_len"], n)
                tok_s = b * (n - 1) / max(tn - t1, 1e-9)
                print(json.dumps(dict(engine="hf transformers", model=name, batch=b, tok_s=tok_s,
                                      step_ms=1e3 * b / tok_s,
                                      what=f"decode (prompt {spec['prompt_len']}, +{n}; generate(n) - generate(1))")),
                      flush=True)
            except Exception as e:  # noqa: BLE001  (e.g. out of memory at the largest batch)
                print(json.dumps(dict(engine="hf transformers", model=name, batch=b, what="decode",
                                      error=last_line(e))), flush=True)
        try:
            p, m = spec["prefill_prompts"], spec["prefill_len"]
            generate(2, m, 1)
            t = generate(p, m, 1)
            print(json.dumps(dict(engine="hf transformers", model=name, tok_s=p * m / t,
                                  what=f"prefill {p} x {m}, generate wall (1 new token)")), flush=True)
        except Exception as e:  # noqa: BLE001
            print(json.dumps(dict(engine="hf transformers", model=name, what="prefill", error=last_line(e))),
                  flush=True)
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def run_hf(report, sizes, args, configs):
    """The HF baseline in a subprocess (torch then owns the memory JAX does not hold); returns a skip reason."""
    import importlib.util

    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        return f"{' and '.join(missing)} not installed"
    platform = report.info["platform"]
    if platform not in ("gpu", "cpu"):
        return f"HF baseline runs on CUDA or CPU, not {platform}"
    spec = dict(device="cuda" if platform == "gpu" else "cpu", batches=list(sizes.batches),
                prompt_len=sizes.decode_prompt_len, new_tokens=sizes.decode_new_tokens,
                prefill_prompts=sizes.prefill_prompts, prefill_len=sizes.prefill_len,
                models=[(name, cfg.to_dict()) for name, cfg in configs])
    timeout = max(10.0, report.remaining() - 5)
    cmd = [sys.executable, os.path.abspath(__file__), "--hf-child", json.dumps(spec)]
    env = dict(os.environ, JAX_PLATFORMS="cpu")   # the child imports jaxserve.config: keep JAX off the GPU
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
        out, note = r.stdout, "" if r.returncode == 0 else f"exit {r.returncode}: {r.stderr.strip()[-300:]}"
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        note = f"stopped at the time budget ({timeout:.0f} s)"
    for line in out.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if "skipped" in row:
            return row["skipped"]
        if "info" in row:
            report.info["hf"] = row["info"]
        elif "params" in row:   # [HF's, jaxserve's] parameter counts: the same model shapes
            report.info.setdefault("hf_params", {}).update(row["params"])
        else:
            report.hf.append(row)
    if note:
        raise RuntimeError(note)
    return None


# ------------------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------------------

def run(args):
    sizes = SMOKE if args.smoke else Sizes()
    if args.batches:
        sizes.batches = tuple(args.batches)
    report = Report(args.budget_s)
    describe_device(report)
    report.info["command"] = " ".join([os.path.basename(sys.executable)] + sys.argv)
    report.info["sizes"] = dataclasses.asdict(sizes)
    configs = [model_config(m, sizes) for m in args.models]
    # ~seconds each section needs at least on one H100/H200 (compiles dominate); smoke: on 2 CPU cores
    need = (lambda full, smoke: smoke if args.smoke else full)
    if "kernels" in args.skip:
        report.skip("a. kernels vs reference", "--skip kernels")
    else:
        report.section("a. kernels vs reference", lambda: run_kernels(report, sizes, args), need(60, 30))
    for (name, cfg), preset in zip(configs, args.models):
        if "engine" in args.skip:
            report.skip(f"b/c. engine {preset}", "--skip engine")
            continue
        variants = [("xla", dict(attention_impl="xla")), ("pallas", dict(attention_impl="pallas"))]
        report.section(f"b/c. engine {preset}: attention pallas vs xla",
                       lambda: engine_pair(report, "engine", name, cfg, sizes, args, variants, perf_on="pallas"),
                       need(120 if "8b" in preset else 60, 40))
    for (name, cfg), preset in zip(configs, args.models):
        if preset not in args.int8_models:
            continue
        if "int8" in args.skip:
            report.skip(f"b. engine {preset} int8", "--skip int8")
            continue
        # attention "auto": the kernels on TPU / GPU, the XLA path on CPU (the pair compares the matmuls)
        variants = [(f"int8 matmul {impl}", dict(quantization="int8", attention_impl="auto", matmul_impl=impl))
                    for impl in ("xla", "pallas")]
        report.section(f"b. engine {preset} int8: matmul pallas vs xla",
                       lambda: engine_pair(report, "engine int8", name, cfg, sizes, args, variants, perf_on=None),
                       need(60, 30))
    if "hf" in args.skip:
        report.skip("d. HF transformers baseline", "--skip hf")
    else:
        report.section("d. HF transformers baseline", lambda: run_hf(report, sizes, args, configs), need(60, 20))
    return report


def write(report, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    md = report.markdown()
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report.to_json(), f, indent=1, default=str)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(md + "\n")
    print("\n" + md + f"\n\nwrote {out_dir}/report.json and report.md", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "bench_results", "device"))
    ap.add_argument("--budget-s", type=float, default=480.0, help="sections are skipped once this is near")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--int8-models", nargs="*", default=["gemma3-270m"], choices=list(MODELS),
                    help="models also run with quantization=int8, matmul_impl pallas vs xla")
    ap.add_argument("--batches", type=int, nargs="+", help="decode batches (default 1 32 128; smoke 1 2)")
    ap.add_argument("--kernel", choices=["tpu", "gpu"], help="force a kernel family (dispatch's kernel=)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["kernels", "engine", "int8", "hf"],
                    help="sections not to run")
    ap.add_argument("--smoke", action="store_true", help="CPU, interpret mode, tiny shapes: checks the script")
    ap.add_argument("--hf-child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.hf_child:
        hf_child(json.loads(args.hf_child))
        return 0
    if args.smoke:
        os.environ["JAX_PLATFORMS"] = "cpu"
    # JAX takes GPU memory as it needs it (not 75% up front), so the HF subprocess finds room afterwards.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    report = run(args)
    write(report, args.out)
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
