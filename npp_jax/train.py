"""Training: the train state, the pure train/eval steps, and the loop with metrics and checkpoints.

Owns `train_and_evaluate(config, workdir)`. The state is arrays only ({step, params, opt_state}
and optionally ema); the step is a module-level pure function jitted once per patch size with
explicit shardings and a donated state; dropout keys are folded from the step; the patch size and
the learning rate are pure functions of the step. So a resumed run needs nothing but the state and
the data position, and it continues bit for bit.
"""
from __future__ import annotations

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

from npp_jax import checkpoint as ckpt_lib
from npp_jax import config_lib, data, kernels, optim, patching, sharding
from npp_jax import model as model_lib

State = dict[str, Any]


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or infinite; training stops and the last good checkpoint is kept."""


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


def eval_step(params: nnx.State, batch: dict, *, graphdef: nnx.GraphDef) -> dict:
  """Summed next-token (p = 1) CE and token count of the unmasked examples of a batch."""
  model = nnx.merge(graphdef, params)
  logits = model(batch["codes"], batch["labels"], patch_size=1)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["codes"]).mean(-1)
  mask = batch["mask"].astype(jnp.float32)
  return {"ce_sum": jnp.sum(ce * mask), "count": jnp.sum(mask)}


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
    self.compiled: dict[int, Callable] = {}

  def lower(self, patch_size: int, state: State, batch: dict) -> jax.stages.Lowered:
    """The train step of `patch_size` lowered for these arguments (arrays or abstract
    ShapeDtypeStructs with shardings: `npp_jax.aot` compiles it for a TPU topology)."""
    with sharding.use_mesh(self.mesh):
      return self._make(patch_size).lower(state, batch)

  def __call__(self, patch_size: int, state: State, batch: dict) -> tuple[State, dict]:
    if patch_size not in self.compiled:
      t0 = time.time()
      self.compiled[patch_size] = self.lower(patch_size, state, batch).compile()
      logging.info("Compiled the train step for patch size %d in %.1fs.", patch_size,
                   time.time() - t0)
    with sharding.use_mesh(self.mesh):
      return self.compiled[patch_size](state, batch)


def host(tree: Any) -> Any:
  """Numpy values of replicated (possibly multi-process) arrays, from this process's first shard."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


def _make_writer(workdir: epath.Path):
  return metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0, asynchronous=True)


def data_path(config: ml_collections.ConfigDict, workdir: epath.Path) -> epath.Path:
  """config.data.path, or the built-in demo set (built once by process 0) in the workdir."""
  if config.data.builtin != "digits":
    return epath.Path(config.data.path)
  from jax.experimental import multihost_utils
  from npp_jax import digits
  path = workdir / "digits_tokens"
  if jax.process_index() == 0:
    digits.build_digits_shards(path)
  multihost_utils.sync_global_devices("digits_tokens_built")
  return path


def evaluate(config, path, graphdef, params, mesh) -> float | None:
  """Mean next-token CE (nats/token) over `config.eval_batches` batches of the eval split."""
  if not config.data.eval_split:
    return None
  ds = data.make_eval_dataset(path, split=config.data.eval_split,
                              global_batch_size=config.global_batch_size,
                              process_index=jax.process_index(),
                              process_count=jax.process_count())
  shardings = sharding.batch_sharding(mesh)
  with sharding.use_mesh(mesh):
    step = jax.jit(functools.partial(eval_step, graphdef=graphdef))
    total, count = 0.0, 0.0
    for i, batch in enumerate(ds):
      if 0 <= config.eval_batches <= i:
        break
      out = host(step(params, data.global_batch(batch, shardings)))
      total, count = total + float(out["ce_sum"]), count + float(out["count"])
  return total / max(count, 1.0)


@functools.lru_cache(maxsize=2)
def _grid_decoder(model_cfg, mesh, vq_checkpoint: str, builtin: str):
  """The decoder of the training grids, built once per run: building a VQ decoder reads its
  weights and compiles its decode function."""
  from npp_jax import sample
  return sample.make_decoder("auto", model_cfg, mesh, vq_checkpoint=vq_checkpoint, builtin=builtin)


