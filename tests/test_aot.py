"""Tests for npp_jax.aot, hlo_cost and chips: real TPU compiles (libtpu, no TPU) of small programs.

The fast tier checks the cost model on programs whose FLOPs and collectives are known exactly, the
topology table and the refusals; the slow tier compiles the tiny model's every program for two TPU
topologies and NPP-B on a 4-chip v5p.
"""
import json
import subprocess
import sys

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from naming import raises_naming
from npp_jax import chips, flops, hlo_cost
from npp_jax import model as model_lib

pytest.importorskip("libtpu", reason="the tpu extra (libtpu) is not installed")
from npp_jax import aot  # noqa: E402  (after the skip: aot needs nothing, but its tests need libtpu)


def _mesh(topology, axes=("x",)):
  devices = aot.topology_devices(topology)
  return jax.sharding.Mesh(np.array(devices).reshape(len(devices)), axes)


# ----------------------------------------------------------------------------- the cost model

def test_loop_bodies_count_once_per_iteration_unlike_xla_cost_analysis():
  mesh = _mesh("v5e:2x2")
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def f(x, ws):
    return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, ws)[0]

  x = jax.ShapeDtypeStruct((256, 512), jnp.bfloat16, sharding=rep)
  ws = jax.ShapeDtypeStruct((6, 512, 512), jnp.bfloat16, sharding=rep)
  compiled = jax.jit(f).lower(x, ws).compile()
  cost = hlo_cost.analyse(compiled.as_text(), 4)
  per_layer = 2 * 256 * 512 * 512
  assert cost.flops == pytest.approx(6 * per_layer, rel=1e-6)
  assert cost.unknown_loops == 0
  assert aot._cost(compiled)["flops"] < 2 * per_layer  # XLA counts the body once
  assert cost.bytes_accessed >= 6 * 512 * 512 * 2  # every layer's weights read once at least


def test_collective_bytes_of_an_all_gather():
  """A weight split over 4 devices and gathered on each: each device receives 3/4 of it."""
  mesh = _mesh("v5e:2x2")
  P = jax.sharding.PartitionSpec
  w = jax.ShapeDtypeStruct((1024, 2048), jnp.float32,
                           sharding=jax.sharding.NamedSharding(mesh, P("x")))
  gather = jax.jit(lambda w: jax.lax.with_sharding_constraint(w, P()) * 2.0,
                   out_shardings=jax.sharding.NamedSharding(mesh, P()))
  with jax.set_mesh(mesh):
    cost = hlo_cost.analyse(gather.lower(w).compile().as_text(), 4)
  assert cost.collective_counts == {"all-gather": 1}
  assert cost.collective_bytes == pytest.approx(1024 * 2048 * 4 * 3 / 4, rel=0.01)


def test_roofline_takes_the_largest_term():
  est = hlo_cost.roofline(flops=2e12, bytes_accessed=1e9, collective_bytes=6e9, peak_flops=1e12,
                          hbm_bytes_per_s=1e12, ici_bytes_per_s=1e9)
  assert est["bound"] == "collectives" and est["seconds"] == pytest.approx(6.0)
  assert est["terms"]["compute"] == pytest.approx(2.0)


# ----------------------------------------------------------------------------- topologies

@pytest.mark.parametrize("name,topology,chips_", [
    ("v5p-64", "v5p:2x4x4", 32), ("v5p-8", "v5p:2x2x1", 4), ("v5p-128", "v5p:4x4x4", 64),
    ("v4-32", "v4:2x2x4", 16), ("v5litepod-16", "v5e:4x4", 16), ("v5litepod-1", "v5e:1x1", 1),
    ("v6e-8", "v6e:2x4", 8), ("v6e-256", "v6e:16x16", 256), ("v5p:2x2x1", "v5p:2x2x1", 4)])
def test_accelerator_types_map_to_topologies(name, topology, chips_):
  acc = chips.accelerator(name)
  assert (acc.topology, acc.num_chips) == (topology, chips_)


@pytest.mark.parametrize("name", ["v7-8", "v5p-3", "v5p:2x2", "v5litepod-12", "tpu"])
def test_unknown_topologies_are_refused_by_name(name):
  with raises_naming(ValueError, repr(name)):
    chips.accelerator(name)


def test_device_kinds_map_to_chips():
  devices = aot.topology_devices("v5p:2x2x1")
  assert chips.chip_of(devices[0].device_kind).name == "v5p"
  assert chips.chip_of(aot.topology_devices("v5e:2x2")[0].device_kind).name == "v5e"
  assert chips.peak_flops("cpu") is None


def test_a_mesh_that_does_not_divide_the_topology_is_refused_before_compiling():
  from configs import smoke
  config = smoke.get_config()
  config.mesh.fsdp = 3
  with pytest.raises(ValueError, match="config.mesh"):
    aot.plan(config, "v5e:2x2")


def test_without_libtpu_the_cli_says_how_to_install_it(monkeypatch):
  import importlib.util
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "libtpu" else real(name, *a))
  with pytest.raises(RuntimeError, match=r"\.\[tpu\]"):
    aot.topology_devices("v5e:2x2")


