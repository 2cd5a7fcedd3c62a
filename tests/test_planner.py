"""Capacity planner figures against hand calculations (the arithmetic is written out in the comments).

Units: GiB = 2**30 B, GB = 1e9 B. Accelerator memory is in GiB (see the DEVICES note in jaxserve/planner.py):
80 GiB = 85,899,345,920 B; the 10% reserve of it is int(8,589,934,592.0) = 8,589,934,592 B, leaving
77,309,411,328 B (72 GiB) for weights + KV on one 80 GB A100/H100.
"""

import json
import subprocess
import sys

import pytest

from jaxserve.config import EngineConfig, get_preset
from jaxserve.errors import InvalidConfigError
from jaxserve import planner
from jaxserve.planner import (
    CPU_DEFAULT_KV_BUDGET_BYTES, DEVICES, GB, GiB, Device, default_kv_budget_bytes, device_key_from_kind,
    format_plan, get_device, kv_pages_for_budget, kv_sequence_bytes, main, plan, weight_bytes,
)

USABLE_80GIB = 80 * GiB - 8 * GiB  # 85,899,345,920 - 8,589,934,592 = 77,309,411,328 B


# ------------------------------------------------------------------------------------------ parameter counts

@pytest.mark.parametrize("name, published, tol", [
    # Published counts are rounded to 0.01B, so the preset must be within half a unit of the last digit.
    ("llama2-7b", 6.74e9, 0.005e9),  # Llama 2 paper / HF model card: 6.74B (safetensors: 6,738,415,616)
    ("llama3-8b", 8.03e9, 0.005e9),  # HF model card: 8.03B (safetensors: 8,030,261,248)
    ("llama2-70b", 68.98e9, 0.005e9),  # HF model card: 68.98B (safetensors: 68,976,648,192)
    ("gemma3-270m", 268_098_176, 0),  # HF google/gemma-3-270m safetensors: 268,098,176 exactly
    ("llama3.2-1b", 1.24e9, 0.005e9),  # HF model card: 1.24B (tied embeddings)
    ("llama3.2-3b", 3.21e9, 0.005e9),  # HF model card: 3.21B (tied embeddings)
    ("qwen2.5-7b", 7.62e9, 0.005e9),  # HF Qwen/Qwen2.5-7B page: 7.62B (its card's text says 7.61B)
    ("qwen3-8b", 8.19e9, 0.005e9),  # HF Qwen/Qwen3-8B page: 8.19B (its card's text says 8.2B)
    ("gemma2-9b", 9.24e9, 0.005e9),  # HF google/gemma-2-9b: 9.24B
])
def test_num_params_match_published(name, published, tol):
    assert abs(get_preset(name).num_params() - published) <= tol


@pytest.mark.parametrize("name, total, active", [
    # Mixtral-8x7B-v0.1 safetensors: 46,702,792,704 (HF card: 46.7B; Mistral AI: 12.9B active of 46.7B).
    ("mixtral-8x7b", 46_702_792_704, 12.88e9),
    # Qwen3-30B-A3B: HF card "30.5B in total and 3.3B activated" (safetensors: 30,532,122,624).
    ("qwen3-30b-a3b", 30_532_122_624, 3.35e9),
])
def test_moe_total_and_active_params(name, total, active):
    m = get_preset(name)
    assert m.num_params() == total
    assert abs(m.num_params(active=True) - active) <= 0.005e9
    # Mixtral by hand: per layer attention 2 x 4096^2 + 2 x 4096 x 1024, router 4096 x 8, norms 2 x 4096,
    # experts 3 x 4096 x 14,336 each; embed + LM head 2 x 32,000 x 4096; final norm 4096.
    if name == "mixtral-8x7b":
        attn, router, norms, expert = 2 * 4096**2 + 2 * 4096 * 1024, 4096 * 8, 2 * 4096, 3 * 4096 * 14_336
        rest = 2 * 32_000 * 4096 + 4096
        assert m.num_params() == 32 * (attn + router + norms + 8 * expert) + rest
        assert m.num_params(active=True) == 32 * (attn + router + norms + 2 * expert) + rest
    p = plan(m, "h100", dtype="bfloat16", context=4096)
    assert p.num_params == total and p.num_active_params == m.num_params(active=True)
    assert f"{total / 1e9:,.2f}B params, {p.num_active_params / 1e9:,.2f}B active per token" in format_plan(p)
    # Batch-1 decode reads a token's experts only; a dense model's active count is its total.
    assert p.decode_roofline_step_seconds_batch1 < (p.weight_bytes + p.kv_bytes_per_sequence) / p.bandwidth_bytes_per_s
    assert plan(get_preset("llama2-7b"), "h100").num_active_params == get_preset("llama2-7b").num_params()