def sample_images(config, graphdef, params, mesh, step: int, per_class: int = 1):
  """A labelled grid of `per_class` CFG samples of each of config.sample.grid_classes, plus the
  decoded images and their labels (decoded with the VQ of config.sample.vq_checkpoint, or the
  digits palette)."""
  from npp_jax import sample
  model = nnx.merge(graphdef, params)
  decoder = _grid_decoder(model.cfg, mesh, config.sample.vq_checkpoint, config.data.builtin)
  labels = np.repeat(np.asarray(config.sample.grid_classes, np.int32), per_class)
  pad = -len(labels) % sample.batch_shards(mesh)
  sampler = sample.make_sampler(model, mesh, **sample.options_from_config(config))
  rng = jax.random.fold_in(jax.random.key(config.seed + 1), step)
  codes = sample.to_host(sampler(np.concatenate([labels, labels[:pad]]), rng))[: len(labels)]
  images = decoder(codes)
  grid = sample.class_grid(images, labels, ncols=per_class if per_class > 1 else len(labels))
  return grid, images, labels


def _digits_report(config, graphdef, params, mesh, step: int, workdir: epath.Path) -> dict:
  """The CPU demo's sample check: a PNG grid and how often a digit classifier agrees."""
  from PIL import Image
  from npp_jax import digits
  grid, images, labels = sample_images(config, graphdef, params, mesh, step, per_class=10)
  accuracy = float(np.mean(digits.fit_digits_classifier()(images) == labels))
  if jax.process_index() == 0:
    with (workdir / "samples.png").open("wb") as f:
      Image.fromarray(grid).save(f, format="PNG")
  return {"sample_accuracy": accuracy, "samples_png": str(workdir / "samples.png"), "grid": grid}


