"""Time `jaxserve.engine.sampler.sample` on the current backend, and the cost of structured output's token masks.

    python scripts/bench_sampling.py                 # R in {1, 32}, V = 262144 (Gemma 3 vocab)
    python scripts/bench_sampling.py --rows 1 8 32 --vocab 128256 --history 8192
    python scripts/bench_sampling.py --structured    # Gemma 3 270M: decode ms/step, JSON schema vs no grammar
    python scripts/bench_sampling.py --grammar-engines   # llguidance vs xgrammar mask ms/token, Gemma 3 tokenizer
    python scripts/bench_sampling.py --structured --grammar-engines --steps 16 --rounds 1   # a quick check

Sampler (the default section): wall-clock min / median and process CPU time (all threads) per call, jitted,
inputs already on device.

`--structured`: the real Gemma 3 270M through the engine (`LLM()`, static scheduler so every decode step has all
R rows), R copies of one prompt, greedy, `--steps` tokens per row: no grammar (ignore_eos), and each `--schemas`
variant of `json_schema` (minItems = --steps, so the grammar cannot end the output first) on every row,
interleaved over `--rounds` after an untimed warm-up. Per decode step: the engine step's wall and process-CPU
time (`LLMEngine.step`: schedule, inputs, the compiled step, the stop check), its `_execute` part, the host
sampling-array build (`ModelRunner._sampling_arrays`), the token masks inside it (`runner.fill_masks` +
`ModelRunner.token_mask`: the grammar's bitmask fill, all rows together, + AND) and the stop check (detokenize +
grammar consume). Every row has the same grammar state (same prompt, greedy).

`--grammar-engines`: llguidance (jaxserve's engine) vs xgrammar on the Gemma 3 tokenizer (262,144 ids), the same
schemas (`--doc-items` items) and whitespace rules, over the tokens of a fixed valid document: tokenizer build
s, grammar compile ms, mask ms per token (mean / p50 / max / first; in strings / elsewhere) and consume ms per
token; and where the two engines' masks differ. xgrammar is skipped with a note when it is not installed.
xgrammar's TokenizerInfo is built from the bare tokenizer.json (`PreTrainedTokenizerFast(tokenizer_file=...)`),
so it takes added special tokens such as <pad> for literal text (allowed inside strings).

`--out FILE` also writes every section's numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402

from jaxserve.engine.sampler import SamplingTensors, sample  # noqa: E402
from jaxserve.engine.sampling_inputs import build_sampling_arrays  # noqa: E402
from jaxserve.sampling_params import SamplingParams  # noqa: E402

SCENARIOS = {
    "all greedy": dict(temperature=0.0),
    "temperature only": dict(temperature=0.8),
    "top-k 50": dict(temperature=0.8, top_k=50),
    "top-p 0.9": dict(temperature=0.8, top_p=0.9),
    "top-k 50 + top-p 0.9 + min-p 0.05": dict(temperature=0.8, top_k=50, top_p=0.9, min_p=0.05),
    "top-k 1000": dict(temperature=0.8, top_k=1000),
    "top-k 5000 (bisection)": dict(temperature=0.8, top_k=5000),
    "penalties on (greedy)": dict(temperature=0.0, repetition_penalty=1.2, presence_penalty=0.5,
                                  frequency_penalty=0.5),
    "penalties + temperature": dict(temperature=0.8, repetition_penalty=1.2, presence_penalty=0.5,
                                    frequency_penalty=0.5),
    "greedy + logprobs 5": dict(temperature=0.0, logprobs=5),
}


def llm_like_logits(rng, R, V):
    """Roughly LLM-shaped: a heavy-tailed bulk plus a few strong candidates."""
    x = rng.standard_normal((R, V)).astype(np.float32) * 2.0 - 4.0
    for r in range(R):
        top = rng.choice(V, 32, replace=False)
        x[r, top] += rng.uniform(6.0, 14.0, 32).astype(np.float32)
    return x


def bench(fn, *args, reps=7, inner=3):
    """(min wall ms, median wall ms, median process-CPU ms) per call. CPU time (all threads) is the steadier
    number on a shared machine; wall time is the latency."""
    jax.block_until_ready(fn(*args))
    ts, cs = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        ts.append((time.perf_counter() - t0) / inner)
        cs.append((time.process_time() - c0) / inner)
    ts.sort()
    cs.sort()
    return ts[0] * 1e3, ts[len(ts) // 2] * 1e3, cs[len(cs) // 2] * 1e3


def run_sampler(args, results):
    rng = np.random.default_rng(0)
    V, H = args.vocab, args.history
    fn = jax.jit(lambda x, st: sample(x, st, args.max_logprobs, row_chunk=args.row_chunk))
    print(f"backend={jax.default_backend()} devices={jax.device_count()} V={V} H={H} "
          f"max_logprobs={args.max_logprobs} jax={jax.__version__}")
    out = results.setdefault("sampler", {"V": V, "H": H, "max_logprobs": args.max_logprobs, "rows": []})
    for R in args.rows:
        x = jax.device_put(llm_like_logits(rng, R, V))
        fill = 3 * H // 4
        hist = [rng.integers(0, V, fill).tolist() for _ in range(R)]
        for name, kw in SCENARIOS.items():
            if args.only and not any(o in name for o in args.only):
                continue
            params = [SamplingParams(**kw) for _ in range(R)]
            arrays = build_sampling_arrays(params, hist, [fill // 2] * R, [5] * R, list(range(R)),
                                           [[]] * R, R, H, 8)
            st = jax.device_put(SamplingTensors(**arrays))
            lo, med, cpu = bench(fn, x, st, reps=args.reps)
            print(f"R={R:3d}  {name:36s} wall min {lo:8.2f} ms  median {med:8.2f} ms   cpu {cpu:8.2f} ms",
                  flush=True)
            out["rows"].append({"R": R, "scenario": name, "wall_min_ms": lo, "wall_median_ms": med, "cpu_ms": cpu})


# ------------------------------------------------------------------------------------------------
# Structured output: the token masks' cost
# ------------------------------------------------------------------------------------------------

JSON_PROMPT = "Write a JSON object listing fruits and a score out of 100 for each, as many as you can:\n"
SCHEMA_KINDS = ("plain", "bounded")


def json_schema(min_items: int, kind: str = "plain") -> dict:
    """An object holding an array of at least `min_items` {name, score} objects (so never shorter than
    `min_items` tokens): keys, separators, a string (the state that allows most of the vocabulary) and an integer.
    "plain": an unbounded string and integer; "bounded": name maxLength 24, score 0..100 (length-bounded strings
    are a different, much slower path in llguidance)."""
    name, score = {"type": "string"}, {"type": "integer"}
    if kind == "bounded":
        name, score = dict(name, maxLength=24), dict(score, minimum=0, maximum=100)
    elif kind != "plain":
        raise ValueError(f"schema kind {kind!r}: one of {SCHEMA_KINDS}")
    item = {"type": "object", "properties": {"name": name, "score": score},
            "required": ["name", "score"], "additionalProperties": False}
    return {"type": "object", "properties": {"items": {"type": "array", "items": item, "minItems": min_items}},
            "required": ["items"], "additionalProperties": False}


def json_document(n_items: int) -> str:
    """A valid document for `json_schema(n_items, kind)` of either kind, written the way jaxserve's grammar emits
    JSON (structured.JSON_OPTIONS: no free whitespace, ", " and ": " separators)."""
    names = ["apple", "banana", "cherry", "dragon fruit", "elderberry", "fig", "grape", "honeydew melon"]
    items = [{"name": f"{names[i % len(names)]} {i}", "score": (37 * i + 11) % 101} for i in range(n_items)]
    return json.dumps({"items": items}, separators=(", ", ": "), ensure_ascii=False)


class StepTimer:
    """Instance-level wrappers around one engine's runner.token_mask, runner._sampling_arrays and engine._detokenize
    (the stop check), accumulating seconds for the step in progress. `remove()` puts the class methods back."""

    NAMES = ("mask", "arrays", "stop")

    def __init__(self, eng):
        self.eng, self.runner = eng, eng.runner
        self.acc = dict.fromkeys(self.NAMES, 0.0)
        self.runner.token_mask = self._wrap("mask", self.runner.token_mask)
        self.runner._sampling_arrays = self._wrap("arrays", self.runner._sampling_arrays)
        self.eng._detokenize = self._wrap("stop", self.eng._detokenize)
        # a step's grammar masks are filled together (runner.fill_masks) before token_mask ANDs them in
        import jaxserve.engine.runner as runner_mod

        self._fill_masks = runner_mod.fill_masks
        runner_mod.fill_masks = self._wrap("mask", runner_mod.fill_masks)

    def _wrap(self, key, fn):
        acc = self.acc

        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                acc[key] += time.perf_counter() - t0
        return timed

    def reset(self):
        for k in self.NAMES:
            self.acc[k] = 0.0

    def remove(self):
        del self.runner.token_mask, self.runner._sampling_arrays, self.eng._detokenize
        import jaxserve.engine.runner as runner_mod

        runner_mod.fill_masks = self._fill_masks


def decode_run(llm, timer, prompt_ids, R: int, steps: int, schema, tag: str) -> dict:
    """R requests of `steps` tokens each (greedy; the JSON schema on every row, or none with ignore_eos); per-step
    figures of the decode steps that ran all R rows."""
    from jaxserve import SamplingParams as SP

    eng = llm.engine
    if schema is None:
        sp = SP(temperature=0.0, max_tokens=steps, ignore_eos=True)
    else:  # the grammar refuses EOS until the document is complete, which minItems puts past max_tokens
        sp = SP(temperature=0.0, max_tokens=steps, structured_outputs={"json": schema})
    for i in range(R):
        eng.add_request(prompt_ids, sp, request_id=f"{tag}-{i}-{time.monotonic_ns()}")
    st = eng.stats
    rows = {k: [] for k in ("wall", "cpu", "execute") + StepTimer.NAMES}
    finished = []
    while eng.has_unfinished_requests():
        timer.reset()
        d0, k0 = st.decode_steps, st.kind_seconds["decode"]
        n_running = len(eng.scheduler.running)
        t0, c0 = time.perf_counter(), time.process_time()
        outs = eng.step()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        finished += [o for o in outs if o.finished]
        if st.decode_steps == d0 + 1 and n_running == R:
            rows["wall"].append(wall)
            rows["cpu"].append(cpu)
            rows["execute"].append(st.kind_seconds["decode"] - k0)
            for k in StepTimer.NAMES:
                rows[k].append(timer.acc[k])
    res = {f"{k}_ms": 1e3 * statistics.fmean(v) if v else float("nan") for k, v in rows.items()}
    res["step_median_ms"] = 1e3 * statistics.median(rows["wall"]) if rows["wall"] else float("nan")
    res["mask_max_ms"] = 1e3 * max(rows["mask"]) if rows["mask"] else float("nan")
    res["decode_steps"] = len(rows["wall"])
    res["finish_reasons"] = sorted({o.outputs[0].finish_reason for o in finished})
    res["tokens_per_row"] = sorted({len(o.outputs[0].token_ids) for o in finished})
    res["sample_text"] = finished[0].outputs[0].text[:200] if finished else ""
    return res


def run_structured(args, results):
    from jaxserve import LLM

    kw = {"scheduler": "static"}  # prefill the whole batch, then decode it together: every decode step has R rows
    if max(args.rows) > 32:
        kw["max_num_seqs"] = max(args.rows)
    t0 = time.perf_counter()
    llm = LLM(**kw)
    print(f"structured output: Gemma 3 270M ({llm.model_config.vocab_size} ids) backend={jax.default_backend()} "
          f"loaded+compiled in {time.perf_counter() - t0:.1f} s; {args.steps} tokens per row, greedy, "
          f"{args.rounds} round(s), static scheduler", flush=True)
    eng = llm.engine
    prompt_ids = eng.tokenize_prompt(JSON_PROMPT)
    eng.grammars.warm()  # the llguidance tokenizer (~3 s at 262k ids), built once per engine, not per step
    modes = {"none": None}
    modes.update({("json" if k == "plain" else f"json-{k}"): json_schema(args.steps, k) for k in args.schemas})
    timer = StepTimer(eng)
    per = {(R, m): [] for R in args.rows for m in modes}
    try:
        # Warm-up: a few steps of each (R, mode), untimed, and each schema compiled once (the engine caches it).
        for R in args.rows:
            for m, sch in modes.items():
                decode_run(llm, timer, prompt_ids, R, min(args.steps, 8), sch, f"warm-{m}-{R}")
        for rnd in range(args.rounds):
            for R in args.rows:
                for m, sch in modes.items():
                    r = decode_run(llm, timer, prompt_ids, R, args.steps, sch, f"r{rnd}-{m}-{R}")
                    per[(R, m)].append(r)
                    print(f"  round {rnd + 1}  R={R:3d}  {m:12s} step {r['wall_ms']:8.2f} ms  "
                          f"masks {r['mask_ms']:7.3f} ms  ({r['decode_steps']} steps, {r['finish_reasons']})",
                          flush=True)
    finally:
        timer.remove()

    def med(R, m, k):
        return statistics.median(r[k] for r in per[(R, m)])

    cols = [("step", "wall_ms"), ("step cpu", "cpu_ms"), ("execute", "execute_ms"), ("sampling arrays", "arrays_ms"),
            ("token masks", "mask_ms"), ("stop check", "stop_ms")]
    print("\nper decode step, ms (mean over the steps with all R rows, median over rounds):")
    print(f"{'R':>4s}  {'grammar':12s}" + "".join(f"{c:>16s}" for c, _ in cols) + f"{'steps':>7s}")
    out = {"model": "gemma3-270m", "vocab": llm.model_config.vocab_size, "steps": args.steps,
           "rounds": args.rounds, "scheduler": "static", "prompt": JSON_PROMPT,
           "schemas": {m: sch for m, sch in modes.items() if sch is not None}, "rows": []}
    for R in args.rows:
        for m in modes:
            line = f"{R:4d}  {m:12s}" + "".join(f"{med(R, m, k):16.3f}" for _, k in cols)
            print(line + f"{per[(R, m)][-1]['decode_steps']:7d}")
            out["rows"].append({"R": R, "grammar": m, **{k: med(R, m, k) for _, k in cols},
                                "step_median_ms": med(R, m, "step_median_ms"), "mask_max_ms": med(R, m, "mask_max_ms"),
                                "rounds": per[(R, m)]})
    print("\nJSON schema on every row vs no grammar, ms per decode step (host masks: token masks minus no-grammar's):")
    print(f"{'R':>4s}  {'grammar':12s}  {'host masks':>11s}  {'masks/row':>10s}  {'mask max':>9s}  "
          f"{'step none':>10s}  {'step json':>10s}  {'delta':>8s}  {'delta %':>8s}")
    for R in args.rows:
        a = med(R, "none", "wall_ms")
        for m in list(modes)[1:]:
            mask = med(R, m, "mask_ms") - med(R, "none", "mask_ms")
            b = med(R, m, "wall_ms")
            print(f"{R:4d}  {m:12s}  {mask:11.3f}  {mask / R:10.4f}  {med(R, m, 'mask_max_ms'):9.3f}  {a:10.2f}  "
                  f"{b:10.2f}  {b - a:8.2f}  {100 * (b - a) / a:7.1f}%")
    for m in list(modes)[1:]:
        print(f"R={args.rows[0]} {m} output: {per[(args.rows[0], m)][-1]['sample_text']!r}")
    results["structured"] = out


# ------------------------------------------------------------------------------------------------
# llguidance vs xgrammar
# ------------------------------------------------------------------------------------------------

def _stats_ms(ts, wide=None) -> dict:
    """mean / p50 / max / first of per-token seconds, in ms; with `wide` (per token: the mask allows more than
    half the vocabulary, i.e. inside a string), also the mean over those tokens and over the others."""
    ms = [1e3 * t for t in ts]
    out = {"mean": statistics.fmean(ms), "p50": statistics.median(ms), "max": max(ms), "first": ms[0]}
    if wide is not None:
        w = [x for x, f in zip(ms, wide) if f]
        n = [x for x, f in zip(ms, wide) if not f]
        out.update(wide_n=len(w), wide_mean=statistics.fmean(w) if w else float("nan"),
                   narrow_mean=statistics.fmean(n) if n else float("nan"))
    return out


def _popcount(mask: np.ndarray) -> int:
    return int(np.unpackbits(np.ascontiguousarray(mask).view(np.uint8)).sum())


def _allowed(mask: np.ndarray, tok: int) -> bool:
    return bool((int(mask[tok // 32]) >> (tok % 32)) & 1)


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def _walk(fill, consume, ids, V, eos, final) -> dict:
    """Mask then consume each token of `ids`, timing both; the masks (int32 words) and whether EOS may end it."""
    masks, tm, tc = [], [], []
    for i, tok in enumerate(ids):
        t0 = time.perf_counter()
        mask = fill()
        tm.append(time.perf_counter() - t0)
        masks.append(mask.copy())
        t0 = time.perf_counter()
        ok = consume(tok)
        tc.append(time.perf_counter() - t0)
        if not ok:
            raise RuntimeError(f"token {tok} refused at position {i}")
    wide = [_popcount(x) > V // 2 for x in masks]
    end = fill()
    return {"mask_ms": _stats_ms(tm, wide), "consume_ms": _stats_ms(tc), "masks": masks,
            "eos_allowed_at_end": any(_allowed(end, e) for e in eos) and final()}


def bench_llguidance(tok_path, V, eos, schemas, ids) -> dict:
    """jaxserve's engine: tokenizer build once, then per schema the grammar compile and a walk over `ids`."""
    import llguidance
    import llguidance.numpy as llnp

    from jaxserve.engine.structured import JSON_OPTIONS

    t0 = time.perf_counter()
    lt = llguidance.LLTokenizer(tok_path, n_vocab=V, eos_token=eos)
    out = {"version": _version("llguidance"), "tokenizer_s": time.perf_counter() - t0, "schemas": {}}
    bm = llnp.allocate_token_bitmask(1, V)
    for kind, schema in schemas.items():
        t0 = time.perf_counter()
        m = llguidance.LLMatcher(lt, llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS),
                                 log_level=0)
        t_compile = time.perf_counter() - t0
        if m.is_error():
            raise RuntimeError(f"llguidance: {m.get_error()}")

        def fill(m=m):
            llnp.fill_next_token_bitmask(m, bm, 0)
            return bm[0]

        out["schemas"][kind] = {"compile_ms": 1e3 * t_compile,
                                **_walk(fill, m.consume_token, ids, V, eos, m.is_accepting)}
    return out