def test_gemma3_270m_param_count_by_hand():
    # embed (tied): 262,144 x 640                                           = 167,772,160
    # per layer: q 640x1024 + k,v 2x640x256 + o 1024x640 = 655,360 + 327,680 + 655,360 = 1,638,400
    #            MLP 3 x 640 x 2048                                          = 3,932,160
    #            norms 4 x 640 (attn, post-attn, mlp, post-mlp) + 2 x 256 (q, k) = 3,072
    #            -> 5,573,632 per layer x 18                                 = 100,325,376
    # final norm 640 -> 167,772,160 + 100,325,376 + 640                      = 268,098,176
    assert get_preset("gemma3-270m").num_params() == 167_772_160 + 18 * (1_638_400 + 3_932_160 + 3_072) + 640


# ------------------------------------------------------------------------------------------ Llama 2 7B

@pytest.mark.parametrize("device", ["a100-80gb", "h100"])
def test_llama2_7b_fp16_on_80gb(device):
    p = plan(get_preset("llama2-7b"), device, dtype="float16", context=4096)
    # KV per token = 2 (K,V) x 32 KV heads x 128 head_dim x 2 B x 32 layers = 524,288 B = 0.5 MiB
    assert p.kv_bytes_per_token == 2 * 32 * 128 * 2 * 32 == 524_288
    # per 4,096-token sequence: 4,096 x 524,288 = 2,147,483,648 B = 2 GiB
    assert p.kv_bytes_per_sequence == 4096 * 524_288 == 2 * GiB
    # weights: 6,738,415,616 params x 2 B = 13,476,831,232 B ~ 13.5 GB (12.55 GiB)
    assert p.weight_bytes == 6_738_415_616 * 2 == 13_476_831_232
    assert p.weight_bytes / GB == pytest.approx(13.48, abs=0.005)
    # device 80 GiB = 85,899,345,920; reserve 10% = 8,589,934,592; budget = 77,309,411,328 - 13,476,831,232
    assert p.device_bytes == 85_899_345_920 and p.reserve_bytes == 8_589_934_592
    assert p.kv_budget_bytes == USABLE_80GIB - 13_476_831_232 == 63_832_580_096  # 59.45 GiB
    # 63,832,580,096 / 2,147,483,648 = 29.72 -> 29 concurrent 4,096-token sequences
    assert p.max_concurrent_sequences == 63_832_580_096 // 2_147_483_648 == 29
    # (with decimal 80e9 B it would be (72e9 - 13.48e9) / 2.147e9 = 27.25 -> 27: the GiB/GB choice matters)
    # 63,832,580,096 / 524,288 = 121,750.6 -> 121,750 tokens
    assert p.max_tokens_in_cache == 121_750
    assert p.weights_fit and p.fits and p.message == "" and p.min_devices == 1


def test_llama2_7b_decode_roofline():
    p = plan(get_preset("llama2-7b"), "a100-80gb", dtype="float16", context=4096)
    # batch 1: (13,476,831,232 weights + 2,147,483,648 KV) / 2,039e9 B/s = 15,624,314,880 / 2.039e12 = 7.663 ms
    assert p.bandwidth_bytes_per_s == 2039e9
    assert p.decode_roofline_step_seconds_batch1 == pytest.approx(15_624_314_880 / 2039e9)
    assert p.decode_roofline_step_seconds_batch1 == pytest.approx(7.663e-3, rel=1e-3)
    # batch 29: (13,476,831,232 + 29 x 2,147,483,648 = 75,753,857,024) / 2.039e12 = 37.15 ms; 29 / 37.15 ms = 781 tok/s
    assert p.decode_roofline_step_seconds_max_batch == pytest.approx(75_753_857_024 / 2039e9)
    assert p.decode_roofline_tokens_per_second_max_batch == pytest.approx(29 / (75_753_857_024 / 2039e9))
    # H100: same bytes over 3,350 GB/s -> 4.66 ms at batch 1
    h = plan(get_preset("llama2-7b"), "h100", dtype="float16", context=4096)
    assert h.decode_roofline_step_seconds_batch1 == pytest.approx(15_624_314_880 / 3350e9)


def test_llama2_7b_int8_and_int4_weights():
    m = get_preset("llama2-7b")
    # int8: 1 B + one f32 scale per output column over K = hidden 4,096 -> 4/4,096 B per param:
    # 6,738,415,616 x (1 + 4/4096) = 6,738,415,616 + 6,580,484 = 6,744,996,100 B
    assert weight_bytes(m, "int8") == 6_738_415_616 + 6_580_484
    # int4: 0.5 B + one f32 scale per 128 values = 0.53125 B/param: 6,738,415,616 x 17/32 = 3,579,783,296 B
    assert weight_bytes(m, "int4") == 3_579_783_296
    p = plan(m, "a100-80gb", dtype="int4", context=4096)
    assert p.kv_dtype == "int8"  # int4 weights -> int8 KV (the narrowest KV the formula covers)
    assert plan(m, "a100-80gb", dtype="int8", context=4096).kv_dtype == "int8"  # default KV dtype = dtype