def _restore_or_init(config, ckpt: ckpt_lib.Checkpointer, state: State, data_iter) -> tuple[State, str]:
  """Resume from the workdir, else initialise from config.ckpt.init_from, else scratch."""
  latest = ckpt.latest_step()
  if latest is not None:
    same_procs = ckpt.saved_process_count(latest) == jax.process_count()
    state = ckpt.restore(latest, state, data_iter if same_procs else None)
    return state, f"resumed from {ckpt.directory / str(latest)}"
  if config.ckpt.init_from:
    params = ckpt_lib.load_params(config.ckpt.init_from, state["params"])
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
# The loop.
# ---------------------------------------------------------------------------------------------
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
    A summary: final step, last train loss, eval loss, the schedule's cost ratio, compile count.
  """
  workdir = ckpt_lib.as_path(workdir)
  config_lib.validate(config, num_devices=jax.device_count(), process_count=jax.process_count())
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
  if meta.grid_size != config.model.grid_size:
    raise ValueError(f"config.data.path={path} holds {meta.grid_size}x{meta.grid_size} "
                     f"token grids but config.model.grid_size={config.model.grid_size}.")
  spe = config_lib.steps_per_epoch(config, len(source))
  schedule = config_lib.schedule(config, len(source))
  tx = optim.make_optimizer(config, schedule, spe)
  lr_fn = optim.learning_rate(config, schedule, spe)
  cost = patching.training_cost(schedule)

  logging.info("Mesh %s over %d devices in %d processes.", dict(mesh.shape), jax.device_count(),
               jax.process_count())
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
    writer.write_hparams({k: v for k, v in _flatten(config.to_dict()).items()})
  total = schedule.total_steps
  end = total if max_steps is None else min(total, start + max_steps)
  hooks = [periodic_actions.ReportProgress(num_train_steps=total, writer=writer,
                                           every_steps=config.log_every_steps)]
  step_fns = StepFns(graphdef, tx, lr_fn, config, mesh, state)
  boundaries = set(schedule.boundaries)
  tokens_per_image = config.model.grid_size ** 2

  history: dict[int, float] = {}  # step -> loss of every step whose metrics were fetched.

  def check(step, metrics):
    m = {k: float(v) for k, v in host(metrics).items()}
    # The loss is finite on the step whose update overflows the params; their norm is not, so
    # checking every metric keeps such a state from being saved as a good checkpoint.
    bad = {k: v for k, v in m.items() if not np.isfinite(v)}
    if bad:
      raise NonFiniteLossError(
          f"non-finite {', '.join(f'{k}={v}' for k, v in bad.items())} at step {step} "
          f"(loss {m['loss']}); stopping. The last good checkpoint ({ckpt.latest_step()}) is kept.")
    history[step] = m["loss"]
    return m

  pending, last, t_log, s_log = None, {}, time.time(), start
  preempted_at = None
  try:
    for step in range(start, end):
      batch = data.global_batch(next(data_iter), step_fns.batch_shardings)
      patch_size = schedule.patch_size_at(step)
      state, metrics = step_fns(patch_size, state, batch)
      if pending is not None:  # metrics of the previous step: no host sync on this one.
        last = check(*pending)
      pending = (step, metrics)
      done = step + 1
      for h in hooks:
        h(done)
      if done % config.log_every_steps == 0 or done == end:
        last = check(*pending)
        dt = time.time() - t_log
        images = (done - s_log) * config.global_batch_size
        writer.write_scalars(done, dict(last, patch_size=patch_size, images_per_s=images / dt,
                                        tokens_per_s=images * tokens_per_image / dt))
        t_log, s_log = time.time(), done
      save = done % config.ckpt.every_steps == 0 or done in boundaries or done == total
      preempted = ckpt.reached_preemption(done)
      if save or preempted or done == end:
        last = check(*pending)
        ckpt.save(done, state, data_iter)
      if preempted:
        logging.warning("Preemption notice at step %d: saved, exiting.", done)
        ckpt.wait()
        preempted_at = done
        break
      if config.sample_every_steps and done % config.sample_every_steps == 0 and done < end:
        writer.write_images(done, {"samples": sample_images(
            config, graphdef, state["params"], mesh, done)[0][None]})
      if config.data.eval_split and config.eval_every_steps and done % config.eval_every_steps == 0:
        writer.write_scalars(done, {"eval_loss": evaluate(config, path, graphdef, state["params"], mesh)})
    if preempted_at is None:
      eval_loss = evaluate(config, path, graphdef, state["params"], mesh)
      final = int(host(state["step"]))
      if eval_loss is not None:
        writer.write_scalars(final, {"eval_loss": eval_loss})
  finally:
    ckpt.close()
    writer.flush()
  if preempted_at is not None:
    # Exit within the preemption grace period: the final eval and samples wait for the resumed
    # run that finishes training.
    summary = {"step": preempted_at, "train_loss": last.get("loss"), "preempted": True,
               "training_cost": cost, "workdir": str(workdir)}
    logging.info("Preempted: %s", json.dumps(summary))
    summary["losses"] = dict(sorted(history.items()))
    return summary
  baseline, report = None, {}
  if config.data.builtin == "digits":
    from npp_jax import digits
    if config.data.eval_split:
      baseline = digits.unigram_entropy(path, config.data.eval_split)
    report = _digits_report(config, graphdef, state["params"], mesh, final, workdir)
    writer.write_images(final, {"samples": report.pop("grid")[None]})
  elif config.sample_every_steps:
    writer.write_images(final, {"samples": sample_images(
        config, graphdef, state["params"], mesh, final)[0][None]})
  writer.flush()
  summary = {"step": final, "train_loss": last.get("loss"), "eval_loss": eval_loss,
             "unigram_loss": baseline, **report,
             "training_cost": cost, "compiled_patch_sizes": sorted(step_fns.compiled),
             "workdir": str(workdir)}
  logging.info("Done: %s", json.dumps(summary))
  summary["losses"] = dict(sorted(history.items()))
  return summary


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
  return out