def bench_xgrammar(tok_path, V, eos, schemas, ids) -> dict:
    try:
        t0 = time.perf_counter()
        import xgrammar as xgr
        from transformers import PreTrainedTokenizerFast
        t_import = time.perf_counter() - t0
    except ImportError as e:
        return {"skipped": f"xgrammar not installed ({e}); pip install xgrammar to compare"}
    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(PreTrainedTokenizerFast(tokenizer_file=tok_path), vocab_size=V,
                                              stop_token_ids=eos)
    out = {"version": _version("xgrammar"), "import_s": t_import, "tokenizer_s": time.perf_counter() - t0,
           "schemas": {}}
    compiler = xgr.GrammarCompiler(info)
    bm = xgr.allocate_token_bitmask(1, V)
    for kind, schema in schemas.items():
        t0 = time.perf_counter()
        cg = compiler.compile_json_schema(schema, any_whitespace=False, separators=(", ", ": "))
        t_compile = time.perf_counter() - t0
        m = xgr.GrammarMatcher(cg)

        def fill(m=m):
            m.fill_next_token_bitmask(bm, 0)
            return bm[0].numpy()

        out["schemas"][kind] = {"compile_ms": 1e3 * t_compile,
                                **_walk(fill, m.accept_token, ids, V, eos, lambda: True)}
    return out