def test_int8_kv_halves_bf16_plus_scales():
    m = get_preset("llama2-7b")
    bf16 = plan(m, "h100", dtype="bfloat16", context=4096)
    i8 = plan(m, "h100", dtype="bfloat16", kv_dtype="int8", context=4096)
    # bf16: 524,288 B. int8: 2 x 32 x 128 x 1 B x 32 = 262,144 B (half) + f32 scales per token, KV head and K/V:
    # 2 x 32 x 4 B x 32 = 8,192 B -> 270,336 B per token
    assert i8.kv_bytes_per_token == 524_288 // 2 + 8_192 == 270_336
    assert i8.kv_bytes_per_token / bf16.kv_bytes_per_token == pytest.approx(0.5, abs=0.02)
    # same weights (13,476,831,232 B) -> budget 63,832,580,096 / (4,096 x 270,336 = 1,107,296,256) = 57.6 -> 57
    assert i8.max_concurrent_sequences == 63_832_580_096 // (4096 * 270_336) == 57


# ------------------------------------------------------------------------------------------ Llama 2 70B

def test_llama2_70b_does_not_fit_one_80gb_device():
    m = get_preset("llama2-70b")
    one = plan(m, "h100", dtype="float16", context=4096)
    # GQA, 8 KV heads: 2 x 8 x 128 x 2 B x 80 layers = 327,680 B per token (64 query heads would be 2,621,440)
    assert one.kv_bytes_per_token == 2 * 8 * 128 * 2 * 80 == 327_680
    # weights 68,976,648,192 x 2 = 137,953,296,384 B (128.48 GiB) > 77,309,411,328 usable
    assert one.weight_bytes == 137_953_296_384
    assert not one.weights_fit and not one.fits
    assert one.kv_budget_bytes == 0 and one.max_concurrent_sequences == 0 and one.max_tokens_in_cache == 0
    assert one.decode_roofline_step_seconds_max_batch is None
    # devices needed: ceil(137,953,296,384 / 77,309,411,328) = ceil(1.78) = 2
    assert one.min_devices_for_weights == 2 and one.min_devices == 2
    assert "do not fit" in one.message and "--num-devices 2" in one.message
    assert "12 concurrent" in one.message  # what 2 devices give (next test)
    assert "do not fit" in format_plan(one)


@pytest.mark.parametrize("n, weights_per_dev, kv_tok_per_dev, expected", [
    # weights/dev = 137,953,296,384 / n; KV heads/dev = 8 / n -> KV/token/dev = 327,680 / n
    # n=2: budget 77,309,411,328 - 68,976,648,192 = 8,332,763,136;  seq 163,840 x 4,096 = 671,088,640 -> 12.4 -> 12
    (2, 68_976_648_192, 163_840, 12),
    # n=4: budget 77,309,411,328 - 34,488,324,096 = 42,821,087,232; seq 81,920 x 4,096 = 335,544,320 -> 127.6 -> 127
    (4, 34_488_324_096, 81_920, 127),
    # n=8: budget 77,309,411,328 - 17,244,162,048 = 60,065,249,280; seq 40,960 x 4,096 = 167,772,160 -> 358.01 -> 358
    (8, 17_244_162_048, 40_960, 358),
])
def test_llama2_70b_tensor_parallel(n, weights_per_dev, kv_tok_per_dev, expected):
    p = plan(get_preset("llama2-70b"), "h100", dtype="float16", context=4096, num_devices=n)
    assert p.weight_bytes_per_device == weights_per_dev
    assert p.kv_bytes_per_token_per_device == kv_tok_per_dev
    assert p.kv_budget_bytes == USABLE_80GIB - weights_per_dev
    assert p.max_concurrent_sequences == (USABLE_80GIB - weights_per_dev) // (kv_tok_per_dev * 4096) == expected
    assert p.fits and p.message == ""


def test_kv_heads_replicate_beyond_kv_head_count():
    # Gemma 3 270M has 1 KV head: every device of a tensor-parallel group keeps the whole 36,864 B per token
    p = plan(get_preset("gemma3-270m"), "tpu-v5e", dtype="float32", num_devices=4)
    assert p.kv_bytes_per_token_per_device == p.kv_bytes_per_token == 36_864
    assert "replicated" in p.message


# ------------------------------------------------------------------------------------------ Llama 3 8B, Gemma 3

