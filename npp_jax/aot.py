"""Ahead-of-time compilation of every program a run executes, for a TPU pod slice, on any host.

  python -m npp_jax.aot --config=configs/npp_xl.py --topology=v5p-64 [--json]

Owns: building a TPU topology's devices without a TPU (libtpu's compiler describes them), the
config's mesh over them, the abstract sharded state (nothing is allocated), and compiling with the
real TPU compiler the programs the run executes: the train step of every patch level of the
schedule, the eval step, the sampler (prefill + decode loop with CFG) and, when asked, the VQ
decode. Per program it reports compile time, per-device memory against the chip's HBM, XLA's and
the analytic FLOPs, and a roofline ESTIMATE (see `npp_jax/hlo_cost.py`) of step time, images/s
per chip and MFU, plus the whole schedule's chip-hours.

The programs are built by the same functions a run uses (`train.StepFns`, `hooks.make_eval_step`,
`sample`'s jitted generator, `vq.sharded_jit`) and the kernel set is chosen from the mesh's
devices (`npp_jax/kernels.py`), so what compiles here is what a TPU run executes.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from npp_jax import (chips, config_lib, flops, hlo_cost, hooks, kernels, optim, patching,
                     sharding, train)
from npp_jax import model as model_lib

PROGRAMS = ("train", "eval", "sample", "vq_decode")
IMAGENET_TRAIN_IMAGES = 1_281_167
INSTALL_HINT = ('the TPU compiler (libtpu) is not installed; install the tpu extra: '
                'pip install -e ".[tpu]"  (or pip install "jax[tpu]" matching your jax version).')


class DoesNotFitError(ValueError):
  """A program's per-device memory exceeds the chip's HBM."""


def topology_devices(topology: str) -> list:
  """The TPU devices of a topology descriptor (e.g. "v5p:2x4x4"), without a TPU: libtpu's
  compiler describes them. Several processes may load libtpu for this (nothing runs on a TPU)."""
  if importlib.util.find_spec("libtpu") is None:
    raise RuntimeError(INSTALL_HINT)
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  return list(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)


def _abstract(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


@dataclasses.dataclass
class Program:
  """One program to compile: its name, patch size, how to lower it, and its analytic work."""
  name: str
  patch_size: int | None
  lower: Callable[[], Any]
  flops_analytic: float  # whole program, all devices.
  images: int  # images the program processes (global).


@dataclasses.dataclass
class Plan:
  accelerator: chips.Accelerator
  devices: list
  mesh: jax.sharding.Mesh
  programs: list[Program]
  schedule: patching.Schedule
  compiler_options: dict = dataclasses.field(default_factory=dict)


def plan(config: ml_collections.ConfigDict, topology: str, *, programs=PROGRAMS,
         num_train_images: int = IMAGENET_TRAIN_IMAGES, sample_per_device_batch: int = 32,
         devices: list | None = None) -> Plan:
  """Validates the config against the topology and builds the programs (nothing compiles)."""
  unknown = set(programs) - set(PROGRAMS)
  if unknown:
    raise ValueError(f"programs {sorted(unknown)} are unknown; choose from {PROGRAMS}.")
  acc = chips.accelerator(topology)
  devices = topology_devices(acc.topology) if devices is None else devices
  processes = len({d.process_index for d in devices})
  config = config.copy_and_resolve_references()
  if not config.data.path and not config.data.builtin:
    with config.unlocked():
      config.data.path = "(no data is read to compile)"
  try:
    config_lib.validate(config, num_devices=len(devices), process_count=processes)
  except ValueError as e:
    raise ValueError(f"{e} (topology {topology}: {len(devices)} devices)") from None
  mesh = sharding.make_mesh(dict(config.mesh), devices)
  model_cfg = config_lib.model_config(config)
  spe = config.data.steps_per_epoch if config.data.steps_per_epoch > 0 else max(
      num_train_images // config.global_batch_size, 1)
  schedule = config_lib.schedule(config, spe * config.global_batch_size)
  tx = optim.make_optimizer(config, schedule, spe)
  lr_fn = optim.learning_rate(config, schedule, spe)

  graphdef, params = sharding.abstract_sharded(
      lambda: model_lib.Transformer(model_cfg, rngs=nnx.Rngs(0)), mesh)
  param_sh = jax.tree.map(lambda x: x.sharding, params)
  opt_state = _abstract(jax.eval_shape(tx.init, params),
                        train.optimizer_shardings(tx, params, param_sh, mesh))
  state = {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding.replicated(mesh)),
           "params": params, "opt_state": opt_state}
  if config.optim.ema_decay > 0:
    state["ema"] = params
  b, n = config.global_batch_size, model_cfg.num_tokens
  batch_sh = sharding.batch_sharding(mesh)
  codes = jax.ShapeDtypeStruct((b, n), jnp.int32, sharding=batch_sh)
  labels = jax.ShapeDtypeStruct((b,), jnp.int32, sharding=batch_sh)
  out: list[Program] = []
  if "train" in programs:
    step_fns = train.StepFns(graphdef, tx, lr_fn, config, mesh, state)
    batch = {"codes": codes, "labels": labels}
    for p in dict.fromkeys(schedule.patch_sizes):
      out.append(Program("train", p, functools.partial(step_fns.lower, p, state, batch),
                         b * flops.train_flops_per_image(model_cfg, p), b))
  if "eval" in programs:
    eval_batch = {"codes": codes, "labels": labels,
                  "mask": jax.ShapeDtypeStruct((b,), jnp.bool_, sharding=batch_sh)}

    def lower_eval():
      with sharding.use_mesh(mesh):
        return hooks.make_eval_step(graphdef, mesh).lower(params, eval_batch)
    out.append(Program("eval", 1, lower_eval, b * flops.forward_flops_per_image(model_cfg, 1), b))
  # Sampling and decoding run on the sampling CLI's default mesh: every device on 'data'.
  data_mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, devices)
  sb = sample_per_device_batch * len(devices)
  if "sample" in programs:
    out.append(_sample_program(config, model_cfg, data_mesh, sb))
  if "vq_decode" in programs:
    out.append(_vq_program(model_cfg, data_mesh, sb))
  return Plan(acc, devices, mesh, out, schedule, kernels.compiler_options(config, mesh) or {})


def _sample_program(config, model_cfg, mesh, batch: int) -> Program:
  from npp_jax import sample
  cfg = dataclasses.replace(model_cfg, **sample.NO_DROPOUT)
  graphdef, state = sharding.abstract_sharded(
      lambda: model_lib.Transformer(cfg, rngs=nnx.Rngs(0)), mesh)
  opts = sample.SamplingOptions(**sample.options_from_config(config)).validate()
  labels = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=sharding.batch_sharding(mesh))
  key = jax.eval_shape(lambda: jax.random.key(0))
  rep = sharding.replicated(mesh)
  rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=rep)
  offset = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)

  def lower():
    with sharding.use_mesh(mesh):
      return sample._generate_jit.lower(graphdef, state, labels, rng, offset, opts=opts,  # pylint: disable=protected-access
                                        return_logits=False, recompute=False)
  rows = 2 if opts.use_cfg else 1
  return Program("sample", None, lower, batch * flops.sample_flops_per_image(cfg, cfg_rows=rows),
                 batch)


def _vq_program(model_cfg, mesh, batch: int) -> Program:
  from npp_jax import vq
  vq_cfg = vq.VQConfig(codebook_size=model_cfg.vocab_size)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: vq.VQModel(vq_cfg, rngs=nnx.Rngs(0))))
  state = _abstract(state, jax.tree.map(lambda _: sharding.replicated(mesh), state))
  codes = jax.ShapeDtypeStruct((batch, model_cfg.num_tokens), jnp.int32,
                               sharding=sharding.batch_sharding(mesh))
  run = vq.sharded_jit(graphdef, mesh, "decode_from_indices")

  def lower():
    with sharding.use_mesh(mesh):
      return run.lower(state, codes)
  return Program("vq_decode", None, lower, 0.0, batch)


# ---------------------------------------------------------------------------------------------
# Compiling and estimating.
# ---------------------------------------------------------------------------------------------
def _cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return cost or {}


def _hlo_name(prog: Program) -> str:
  return prog.name + (f"_p{prog.patch_size}" if prog.patch_size else "") + ".hlo.txt"


def analyse(prog: Program, pl: Plan, hlo_dir: str | None = None) -> dict:
  """Compiles one program and returns its figures (per device unless named otherwise)."""
  acc, n_dev = pl.accelerator, len(pl.devices)
  per_chip = n_dev // acc.num_chips  # v4 topologies describe each TensorCore as a device.
  hbm = acc.chip.hbm_bytes // per_chip
  peak = acc.chip.peak_bf16_flops / per_chip
  t0 = time.time()
  compiled = prog.lower().compile(compiler_options=pl.compiler_options or None)
  compile_s = time.time() - t0
  mem = compiled.memory_analysis()
  by = {"arguments": int(mem.argument_size_in_bytes), "outputs": int(mem.output_size_in_bytes),
        "temporaries": int(mem.temp_size_in_bytes), "code": int(mem.generated_code_size_in_bytes),
        "aliased": int(mem.alias_size_in_bytes)}
  by["total"] = (by["arguments"] + by["outputs"] - by["aliased"] + by["temporaries"] + by["code"])
  cost = _cost(compiled)
  text = compiled.as_text()
  if hlo_dir:
    from etils import epath
    (epath.Path(hlo_dir) / _hlo_name(prog)).write_text(text)
  hlo = hlo_cost.analyse(text, n_dev)
  flops_analytic = prog.flops_analytic / n_dev
  est = hlo_cost.roofline(flops=max(hlo.flops, flops_analytic), bytes_accessed=hlo.bytes_accessed,
                          collective_bytes=hlo.collective_bytes, peak_flops=peak,
                          hbm_bytes_per_s=acc.chip.hbm_bytes_per_s / per_chip,
                          ici_bytes_per_s=acc.chip.ici_bytes_per_s / per_chip)
  step = est["seconds"]
  return {
      "name": prog.name, "patch_size": prog.patch_size, "compile_s": round(compile_s, 2),
      "bytes_per_device": {k: by[k] for k in ("arguments", "outputs", "temporaries", "code",
                                              "total")},
      "hbm_bytes": hbm, "fits": by["total"] <= hbm,
      "flops_xla": float(cost.get("flops", 0.0)), "flops_hlo": hlo.flops,
      "flops_analytic": flops_analytic,
      "bytes_accessed": hlo.bytes_accessed, "bytes_accessed_xla": float(cost.get("bytes accessed", 0.0)),
      "collective_bytes": hlo.collective_bytes, "collectives": hlo.collective_counts,
      "loops_without_trip_count": hlo.unknown_loops,
      "est_step_s": step, "est_bound": est["bound"], "est_terms_s": est["terms"],
      "est_images_per_s_per_chip": prog.images / step / acc.num_chips if step else 0.0,
      # Model FLOPs: analytic where defined (the transformer), else those counted in the HLO.
      "est_mfu": (flops_analytic or hlo.flops) / (step * peak) if step else 0.0,
  }


def _advice(result: dict) -> str:
  name = result["name"]
  if name == "train":
    return ("config.model.remat (full < dots_no_batch < dots < none in memory), a mesh with more "
            "fsdp devices (config.mesh), or a smaller config.global_batch_size")
  if name == "eval":
    return "a smaller config.global_batch_size or more fsdp devices (config.mesh)"
  return "a smaller --sample_per_device_batch"


def check_fits(results: list[dict], pl: Plan) -> None:
  """Raises DoesNotFitError naming each program that exceeds the chip's HBM."""
  bad = [r for r in results if not r["fits"]]
  if bad:
    lines = [f"{r['name']}" + (f" (patch size {r['patch_size']})" if r["patch_size"] else "") +
             f" needs {r['bytes_per_device']['total'] / chips.GiB:.2f} GiB per device but a "
             f"{pl.accelerator.chip.name} device has {r['hbm_bytes'] / chips.GiB:.2f} GiB of HBM; "
             f"reduce it with {_advice(r)}" for r in bad]
    raise DoesNotFitError("; ".join(lines) + ".")


