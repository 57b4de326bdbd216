"""Memory: FSDP keeps each device's share of the params and optimizer state at ~1/8 of the total,
and the patch loss never materialises the reference's K-fold copy of the logits.

Figures come from shard shapes and XLA's compiled memory analysis, never from timing.
"""
import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import npp_b
from npp_jax import config_lib, optim, patching, sharding, train
from npp_jax import model as model_lib
from train_helpers import smoke_config


def _per_device_bytes(abstract, shardings):
  """{device: bytes} of a tree of ShapeDtypeStructs laid out with `shardings`."""
  out = {}
  for x, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
    for device, index in s.devices_indices_map(x.shape).items():
      shard = [len(range(*i.indices(n))) for i, n in zip(index, x.shape)]
      out[device] = out.get(device, 0) + int(np.prod(shard)) * x.dtype.itemsize
  return out


def test_fsdp_state_share_per_device_gpt_b():
  """GPT-B's params + AdamW state on an 8-way FSDP mesh (abstract: nothing is allocated)."""
  config = npp_b.get_config()
  mesh = sharding.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
  model_cfg = config_lib.model_config(config)
  _, params = nnx.split(nnx.eval_shape(lambda: model_lib.Transformer(model_cfg, rngs=nnx.Rngs(0))))
  param_sh = sharding.state_shardings(params, mesh)
  tx = optim.make_optimizer(config, config_lib.schedule(config, 1_281_167), 5000)
  opt = jax.eval_shape(tx.init, params)
  opt_sh = train.optimizer_shardings(tx, params, param_sh, mesh)
  per_device = _per_device_bytes((params, opt), (param_sh, opt_sh))
  total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((params, opt)))
  assert total > 3 * 4 * 100e6  # params, mu and nu of ~111M fp32 parameters.
  worst = max(per_device.values())
  print(f"GPT-B state: {total / 2**20:.0f} MiB total, {worst / 2**20:.1f} MiB on the fullest "
        f"device = {worst / (total / 8):.4f} x total/8")
  assert len(per_device) == 8 and worst <= 1.05 * total / 8


def test_compiled_train_step_arguments_are_one_eighth(tmp_path):
  """XLA's memory analysis of the real compiled step on 8 devices: the per-device argument bytes
  (state + batch) are within 1.05x of (total state)/8 plus the device's batch slice."""
  config = smoke_config(str(tmp_path), **{"model.dim": 256, "model.vocab_size": 1024,
                                          "model.num_classes": 100})
  mesh = sharding.make_mesh(dict(config.mesh))
  tx = optim.make_optimizer(config, config_lib.schedule(config, 64), 8)
  graphdef, state = train.create_state(config, mesh, tx)
  fns = train.StepFns(graphdef, tx, optim.learning_rate(config, config_lib.schedule(config, 64), 8),
                      config, mesh, state)
  batch = {"codes": jax.ShapeDtypeStruct((8, 256), jnp.int32, sharding=fns.batch_shardings),
           "labels": jax.ShapeDtypeStruct((8,), jnp.int32, sharding=fns.batch_shardings)}
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
  with sharding.use_mesh(mesh):
    compiled = fns._make(1).lower(abstract, batch).compile()  # pylint: disable=protected-access
  args = compiled.memory_analysis().argument_size_in_bytes
  total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  batch_share = (8 * 256 + 8) * 4 // 8
  print(f"argument bytes per device {args}, total state / 8 = {total / 8:.0f}")
  assert args <= 1.05 * total / 8 + batch_share


@pytest.mark.parametrize("p", [2, 4])
def test_patch_loss_activation_memory_is_at_most_one_kth_of_the_k_fold_copy(p):
  """The reference repeats the B x P x V logits K = p*p times and takes a token-level CE; the
  patch loss's temporaries (forward + backward) must be <= 1/K of that formulation's."""
  b, n, v = 8, 256, 16384
  k = p * p
  logits = jax.ShapeDtypeStruct((b, n // k, v), jnp.float32)
  targets = jax.ShapeDtypeStruct((b, n // k, k), jnp.int32)

  def reference(logits_BxPxV, targets_BxPxK):
    repeated = jnp.repeat(logits_BxPxV, k, axis=1)  # (B, P*K, V), as the reference does.
    return optax.softmax_cross_entropy_with_integer_labels(
        repeated, targets_BxPxK.reshape(b, -1)).mean()

  def temp_bytes(fn):
    grad = jax.jit(jax.value_and_grad(fn))
    return grad.lower(logits, targets).compile().memory_analysis().temp_size_in_bytes

  ours, theirs = temp_bytes(patching.patch_loss), temp_bytes(reference)
  print(f"p={p}: patch loss temporaries {ours / 2**20:.2f} MiB, K-fold copy {theirs / 2**20:.2f} MiB")
  assert theirs >= k * b * (n // k) * v * 4  # the copy itself is materialised there.
  assert ours <= theirs / k
