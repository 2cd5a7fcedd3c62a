"""Tokens sampled with speculation follow the target's distribution (chi-square against exact probabilities).

A tiny random Gemma-3-shaped model with a 16-token vocabulary; the exact distribution of each sampled token comes
from the target engine without speculation (raw logprobs of the whole vocabulary, then temperature / top-k /
top-p applied in numpy). Requests sample 3 tokens with fixed seeds 0..N-1: t1 from the prefill, t2 from a verify
step (accepted draft or the rejection's correction) and t3 (the bonus token after an accepted draft, or the next
step). Proposers: a random-weight draft model of another seed and a proposer that is always wrong (deliberately
bad drafts), and the target's own first layers. N is chosen so that a 2 % shift of mass between the two most
likely tokens of t2 would be detected (noncentrality checked in the test).
"""

import numpy as np
import pytest
from scipy import stats

from jaxserve.config import PRESETS, EngineConfig
from jaxserve.engine.engine import LLMEngine
from jaxserve.sampling_params import SamplingParams
from jaxserve.speculative import speculator_factory
from jaxserve.speculative.proposers import ModelDraftProposer, Proposer
from jaxserve.weights.random_init import random_params

V = 16
CFG = PRESETS["tiny-gemma3"].replace(name="tiny-gemma3-v16", vocab_size=V, bos_token_id=2, eos_token_ids=(1,))
ECFG = dict(page_size=4, max_model_len=64, max_num_seqs=8, max_num_batched_tokens=32, min_prefill_tokens=8,
            max_prefill_seqs=4, num_pages=256, attn_block_pages=4, max_logprobs=V)
PROMPT = [2, 5, 9, 4, 11, 7]
N = 12_000
ALPHA = 1e-3  # per-test false-alarm rate (the seeds are fixed, so the outcome is deterministic)

_ENGINES: dict = {}


def target_params():
    """Random weights with the logits scaled down (final norm x 0.1): at full scale a random 16-token model puts
    ~all mass on one token; scaled, the most likely token has 0.4-0.7 and every token keeps some mass."""
    p = random_params(CFG, 0)
    p["final_norm"] = p["final_norm"] * 0.1
    return p


def engine(spec=None) -> LLMEngine:
    key = repr(spec)
    if key not in _ENGINES:
        e = LLMEngine(CFG, EngineConfig(**ECFG), target_params(), tokenizer=None,
                      speculator=speculator_factory(spec))
        e.runner.compile_all()
        if e.speculator is not None:
            e.speculator.compile_all()
        _ENGINES[key] = e
    return _ENGINES[key]


def run(eng: LLMEngine, prompts, params) -> list:
    rids = [eng.add_request(p, sp) for p, sp in zip(prompts, params)]
    done = {}
    while eng.has_unfinished_requests():
        for ro in eng.step():
            if ro.finished:
                done[ro.request_id] = ro.outputs[0]
    return [done[r] for r in rids]


def filtered(logp: np.ndarray, T: float, top_k: int, top_p: float) -> np.ndarray:
    """The sampler's distribution (jaxserve/engine/sampler.py semantics) from raw logprobs over the vocab."""
    s = logp / T
    if 0 < top_k < V:
        s = np.where(s >= np.sort(s)[::-1][top_k - 1], s, -np.inf)
    e = np.exp(s - s.max())
    if top_p < 1:
        above = np.array([e[e > x].sum() for x in e])  # mass of strictly more likely tokens
        e = np.where(above < top_p * e.sum(), e, 0.0)
    return e / e.sum()


def exact(T, top_k, top_p):
    """p(t1), p(t2 | t1) [V, V], p(t3 | t1, t2) [V, V, V] from the engine without speculation."""
    base = engine()
    full = SamplingParams(temperature=0, max_tokens=1, logprobs=V)

    def dist(prompts):
        outs = run(base, prompts, [full] * len(prompts))
        rows = []
        for o in outs:
            lp = np.full(V, -np.inf)
            for t, l in o.logprobs[0].items():
                lp[t] = l
            rows.append(filtered(lp, T, top_k, top_p))
        return np.array(rows)

    p1 = dist([PROMPT])[0]
    p2 = dist([PROMPT + [a] for a in range(V)])
    p3 = dist([PROMPT + [a, b] for a in range(V) for b in range(V)]).reshape(V, V, V)
    return p1, p2, p3


