"""The `jaxserve` command line: generate --json, convert (and loading what it wrote)."""

import json

import numpy as np

from jaxserve import LLM, SamplingParams
from jaxserve.cli import main


def test_generate_json(capsys):
    rc = main(["generate", "--model", "tiny-llama", "--random-weights", "--prompt", "hello there",
               "--max-tokens", "5", "--json", "--max-model-len", "128"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["prompt"] == "hello there"
    assert out["prompt_token_ids"][0] == 1  # BOS of tiny-llama
    assert len(out["output_token_ids"]) == 5
    assert isinstance(out["text"], str) and out["finish_reason"] == "length"


def test_generate_reports_bad_input_cleanly(capsys):
    rc = main(["generate", "--model", "no-such-model", "--prompt", "x", "--json"])
    assert rc == 2
    assert "no-such-model" in capsys.readouterr().err


def test_convert_then_load_gives_same_outputs(tmp_path, tiny_llama):
    out_dir = tmp_path / "tiny"
    assert main(["convert", "tiny-llama", "--random-weights", "--out", str(out_dir)]) == 0
    from tests.conftest import TINY_KW

    converted = LLM(str(out_dir), **TINY_KW)
    assert converted.model_config == tiny_llama.model_config
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = [[5, 6, 7, 8, 9], "some text"]
    a = [o.outputs[0].token_ids for o in converted.generate(prompts, sp)]
    b = [o.outputs[0].token_ids for o in tiny_llama.generate(prompts, sp)]
    assert a == b
    import jax

    for x, y in zip(jax.tree.leaves(converted.engine.runner.params), jax.tree.leaves(tiny_llama.engine.runner.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
