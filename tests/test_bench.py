"""`python -m npp_jax.bench` runs on the smoke config and emits every documented JSON field.

No timing is asserted: only that the figures exist, are consistent and have the right types.
"""
import json
import subprocess
import sys

import pytest

from train_helpers import ROOT, main_env

TRAIN_FIELDS = {"patch_size": int, "batch_size": int, "ms_per_step": float, "images_per_s": float,
                "tokens_per_s": float, "gflops_xla": float, "gflops_analytic": float,
                "peak_memory_bytes": int, "compile_s": float, "achieved_gflops": float,
                "fraction_of_peak": float}
SAMPLE_FIELDS = {"batch_size": int, "cfg_scale": float, "tokens_per_s": float,
                 "images_per_s": float, "ms_per_forward": float}
SJD_FIELDS = {"window": int, "forward_passes_per_image": float, "forward_passes_per_batch": int,
              "accepted_per_step": float, "speedup_vs_ar": float}


@pytest.mark.slow  # ~30 s: two train-step compiles, a sampler compile and the matmul probe.
def test_bench_cli_on_the_smoke_config():
  proc = subprocess.run(
      [sys.executable, "-m", "npp_jax.bench", f"--config={ROOT}/configs/smoke.py", "--json",
       "--patch_sizes=1,2", "--sample_batch_sizes=2", "--cfg_scale=2.0", "--sjd_windows=3"],
      cwd=ROOT, env=main_env(1), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  assert len(lines) == 1, proc.stdout
  out = json.loads(lines[0])
  assert isinstance(out["device"], str) and out["device"].startswith("cpu")
  assert out["matmul_peak_gflops"] > 0
  assert [r["patch_size"] for r in out["train"]] == [1, 2]
  for row in out["train"]:
    for key, kind in TRAIN_FIELDS.items():
      assert isinstance(row[key], kind) and row[key] > 0, (key, row)
    assert row["batch_size"] == 8  # the smoke config's global batch.
    assert row["images_per_s"] == pytest.approx(8e3 / row["ms_per_step"])
    assert row["tokens_per_s"] == pytest.approx(row["images_per_s"] * 256)
    assert row["fraction_of_peak"] == pytest.approx(
        row["achieved_gflops"] / out["matmul_peak_gflops"])
  p1, p2 = out["train"]
  # 4x the positions; attention grows with their square.
  assert 4 <= p1["gflops_analytic"] / p2["gflops_analytic"] <= 16
  ar, sjd = out["sample"]
  assert (ar["method"], sjd["method"]) == ("ar", "sjd")
  for sample in (ar, sjd):
    for key, kind in SAMPLE_FIELDS.items():
      assert isinstance(sample[key], kind) and sample[key] > 0, (key, sample)
    assert sample["batch_size"] == 2 and sample["cfg_scale"] == 2.0
    assert sample["tokens_per_s"] == pytest.approx(sample["images_per_s"] * 256)
  assert isinstance(ar["speedup_vs_recompute"], float) and ar["speedup_vs_recompute"] > 0
  for key, kind in SJD_FIELDS.items():
    assert isinstance(sjd[key], kind) and sjd[key] > 0, (key, sjd)
  assert sjd["window"] == 3
  # A random model's zero output layer gives uniform logits: every draft is accepted.
  assert sjd["forward_passes_per_image"] == sjd["forward_passes_per_batch"] == 64
  assert sjd["accepted_per_step"] == pytest.approx(4.0)
  assert out["schedule_cost"]["analytic"] == pytest.approx(0.625)
  assert 0 < out["schedule_cost"]["measured"] < 1
  assert out["data_samples_per_s"] > 0
  assert "| patch | batch |" in proc.stdout  # the markdown table.