def chip_hours(results: list[dict], pl: Plan) -> float | None:
  """ESTIMATE of the whole schedule's chip-hours from the train programs' estimated steps."""
  by_p = {r["patch_size"]: r["est_step_s"] for r in results if r["name"] == "train"}
  if not all(s.patch_size in by_p for s in pl.schedule.segments):
    return None
  seconds = sum((s.end - s.start) * by_p[s.patch_size] for s in pl.schedule.segments)
  return seconds * pl.accelerator.num_chips / 3600.0


def report(results: list[dict], pl: Plan, config) -> dict:
  mesh = {k: int(v) for k, v in pl.mesh.shape.items()}
  return {"topology": pl.accelerator.name, "chip": pl.accelerator.chip.name,
          "num_devices": len(pl.devices), "num_chips": pl.accelerator.num_chips, "mesh": mesh,
          "global_batch_size": int(config.global_batch_size), "remat": config.model.remat,
          "schedule_steps": [[s.patch_size, s.start, s.end] for s in pl.schedule.segments],
          "programs": results, "est_chip_hours": chip_hours(results, pl)}


def format_table(rep: dict) -> str:
  gib = chips.GiB
  lines = [f"{rep['topology']} ({rep['num_chips']} {rep['chip']} chips, {rep['num_devices']} "
           f"devices), mesh {rep['mesh']}, global batch {rep['global_batch_size']}, remat "
           f"{rep['remat']}. Memory from the TPU compiler; times, images/s and MFU are ESTIMATES "
           f"(roofline over the compiled HLO), not measurements.",
           f"{'program':<11}{'p':>3}{'compile s':>10}{'args GiB':>9}{'temp GiB':>9}"
           f"{'total/HBM':>14}{'TFLOP xla':>10}{'TFLOP hlo':>10}{'TFLOP model':>12}{'GB mem':>8}"
           f"{'GB ici':>8}{'est ms':>9}{'bound':>11}{'est img/s/chip':>15}{'est MFU':>8}"]
  for r in rep["programs"]:
    b = r["bytes_per_device"]
    lines.append(
        f"{r['name']:<11}{r['patch_size'] or '-':>3}{r['compile_s']:>10.1f}"
        f"{b['arguments'] / gib:>9.2f}{b['temporaries'] / gib:>9.2f}"
        f"{b['total'] / gib:>7.1f}/{r['hbm_bytes'] / gib:<6.0f}"
        f"{r['flops_xla'] / 1e12:>10.2f}{r['flops_hlo'] / 1e12:>10.2f}"
        f"{r['flops_analytic'] / 1e12:>12.2f}{r['bytes_accessed'] / 1e9:>8.1f}"
        f"{r['collective_bytes'] / 1e9:>8.2f}{r['est_step_s'] * 1e3:>9.1f}{r['est_bound']:>11}"
        f"{r['est_images_per_s_per_chip']:>15.1f}{r['est_mfu']:>8.1%}")
  if rep["est_chip_hours"] is not None:
    lines.append(f"Whole schedule {rep['schedule_steps']} (patch size, start, end step): "
                 f"~{rep['est_chip_hours']:,.0f} chip-hours (ESTIMATE).")
  return "\n".join(lines)


