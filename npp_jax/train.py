"""Training: the train state, the pure train step, and `train_and_evaluate`: set-up, loop, finish.

The state is arrays only ({step, params, opt_state} and optionally ema); the step is a
module-level pure function jitted once per patch size with explicit shardings and a donated state;
dropout keys are folded from the step; the patch size and the learning rate are pure functions of
the step. So a resumed run needs nothing but the state and the data position, and it continues bit
for bit. The loop trains, logs (loss, norms, LR, throughput, MFU, input wait), checkpoints, and
calls the hooks that the config asks for (npp_jax/hooks.py: eval loss, sample grids, profile, a
built-in data set's report). Compiled programs go to a persistent compilation cache
(config.compile_cache), from which a restarted run loads them instead of compiling.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers, parameter_overview, periodic_actions
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from jax.experimental.compilation_cache import compilation_cache

from npp_jax import (builtin_data, chips, config_lib, data, flops, kernels, optim, patching,
                     sharding)
from npp_jax import checkpoint as ckpt_lib
from npp_jax import hooks as hooks_lib
from npp_jax import load
from npp_jax import model as model_lib

State = hooks_lib.State
host = hooks_lib.host


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or infinite; training stops and the last good checkpoint is kept.

  `step`: the step whose metrics were not finite; `kept_step`: the last good checkpoint's step
  (None if there is none)."""

  def __init__(self, message: str, *, step: int, kept_step: int | None):
    super().__init__(message)
    self.step, self.kept_step = step, kept_step


# ---------------------------------------------------------------------------------------------
# Pure steps.
# ---------------------------------------------------------------------------------------------
def loss_fn(graphdef: nnx.GraphDef, params: nnx.State, batch: dict, patch_size: int,
            rng: jax.Array | None) -> jax.Array:
  """NPP loss of one batch: mean CE of every patch position against its p*p target tokens."""
  model = nnx.merge(graphdef, params)
  x = model.hidden(batch["codes"], batch["labels"], patch_size=patch_size,
                   deterministic=rng is None, rng=rng)
  h = model.normed(x)
  return kernels.output_patch_loss(h, model.output[...].astype(h.dtype),
                                   patching.group_targets(batch["codes"], patch_size),
                                   kernels=kernels.resolve(model.cfg.kernels))


def train_step(state: State, batch: dict, *, graphdef: nnx.GraphDef,
               tx: optax.GradientTransformation, lr_fn: optax.Schedule, patch_size: int,
               seed: int, ema_decay: float) -> tuple[State, dict]:
  """One optimizer step (forward, backward, clipping, AdamW), plus optional EMA."""
  step = state["step"]
  rng = jax.random.fold_in(jax.random.key(seed), step)
  loss, grads = jax.value_and_grad(
      lambda p: loss_fn(graphdef, p, batch, patch_size, rng))(state["params"])
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  new_state = {"step": step + 1, "params": params, "opt_state": opt_state}
  if "ema" in state:
    new_state["ema"] = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p,
                                    state["ema"], params)
  metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
             "param_norm": optax.tree.norm(params), "lr": lr_fn(step)}
  return new_state, metrics


# ---------------------------------------------------------------------------------------------
# Set-up.
# ---------------------------------------------------------------------------------------------
def create_state(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                 tx: optax.GradientTransformation) -> tuple[nnx.GraphDef, State]:
  """Model and optimizer state created directly sharded on `mesh`."""
  model_cfg = config_lib.model_config(config)
  model = sharding.create_sharded(
      lambda: model_lib.Transformer(model_cfg, rngs=nnx.Rngs(config.seed)), mesh)
  graphdef, params = nnx.split(model)
  param_sh = jax.tree.map(lambda x: x.sharding, params)
  with sharding.use_mesh(mesh):
    opt_state = jax.jit(tx.init, out_shardings=optimizer_shardings(tx, params, param_sh, mesh))(
        params)
  state = {"step": jax.device_put(jnp.zeros((), jnp.int32), sharding.replicated(mesh)),
           "params": params, "opt_state": opt_state}
  if config.optim.ema_decay > 0:
    state["ema"] = jax.tree.map(lambda x, s: jax.device_put(jnp.copy(x), s), params, param_sh)
  return graphdef, state


