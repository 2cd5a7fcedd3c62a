"""`LLM`: the offline Python API, in vLLM's shape.

    from jaxserve import LLM, SamplingParams
    llm = LLM()                                   # the embedded Gemma 3 270M
    outs = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=16))
    print(outs[0].outputs[0].text)
"""

from __future__ import annotations

import time
from typing import Iterator, Optional, Sequence, Union

from jaxserve.config import EngineConfig
from jaxserve.errors import InvalidPromptError, InvalidSamplingParamsError
from jaxserve.sampling_params import SamplingParams

PromptType = Union[str, Sequence[int]]

DEFAULT_MODEL = "gemma3-270m"


class LLM:
    """Load a model, compile its step programs, and generate.

    Args:
        model: a preset/embedded name (default `gemma3-270m`), a `.gguf` file, a HF safetensors directory,
            or a directory written by `jaxserve convert`.
        speculative: None (off), or `{"method": "ngram" | "self" | "draft", "num_tokens": k, ...}`:
            speculative decoding with exact verification (docs/speculative.md).
        random_weights: use random weights for a preset (tests, planning, sharding experiments): True draws
            them with numpy on the host, "device" with `jax.random` on the device (bfloat16 on TPU/GPU; for
            large presets, whose float32 host copy would be tens of GB; values differ from True's).
        mesh: None (one device), or `{"data": d, "stage": p, "model": t}` / `"data=1,stage=2,model=4"`:
            tensor, pipeline and data parallelism over `jax.devices()` (docs/parallel.md).
        Every other keyword is an `EngineConfig` field (page_size, max_model_len, max_num_seqs,
        kv_cache_bytes, num_pages, scheduler, enable_prefix_caching, attention_impl, dtype, seed, ...).
    """

    def __init__(self, model: str = DEFAULT_MODEL, *, random_weights: Union[bool, str] = False, tokenizer=None,
                 mesh=None, speculative: Optional[dict] = None, **engine_kwargs):
        from jaxserve.engine.runner import enable_persistent_cache
        from jaxserve.parallel.engine import build_engine, compile_engine

        t0 = time.monotonic()
        enable_persistent_cache()
        unknown = set(engine_kwargs) - set(EngineConfig.__dataclass_fields__)
        if unknown:
            raise TypeError(f"unknown LLM/EngineConfig argument(s): {sorted(unknown)}")
        self.engine_config = EngineConfig(**engine_kwargs)
        if speculative is not None:  # a bad dict fails here, before any loading (docs/speculative.md)
            from jaxserve.errors import InvalidConfigError
            from jaxserve.speculative import SpeculativeConfig

            speculative = SpeculativeConfig.parse(speculative)
            if mesh is not None and speculative.method != "ngram":
                raise InvalidConfigError(f"on a mesh, speculative decoding supports method 'ngram' only; got "
                                         f"{speculative.method!r} (its draft model runs on one device)")
        # One device, or tensor / pipeline / data parallel over jax.devices() (jaxserve/parallel/); on TPU/GPU
        # bfloat16 and a batch sized from the device's memory, unless given (planner.engine_defaults).
        self.engine, self.model_config, self.tokenizer, _ = build_engine(
            model, self.engine_config, mesh, random_weights=random_weights, tokenizer=tokenizer,
            speculative=speculative, given=set(engine_kwargs))
        self.engine_config = self.engine.cfg
        t_load = time.monotonic()
        self.compile_seconds = compile_engine(self.engine)
        self.load_seconds = t_load - t0
        self.startup_seconds = time.monotonic() - t0

    # ------------------------------------------------------------------ generate
    def generate(self, prompts: Union[PromptType, Sequence[PromptType]],
                 sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None, *,
                 use_tqdm: Optional[bool] = None, priority: str = "batch") -> list:
        """Generate for every prompt; returns RequestOutputs in prompt order.

        Every prompt and parameter is validated before anything is queued, so a bad one raises a
        `jaxserve` error and leaves the engine's other work untouched.
        """
        prompts = self._normalize_prompts(prompts)
        if isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != len(prompts):
                raise InvalidSamplingParamsError(
                    f"got {len(sampling_params)} SamplingParams for {len(prompts)} prompts")
            params = list(sampling_params)
        else:
            params = [sampling_params or SamplingParams()] * len(prompts)
        for p in params:
            p.validate(self.engine_config.max_logprobs)
        for p in prompts:  # tokenizes twice for string prompts; cheap next to generation, and atomic
            ids = self.engine.tokenize_prompt(p)
            if len(ids) >= self.engine.max_model_len:
                raise InvalidPromptError(
                    f"prompt has {len(ids)} tokens but the context is {self.engine.max_model_len} tokens")
        ids = []
        try:
            for p, sp in zip(prompts, params):
                ids.append(self.engine.add_request(p, sp, priority=priority))
        except Exception:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        return self._run(ids, use_tqdm if use_tqdm is not None else len(ids) >= 8)

    def _run(self, ids: list, use_tqdm: bool) -> list:
        wanted = set(ids)
        done: dict = {}
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(ids), desc="generate", unit="req", dynamic_ncols=True)
        gen0, t0 = self.engine.stats.generation_tokens, time.monotonic()
        while len(done) < len(wanted) and self.engine.has_unfinished_requests():
            for ro in self.engine.step():
                if ro.finished and ro.request_id in wanted:
                    done[ro.request_id] = ro
                    if bar is not None:
                        bar.update(1)
                        dt = time.monotonic() - t0
                        bar.set_postfix(tok_s=f"{(self.engine.stats.generation_tokens - gen0) / max(dt, 1e-9):.1f}")
        if bar is not None:
            bar.close()
        return [done[i] for i in ids]

    def _normalize_prompts(self, prompts) -> list:
        if isinstance(prompts, str):
            return [prompts]
        prompts = list(prompts)
        if not prompts:
            raise InvalidPromptError("no prompts given")
        if all(isinstance(t, int) for t in prompts):
            return [prompts]  # one token-id prompt
        return prompts

    # ------------------------------------------------------------------ chat
    def chat(self, messages, sampling_params: Optional[SamplingParams] = None, **kw) -> list:
        """`messages`: one conversation (list of {"role", "content"}) or a list of conversations."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=True) for c in convs]
        return self.generate(prompts, sampling_params, **kw)

    # ------------------------------------------------------------------ streaming
    def stream(self, prompt: PromptType, sampling_params: Optional[SamplingParams] = None,
               priority: str = "interactive") -> Iterator[str]:
        """Yield text deltas of one request as they are generated (other queued work keeps running)."""
        rid = self.engine.add_request(prompt, sampling_params, priority=priority)
        sent = 0
        try:
            while True:
                outs = self.engine.step()
                for ro in outs:
                    if ro.request_id != rid:
                        continue
                    text = ro.outputs[0].text
                    if len(text) > sent:
                        yield text[sent:]
                        sent = len(text)
                    if ro.finished:
                        return
                if not self.engine.has_unfinished_requests():
                    return
        finally:
            self.engine.abort_request(rid)

    def get_metrics(self) -> dict:
        return self.engine.metrics()
