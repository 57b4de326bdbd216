"""The training loop's hooks, built from the config (big_vision's evaluators): the eval loss, sample
grids, the profiler, and whatever a built-in data set adds (`config.data.builtin`, e.g. the CPU
demo's report).

A hook is built from the `Run` (what set-up fixed: config, workdir, mesh, model graph, metric
writer, data path, first and last step of this run). The loop calls `after_step(step, state)`
after every step (`step` = steps done; not after the one a preemption stopped at),
`finish(step, state, summary)` once when the run ends without preemption (the resumed run
finishes a preempted one), in order, each seeing the entries the earlier ones returned, and
`close()` always. `finish` returns summary entries; the list under "report" holds lines for the
user (main.py prints them).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metric_writers, periodic_actions
from etils import epath
from flax import nnx

from npp_jax import builtin_data, data, kernels, sample, sharding
from npp_jax import model as model_lib

State = dict[str, Any]
PROFILE_AFTER = 3  # a trace starts this many steps into a run: after compiling and warming up.


@dataclasses.dataclass(frozen=True)
class Run:
  """What set-up fixed about this run; hooks read it."""
  config: ml_collections.ConfigDict
  workdir: epath.Path
  mesh: jax.sharding.Mesh
  graphdef: nnx.GraphDef
  writer: metric_writers.MetricWriter
  data_path: epath.Path
  start: int  # the step this run started at (0, or the restored checkpoint's).
  end: int  # the step this run stops at (the schedule's end, or start + max_steps).

  def model(self, state: State) -> model_lib.Transformer:
    return nnx.merge(self.graphdef, state["params"])


class Hook:
  """Does nothing; hooks override what they need."""

  def after_step(self, step: int, state: State) -> None:
    pass

  def finish(self, step: int, state: State, summary: dict) -> dict:
    del step, state, summary
    return {}

  def close(self) -> None:
    pass


def host(tree: Any) -> Any:
  """Numpy values of replicated (possibly multi-process) arrays, from this process's first shard."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


def from_config(run: Run) -> list[Hook]:
  """The hooks `run.config` asks for: eval loss (data.eval_split), sample grids
  (sample_every_steps), a profile (profile_steps), then the built-in data set's own."""
  c = run.config
  hooks: list[Hook] = []
  if c.data.eval_split:
    hooks.append(EvalLoss(run))
  if c.sample_every_steps:
    hooks.append(SampleGrids(run))
  if c.profile_steps:
    hooks.append(Profile(run))
  if c.data.builtin:
    hooks.extend(builtin_data.lookup(c.data.builtin).hooks(run))
  return hooks


# ---------------------------------------------------------------------------------------------
# Eval loss.
# ---------------------------------------------------------------------------------------------
def eval_step(params: nnx.State, batch: dict, *, graphdef: nnx.GraphDef) -> dict:
  """Summed next-token (p = 1) CE and token count of the unmasked examples of a batch."""
  model = nnx.merge(graphdef, params)
  logits = model(batch["codes"], batch["labels"], patch_size=1)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["codes"]).mean(-1)
  mask = batch["mask"].astype(jnp.float32)
  return {"ce_sum": jnp.sum(ce * mask), "count": jnp.sum(mask)}


def make_eval_step(graphdef: nnx.GraphDef, mesh: jax.sharding.Mesh):
  """The jitted eval step of a run (`npp_jax.aot` compiles the same one for a TPU topology)."""
  return jax.jit(functools.partial(eval_step, graphdef=graphdef),
                 out_shardings=sharding.replicated(mesh))


