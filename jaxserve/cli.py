"""`jaxserve generate|chat|convert|plan|serve|batch` (and more as they land)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="gemma3-270m", help="preset/embedded name, .gguf file, HF dir or converted dir")
    p.add_argument("--max-model-len", type=int, default=None, help="context length in tokens")
    p.add_argument("--max-num-seqs", type=int, default=None, help="largest decode batch")
    p.add_argument("--page-size", type=int, default=None, help="tokens per KV page")
    p.add_argument("--kv-cache-bytes", type=int, default=None, help="KV cache budget in bytes")
    p.add_argument("--random-weights", action="store_true", help="random weights for a preset (testing)")
    from jaxserve.parallel.cli import add_parallel_arguments

    add_parallel_arguments(p)


def _engine_kwargs(args) -> dict:
    from jaxserve.parallel.cli import parallel_kwargs

    kw = parallel_kwargs(args)  # {} unless --mesh; joins jax.distributed when a coordinator is given
    for name in ("max_model_len", "page_size", "kv_cache_bytes"):
        v = getattr(args, name, None)
        if v is not None:
            kw[name] = v
    return kw


def _make_llm(args, **extra):
    from jaxserve.llm import LLM

    return LLM(args.model, random_weights=args.random_weights, **_engine_kwargs(args), **extra)


def cmd_generate(args) -> int:
    from jaxserve.sampling_params import SamplingParams

    sp = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                        max_tokens=args.max_tokens, seed=args.seed, stop=args.stop or None)
    # Small step ladder: a one-prompt command should start fast.
    llm = _make_llm(args, max_num_seqs=args.max_num_seqs or 1, max_prefill_seqs=1)
    prompt = args.prompt
    if args.chat:
        prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    if args.json:
        t0 = time.monotonic()
        out = llm.generate([prompt], sp, use_tqdm=False)[0]
        c = out.outputs[0]
        print(json.dumps({
            "model": args.model,
            "prompt": args.prompt,
            "prompt_token_ids": out.prompt_token_ids,
            "output_token_ids": c.token_ids,
            "text": c.text,
            "finish_reason": c.finish_reason,
            "startup_seconds": round(llm.startup_seconds, 3),
            "generate_seconds": round(time.monotonic() - t0, 3),
        }))
        return 0
    print(args.prompt, end="", flush=True)
    for delta in llm.stream(prompt, sp):
        print(delta, end="", flush=True)
    print()
    return 0


def cmd_chat(args) -> int:
    from jaxserve.sampling_params import SamplingParams

    llm = _make_llm(args, max_num_seqs=1, max_prefill_seqs=1)
    sp = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed)
    history = []
    print("jaxserve chat — empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            break
        if not line.strip():
            break
        history.append({"role": "user", "content": line})
        prompt = llm.tokenizer.apply_chat_template(history)
        print("model> ", end="", flush=True)
        reply = ""
        for delta in llm.stream(prompt, sp):
            reply += delta
            print(delta, end="", flush=True)
        print()
        history.append({"role": "assistant", "content": reply.strip()})
    return 0


def cmd_convert(args) -> int:
    from jaxserve.weights.checkpoint import save_converted
    from jaxserve.weights.resolve import resolve_model

    t0 = time.monotonic()
    r = resolve_model(args.src, random_weights=args.random_weights)
    params = r.params() if callable(r.params) else r.params
    method = None
    if getattr(args, "quant", None):  # docs/quantization.md: the quantized weights are saved, never redone on load
        from jaxserve.config import EngineConfig
        from jaxserve.weights.calibrate import quantize_for_engine

        ecfg = EngineConfig(quantization=args.quant, quant_group_size=args.group_size,
                            quantize_embed=args.quantize_embed)
        ecfg.validate(r.config)
        params = quantize_for_engine(params, r.config, ecfg, r.tokenizer)
        method = "gptq" if args.quant == "gptq" else "rtn"
    tok_json = r.tokenizer.to_json() if r.tokenizer is not None and hasattr(r.tokenizer, "to_json") else None
    save_converted(args.out, r.config, params, tok_json, quant_method=method)
    print(f"converted {args.src} -> {args.out} in {time.monotonic() - t0:.1f} s")
    return 0


def _add_serving_engine_args(p: argparse.ArgumentParser) -> None:
    """Engine knobs for `serve` and `batch` (long-running: the whole ladder is worth compiling)."""
    _add_engine_args(p)
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="tokens per prefill step")
    p.add_argument("--max-prefill-seqs", type=int, default=None, help="sequences per prefill step")
    p.add_argument("--min-prefill-tokens", type=int, default=None, help="smallest prefill bucket (tokens)")
    p.add_argument("--num-pages", type=int, default=None, help="KV pages (overrides --kv-cache-bytes)")
    p.add_argument("--attn-block-pages", type=int, default=None, help="KV pages per attention block")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    p.add_argument("--seed", type=int, default=None, help="engine seed (random weights, unseeded requests)")
    p.add_argument("--batch-invariant", action="store_true",
                   help="bit-identical outputs whatever shares a step (slower batch-1 decode on CPU)")
    p.add_argument("--no-prefix-caching", action="store_true", help="turn the prefix cache off")
    p.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="any other EngineConfig field (value parsed as JSON when it can be); repeatable")


def _serving_engine_kwargs(args) -> dict:
    kw = _engine_kwargs(args)
    for name in ("max_num_seqs", "max_num_batched_tokens", "max_prefill_seqs", "min_prefill_tokens", "num_pages",
                 "attn_block_pages", "dtype", "seed"):
        v = getattr(args, name, None)
        if v is not None:
            kw[name] = v
    if args.batch_invariant:
        kw["batch_invariant"] = True
    if args.no_prefix_caching:
        kw["enable_prefix_caching"] = False
    for item in args.engine_arg:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"jaxserve: error: --engine-arg wants KEY=VALUE, got {item!r}")
        try:
            kw[key.strip().replace("-", "_")] = json.loads(value)
        except ValueError:
            kw[key.strip().replace("-", "_")] = value
    return kw


def cmd_serve(args) -> int:
    from jaxserve.llm import LLM
    from jaxserve.server.app import run_server
    from jaxserve.server.protocol import Limits

    api_key = args.api_key or os.environ.get("JAXSERVE_API_KEY") or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print(f"jaxserve: warning: serving on {args.host} without an API key (--api-key or JAXSERVE_API_KEY)",
              file=sys.stderr)
    llm = LLM(args.model, random_weights=args.random_weights, **_serving_engine_kwargs(args))
    import jax

    channel = None
    if jax.process_count() > 1:  # multi-host: process 0 serves, the others run its steps (parallel/spmd.py)
        from jaxserve.parallel.spmd import StepChannel

        channel = StepChannel(llm.engine)
        if channel.process_id != 0:
            print(f"jaxserve: process {channel.process_id} of {channel.num_processes} ready; following process 0's "
                  f"steps", file=sys.stderr, flush=True)
            rc = channel.follow()
            # Exit now: at interpreter exit jax.distributed's shutdown aborts (SIGABRT) once process 0, which hosts
            # the coordination service, is gone, and it goes as soon as it has told the followers to stop.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc)
        channel.lead()
    names = args.served_model_name or list(dict.fromkeys([args.model, llm.model_config.name]))
    limits = Limits(max_body_bytes=args.max_body_bytes, max_prompt_tokens=args.max_prompt_tokens,
                    max_tokens=args.max_tokens_limit)
    print(f"jaxserve: {names[0]} ready in {llm.startup_seconds:.1f} s; serving on http://{args.host}:{args.port}"
          f"{' (API key required)' if api_key else ''}", file=sys.stderr, flush=True)
    run_server(llm, args.host, args.port, drain_timeout=args.drain_timeout, log_level=args.log_level,
               served_model_names=names, api_key=api_key, limits=limits, default_priority=args.default_priority,
               max_pending=args.max_pending, health_check=channel.health if channel is not None else None,
               on_shutdown=channel.close if channel is not None else None)  # followers exit with process 0
    return 0


def cmd_batch(args) -> int:
    from jaxserve.batch import run_from_args
    from jaxserve.llm import LLM

    if not os.path.exists(args.input):
        print(f"jaxserve: error: input file {args.input} does not exist", file=sys.stderr)
        return 2
    llm = LLM(args.model, random_weights=args.random_weights, **_serving_engine_kwargs(args))
    return run_from_args(args, llm)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="jaxserve", description="LLM inference on JAX/XLA")
    sub = parser.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="generate a continuation of one prompt")
    _add_engine_args(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--json", action="store_true", help="print one JSON object with token ids and text")
    g.set_defaults(fn=cmd_generate)

    c = sub.add_parser("chat", help="interactive chat")
    _add_engine_args(c)
    c.add_argument("--max-tokens", type=int, default=256)
    c.add_argument("--temperature", type=float, default=0.7)
    c.add_argument("--top-p", type=float, default=0.95)
    c.add_argument("--seed", type=int, default=None)
    c.set_defaults(fn=cmd_chat)

    cv = sub.add_parser("convert", help="convert GGUF/safetensors to an orbax checkpoint")
    cv.add_argument("src")
    cv.add_argument("--out", required=True)
    cv.add_argument("--random-weights", action="store_true")
    cv.add_argument("--quant", default=None, choices=["int8", "int4", "gptq"],
                    help="save weight-only quantized linear layers (int4 / gptq: --group-size rows per scale)")
    cv.add_argument("--group-size", type=int, default=64, help="int4 / gptq group size (default 64)")
    cv.add_argument("--quantize-embed", action="store_true", help="also quantize the embedding / LM head")
    cv.set_defaults(fn=cmd_convert)

    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    _add_serving_engine_args(sv)
    sv.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or set JAXSERVE_API_KEY)")
    sv.add_argument("--served-model-name", action="append", default=None,
                    help="model name(s) clients use (default: --model and the model's own name)")
    sv.add_argument("--max-body-bytes", type=int, default=2 * 1024 * 1024, help="largest request body (413 above)")
    sv.add_argument("--max-prompt-tokens", type=int, default=None, help="longest prompt (default: context - 1)")
    sv.add_argument("--max-tokens-limit", type=int, default=None, help="largest max_tokens (default: context)")
    sv.add_argument("--max-pending", type=int, default=1024, help="generation requests in flight (429 above)")
    sv.add_argument("--default-priority", default="interactive", choices=["interactive", "batch"],
                    help="priority of requests without a 'priority' field or X-Priority header")
    sv.add_argument("--drain-timeout", type=float, default=60.0,
                    help="on SIGTERM, seconds to let in-flight requests finish before aborting them")
    sv.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    sv.set_defaults(fn=cmd_serve, recoverable=True)  # multi-host: a dead process fails the server, not a hang

    from jaxserve import batch as batch_mod

    b = sub.add_parser("batch", help="offline batch job over an OpenAI batch-format JSONL file (resumable)")
    _add_serving_engine_args(b)
    batch_mod.add_arguments(b)
    b.set_defaults(fn=cmd_batch)

    from jaxserve import planner

    pl = sub.add_parser("plan", help="capacity planner: KV bytes per token, max batch on a device")
    planner.add_plan_arguments(pl)
    pl.set_defaults(fn=planner.run_plan)

    args = parser.parse_args(argv)
    from jaxserve.errors import JaxserveError

    try:
        return args.fn(args)
    except JaxserveError as e:
        print(f"jaxserve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
