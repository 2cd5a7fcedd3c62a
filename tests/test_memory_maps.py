"""The process's table of memory mappings stays bounded (the one-process test-run crash, issue 15).

Each live XLA:CPU executable keeps its JIT code in anonymous mappings of its own, and JAX's caches keep every
program a process compiled alive. At vm.max_map_count (65,530 by default) LLVM's allocation fails ("LLVM
compilation error: Cannot allocate memory") and XLA segfaults in the C++ unwinder while raising that error.
tests/conftest.py therefore clears JAX's caches after each test module; a server must compile a fixed set.
"""

import os

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import pallas as pl

from jaxserve import SamplingParams
from pallas_kernels.testing import tpu_interpret

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="counts /proc/self/maps (Linux)")


def _maps() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


def _kernel(x_ref, o_ref):
    o_ref[...] = jnp.tanh(x_ref[...]) + 1.0


def _interpreted_program(rows: int):
    x = jnp.ones((rows, 128), jnp.float32)
    f = pl.pallas_call(_kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), interpret=tpu_interpret())
    jax.block_until_ready(f(x))


def test_clear_caches_releases_compiled_programs():
    """What the conftest fixture relies on: compiled programs hold mappings until JAX's caches drop them."""
    _interpreted_program(4)   # one-time set-up (libraries, the interpreter's own helpers) is not counted
    jax.clear_caches()
    before = _maps()
    for i in range(8):
        _interpreted_program(8 * (i + 1))   # 8 shapes: 8 distinct programs
    grown = _maps() - before
    assert grown >= 8, f"expected each compiled program to hold mappings; grew by {grown}"
    jax.clear_caches()
    assert _maps() - before < grown / 4, f"clear_caches kept {_maps() - before} of {grown} mappings"


def test_serving_does_not_grow_memory_maps(tiny_llama):
    """A long-running engine compiles its programs once: varied requests add no mappings."""
    def serve(k):
        prompts = [[5 + i] * (1 + 7 * i + k) for i in range(5)]
        sps = [SamplingParams(temperature=0, max_tokens=3 + k, ignore_eos=True),
               SamplingParams(temperature=0.8, top_k=5, top_p=0.9, seed=k, max_tokens=2, logprobs=3),
               SamplingParams(n=2, temperature=1.0, seed=k, max_tokens=4, repetition_penalty=1.2),
               SamplingParams(min_p=0.1, presence_penalty=0.5, max_tokens=5, ignore_eos=True),
               SamplingParams(temperature=0, max_tokens=1)]
        tiny_llama.generate(prompts, sps)

    serve(0)   # warm: host-side allocations settle
    before = _maps()
    for k in range(1, 4):
        serve(k)
    assert _maps() - before < 16, f"serving grew the mapping table from {before} to {_maps()}"