def test_a_program_that_does_not_fit_names_program_bytes_hbm_and_remedies():
  pl = aot.Plan(chips.accelerator("v5litepod-4"), [None] * 4, None, [], None)
  result = {"name": "train", "patch_size": 1, "fits": False, "hbm_bytes": 16 * chips.GiB,
            "bytes_per_device": {"total": 20 * chips.GiB}}
  with pytest.raises(aot.DoesNotFitError) as e:
    aot.check_fits([result], pl)
  for part in ("train (patch size 1)", "20.00 GiB", "16.00 GiB", "config.model.remat",
               "config.mesh", "config.global_batch_size"):
    assert part in str(e.value)


# ----------------------------------------------------------------------------- whole programs

def _aligned_tiny_config():
  """The smoke config at dims that TPU tiles without padding once split over 4 devices (an
  embed shard of 128, head_dim 128), so per-device argument bytes can be checked exactly."""
  from configs import smoke
  config = smoke.get_config()
  config.model.update(dim=512, n_head=4, vocab_size=512, dtype="bfloat16")
  return config


def _check_report(rep, config, topology):
  cfg = model_lib.ModelConfig(dim=config.model.dim, n_layer=config.model.n_layer,
                              n_head=config.model.n_head, vocab_size=config.model.vocab_size,
                              num_classes=config.model.num_classes)
  names = [(p["name"], p["patch_size"]) for p in rep["programs"]]
  assert names == [("train", 2), ("train", 1), ("eval", 1), ("sample", None)]
  n = rep["num_devices"]
  abstract = nnx.eval_shape(lambda: model_lib.Transformer(cfg, rngs=nnx.Rngs(0)))
  param_bytes = sum(x.size * 4 for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  for p in rep["programs"]:
    b = p["bytes_per_device"]
    assert p["fits"] and 0 < b["total"] <= p["hbm_bytes"]
    assert p["compile_s"] > 0 and p["est_step_s"] > 0 and 0 < p["est_mfu"] <= 1
    assert p["flops_xla"] > 0 and p["flops_analytic"] > 0
    if p["name"] == "train":
      # params, Adam's mu and nu (sharded), the step and the batch: 3x the params per device
      # (the replicated norm scales and TPU's tiling of the small class table add < 5%).
      state = 3 * param_bytes / n
      assert state <= b["arguments"] <= 1.05 * state
      # the HLO count (loop bodies times their trip counts) equals the analytic count.
      assert p["flops_hlo"] == pytest.approx(p["flops_analytic"], rel=1e-3)
      assert p["flops_analytic"] == pytest.approx(
          config.global_batch_size * flops.train_flops_per_image(cfg, p["patch_size"]) / n)
  assert rep["est_chip_hours"] > 0
  assert rep["topology"] == topology


@pytest.mark.slow
@pytest.mark.parametrize("topology", ["v5e:2x2"])
def test_every_program_of_the_tiny_model_compiles_for_tpu(topology, tmp_path):
  """Also: what compiles for TPU is what a TPU run executes. The kernel set follows the mesh's
  devices, so none of the CPU kernels (scoped `cpu_kernel` in the HLO's op names) is in the
  compiled TPU programs, while the same step lowered for CPU devices uses them."""
  config = _aligned_tiny_config()
  rep = aot.run(config, topology, programs=("train", "eval", "sample"), log=lambda s: None,
                hlo_dir=str(tmp_path))
  _check_report(rep, config, topology)
  files = sorted(p.name for p in tmp_path.iterdir())
  assert files == ["eval_p1.hlo.txt", "sample.hlo.txt", "train_p1.hlo.txt", "train_p2.hlo.txt"]
  for f in files:
    text = (tmp_path / f).read_text()
    assert "cpu_kernel" not in text, f
  assert "while" in (tmp_path / "train_p1.hlo.txt").read_text()  # the rolled layer scan
  cpu = aot.plan(config, topology, programs=("train",), devices=jax.devices()[:4])
  assert "cpu_kernel" in cpu.programs[-1].lower().as_text(debug_info=True)


@pytest.mark.slow
def test_cli_prints_the_table_and_json_for_npp_b_on_a_4_chip_v5p():
  """NPP-B's train steps (both patch levels) on a v5p-8: they fit, and the HLO FLOPs (loop
  bodies times trip counts) equal the analytic count (no remat)."""
  out = subprocess.run(
      [sys.executable, "-m", "npp_jax.aot", "--config=configs/npp_b.py", "--topology=v5p-8",
       "--programs=train", "--json"], capture_output=True, text=True, timeout=1500, check=True)
  rep = json.loads(out.stdout.strip().splitlines()[-1])
  assert rep["chip"] == "v5p" and rep["num_devices"] == 4 and rep["mesh"]["fsdp"] == 4
  assert [(p["name"], p["patch_size"]) for p in rep["programs"]] == [("train", 2), ("train", 1)]
  for p in rep["programs"]:
    assert p["fits"] and p["est_step_s"] > 0 and 0 < p["est_mfu"] <= 1
    assert p["flops_hlo"] == pytest.approx(p["flops_analytic"], rel=1e-3)
    assert p["bytes_per_device"]["arguments"] < 0.5 * chips.GiB  # sharded state, ~0.34 GiB
  assert rep["est_chip_hours"] > 0
  assert "ESTIMATE" in out.stdout
