"""Tests for npp_jax.kernels: the kernel-set decision, and that both sets compute the same maths.

The "cpu" set's attention, projections and fused (chunked) loss are checked against the library
forms ("xla") and the unfused patch loss, values and gradients; the decision follows the devices a
program is compiled for (a TPU topology's mesh on this CPU host gives "xla").
"""
import dataclasses
import functools

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from npp_jax import kernels, patching, sharding
from npp_jax import model as model_lib

G = 16
# Compile time dominates these CPU tests: skip LLVM's optimisation passes (the HLO and so the
# maths are unchanged).
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _tpu_mesh():
  pytest.importorskip("libtpu", reason="the tpu extra (libtpu) is not installed")
  from npp_jax import aot
  return sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, aot.topology_devices("v5e:2x2"))


# ----------------------------------------------------------------------------- the decision

def test_explicit_settings_win_and_auto_follows_the_default_devices():
  assert kernels.resolve("cpu") == "cpu"
  assert kernels.resolve("xla") == "xla"
  assert kernels.resolve("auto") == "cpu"  # the test devices are CPUs
  with pytest.raises(ValueError, match="model.kernels"):
    kernels.resolve("tpu")


def test_auto_follows_the_mesh_the_program_is_traced_under():
  cpu_mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
  with sharding.use_mesh(cpu_mesh):
    assert kernels.resolve("auto") == "cpu"
    assert kernels.batch_shards() == 8
  with sharding.use_mesh(_tpu_mesh()):
    assert kernels.target_platform() == "tpu"
    assert kernels.resolve("auto") == "xla"
    assert kernels.resolve("cpu") == "cpu"  # the config override
    assert kernels.batch_shards() == 4


def test_model_config_rejects_an_unknown_kernel_set():
  with pytest.raises(ValueError, match="model.kernels"):
    model_lib.ModelConfig(dim=64, n_layer=1, n_head=4, kernels="pallas").validate()


def test_scan_unroll_auto_is_full_on_cpu_and_rolled_elsewhere():
  assert kernels.scan_unroll(0, 12, "cpu") == 12
  assert kernels.scan_unroll(0, 12, "xla") == 1
  assert kernels.scan_unroll(4, 12, "xla") == 4
  assert kernels.scan_unroll(40, 12, "cpu") == 12


# ----------------------------------------------------------------------------- attention, dense

@pytest.mark.parametrize("kv_heads,length", [(4, 16), (2, 16), (1, 16), (4, 128), (2, 128)])
def test_cpu_attention_equals_library_attention_and_its_gradients(kv_heads, length):
  """Length 128 takes the split-queries path (the masked quarter of the scores skipped)."""
  rng = np.random.default_rng(kv_heads)
  q, dout = (jnp.asarray(rng.normal(size=(2, length, 4, 8)), jnp.float32) for _ in range(2))
  k, v = (jnp.asarray(rng.normal(size=(2, length, kv_heads, 8)), jnp.float32) for _ in range(2))

  @_jit
  def both(q, k, v):
    return [jax.vjp(functools.partial(kernels.causal_attention, kernels=s), q, k, v)
            for s in ("cpu", "xla")]

  (ours, ours_vjp), (want, want_vjp) = both(q, k, v)
  np.testing.assert_allclose(ours, want, rtol=1e-5, atol=1e-6)
  for got, ref in zip(ours_vjp(dout), want_vjp(dout)):
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_in", [1, 2])
def test_cpu_dense_equals_tensordot(n_in):
  rng = np.random.default_rng(n_in)
  x = jnp.asarray(rng.normal(size=(2, 3, 4, 5)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(4, 5, 6)[2 - n_in:] + (7,)), jnp.float32)
  np.testing.assert_allclose(kernels.dense(x, w, n_in, "cpu"), kernels.dense(x, w, n_in, "xla"),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(kernels.dense(x, w, n_in, "xla"), jnp.tensordot(x, w, axes=n_in))


# ----------------------------------------------------------------------------- the fused loss

@functools.partial(_jit, static_argnums=(3, 4))
def _output_loss_and_grads(h, w, t, chunks, kern):
  fused = jax.value_and_grad(
      lambda h, w: kernels.output_patch_loss(h, w, t, kernels=kern, chunks=chunks),
      argnums=(0, 1))(h, w)
  plain = jax.value_and_grad(
      lambda h, w: patching.patch_loss(jnp.einsum("bpd,dv->bpv", h, w), t), argnums=(0, 1))(h, w)
  primal = kernels.output_patch_loss(h, w, t, kernels=kern, chunks=chunks)  # not differentiated
  return fused, plain, primal


@pytest.mark.parametrize("p,chunks,kern", [(1, 1, "cpu"), (1, 4, "cpu"), (1, None, "cpu"),
                                           (2, 2, "cpu"), (2, 8, "xla"), (4, 16, "cpu"),
                                           (1, None, "xla")])
def test_output_patch_loss_equals_unfused_loss_and_gradients(p, chunks, kern):
  rng = np.random.default_rng(p)
  b, d, v, n = 2, 8, 37, G * G // (p * p)
  h = jnp.asarray(rng.normal(size=(b, n, d)), jnp.float32)
  w = jnp.asarray(rng.normal(scale=0.5, size=(d, v)), jnp.float32)
  t = jnp.asarray(rng.integers(0, v, (b, n, p * p)), jnp.int32)
  (loss, (dh, dw)), (ref, (ref_dh, ref_dw)), primal = _output_loss_and_grads(h, w, t, chunks, kern)
  np.testing.assert_allclose(loss, ref, rtol=1e-6)
  np.testing.assert_allclose(primal, ref, rtol=1e-6)
  np.testing.assert_allclose(dh, ref_dh, rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose(dw, ref_dw, rtol=1e-5, atol=1e-8)


def test_output_patch_loss_chunks_must_divide_the_positions():
  with pytest.raises(ValueError, match="chunks=3"):
    kernels.output_patch_loss(jnp.zeros((1, 16, 4)), jnp.zeros((4, 5)),
                              jnp.zeros((1, 16, 1), jnp.int32), kernels="cpu", chunks=3)


def test_auto_loss_chunks_bound_one_chunks_logits_per_device():
  # CPU: ~16 MiB of float32 logits per chunk.
  assert kernels.auto_loss_chunks(8, 256, 16384, "cpu") == 8  # 8 * 32 rows * 64 KiB = 16 MiB
  assert kernels.auto_loss_chunks(8, 64, 16384, "cpu") == 2
  assert kernels.auto_loss_chunks(8, 16, 16384, "cpu") == 1
  assert kernels.auto_loss_chunks(2, 256, 37, "cpu") == 1
  assert kernels.auto_loss_chunks(1, 3 * 256, 1 << 20, "cpu") == 256  # 3 rows of 4 MiB each
  # Accelerators: only past 1 GiB per device, counting the batch per device under a mesh.
  assert kernels.auto_loss_chunks(64, 256, 16384, "xla") == 1  # exactly 1 GiB
  assert kernels.auto_loss_chunks(128, 256, 16384, "xla") == 2
  with sharding.use_mesh(sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})):
    assert kernels.auto_loss_chunks(8 * 128, 256, 16384, "xla") == 2  # 128 images per device


