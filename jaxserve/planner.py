"""Capacity planner: how much of a device a model's weights take, how many bytes of KV cache a token and a
sequence need, how many sequences fit at once, and the memory-bandwidth roofline of a decode step.

    jaxserve plan --model llama2-7b --device a100-80gb --dtype float16 --context 4096
    python -m jaxserve.planner --model llama3-8b --device tpu-v5e --num-devices 4 --json

Memory model, per device (tensor parallelism over `num_devices` splits weights evenly and KV by KV head):

    reserve    = reserve_fraction x device memory          (activations, fragmentation, runtime)
    kv_budget  = device memory - reserve - weights / num_devices          (floor 0)
    max concurrent sequences = kv_budget // (KV bytes per token per device x context)

KV bytes per token come from `ModelConfig.kv_bytes_per_token` (2 x KV heads x head_dim x bytes x layers,
plus the int8 scales), the one formula of the code base: it is never re-derived here. A device's share is the
same formula applied to the model with that device's KV heads (`ceil(KV heads / num_devices)`: when there
are more devices than KV heads, heads are replicated, so the per-device KV stops shrinking).

A full-attention layer keeps every token's K/V. Sliding-window layers (Gemma 2/3, Mistral) keep only their
window: the engine's page groups (config.KVLayout) free their pages as they fall out of it, so a sequence's KV
is `kv_sequence_bytes` (whole pages: every position in the full-attention groups, at most window + one step
in each sliding group) rather than KV per token x context; `--no-reclaim` plans the engine with
`sliding_window_reclaim=False`, where every layer keeps every token.

Decode roofline: a decode step reads every weight once plus the KV of every sequence in the batch, so its
lower bound is (weights / num_devices + batch x KV per sequence per device) / peak memory bandwidth, with each
sequence's KV at full `context` (an upper bound for sliding-window models, whose local layers read less).

Host-side only: JAX is imported lazily, and only to look at a live device (`device_of`, `is_accelerator`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from typing import Optional

from jaxserve.config import DTYPE_BYTES, ModelConfig, load_model_config
from jaxserve.errors import InvalidConfigError, JaxserveError

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30  # binary gigabyte (gibibyte), 1,073,741,824 B
GB = 10**9  # decimal gigabyte, 1,000,000,000 B

# ---------------------------------------------------------------------------------------------------- devices


@dataclass(frozen=True)
class Device:
    key: str  # the name the CLI takes
    name: str  # human name
    memory_bytes: int  # memory of ONE device (HBM, or host RAM for `cpu`)
    bandwidth_bytes_per_s: float  # peak memory bandwidth of one device
    memory_note: str = ""


# Measured on this project's reference machine (streaming numpy copy); pass another figure to `cpu_device`,
# `plan(..., bandwidth_bytes_per_s=)` or `--bandwidth-gbps` for a different host.
CPU_BANDWIDTH_BYTES_PER_S = 26e9


def host_memory_bytes() -> int:
    """This machine's physical RAM (total, not currently free): psutil, else sysconf."""
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except Exception:  # psutil missing or unusable (some containers)
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def cpu_device(bandwidth_bytes_per_s: float = CPU_BANDWIDTH_BYTES_PER_S) -> Device:
    """The host as a device: its total RAM, and a memory bandwidth you can override (default: measured here)."""
    return Device("cpu", "CPU (this host)", host_memory_bytes(), float(bandwidth_bytes_per_s),
                  "total host RAM (psutil.virtual_memory().total)")


# Memory: binary units for every accelerator, because that is what the HBM stacks hold.
#  - Google publishes TPU HBM per chip in GiB: v4 32 GiB, v5e 16 GiB, v5p 95 GiB, v6e 32 GiB.
#  - NVIDIA writes "GB", but its HBM parts hold that many GiB: nvidia-smi reports an A100-SXM4-80GB as
#    81,920 MiB = 80 GiB (85.9e9 B, not 80e9). H100 80GB HBM3 reports 81,559 MiB (79.6 GiB) and H200 143,771 MiB
#    (140.4 GiB) to programs: the published 80 / 141 "GB" are within 0.5% of GiB and 7% above decimal GB; the
#    10% reserve absorbs the difference. So 40 GB -> 40 GiB, 80 GB -> 80 GiB, 141 GB -> 141 GiB below.
# Bandwidth: published peak, decimal (1 GB/s = 1e9 B/s).
DEVICES: dict = {
    d.key: d
    for d in [
        Device("tpu-v4", "TPU v4", 32 * GiB, 1200e9, "32 GiB HBM2"),
        Device("tpu-v5e", "TPU v5e", 16 * GiB, 819e9, "16 GiB HBM2"),
        Device("tpu-v5p", "TPU v5p", 95 * GiB, 2765e9, "95 GiB HBM2e"),
        Device("tpu-v6e", "TPU v6e", 32 * GiB, 1640e9, "32 GiB HBM"),
        Device("a100-40gb", "A100 40GB", 40 * GiB, 1555e9, "40 GiB HBM2 (published as 40 GB)"),
        Device("a100-80gb", "A100 SXM 80GB", 80 * GiB, 2039e9, "80 GiB HBM2e (published as 80 GB)"),
        Device("h100", "H100 SXM 80GB", 80 * GiB, 3350e9, "80 GiB HBM3 (published as 80 GB)"),
        Device("h200", "H200 141GB", 141 * GiB, 4800e9, "141 GiB HBM3e (published as 141 GB)"),
        cpu_device(),
    ]
}

