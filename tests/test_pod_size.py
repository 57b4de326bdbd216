"""Pod-sized meshes on fake CPU devices: the real training loop on 32 and 64 devices (sample grids,
eval, checkpoints, a profile), resumed onto 8 devices, and the sampler CLI on 64 devices.

Each run is a subprocess whose XLA_FLAGS give it the device count before JAX starts. The smoke
model and shards keep them small; the batch is one image per device. The grids sample 4 classes
on 32 or 64 batch shards: the labels are padded well past the number of classes.
"""
import dataclasses
import glob
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from npp_jax import checkpoint as ckpt_lib
from npp_jax import config_lib, sample
from test_sample import FIXTURES, _randomised, _smoke_config
from train_helpers import ROOT, committed_steps, main_env, run_main


@pytest.fixture(scope="module")
def vq_path(tmp_path_factory):
  """The small reference VQ (codebook 64, the smoke vocabulary) as a weights file."""
  path = tmp_path_factory.mktemp("vq") / "vq.npz"
  with np.load(FIXTURES / "llamagen_vq_small.npz") as z:
    np.savez(path, **{k: z[k] for k in z.files if not k.startswith("io/")})
  return str(path)


def _event_steps(workdir, tag):
  """Sorted steps of every `tag` summary (scalar or image) in the workdir's TensorBoard events."""
  from tensorboard.backend.event_processing import event_file_loader
  steps = []
  for f in glob.glob(os.path.join(str(workdir), "events.out.tfevents*")):
    for ev in event_file_loader.EventFileLoader(f).Load():
      steps.extend(ev.step for v in ev.summary.value if v.tag == tag)
  return sorted(steps)


@pytest.mark.slow
@pytest.mark.parametrize("devices", [32, 64])
def test_pod_training_then_resume_on_8_devices(shards, vq_path, tmp_path, devices):
  """Steps 0-2 (patch size 2) on a pod-sized FSDP mesh with a grid every 2 steps, eval, saves
  and a profile; then 8 devices resume at step 3 and finish the schedule (patch size 1)."""
  workdir = tmp_path / "w"
  overrides = {"global_batch_size": devices, "npp.epochs": 2, "ckpt.every_steps": 2,
               "sample_every_steps": 2, "sample.vq_checkpoint": vq_path, "eval_every_steps": 2,
               "eval_batches": 1, "profile_steps": 1}
  pod = run_main(workdir, shards, devices=devices, overrides=overrides, extra=["--max_steps=3"],
                 timeout=600)
  assert pod.returncode == 0, pod.stderr[-3000:]
  assert f"Mesh {{'data': 1, 'fsdp': {devices}, 'tensor': 1}} over {devices} devices" in pod.stderr
  assert committed_steps(workdir / "checkpoints") == [2, 3]
  assert _event_steps(workdir, "samples") == [2, 3]  # every 2 steps and at the end.
  assert _event_steps(workdir, "eval_loss") == [2, 3]
  assert glob.glob(str(workdir / "plugins" / "profile" / "*" / "*.xplane.pb")), "no trace"

  resumed = run_main(workdir, shards, devices=8, overrides=overrides, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"Step 3: resumed from {workdir / 'checkpoints' / '3'}" in resumed.stderr
  assert "Training finished at step 6" in resumed.stdout
  assert np.isfinite(float(resumed.stdout.split("train loss ")[1].split(",")[0]))
  assert _event_steps(workdir, "samples") == [2, 3, 4, 6]


@pytest.mark.slow
def test_sampler_cli_on_64_devices(vq_path, tmp_path):
  """The sampling CLI on 64 devices: 8 samples (one chunk of 64, padded) and a 4-class grid."""
  config = _smoke_config(grid_size=16)
  model = _randomised(config_lib.model_config(config, **sample.NO_DROPOUT))
  ckpt = tmp_path / "ckpt"
  ckpt_lib.save_params(ckpt, nnx.state(model), model_config=dataclasses.asdict(model.cfg))
  out = tmp_path / "out"
  proc = subprocess.run(
      [sys.executable, "-m", "npp_jax.sample", f"--config={ROOT}/configs/smoke.py",
       f"--config.sample.vq_checkpoint={vq_path}", f"--checkpoint={ckpt}", f"--out={out}",
       "--num_samples=8", "--per_device_batch=1", "--grid", "--grid_per_class=1"],
      cwd=ROOT, env=main_env(64), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with np.load(out / "samples.npz") as z:
    assert z["arr_0"].shape == (8, 32, 32, 3) and z["labels"].shape == (8,)
  assert (out / "grid.png").exists()