def optimizer_shardings(tx: optax.GradientTransformation, params: Any, param_shardings: Any,
                        mesh: jax.sharding.Mesh) -> Any:
  """Shardings of `tx.init(params)`: every leaf shaped like a parameter (Adam's mu and nu) is
  sharded like it, the rest (counts) replicated. Left to XLA, the moments would be replicated on
  every device. `params` may be abstract (ShapeDtypeStructs)."""
  return optax.tree_map_params(
      tx, lambda _, s: s, jax.eval_shape(tx.init, params), param_shardings,
      transform_non_params=lambda _: sharding.replicated(mesh))


class StepFns:
  """One compiled train step per patch size, compiled on first use with explicit shardings."""

  def __init__(self, graphdef, tx, lr_fn, config, mesh, state: State):
    self._make = lambda p: jax.jit(
        functools.partial(train_step, graphdef=graphdef, tx=tx, lr_fn=lr_fn, patch_size=p,
                          seed=config.seed, ema_decay=config.optim.ema_decay),
        in_shardings=(self.state_shardings, self.batch_shardings),
        out_shardings=(self.state_shardings, sharding.replicated(mesh)),
        donate_argnums=0)
    self.state_shardings = jax.tree.map(lambda x: x.sharding, state)
    self.batch_shardings = sharding.batch_sharding(mesh)
    self.mesh = mesh
    self.compiler_options = kernels.compiler_options(config, mesh)
    self.compiled: dict[int, Callable] = {}
    self.compile_seconds = 0.0  # spent in compiling (or loading from the cache) so far.

  def lower(self, patch_size: int, state: State, batch: dict) -> jax.stages.Lowered:
    """The train step of `patch_size` lowered for these arguments (arrays or abstract
    ShapeDtypeStructs with shardings: `npp_jax.aot` compiles it for a TPU topology)."""
    with sharding.use_mesh(self.mesh):
      return self._make(patch_size).lower(state, batch)

  def __call__(self, patch_size: int, state: State, batch: dict) -> tuple[State, dict]:
    if patch_size not in self.compiled:
      t0, hits = time.perf_counter(), _cache_hits[0]
      self.compiled[patch_size] = self.lower(patch_size, state, batch).compile(
          compiler_options=self.compiler_options)
      dt = time.perf_counter() - t0
      self.compile_seconds += dt
      logging.info("Compiled the train step for patch size %d in %.1fs%s.", patch_size, dt,
                   " (loaded from the persistent compilation cache)" if _cache_hits[0] > hits
                   else "")
    with sharding.use_mesh(self.mesh):
      return self.compiled[patch_size](state, batch)


_cache_hits = [0]  # persistent compilation cache hits of this process (jax.monitoring events).


def _count_cache_hit(event: str, **_) -> None:
  if event == "/jax/compilation_cache/cache_hits":
    _cache_hits[0] += 1


jax.monitoring.register_event_listener(_count_cache_hit)


def use_compile_cache(config: ml_collections.ConfigDict, workdir: epath.Path) -> str | None:
  """Points JAX's persistent compilation cache at config.compile_cache ("{workdir}" replaced by
  `workdir`; local or gs://, which JAX reads through etils.epath). Must run before the first
  compile. Returns the directory, or None for "" (JAX's own setting is left as it is)."""
  if not config.compile_cache:
    return None
  path = str(ckpt_lib.as_path(config.compile_cache.replace("{workdir}", str(workdir))))
  if jax.config.jax_compilation_cache_dir != path:
    jax.config.update("jax_compilation_cache_dir", path)
    compilation_cache.reset_cache()  # a cache opened on another directory reopens on this one.
  return path


def _make_writer(workdir: epath.Path):
  return metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0, asynchronous=True)


def data_path(config: ml_collections.ConfigDict, workdir: epath.Path) -> epath.Path:
  """config.data.path, or the built-in data set config.data.builtin, built once by process 0
  into <workdir>/<name>_tokens."""
  if not config.data.builtin:
    return epath.Path(config.data.path)
  path = workdir / f"{config.data.builtin}_tokens"
  if jax.process_index() == 0:
    builtin_data.lookup(config.data.builtin).build(path)
  multihost_utils.sync_global_devices("builtin_data_built")
  return path


def _restore_or_init(config, ckpt: ckpt_lib.Checkpointer, state: State, data_iter) -> tuple[State, str]:
  """Resume from the workdir, else initialise from config.ckpt.init_from, else scratch."""
  latest = ckpt.latest_step()
  if latest is not None:
    same_procs = ckpt.saved_process_count(latest) == jax.process_count()
    state = ckpt.restore(latest, state, data_iter if same_procs else None)
    return state, f"resumed from {ckpt.directory / str(latest)}"
  if config.ckpt.init_from:
    params = load.load_params(config.ckpt.init_from, state["params"])
    state = dict(state, params=params)
    if "ema" in state:
      state["ema"] = jax.tree.map(jnp.copy, params)
    return state, f"initialised params from {config.ckpt.init_from}"
  return state, "started from scratch"