_ALIASES = {
    "v4": "tpu-v4", "tpuv4": "tpu-v4",
    "v5e": "tpu-v5e", "tpuv5e": "tpu-v5e", "v5lite": "tpu-v5e", "tpu-v5-lite": "tpu-v5e", "v5litepod": "tpu-v5e",
    "v5p": "tpu-v5p", "tpuv5p": "tpu-v5p",
    "v6e": "tpu-v6e", "tpuv6e": "tpu-v6e", "v6lite": "tpu-v6e", "tpu-v6-lite": "tpu-v6e", "trillium": "tpu-v6e",
    "a100-40": "a100-40gb", "a100-40g": "a100-40gb",
    "a100": "a100-80gb", "a100-80": "a100-80gb", "a100-80g": "a100-80gb",
    "h100-80gb": "h100", "h100-sxm": "h100", "h100-80g": "h100",
    "h200-141gb": "h200", "h200-141g": "h200",
    "host": "cpu",
}


def get_device(name: str, bandwidth_bytes_per_s: Optional[float] = None) -> Device:
    """Look a device up by key or alias, case-insensitively (`A100-80GB`, `a100_80gb`, `TPU v5e` all work)."""
    if isinstance(name, Device):
        dev = name
        if bandwidth_bytes_per_s is not None:
            dev = Device(dev.key, dev.name, dev.memory_bytes, float(bandwidth_bytes_per_s), dev.memory_note)
        return dev
    key = str(name).strip().lower().replace("_", "-").replace(" ", "-")
    key = _ALIASES.get(key, _ALIASES.get(key.replace("-", ""), key))
    if key not in DEVICES:
        raise InvalidConfigError(f"unknown device {name!r}; known devices: {', '.join(DEVICES)}")
    dev = DEVICES[key]
    if bandwidth_bytes_per_s is not None:
        if bandwidth_bytes_per_s <= 0:
            raise InvalidConfigError(f"bandwidth must be positive, got {bandwidth_bytes_per_s}")
        dev = Device(dev.key, dev.name, dev.memory_bytes, float(bandwidth_bytes_per_s), dev.memory_note)
    return dev


def device_key_from_kind(platform: str, device_kind: str) -> Optional[str]:
    """Map a JAX device (`platform`, `device_kind`) to a DEVICES key, or None if the table lacks it.

    JAX names TPU v5e "TPU v5 lite", v5p "TPU v5", v6e "TPU v6 lite"; NVIDIA kinds are the marketing names
    ("NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3", "NVIDIA H200").
    """
    platform, kind = platform.lower(), device_kind.lower()
    if platform == "cpu":
        return "cpu"
    if platform == "tpu" or kind.startswith("tpu"):
        k = kind.replace(" ", "")
        if "v4" in k:
            return "tpu-v4"
        if "v5lite" in k or "v5e" in k:
            return "tpu-v5e"
        if "v5" in k:  # "TPU v5", "TPU v5p"
            return "tpu-v5p"
        if "v6" in k:
            return "tpu-v6e"
        return None
    if "a100" in kind:
        return "a100-40gb" if "40gb" in kind.replace(" ", "") else "a100-80gb"
    if "h100" in kind:
        return "h100"
    if "h200" in kind:
        return "h200"
    return None


def device_of(jax_device=None) -> Device:
    """The planner's Device for a live JAX device (default: `jax.devices()[0]`).

    Memory: what the runtime says the device may allocate (`memory_stats()["bytes_limit"]`, reported by the
    GPU and TPU runtimes), else the DEVICES table by `device_kind`; a CPU device is this host (total RAM).
    Bandwidth: the table's figure. An accelerator the table lacks and whose runtime reports no memory raises
    InvalidConfigError (set kv_cache_bytes / num_pages by hand).
    """
    if jax_device is None:
        import jax

        jax_device = jax.devices()[0]
    platform = str(getattr(jax_device, "platform", "cpu")).lower()
    kind = str(getattr(jax_device, "device_kind", ""))
    key = device_key_from_kind(platform, kind)
    if platform == "cpu":
        return DEVICES["cpu"]
    limit = None
    try:
        stats = jax_device.memory_stats()
        limit = int(stats["bytes_limit"]) if stats and stats.get("bytes_limit") else None
    except Exception:  # not every runtime implements memory_stats (and some raise instead of returning None)
        limit = None
    base = DEVICES.get(key) if key else None
    if base is None and limit is None:
        raise InvalidConfigError(
            f"unknown {platform} device {kind!r} and its runtime reports no memory: pass kv_cache_bytes= "
            f"(or num_pages=) to size the KV cache")
    if base is None:
        return Device(platform, kind or platform, limit, DEVICES["h100" if platform == "gpu" else "tpu-v5e"]
                      .bandwidth_bytes_per_s, f"{fmt_bytes(limit)} as the runtime reports; bandwidth assumed")
    if limit is None:
        return base
    return Device(base.key, base.name, limit, base.bandwidth_bytes_per_s,
                  f"{fmt_bytes(limit)} allocatable as the runtime reports (memory_stats bytes_limit)")