def test_llama3_8b():
    m = get_preset("llama3-8b")
    # 2 x 8 KV heads x 128 x 2 B x 32 layers = 131,072 B per token (bf16), x 8,192 context = 1 GiB per sequence
    p = plan(m, "h100", dtype="bfloat16")
    assert p.kv_bytes_per_token == 2 * 8 * 128 * 2 * 32 == 131_072
    assert p.context == 8192 and p.kv_bytes_per_sequence == GiB
    # weights 8,030,261,248 x 2 = 16,060,522,496; budget 77,309,411,328 - 16,060,522,496 = 61,248,888,832
    # / 1,073,741,824 = 57.04 -> 57
    assert p.max_concurrent_sequences == 57
    # TPU v5e: 16 GiB = 17,179,869,184; reserve int(1,717,986,918.4) = 1,717,986,918 -> 15,461,882,266 usable
    # < 16,060,522,496 of bf16 weights: does not fit, needs 2 chips
    v5e = plan(m, "tpu-v5e", dtype="bfloat16")
    assert not v5e.weights_fit and v5e.min_devices_for_weights == 2
    # int8 weights + int8 KV: weights 8,030,261,248 x (1 + 4/4096) = 8,038,103,300;
    # KV (2 x 8 x 128 x 1 + 2 x 8 x 4 scales) x 32 = 67,584 B/token x 8,192 = 553,648,128 per sequence;
    # (15,461,882,266 - 8,038,103,300 = 7,423,778,966) / 553,648,128 = 13.4 -> 13
    q = plan(m, "tpu-v5e", dtype="int8")
    assert q.weight_bytes == 8_038_103_300 and q.kv_bytes_per_token == 67_584
    assert q.kv_budget_bytes == 7_423_778_966 and q.max_concurrent_sequences == 13


def test_gemma3_270m_kv():
    g = get_preset("gemma3-270m")
    # 2 x 1 KV head x 256 head_dim x 4 B x 18 layers = 36,864 B per token in float32; 18,432 in bf16
    assert plan(g, "cpu", dtype="float32").kv_bytes_per_token == 2 * 1 * 256 * 4 * 18 == 36_864
    assert plan(g, "cpu", dtype="bfloat16").kv_bytes_per_token == 2 * 1 * 256 * 2 * 18 == 18_432
    # int8: 9,216 (half of bf16) + f32 scales 2 x 1 x 4 B x 18 = 144 -> 9,360
    assert plan(g, "cpu", dtype="bfloat16", kv_dtype="int8").kv_bytes_per_token == 9_216 + 144


def test_weights_fit_but_no_sequence():
    # Llama 3.1 8B int8 on one v5e at 131,072 tokens: weights 8,038,103,300 leave 7,423,778,966 B,
    # but one bf16 sequence is 131,072 x 131,072 = 17,179,869,184 B (16 GiB)
    p = plan(get_preset("llama3.1-8b"), "tpu-v5e", dtype="int8", kv_dtype="bfloat16")
    assert p.weights_fit and not p.fits and p.max_concurrent_sequences == 0
    assert p.kv_bytes_per_sequence == 16 * GiB
    # 2 chips: 4,019,051,650 weights + 8 GiB KV = 12.6e9 <= 15,461,882,266
    assert p.min_devices == 2 and "Shorten --context" in p.message


def test_weight_bytes_override_and_bandwidth():
    m = get_preset("llama2-7b")
    p = plan(m, "a100-80gb", dtype="float16", context=4096, weight_bytes_override=20 * GiB)
    # (72 - 20) GiB / 2 GiB = 26
    assert p.weight_bytes == 20 * GiB and p.max_concurrent_sequences == 26
    c = plan(m, "cpu", dtype="float16", context=4096, bandwidth_bytes_per_s=50e9)
    assert c.bandwidth_bytes_per_s == 50e9
    assert c.decode_roofline_step_seconds_batch1 == pytest.approx(15_624_314_880 / 50e9)


def test_bad_inputs():
    m = get_preset("llama2-7b")
    with pytest.raises(InvalidConfigError, match="dtype"):
        plan(m, "h100", dtype="float8")
    with pytest.raises(InvalidConfigError, match="KV dtype"):
        plan(m, "h100", kv_dtype="int4")
    with pytest.raises(InvalidConfigError, match="num_devices"):
        plan(m, "h100", num_devices=0)
    with pytest.raises(InvalidConfigError, match="context"):
        plan(m, "h100", context=0)
    with pytest.raises(InvalidConfigError, match="known devices: tpu-v4"):
        plan(m, "tpu-v9")


# ------------------------------------------------------------------------------------------ devices

