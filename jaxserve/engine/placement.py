"""Where one engine replica's arrays live: a ("stage", "model") mesh, the shardings of params, KV cache and step
inputs, and the jit of its step programs.

Every `ModelRunner` has a `Placement`; one device is the 1 x 1 mesh (`Placement()`), so the runner has a single
path. This base class keeps every array whole on each device of its mesh; `jaxserve.parallel.placement.
ShardedPlacement` splits them by the partition rules (parallel/rules.py) and pipelines the layers over "stage".

* params become global `jax.Array`s in `param_specs`' layout, built from the host copy shard by shard
  (`jax.make_array_from_callback`: each device receives only its slice), or restored straight into these
  shardings (parallel/checkpoint.py);
* the KV cache (`models.transformer.init_kv_cache`) is created already in its layout, never on one device first;
* every step program is `jax.jit(step, in_shardings=..., out_shardings=...)`: params and KV in their layout,
  step inputs and sampled tokens replicated (every process can read them), the KV cache donated;
* step inputs are replicated (on a multi-host run, global arrays from every process's copy of the same host
  batch: the schedulers are deterministic and see the same requests).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxserve.models.kv_cache import init_kv_cache
from jaxserve.models.quantized import is_quantized
from jaxserve.models.transformer import forward_step, pack_bf16_layers

AXES = ("stage", "model")  # a replica's mesh axes (parallel/mesh.py adds "data" in front, one replica per index)


def device_mesh(device=None):
    """The 1 x 1 ("stage", "model") mesh of one device (default: this process's first, `jax.local_devices()[0]`)."""
    from jax.sharding import AxisType

    device = jax.local_devices()[0] if device is None else device
    return jax.sharding.Mesh(np.array([[device]]), AXES, axis_types=(AxisType.Auto,) * 2)


class Placement:
    """Shardings of one replica on `mesh` (axes ("stage", "model"); default: one device), every array replicated.

    Subclasses say how arrays are split (`param_specs`, `kv_spec`), which forward runs the layers (`forward`) and
    which heads the attention kernels split (`heads_split`)."""

    def __init__(self, mesh=None):
        self.mesh = device_mesh() if mesh is None else mesh
        self.t = int(self.mesh.shape.get("model", 1))
        self.p = int(self.mesh.shape.get("stage", 1))
        self.replicated = NamedSharding(self.mesh, P())
        self.kv_sharding = NamedSharding(self.mesh, self.kv_spec())
        self.forward = forward_step  # models.transformer.forward_step's signature; the pipeline sets its own
        # A pipeline's decode call with stages on different steps' groups (parallel/pipeline.py
        # make_rotation_forward); None: no stages to rotate through.
        self.rotation = None
        self.stage_sharding = NamedSharding(self.mesh, P("stage"))  # (the pipeline's carry between calls)
        # (query heads, KV heads) split over "model" by the attention kernels' shard_map (pallas_kernels/engine.py)
        self.heads_split = (False, False)

    @property
    def kernel_mesh(self):
        """The mesh the Pallas kernels run under `shard_map` on; None on one device (nothing to partition: a
        kernel's custom call runs there as it is)."""
        return self.mesh if self.mesh.size > 1 else None

    # ------------------------------------------------------------------ layouts (overridden by ShardedPlacement)
    def param_specs(self, params) -> dict:
        """A PartitionSpec per array of `params` (quantized weights: one per array inside them)."""
        return jax.tree.map(lambda a: P(), params)

    def kv_spec(self) -> P:
        """The PartitionSpec of a KV cache array [L, slots, Hkv, hd] (per-token scales take its first three)."""
        return P()

    def pipeline_ticks(self, rows: int) -> tuple:
        """(stage-ticks with a micro-batch, all stage-ticks) of one step over `rows` rows: (0, 0) without stages
        (a pipeline's placement counts its GPipe schedule)."""
        return 0, 0

    # ------------------------------------------------------------------ params and KV
    def param_shardings(self, params) -> dict:
        return jax.tree.map(lambda s: NamedSharding(self.mesh, s), self.param_specs(params),
                            is_leaf=lambda x: isinstance(x, P))

    def abstract_params(self, shapes: dict, dtype) -> dict:
        """ShapeDtypeStructs carrying the target shardings (for orbax restore): `shapes` is a tree of shapes."""
        dummy = jax.tree.map(lambda s: np.empty((0,) * len(s)), shapes, is_leaf=lambda x: isinstance(x, tuple))
        sh = self.param_shardings(dummy)
        return jax.tree.map(lambda s, d: jax.ShapeDtypeStruct(s, dtype, sharding=d), shapes, sh,
                            is_leaf=lambda x: isinstance(x, tuple))

    def place_params(self, params, dtype) -> dict:
        """Host (numpy) or global params -> global arrays in this placement's layout; float leaves cast to `dtype`,
        quantized weights (models/quantized.py) kept in their own dtypes (int values, f32 scales). On one device
        of XLA:CPU the bf16 layer weights are then held as their bits (`pack_bf16_layers`); a mesh's programs keep
        them bf16 (tests/mesh_export.py exports those programs for TPU / GPU)."""
        shard = self.param_shardings(params)
        one_device = self.mesh.size == 1

        def put(a, s, dtype=dtype):
            if isinstance(a, jax.Array):  # on devices already: orbax restore, random_weights="device", a runner's
                dt = dtype if jnp.issubdtype(a.dtype, jnp.floating) else a.dtype
                if a.sharding == s and a.dtype == dt:
                    return a
                if not a.is_fully_addressable:
                    return jax.jit(lambda x: x.astype(dt), out_shardings=s)(a)
                return jax.device_put(a.astype(dt), s)
            host = np.asarray(a)
            dt = dtype if jnp.issubdtype(host.dtype, jnp.floating) else host.dtype  # (numpy's misses bfloat16)
            # Each device receives only its slice of the host array.
            return jax.make_array_from_callback(host.shape, s, lambda idx: np.asarray(host[idx], dtype=dt))

        def put_leaf(a, s):
            if not is_quantized(a):
                return put(a, s)
            # Across devices the CPU column-chunk loop goes (chunk=None): a loop over sharded columns would gather
            # them, while the plain dequantize-and-dot partitions like a float matmul.
            return dataclasses.replace(a, w_q=put(a.w_q, s.w_q, a.w_q.dtype),
                                       scales=put(a.scales, s.scales, a.scales.dtype),
                                       chunk=a.chunk if one_device else None)

        placed = jax.tree.map(put_leaf, params, shard, is_leaf=is_quantized)
        return pack_bf16_layers(placed) if one_device else placed

    def init_kv(self, model_cfg, num_pages: int, page_size: int, dtype, rows=None) -> dict:
        """`models.transformer.init_kv_cache` created in this placement's layout: values as `kv_spec`, an Int8KV's
        per token-and-head scales as its first three axes. `rows`: as init_kv_cache (a grouped KVLayout)."""
        make = lambda: init_kv_cache(model_cfg, num_pages, page_size, dtype, rows)  # noqa: E731
        spec = tuple(self.kv_spec()) + (None,) * 4
        sh = jax.tree.map(lambda a: NamedSharding(self.mesh, P(*spec[:a.ndim])), jax.eval_shape(make))
        return jax.jit(make, out_shardings=sh)()

    # ------------------------------------------------------------------ programs
    def jit(self, step_fn, params, kv, sampling: bool = True):
        """The runner's step under jit with the shardings its placed params and KV cache have (KV donated):
        `step_fn(params, kv, inputs, sampling)`, or `step_fn(params, kv, inputs)` with `sampling=False` (a step
        whose logits the runner's separate sampler program samples)."""
        p_sh = jax.tree.map(lambda a: a.sharding, params)
        kv_sh = jax.tree.map(lambda a: a.sharding, kv)
        rest = (self.replicated, self.replicated) if sampling else (self.replicated,)
        return jax.jit(step_fn, donate_argnums=(1,), in_shardings=(p_sh, kv_sh) + rest,
                       out_shardings=(self.replicated, kv_sh))

    def put_inputs(self, tree):
        """Host step inputs as the step programs take them. In one process the host arrays themselves: the jit
        places them replicated, as its in_shardings say, faster than building global arrays here. Across
        processes, replicated global arrays built from each process's copy (identical on every process)."""
        if not self.mesh.is_multi_process:
            return tree

        def put(x):
            x = np.asarray(x)
            return jax.make_array_from_callback(x.shape, self.replicated, lambda idx: x[idx])

        return jax.tree.map(put, tree)
