"""dispatch.py (engine entry points), the reference semantics, and the test harness's poisoning guarantees."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from pallas_kernels import dispatch, reference as ref
from pallas_kernels.testing import decode_case, max_err, ragged_case, tpu_interpret


def test_attention_backend():
    assert dispatch.attention_backend("auto") == "xla"            # this machine: CPU
    assert dispatch.attention_backend("auto", platform="tpu") == "pallas"
    assert dispatch.attention_backend("auto", platform="cuda") == "pallas"
    assert dispatch.attention_backend("auto", platform="gpu") == "pallas"
    assert dispatch.attention_backend("xla", platform="tpu") == "xla"
    assert dispatch.attention_backend("pallas") == "pallas"
    with pytest.raises(ValueError):
        dispatch.attention_backend("triton")


def test_auto_falls_back_to_xla_for_shapes_triton_cannot_take():
    c = decode_case(np.random.RandomState(0), [3, 9], num_heads=2, num_kv_heads=1, head_dim=48, page_size=6,
                    pages_per_seq=2)
    args = (c["q"], c["k_pages"], c["v_pages"], c["block_tables"], c["kv_lens"])
    want = ref.paged_attention_decode(*args, scale=0.3)
    got = dispatch.decode_attention(*args, scale=0.3, impl="auto", platform="cuda")
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(ValueError, match="power-of-two"):
        dispatch.decode_attention(*args, scale=0.3, impl="pallas", platform="cuda")


@pytest.mark.parametrize("kernel", [None, "gpu"])
def test_dispatch_pallas_on_cpu_runs_interpreted(kernel):
    c = ragged_case(np.random.RandomState(1), [4, 1], [3, 8], num_heads=4, num_kv_heads=2, head_dim=32,
                    page_size=8, window=5, pages_per_seq=2)
    args = (c["q"], c["k_pages"], c["v_pages"], c["block_tables"], c["cu_q_lens"], c["kv_lens"], c["num_seqs"])
    want = dispatch.prefill_attention(*args, scale=0.2, window=5, impl="xla")
    got = dispatch.prefill_attention(*args, scale=0.2, window=5, impl="pallas", kernel=kernel)
    assert max_err(got, want) < 2e-5
    dec = decode_case(np.random.RandomState(2), [3, 9], num_heads=4, num_kv_heads=2, head_dim=32, page_size=8,
                      pages_per_seq=2)
    dargs = (dec["q"], dec["k_new"], dec["v_new"], dec["k_pages"], dec["v_pages"], dec["slots"],
             dec["block_tables"], dec["kv_lens"])
    want = dispatch.decode_attention_fused(*dargs, scale=0.2, impl="xla")
    got = dispatch.decode_attention_fused(*[a.copy() for a in dargs], scale=0.2, impl="pallas", kernel=kernel)
    assert max_err(got[0], want[0]) < 2e-5
    x = jnp.asarray(np.random.RandomState(3).standard_normal((5, 256)), jnp.float32)
    wq, s = ref.quantize_int4(jnp.asarray(np.random.RandomState(4).standard_normal((256, 128)), jnp.float32), 64)
    want = dispatch.matmul(x, wq, s, bits=4, group_size=64, impl="xla")
    got = dispatch.matmul(x, wq, s, bits=4, group_size=64, impl="pallas", kernel=kernel)
    assert max_err(got, want) / float(jnp.abs(want).max()) < 1e-5


def _naive_decode(q, kp, vp, tables, lens, scale, window, softcap):
    """Loop-per-row numpy attention: the independent statement of the engine's decode semantics."""
    q, kp, vp, tables, lens = map(np.asarray, (q, kp, vp, tables, lens))
    r, hq, hd = q.shape
    ps, hkv = kp.shape[1], kp.shape[2]
    out = np.zeros((r, hq, hd), np.float64)
    for i in range(r):
        n = int(lens[i])
        for h in range(hq):
            kvh = h // (hq // hkv)
            logits, vals = [], []
            for pos in range(n):
                if window and (n - 1) - pos >= window:
                    continue
                page, off = tables[i, pos // ps], pos % ps
                s = scale * float(np.dot(q[i, h], kp[page, off, kvh]))
                logits.append(softcap * np.tanh(s / softcap) if softcap else s)
                vals.append(vp[page, off, kvh])
            if logits:
                w = np.exp(np.array(logits) - max(logits))
                out[i, h] = (w[:, None] * np.array(vals)).sum(0) / w.sum()
    return out


@pytest.mark.parametrize("window,softcap", [(0, None), (3, None), (100, 2.0)])
def test_reference_decode_matches_naive_semantics(window, softcap):
    c = decode_case(np.random.RandomState(5), [0, 1, 7, 16], num_heads=6, num_kv_heads=2, head_dim=8, page_size=4,
                    window=window, pages_per_seq=4, poison=False)
    args = (c["q"], c["k_pages"], c["v_pages"], c["block_tables"], c["kv_lens"])
    got = ref.paged_attention_decode(*args, scale=0.5, window=window, softcap=softcap)
    np.testing.assert_allclose(np.asarray(got), _naive_decode(*args, 0.5, window, softcap), atol=1e-5)


def test_reference_prefill_rows_equal_decode():
    """Token i of a segment = a decode query at position kv_len - q_len + i over the same pages."""
    c = ragged_case(np.random.RandomState(6), [3, 2], [5, 0], num_heads=4, num_kv_heads=1, head_dim=8,
                    page_size=4, window=4, pages_per_seq=3, poison=False)
    out = ref.ragged_prefill_attention(c["q"], c["k_pages"], c["v_pages"], c["block_tables"], c["cu_q_lens"],
                                       c["kv_lens"], c["num_seqs"], scale=0.5, window=4)
    cu, kv = np.asarray(c["cu_q_lens"]), np.asarray(c["kv_lens"])
    for r in range(2):
        for i in range(cu[r + 1] - cu[r]):
            t = cu[r] + i
            pos_len = kv[r] - (cu[r + 1] - cu[r]) + i + 1
            d = ref.paged_attention_decode(c["q"][t:t + 1], c["k_pages"], c["v_pages"], c["block_tables"][r:r + 1],
                                           jnp.array([pos_len], jnp.int32), scale=0.5, window=4)
            np.testing.assert_allclose(np.asarray(out[t]), np.asarray(d[0]), atol=1e-6)
    assert np.all(np.asarray(out[cu[-1]:]) == 0)


def test_window_is_a_runtime_value_under_scan():
    """One scanned layer body serves sliding and global layers: the window is a traced per-layer scalar."""
    c = decode_case(np.random.RandomState(7), [2, 11, 16], num_heads=4, num_kv_heads=1, head_dim=32, page_size=4,
                    pages_per_seq=4, poison=False)
    args = (c["q"], c["k_pages"], c["v_pages"], c["block_tables"], c["kv_lens"])
    windows = jnp.array([3, 0, 5], jnp.int32)

    @jax.jit
    def run(windows):
        def layer(carry, w):
            return carry, dispatch.decode_attention(*args, scale=0.2, window=w, impl="pallas")
        return jax.lax.scan(layer, 0, windows)[1]

    got = run(windows)
    for i, w in enumerate([3, 0, 5]):
        want = ref.paged_attention_decode(*args, scale=0.2, window=w)
        assert max_err(got[i], want) < 2e-5


def _half_writer(x_ref, o_ref):
    o_ref[: o_ref.shape[0] // 2] = x_ref[: o_ref.shape[0] // 2]


@pytest.mark.parametrize("interpret", ["tpu", "generic"])
def test_interpreters_poison_unwritten_outputs(interpret):
    """The guarantee the kernel tests rely on: an output element a kernel never writes reads back as NaN."""
    x = jnp.ones((16, 128), jnp.float32)
    it = tpu_interpret() if interpret == "tpu" else True
    out = pl.pallas_call(_half_writer, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), interpret=it)(x)
    out = np.asarray(out)
    assert np.all(out[:8] == 1.0) and np.all(np.isnan(out[8:]))