def test_device_table():
    # TPU HBM per chip in GiB; NVIDIA "N GB" HBM parts hold N GiB (nvidia-smi: A100 80GB = 81,920 MiB)
    assert DEVICES["tpu-v4"].memory_bytes == 32 * GiB
    assert DEVICES["tpu-v5e"].memory_bytes == 16 * GiB
    assert DEVICES["tpu-v5p"].memory_bytes == 95 * GiB
    assert DEVICES["tpu-v6e"].memory_bytes == 32 * GiB
    assert DEVICES["a100-40gb"].memory_bytes == 40 * GiB
    assert DEVICES["a100-80gb"].memory_bytes == 81_920 * 2**20 == 85_899_345_920
    assert DEVICES["h100"].memory_bytes == 80 * GiB
    assert DEVICES["h200"].memory_bytes == 141 * GiB
    bw = {k: d.bandwidth_bytes_per_s / 1e9 for k, d in DEVICES.items()}
    assert bw == {"tpu-v4": 1200, "tpu-v5e": 819, "tpu-v5p": 2765, "tpu-v6e": 1640, "a100-40gb": 1555,
                  "a100-80gb": 2039, "h100": 3350, "h200": 4800, "cpu": 26}
    psutil = pytest.importorskip("psutil")
    assert DEVICES["cpu"].memory_bytes == psutil.virtual_memory().total
    assert planner.cpu_device(10e9).bandwidth_bytes_per_s == 10e9


def test_device_aliases_case_insensitive():
    assert get_device("A100-80GB").key == "a100-80gb"
    assert get_device("a100_80gb").key == "a100-80gb"
    assert get_device("TPU v5e").key == "tpu-v5e"
    assert get_device("v5p").key == "tpu-v5p"
    assert get_device("H100").key == "h100"
    assert get_device("CPU").key == "cpu"


def test_device_from_jax_kind():
    assert device_key_from_kind("tpu", "TPU v4") == "tpu-v4"
    assert device_key_from_kind("tpu", "TPU v5 lite") == "tpu-v5e"
    assert device_key_from_kind("tpu", "TPU v5") == "tpu-v5p"
    assert device_key_from_kind("tpu", "TPU v6 lite") == "tpu-v6e"
    assert device_key_from_kind("gpu", "NVIDIA A100-SXM4-80GB") == "a100-80gb"
    assert device_key_from_kind("gpu", "NVIDIA A100-SXM4-40GB") == "a100-40gb"
    assert device_key_from_kind("gpu", "NVIDIA H100 80GB HBM3") == "h100"
    assert device_key_from_kind("gpu", "NVIDIA H200") == "h200"
    assert device_key_from_kind("cpu", "cpu") == "cpu"
    assert device_key_from_kind("gpu", "NVIDIA GeForce RTX 4090") is None


def test_no_jax_import():
    code = "import sys, jaxserve.planner; assert 'jax' not in sys.modules, 'planner imported jax'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------------ engine budget

def test_kv_pages_for_budget():
    g = get_preset("gemma3-270m")
    ecfg = EngineConfig(page_size=16, kv_cache_dtype="float32", sliding_window_reclaim=False)
    # one page = 16 tokens x 36,864 B = 589,824 B; 2 GiB / 589,824 = 3,640.9 -> 3,640 pages (null page included)
    assert kv_pages_for_budget(g, ecfg, 2 * GiB) == 3_640
    assert kv_pages_for_budget(g, EngineConfig(page_size=16, kv_cache_dtype="bfloat16",
                                               sliding_window_reclaim=False), 2 * GiB) == 7_281
    assert kv_pages_for_budget(g, ecfg, 0) == 2  # floor: the null page + one usable page
    # Page groups (sliding-window reclaim, the default): a page holds 3 of the 18 layers (KVLayout.width):
    # 16 x 36,864 x 3 / 18 = 98,304 B; 2 GiB / 98,304 = 21,845.3
    assert kv_pages_for_budget(g, EngineConfig(page_size=16, kv_cache_dtype="float32"), 2 * GiB) == 21_845


def test_sliding_window_reclaim_plan():
    """Gemma 3 270M's KV per sequence with its 15 local layers' pages freed out of their 512-token window:
    3 rows x 2 KiB (float32 K + V of one layer) per token and row = 6 KiB per token and page slot;
    8,192 tokens: 512 pages of the global group + 5 x min(512, ceil((511 + 512) / 16) + 1 = 65) = 837 pages."""
    g = get_preset("gemma3-270m")
    full = 36_864 * 8_192
    assert kv_sequence_bytes(g, "float32", 8_192, reclaim=False) == full
    assert kv_sequence_bytes(g, "float32", 8_192) == 6_144 * 16 * (512 + 5 * 65) == 82_280_448
    assert kv_sequence_bytes(g, "float32", 32_768) == 6_144 * 16 * (2_048 + 5 * 65)
    p = plan(g, "cpu", dtype="float32", context=8_192)
    q = plan(g, "cpu", dtype="float32", context=8_192, reclaim=False)
    assert p.kv_bytes_per_sequence == 82_280_448 and p.kv_bytes_per_sequence_no_reclaim == full
    assert q.kv_bytes_per_sequence == full and q.kv_bytes_per_sequence_no_reclaim is None
    assert p.max_concurrent_sequences == p.kv_budget_bytes // 82_280_448 > 3 * q.max_concurrent_sequences
    # no sliding layers: nothing changes
    llama = get_preset("tiny-llama")
    assert kv_sequence_bytes(llama, "float32", 100) == llama.kv_bytes_per_token("float32") * 100