def is_accelerator(jax_device=None) -> bool:
    """True on TPU and GPU (what changes the engine's defaults: bfloat16, a larger batch)."""
    if jax_device is None:
        import jax

        jax_device = jax.devices()[0]
    return str(getattr(jax_device, "platform", "cpu")).lower() in ("tpu", "gpu", "cuda", "rocm")


# ---------------------------------------------------------------------------------------------------- dtypes

WEIGHT_DTYPES = ("float32", "bfloat16", "float16", "int8", "int4")
KV_DTYPES = ("float32", "bfloat16", "float16", "int8")  # what ModelConfig.kv_bytes_per_token models exactly
_DTYPE_ALIASES = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16", "fp16": "float16", "f16": "float16",
                  "half": "float16", "i8": "int8", "i4": "int4"}

# Quantized weights: every parameter is counted at the quantized width (embeddings and norms too: simple, and
# slightly generous to the weights), plus float32 scales laid out as in pallas_kernels/reference.py:
#  - int8: one f32 scale per output column of each [K, N] matrix (`quantize_int8`), i.e. 4 / K bytes per
#    parameter; K is taken as hidden_size for every matrix -> 1 + 4 / hidden_size bytes per parameter
#    (Llama 2 7B: 1 + 4/4096 = 1.00098 B).
#  - int4: 0.5 byte per parameter plus one f32 scale per group of INT4_GROUP_SIZE rows (`quantize_int4`)
#    -> 0.5 + 4/128 = 0.53125 bytes per parameter.
INT4_GROUP_SIZE = 128
SCALE_BYTES = 4  # float32


def normalize_dtype(dtype: str, allowed=WEIGHT_DTYPES, what: str = "dtype") -> str:
    d = _DTYPE_ALIASES.get(str(dtype).lower(), str(dtype).lower())
    if d not in allowed:
        raise InvalidConfigError(f"unknown {what} {dtype!r}; one of {', '.join(allowed)}")
    return d


def weight_bytes_per_param(model: ModelConfig, dtype: str) -> float:
    dtype = normalize_dtype(dtype)
    if dtype == "int8":
        return 1 + SCALE_BYTES / model.hidden_size
    if dtype == "int4":
        return 0.5 + SCALE_BYTES / INT4_GROUP_SIZE
    return DTYPE_BYTES[dtype]


def weight_bytes(model: ModelConfig, dtype: str) -> int:
    """Bytes of all weights of `model` stored as `dtype` (see the int8/int4 note above)."""
    return math.ceil(model.num_params() * weight_bytes_per_param(model, dtype))


def kv_bytes_per_token_per_device(model: ModelConfig, kv_dtype: str, num_devices: int = 1) -> int:
    """One device's share of a token's KV: the ModelConfig formula on that device's ceil(Hkv / n) KV heads."""
    heads = math.ceil(model.num_kv_heads / num_devices)
    return model.replace(num_kv_heads=heads).kv_bytes_per_token(kv_dtype)


