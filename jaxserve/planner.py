"""Capacity planner: weight bytes, KV bytes per token and per sequence, and the maximum concurrent sequences
of a model on a device. The engine sizes its own page budget with this same code.

    jaxserve plan --model llama2-7b --device a100-80gb --dtype float16 --context 4096

Memory model (per device, tensor-parallel over `num_devices` splits weights and KV evenly):
    usable   = device memory - reserve_fraction x device memory   (activations, fragmentation, runtime)
    kv_budget = usable - weights
    max concurrent sequences = floor(kv_budget / (kv_bytes_per_token x context))
KV bytes per token come from `ModelConfig.kv_bytes_per_token` (2 x n_kv_heads x head_dim x bytes x layers),
the one formula in the code base.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Optional

from jaxserve.config import DTYPE_BYTES, ModelConfig, load_model_config
from jaxserve.errors import InvalidConfigError

GiB = 1 << 30
GB = 10**9


def _host_memory_bytes() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass(frozen=True)
class Device:
    name: str
    memory_bytes: int
    bandwidth_bytes_per_s: float  # peak memory bandwidth


# HBM sizes as published: TPUs in GiB; NVIDIA's "40 GB / 80 GB" parts are 40 / 80 GiB of HBM
# (nvidia-smi reports 40,960 / 81,920 MiB); the H200 is 141 GB (decimal, as NVIDIA specifies it).
DEVICES = {
    "tpu-v4": Device("TPU v4", 32 * GiB, 1200e9),
    "tpu-v5e": Device("TPU v5e", 16 * GiB, 819e9),
    "tpu-v5p": Device("TPU v5p", 95 * GiB, 2765e9),
    "tpu-v6e": Device("TPU v6e", 32 * GiB, 1640e9),
    "a100-40gb": Device("A100 40GB", 40 * GiB, 1555e9),
    "a100-80gb": Device("A100 80GB", 80 * GiB, 2039e9),
    "h100": Device("H100 SXM 80GB", 80 * GiB, 3350e9),
    "h200": Device("H200 141GB", 141 * GB, 4800e9),
    "cpu": Device("CPU (this machine)", _host_memory_bytes(), 26e9),  # numpy copy bandwidth measured here
}
ALIASES = {"v4": "tpu-v4", "v5e": "tpu-v5e", "v5p": "tpu-v5p", "v6e": "tpu-v6e", "a100": "a100-80gb",
           "a100-40": "a100-40gb", "a100-80": "a100-80gb", "h100-80gb": "h100", "h200-141gb": "h200"}

# int4 weights: 0.5 byte per value plus one float32 scale per group of 128 values along the input dim.
INT4_GROUP = 128
# The CPU engine's default KV budget: large enough for dozens of long sequences of Gemma 3 270M
# (2 GiB / 36 KiB per f32 token = 58k tokens), small enough to leave the machine usable.
CPU_DEFAULT_KV_BUDGET = 2 * GiB


def get_device(name: str) -> Device:
    key = name.lower()
    key = ALIASES.get(key, key)
    if key not in DEVICES:
        raise InvalidConfigError(f"unknown device {name!r}; known devices: {', '.join(DEVICES)}")
    return DEVICES[key]


def weight_bytes(model: ModelConfig, dtype: str) -> float:
    n = model.num_params()
    if dtype == "int4":
        return n * 0.5 + (n / INT4_GROUP) * 4
    if dtype == "int8":
        return n * 1 + (n / model.hidden_size) * 4  # one f32 scale per output channel (approx.)
    return n * DTYPE_BYTES[dtype]


@dataclass
class Plan:
    model: str
    device: str
    num_devices: int
    dtype: str
    kv_dtype: str
    context: int
    weight_bytes: float  # per device
    kv_bytes_per_token: float  # per device
    kv_bytes_per_sequence: float
    device_bytes: int
    reserve_bytes: float
    kv_budget_bytes: float
    max_concurrent_sequences: int
    max_tokens_in_cache: int
    decode_step_seconds_batch1: float
    decode_step_seconds_max_batch: float
    fits: bool
    message: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def plan(model: ModelConfig, device: str, dtype: str = "bfloat16", kv_dtype: Optional[str] = None,
         context: Optional[int] = None, num_devices: int = 1, reserve_fraction: float = 0.1) -> Plan:
    """Capacity of `model` on `num_devices` x `device` (weights and KV split evenly across them)."""
    dev = get_device(device)
    kv_dtype = kv_dtype or (dtype if dtype in ("float32", "bfloat16", "float16") else "bfloat16")
    if dtype not in DTYPE_BYTES:
        raise InvalidConfigError(f"unknown dtype {dtype!r}; one of {', '.join(DTYPE_BYTES)}")
    if kv_dtype not in ("float32", "bfloat16", "float16", "int8"):
        raise InvalidConfigError(f"unknown kv dtype {kv_dtype!r}")
    if num_devices < 1:
        raise InvalidConfigError("num_devices must be >= 1")
    context = context or model.max_position_embeddings
    w = weight_bytes(model, dtype) / num_devices
    kv_tok = model.kv_bytes_per_token(kv_dtype) / num_devices
    kv_seq = kv_tok * context
    reserve = reserve_fraction * dev.memory_bytes
    budget = max(0.0, dev.memory_bytes - reserve - w)
    max_seqs = int(budget // kv_seq) if kv_seq else 0
    fits = dev.memory_bytes - reserve >= w
    msg = ""
    if not fits:
        need = math.ceil(weight_bytes(model, dtype) / (dev.memory_bytes - reserve))
        msg = (f"weights ({w / GiB:.1f} GiB per device) do not fit {dev.name} ({dev.memory_bytes / GiB:.0f} GiB "
               f"less a {reserve_fraction:.0%} reserve); use at least {need} devices (--num-devices) or int8/int4")
    elif max_seqs == 0:
        msg = f"weights fit, but not one {context}-token sequence of KV cache; shorten --context or add devices"
    bw = dev.bandwidth_bytes_per_s
    return Plan(model=model.name, device=dev.name, num_devices=num_devices, dtype=dtype, kv_dtype=kv_dtype,
                context=context, weight_bytes=w, kv_bytes_per_token=kv_tok, kv_bytes_per_sequence=kv_seq,
                device_bytes=dev.memory_bytes, reserve_bytes=reserve, kv_budget_bytes=budget,
                max_concurrent_sequences=max_seqs, max_tokens_in_cache=int(budget // kv_tok) if kv_tok else 0,
                decode_step_seconds_batch1=(w + kv_seq) / bw,
                decode_step_seconds_max_batch=(w + kv_seq * max(max_seqs, 1)) / bw, fits=fits, message=msg)


def _fmt_bytes(b: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if b >= size:
            return f"{b / size:,.2f} {unit}"
    return f"{b:,.0f} B"


def format_plan(p: Plan) -> str:
    rows = [
        ("model", p.model), ("device", f"{p.device} x {p.num_devices}"),
        ("weights dtype / KV dtype", f"{p.dtype} / {p.kv_dtype}"),
        ("weight bytes (per device)", _fmt_bytes(p.weight_bytes)),
        ("KV bytes per token", f"{_fmt_bytes(p.kv_bytes_per_token)} ({p.kv_bytes_per_token:,.0f} B)"),
        (f"KV bytes per sequence ({p.context:,} tokens)", _fmt_bytes(p.kv_bytes_per_sequence)),
        ("device memory", _fmt_bytes(p.device_bytes)),
        ("reserve (activations, fragmentation)", _fmt_bytes(p.reserve_bytes)),
        ("KV budget", _fmt_bytes(p.kv_budget_bytes)),
        ("max concurrent sequences", f"{p.max_concurrent_sequences:,}"),
        ("max tokens in cache", f"{p.max_tokens_in_cache:,}"),
        ("decode step roofline, batch 1", f"{p.decode_step_seconds_batch1 * 1e3:.2f} ms"),
        ("decode step roofline, max batch", f"{p.decode_step_seconds_max_batch * 1e3:.2f} ms"),
    ]
    width = max(len(k) for k, _ in rows)
    out = "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
    return out + (f"\n\n{p.message}" if p.message else "")


def kv_pages_for_budget(model: ModelConfig, engine_cfg, budget_bytes: float) -> int:
    """Pages (including the null page) that `budget_bytes` of KV cache buys."""
    per_page = model.kv_bytes_per_token(engine_cfg.kv_cache_dtype) * engine_cfg.page_size
    return max(2, int(budget_bytes // per_page) + 1)


def default_kv_budget_bytes(model: ModelConfig, engine_cfg, device: Optional[str] = None) -> int:
    """KV budget when the user gives none: on CPU min(2 GiB, what the planner leaves); on an accelerator
    what the planner leaves after the weights and the reserve."""
    import jax

    platform = jax.devices()[0].platform
    if device is None and platform != "cpu":
        kind = jax.devices()[0].device_kind.lower()
        device = next((k for k in DEVICES if k.replace("tpu-", "") in kind.replace(" ", "")), None)
    p = plan(model, device or "cpu", dtype=engine_cfg.dtype, kv_dtype=engine_cfg.kv_cache_dtype,
             context=engine_cfg.model_len(model))
    if (device or "cpu") == "cpu":
        return int(min(CPU_DEFAULT_KV_BUDGET, p.kv_budget_bytes))
    return int(p.kv_budget_bytes)


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="preset name or path to a HF config.json")
    p.add_argument("--device", required=True, help=f"one of {', '.join(DEVICES)}")
    p.add_argument("--dtype", default="bfloat16", help="weight dtype: float32, bfloat16, float16, int8, int4")
    p.add_argument("--kv-dtype", default=None, help="KV cache dtype (default: the weight dtype; int8 allowed)")
    p.add_argument("--context", type=int, default=None, help="tokens per sequence (default: model context)")
    p.add_argument("--num-devices", type=int, default=1)
    p.add_argument("--reserve", type=float, default=0.1, help="fraction of memory kept for activations etc.")
    p.add_argument("--json", action="store_true")


def run_plan(args) -> int:
    try:
        model = load_model_config(args.model)
        p = plan(model, args.device, dtype=args.dtype, kv_dtype=args.kv_dtype, context=args.context,
                 num_devices=args.num_devices, reserve_fraction=args.reserve)
    except Exception as e:  # jaxserve errors and unreadable config files alike: a message, no traceback
        print(f"jaxserve plan: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(p.to_dict(), indent=1) if args.json else format_plan(p))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="jaxserve plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_plan_arguments(ap)
    return run_plan(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
