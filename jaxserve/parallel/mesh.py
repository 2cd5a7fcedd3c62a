"""Meshes from a spec: `{"data": d, "stage": p, "model": t}` or the CLI string `data=1,stage=2,model=4`.

Axes (always in this order, so a mesh's device layout is predictable):

    data    independent engine replicas (one scheduler each, a router in front: parallel/engine.py)
    stage   pipeline stages; layers split across them (parallel/pipeline.py)
    model   tensor parallelism inside a layer (parallel/rules.py: column/row-parallel matmuls, vocab-parallel
            embedding and LM head, KV cache over KV heads)

The mesh uses the first `data x stage x model` devices of `jax.devices()` (global devices on a multi-host
run), laid out by `jax.make_mesh` (which follows the TPU / GPU interconnect topology), `model` fastest-varying
so tensor-parallel collectives stay between neighbouring chips.
"""

from __future__ import annotations

import math
from typing import Mapping, Union

from jaxserve.errors import InvalidConfigError

AXES = ("data", "stage", "model")

MeshSpec = Union[None, str, Mapping[str, int]]


def parse_mesh_spec(spec: MeshSpec) -> dict:
    """`"data=1,stage=2,model=4"` or a dict -> `{"data": 1, "stage": 2, "model": 4}` (missing axes are 1).

    One axis may be -1 ("the remaining devices"), resolved by `resolve_mesh_spec`.
    """
    if spec is None:
        return {a: 1 for a in AXES}
    if isinstance(spec, str):
        items = {}
        text = spec.strip()
        if not text:
            raise InvalidConfigError("empty --mesh: pass e.g. --mesh data=1,stage=1,model=2")
        for part in text.split(","):
            key, sep, val = part.partition("=")
            key = key.strip()
            if not sep or not key:
                raise InvalidConfigError(f"bad mesh spec {spec!r}: expected comma-separated axis=size pairs, "
                                         f"e.g. data=1,stage=2,model=4 (axes: {', '.join(AXES)})")
            if key in items:
                raise InvalidConfigError(f"bad mesh spec {spec!r}: axis {key!r} given twice")
            try:
                items[key] = int(val.strip())
            except ValueError:
                raise InvalidConfigError(f"bad mesh spec {spec!r}: size of {key!r} must be an integer, got {val!r}") from None
        spec = items
    if not isinstance(spec, Mapping):
        raise InvalidConfigError(f"mesh must be a dict like {{'model': 2}} or a string like 'model=2', got {spec!r}")
    unknown = set(spec) - set(AXES)
    if unknown:
        raise InvalidConfigError(f"unknown mesh axis {sorted(unknown)}: the axes are {', '.join(AXES)}")
    out = {a: 1 for a in AXES}
    for a, v in spec.items():
        if isinstance(v, bool) or not isinstance(v, int) or (v < 1 and v != -1):
            raise InvalidConfigError(f"mesh axis {a!r} must be a positive integer (or -1 for the rest), got {v!r}")
        out[a] = v
    if sum(v == -1 for v in out.values()) > 1:
        raise InvalidConfigError("at most one mesh axis may be -1")
    return out


def resolve_mesh_spec(spec: MeshSpec, num_devices: int) -> dict:
    """Parse and check against the device count: the mesh size must divide it (the first devices are used)."""
    s = parse_mesh_spec(spec)
    known = math.prod(v for v in s.values() if v != -1)
    for a, v in s.items():
        if v == -1:
            if num_devices % known:
                raise InvalidConfigError(f"mesh {s}: the other axes ({known} devices) do not divide the "
                                         f"{num_devices} available devices")
            s[a] = num_devices // known
    size = math.prod(s.values())
    if size > num_devices or num_devices % size:
        raise InvalidConfigError(
            f"mesh {format_mesh_spec(s)} needs {size} devices, which does not divide the {num_devices} available "
            f"(jax.devices()); pick sizes whose product divides {num_devices}")
    return s


