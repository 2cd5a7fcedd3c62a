"""Tensor, pipeline and data parallelism on `jax.sharding` meshes (README: "Running on many devices").

    mesh.py         mesh specs ("data=1,stage=2,model=4"), checks, jax.make_mesh, default meshes
    rules.py        partition rules by parameter name (column / row / vocab parallel, KV over KV heads)
    placement.py    ShardedPlacement: engine.placement.Placement split by the rules, pipelined over "stage"
    pipeline.py     layers split over "stage", GPipe micro-batches inside a step (shard_map + ppermute)
    engine.py       build_engine (LLM's one construction path, any mesh), the data-parallel front (router)
    checkpoint.py   sharded orbax save, restore straight into target shardings
    distributed.py  multi-host start-up (jax.distributed.initialize from flags / environment)
    cli.py          the --mesh / multi-host flags

A layout's tokens against the single device: `python tests/parallel_check.py` (a test harness, not library code).
"""
