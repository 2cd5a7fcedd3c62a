"""The CLI's parallelism flags (`--mesh`, multi-host start-up), shared by generate / chat / serve / batch."""

from __future__ import annotations

import argparse


def add_parallel_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("parallelism (README: Running on many devices)")
    g.add_argument("--mesh", default=None, metavar="data=D,stage=P,model=T",
                   help="device mesh over jax.devices(): data-parallel replicas x pipeline stages x tensor "
                        "parallel (missing axes are 1; 'auto' picks one for the devices at hand)")
    g.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                   help="multi-host: jax.distributed coordinator (or JAXSERVE_COORDINATOR_ADDRESS)")
    g.add_argument("--num-processes", type=int, default=None, help="multi-host: process count")
    g.add_argument("--process-id", type=int, default=None, help="multi-host: this process's index")
    g.add_argument("--distributed", action="store_true",
                   help="multi-host with auto-detected settings (Cloud TPU VM slice, SLURM, Open MPI)")


def parallel_kwargs(args) -> dict:
    """LLM keyword arguments from the flags; initialises jax.distributed first when asked to."""
    from jaxserve.parallel.distributed import initialize
    from jaxserve.parallel.mesh import parse_mesh_spec

    mesh = getattr(args, "mesh", None)
    if mesh is not None and mesh.strip().lower() != "auto":
        parse_mesh_spec(mesh)  # a bad string fails here, before any weights load
    initialize(getattr(args, "coordinator_address", None), getattr(args, "num_processes", None),
               getattr(args, "process_id", None), auto=getattr(args, "distributed", False),
               recoverable=getattr(args, "recoverable", False))
    return {} if mesh is None else {"mesh": mesh}
