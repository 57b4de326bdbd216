"""End-to-end training on the smoke config: segments, exact resume, topology changes, failures."""
import json
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from naming import raises_naming
from npp_jax import checkpoint as ckpt_lib
from npp_jax import data, train
from train_helpers import (ROOT, VOCAB, event_scalars, logged_losses, main_command, main_env,
                           run_losses, run_main, smoke_config)


@pytest.fixture(scope="module")
def full_run(shards, tmp_path_factory):
  """The uninterrupted 12-step run (patch 2 for steps 0-5, patch 1 for 6-11) on 8 devices,
  evaluating every 4 steps; its summary gains the logged losses and the programs it compiled."""
  workdir = tmp_path_factory.mktemp("full")
  compiled = []

  def on_compile(event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      compiled.append(kwargs.get("fun_name"))

  jax.monitoring.register_event_duration_secs_listener(on_compile)
  try:
    summary = train.train_and_evaluate(smoke_config(shards, eval_every_steps=4), str(workdir))
  finally:
    jax.monitoring.unregister_event_duration_listener(on_compile)
  return dict(summary, losses=run_losses(workdir), compiled=compiled), workdir


@pytest.mark.slow  # end-to-end training
def test_end_to_end_across_segment_boundary(full_run):
  summary, workdir = full_run
  assert jax.device_count() == 8
  assert summary["step"] == 12
  assert summary["compiled_patch_sizes"] == [1, 2]  # one compile per level, no more.
  assert sorted(summary["losses"]) == list(range(12))
  assert all(np.isfinite(v) for v in summary["losses"].values())
  assert summary["training_cost"] == pytest.approx(0.625)
  assert summary["eval_loss"] < np.log(VOCAB) - 0.5  # learnt something in 12 steps.
  assert summary["losses"][11] < summary["losses"][0] - 0.5
  ckpts = ckpt_lib.Checkpointer(workdir, keep=2)
  assert ckpts.all_steps() == [8, 12]  # saves at 4, 6 (boundary), 8, 12; keep 2.
  ckpts.close()
  cfg = json.loads((workdir / "config.json").read_text())
  assert cfg["model"]["dim"] == 64
  assert list(workdir.glob("events.out.tfevents*")), "TensorBoard events are written"


@pytest.mark.slow  # end-to-end training
def test_eval_is_compiled_once_and_throughput_is_logged(full_run):
  summary, workdir = full_run
  assert sorted(event_scalars(workdir, "eval_loss")) == [4, 8, 12]
  assert summary["compiled"].count("jit(eval_step)") == 1, summary["compiled"]
  per_chip = event_scalars(workdir, "images_per_s_per_chip")
  assert sorted(per_chip) == list(range(1, 13)) and all(v[0] > 0 for v in per_chip.values())
  assert all(0 <= v[0] <= 1 for v in event_scalars(workdir, "host_data_wait_fraction").values())
  assert not event_scalars(workdir, "mfu")  # no known peak on CPU: no made-up MFU.
  assert 0 < summary["seconds_to_first_step"]


@pytest.mark.slow  # end-to-end training
def test_exact_resume(shards, full_run, tmp_path):
  """Stop after 5 steps (mid segment), resume, stop again after the boundary, finish: every loss
  equals the uninterrupted run's bit for bit (state, data order, dropout, LR and patch size)."""
  reference = full_run[0]["losses"]
  config = smoke_config(shards)
  assert train.train_and_evaluate(config, str(tmp_path), max_steps=5)["step"] == 5
  assert train.train_and_evaluate(config, str(tmp_path), max_steps=3)["step"] == 8
  third = train.train_and_evaluate(config, str(tmp_path))
  resumed = run_losses(tmp_path)
  assert sorted(resumed) == list(range(12))
  assert resumed == reference
  assert third["eval_loss"] == full_run[0]["eval_loss"]


@pytest.mark.slow  # end-to-end training
def test_relative_workdir_saves_and_resumes(shards, full_run, tmp_path, monkeypatch):
  """orbax refuses relative paths at save time and misreads them at load time: a relative
  workdir (and params checkpoint) must train, save, resume and load like an absolute one."""
  monkeypatch.chdir(tmp_path)
  config = smoke_config(shards)
  train.train_and_evaluate(config, "rel", max_steps=4)
  second = train.train_and_evaluate(config, "rel", max_steps=2)
  assert second["workdir"] == str(tmp_path / "rel")
  assert run_losses(tmp_path / "rel") == {
      k: v for k, v in full_run[0]["losses"].items() if k < 6}
  target = ckpt_lib.restore_params(tmp_path / "rel", train_params_like(config))
  ckpt_lib.save_params("params_rel", target)
  loaded = ckpt_lib.load_params("params_rel", target)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool((np.asarray(a) == np.asarray(b)).all()),
                                   loaded, target))