def _check_resumed_config(config, workdir, step: int, allow: bool) -> None:
  """Refuses to resume with a config that changes what the run computes (see
  config_lib.resume_changes), unless `allow`; then keeps the earlier config beside the new one."""
  saved_file = workdir / "config.json"
  if not saved_file.exists():
    return
  try:
    saved = json.loads(saved_file.read_text())
  except ValueError as e:
    raise ValueError(f"{saved_file} (the config of this workdir's earlier run) is not valid "
                     f"JSON: {e}") from e
  changes = config_lib.resume_changes(saved, config)
  if not changes:
    return
  shown = "; ".join(f"{k}: saved {old!r}, now {new!r}" for k, old, new in changes[:12])
  if len(changes) > 12:
    shown += f"; and {len(changes) - 12} more"
  if not allow:
    raise ValueError(
        f"resuming {workdir} at step {step} with a config that changes the run ({shown}). Use a "
        f"new workdir for another experiment, rerun with the saved config ({saved_file}), or pass "
        f"--allow_config_change to continue this run with the new values.")
  logging.warning("Resuming at step %d with config changes: %s.", step, shown)
  if jax.process_index() == 0:
    (workdir / f"config.before_step_{step}.json").write_text(saved_file.read_text())


# ---------------------------------------------------------------------------------------------
# Throughput.
# ---------------------------------------------------------------------------------------------
class _Meter:
  """Throughput of the steps since the last log: images/s (also per chip: a JAX device is one
  chip on TPU v4 and later), tokens/s, MFU (analytic model FLOPs, npp_jax/flops.py, over the chips'
  bf16 peak; only where npp_jax/chips.py knows the chip, never on CPU), and the fraction of the
  time the host spent waiting for the next batch (the device may still be running the previous
  step meanwhile, so it bounds the input-bound time from above). Time in hooks and compiling is
  not step time and is left out."""

  def __init__(self, config: ml_collections.ConfigDict, patch_sizes):
    model_cfg = config_lib.model_config(config)
    self.batch = config.global_batch_size
    self.tokens_per_image = model_cfg.num_tokens
    self.flops_per_image = {p: flops.train_flops_per_image(model_cfg, p) for p in patch_sizes}
    self.devices = jax.device_count()
    self.peak = chips.peak_flops(jax.devices()[0].device_kind)
    self.reset()

  def reset(self) -> None:
    self.t0, self.images, self.flops = time.perf_counter(), 0, 0.0
    self.wait, self.excluded = 0.0, 0.0  # seconds waiting for data; in hooks and compiling.

  def step(self, patch_size: int) -> None:
    self.images += self.batch
    self.flops += self.batch * self.flops_per_image[patch_size]

  def scalars(self) -> dict:
    dt = max(time.perf_counter() - self.t0 - self.excluded, 1e-9)
    out = {"images_per_s": self.images / dt,
           "images_per_s_per_chip": self.images / dt / self.devices,
           "tokens_per_s": self.images * self.tokens_per_image / dt,
           "host_data_wait_fraction": min(self.wait / dt, 1.0)}
    if self.peak:
      out["mfu"] = self.flops / dt / (self.devices * self.peak)
    self.reset()
    return out


