"""Where one engine replica's arrays live on its (stage, model) mesh, and the jit shardings of its step programs.

`ModelRunner(..., placement=Placement(...))` is the only hook: without a placement the runner keeps its
single-device path untouched. With one:

* params become global `jax.Array`s laid out by `rules.param_specs` (built shard by shard from the host copy
  with `jax.make_array_from_callback`, or restored by orbax straight into these shardings);
* the KV cache is created already sharded (`kv_spec`), never materialised on one device;
* every step program is `jax.jit(step, in_shardings=..., out_shardings=...)`: params and KV in their layout,
  step inputs replicated, sampled tokens replicated (every process can read them), the KV cache donated;
* step inputs are placed as replicated global arrays (on a multi-host run every process passes the same
  host batch: the schedulers are deterministic and see the same requests).
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxserve.config import ModelConfig
from jaxserve.models.kv_cache import Bf16KV, Int8KV
from jaxserve.models.quantized import is_quantized
from jaxserve.parallel import rules

log = logging.getLogger("jaxserve")


class Placement:
    """Shardings of one replica. `mesh`: a Mesh with axes ("stage", "model")."""

    def __init__(self, model_cfg: ModelConfig, mesh):
        self.cfg = model_cfg
        self.mesh = mesh
        self.t = int(mesh.shape["model"])
        self.p = int(mesh.shape.get("stage", 1))
        self.stage_axis = "stage" if self.p > 1 else None
        self.replicated = NamedSharding(mesh, P())
        self.kv_sharding = NamedSharding(mesh, rules.kv_spec(model_cfg, self.t, self.stage_axis))
        self.forward = None  # None: models.transformer.forward_step; the pipeline sets its own
        if self.p > 1:
            from jaxserve.parallel.pipeline import make_pipeline_forward

            self.forward = make_pipeline_forward(model_cfg, mesh)
        log.info("jaxserve mesh %s: %s", dict(mesh.shape), rules.describe(model_cfg, self.t))

    # ------------------------------------------------------------------ params and KV
    def param_shardings(self, params) -> dict:
        return rules.shardings(self.mesh, rules.param_specs(self.cfg, params, self.t, self.stage_axis))

    def abstract_params(self, shapes: dict, dtype) -> dict:
        """ShapeDtypeStructs carrying the target shardings (for orbax restore): `shapes` is a tree of shapes."""
        dummy = jax.tree.map(lambda s: np.empty((0,) * len(s)), shapes, is_leaf=lambda x: isinstance(x, tuple))
        sh = self.param_shardings(dummy)
        return jax.tree.map(lambda s, d: jax.ShapeDtypeStruct(s, dtype, sharding=d), shapes, sh,
                            is_leaf=lambda x: isinstance(x, tuple))

    def place_params(self, params, dtype) -> dict:
        """Host (numpy) or global params -> global arrays in this placement's layout, in `dtype` (floats)."""
        shard = self.param_shardings(params)

        def put(a, s, dtype=dtype):
            if isinstance(a, jax.Array) and a.sharding == s and a.dtype == dtype:
                return a  # already placed (orbax restore)
            if isinstance(a, jax.Array) and not a.is_fully_addressable:
                return jax.jit(lambda x: x.astype(dtype), out_shardings=s)(a)
            host = np.asarray(a)
            dt = dtype if np.issubdtype(host.dtype, np.floating) else host.dtype
            # Each device receives only its slice of the host array.
            return jax.make_array_from_callback(host.shape, s, lambda idx: np.asarray(host[idx], dtype=dt))

        def put_leaf(a, s):
            if not is_quantized(a):
                return put(a, s)
            # Quantized weights keep their own dtypes (int8 / packed uint8 values, f32 scales) as on one device,
            # and drop the CPU column-chunk loop: a lax.map over sharded columns would gather them; the plain
            # dequantize-and-dot partitions like a float matmul.
            return dataclasses.replace(a, w_q=put(a.w_q, s.w_q, a.w_q.dtype),
                                       scales=put(a.scales, s.scales, a.scales.dtype), chunk=None)

        return jax.tree.map(put_leaf, params, shard, is_leaf=is_quantized)

    def init_kv(self, num_pages: int, page_size: int, dtype) -> dict:
        """The KV cache created already sharded. int8: an `Int8KV` (values + per token-and-head scales, the
        scales laid out like the values without their last axis); bfloat16 on CPU: a `Bf16KV` (see there)."""
        c = self.cfg
        shape = (c.num_layers, num_pages * page_size, c.num_kv_heads, c.head_dim)
        if jnp.dtype(dtype) == jnp.int8:
            s_sh = NamedSharding(self.mesh, P(*tuple(self.kv_sharding.spec)[:-1]))
            make = jax.jit(lambda: Int8KV.zeros(shape), out_shardings=Int8KV(self.kv_sharding, s_sh))
        elif Bf16KV.used_for(dtype):
            make = jax.jit(lambda: Bf16KV.zeros(shape), out_shardings=Bf16KV(self.kv_sharding))
        else:
            make = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=self.kv_sharding)
        return {"k": make(), "v": make()}

    # ------------------------------------------------------------------ programs
    def jit(self, step_fn, params, kv):
        """The runner's step under jit with the shardings its placed params and KV cache have (KV donated)."""
        p_sh = jax.tree.map(lambda a: a.sharding, params)
        kv_sh = jax.tree.map(lambda a: a.sharding, kv)
        return jax.jit(step_fn, donate_argnums=(1,), in_shardings=(p_sh, kv_sh, self.replicated, self.replicated),
                       out_shardings=(self.replicated, kv_sh))

    def put_inputs(self, tree):
        """Host step inputs -> replicated global arrays (identical on every process)."""
        def put(x):
            x = np.asarray(x)
            return jax.make_array_from_callback(x.shape, self.replicated, lambda idx: x[idx])

        return jax.tree.map(put, tree)


def step_hlo(runner, bucket) -> str:
    """Optimized (post-SPMD-partitioning) HLO text of one bucket's compiled program (tests, debugging)."""
    prog = runner._programs[bucket]
    return prog.as_text()


MATMUL_WEIGHTS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


def full_matrix_shapes(params) -> set:
    """Shapes of every whole weight matrix (embedding, LM head, one layer's projection, or a whole stacked
    projection): an all-gather producing one of them means a device materialised a whole weight."""
    shapes = set()
    def arrays(a):  # a float weight, or a quantized one as its logical shape and its packed value array
        return [a.shape, a.w_q.shape] if is_quantized(a) else [a.shape]

    for k in ("embed", "lm_head"):
        if k in params:
            for s in arrays(params[k]):
                shapes.add(tuple(s))
                shapes.add(tuple(s)[::-1])
    for k in MATMUL_WEIGHTS:
        a = params["layers"].get(k)
        if a is not None:
            for s in arrays(a):
                shapes.add(tuple(s))
                shapes.add(tuple(s)[1:])
    return shapes
