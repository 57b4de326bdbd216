"""Tests for npp_jax.sharding (and the model's sharded numerics): mesh resolution, parameter
placement, a sharded forward + backward equal to the single-device one, a really sharded
activation, remat policies and the bfloat16 compute path.

Runs on the 8 fake CPU devices that tests/conftest.py sets up, on a (data, fsdp, tensor) = 2x2x2
mesh.
"""
import dataclasses
import functools

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from naming import raises_naming
from npp_jax import model as model_lib
from npp_jax import patching
from npp_jax import sharding

TINY = model_lib.ModelConfig(dim=64, n_layer=2, n_head=4, vocab_size=512, num_classes=10,
                             token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0,
                             class_dropout=0.0)
B = 8  # global batch: 2 rows per (data, fsdp) shard
# Compile time dominates these CPU tests: skip LLVM's optimisation passes (halves it; the HLO and
# so the math are unchanged).
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _ctor(cfg=TINY):
  return lambda: model_lib.Transformer(cfg, rngs=nnx.Rngs(0))


def _loss(graphdef, state, codes_BxN, labels_B, p):
  logits = nnx.merge(graphdef, state)(codes_BxN, labels_B, patch_size=p)
  return patching.patch_loss(logits, patching.group_targets(codes_BxN, p))


_value_and_grad = _jit(jax.value_and_grad(_loss, argnums=1), static_argnums=(0, 4))


def _np(tree):
  return jax.tree.map(np.asarray, tree)


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})


@pytest.fixture(scope="module")
def setup(mesh):
  """A single-device model with a non-zero output layer, its data and its sharded twin."""
  model = _ctor()()
  model.output[...] = 0.3 * jax.random.normal(jax.random.key(1), model.output[...].shape)
  graphdef, state = nnx.split(model)
  sharded_model = sharding.create_sharded(_ctor(), mesh)
  rng = np.random.default_rng(0)
  codes = jnp.asarray(rng.integers(0, 512, (B, 256)), jnp.int32)
  labels = jnp.asarray(rng.integers(0, 11, (B,)), jnp.int32)
  return dict(graphdef=graphdef, state=state, sharded_model=sharded_model, codes=codes,
              labels=labels)


# ----------------------------------------------------------------------------- mesh and batch

def test_mesh_shape_resolves_minus_one():
  assert sharding.mesh_shape({"fsdp": -1}, 8) == (1, 8, 1)
  assert sharding.mesh_shape({"data": 2, "fsdp": -1, "tensor": 2}, 8) == (2, 2, 2)
  assert sharding.mesh_shape({"data": -1, "tensor": 4}, 8) == (2, 1, 4)
  assert sharding.mesh_shape({"data": 1, "fsdp": 8, "tensor": 1}, 8) == (1, 8, 1)
  mesh = sharding.make_mesh({"fsdp": -1, "tensor": 2})
  assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}


@pytest.mark.parametrize("config, names", [
    ({"model": 2, "fsdp": -1}, ("model",)),
    ({"data": 0, "fsdp": -1}, ("mesh.data",)),
    ({"tensor": -2, "fsdp": -1}, ("mesh.tensor",)),
    ({"data": -1, "fsdp": -1}, ("'data': -1", "'fsdp': -1")),
    ({"data": 3, "fsdp": -1}, ("'data': 3", 8)),
    ({"data": 2, "fsdp": 2, "tensor": 1}, ("'data': 2", "'fsdp': 2", 4, 8)),
])
def test_mesh_shape_rejects_bad_shapes_by_name(config, names):
  with raises_naming(ValueError, *names):
    sharding.mesh_shape(config, 8)


def test_logical_rules_map_to_mesh_axes():
  assert sharding.logical_to_spec(("layers", "embed", "heads", "head_dim")) == \
      jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
  assert sharding.logical_to_spec(("act_batch", "act_seq", "act_embed")) == \
      jax.sharding.PartitionSpec(("data", "fsdp"), None, None)
  x = jnp.ones((4, 3))
  assert sharding.constrain(x, ("act_batch", "act_embed")) is x  # no mesh: a no-op


# ----------------------------------------------------------------------------- parameters