def test_default_kv_budget_cpu(monkeypatch):
    g = get_preset("gemma3-270m")
    ecfg = EngineConfig()  # float32 weights and KV, context min(32,768, 8,192) = 8,192
    # weights 268,098,176 x 4 = 1,072,392,704 B
    # 4 GiB host: 4,294,967,296 - int(429,496,729.6) - 1,072,392,704 = 2,793,077,863 > 2 GiB -> capped at 2 GiB
    monkeypatch.setitem(DEVICES, "cpu", Device("cpu", "test host", 4 * GiB, 26e9))
    assert default_kv_budget_bytes(g, ecfg) == CPU_DEFAULT_KV_BUDGET_BYTES == 2 * GiB
    # 2 GiB host: 2,147,483,648 - 214,748,364 - 1,072,392,704 = 860,342,580 (under the cap)
    monkeypatch.setitem(DEVICES, "cpu", Device("cpu", "test host", 2 * GiB, 26e9))
    assert default_kv_budget_bytes(g, ecfg) == 860_342_580
    full = EngineConfig(sliding_window_reclaim=False)  # every layer keeps every token: 18 layers per page
    assert kv_pages_for_budget(g, full, 860_342_580) == 860_342_580 // (16 * 36_864) == 1_458


def test_num_kv_pages():
    """The engine's one page count: num_pages when given, else the budget (kv_cache_bytes split over the
    data-parallel replicas, or the default budget) in pages."""
    g = get_preset("gemma3-270m")
    assert planner.num_kv_pages(g, EngineConfig(page_size=16, num_pages=7, kv_cache_bytes=2 * GiB)) == 7
    ecfg = EngineConfig(page_size=16, kv_cache_dtype="float32", kv_cache_bytes=2 * GiB, sliding_window_reclaim=False)
    assert planner.num_kv_pages(g, ecfg) == 3_640
    assert planner.num_kv_pages(g, ecfg, replicas=2) == kv_pages_for_budget(g, ecfg, GiB) == 1_820
    ecfg = EngineConfig(dtype="bfloat16", kv_cache_dtype="bfloat16", page_size=16)
    assert planner.num_kv_pages(g, ecfg, device="tpu-v5e") == kv_pages_for_budget(g, ecfg, 14_925_685_914)


def test_default_kv_budget_accelerator():
    g = get_preset("gemma3-270m")
    # bf16 on a v5e: 17,179,869,184 - 1,717,986,918 - 268,098,176 x 2 = 14,925,685,914 (no CPU cap)
    ecfg = EngineConfig(dtype="bfloat16", kv_cache_dtype="bfloat16")
    assert default_kv_budget_bytes(g, ecfg, device="tpu-v5e") == 14_925_685_914


def test_default_kv_budget_auto_on_this_host():
    jax = pytest.importorskip("jax")
    if jax.devices()[0].platform != "cpu":
        pytest.skip("host-only check")
    g = get_preset("gemma3-270m")
    ecfg = EngineConfig()
    assert default_kv_budget_bytes(g, ecfg, device="auto") == default_kv_budget_bytes(g, ecfg)


# ------------------------------------------------------------------------------- the engine's own device
class FakeDevice:
    """What a JAX device shows the planner: platform, device_kind, memory_stats()."""

    def __init__(self, platform, kind, bytes_limit=None, stats_raise=False):
        self.platform, self.device_kind = platform, kind
        self._limit, self._raise = bytes_limit, stats_raise

    def memory_stats(self):
        if self._raise:
            raise NotImplementedError("memory_stats")
        return None if self._limit is None else {"bytes_limit": self._limit, "bytes_in_use": 0}


# JAX on GPU preallocates 75% of HBM by default; that is the bytes_limit the runtime reports (80 GiB H100).
H100 = FakeDevice("gpu", "NVIDIA H100 80GB HBM3", bytes_limit=int(0.75 * 80 * GiB))
V5E = FakeDevice("tpu", "TPU v5 lite", stats_raise=True)  # no stats: the table's 16 GiB


