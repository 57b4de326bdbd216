"""Sharding in one place: the mesh, the one logical-axis rule table, and placement helpers.

Mesh axes are ('data', 'fsdp', 'tensor'). Parameters carry logical axis names from a short closed
vocabulary (see `RULES`); the config chooses only the mesh shape. The default (data=1, fsdp=-1,
tensor=1) is pure FSDP: every large weight is split over all devices along its `embed` axis and
the batch is split over ('data', 'fsdp'). Activations use their own `act_*` names so that a
weight's `embed` axis (sharded over fsdp) never forces the activations' width to be sharded.

Every jitted call runs inside `use_mesh(mesh)` (jax.set_mesh + the rules); outside it, logical
constraints are no-ops.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# The one rule table: logical name -> mesh axes (None = replicated).
RULES: tuple[tuple[str, Any], ...] = (
    # Parameters.
    ("layers", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("table", None),  # rows of embedding tables: gathered, so never split.
    ("norm", None),
    # Activations.
    ("act_batch", BATCH_AXES),
    ("act_seq", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


def mesh_shape(mesh_config: dict[str, int], num_devices: int) -> tuple[int, int, int]:
  """Resolves the config's {'data', 'fsdp', 'tensor'} sizes (one may be -1: the rest)."""
  unknown = set(mesh_config) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"mesh has unknown axes {sorted(unknown)}; allowed: {MESH_AXES}.")
  sizes = [int(mesh_config.get(a, 1)) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}.")
  for a, s in zip(MESH_AXES, sizes):
    if s == 0 or s < -1:
      raise ValueError(f"mesh.{a}={s} must be a positive size or -1.")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} does not divide {num_devices} devices.")
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                     f"but {num_devices} are present.")
  return tuple(sizes)


def make_mesh(mesh_config: dict[str, int], devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """The ('data', 'fsdp', 'tensor') mesh over all (or the given) devices."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(dict(mesh_config), len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                       devices=devices)


@contextlib.contextmanager
def use_mesh(mesh: jax.sharding.Mesh):
  """The context every jitted call runs in: the mesh and the logical-axis rules."""
  with jax.set_mesh(mesh), nnx.logical_axis_rules(RULES):
    yield mesh


def logical_to_spec(axes: Sequence[str | None]) -> P:
  rules = dict(RULES)
  return P(*(None if a is None else rules[a] for a in axes))


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """with_sharding_constraint by logical names; a no-op when no mesh is set."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(axes))


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Sharding of batch-major arrays (any rank): batch over ('data', 'fsdp'), the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def batch_shards(mesh: jax.sharding.Mesh) -> int:
  """Devices the batch axis is split over: the product of the mesh's batch axes it has."""
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES if a in mesh.axis_names]))


def check_batch(size: int, mesh: jax.sharding.Mesh) -> None:
  """Refuses a batch of `size` rows that the mesh's batch shards do not divide."""
  shards = batch_shards(mesh)
  if size % shards:
    raise ValueError(f"batch size {size} is not divisible by the {shards} batch shards of the "
                     f"mesh (axes {[a for a in BATCH_AXES if a in mesh.axis_names]}).")


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def state_shardings(abstract_state: Any, mesh: jax.sharding.Mesh) -> Any:
  """NamedShardings of an nnx state from its variables' logical axis names."""
  with use_mesh(mesh):
    return nnx.get_named_sharding(abstract_state, mesh)


def abstract_sharded(ctor: Callable[[], Any], mesh: jax.sharding.Mesh) -> tuple[Any, Any]:
  """(graphdef, state) of the nnx object `ctor` builds, without allocating it: every leaf a
  jax.ShapeDtypeStruct carrying its sharding on `mesh` (restore targets, ahead-of-time compiles)."""
  graphdef, state = nnx.split(nnx.eval_shape(ctor))
  return graphdef, jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                state, state_shardings(state, mesh))


def create_sharded(ctor: Callable[[], Any], mesh: jax.sharding.Mesh) -> Any:
  """Builds the nnx object(s) returned by `ctor` with every variable created directly sharded.

  The constructor runs under jit with out_shardings from the logical axis names, so a parameter
  never exists unsharded (XXL fits wherever its shards fit).
  """
  graphdef, abstract_state = abstract_sharded(ctor, mesh)
  shardings = jax.tree.map(lambda x: x.sharding, abstract_state)

  @jax.jit
  def init():
    return nnx.split(ctor())[1]

  with use_mesh(mesh):
    state = jax.jit(init, out_shardings=shardings)()
  return nnx.merge(graphdef, state)