# ---------------------------------------------------------------------------------------------
# Set-up, loop, finish.
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Loop:
  """What the loop moves along besides the hooks' `Run`."""
  state: State
  data_iter: Any
  ckpt: ckpt_lib.Checkpointer
  step_fns: StepFns
  schedule: patching.Schedule
  cost: float
  last: dict = dataclasses.field(default_factory=dict)  # the latest fetched metrics.


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       max_steps: int | None = None, allow_config_change: bool = False) -> dict:
  """Trains `config` in `workdir` (local or gs://), resuming whatever is there.

  Args:
    config: an experiment config (configs/*.py).
    workdir: checkpoints, TensorBoard events and the resolved config go here.
    max_steps: stop after this many steps of this run (dry runs, tests); the schedule is unchanged.
    allow_config_change: resume even though the config changes keys that define the run
      (model, npp, optim, batch size, seed, splits; see config_lib.RESUMABLE_CHANGES for what may
      always change); the earlier config is kept as config.before_step_<step>.json.

  Returns:
    A summary: final step, last train loss, the schedule's cost ratio, compiled patch sizes,
    seconds to this run's first step, wall seconds from start-up to the last step
    (train_seconds) and in the hooks' finish (finish_seconds: final eval, samples), and the
    hooks' entries (eval loss; "report" lines).
    Per-step metrics go to the metric writer (TensorBoard events and the log), not here.
  """
  t_begin = time.perf_counter()
  run, loop = _set_up(config, ckpt_lib.as_path(workdir), max_steps, allow_config_change)
  hooks = []
  try:
    hooks = hooks_lib.from_config(run)
    preempted, first_step_s = _train(run, loop, hooks, t_begin)
    summary = {"step": int(host(loop.state["step"])), "train_loss": loop.last.get("loss"),
               "training_cost": loop.cost, "compiled_patch_sizes": sorted(loop.step_fns.compiled),
               "seconds_to_first_step": first_step_s, "workdir": str(run.workdir),
               "train_seconds": time.perf_counter() - t_begin}
    if preempted:
      # Exit within the preemption grace period: the final eval and samples wait for the resumed
      # run that finishes training.
      summary["preempted"] = True
    else:
      summary["report"] = []
      t_finish = time.perf_counter()
      for h in hooks:
        entries = dict(h.finish(summary["step"], loop.state, summary))
        summary["report"] += entries.pop("report", [])
        summary.update(entries)
      summary["finish_seconds"] = time.perf_counter() - t_finish
  finally:
    for h in hooks:
      h.close()
    loop.ckpt.close()
    run.writer.close()
  logging.info("%s: %s", "Preempted" if summary.get("preempted") else "Done",
               json.dumps({k: v for k, v in summary.items() if k != "report"}))
  return summary


def _set_up(config, workdir: epath.Path, max_steps, allow_config_change
            ) -> tuple[hooks_lib.Run, _Loop]:
  """Validates the config, points the compile cache, opens the data, builds or restores the
  state, and writes config.json once the resume checks passed."""
  config_lib.validate(config, num_devices=jax.device_count(), process_count=jax.process_count())
  cache = use_compile_cache(config, workdir)
  mesh = sharding.make_mesh(dict(config.mesh))
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
  path = data_path(config, workdir)
  source = data.open_split(path, config.data.train_split)
  meta = source.metadata
  if meta.vocab_size > config.model.vocab_size or meta.num_classes > config.model.num_classes:
    raise ValueError(f"config.data.path={path} holds vocab {meta.vocab_size} and "
                     f"{meta.num_classes} classes, more than config.model.vocab_size="
                     f"{config.model.vocab_size} / config.model.num_classes={config.model.num_classes}.")
  if config.data.builtin and meta.vocab_size != config.model.vocab_size:
    raise ValueError(f"config.model.vocab_size={config.model.vocab_size} must equal the vocabulary "
                     f"({meta.vocab_size}) of config.data.builtin={config.data.builtin!r}: its "
                     f"palette draws only those tokens.")
  if meta.grid_size != config.model.grid_size:
    raise ValueError(f"config.data.path={path} holds {meta.grid_size}x{meta.grid_size} "
                     f"token grids but config.model.grid_size={config.model.grid_size}.")
  spe = config_lib.steps_per_epoch(config, len(source))
  schedule = config_lib.schedule(config, len(source))
  tx = optim.make_optimizer(config, schedule, spe)
  cost = patching.training_cost(schedule)
  logging.info("Mesh %s over %d devices in %d processes; compilation cache: %s.",
               dict(mesh.shape), jax.device_count(), jax.process_count(), cache or "JAX's default")
  logging.info("Schedule: %s; training cost relative to next-token prediction: %.4f.",
               [(s.patch_size, s.start, s.end) for s in schedule.segments], cost)

  graphdef, state = create_state(config, mesh, tx)
  train_data = functools.partial(
      data.make_train_dataset, path, split=config.data.train_split,
      global_batch_size=config.global_batch_size, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count(),
      num_workers=config.data.num_workers)
  data_iter = iter(train_data())
  ckpt = ckpt_lib.Checkpointer(workdir, keep=config.ckpt.keep)
  state, how = _restore_or_init(config, ckpt, state, data_iter)
  start = int(host(state["step"]))
  if ckpt.latest_step() is not None:
    _check_resumed_config(config, workdir, start, allow_config_change)
  if jax.process_index() == 0:  # after the checks: a refused run leaves the saved config as it was.
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))
  if ckpt.latest_step() is not None and ckpt.saved_process_count(start) != jax.process_count():
    # Saved by another process count: its iterator states do not apply; the data position is a
    # function of the step (see data.make_train_dataset).
    data_iter = iter(train_data(start_batch=start))
  logging.info("Step %d: %s.", start, how)

  writer = _make_writer(workdir)
  if start == 0:
    parameter_overview.log_parameter_overview(  # shapes and shardings; no host fetch of values.
        nnx.to_pure_dict(state["params"]), include_stats="sharding", jax_logging_process=0)
    writer.write_hparams({k: v if isinstance(v, (int, float, str, bool)) else str(v)
                         for k, v in config_lib.flat_dict(config.to_dict()).items()})
  end = schedule.total_steps if max_steps is None else min(schedule.total_steps, start + max_steps)
  step_fns = StepFns(graphdef, tx, optim.learning_rate(config, schedule, spe), config, mesh, state)
  run = hooks_lib.Run(config=config, workdir=workdir, mesh=mesh, graphdef=graphdef, writer=writer,
                      data_path=path, start=start, end=end)
  return run, _Loop(state=state, data_iter=data_iter, ckpt=ckpt, step_fns=step_fns,
                    schedule=schedule, cost=cost)


