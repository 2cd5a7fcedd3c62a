"""Converted checkpoints: float32 params saved with orbax, plus config and tokenizer, for fast restarts.

Layout of a converted directory:

    jaxserve_config.json     ModelConfig.to_dict()
    params/                  orbax PyTree checkpoint of the params dict (float32 numpy, uncompressed)
    tokenizer.json           HF fast-tokenizer file (optional)
    tokenizer_meta.json      bos / eos / pad ids and chat template name (optional)
    jaxserve_quant.json      for quantized params: scheme, group size and which leaves (to_plain / from_plain)
    jaxserve_converted.json  marker, written last: {"format": 1, ...}; a directory without it is incomplete

Params are stored uncompressed: restoring 1 GB of float32 is ~2 s uncompressed versus ~7 s with orbax's
default compression on two CPU cores, and nothing is ever re-dequantized on restore.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Optional

import numpy as np

from jaxserve.config import ModelConfig
from jaxserve.errors import CheckpointError, InvalidConfigError

CONFIG_FILE = "jaxserve_config.json"
PARAMS_DIR = "params"
MARKER_FILE = "jaxserve_converted.json"
FORMAT_VERSION = 1
# Quantized params (models/quantized.py): which leaves are quantized and how, beside params/ (see to_plain).
QUANT_FILE = "jaxserve_quant.json"
QUANT_FORMAT = 1


def _checkpointer():
    import orbax.checkpoint as ocp

    # Synchronous checkpointer: save returns when the files are committed.
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False, use_zarr3=True))


def _to_numpy(tree):
    if isinstance(tree, dict):
        return {k: _to_numpy(v) for k, v in tree.items()}
    return np.asarray(tree)


def save_converted(out_dir: str, config: ModelConfig, params: dict, tokenizer_json=None,
                   source: Optional[str] = None, quant_method: Optional[str] = None) -> None:
    """Write a converted checkpoint into `out_dir` (created; existing params there are overwritten).

    Args:
        out_dir: target directory.
        config: the model's ModelConfig.
        params: the params pytree (numpy or jax arrays; saved as they are, normally float32).
        tokenizer_json: the `tokenizer.json` text, or a `jaxserve.weights.tokenizer.Tokenizer` (then its special ids
            and chat template are saved too), or None. With text only, the meta comes from `config`.
        source: free text recorded in the marker (where the weights came from).
        quant_method: for quantized params, how they were made ("rtn", "gptq"), recorded in jaxserve_quant.json.
    """
    import orbax.checkpoint as ocp

    out_dir = os.path.abspath(os.fspath(out_dir))
    try:
        os.makedirs(out_dir, exist_ok=True)
        marker = os.path.join(out_dir, MARKER_FILE)
        if os.path.exists(marker):  # being rewritten: incomplete until the new marker lands
            os.remove(marker)
        with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
            json.dump(config.to_dict(), f, indent=1)
        if tokenizer_json is not None:
            if hasattr(tokenizer_json, "save"):  # a jaxserve Tokenizer
                tokenizer_json.save(out_dir)
            else:
                with open(os.path.join(out_dir, "tokenizer.json"), "w") as f:
                    f.write(tokenizer_json)
                meta = {"bos_id": config.bos_token_id, "eos_ids": list(config.eos_token_ids),
                        "pad_id": config.pad_token_id, "chat_template": config.chat_template}
                with open(os.path.join(out_dir, "tokenizer_meta.json"), "w") as f:
                    json.dump(meta, f, indent=1)
        # Quantized leaves (models/quantized.py) are saved as {"w_q", "scales"} plus a manifest, and rebuilt as
        # they are on restore: a quantized checkpoint is never re-quantized.
        params, qmeta = to_plain(params, quant_method)
        qpath = os.path.join(out_dir, QUANT_FILE)
        if qmeta is not None:
            with open(qpath, "w") as f:
                json.dump(qmeta, f, indent=1)
        elif os.path.exists(qpath):
            os.remove(qpath)
        _checkpointer().save(os.path.join(out_dir, PARAMS_DIR), args=ocp.args.PyTreeSave(_to_numpy(params)), force=True)
        with open(marker, "w") as f:
            json.dump({"format": FORMAT_VERSION, "source": source, "created": time.time()}, f)
    except OSError as e:
        raise CheckpointError(f"{out_dir}: cannot write converted checkpoint ({e})") from None


def is_converted(path: str) -> bool:
    """True if `path` is a complete converted checkpoint directory."""
    path = os.fspath(path)
    return (
        os.path.isdir(path)
        and os.path.isfile(os.path.join(path, MARKER_FILE))
        and os.path.isfile(os.path.join(path, CONFIG_FILE))
        and os.path.isdir(os.path.join(path, PARAMS_DIR))
    )


def load_converted_config(path: str) -> ModelConfig:
    """Just the ModelConfig of a converted directory (cheap)."""
    cfg_path = os.path.join(path, CONFIG_FILE)
    try:
        with open(cfg_path) as f:
            return ModelConfig.from_dict(json.load(f))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not a converted checkpoint (no {CONFIG_FILE})") from None
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{cfg_path}: corrupt config ({e})") from None


def _numpy_restore_args(params_dir: str):
    """Restore every array as host numpy, also when it was saved sharded from a mesh of other devices
    (jaxserve/parallel/checkpoint.py); without this orbax would try to rebuild the saved device layout."""
    import jax
    import orbax.checkpoint as ocp

    meta = _checkpointer().metadata(params_dir)
    tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
    return ocp.args.PyTreeRestore(restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree))


def load_converted_params(path: str, config: Optional[ModelConfig] = None) -> dict:
    """Restore the params pytree (float32 numpy) of a converted directory.

    If `config` is given, every array's shape is checked against it.
    """
    path = os.path.abspath(os.fspath(path))
    params_dir = os.path.join(path, PARAMS_DIR)
    if not is_converted(path):
        raise CheckpointError(
            f"{path}: not a complete converted checkpoint (missing {MARKER_FILE}, {CONFIG_FILE} or {PARAMS_DIR}/)"
        )
    absl_log = logging.getLogger("absl")
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)  # orbax logs every restore at WARNING/INFO
    try:
        params = _checkpointer().restore(params_dir, args=_numpy_restore_args(params_dir))
    except Exception as e:  # orbax/tensorstore raise assorted types (ValueError, FileNotFoundError, XlaRuntimeError)
        raise CheckpointError(
            f"{params_dir}: cannot restore params, the checkpoint is corrupt or incomplete ({type(e).__name__}: {e})"
        ) from None
    finally:
        absl_log.setLevel(level)
    params = _to_numpy(params)
    params = _restore_quantized(path, params)
    if config is not None:
        _check_shapes(params_dir, config, params)
    return params


def expected_shapes(config: ModelConfig) -> dict:
    """Shapes of the params pytree for `config` (docs/architecture.md)."""
    L, D, F, V, hd = config.num_layers, config.hidden_size, config.intermediate_size, config.vocab_size, config.head_dim
    layers = {
        "attn_norm": (L, D), "mlp_norm": (L, D),
        "wq": (L, D, config.q_size), "wk": (L, D, config.kv_size), "wv": (L, D, config.kv_size),
        "wo": (L, config.q_size, D),
        "w_gate": (L, D, F), "w_up": (L, D, F), "w_down": (L, F, D),
    }
    if config.is_moe:  # models/transformer.py's moe_mlp layout
        E, Fe, Fs = config.num_experts, config.moe_intermediate_size, config.shared_expert_intermediate_size
        del layers["w_gate"], layers["w_up"], layers["w_down"]
        layers |= {"router": (L, D, E), "experts_gate": (L, E, D, Fe), "experts_up": (L, E, D, Fe),
                   "experts_down": (L, E, Fe, D)}
        if Fs:
            layers |= {"shared_w_gate": (L, D, Fs), "shared_w_up": (L, D, Fs), "shared_w_down": (L, Fs, D),
                       "shared_expert_gate": (L, D, 1)}
    if config.attention_bias:
        layers |= {"bq": (L, config.q_size), "bk": (L, config.kv_size), "bv": (L, config.kv_size)}
    if config.qk_norm:
        layers |= {"q_norm": (L, hd), "k_norm": (L, hd)}
    if config.post_norms:
        layers |= {"post_attn_norm": (L, D), "post_mlp_norm": (L, D)}
    out = {"embed": (V, D), "final_norm": (D,), "layers": layers}
    if not config.tie_word_embeddings:
        out["lm_head"] = (D, V)
    return out


def _restore_quantized(path: str, params: dict) -> dict:
    qpath = os.path.join(path, QUANT_FILE)
    if not os.path.exists(qpath):
        return params
    try:
        with open(qpath) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{qpath}: corrupt quantization manifest ({e})") from None
    return from_plain(params, meta, where=path)


def to_plain(params: dict, method: Optional[str] = None) -> tuple:
    """(params with each quantized leaf as {"w_q", "scales"} dicts of numpy, manifest dict or None) for orbax."""
    from jaxserve.models.quantized import is_quantized

    keys, groups, bits = [], set(), set()

    def conv(path, v):
        if is_quantized(v):
            keys.append(path)
            bits.add(v.bits)
            groups.add(v.group_size)
            return {"w_q": np.asarray(v.w_q), "scales": np.asarray(v.scales)}
        return v

    out = {k: ({lk: conv(f"layers/{lk}", lv) for lk, lv in v.items()} if k == "layers" else conv(k, v))
           for k, v in params.items()}
    if not keys:
        return out, None
    if len(bits) != 1 or len(groups) != 1:
        raise InvalidConfigError("mixed quantization formats in one checkpoint are not supported")
    b = bits.pop()
    meta = {"format": QUANT_FORMAT, "scheme": "int8" if b == 8 else "int4", "group_size": groups.pop(),
            "method": method or ("rtn" if b == 8 else "rtn-or-calibrated"), "keys": sorted(keys)}
    return out, meta


def from_plain(params: dict, meta: Optional[dict], where: str = "checkpoint") -> dict:
    """Inverse of `to_plain`: rebuild Int8Weight / Int4Weight leaves named in `meta` (no re-quantization)."""
    from jaxserve.models.quantized import Int4Weight, Int8Weight

    if meta is None:
        return params
    try:
        if meta.get("format") != QUANT_FORMAT or meta["scheme"] not in ("int8", "int4"):
            raise ValueError(f"unknown quantization manifest {meta!r}")
        out = {**params, "layers": dict(params["layers"])}
        for path in meta["keys"]:
            parts = path.split("/")
            holder = out["layers"] if parts[0] == "layers" else out
            d = holder[parts[-1]]
            w_q, scales = np.asarray(d["w_q"]), np.asarray(d["scales"])
            if meta["scheme"] == "int8":
                if w_q.dtype != np.int8 or scales.shape != w_q.shape[:-2] + w_q.shape[-1:]:
                    raise ValueError(f"{path}: int8 w_q {w_q.dtype}{w_q.shape} / scales {scales.shape} do not match")
                holder[parts[-1]] = Int8Weight(w_q, scales.astype(np.float32))
            else:
                g = int(meta["group_size"])
                if (w_q.dtype != np.uint8 or scales.shape[-1] != w_q.shape[-1]
                        or scales.shape[-2] * g != 2 * w_q.shape[-2]):
                    raise ValueError(f"{path}: int4 w_q {w_q.dtype}{w_q.shape} / scales {scales.shape} / group {g} "
                                     "do not match")
                holder[parts[-1]] = Int4Weight(w_q, scales.astype(np.float32), g)
        return out
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{where}: corrupt quantized weights ({e}); convert the model again") from None


def _check_shapes(where: str, config: ModelConfig, params: dict) -> None:
    want = expected_shapes(config)
    for key, shape in want.items():
        if key == "layers":
            continue
        got = getattr(params.get(key), "shape", None)
        if key == "embed" and hasattr(params.get(key), "bits"):  # quantized: stored as the LM head's [D, V]
            got = tuple(reversed(got))
        if got != shape:
            raise CheckpointError(f"{where}: param {key} has shape {got}, expected {shape} for {config.name}")
    for key, shape in want["layers"].items():
        got = getattr(params.get("layers", {}).get(key), "shape", None)
        if got != shape:
            raise CheckpointError(f"{where}: param layers/{key} has shape {got}, expected {shape} for {config.name}")


def load_converted(path: str) -> tuple:
    """`(config, params, tokenizer)` from a converted directory; tokenizer is None if none was saved."""
    from jaxserve.weights.tokenizer import Tokenizer

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"converted checkpoint directory not found: {path}")
    config = load_converted_config(path)
    params = load_converted_params(path, config)
    tokenizer = None
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        tokenizer = Tokenizer.from_dir(path, **tokenizer_defaults(config))
    return config, params, tokenizer


def tokenizer_defaults(config: ModelConfig) -> dict:
    """Tokenizer meta taken from a ModelConfig (used when no tokenizer_meta.json says otherwise)."""
    return {"bos_id": config.bos_token_id, "eos_ids": list(config.eos_token_ids), "pad_id": config.pad_token_id,
            "chat_template": config.chat_template}
