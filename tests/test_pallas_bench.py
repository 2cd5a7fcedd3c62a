"""scripts/bench_kernels.py: the README's roofline table is what the script computes, and a tiny CPU run works."""

import importlib.util
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_kernels", os.path.join(ROOT, "scripts", "bench_kernels.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_readme_roofline_table_is_the_scripts(bench):
    """Every row of `bench_kernels.py --roofline` appears verbatim in pallas_kernels/README.md (so the README's
    numbers are computed by the formulas in the script, not typed in)."""
    readme = open(os.path.join(ROOT, "pallas_kernels", "README.md")).read().splitlines()
    table = bench.roofline_table().splitlines()
    assert len(table) > 10
    missing = [row for row in table if row not in readme]
    assert not missing, "README roofline table is stale; regenerate with `bench_kernels.py --roofline`:\n" + \
        "\n".join(missing)


def test_cost_formulas_by_hand(bench):
    """A few entries worked by hand (bytes and FLOPs as in README's formulas)."""
    g = bench.MODELS["gemma3-270m"]
    c = bench.decode_cost(g, 32, 4096, "bf16", 0)
    assert c["bytes"] == 32 * 4096 * (2 * 1 * 256 * 2) + 2 * 32 * 4 * 256 * 2
    assert c["flops"] == 4 * 32 * 4 * 256 * 4096
    assert bench.decode_cost(g, 32, 4096, "int8", 512)["bytes"] == 32 * 512 * 2 * (256 + 4) + 2 * 32 * 4 * 256 * 2
    p = bench.prefill_cost(g, 2048, 0, "bf16", 0)
    assert p["flops"] == 4 * 4 * 256 * (2048 * 2049 // 2)
    assert p["bytes"] == 2048 * 1024 + 2 * 2048 * 4 * 256 * 2
    l8 = bench.MODELS["llama3-8b"]
    mm = bench.matmul_cost(1, l8["d"], l8["f"], 4, l8["group"])
    assert mm["bytes"] == 4096 * 14336 // 2 + (4096 // 128) * 14336 * 4 + 4096 * 2 + 14336 * 2
    assert bench.roofline_seconds(c, "TPU v5e") == pytest.approx(c["bytes"] / 819e9)


def test_tiny_cpu_run_writes_json(bench, tmp_path, monkeypatch):
    out = tmp_path / "kernels.json"
    monkeypatch.setattr(sys, "argv", ["bench_kernels.py", "--model", "gemma3-270m", "--batch", "2", "--context",
                                      "32", "--prefill-tokens", "16", "--repeats", "1", "--out", str(out)])
    bench.main()
    res = json.loads(out.read_text())
    assert res["platform"] == "cpu" and res["bandwidth"] > 0
    kinds = {(r["kind"], r["impl"]) for r in res["rows"]}
    for kind in ("decode attention", "prefill attention"):
        assert (kind, "xla (engine)") in kinds and (kind, "xla (reference)") in kinds
    assert ("int4 matmul", "xla (reference)") in kinds and ("int8 matmul", "xla (reference)") in kinds
    for r in res["rows"]:
        assert r["ms"] > 0 and r["bytes"] > 0 and r["gbps"] > 0
        assert r["rel_err_vs_reference"] is not None and r["rel_err_vs_reference"] < 1e-2, r   # bf16 outputs
