"""Weight-only quantization: making int8 / int4 weights (models/quantized.py's formats) from float ones.

`quantize_int8` / `quantize_int4` quantize one stacked weight by `pallas_kernels/reference.py`'s formulas;
`quantize_params` every linear layer of a params pytree (and, when asked, the embedding / tied LM head);
`ensure_quantized` applies `EngineConfig.quantization`. Calibrated (GPTQ) weights come from
jaxserve/weights/calibrate.py; quantized checkpoints are saved and restored by jaxserve/weights/checkpoint.py.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.errors import InvalidConfigError
from jaxserve.models.quantized import (CHUNK_COLS, DEFAULT_GROUP_SIZE, Int4Weight, Int8Weight, check_group_size,
                                       is_quantized)

SCHEMES = ("int8", "int4", "gptq")  # EngineConfig.quantization (AWQ is not implemented)
# Linear layers of params["layers"] (every matmul weight; norms and biases stay float).
LINEAR_KEYS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


def _ref():
    # The formats' definition; imported lazily so that importing the weights or the engine never imports
    # Pallas on CPU.
    from pallas_kernels import reference

    return reference


def _over_leading(fn, w):
    """Apply fn to each [K, N] matrix of w [..., K, N] (stacked layers)."""
    for _ in range(w.ndim - 2):
        fn = jax.vmap(fn)
    return fn(w)


def quantize_int8(w, chunk: Optional[int] = CHUNK_COLS) -> Int8Weight:
    """float [..., K, N] -> Int8Weight: pallas_kernels.reference.quantize_int8 (scale = absmax / 127 per output
    column, round to nearest) on each matrix."""
    w_q, scales = _over_leading(_ref().quantize_int8, jnp.asarray(w, jnp.float32))
    return Int8Weight(np.asarray(w_q), np.asarray(scales), chunk)


def quantize_int4(w, group_size: int = DEFAULT_GROUP_SIZE, chunk: Optional[int] = CHUNK_COLS) -> Int4Weight:
    """float [..., K, N] -> Int4Weight: pallas_kernels.reference.quantize_int4 (naive round to nearest, scale =
    absmax / 7 per group of `group_size` rows and column) on each matrix."""
    k = np.shape(w)[-2]
    check_group_size(group_size, k)
    fn = lambda m: _ref().quantize_int4(m, int(group_size))  # noqa: E731
    w_q, scales = _over_leading(fn, jnp.asarray(w, jnp.float32))
    return Int4Weight(np.asarray(w_q), np.asarray(scales), int(group_size), chunk)


def _map_layers(fn, params, keys):
    layers = dict(params["layers"])
    for k in keys:
        if k in layers:
            layers[k] = fn(k, layers[k])
    return {**params, "layers": layers}


def quantize_params(params: dict, scheme: str, group_size: int = DEFAULT_GROUP_SIZE, quantize_embed: bool = False,
                    int4_override: Optional[dict] = None) -> dict:
    """Quantize every linear layer of `params` with `scheme` ("int8" | "int4"); norms and biases stay float.

    `quantize_embed` also quantizes the embedding / LM head (tied: one [D, V] table; untied: lm_head [D, V];
    the untied input embedding then stays float). `int4_override` maps a layer key to a ready Int4Weight
    (calibrated weights from jaxserve.weights.calibrate).
    """
    if scheme not in ("int8", "int4"):
        raise InvalidConfigError(f"quantize_params takes 'int8' or 'int4' (calibrated schemes: calibrate.py), "
                                 f"got {scheme!r}")
    if any(is_quantized(v) for v in params["layers"].values()):
        raise InvalidConfigError("params are already quantized")
    if "experts_gate" in params["layers"]:
        raise InvalidConfigError("mixture-of-experts weights (experts_gate / experts_up / experts_down) have no "
                                 "quantized form yet; serve the model unquantized")

    def q(name, w):
        if int4_override and name in int4_override:
            return int4_override[name]
        if scheme == "int8":
            return quantize_int8(w)
        check_group_size(group_size, np.shape(w)[-2], name)
        return quantize_int4(w, group_size)

    out = _map_layers(q, params, LINEAR_KEYS)
    if quantize_embed:
        if "lm_head" in params:
            out["lm_head"] = q("lm_head", params["lm_head"])
        else:
            out["embed"] = q("embed", np.asarray(params["embed"], np.float32).T)
    return out


def resident_nbytes(params) -> int:
    """Bytes of the device buffers actually held by `params` (jax arrays: their on-device buffers)."""
    total = 0
    for a in jax.tree_util.tree_leaves(params):
        if isinstance(a, jax.Array):
            total += sum(s.data.nbytes for s in a.addressable_shards)
        else:
            total += np.asarray(a).nbytes
    return int(total)


def describe(params) -> dict:
    """{"scheme", "group_size", "embed"} of a params pytree (None scheme when nothing is quantized)."""
    leaves = [v for v in params["layers"].values() if is_quantized(v)]
    head = params.get("lm_head", params.get("embed"))
    if not leaves:
        return {"scheme": None, "group_size": None, "embed": False}
    w = leaves[0]
    return {"scheme": "int8" if w.bits == 8 else "int4", "group_size": w.group_size, "embed": is_quantized(head)}


def to_device(params, dtype):
    """jnp arrays; float leaves cast to `dtype`, quantized leaves kept as they are (int values, f32 scales)."""
    def conv(a):
        if is_quantized(a):
            return jax.tree.map(jnp.asarray, a)
        arr = np.asarray(a) if not isinstance(a, jax.Array) else a
        return jnp.asarray(arr, dtype=dtype if jnp.issubdtype(arr.dtype, jnp.floating) else None)

    return jax.tree.map(conv, params, is_leaf=is_quantized)


def ensure_quantized(params, engine_cfg):
    """Apply `EngineConfig.quantization` ("int8" | "int4" round-to-nearest) to float params; params that are
    already quantized (a converted quantized checkpoint, or GPTQ from calibrate.py) must match it."""
    scheme = getattr(engine_cfg, "quantization", None)
    if scheme is None:
        return params
    if scheme not in SCHEMES:
        raise InvalidConfigError(f"unknown quantization {scheme!r}: use None, 'int8', 'int4' or 'gptq'")
    have = describe(params)["scheme"]
    if have is not None:
        want = "int8" if scheme == "int8" else "int4"
        if have != want:
            raise InvalidConfigError(f"the weights are already quantized as {have}; they cannot be served as "
                                     f"{scheme!r} (load the float checkpoint, or drop quantization=)")
        return params
    if scheme == "gptq":
        raise InvalidConfigError("quantization='gptq' needs calibration: use LLM(..., quantization='gptq') or "
                                 "`jaxserve convert --quant gptq`, not a bare engine")
    return quantize_params(params, scheme, engine_cfg.quant_group_size, engine_cfg.quantize_embed)