def run(config: ml_collections.ConfigDict, topology: str, *, programs=PROGRAMS,
        num_train_images: int = IMAGENET_TRAIN_IMAGES, sample_per_device_batch: int = 32,
        log: Callable[[str], None] = print, hlo_dir: str | None = None) -> dict:
  """Plans, compiles and analyses every program; raises DoesNotFitError if one does not fit.
  With `hlo_dir`, each program's optimised TPU HLO is written there (<name>[_p<p>].hlo.txt)."""
  pl = plan(config, topology, programs=programs, num_train_images=num_train_images,
            sample_per_device_batch=sample_per_device_batch)
  results = []
  for prog in pl.programs:
    log(f"Compiling {prog.name}" + (f" (patch size {prog.patch_size})" if prog.patch_size else "")
        + f" for {topology} ...")
    results.append(analyse(prog, pl, hlo_dir))
    r = results[-1]
    log(f"  {r['compile_s']:.0f} s; {r['bytes_per_device']['total'] / chips.GiB:.2f} of "
        f"{r['hbm_bytes'] / chips.GiB:.0f} GiB per device; est. {r['est_step_s'] * 1e3:.1f} ms "
        f"({r['est_bound']}-bound), est. MFU {r['est_mfu']:.1%}")
  rep = report(results, pl, config)
  log(format_table(rep))
  check_fits(results, pl)
  return rep