def format_mesh_spec(spec: Mapping[str, int]) -> str:
    return ",".join(f"{a}={spec.get(a, 1)}" for a in AXES)


def check_model_fits_mesh(model_cfg, spec: Mapping[str, int]) -> None:
    """Raise InvalidConfigError when `model` / `stage` cannot split this model.

    `model` must divide the query heads, or be a multiple of them with the vocabulary and FFN still divisible
    (then attention is replicated and only the MLP and the vocabulary are split: see rules.py). `stage` must
    divide the number of layers.
    """
    t, p = spec.get("model", 1), spec.get("stage", 1)
    if getattr(model_cfg, "is_moe", False) and (t > 1 or p > 1):
        raise InvalidConfigError(
            f"{model_cfg.name} is a mixture-of-experts model: model={t} / stage={p} meshes are not supported yet "
            f"(no expert-parallel or expert-sharded rules); run it on one device per replica (model=1, stage=1)")
    H, V, F = model_cfg.num_heads, model_cfg.vocab_size, model_cfg.intermediate_size
    if t > 1 and H % t and (t % H or V % t or F % t):
        raise InvalidConfigError(
            f"model={t} does not divide {model_cfg.name}'s {H} query heads (and cannot fall back to splitting "
            f"only the vocabulary {V} and FFN {F}); use a model axis that divides {H}")
    if p > 1 and model_cfg.num_layers % p:
        raise InvalidConfigError(f"stage={p} does not divide {model_cfg.name}'s {model_cfg.num_layers} layers")


def make_mesh(spec: Mapping[str, int], devices=None):
    """A `jax.sharding.Mesh` with axes (data, stage, model) over the first devices (Auto axis types: GSPMD)."""
    import jax
    from jax.sharding import AxisType

    devices = list(jax.devices() if devices is None else devices)
    spec = resolve_mesh_spec(spec, len(devices))
    shape = tuple(spec[a] for a in AXES)
    n = math.prod(shape)
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices[:n])


def replica_meshes(mesh) -> list:
    """One (stage, model) sub-mesh per `data` index: the devices of one engine replica."""
    import jax
    from jax.sharding import AxisType

    names = ("stage", "model")
    return [jax.sharding.Mesh(mesh.devices[i], names, axis_types=(AxisType.Auto,) * 2)
            for i in range(mesh.devices.shape[0])]


def default_mesh_spec(model_cfg, devices=None, local_device_count=None) -> dict:
    """A sensible mesh for the devices at hand.

    One host (a TPU VM's 4-8 chips, a GPU box's NVLink domain): tensor parallelism as wide as the model allows
    (the largest divisor of the device count that divides the query heads), every other device a data-parallel
    replica. Several hosts (processes): every process runs every step (SPMD), so a `data` axis across hosts
    would make each host run every replica (see `replica_meshes`); instead tensor parallelism spans the hosts
    (a TPU slice's ICI links all its chips) and what the heads leave over becomes pipeline stages, which must
    divide the layers (else an InvalidConfigError asks for an explicit mesh).
    One CPU device (this machine) gives the single-device mesh.
    """
    import jax

    n = len(jax.devices()) if devices is None else (devices if isinstance(devices, int) else len(devices))
    local = local_device_count or jax.local_device_count()
    local = math.gcd(local, n)
    if n > local:
        t = max(d for d in range(1, n + 1) if n % d == 0 and model_cfg.num_heads % d == 0)
        s = n // t
        if model_cfg.num_layers % s:
            raise InvalidConfigError(
                f"mesh='auto' over {n} devices on {n // local} hosts: {model_cfg.num_heads} query heads allow "
                f"model={t}, and the remaining {s} pipeline stages do not divide {model_cfg.num_layers} layers; "
                "pass an explicit mesh (e.g. --mesh stage=S,model=T with S*T devices)")
        return {"data": 1, "stage": s, "model": t}
    t = max(d for d in range(1, local + 1) if local % d == 0 and model_cfg.num_heads % d == 0)
    return {"data": n // t, "stage": 1, "model": t}
