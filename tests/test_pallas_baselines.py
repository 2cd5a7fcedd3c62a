"""JAX's own Pallas kernels as baselines: on the features they share with ours, they agree with reference.py.

- jax.experimental.pallas.ops.tpu.paged_attention: head-major cache [Hkv, N, ps, hd] (ours is transposed to
  it), no sliding window, no fused write; it rounds K/V to bf16 inside the kernel, hence the bf16 tolerance.
- jax.experimental.pallas.ops.gpu.paged_attention: same layout, decode only, no window / fused write.
- jax.experimental.pallas.ops.tpu.ragged_paged_attention: not testable here: in JAX 0.10.2 its lowering asks for
  the TPU generation (fails on CPU) and neither interpreter runs it (ref reshape transforms). It is a bench
  baseline on real TPUs (scripts/bench_kernels.py).
"""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import decode_gpu, decode_tpu, reference as ref
from pallas_kernels.testing import GPU_INTERPRET, decode_case, max_err, tpu_interpret


@pytest.fixture(scope="module")
def case():
    return decode_case(np.random.RandomState(0), [5, 17, 32, 1], num_heads=8, num_kv_heads=2, head_dim=128,
                       page_size=8, pages_per_seq=4, poison=False)


def _head_major(pages):
    return jnp.transpose(pages, (2, 0, 1, 3))


def test_jax_tpu_paged_attention_baseline(case):
    from jax.experimental.pallas import tpu as pltpu
    from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention
    c = case
    want = ref.paged_attention_decode(c["q"], c["k_pages"], c["v_pages"], c["block_tables"], c["kv_lens"],
                                      scale=1.0, softcap=20.0)
    with pltpu.force_tpu_interpret_mode():
        theirs = paged_attention(c["q"], _head_major(c["k_pages"]), _head_major(c["v_pages"]), c["kv_lens"],
                                 c["block_tables"], pages_per_compute_block=2, attn_logits_soft_cap=20.0)
    ours = decode_tpu.paged_attention_decode(c["q"], c["k_pages"], c["v_pages"], c["block_tables"], c["kv_lens"],
                                             scale=1.0, softcap=20.0, pages_per_block=2, interpret=tpu_interpret())
    assert max_err(theirs, want) < 5e-2          # bf16 K/V inside JAX's kernel
    assert max_err(ours, want) < 2e-5


def test_jax_gpu_paged_attention_baseline(case):
    from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention
    c = case
    want = ref.paged_attention_decode(c["q"], c["k_pages"], c["v_pages"], c["block_tables"], c["kv_lens"],
                                      scale=1.0, softcap=20.0)
    theirs = paged_attention(c["q"], _head_major(c["k_pages"]), _head_major(c["v_pages"]), c["block_tables"],
                             c["kv_lens"], k_splits=2, pages_per_compute_block=2, interpret=True,
                             attn_logits_soft_cap=20.0)
    ours = decode_gpu.paged_attention_decode(c["q"], c["k_pages"], c["v_pages"], c["block_tables"], c["kv_lens"],
                                             scale=1.0, softcap=20.0, pages_per_block=2, num_splits=2,
                                             interpret=GPU_INTERPRET)
    assert max_err(theirs, want) < 2e-5
    assert max_err(ours, want) < 2e-5