def main(argv):
  del argv
  from absl import flags
  f = flags.FLAGS
  programs = tuple(p for p in f.programs.split(",") if p)
  if f.config.sample.vq_checkpoint and "vq_decode" not in programs and f.programs == _DEFAULT:
    programs += ("vq_decode",)
  # TPU executables cannot be reloaded on this host: keep them out of a persistent cache.
  jax.config.update("jax_enable_compilation_cache", False)
  # stdout carries the table (and the JSON last); libtpu's own warnings go to stderr.
  try:
    rep = run(f.config, f.topology, programs=programs, num_train_images=f.num_train_images,
              sample_per_device_batch=f.sample_per_device_batch,
              log=lambda s: print(s, flush=True), hlo_dir=f.hlo_dir)
  except DoesNotFitError as e:
    print(f"Does not fit: {e}", file=sys.stderr)
    sys.exit(3)
  except (ValueError, RuntimeError) as e:
    print(f"Error: {e}", file=sys.stderr)
    sys.exit(2)
  if f.json:
    print(json.dumps(rep))


_DEFAULT = "train,eval,sample"

if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
  flags.DEFINE_string("topology", None, "Cloud TPU accelerator type (v5p-64, v5litepod-16, "
                      "v6e-8, v4-32) or a topology (v5p:2x4x4).")
  flags.DEFINE_string("programs", _DEFAULT, "Comma-separated subset of "
                      f"{','.join(PROGRAMS)} (vq_decode is added when the config names a VQ "
                      "checkpoint).")
  flags.DEFINE_integer("num_train_images", IMAGENET_TRAIN_IMAGES,
                       "Training set size, for the schedule's steps (ImageNet-1k train).")
  flags.DEFINE_integer("sample_per_device_batch", 32, "Images per device of the sampler "
                       "(as the sampling CLI's --per_device_batch).")
  flags.DEFINE_string("hlo_dir", None, "Write each program's optimised TPU HLO here.")
  flags.DEFINE_bool("json", False, "Print one JSON object as the last line of stdout.")
  flags.mark_flags_as_required(["config", "topology"])
  app.run(main)