def train_params_like(config):
  """Abstract params of the smoke model (shapes only)."""
  from flax import nnx

  from npp_jax import config_lib
  from npp_jax import model as model_lib
  model = nnx.eval_shape(lambda: model_lib.Transformer(config_lib.model_config(config),
                                                       rngs=nnx.Rngs(0)))
  return nnx.state(model, nnx.Param)


@pytest.mark.slow
def test_restore_8_devices_onto_1(shards, full_run, tmp_path):
  """A checkpoint written on 8 devices resumes on 1 device and continues the same run."""
  workdir = tmp_path / "w"
  train.train_and_evaluate(smoke_config(shards), str(workdir), max_steps=8)
  assert max(run_losses(workdir)) == 7
  proc = run_main(workdir, shards, devices=1)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "resumed from" in proc.stderr and "Training finished at step 12" in proc.stdout
  logged = {int(m.group(1)) - 1: float(m.group(2)) for m in re.finditer(
      r"\[(\d+)\] grad_norm=[^\n]*?\bloss=([-0-9.e]+)", proc.stderr)}
  assert sorted(logged) == [8, 9, 10, 11]
  for step, loss in logged.items():  # another device count: same math, other reduction order.
    assert loss == pytest.approx(full_run[0]["losses"][step], rel=1e-4)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(shards, tmp_path):
  config = smoke_config(shards, **{"optim.lr": 1e38, "ckpt.every_steps": 1})
  with raises_naming(train.NonFiniteLossError, "loss", "checkpoint") as err:
    train.train_and_evaluate(config, str(tmp_path))
  ckpts = ckpt_lib.Checkpointer(tmp_path, keep=2)
  assert err.value.kept_step == ckpts.latest_step() is not None
  assert ckpts.latest_step() <= err.value.step
  assert str(err.value.step) in str(err.value) and str(err.value.kept_step) in str(err.value)
  ckpts.close()


