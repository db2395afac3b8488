"""Smoke test of scripts/benchmark.py: runs, and reports every field.

No timing assertions: the machine may be shared and slow.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "scripts" / "benchmark.py"

POSITIVE = ("s_per_round", "updates_per_s", "compile_s", "peak_rss_mb",
            "matmul_peak_gflops", "flops_per_round", "flop_bound_s",
            "ratio_to_flop_bound", "speedup_vs_loop", "loop_s_per_round")


@pytest.mark.slow
def test_quick_json_reports_every_workload_and_field():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, str(SCRIPT), "--quick", "--json", "--quiet"],
      capture_output=True, text=True, timeout=900, check=False, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [l for l in proc.stdout.splitlines() if l.strip()]
  results = [json.loads(l) for l in lines]
  assert [r["workload"] for r in results] == ["A", "B", "C"]
  for r in results:
    assert r["quick"] is True
    for field in POSITIVE:
      assert r[field] > 0, (r["workload"], field, r[field])
    assert r["round_extra_mb"] >= 0
    assert r["best_shape"] in r["shapes"]
    assert "loop" in r["shapes"]
    for name, shape in r["shapes"].items():
      assert "error" not in shape, (r["workload"], name, shape.get("error"))
      for field in ("s_per_round", "updates_per_s", "compile_s",
                    "peak_rss_mb", "matmul_peak_gflops",
                    "ratio_to_flop_bound", "speedup_vs_loop"):
        assert shape[field] > 0, (r["workload"], name, field)
      assert shape["params_finite"]
  # The dense workloads run the factored round.
  assert "factored" in results[0]["shapes"]
  assert "factored" in results[2]["shapes"]
