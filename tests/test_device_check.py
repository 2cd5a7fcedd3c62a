"""scripts/device_check.py --smoke: the GPU/TPU check's code paths on this CPU (kernels interpreted, shrunk
presets), end to end in a subprocess: exit 0, a complete report, every check passed."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # ~4-5 minutes on 2 CPU cores (interpret-mode engine compiles dominate)
def test_device_check_smoke(tmp_path):
    env = dict(os.environ, JAXSERVE_CACHE=str(tmp_path / "cache"))  # (the XLA cache: as this process has it)
    env.pop("OUT", None)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "device_check.py"), "--smoke",
                        "--out", str(tmp_path / "out")], capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert (tmp_path / "out" / "report.md").read_text().startswith("# device check")
    assert report["passed"] is True
    for key in ("info", "sections", "checks", "perf", "hf", "wall_s", "budget_s"):
        assert key in report, key
    assert report["info"]["platform"] == "cpu" and report["info"]["bandwidth"] > 0

    sections = {s["name"]: s for s in report["sections"]}
    assert len(sections) == 5, list(sections)          # kernels, 2 engine pairs, the int8 pair, HF
    assert all(s["status"] == "ok" for s in sections.values()), sections

    checks = report["checks"]
    assert checks and all(c["passed"] for c in checks), [c for c in checks if not c["passed"]]
    kernels = [c for c in checks if c["section"] == "kernels"]
    assert len(kernels) == 15                          # every variant once, at alternating model shapes
    for c in kernels:
        assert c["max_err"] <= c["tol"]
    engine = [c["name"] for c in checks if c["section"].startswith("engine")]
    assert engine == ["smoke-gemma3-270m pallas vs xla", "smoke-llama3-8b pallas vs xla",
                      "smoke-gemma3-270m int8 matmul pallas vs int8 matmul xla"]
    for agreement in report["info"]["engine_agreement"].values():
        assert agreement["match_fraction"] == 1.0 and agreement["first_divergence"] is None

    perf = report["perf"]
    for model in ("smoke-gemma3-270m", "smoke-llama3-8b"):
        rows = [p for p in perf if p["model"] == model]
        assert any("compiled decode step alone" in p["what"] for p in rows)
        assert any(p["what"].endswith("prefill steps") for p in rows)
        assert all(p["tok_s"] > 0 for p in rows)
        assert all(p["roofline_tok_s"] > 0 for p in rows if "roofline_tok_s" in p)
    hf = report["hf"]
    assert {h["model"] for h in hf} == {"smoke-gemma3-270m", "smoke-llama3-8b"}
    assert all("error" not in h and h["tok_s"] > 0 for h in hf), hf
    # HF's models have jaxserve's shapes
    assert all(a == b for a, b in report["info"]["hf_params"].values()), report["info"]["hf_params"]
