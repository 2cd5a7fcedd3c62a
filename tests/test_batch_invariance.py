"""A request's greedy output must not depend on what else shares its batch or bucket.

XLA:CPU picks a GEMM algorithm by row count (1 row, 2..32 rows, more, with thresholds that differ between CPUs),
with slightly different per-row sums, so with `batch_invariant=True` the engine runs every matmul on fixed row
tiles and attention on fixed query tiles (jaxserve/models/transformer.py), the tiling measured exact on the
machine at start-up (jaxserve/models/invariance.py). These tests run 64 mixed requests under continuous batching, static
batching, a KV budget small enough to force preemption, and prefix caching on and off, and require identical
tokens.
"""

import numpy as np
import pytest

from jaxserve import SamplingParams

KW = dict(page_size=4, max_model_len=256, max_num_seqs=16, max_num_batched_tokens=64, max_prefill_seqs=4,
          attn_block_pages=4, batch_invariant=True)


def _workload(vocab, n=64, seed=0):
    r = np.random.default_rng(seed)
    shared = [int(t) for t in r.integers(3, vocab, 24)]  # a shared "system prompt" for prefix caching
    prompts, sps = [], []
    for i in range(n):
        plen = int(np.clip(r.lognormal(3.0, 0.8), 1, 150))
        body = [int(t) for t in r.integers(3, vocab, plen)]
        prompts.append(shared + body if i % 3 == 0 else body)
        sps.append(SamplingParams(temperature=0, max_tokens=int(np.clip(r.lognormal(2.3, 0.7), 1, 60)),
                                  ignore_eos=True, logprobs=1))
    return prompts, sps


def _tokens(llm, prompts, sps):
    """Token ids and their float32 logprobs: random tiny models have wide logit margins, so tokens alone
    would rarely reveal a rounding difference; the logprobs must be bit-identical too."""
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in llm.generate(prompts, sps, use_tqdm=False)]


@pytest.fixture(scope="module")
def workload():
    return _workload(512)


def test_row_tiles_measured_exact_here(llm_factory):
    """The premise, on this machine: the tiling the runner chose (models/invariance.py) is bit-exact for the
    model's dense weights at every row count its steps use and for attention decode vs chunk, and so is the
    strict tiling it falls back to."""
    from jaxserve.models import invariance
    from jaxserve.models.transformer import STRICT_TILES, RowTiles

    llm = llm_factory("tiny-gemma3", num_pages=1024, **KW)
    runner = llm.engine.runner
    tiles = runner.invariance
    assert isinstance(tiles, RowTiles)
    cfg, ec = runner.model_cfg, runner.cfg
    rows = [1, 2, 3, 4, 8, 16]
    for t in (tiles, STRICT_TILES):
        assert invariance.dense_violations(runner.params, t, rows) == []
        assert invariance.attention_violations(cfg, t, ec.page_size, ec.attn_block_pages) == []


def test_row_tiles_pad_decode_queries_or_refuse_when_nothing_is_exact(llm_factory, monkeypatch):
    from jaxserve.errors import InvalidConfigError
    from jaxserve.models import invariance
    from jaxserve.models.transformer import STRICT_TILES

    runner = llm_factory("tiny-gemma3", num_pages=1024, **KW).engine.runner
    args = (runner.model_cfg, runner.params, runner.cfg.page_size, runner.cfg.attn_block_pages, [1, 2, 4])
    # attention differs between decode and chunk shapes: decode queries are padded, which is exact here
    monkeypatch.setattr(invariance, "_CACHE", {})
    monkeypatch.setattr(invariance, "attention_violations",
                        lambda cfg, t, *a: [] if t.pad_decode_queries else ["attention"])
    assert invariance.choose_row_tiles(*args) == STRICT_TILES
    # padding does not help either, or a dense layer differs: refused, saying what differed
    for attn, dense in ((["attention"], []), ([], ["wq: 4 rows vs 32"])):
        monkeypatch.setattr(invariance, "_CACHE", {})
        monkeypatch.setattr(invariance, "attention_violations", lambda *a, v=attn: v)
        monkeypatch.setattr(invariance, "dense_violations", lambda *a, v=dense: v)
        with pytest.raises(InvalidConfigError, match="cannot be honoured on this machine.*" + (attn + dense)[0]):
            invariance.choose_row_tiles(*args)


def test_strict_tiles_keep_outputs_identical_under_preemption(llm_factory, workload, monkeypatch):
    """The strict tiling (decode queries padded: what a machine whose attention dots fail the default check
    runs) gives the same tokens and logprobs with and without preemption, and alone."""
    from jaxserve import LLM
    from jaxserve.models import invariance
    from jaxserve.models.transformer import STRICT_TILES

    prompts, sps = workload
    prompts, sps = prompts[:24], sps[:24]
    monkeypatch.setattr(invariance, "choose_row_tiles", lambda *a, **k: STRICT_TILES)
    kw = dict(KW, max_num_seqs=8)
    roomy = LLM("tiny-gemma3", random_weights=True, num_pages=1024, **kw)
    # (80 pages of 2 of tiny-gemma3's 4 layers: its sliding-window page groups, config.KVLayout)
    tight = LLM("tiny-gemma3", random_weights=True, num_pages=80, enable_prefix_caching=False, **kw)
    assert roomy.engine.runner.invariance == STRICT_TILES
    ref = _tokens(roomy, prompts, sps)
    got = _tokens(tight, prompts, sps)
    assert tight.engine.scheduler.num_preemptions > 0
    diff = [i for i, (a, b) in enumerate(zip(ref, got)) if a != b]
    assert not diff, f"strict tiles, preemption: requests {diff[:8]} differ"
    assert [_tokens(roomy, [p], [sp])[0] for p, sp in zip(prompts[:4], sps[:4])] == ref[:4]


@pytest.mark.parametrize("model", ["tiny-gemma3", "tiny-llama"])
def test_outputs_identical_across_batching_modes(llm_factory, model, workload):
    prompts, sps = workload
    base = llm_factory(model, num_pages=1024, **KW)
    ref = _tokens(base, prompts, sps)
    assert [len(t) for t, _ in ref] == [sp.max_tokens for sp in sps]

    variants = {
        "static": llm_factory(model, num_pages=1024, scheduler="static", **KW),
        "no-prefix-cache": llm_factory(model, num_pages=1024, enable_prefix_caching=False, **KW),
        "preemption": llm_factory(model, num_pages=80, **KW),  # 79 pages x 4 tokens: forces preemption
    }
    for name, llm in variants.items():
        got = _tokens(llm, prompts, sps)
        diff = [i for i, (a, b) in enumerate(zip(ref, got)) if a != b]
        assert not diff, f"{name}: requests {diff[:8]} differ"
    assert variants["preemption"].engine.scheduler.num_preemptions > 0
    assert base.engine.bm.stats()["prefix_hit_tokens"] > 0
    # Submitting one at a time (every step a batch of one) must also agree.
    solo = [_tokens(base, [p], [sp])[0] for p, sp in list(zip(prompts, sps))[:6]]
    assert solo == ref[:6]