def kv_sequence_bytes(model: ModelConfig, kv_dtype: str, context: int, num_devices: int = 1, reclaim: bool = True,
                      page_size: int = 16, step_tokens: int = 512) -> int:
    """KV bytes (per device) one sequence of `context` tokens holds at most, as the engine's cache keeps it.

    Without sliding-window layers (or `reclaim=False`): KV per token x context. With them: the page groups of
    `model.kv_layout()` (cache rows of `width` layers), whole pages of `page_size` tokens; a full-attention
    group holds every position, a sliding group of window W at most the pages spanning W - 1 tokens plus one
    step of `step_tokens` (a prefill chunk: EngineConfig.max_num_batched_tokens), the same count as
    BlockManager.max_pages."""
    per_tok = kv_bytes_per_token_per_device(model, kv_dtype, num_devices)
    layout = model.kv_layout(reclaim)
    if not layout.grouped:
        return int(per_tok * context)
    n = -(-context // page_size)
    pages = sum(n if w == 0 else min(n, -(-(w - 1 + step_tokens) // page_size) + 1) for w in layout.group_windows)
    return int(per_tok * layout.width // model.num_layers * page_size * pages)


# ---------------------------------------------------------------------------------------------------- plan


@dataclass
class Plan:
    """Capacity of a model on `num_devices` x one device type.

    Whole-model figures: num_params, weight_bytes, kv_bytes_per_token, kv_bytes_per_sequence.
    Per-device figures: *_per_device, device_bytes, reserve_bytes, kv_budget_bytes.
    Group figures: max_concurrent_sequences and max_tokens_in_cache (the whole tensor-parallel group serves
    them together). Bytes are integers; roofline times in seconds (None when no sequence fits).
    """

    model: str
    device: str  # DEVICES key
    device_name: str
    num_devices: int
    dtype: str  # weights
    kv_dtype: str
    context: int  # tokens per sequence
    num_params: int
    weight_bytes: int
    weight_bytes_per_device: int
    kv_bytes_per_token: int  # ModelConfig.kv_bytes_per_token(kv_dtype)
    kv_bytes_per_token_per_device: int
    kv_bytes_per_sequence: int  # kv_sequence_bytes: KV per token x context, or less with sliding-window reclaim
    kv_bytes_per_sequence_per_device: int
    device_bytes: int
    reserve_fraction: float
    reserve_bytes: int
    kv_budget_bytes: int  # device - reserve - weights per device, floor 0
    max_concurrent_sequences: int  # kv_budget // kv_bytes_per_sequence_per_device
    max_tokens_in_cache: int  # kv_budget // kv_bytes_per_token_per_device
    bandwidth_bytes_per_s: float
    decode_roofline_step_seconds_batch1: float
    decode_roofline_step_seconds_max_batch: Optional[float]
    decode_roofline_tokens_per_second_max_batch: Optional[float]
    weights_fit: bool  # weights per device <= device - reserve
    fits: bool  # weights and at least one full-context sequence fit
    min_devices_for_weights: Optional[int]  # smallest num_devices whose weights fit (None: > 4096)
    min_devices: Optional[int]  # smallest num_devices holding weights + one full-context sequence
    message: str = ""  # empty when everything fits; otherwise what to change
    # int8 KV only: KV bytes per token of a bfloat16 cache, so the saving is reported next to the int8 figure.
    kv_bytes_per_token_bf16: Optional[int] = None
    # Mixture of experts: parameters one token uses (num_experts_per_tok experts of each layer); = num_params for
    # a dense model. The batch-1 decode roofline reads only these weights (a token's experts, attention, head).
    num_active_params: Optional[int] = None
    # Sliding-window models with reclaim: the KV per sequence (whole model) if every layer kept every token.
    kv_bytes_per_sequence_no_reclaim: Optional[int] = None
    sliding_window_reclaim: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


_MAX_DEVICES_SEARCH = 4096


def plan(model: ModelConfig, device: str, dtype: str = "bfloat16", kv_dtype: Optional[str] = None,
         context: Optional[int] = None, num_devices: int = 1, reserve_fraction: float = 0.1,
         weight_bytes_override: Optional[int] = None, bandwidth_bytes_per_s: Optional[float] = None,
         reclaim: bool = True, page_size: int = 16, step_tokens: int = 512) -> Plan:
    """Capacity of `model` on `num_devices` x `device`.

    dtype: weight dtype (float32, bfloat16, float16, int8, int4). kv_dtype: KV cache dtype (float32, bfloat16,
    float16, int8), default the weight dtype (int4 weights -> int8 KV, the narrowest KV the formula covers).
    context: tokens per sequence (default the model's max_position_embeddings). reserve_fraction: share of each
    device's memory kept for activations and fragmentation. weight_bytes_override: total weight bytes to use
    instead of num_params x dtype (e.g. a checkpoint's size). bandwidth_bytes_per_s: overrides the device's.
    reclaim, page_size, step_tokens: the engine's sliding_window_reclaim, page_size and max_num_batched_tokens
    (`kv_sequence_bytes`).
    """
    dev = get_device(device, bandwidth_bytes_per_s)
    dtype = normalize_dtype(dtype)
    if kv_dtype is None:
        kv_dtype = "int8" if dtype == "int4" else dtype
    kv_dtype = normalize_dtype(kv_dtype, KV_DTYPES, "KV dtype")
    if context is None:
        context = model.max_position_embeddings
    if int(context) != context or context < 1:
        raise InvalidConfigError(f"context must be a positive number of tokens, got {context!r}")
    context = int(context)
    if int(num_devices) != num_devices or num_devices < 1:
        raise InvalidConfigError(f"num_devices must be a positive integer, got {num_devices!r}")
    num_devices = int(num_devices)
    if not 0 <= reserve_fraction < 1:
        raise InvalidConfigError(f"reserve_fraction must be in [0, 1), got {reserve_fraction}")
    if weight_bytes_override is not None and weight_bytes_override < 0:
        raise InvalidConfigError(f"weight_bytes_override must be >= 0, got {weight_bytes_override}")

    w_total = int(weight_bytes_override) if weight_bytes_override is not None else weight_bytes(model, dtype)
    kv_tok = int(model.kv_bytes_per_token(kv_dtype))
    reserve = int(reserve_fraction * dev.memory_bytes)
    usable = dev.memory_bytes - reserve  # per device, for weights + KV

    def shares(n: int):
        w = -(-w_total // n)  # ceil, in integers
        kv_seq = kv_sequence_bytes(model, kv_dtype, context, n, reclaim, page_size, step_tokens)
        return w, kv_seq

    w_dev = -(-w_total // num_devices)
    kv_tok_dev = int(kv_bytes_per_token_per_device(model, kv_dtype, num_devices))
    kv_seq_dev = kv_sequence_bytes(model, kv_dtype, context, num_devices, reclaim, page_size, step_tokens)
    kv_seq = kv_sequence_bytes(model, kv_dtype, context, 1, reclaim, page_size, step_tokens)
    budget = max(0, usable - w_dev)
    max_seqs = budget // kv_seq_dev
    max_tokens = budget // kv_tok_dev
    weights_fit = w_dev <= usable
    fits = max_seqs >= 1

    min_w = next((n for n in range(1, _MAX_DEVICES_SEARCH + 1) if shares(n)[0] <= usable), None)
    min_all = next((n for n in range(min_w or _MAX_DEVICES_SEARCH + 1, _MAX_DEVICES_SEARCH + 1)
                    if sum(shares(n)) <= usable), None)

    bw = dev.bandwidth_bytes_per_s
    active = model.num_params(active=True)
    # One token reads its experts' share of the weights (MoE); a full batch is charged all of them.
    w_active_dev = -(-int(w_total * active / model.num_params()) // num_devices) if model.is_moe else w_dev
    step1 = (w_active_dev + kv_seq_dev) / bw
    step_max = (w_dev + max_seqs * kv_seq_dev) / bw if max_seqs else None
    tps_max = max_seqs / step_max if step_max else None

    notes = []
    usable_on = (f"{_gib(usable)} usable on one {dev.name} ({_gib(dev.memory_bytes)} less the "
                 f"{reserve_fraction:.0%} reserve)")
    if min_all is not None and min_all != num_devices and not fits:
        then = plan(model, dev.key, dtype, kv_dtype, context, min_all, reserve_fraction, weight_bytes_override,
                    bandwidth_bytes_per_s, reclaim, page_size, step_tokens)
        k = then.max_concurrent_sequences
        with_min = (f" With --num-devices {min_all}: {k:,} concurrent {context:,}-token "
                    f"sequence{'' if k == 1 else 's'}.")
    else:
        with_min = ""
    if not weights_fit:
        need = (f"at least {min_w} devices (--num-devices {min_w})" if min_w
                else f"more than {_MAX_DEVICES_SEARCH:,} devices")
        seq = f" ({min_all} to also hold one {context:,}-token sequence)" if min_all and min_all != min_w else ""
        notes.append(f"weights do not fit: {_gib(w_dev)} per device > {usable_on}. Needs {need}{seq}, or a "
                     f"narrower --dtype (int8, int4).{with_min}")
    elif not fits:
        notes.append(f"weights fit ({_gib(w_dev)} per device) but leave {_gib(budget)}, less than one "
                     f"{context:,}-token sequence of KV cache ({_gib(kv_seq_dev)} per device). Shorten --context, "
                     f"use --kv-dtype int8, or add devices.{with_min}")
    if context > model.max_position_embeddings:
        notes.append(f"note: context {context:,} exceeds the model's {model.max_position_embeddings:,} tokens.")
    if num_devices > model.num_kv_heads:
        notes.append(f"note: {num_devices} devices > {model.num_kv_heads} KV heads: KV heads are replicated, "
                     f"each device keeps {kv_tok_dev:,} B per token.")

    return Plan(
        model=model.name, device=dev.key, device_name=dev.name, num_devices=num_devices, dtype=dtype,
        kv_dtype=kv_dtype, context=context, num_params=model.num_params(), weight_bytes=w_total,
        weight_bytes_per_device=w_dev, kv_bytes_per_token=kv_tok, kv_bytes_per_token_per_device=kv_tok_dev,
        kv_bytes_per_sequence=kv_seq, kv_bytes_per_sequence_per_device=kv_seq_dev,
        device_bytes=dev.memory_bytes, reserve_fraction=reserve_fraction, reserve_bytes=reserve,
        kv_budget_bytes=budget, max_concurrent_sequences=max_seqs, max_tokens_in_cache=max_tokens,
        bandwidth_bytes_per_s=bw, decode_roofline_step_seconds_batch1=step1,
        decode_roofline_step_seconds_max_batch=step_max, decode_roofline_tokens_per_second_max_batch=tps_max,
        weights_fit=weights_fit, fits=fits, min_devices_for_weights=min_w, min_devices=min_all,
        message="\n".join(notes),
        kv_bytes_per_token_bf16=int(model.kv_bytes_per_token("bfloat16")) if kv_dtype == "int8" else None,
        num_active_params=active,
        kv_bytes_per_sequence_no_reclaim=kv_tok * context if kv_seq != kv_tok * context else None,
        sliding_window_reclaim=reclaim,
    )


# ---------------------------------------------------------------------------------------------------- engine

# The engine's KV budget on CPU when the user sets none: min(this, what plan() leaves after weights and
# reserve). 2 GiB holds 58,254 float32 tokens of Gemma 3 270M (36,864 B each) = 56 full 1,024-token
# sequences, and keeps the cache small next to the rest of the host's work.
CPU_DEFAULT_KV_BUDGET_BYTES = 2 * GiB


def kv_pages_for_budget(model: ModelConfig, engine_cfg, budget_bytes: int) -> int:
    """Total KV pages (null page 0 included) whose cache fits in `budget_bytes`; at least 2 (one usable).

    A page holds `page_size` tokens of `ModelConfig.kv_bytes_per_token(engine_cfg.kv_cache_dtype)` each, of the
    KV layout's `width` layers (config.KVLayout: all of them, or one page group's with sliding-window reclaim).
    """
    layout = model.kv_layout(engine_cfg.sliding_window_reclaim)
    per_page = int(model.kv_bytes_per_token(engine_cfg.kv_cache_dtype)) * layout.width // model.num_layers
    per_page *= engine_cfg.page_size
    return max(2, int(budget_bytes) // per_page)


def default_kv_budget_bytes(model: ModelConfig, engine_cfg, device="auto", num_devices: int = 1,
                            replicas: int = 1) -> int:
    """KV cache bytes (whole-model bytes, as `kv_pages_for_budget` counts them) the engine uses when
    `EngineConfig.kv_cache_bytes` is None.

    What `plan()` leaves on each device after its share of the weights (engine dtype) and the 10% reserve,
    at the engine's context (`engine_cfg.model_len`), times the `num_devices` the KV heads are sharded over
    (a tensor-parallel or pipeline group; replicated heads count once). `device`: a DEVICES key, a planner
    `Device`, a live JAX device, or "auto" (`device_of()`: the engine's backend). On the CPU host, where every
    (forced) device shares the same RAM, the host's budget is capped at CPU_DEFAULT_KV_BUDGET_BYTES and split
    over `replicas` (data-parallel copies) instead. May be 0 when the weights alone fill the device.
    """
    if isinstance(device, str) and device == "auto":
        device = device_of()
    elif not isinstance(device, (str, Device)):  # a JAX device
        device = device_of(device)
    # Quantized weights leave more of the device to the KV cache; plan() counts every parameter at the quantized
    # width, so only when the embedding is quantized too (otherwise the engine dtype over-counts: safe).
    wdtype = engine_cfg.dtype
    if getattr(engine_cfg, "quantization", None) and getattr(engine_cfg, "quantize_embed", False):
        wdtype = "int8" if engine_cfg.quantization == "int8" else "int4"
    on_host = get_device(device).key == "cpu"
    p = plan(model, device, dtype=wdtype, kv_dtype=engine_cfg.kv_cache_dtype, context=engine_cfg.model_len(model),
             num_devices=1 if on_host else num_devices, reclaim=engine_cfg.sliding_window_reclaim,
             page_size=engine_cfg.page_size, step_tokens=engine_cfg.max_num_batched_tokens)
    # a group's cache in whole-model token bytes (each device holds its share of every token)
    budget = p.kv_budget_bytes if p.num_devices == 1 else p.max_tokens_in_cache * p.kv_bytes_per_token
    if on_host:
        return min(CPU_DEFAULT_KV_BUDGET_BYTES, budget) // max(1, replicas)
    return budget


def kv_budget_bytes(model: ModelConfig, engine_cfg, device="auto", num_devices: int = 1, replicas: int = 1) -> int:
    """KV cache bytes of one engine replica: `EngineConfig.kv_cache_bytes` split over the `replicas`
    (data-parallel copies), or when it is None `default_kv_budget_bytes` (same arguments)."""
    if engine_cfg.kv_cache_bytes:
        return engine_cfg.kv_cache_bytes // max(1, replicas)
    return default_kv_budget_bytes(model, engine_cfg, device, num_devices=num_devices, replicas=replicas)


def num_kv_pages(model: ModelConfig, engine_cfg, device="auto", num_devices: int = 1, replicas: int = 1) -> int:
    """KV pages of one engine replica (null page included): `EngineConfig.num_pages` when given, else as many as
    `kv_budget_bytes` holds. `device`, `num_devices` (a replica's tensor / pipeline group), `replicas`: as
    `default_kv_budget_bytes`. The one place the engine's page count is decided."""
    if engine_cfg.num_pages is not None:
        return engine_cfg.num_pages
    return kv_pages_for_budget(model, engine_cfg, kv_budget_bytes(model, engine_cfg, device, num_devices, replicas))


# The largest decode batch the engine picks by itself on TPU/GPU (vLLM's GPU default is 256): bigger batches
# only add compiled buckets while a step is bandwidth-bound on the weights up to about this size.
ACCELERATOR_MAX_NUM_SEQS = 256


def engine_defaults(model: ModelConfig, engine_cfg, jax_device=None, num_devices: int = 1, given=()) -> dict:
    """EngineConfig fields the engine derives from the device it runs on, for those the user did not give.

    On TPU/GPU: dtype and kv_cache_dtype bfloat16 (the models' native width; float32 stays the CPU default,
    the reference numerics), and max_num_seqs = the largest power of two <= min(ACCELERATOR_MAX_NUM_SEQS,
    full-context sequences the KV budget holds), at least 1. On CPU: nothing changes.
    `given`: names of fields the user set (left alone).
    """
    import dataclasses

    if not is_accelerator(jax_device):
        return {}
    out = {}
    for field in ("dtype", "kv_cache_dtype"):
        if field not in given:
            out[field] = "bfloat16"
    if "max_num_seqs" not in given:
        cfg = dataclasses.replace(engine_cfg, **out)
        budget = kv_budget_bytes(model, cfg, device_of(jax_device), num_devices)
        per_seq = kv_sequence_bytes(model, cfg.kv_cache_dtype, cfg.model_len(model), 1, cfg.sliding_window_reclaim,
                                    cfg.page_size, cfg.max_num_batched_tokens)
        fit = max(1, min(ACCELERATOR_MAX_NUM_SEQS, budget // per_seq))
        out["max_num_seqs"] = 1 << (int(fit).bit_length() - 1)
    return out


# ---------------------------------------------------------------------------------------------------- output


def _gib(b: float) -> str:
    return f"{b / GiB:,.2f} GiB"


def fmt_bytes(b: float) -> str:
    """Binary units: GiB from 1 GiB, MiB from 1 MiB, KiB from 1 KiB."""
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if b >= size:
            return f"{b / size:,.2f} {unit}"
    return f"{b:,.0f} B"


def _ms(s: Optional[float]) -> str:
    return "-" if s is None else f"{s * 1e3:,.2f} ms"


def format_plan(p: Plan) -> str:
    """Aligned two-column table; whole-model byte counts also in exact bytes / decimal GB."""
    dev = f"{p.num_devices} x {p.device_name}" if p.num_devices > 1 else p.device_name
    per_dev = " per device" if p.num_devices > 1 else ""
    rows = [
        ("model", f"{p.model} ({p.num_params / 1e9:,.2f}B params"
                  + (f", {p.num_active_params / 1e9:,.2f}B active per token)"
                     if p.num_active_params not in (None, p.num_params) else ")")),
        ("device", f"{dev} ({fmt_bytes(p.device_bytes)}, {p.bandwidth_bytes_per_s / 1e9:,.0f} GB/s each)"),
        ("dtype (weights / KV)", f"{p.dtype} / {p.kv_dtype}"),
        ("weights", f"{fmt_bytes(p.weight_bytes)} ({p.weight_bytes / GB:,.2f} GB)"),
    ]
    if p.num_devices > 1:
        rows.append(("weights per device", fmt_bytes(p.weight_bytes_per_device)))
    rows += [
        ("KV per token", f"{fmt_bytes(p.kv_bytes_per_token)} ({p.kv_bytes_per_token:,} B)"),
    ]
    if p.kv_bytes_per_token_bf16:
        rows.append(("int8 KV saving vs bfloat16 / float32",
                     f"{1 - p.kv_bytes_per_token / p.kv_bytes_per_token_bf16:.1%} / "
                     f"{1 - p.kv_bytes_per_token / (2 * p.kv_bytes_per_token_bf16):.1%} (scales included)"))
    if p.num_devices > 1:
        rows.append(("KV per token per device",
                     f"{fmt_bytes(p.kv_bytes_per_token_per_device)} ({p.kv_bytes_per_token_per_device:,} B)"))
    rows += [
        (f"KV per sequence ({p.context:,} tokens){per_dev}", fmt_bytes(p.kv_bytes_per_sequence_per_device)
         + (f" (sliding-window pages reclaimed; {fmt_bytes(p.kv_bytes_per_sequence_no_reclaim)} whole model without)"
            if p.kv_bytes_per_sequence_no_reclaim else "")),
        (f"reserve ({p.reserve_fraction:.0%}){per_dev}", fmt_bytes(p.reserve_bytes)),
        (f"KV budget{per_dev}", fmt_bytes(p.kv_budget_bytes)),
        ("max concurrent sequences", f"{p.max_concurrent_sequences:,}"),
        ("max tokens in cache", f"{p.max_tokens_in_cache:,}"),
        ("decode step roofline, batch 1", _ms(p.decode_roofline_step_seconds_batch1)),
        (f"decode step roofline, max batch ({p.max_concurrent_sequences:,})",
         _ms(p.decode_roofline_step_seconds_max_batch)
         + ("" if p.decode_roofline_tokens_per_second_max_batch is None
            else f" ({p.decode_roofline_tokens_per_second_max_batch:,.0f} tokens/s)")),
        ("fits", "yes" if p.fits else "no"),
    ]
    width = max(len(k) for k, _ in rows)
    out = "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
    return out + (f"\n\n{p.message}" if p.message else "")


# ---------------------------------------------------------------------------------------------------- CLI


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="preset name or path to a HF config.json")
    parser.add_argument("--device", required=True,
                        help=f"one of {', '.join(DEVICES)} (case-insensitive), or auto: the device JAX runs on, "
                             "with what the engine would use there")
    parser.add_argument("--dtype", default="bfloat16", help=f"weight dtype: {', '.join(WEIGHT_DTYPES)}")
    parser.add_argument("--kv-dtype", default=None, help=f"KV cache dtype: {', '.join(KV_DTYPES)} (default: --dtype)")
    parser.add_argument("--context", type=int, default=None, help="tokens per sequence (default: model context)")
    parser.add_argument("--num-devices", type=int, default=1, help="tensor-parallel devices")
    parser.add_argument("--reserve", type=float, default=0.1,
                        help="fraction of device memory kept for activations and fragmentation (default 0.1)")
    parser.add_argument("--weight-bytes", type=int, default=None, help="total weight bytes (overrides the estimate)")
    parser.add_argument("--bandwidth-gbps", type=float, default=None,
                        help="memory bandwidth in GB/s (overrides the device's; cpu default "
                             f"{CPU_BANDWIDTH_BYTES_PER_S / 1e9:g})")
    parser.add_argument("--no-reclaim", action="store_true",
                        help="sliding-window layers keep every token (EngineConfig(sliding_window_reclaim=False))")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def run_plan(args) -> int:
    """Print the plan; 0 on success, 2 (message on stderr, no traceback) on a bad model, device or option."""
    try:
        model = load_model_config(args.model)
        device = args.device
        if str(device).strip().lower() == "auto":
            device = device_of()
        p = plan(model, device, dtype=args.dtype, kv_dtype=args.kv_dtype, context=args.context,
                 num_devices=args.num_devices, reserve_fraction=args.reserve,
                 weight_bytes_override=getattr(args, "weight_bytes", None),
                 bandwidth_bytes_per_s=(None if getattr(args, "bandwidth_gbps", None) is None
                                        else args.bandwidth_gbps * 1e9),
                 reclaim=not getattr(args, "no_reclaim", False))
    except (JaxserveError, OSError, ValueError, KeyError, TypeError) as e:
        # KeyError/TypeError: a config.json missing fields; ValueError covers malformed JSON.
        what = f"missing field {e}" if isinstance(e, KeyError) else str(e)
        print(f"jaxserve plan: error: {what}", file=sys.stderr)
        return 2
    engine = engine_plan(model, device) if isinstance(device, Device) else None
    if args.json:
        out = p.to_dict()
        if engine is not None:
            out["engine"] = engine
        print(json.dumps(out, indent=2))
    else:
        print(format_plan(p))
        if engine is not None:
            print(f"engine defaults on this backend ({engine['backend']}, {engine['device_kind']}): dtype "
                  f"{engine['dtype']}, KV cache {engine['kv_cache_dtype']} {fmt_bytes(engine['kv_cache_bytes'])} = "
                  f"{engine['num_pages']:,} pages of {engine['page_size']} tokens, max_num_seqs "
                  f"{engine['max_num_seqs']}, max_model_len {engine['max_model_len']:,}")
    return 0


def engine_plan(model: ModelConfig, device: Device, jax_device=None) -> dict:
    """What `LLM(model)` with no engine arguments would use on the JAX device (default: the first)."""
    import dataclasses

    import jax

    from jaxserve.config import EngineConfig

    jax_device = jax_device or jax.devices()[0]
    cfg = EngineConfig()
    cfg = dataclasses.replace(cfg, **engine_defaults(model, cfg, jax_device))
    budget = default_kv_budget_bytes(model, cfg, device)
    return {"backend": jax_device.platform, "device_kind": getattr(jax_device, "device_kind", ""),
            "device_memory_bytes": device.memory_bytes, "dtype": cfg.dtype, "kv_cache_dtype": cfg.kv_cache_dtype,
            "kv_cache_bytes": int(budget), "num_pages": kv_pages_for_budget(model, cfg, budget),
            "page_size": cfg.page_size, "max_num_seqs": cfg.max_num_seqs, "max_model_len": cfg.model_len(model)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="jaxserve plan", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_plan_arguments(ap)
    return run_plan(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
