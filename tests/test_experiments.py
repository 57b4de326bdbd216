"""Tests for npp_jax.experiments.digits_npp_vs_ntp: cost axes, event reading, verdicts, the CLI."""
import json
import math
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from naming import raises_naming
from npp_jax import config_lib, flops
from npp_jax.experiments import digits_npp_vs_ntp as exp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_parse_overrides_reads_literals_and_names_a_bad_flag():
  assert exp.parse_overrides(["model.dim=256", "optim.lr=2e-3", "sample.vq_checkpoint=abc"],
                             "set") == {"model.dim": 256, "optim.lr": 2e-3,
                                        "sample.vq_checkpoint": "abc"}
  with pytest.raises(ValueError, match="--npp_set"):
    exp.parse_overrides(["npp.segment_factor"], "npp_set")


def test_run_config_sets_budget_evals_and_overrides():
  npp = exp.run_config("npp", 6, evals_per_run=4, overrides={"npp.segment_factor": 0.25})
  ntp = exp.run_config("ntp", 6, evals_per_run=4)
  spe = config_lib.steps_per_epoch(npp, exp._num_train_records())
  assert (npp.npp.epochs, npp.npp.num_levels, npp.npp.segment_factor) == (6, 2, 0.25)
  assert (ntp.npp.epochs, ntp.npp.num_levels) == (6, 1)
  assert npp.eval_every_steps == ntp.eval_every_steps == 6 * spe // 4
  with pytest.raises(ValueError, match="config.model.no_such_key"):
    exp.run_config("npp", 6, evals_per_run=4, overrides={"model.no_such_key": 1})
  with pytest.raises(ValueError, match="method"):
    exp.run_config("vae", 6, evals_per_run=4)


@pytest.mark.parametrize("epochs", [2, 5, 8])
def test_cumulative_flops_follow_the_schedule(epochs):
  npp = exp.run_config("npp", epochs, evals_per_run=2)
  ntp = exp.run_config("ntp", epochs, evals_per_run=2)
  cfg = config_lib.model_config(npp)
  sched = config_lib.schedule(npp, exp._num_train_records())
  boundary, total = sched.segments[0].end, sched.total_steps
  per_image = {p: npp.global_batch_size * flops.train_flops_per_image(cfg, p) for p in (1, 2)}
  steps = [0, 1, boundary, boundary + 1, total]
  got = exp.cumulative_flops(npp, steps)
  want = [0, per_image[2], boundary * per_image[2], boundary * per_image[2] + per_image[1],
          boundary * per_image[2] + (total - boundary) * per_image[1]]
  np.testing.assert_allclose(got, want, rtol=1e-12)
  assert np.all(np.diff(got) > 0)
  assert exp.cumulative_flops(ntp, [total]) == [total * per_image[1]]


def test_read_scalar_from_the_metric_writer(tmp_path):
  from clu import metric_writers
  writer = metric_writers.create_default_writer(str(tmp_path), asynchronous=False)
  writer.write_scalars(5, {"eval_loss": 1.5, "loss": 9.0})
  writer.write_scalars(10, {"eval_loss": 1.25})
  writer.write_scalars(10, {"eval_loss": 1.0})  # the final evaluation at a logged step.
  writer.flush()
  points = exp.read_scalar(tmp_path, "eval_loss")
  assert [(s, v) for s, _, v in points] == [(5, 1.5), (10, 1.0)]
  assert all(math.isfinite(t) and t > 0 for _, t, _ in points)
  with pytest.raises(FileNotFoundError, match="events.out.tfevents"):
    exp.read_scalar(tmp_path / "empty", "eval_loss")


def _result(losses, flops_, agreement, samples=300):
  return {"eval_loss": losses, "final_eval_loss": losses[-1], "flops": flops_,
          "sample_agreement": agreement, "samples": samples, "train_wall_s": flops_[-1] / 1e9,
          "run_cpu_s": 1.0}


def test_compare_verdicts_and_cost_to_reach():
  results = {
      "npp": {4: _result([2.0, 1.2], [1e9, 6e9], 0.50), 8: _result([1.5, 0.9], [2e9, 12e9], 0.80)},
      "ntp": {4: _result([1.8, 1.0], [3e9, 10e9], 0.60), 8: _result([1.4, 0.905], [5e9, 20e9], 0.82)},
  }
  rows = {r["epochs"]: r for r in exp.compare(results)}
  assert rows[4]["npp_as_good"] is False and rows[4]["claim_holds"] is False
  assert rows[8]["npp_as_good"] is True and rows[8]["claim_holds"] is True  # 12/20 = 0.6
  assert rows[8]["flops_ratio"] == pytest.approx(0.6)
  # NTP-4's loss 1.0 is first reached by NPP-8's last point (12e9 FLOPs) -> 1.2x NTP-4's cost.
  assert rows[4]["npp_flops_to_reach_ntp_loss"] == pytest.approx(1.2)
  assert rows[8]["npp_flops_to_reach_ntp_loss"] == pytest.approx(0.6)
  results["npp"][8]["sample_agreement"] = 0.60  # far below NTP's 0.82 on 300 samples each.
  assert exp.compare(results)[1]["npp_as_good"] is False
  assert "| 8 |" in exp.table_markdown(exp.compare(results))