def test_create_sharded_really_shards_parameters(setup):
  model = setup["sharded_model"]
  P = jax.sharding.PartitionSpec
  want = {
      "wq": (model.layers.attention.wq, P(None, "fsdp", "tensor", None), (2, 32, 2, 16)),
      "wo": (model.layers.attention.wo, P(None, "tensor", None, "fsdp"), (2, 2, 16, 32)),
      "w1": (model.layers.feed_forward.w1, P(None, "fsdp", "tensor"), (2, 32, 128)),
      "w2": (model.layers.feed_forward.w2, P(None, "tensor", "fsdp"), (2, 128, 32)),
      "output": (model.output, P("fsdp", "tensor"), (32, 256)),
      "tok_embeddings": (model.tok_embeddings.embedding, P(None, "fsdp"), (512, 32)),
  }
  for name, (param, spec, local) in want.items():
    x = param[...]
    assert x.sharding.spec == spec, name
    assert x.addressable_shards[0].data.shape == local, name
    assert len(x.sharding.device_set) == 8, name
  # The same values as the single-device initialisation (up to jit vs eager RNG rounding).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6),
               _np(nnx.state(model, nnx.Param)), _np(nnx.state(_ctor()(), nnx.Param)))


# ----------------------------------------------------------------------------- sharded numerics

@pytest.fixture(scope="module")
def single_device(setup):
  """Loss and gradients of the single-device model for p = 1 and 2 (the references)."""
  return {p: _np(_value_and_grad(setup["graphdef"], setup["state"], setup["codes"],
                                 setup["labels"], p)) for p in (1, 2)}


@pytest.mark.parametrize("p", [1, 2])
def test_sharded_forward_backward_equals_single_device(setup, single_device, mesh, p):
  graphdef, state = setup["graphdef"], setup["state"]
  loss1, grads1 = single_device[p]
  shardings = jax.tree.map(lambda x: x.sharding, nnx.state(setup["sharded_model"]))
  with sharding.use_mesh(mesh):
    state_s = jax.device_put(state, shardings)
    codes_s = jax.device_put(setup["codes"], sharding.batch_sharding(mesh))
    labels_s = jax.device_put(setup["labels"], sharding.batch_sharding(mesh))
    loss2, grads2 = _value_and_grad(graphdef, state_s, codes_s, labels_s, p)
  assert grads2["layers"]["feed_forward"]["w1"][...].sharding.spec != jax.sharding.PartitionSpec()
  np.testing.assert_allclose(loss2, loss1, rtol=0, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               _np(grads2), grads1)
  assert np.abs(grads1["output"]).max() > 1e-4  # gradients are not trivially zero


def test_activations_are_sharded_by_the_models_constraints(setup, mesh):
  """Replicated inputs: only the model's own constraints can shard the hidden states."""
  graphdef, model = setup["graphdef"], setup["sharded_model"]
  seen = {}

  def forward(state, codes, labels):
    logits = nnx.merge(graphdef, state)(codes, labels)
    jax.debug.inspect_array_sharding(logits, callback=lambda s: seen.setdefault("logits", s))
    return logits.sum()

  with sharding.use_mesh(mesh):
    codes = jax.device_put(setup["codes"], sharding.replicated(mesh))
    labels = jax.device_put(setup["labels"], sharding.replicated(mesh))
    hlo = _jit(forward).lower(nnx.state(model), codes, labels).compile().as_text()
  assert seen["logits"].spec[0] == ("data", "fsdp")
  # Per-device shapes in the partitioned program: residual stream B/4 x L x D, SwiGLU hidden
  # B/4 x L x F/2; the unsharded residual stream never appears.
  assert "f32[2,256,64]" in hlo
  assert "f32[2,256,128]" in hlo
  assert "f32[8,256,64]" not in hlo


@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch"])
def test_remat_policies_keep_loss_and_grads(setup, single_device, policy):
  graphdef = nnx.split(nnx.eval_shape(_ctor(dataclasses.replace(TINY, remat=policy))))[0]
  loss, grads = _value_and_grad(graphdef, setup["state"], setup["codes"], setup["labels"], 2)
  want_loss, want_grads = single_device[2]  # remat "none"
  np.testing.assert_allclose(loss, want_loss, rtol=0, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               _np(grads), want_grads)


def test_bfloat16_compute_keeps_float32_params_and_logits(setup):
  model = nnx.eval_shape(_ctor(dataclasses.replace(TINY, dtype="bfloat16")))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  codes, labels = setup["codes"][:2], setup["labels"][:2]

  @functools.partial(_jit, static_argnums=(0, 1))
  def both(graphdef_bf16, graphdef_f32, state):
    return (nnx.merge(graphdef_bf16, state)(codes, labels, patch_size=4),
            nnx.merge(graphdef_f32, state)(codes, labels, patch_size=4))

  logits, ref_logits = both(nnx.split(model)[0], setup["graphdef"], setup["state"])
  assert logits.dtype == jnp.float32
  err = np.abs(np.asarray(logits) - np.asarray(ref_logits)).max()
  assert 0 < err < 0.05 * np.abs(np.asarray(ref_logits)).max()  # really bf16 matmuls, still close