class EvalLoss(Hook):
  """Mean next-token CE (nats/token) over config.eval_batches batches of config.data.eval_split,
  every config.eval_every_steps steps and at the end: `eval_loss` in TensorBoard and the summary.
  Its step is compiled once per run."""

  def __init__(self, run: Run):
    self.run = run
    self.batch_shardings = sharding.batch_sharding(run.mesh)
    self.compiled = None

  def evaluate(self, state: State) -> float:
    c = self.run.config
    ds = data.make_eval_dataset(self.run.data_path, split=c.data.eval_split,
                                global_batch_size=c.global_batch_size,
                                process_index=jax.process_index(),
                                process_count=jax.process_count())
    total, count = 0.0, 0.0
    for i, batch in enumerate(ds):
      if 0 <= c.eval_batches <= i:
        break
      batch = data.global_batch(batch, self.batch_shardings)
      with sharding.use_mesh(self.run.mesh):
        if self.compiled is None:
          self.compiled = make_eval_step(self.run.graphdef, self.run.mesh).lower(
              state["params"], batch).compile(
                  compiler_options=kernels.compiler_options(c, self.run.mesh))
        out = host(self.compiled(state["params"], batch))
      total, count = total + float(out["ce_sum"]), count + float(out["count"])
    return total / max(count, 1.0)

  def after_step(self, step: int, state: State) -> None:
    every = self.run.config.eval_every_steps
    if every and step % every == 0 and step < self.run.end:
      self.run.writer.write_scalars(step, {"eval_loss": self.evaluate(state)})

  def finish(self, step: int, state: State, summary: dict) -> dict:
    loss = self.evaluate(state)
    self.run.writer.write_scalars(step, {"eval_loss": loss})
    return {"eval_loss": loss}


# ---------------------------------------------------------------------------------------------
# Sample grids.
# ---------------------------------------------------------------------------------------------
class SampleGrids(Hook):
  """A CFG sample of each of config.sample.grid_classes, as a labelled grid in TensorBoard
  (`samples`) every config.sample_every_steps steps and at the end."""

  def __init__(self, run: Run):
    self.run = run
    self._decoder = None

  def decoder(self, state: State) -> sample.Decoder:
    """Built on first use, once per run: a VQ decoder reads its weights and compiles."""
    if self._decoder is None:
      c = self.run.config
      self._decoder = sample.make_decoder(
          "auto", self.run.model(state).cfg, self.run.mesh, vq_checkpoint=c.sample.vq_checkpoint,
          builtin=c.data.builtin)
    return self._decoder

  def images(self, step: int, state: State, per_class: int = 1
             ) -> tuple[np.ndarray, np.ndarray]:
    """`per_class` decoded CFG samples of each grid class (uint8 [B, H, W, 3]) and their labels;
    the draw is a function of the seed and `step`."""
    c = self.run.config
    rng = jax.random.fold_in(jax.random.key(c.seed + 1), step)
    return sample.sample_classes(self.run.model(state), self.run.mesh, c.sample.grid_classes, rng,
                                 decoder=self.decoder(state), per_class=per_class,
                                 **sample.options_from_config(c))

  def write(self, step: int, state: State) -> None:
    images, labels = self.images(step, state)
    grid = sample.class_grid(images, labels, ncols=len(labels))
    self.run.writer.write_images(step, {"samples": grid[None]})

  def after_step(self, step: int, state: State) -> None:
    if step % self.run.config.sample_every_steps == 0 and step < self.run.end:
      self.write(step, state)

  def finish(self, step: int, state: State, summary: dict) -> dict:
    self.write(step, state)
    return {}


# ---------------------------------------------------------------------------------------------
# Profile.
# ---------------------------------------------------------------------------------------------
class Profile(Hook):
  """A jax.profiler trace of config.profile_steps steps, starting PROFILE_AFTER steps into the
  run, on every process (clu's periodic Profile action): <workdir>/plugins/profile/<time>/
  <host>.xplane.pb, which TensorBoard's profile plugin opens."""

  def __init__(self, run: Run):
    first = run.start + min(PROFILE_AFTER, max(run.end - run.start - 1, 0))
    self.action = periodic_actions.Profile(
        logdir=run.workdir, num_profile_steps=run.config.profile_steps, profile_duration_ms=None,
        first_profile=first, every_steps=None, every_secs=None)

  def after_step(self, step: int, state: State) -> None:
    self.action(step)

  def close(self) -> None:
    try:  # a run that ended inside the trace window still writes the trace.
      jax.profiler.stop_trace()
    except RuntimeError:  # "No profile started": the trace had stopped already.
      pass