def _train(run: hooks_lib.Run, loop: _Loop, hooks: list[hooks_lib.Hook], t_begin: float
           ) -> tuple[bool, float | None]:
  """Steps run.start .. run.end; returns (preempted, seconds from start-up to the first step)."""
  config, ckpt, step_fns = run.config, loop.ckpt, loop.step_fns
  total = loop.schedule.total_steps
  progress = periodic_actions.ReportProgress(num_train_steps=total, writer=run.writer,
                                             every_steps=config.log_every_steps)
  meter = _Meter(config, {s.patch_size for s in loop.schedule.segments})
  boundaries = set(loop.schedule.boundaries)
  pending, first_step_s = None, None

  def check(step, metrics):
    m = {k: float(v) for k, v in host(metrics).items()}
    # The loss is finite on the step whose update overflows the params; their norm is not, so
    # checking every metric keeps such a state from being saved as a good checkpoint.
    bad = {k: v for k, v in m.items() if not np.isfinite(v)}
    if bad:
      kept = ckpt.latest_step()
      raise NonFiniteLossError(
          f"non-finite {', '.join(f'{k}={v}' for k, v in bad.items())} at step {step} "
          f"(loss {m['loss']}); stopping. The last good checkpoint ({kept}) is kept.",
          step=step, kept_step=kept)
    loop.last = m

  for step in range(run.start, run.end):
    t0 = time.perf_counter()
    batch = data.global_batch(next(loop.data_iter), step_fns.batch_shardings)
    meter.wait += time.perf_counter() - t0
    patch_size = loop.schedule.patch_size_at(step)
    compiling = step_fns.compile_seconds
    loop.state, metrics = step_fns(patch_size, loop.state, batch)
    meter.excluded += step_fns.compile_seconds - compiling
    meter.step(patch_size)
    if first_step_s is None:
      jax.block_until_ready(metrics)
      first_step_s = time.perf_counter() - t_begin
      logging.info("First step of this run (step %d) done %.1fs after start-up began (%.1fs of "
                   "it compiling).", step, first_step_s, step_fns.compile_seconds)
    if pending is not None:  # metrics of the previous step: no host sync on this one.
      check(*pending)
    pending = (step, metrics)
    done = step + 1
    progress(done)
    if done % config.log_every_steps == 0 or done == run.end:
      check(*pending)
      run.writer.write_scalars(done, dict(loop.last, patch_size=patch_size, **meter.scalars()))
    save = done % config.ckpt.every_steps == 0 or done in boundaries or done == total
    preempted = ckpt.reached_preemption(done)
    if save or preempted or done == run.end:
      check(*pending)
      ckpt.save(done, loop.state, loop.data_iter)
    if preempted:
      logging.warning("Preemption notice at step %d: saved, exiting.", done)
      ckpt.wait()
      return True, first_step_s
    t0 = time.perf_counter()
    for h in hooks:
      h.after_step(done, loop.state)
    meter.excluded += time.perf_counter() - t0
  return False, first_step_s
