"""Capacity planner figures against hand calculations."""

import json

import pytest

from jaxserve.config import EngineConfig, get_preset
from jaxserve.errors import InvalidConfigError
from jaxserve.planner import GiB, default_kv_budget_bytes, kv_pages_for_budget, main, plan


def test_llama2_7b_fp16_on_80gb():
    p = plan(get_preset("llama2-7b"), "a100-80gb", dtype="float16", context=4096)
    # KV per token = 2 (K,V) x 32 KV heads x 128 head_dim x 2 bytes x 32 layers = 524,288 B = 0.5 MiB
    assert p.kv_bytes_per_token == 524_288
    # per 4,096-token sequence: 4096 x 0.5 MiB = 2 GiB
    assert p.kv_bytes_per_sequence == 2 * GiB
    # weights: 6,738,415,616 params x 2 B = 13.48e9 B (= 12.55 GiB)
    n = get_preset("llama2-7b").num_params()
    assert n == 6_738_415_616
    assert p.weight_bytes == n * 2
    # budget: 80 GiB - 10% reserve (8 GiB) - 12.55 GiB = 59.45 GiB -> floor(59.45 / 2) = 29 sequences
    assert p.kv_budget_bytes == pytest.approx(80 * GiB - 8 * GiB - n * 2)
    assert p.max_concurrent_sequences == 29
    assert p.fits


def test_llama2_70b_needs_several_devices():
    m = get_preset("llama2-70b")
    # GQA, 8 KV heads: 2 x 8 x 128 x 2 x 80 = 327,680 B per token
    assert plan(m, "h100", dtype="float16", context=4096).kv_bytes_per_token == 327_680
    one = plan(m, "h100", dtype="float16", context=4096)
    assert not one.fits and "devices" in one.message and one.max_concurrent_sequences == 0
    # 2 devices: 137.96e9 / 2 = 68.98e9 B = 64.24 GiB per device > 72 GiB usable? fits, with
    # 72 - 64.24 = 7.76 GiB for KV; per sequence 327,680 / 2 x 4096 = 0.625 GiB -> 12 sequences.
    two = plan(m, "h100", dtype="float16", context=4096, num_devices=2)
    assert two.fits
    assert two.max_concurrent_sequences == int((72 * GiB - m.num_params()) // (327_680 / 2 * 4096))
    assert two.max_concurrent_sequences == 12
    eight = plan(m, "h100", dtype="float16", context=4096, num_devices=8)
    assert eight.max_concurrent_sequences > 4 * two.max_concurrent_sequences


def test_llama3_8b_and_gemma_kv():
    assert plan(get_preset("llama3-8b"), "tpu-v5e", dtype="bfloat16").kv_bytes_per_token == 2 * 8 * 128 * 2 * 32
    g = get_preset("gemma3-270m")
    assert plan(g, "cpu", dtype="float32").kv_bytes_per_token == 36_864  # 2 x 1 x 256 x 4 x 18
    assert plan(g, "cpu", dtype="bfloat16").kv_bytes_per_token == 18_432
    # int8 KV halves bf16 (plus one f32 scale per token, head and K/V: 2 x 1 x 4 x 18 = 144 B)
    assert plan(g, "cpu", dtype="bfloat16", kv_dtype="int8").kv_bytes_per_token == 9_216 + 144


def test_engine_budget_uses_planner():
    g = get_preset("gemma3-270m")
    ecfg = EngineConfig(page_size=16, max_model_len=1024)
    budget = default_kv_budget_bytes(g, ecfg)
    assert 0 < budget <= 2 * GiB
    pages = kv_pages_for_budget(g, ecfg, budget)
    assert pages - 1 == budget // (36_864 * 16)


def test_cli_json_and_errors(capsys):
    assert main(["--model", "llama2-7b", "--device", "A100-80GB", "--dtype", "float16", "--context", "4096",
                 "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["max_concurrent_sequences"] == 29 and d["kv_bytes_per_token"] == 524_288
    assert main(["--model", "llama2-7b", "--device", "tpu-v9"]) == 2
    assert "known devices" in capsys.readouterr().err
    with pytest.raises(InvalidConfigError):
        plan(get_preset("llama2-7b"), "h100", dtype="float8")