def test_device_of_reads_runtime_memory_then_table():
    d = planner.device_of(H100)
    assert (d.key, d.memory_bytes, d.bandwidth_bytes_per_s) == ("h100", 64_424_509_440, 3350e9)
    v = planner.device_of(V5E)
    assert (v.key, v.memory_bytes) == ("tpu-v5e", 16 * GiB)
    assert planner.device_of(FakeDevice("tpu", "TPU v5 lite", bytes_limit=15 * GiB)).memory_bytes == 15 * GiB
    assert planner.device_of(FakeDevice("cpu", "cpu")).key == "cpu"
    odd = planner.device_of(FakeDevice("gpu", "NVIDIA L4", bytes_limit=20 * GiB))  # not in the table
    assert (odd.memory_bytes, odd.key) == (20 * GiB, "gpu")
    with pytest.raises(InvalidConfigError, match="kv_cache_bytes"):
        planner.device_of(FakeDevice("gpu", "NVIDIA L4"))


def test_engine_defaults_on_faked_80gb_gpu_and_v5e():
    g = get_preset("gemma3-270m")
    ecfg = EngineConfig()  # context 8,192
    w_bf16 = 268_098_176 * 2
    kv_tok = 18_432  # bf16 KV per token (half of float32's 36,864)
    # H100: 64,424,509,440 - 6,442,450,944 reserve - 536,196,352 weights = 57,445,862,144 B -> 3,116,637 tokens
    d = planner.engine_defaults(g, ecfg, H100)
    assert d["dtype"] == d["kv_cache_dtype"] == "bfloat16"
    budget = planner.default_kv_budget_bytes(g, EngineConfig(dtype="bfloat16", kv_cache_dtype="bfloat16"), H100)
    assert budget == 64_424_509_440 - 6_442_450_944 - w_bf16 == 57_445_862_144
    assert budget // kv_tok == 3_116_637
    full = dict(sliding_window_reclaim=False)  # every layer keeps every token
    assert kv_pages_for_budget(g, EngineConfig(kv_cache_dtype="bfloat16", **full), budget) == 3_116_637 // 16
    assert d["max_num_seqs"] == 256  # 380 full 8,192-token sequences fit; capped at 256
    # v5e (16 GiB from the table): 14,925,685,914 B = 809,770 tokens = 98 full sequences -> 64 (power of two)
    v = planner.engine_defaults(g, EngineConfig(**full), V5E)
    assert (v["dtype"], v["kv_cache_dtype"], v["max_num_seqs"]) == ("bfloat16", "bfloat16", 64)
    # sliding-window reclaim: a sequence holds 512 + 5 x 65 pages of 3 layers (41,140,224 B): 362 fit -> 256
    assert planner.engine_defaults(g, ecfg, V5E)["max_num_seqs"] == 256
    # what the user set stays; CPU changes nothing
    kept = planner.engine_defaults(g, ecfg, H100, given={"dtype", "max_num_seqs"})
    assert kept == {"kv_cache_dtype": "bfloat16"}
    assert planner.engine_defaults(g, ecfg, FakeDevice("cpu", "cpu")) == {}


def test_kv_budget_per_device_on_a_mesh():
    l8 = get_preset("llama3-8b")
    ecfg = EngineConfig(dtype="bfloat16", kv_cache_dtype="bfloat16")  # context 8,192
    p4 = plan(l8, "tpu-v5e", dtype="bfloat16", num_devices=4, context=8192)
    # 4 chips: each keeps a quarter of the weights and 2 of the 8 KV heads; the group's cache in whole-model bytes
    want = p4.max_tokens_in_cache * p4.kv_bytes_per_token
    assert planner.default_kv_budget_bytes(l8, ecfg, V5E, num_devices=4) == want > 0
    assert p4.kv_bytes_per_token_per_device * 4 == p4.kv_bytes_per_token
    # one v5e cannot hold Llama 3 8B in bf16: no KV at all, and the default batch falls to 1
    assert planner.default_kv_budget_bytes(l8, ecfg, V5E) == 0
    assert planner.engine_defaults(l8, EngineConfig(), V5E)["max_num_seqs"] == 1
    # the CPU host is shared by every forced device: the host budget split over replicas, not multiplied
    host = planner.default_kv_budget_bytes(get_preset("tiny-llama"), EngineConfig(), "cpu")
    assert planner.default_kv_budget_bytes(get_preset("tiny-llama"), EngineConfig(), "cpu", num_devices=4,
                                           replicas=2) == host // 2


