"""`python -m npp_jax.sample` across two JAX processes (127.0.0.1, 4 CPU devices each) writes the
same samples.npz, bit for bit, as one process on 8 devices: the batch is sharded over processes,
process 0 writes the chunks and the npz, and randomness depends only on the sample index."""
import dataclasses
import subprocess
import sys

import numpy as np
import portpicker
import pytest
from flax import nnx

from npp_jax import checkpoint as ckpt_lib
from npp_jax import config_lib, sample
from test_sample import FIXTURES, _randomised, _smoke_config
from train_helpers import ROOT, main_env


def _command(ckpt, vq_path, out, *extra):
  return [sys.executable, "-m", "npp_jax.sample", f"--config={ROOT}/configs/smoke.py",
          "--config.model.grid_size=8", f"--config.sample.vq_checkpoint={vq_path}",
          f"--checkpoint={ckpt}", f"--out={out}", "--num_samples=20", "--per_device_batch=1",
          "--seed=7", "--cfg_scale=1.5", "--labels=uniform", *extra]


@pytest.mark.slow
def test_two_processes_write_the_same_samples_as_one(tmp_path):
  config = _smoke_config(grid_size=8)
  model = _randomised(config_lib.model_config(config, **sample.NO_DROPOUT))
  ckpt = tmp_path / "ckpt"
  ckpt_lib.save_params(ckpt, nnx.state(model), model_config=dataclasses.asdict(model.cfg))
  vq_path = tmp_path / "vq.npz"
  with np.load(FIXTURES / "llamagen_vq_small.npz") as z:
    np.savez(vq_path, **{k: z[k] for k in z.files if not k.startswith("io/")})

  one = subprocess.run(_command(ckpt, vq_path, tmp_path / "one"), cwd=ROOT, env=main_env(8),
                       capture_output=True, text=True, timeout=600)
  assert one.returncode == 0, one.stderr[-3000:]

  port = portpicker.pick_unused_port()
  procs = [subprocess.Popen(
      _command(ckpt, vq_path, tmp_path / "two", f"--coordinator_address=127.0.0.1:{port}",
               "--num_processes=2", f"--process_id={i}"),
      cwd=ROOT, env=main_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for i, (p, (_, err)) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, err[-3000:]
    assert f"JAX process {i} of 2; 4 local / 8 global devices" in err

  with np.load(tmp_path / "one" / "samples.npz") as a, \
       np.load(tmp_path / "two" / "samples.npz") as b:
    assert a["arr_0"].shape == (20, 16, 16, 3) and a["arr_0"].dtype == np.uint8
    np.testing.assert_array_equal(a["labels"], b["labels"])
    np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
  for i in range(3):  # chunks of 8, 8 and 4 samples; the codes too, not only the images.
    name = f"chunk_{i:05d}.npz"
    with np.load(tmp_path / "one" / "chunks" / name) as a, \
         np.load(tmp_path / "two" / "chunks" / name) as b:
      codes = a["codes"]
      np.testing.assert_array_equal(codes, b["codes"])
    assert len(np.unique(codes, axis=0)) > 1  # the samples differ from each other
