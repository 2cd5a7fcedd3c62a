"""Sharded orbax checkpoints: save a placed (sharded) params tree, restore straight into target shardings.

The directory layout is the converted-checkpoint layout of `jaxserve.weights.checkpoint` (config, params/,
tokenizer, marker), so `jaxserve convert` output restores sharded too, and a sharded save loads anywhere.

* Save: orbax writes each array from its device shards (on a multi-host run every process writes the shards
  it holds; process 0 writes the metadata, config, tokenizer and the completion marker). Nothing is gathered.
* Restore: every array is read with `ArrayRestoreArgs(sharding=...)` for the *target* layout, so tensorstore
  reads only the slice each device owns; the mesh may differ from the one the checkpoint was saved from
  (different model / stage axis sizes, a different device count).
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Optional

import jax
import numpy as np

from jaxserve.errors import CheckpointError
from jaxserve.weights import checkpoint as ckpt


def load_config_and_tokenizer(path: str):
    """(ModelConfig, Tokenizer or None) of a converted directory, without touching its params."""
    from jaxserve.weights.tokenizer import Tokenizer

    cfg = ckpt.load_converted_config(path)
    tok = None
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        tok = Tokenizer.from_dir(path, **ckpt.tokenizer_defaults(cfg))
    return cfg, tok


def save_sharded(out_dir: str, config, params: dict, tokenizer=None, source: Optional[str] = None) -> None:
    """Write `params` (global jax Arrays, any sharding) as a converted checkpoint, shard by shard."""
    import orbax.checkpoint as ocp

    out_dir = os.path.abspath(os.fspath(out_dir))
    primary = jax.process_index() == 0
    try:
        marker = os.path.join(out_dir, ckpt.MARKER_FILE)
        if primary:
            os.makedirs(out_dir, exist_ok=True)
            if os.path.exists(marker):
                os.remove(marker)
            with open(os.path.join(out_dir, ckpt.CONFIG_FILE), "w") as f:
                json.dump(config.to_dict(), f, indent=1)
            if tokenizer is not None and hasattr(tokenizer, "save"):
                tokenizer.save(out_dir)
        ckpt._checkpointer().save(os.path.join(out_dir, ckpt.PARAMS_DIR), args=ocp.args.PyTreeSave(params),
                                  force=True)
        if primary:
            with open(marker, "w") as f:
                json.dump({"format": ckpt.FORMAT_VERSION, "source": source, "created": time.time(),
                           "saved_sharded": True}, f)
    except OSError as e:
        raise CheckpointError(f"{out_dir}: cannot write sharded checkpoint ({e})") from None


def restore_sharded(path: str, config, placement, dtype: str = "float32") -> dict:
    """Restore a converted directory's params directly into `placement`'s shardings (global jax Arrays)."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    if not ckpt.is_converted(path):
        raise CheckpointError(f"{path}: not a complete converted checkpoint (missing {ckpt.MARKER_FILE}, "
                              f"{ckpt.CONFIG_FILE} or {ckpt.PARAMS_DIR}/)")
    target = placement.abstract_params(ckpt.expected_shapes(config), np.dtype(dtype))
    restore_args = jax.tree.map(
        lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, global_shape=s.shape, dtype=s.dtype), target)
    absl_log = logging.getLogger("absl")
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)
    try:
        params = ckpt._checkpointer().restore(
            os.path.join(path, ckpt.PARAMS_DIR),
            args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args))
    except Exception as e:  # orbax/tensorstore raise assorted types
        raise CheckpointError(f"{path}: cannot restore params into the mesh ({type(e).__name__}: {e})") from None
    finally:
        absl_log.setLevel(level)
    for (kp, want), got in zip(jax.tree_util.tree_leaves_with_path(target), jax.tree.leaves(params)):
        if tuple(got.shape) != tuple(want.shape):
            raise CheckpointError(f"{path}: param {jax.tree_util.keystr(kp)} has shape {got.shape}, "
                                  f"expected {want.shape} for {config.name}")
    return params