def test_llm_takes_device_defaults(monkeypatch):
    """LLM() with no engine arguments on a (faked) accelerator: bf16, the batch and the page budget planned
    from that device's memory. The fake device is small so the real KV cache it sizes fits this host."""
    from jaxserve import LLM, SamplingParams

    cfg = get_preset("tiny-llama")
    ecfg = EngineConfig(max_model_len=256, dtype="bfloat16", kv_cache_dtype="bfloat16")
    per_seq = int(cfg.kv_bytes_per_token("bfloat16")) * 256
    w = cfg.num_params() * 2
    mem = int((w + 10.5 * per_seq) / 0.9)  # room for 10 full sequences after the reserve and the weights
    small = Device("gpu", "small test GPU", mem, 1e12)
    monkeypatch.setattr(planner, "device_of", lambda jax_device=None: small)
    monkeypatch.setattr(planner, "is_accelerator", lambda jax_device=None: True)
    llm = LLM("tiny-llama", random_weights=True, max_model_len=256, max_num_batched_tokens=64, max_prefill_seqs=1)
    got = llm.engine_config
    assert (got.dtype, got.kv_cache_dtype, got.max_num_seqs) == ("bfloat16", "bfloat16", 8)
    budget = planner.default_kv_budget_bytes(cfg, ecfg, small)
    assert 10 * per_seq <= budget < 11 * per_seq
    assert llm.engine.num_pages == kv_pages_for_budget(cfg, ecfg, budget)
    out = llm.generate(["Hello there"], SamplingParams(max_tokens=4))[0]
    assert len(out.outputs[0].token_ids) == 4
    # given fields win
    llm2 = LLM("tiny-llama", random_weights=True, max_model_len=256, max_num_batched_tokens=64, max_prefill_seqs=1,
               dtype="float32", max_num_seqs=2)
    assert (llm2.engine_config.dtype, llm2.engine_config.kv_cache_dtype, llm2.engine_config.max_num_seqs) == (
        "float32", "bfloat16", 2)


# ------------------------------------------------------------------------------------------ output and CLI

def test_format_plan_units():
    text = format_plan(plan(get_preset("llama2-7b"), "a100-80gb", dtype="float16", context=4096))
    assert "512.00 KiB (524,288 B)" in text  # per token
    assert "2.00 GiB" in text and "12.55 GiB (13.48 GB)" in text and "59.45 GiB" in text
    lines = text.splitlines()
    value_col = {len(line) - len(line.split("  ")[-1].lstrip()) for line in lines if line}
    assert len(value_col) == 1  # values aligned in one column
    assert "36.00 KiB (36,864 B)" in format_plan(plan(get_preset("gemma3-270m"), "cpu", dtype="float32"))


def test_cli_json(capsys):
    rc = main(["--model", "llama2-7b", "--device", "A100-80GB", "--dtype", "float16", "--context", "4096", "--json"])
    assert rc == 0
    d = json.loads(capsys.readouterr().out)
    for field in ("weight_bytes", "kv_bytes_per_token", "kv_bytes_per_sequence", "device_bytes", "reserve_bytes",
                  "kv_budget_bytes", "max_concurrent_sequences", "max_tokens_in_cache",
                  "decode_roofline_step_seconds_batch1", "decode_roofline_step_seconds_max_batch", "fits", "message"):
        assert field in d
    assert d["max_concurrent_sequences"] == 29 and d["kv_bytes_per_token"] == 524_288
    assert d["device"] == "a100-80gb" and d["fits"] is True


def test_cli_text_and_hf_config(tmp_path, capsys):
    hf = {"model_type": "llama", "vocab_size": 32_000, "hidden_size": 4096, "intermediate_size": 11_008,
          "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
          "max_position_embeddings": 4096}
    path = tmp_path / "llama-2-7b-hf" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(hf))
    assert main(["--model", str(path), "--device", "h100", "--dtype", "fp16", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["model"] == "llama-2-7b-hf" and d["kv_bytes_per_token"] == 524_288 and d["context"] == 4096
    assert main(["--model", "llama2-70b", "--device", "h100", "--dtype", "float16", "--context", "4096"]) == 0
    assert "--num-devices 2" in capsys.readouterr().out


def test_cli_errors(tmp_path, capsys):
    assert main(["--model", "llama2-7b", "--device", "tpu-v9"]) == 2
    err = capsys.readouterr().err
    assert "unknown device 'tpu-v9'" in err and "a100-80gb" in err and "Traceback" not in err
    assert main(["--model", "no-such-model", "--device", "h100"]) == 2
    assert "unknown model" in capsys.readouterr().err
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    assert main(["--model", str(bad), "--device", "h100"]) == 2
    assert main(["--model", "llama2-7b", "--device", "h100", "--dtype", "float8"]) == 2
    assert "float8" in capsys.readouterr().err


def test_cli_subprocess_exit_code():
    r = subprocess.run([sys.executable, "-m", "jaxserve.planner", "--model", "llama2-7b", "--device", "nope"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "known devices" in r.stderr and "Traceback" not in r.stderr