# ----------------------------------------------------------------------------- the whole step

def test_train_loss_and_gradients_are_the_same_with_either_kernel_set():
  """train.loss_fn of the same params with kernels=cpu and kernels=xla: same loss and gradients."""
  from npp_jax import train
  base = model_lib.ModelConfig(dim=64, n_layer=2, n_head=4, n_kv_head=2, vocab_size=512,
                               num_classes=10, token_dropout=0.0, resid_dropout=0.0,
                               ffn_dropout=0.0, class_dropout=0.0)
  rng = np.random.default_rng(0)
  batch = {"codes": jnp.asarray(rng.integers(0, 512, (2, 256)), jnp.int32),
           "labels": jnp.asarray([1, 10], jnp.int32)}
  params = None
  results = []
  for kern in ("cpu", "xla"):
    model = model_lib.Transformer(dataclasses.replace(base, kernels=kern), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    if params is None:  # non-zero output layer, so every parameter gets a gradient.
      params = jax.tree.map(lambda x: x + 0.02 * jnp.asarray(rng.normal(size=x.shape), x.dtype),
                            state)
    for p in (1, 2):
      results.append((kern, p, _jit(jax.value_and_grad(
          lambda s, p=p: train.loss_fn(graphdef, s, batch, p, None)))(params)))
  for (_, p, (loss_cpu, g_cpu)), (_, _, (loss_xla, g_xla)) in zip(results[:2], results[2:]):
    np.testing.assert_allclose(loss_cpu, loss_xla, rtol=1e-5, err_msg=f"p={p}")
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_cpu), jax.tree.leaves(g_xla)):
      assert np.abs(b).max() > 0, path
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * np.abs(b).max(), err_msg=str(path))


def test_tpu_compiler_options_apply_only_to_tpu_programs_and_are_validated():
  from configs import smoke
  from npp_jax import config_lib
  config = smoke.get_config()
  cpu_mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
  assert kernels.compiler_options(config, cpu_mesh) is None
  options = kernels.compiler_options(config, _tpu_mesh())
  assert options == {"xla_tpu_enable_windowed_einsum_for_all_gather": False,
                     "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False}
  config.tpu_compiler_options.unknown_thing = 3
  with pytest.raises(ValueError, match="config.tpu_compiler_options.unknown_thing"):
    config_lib.validate(config, num_devices=8, process_count=1)