def chi2_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    """Goodness of fit; cells with expected count < 5 are pooled into one."""
    counts, probs = counts.ravel().astype(float), probs.ravel()
    exp = probs * counts.sum()
    assert counts[probs == 0].sum() == 0, "a token with zero target probability was sampled"
    big = exp >= 5
    obs = np.append(counts[big], counts[~big].sum())
    ex = np.append(exp[big], exp[~big].sum())
    if ex[-1] == 0:
        obs, ex = obs[:-1], ex[:-1]
    return float(stats.chisquare(obs, ex).pvalue)


class _AlwaysWrong(Proposer):
    """Deliberately bad: proposes the target's least likely tokens (by a fixed table), never what it samples
    most."""

    method = "wrong"

    def propose(self, seqs, max_lens, block_tables):
        return [[(s.all_token_ids[-1] + 3 * (j + 1)) % V for j in range(m)] for s, m in zip(seqs, max_lens)]


def _bad_draft_model(e: LLMEngine) -> Proposer:
    return ModelDraftProposer("draft", CFG, random_params(CFG, 123), EngineConfig(**ECFG), e.num_pages, 2)


PROPOSERS = {"bad_draft_model": _bad_draft_model, "always_wrong": lambda e: _AlwaysWrong(), "self": None}
SAMPLING = {"T1": (1.0, 0, 1.0), "T1.5_topk6_topp0.9": (1.5, 6, 0.9)}


@pytest.mark.parametrize("proposer,sampling", [("bad_draft_model", "T1"), ("bad_draft_model", "T1.5_topk6_topp0.9"),
                                               ("always_wrong", "T1"), ("always_wrong", "T1.5_topk6_topp0.9"),
                                               ("self", "T1.5_topk6_topp0.9")])
def test_speculative_samples_follow_the_target_distribution(proposer, sampling):
    T, top_k, top_p = SAMPLING[sampling]
    p1, p2, p3 = exact(T, top_k, top_p)
    e = engine({"method": "self", "num_tokens": 2, "num_layers": 1, "adaptive": False})
    sp = e.speculator
    saved = sp.proposer
    if PROPOSERS[proposer] is not None:
        sp.proposer = PROPOSERS[proposer](e)
        sp.proposer.compile_all()
    d0, a0, v0 = sp.proposed, sp.accepted, sp.verify_steps
    try:
        params = [SamplingParams(temperature=T, top_k=top_k, top_p=top_p, seed=i, max_tokens=3, ignore_eos=True)
                  for i in range(N)]
        outs = run(e, [PROMPT] * N, params)
    finally:
        sp.proposer = saved
    toks = np.array([o.token_ids for o in outs])
    assert toks.shape == (N, 3)
    drafted, accepted = sp.proposed - d0, sp.accepted - a0
    assert sp.verify_steps > v0 and drafted >= N  # t2 of every request came from a verify step
    if proposer == "always_wrong":
        assert accepted / drafted < 0.35
    # exact marginals and joints
    m2 = p1 @ p2  # p(t2)
    j12 = p1[:, None] * p2  # p(t1, t2)
    j123 = j12[:, :, None] * p3
    m3 = j123.sum(axis=(0, 1))
    c1 = np.bincount(toks[:, 0], minlength=V)
    c2 = np.bincount(toks[:, 1], minlength=V)
    c3 = np.bincount(toks[:, 2], minlength=V)
    c12 = np.bincount(toks[:, 0] * V + toks[:, 1], minlength=V * V)
    c23 = np.bincount(toks[:, 1] * V + toks[:, 2], minlength=V * V)
    j23 = j123.sum(axis=0)
    assert m2.max() < 0.95 and (m2 > 0.01).sum() >= 4, m2  # a distribution worth testing
    pv = {"t1": chi2_pvalue(c1, p1), "t2": chi2_pvalue(c2, m2), "t3": chi2_pvalue(c3, m3),
          "t1t2": chi2_pvalue(c12, j12), "t2t3": chi2_pvalue(c23, j23)}
    assert min(pv.values()) > ALPHA, (pv, drafted, accepted)
    # power: a 2 % shift between t2's two most likely tokens gives a noncentrality large enough to be caught
    top = np.argsort(m2)[::-1][:2]
    lam = N * 0.02 ** 2 * (1 / m2[top[0]] + 1 / m2[top[1]])
    df = int((m2 * N >= 5).sum())
    power = stats.ncx2.sf(stats.chi2.isf(ALPHA, df), df, lam)
    assert power > 0.9, (lam, df, power)
