"""The loop's hooks and its measurements, without training: which hooks a config builds, the
profile trace, grid padding on many batch shards, the throughput/MFU meter, the compilation-cache
setting, and that no core module imports a demo."""
import ast
import glob
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from npp_jax import digits, flops, hooks, sample, sharding, train
from test_sample import TINY, _randomised
from train_helpers import smoke_config

PACKAGE = pathlib.Path(__file__).parent.parent / "npp_jax"


def _run(config, workdir, start=0, end=12):
  return hooks.Run(config=config, workdir=workdir, mesh=sharding.make_mesh(dict(config.mesh)),
                   graphdef=None, writer=None, data_path=workdir, start=start, end=end)


def test_hooks_come_from_the_config(tmp_path):
  config = smoke_config("unused", **{"data.eval_split": ""})
  assert hooks.from_config(_run(config, tmp_path)) == []
  config.data.eval_split, config.sample_every_steps, config.profile_steps = "validation", 4, 2
  config.data.builtin = "digits"
  built = hooks.from_config(_run(config, tmp_path))
  assert [type(h) for h in built] == [hooks.EvalLoss, hooks.SampleGrids, hooks.Profile,
                                      digits.Report]


def test_profile_writes_a_trace_tensorboard_opens(tmp_path):
  """clu's Profile action: a trace of `profile_steps` steps from the run's 3rd step, in
  <workdir>/plugins/profile/<run>/<host>.xplane.pb (the profile plugin's layout)."""
  config = smoke_config("unused", profile_steps=2)
  hook = hooks.Profile(_run(config, tmp_path, start=5, end=20))
  x = jnp.ones((64, 64))
  for step in range(6, 12):
    x = (x @ x / 64).block_until_ready()
    hook.after_step(step, {})
    traces = glob.glob(str(tmp_path / "plugins" / "profile" / "*" / "*.xplane.pb"))
    assert bool(traces) == (step >= 5 + hooks.PROFILE_AFTER + 2), step
  hook.close()  # nothing left running: closing again is harmless.
  hook.close()


@pytest.mark.parametrize("classes", [(1,), (0, 1, 2), tuple(range(9))])
def test_sampled_classes_pad_to_the_mesh(classes):
  """Any number of classes on 8 batch shards (the padding exceeds the classes for 1 and 3)."""
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  decoder = sample.make_decoder("tokens", TINY)
  images, labels = sample.sample_classes(_randomised(TINY), mesh, classes, jax.random.key(0),
                                         decoder=decoder, per_class=2, cfg_scale=1.5)
  np.testing.assert_array_equal(labels, np.repeat(classes, 2))
  assert images.shape == (2 * len(classes), 8, 8, 3) and images.dtype == np.uint8


def test_meter_reports_mfu_only_where_the_peak_is_known(monkeypatch):
  config = smoke_config("unused")
  model_cfg = train.config_lib.model_config(config)
  meter = train._Meter(config, {1, 2})  # on CPU: no peak, so no MFU.
  meter.step(2)
  assert "mfu" not in meter.scalars()
  monkeypatch.setattr(train.chips, "peak_flops", lambda kind: 1e9)
  meter = train._Meter(config, {1, 2})
  for p in (2, 2, 1):
    meter.step(p)
  meter.wait, meter.excluded = 0.25, 100.0  # hook/compile time is not step time.
  meter.t0 = time.perf_counter() - 101.0  # so about 1 s of steps.
  m = meter.scalars()
  images = 3 * config.global_batch_size
  assert m["images_per_s"] == pytest.approx(images, rel=0.05)
  assert m["images_per_s_per_chip"] == pytest.approx(images / jax.device_count(), rel=0.05)
  assert m["host_data_wait_fraction"] == pytest.approx(0.25, rel=0.05)
  model_flops = config.global_batch_size * (2 * flops.train_flops_per_image(model_cfg, 2)
                                            + flops.train_flops_per_image(model_cfg, 1))
  assert m["mfu"] == pytest.approx(model_flops / (jax.device_count() * 1e9), rel=0.05)
  assert meter.images == 0 and meter.flops == 0  # reset for the next interval.


def test_compile_cache_setting(tmp_path):
  before = jax.config.jax_compilation_cache_dir
  config = smoke_config("unused")
  try:
    assert train.use_compile_cache(config, tmp_path) is None  # "": JAX's own setting stays.
    assert jax.config.jax_compilation_cache_dir == before
    config.compile_cache = "{workdir}/compile_cache"
    assert train.use_compile_cache(config, tmp_path) == str(tmp_path / "compile_cache")
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "compile_cache")
    config.compile_cache = "gs://bucket/cache"  # JAX opens it through etils.epath when used.
    assert train.use_compile_cache(config, tmp_path) == "gs://bucket/cache"
  finally:
    jax.config.update("jax_compilation_cache_dir", before)
    train.compilation_cache.reset_cache()


@pytest.mark.parametrize("module", ["train", "hooks", "sample", "config_lib", "main"])
def test_core_modules_never_import_a_demo(module):
  """The demo is reached through config.data.builtin (builtin_data.lookup), never imported."""
  tree = ast.parse((PACKAGE / f"{module}.py").read_text())
  imported = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom):
      imported.update(f"{node.module}.{a.name}" for a in node.names)
    elif isinstance(node, ast.Import):
      imported.update(a.name for a in node.names)
  assert "npp_jax.digits" not in imported
