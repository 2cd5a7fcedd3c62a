"""One replica's arrays split over its (stage, model) mesh: `ShardedPlacement`, the partition rules (rules.py)
and the pipeline (pipeline.py) applied to `jaxserve.engine.placement.Placement`; plus HLO helpers for tests.
"""

from __future__ import annotations

import logging

from jax.sharding import PartitionSpec as P

from jaxserve.config import ModelConfig
from jaxserve.engine.placement import Placement
from jaxserve.models.quantized import is_quantized
from jaxserve.parallel import rules
from jaxserve.parallel.pipeline import make_pipeline_forward, make_rotation_forward, num_micro_batches

log = logging.getLogger("jaxserve")


class ShardedPlacement(Placement):
    """Shardings of one replica by the partition rules. `mesh`: a Mesh with axes ("stage", "model"); with
    stage > 1 the layers run as a pipeline (parallel/pipeline.py)."""

    def __init__(self, model_cfg: ModelConfig, mesh):
        self.cfg = model_cfg
        self.stage_axis = "stage" if int(mesh.shape.get("stage", 1)) > 1 else None
        super().__init__(mesh)  # (calls kv_spec: the fields it reads are set first)
        q_ok, kv_ok = rules.attention_split(model_cfg, self.t)
        self.heads_split = (q_ok and self.t > 1, kv_ok and self.t > 1)
        if self.p > 1:
            self.forward = make_pipeline_forward(model_cfg, mesh)
            self.rotation = make_rotation_forward(model_cfg, mesh)
        log.info("jaxserve mesh %s: %s", dict(mesh.shape), rules.describe(model_cfg, self.t))

    def pipeline_ticks(self, rows: int) -> tuple:
        if self.p == 1:
            return 0, 0
        n = num_micro_batches(rows, self.p)  # GPipe: n micro-batches over n + S - 1 ticks on each of S stages
        return n * self.p, (n + self.p - 1) * self.p

    def param_specs(self, params) -> dict:
        return rules.param_specs(self.cfg, params, self.t, self.stage_axis)

    def kv_spec(self) -> P:
        return rules.kv_spec(self.cfg, self.t, self.stage_axis)


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