def test_finished_runs_are_reused_only_for_the_same_config(tmp_path):
  from etils import epath
  a = exp.run_config("npp", 4, evals_per_run=2)
  b = exp.run_config("npp", 4, evals_per_run=2, overrides={"model.dim": 64})
  run_dir = epath.Path(tmp_path) / "npp_e4"
  run_dir.mkdir()
  stored = {"config": {k: v for k, v in exp._as_json(a).items() if k != "sample"},
            "sampling": exp._sampling(a, 30), "final_eval_loss": 1.0}
  (run_dir / "result.json").write_text(json.dumps(stored))
  assert exp.train_run(a, run_dir, 30) == stored  # reused: nothing trained or rescored.
  with raises_naming(ValueError, run_dir, "['model']"):  # the differing config section
    exp.train_run(b, run_dir, 30)
  unfinished = epath.Path(tmp_path) / "ntp_e4"
  unfinished.mkdir()
  (unfinished / "config.json").write_text("{}")
  with raises_naming(ValueError, unfinished, "result.json"):
    exp.train_run(exp.run_config("ntp", 4, evals_per_run=2), unfinished, 30)


def test_budgets_below_two_epochs_are_refused(tmp_path):
  with pytest.raises(ValueError, match="--budgets"):
    exp.run([1, 4], tmp_path)


def test_default_budgets_end_at_the_demo_and_ntp_is_its_baseline():
  from configs import digits as digits_config
  npp, ntp = digits_config.get_config(), digits_config.get_config("ntp")
  budgets = [int(b) for b in exp._BUDGETS.default]
  assert budgets == sorted(budgets) and budgets[0] >= 2 and budgets[-1] == npp.npp.epochs
  # The baseline trains the same model, batch, optimizer and epochs, at full length only.
  assert (npp.npp.num_levels, ntp.npp.num_levels) == (2, 1)
  ntp.npp.num_levels = 2
  assert ntp.to_json_best_effort() == npp.to_json_best_effort()


def _finite(x):
  return x is None or (isinstance(x, bool)) or math.isfinite(x)


@pytest.mark.slow
def test_quick_experiment_writes_plot_table_and_json(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "npp_jax.experiments.digits_npp_vs_ntp", "--quick",
                         f"--out={tmp_path}"], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with Image.open(tmp_path / "npp_vs_ntp.png") as im:
    assert im.format == "PNG" and min(im.size) > 300
  table = (tmp_path / "npp_vs_ntp.md").read_text()
  assert "| 2 |" in table and "| 4 |" in table
  report = json.loads((tmp_path / "npp_vs_ntp.json").read_text())
  assert [r["epochs"] for r in report["rows"]] == [2, 4]
  for row in report["rows"]:
    for key in ("npp_eval_loss", "ntp_eval_loss", "npp_agreement", "ntp_agreement",
                "npp_train_wall_s", "ntp_train_wall_s", "npp_flops", "ntp_flops", "flops_ratio",
                "wall_ratio", "npp_as_good", "claim_holds", "npp_flops_to_reach_ntp_loss"):
      assert key in row and _finite(row[key]), key
    assert 0 <= row["npp_agreement"] <= 1 and 0.5 < row["flops_ratio"] < 0.65
  for method in ("npp", "ntp"):
    for epochs, run in report["runs"][method].items():
      assert len(run["eval_loss"]) == len(run["steps"]) == len(run["wall_s"]) == len(run["flops"])
      assert len(run["steps"]) >= 2, (method, epochs)
      assert np.all(np.isfinite(run["eval_loss"])) and np.all(np.diff(run["wall_s"]) > 0)
      assert (tmp_path / "runs" / f"{method}_e{epochs}" / "agreement_samples.png").exists()
  # A second invocation reuses the finished runs: nothing is trained again.
  again = subprocess.run([sys.executable, "-m", "npp_jax.experiments.digits_npp_vs_ntp", "--quick",
                          f"--out={tmp_path}"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert json.loads((tmp_path / "npp_vs_ntp.json").read_text())["rows"] == report["rows"]