def run_grammar_engines(args, results):
    from jaxserve.weights.resolve import resolve_model

    resolved = resolve_model()
    resolved.load_params()  # let the background params restore finish, so it does not overlap the timings
    resolved.params = None
    tok, cfg = resolved.tokenizer, resolved.config
    V, eos = cfg.vocab_size, [int(e) for e in cfg.eos_token_ids]
    schemas = {k: json_schema(args.doc_items, k) for k in args.schemas}
    doc = json_document(args.doc_items)
    ids = tok.encode(doc, add_bos=False)
    print(f"grammar engines: Gemma 3 tokenizer V={V} eos={eos}; schema {{items: [{{name, score}}] x >= "
          f"{args.doc_items}}} ({', '.join(schemas)}); document {len(doc)} chars, {len(ids)} tokens; "
          f"mask and consume timed per token", flush=True)
    out = {"V": V, "schemas": schemas, "document": doc, "tokens": len(ids), "engines": {}}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "tokenizer.json")
        with open(path, "w") as f:
            f.write(tok.to_json())
        engines = {"llguidance": bench_llguidance(path, V, eos, schemas, ids),
                   "xgrammar": bench_xgrammar(path, V, eos, schemas, ids)}
    print(f"{'engine':11s} {'version':>8s} {'tokenizer s':>11s}  {'schema':8s} {'compile ms':>10s}  "
          f"{'mask ms/token: mean':>19s} {'p50':>7s} {'max':>7s} {'first':>7s} {'in strings':>10s} {'elsewhere':>9s}"
          f"  {'consume ms: mean':>16s} {'max':>7s}  {'EOS at end':>10s}")
    for name, r in engines.items():
        if "skipped" in r:
            print(f"{name:11s} skipped: {r['skipped']}")
            out["engines"][name] = r
            continue
        out["engines"][name] = {k: v for k, v in r.items() if k != "schemas"}
        out["engines"][name]["schemas"] = {}
        for kind, sr in r["schemas"].items():
            mk, cs = sr["mask_ms"], sr["consume_ms"]
            print(f"{name:11s} {r['version']:>8s} {r['tokenizer_s']:11.2f}  {kind:8s} {sr['compile_ms']:10.2f}  "
                  f"{mk['mean']:19.4f} {mk['p50']:7.4f} {mk['max']:7.3f} {mk['first']:7.3f} {mk['wide_mean']:10.4f} "
                  f"{mk['narrow_mean']:9.4f}  {cs['mean']:16.4f} {cs['max']:7.3f}  "
                  f"{str(sr['eos_allowed_at_end']):>10s}")
            out["engines"][name]["schemas"][kind] = {k: v for k, v in sr.items() if k != "masks"}
    n_wide = next(iter(engines["llguidance"]["schemas"].values()))["mask_ms"]["wide_n"]
    print(f"(in strings: the {n_wide} tokens whose mask allows more than half the vocabulary; elsewhere: the rest)")
    a, b = engines["llguidance"], engines["xgrammar"]
    if "skipped" not in b:
        def ids_of(m):
            return set(np.nonzero(np.unpackbits(m.view(np.uint8), bitorder="little"))[0].tolist())

        out["mask_agreement"] = {}
        for kind in schemas:
            same, only = 0, {"xgrammar": [], "llguidance": []}
            for i, (x, y) in enumerate(zip(a["schemas"][kind]["masks"], b["schemas"][kind]["masks"])):
                if np.array_equal(x, y):
                    same += 1
                    continue
                la, lb = ids_of(x), ids_of(y)
                if lb - la:
                    only["xgrammar"].append((i, sorted(lb - la)))
                if la - lb:
                    only["llguidance"].append((i, sorted(la - lb)))
            print(f"{kind}: masks identical at {same}/{len(ids)} positions")
            for name, hits in only.items():
                # an example in a narrow state (e.g. a forced stretch) and one in a string, where there are both
                wide = a["schemas"][kind]["masks"]
                picks = {}
                for i, extra in hits:
                    picks.setdefault(_popcount(wide[i]) > V // 2, (i, extra))
                for i, extra in picks.values():
                    print(f"  {name} allows ids the other does not at {len(hits)} positions; e.g. after "
                          f"{tok.decode(ids[:i])[-24:]!r}: {len(extra)} ids such as "
                          f"{[tok.id_to_token(t) for t in extra[:5]]}")
            out["mask_agreement"][kind] = {"identical": same,
                                           "only_xgrammar_at": [i for i, _ in only["xgrammar"]],
                                           "only_llguidance_at": [i for i, _ in only["llguidance"]]}
        print(f"(xgrammar + transformers import: {b['import_s']:.2f} s, not counted in its tokenizer build)")
    results["grammar_engines"] = out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 32], help="batch sizes (sampler and --structured)")
    ap.add_argument("--vocab", type=int, default=262144)
    ap.add_argument("--history", type=int, default=4096, help="H: history width (filled to 3/4)")
    ap.add_argument("--max-logprobs", type=int, default=20)
    ap.add_argument("--row-chunk", type=int, default=None)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--only", nargs="*", default=None, help="substrings of scenario names to run")
    ap.add_argument("--structured", action="store_true",
                    help="Gemma 3 270M decode ms/step and host mask ms/step, JSON schema on every row vs none")
    ap.add_argument("--grammar-engines", action="store_true",
                    help="llguidance vs xgrammar: tokenizer build, compile, mask ms per token (Gemma 3 tokenizer)")
    ap.add_argument("--sampler", action="store_true",
                    help="also the sampler scenarios (run by default only when no other section is chosen)")
    ap.add_argument("--steps", type=int, default=64, help="--structured: tokens generated per row")
    ap.add_argument("--rounds", type=int, default=3, help="--structured: interleaved rounds (median reported)")
    ap.add_argument("--doc-items", type=int, default=16, help="--grammar-engines: items in the JSON document")
    ap.add_argument("--schemas", nargs="+", default=list(SCHEMA_KINDS), choices=SCHEMA_KINDS,
                    help="JSON schema variants (see json_schema): plain (unbounded string / integer), bounded "
                         "(name maxLength 24, score 0..100)")
    ap.add_argument("--out", default=None, help="also write the results as JSON to this file")
    args = ap.parse_args()
    if args.steps < 2 or args.rounds < 1 or args.doc_items < 1:
        ap.error("--steps must be >= 2, --rounds and --doc-items >= 1")

    results: dict = {"backend": jax.default_backend(), "jax": jax.__version__}
    if args.sampler or not (args.structured or args.grammar_engines):
        run_sampler(args, results)
    if args.grammar_engines:
        run_grammar_engines(args, results)
    if args.structured:
        run_structured(args, results)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1, default=str)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
