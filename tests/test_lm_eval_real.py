"""lm-evaluation-harness (`lm-eval`, `local-completions`) against a real jaxserve server on Gemma 3 270M: a
log-likelihood task from a local JSONL file made of shipped text (pydoc_data.topics) runs through the server's
echo + logprobs (prompt logprobs) and /tokenizer_info + /tokenize (lm-eval's remote tokenizer: nothing fetched
from a hub), and each document's log-likelihood equals the sum of `LLM.generate`'s prompt logprobs over the
continuation's tokens (half the continuations are one token, so those compare token for token). The prompt
logprobs themselves are checked against HF transformers in the prompt-logprobs tests."""

from __future__ import annotations

import json
import re

import pytest

from jaxserve import SamplingParams
from tests.conftest import serve_in_thread

pytestmark = pytest.mark.slow
lm_eval = pytest.importorskip("lm_eval")
uvicorn = pytest.importorskip("uvicorn")

N_DOCS = 16
TOL = 1e-3  # nats: the same engine both ways; the server's JSON round trip and batching are the only differences


def _docs(tok):
    """(context, continuation) pairs from CPython's shipped docs; even ones end in a one-token word."""
    from pydoc_data.topics import topics

    docs = []
    for name in sorted(topics):
        words = re.sub(r"\s+", " ", topics[name]).strip().split(" ")
        if len(words) < 60:
            continue
        context = " ".join(words[:30])
        if len(docs) % 2 == 0:
            nxt = next((w for w in words[30:50] if len(tok.encode(" " + w, add_bos=False)) == 1), None)
            if nxt is None:
                continue
            cont = " " + nxt
        else:
            cont = " " + " ".join(words[30:36])
        docs.append({"context": context, "continuation": cont})
        if len(docs) == N_DOCS:
            break
    return docs


TASK = """task: jaxserve_pydoc_loglikelihood
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{continuation}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def test_lm_eval_loglikelihood_equals_prompt_logprobs(gemma, tmp_path, monkeypatch):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager


    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    tok = gemma.tokenizer
    docs = _docs(tok)
    assert len(docs) == N_DOCS
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    (task_dir / "pydoc.yaml").write_text(TASK.format(path=data))

    # The reference first (the server's thread owns the engine once it starts): lm-eval tokenizes context and
    # continuation apart (no BOS) and scores the continuation's tokens.
    pairs = [(tok.encode(d["context"], add_bos=False), tok.encode(d["continuation"], add_bos=False)) for d in docs]
    outs = gemma.generate([c + x for c, x in pairs], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1),
                          use_tqdm=False)
    ref = []
    for (ctx, cont), o in zip(pairs, outs):
        lps = [o.prompt_logprobs[len(ctx) + j][t] for j, t in enumerate(cont)]
        ref.append((sum(lps), lps))

    with serve_in_thread(gemma, "gemma") as url:
        results = simple_evaluate(
            model="local-completions",
            model_args={"model": "gemma", "base_url": f"{url}/v1/completions",
                        "tokenizer_backend": "remote", "num_concurrent": 1, "max_retries": 1},
            tasks=["jaxserve_pydoc_loglikelihood"], task_manager=TaskManager(include_path=str(task_dir)),
            log_samples=True)
    samples = sorted(results["samples"]["jaxserve_pydoc_loglikelihood"], key=lambda s: s["doc_id"])
    assert len(samples) == N_DOCS
    for s in samples:
        (loglik, _greedy), = [r[0] if isinstance(r[0], (list, tuple)) else r for r in s["resps"]]
        want, per_token = ref[s["doc_id"]]
        assert abs(float(loglik) - want) <= TOL * max(1, len(per_token)), (s["doc"], loglik, want, per_token)
    # lm-eval's perplexity is exp(-mean document log-likelihood) (whole continuations, no BOS: large, but finite)
    ppl = results["results"]["jaxserve_pydoc_loglikelihood"]["perplexity,none"]
    assert 1.0 < ppl < float("inf")