@pytest.mark.slow
def test_two_processes_then_one(shards, full_run, tmp_path):
  """Two JAX processes on 127.0.0.1 share a 2x4-device mesh, each reading its slice of every
  global batch, and checkpoint together; one process then resumes the run and finishes it."""
  import portpicker
  port = portpicker.pick_unused_port()
  workdir = tmp_path / "w"
  procs = [subprocess.Popen(
      main_command(workdir, shards, extra=["--max_steps=4", f"--coordinator_address=127.0.0.1:{port}",
                                           "--num_processes=2", f"--process_id={i}"]),
      cwd=ROOT, env=main_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert "JAX process 0 of 2; 4 local / 8 global devices" in outs[0][1]
  two = logged_losses(outs[0][1])
  assert sorted(two) == [0, 1, 2, 3]
  for step, loss in two.items():  # same global batches as the single-process run.
    assert loss == pytest.approx(full_run[0]["losses"][step], rel=1e-4)
  data_dir = workdir / "checkpoints" / "4" / "data"
  assert sorted(p.name for p in data_dir.glob("process_*")) == [
      "process_0-of-2.json", "process_1-of-2.json"]
  proc = run_main(workdir, shards, devices=8)
  assert proc.returncode == 0, proc.stderr[-3000:]
  one = logged_losses(proc.stderr)
  assert sorted(one) == list(range(4, 12))
  for step, loss in one.items():
    assert loss == pytest.approx(full_run[0]["losses"][step], rel=1e-4)


@pytest.mark.slow
def test_dry_run_gpt_b(tmp_path):
  """main.py with configs/npp_b.py builds, shards (pure FSDP over 8 devices) and compiles GPT-B
  on the CPU and trains one step; the initial loss is ln(16384) (zero output layer)."""
  rng = np.random.default_rng(0)
  shards_dir = tmp_path / "tokens"
  with data.ShardWriter(shards_dir, "train", grid_size=16, vocab_size=16384, num_classes=1000,
                        num_views=1) as w:
    for _ in range(16):
      w.write(int(rng.integers(1000)), rng.integers(0, 16384, (1, 256)))
  data.finalize(shards_dir, num_processes=1)
  proc = subprocess.run(
      [sys.executable, "-m", "npp_jax.main", f"--config={ROOT}/configs/npp_b.py",
       f"--workdir={tmp_path / 'w'}", f"--config.data.path={shards_dir}", "--max_steps=1",
       "--config.global_batch_size=8", "--config.data.num_workers=0",
       "--config.model.dtype=float32", "--config.model.scan_unroll=1"],
      cwd=ROOT, env=main_env(8), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Mesh {'data': 1, 'fsdp': 8, 'tensor': 1}" in proc.stderr
  loss = float(re.search(r"train loss ([0-9.]+)", proc.stdout).group(1))
  assert loss == pytest.approx(np.log(16384), abs=1e-3)


@pytest.mark.slow
def test_resumed_run_loads_its_steps_from_the_compilation_cache(shards, tmp_path):
  """config.compile_cache (on by default, under the workdir): the first run fills it, a restart
  loads its train step from it instead of compiling."""
  workdir = tmp_path / "w"
  overrides = {"compile_cache": "{workdir}/compile_cache", "data.eval_split": ""}
  env = main_env(8, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")  # cache even fast compiles.
  runs = [subprocess.run(
      main_command(workdir, shards, overrides=overrides, extra=[f"--max_steps={n}"]), cwd=ROOT,
      env=env, capture_output=True, text=True, timeout=600) for n in (2, 1)]
  for proc in runs:
    assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"compilation cache: {workdir / 'compile_cache'}" in runs[0].stderr
  assert list((workdir / "compile_cache").iterdir())
  hit = re.compile(r"Compiled the train step for patch size 2 in [0-9.]+s \(loaded from the "
                   r"persistent compilation cache\)")
  assert not hit.search(runs[0].stderr) and hit.search(runs[1].stderr), runs[1].stderr[-3000:]
  assert "Step 2: resumed from" in runs[1].stderr


@pytest.mark.slow
def test_builtin_digits_report_through_main(tmp_path):
  """configs/smoke.py on the built-in digits (its docstring's command, plus an eval split): the
  data set is built into the workdir and its report hook prints the baseline and the classifier's
  agreement and writes samples.png."""
  workdir = tmp_path / "w"
  proc = subprocess.run(
      [sys.executable, "-m", "npp_jax.main", f"--config={ROOT}/configs/smoke.py",
       f"--workdir={workdir}", "--config.data.builtin=digits", "--config.model.vocab_size=16",
       "--config.data.eval_split=validation", "--config.compile_cache=", "--max_steps=2"],
      cwd=ROOT, env=main_env(8), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "nats/token vs" in proc.stdout and "for the unigram baseline" in proc.stdout
  assert "a digit classifier agrees with the class on" in proc.stdout
  assert (workdir / "samples.png").exists()
  assert (workdir / "digits_tokens" / "metadata.json").exists()
