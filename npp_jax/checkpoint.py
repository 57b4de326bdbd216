"""Checkpoints, the only orbax importer: training state + data iterator, and params-only files.

Owns:
  * `Checkpointer`: an orbax CheckpointManager under `workdir/checkpoints` holding, per step, the
    train state (`state`) and each process's grain iterator state (`data`). Saves are async and
    atomic (orbax writes to a temporary directory and commits it only when complete, so a crash
    mid-save leaves the previous checkpoint as the latest); keep-N; preemption detection.
    Restores onto the current mesh whatever mesh or process count saved it.
  * `save_params` / `load_params`: a params-only orbax checkpoint (converted LlamaGen weights,
    or a trained model's params), validated against the model before any array is read.

All paths go through etils.epath, so local paths and gs:// behave the same.
"""
from __future__ import annotations

import json
import os
from typing import Any

import grain
import jax
# JAX's distributed state holds the preemption sync manager (there is no public getter).
from jax._src import distributed as _jax_distributed
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from npp_jax import logs

# Harmless orbax warnings: a CheckpointManager step keeps _CHECKPOINT_METADATA at the step level,
# so reading one item's metadata directly warns that the item has none; a read-only manager
# announces the options it turned off.
_NO_ITEM_METADATA = "Metadata file does not exist"
_READ_ONLY_NOTES = ("CheckpointManagerOptions.read_only=True", "Given directory is read only")


class CheckpointMismatchError(ValueError):
  """A checkpoint's arrays do not match the model or state it is restored into."""


class CheckpointReadError(ValueError):
  """A checkpoint step exists but cannot be read (damaged, truncated, or not written by us)."""


def as_path(path: epath.PathLike) -> epath.Path:
  """`path` as an epath, absolute when local: orbax refuses relative paths at save time (after
  the steps before the first checkpoint have run) and misreads them when loading."""
  if "://" in os.fspath(path):
    return epath.Path(path)
  return epath.Path(os.path.abspath(os.fspath(path)))


def _abstract(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a tree of arrays or ShapeDtypeStructs."""
  return jax.tree.map(
      lambda x: x if isinstance(x, jax.ShapeDtypeStruct)
      else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


def _flat_shapes(tree: Any) -> dict[str, tuple]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(p, simple=True, separator="/"): tuple(np.shape(x)) for p, x in flat}


def check_compatible(saved: Any, target: Any, *, what: str) -> None:
  """Raises CheckpointMismatchError listing every key missing, unexpected or mis-shaped."""
  have, want = _flat_shapes(saved), _flat_shapes(target)
  problems = [f"missing {k} (model expects {s})" for k, s in want.items() if k not in have]
  problems += [f"unexpected {k} {s}" for k, s in have.items() if k not in want]
  problems += [f"shape mismatch for {k}: checkpoint {have[k]}, model {s}"
               for k, s in want.items() if k in have and have[k] != s]
  problems.sort(key=lambda p: "opt_state/" in p)  # the optimizer's mirror of a key comes last.
  if problems:
    raise CheckpointMismatchError(
        f"{what} does not match the model ({len(problems)} problems; was it written for another "
        f"model size or vocabulary?):\n  " + "\n  ".join(problems[:50]))


def _metadata_tree(meta: Any) -> Any:
  """The array-metadata tree of an orbax StandardCheckpointer/PyTree metadata object."""
  tree = getattr(meta, "item_metadata", meta)
  tree = getattr(tree, "tree", tree)
  return tree


class Checkpointer:
  """Train-state + data-iterator checkpoints in `workdir/checkpoints`.

  Opening one removes what saves interrupted by a crash left behind (`<step>.orbax-checkpoint-tmp*`
  directories locally, step directories without `commit_success.txt` on GCS), so construct it only
  in the process that writes the checkpoints, not beside a running training.
  """

  def __init__(self, workdir: epath.PathLike, *, keep: int, async_save: bool = True):
    self.directory = as_path(workdir) / "checkpoints"
    self._mngr = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=1, create=True,
            enable_async_checkpointing=async_save, cleanup_tmp_directories=True),
        item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def save(self, step: int, state: Any, data_iterator: Any) -> None:
    """Starts an async save of `state` and the iterator position (returns once arrays are copied)."""
    self._mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator)), force=True)

  def reached_preemption(self, step: int) -> bool:
    """True on every process, at the same step, once any process received a preemption notice
    (SIGTERM); call it at every step from every process (see install_preemption_handler).

    Multi-process runs use JAX's preemption sync service through orbax (every process agrees on
    the step); a single process, which has no such service, uses its own SIGTERM flag.
    """
    if jax.process_count() > 1:
      return self._mngr.reached_preemption(step)
    return _SIGTERM.received

  def restore(self, step: int, target_state: Any, data_iterator: Any | None) -> Any:
    """Restores `step` into the shapes and shardings of `target_state` (arrays or abstract).

    The data iterator is restored in place when given; pass None to restore the state only (e.g.
    when the process count changed and the data position is rebuilt from the step instead).
    """
    step_dir = self.directory / str(step)
    _check_json_files(step_dir)
    try:
      # The manager's item_metadata() is None for items it has not saved or restored in this
      # process, so the state's metadata is read directly (no array is read).
      with ocp.PyTreeCheckpointer() as ckptr, logs.dropped(_NO_ITEM_METADATA):
        saved = _metadata_tree(ckptr.metadata(step_dir / "state"))
      if _flat_shapes(saved):  # Empty when e.g. `_sharding` is damaged; the restore decides.
        check_compatible(saved, target_state, what=f"checkpoint {step_dir}")
      items = {"state": ocp.args.StandardRestore(_abstract(target_state))}
      if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
      restored = self._mngr.restore(step, args=ocp.args.Composite(**items))
    except CheckpointMismatchError:
      raise
    except Exception as e:  # orbax/tensorstore/grain raise many types for a damaged step.
      raise CheckpointReadError(
          f"checkpoint {step_dir} cannot be read ({type(e).__name__}: {str(e)[:500]}). It is "
          f"damaged or was not written by npp_jax; move it out of {self.directory} to resume "
          f"from an earlier step.") from e
    return restored["state"]

  def saved_process_count(self, step: int) -> int | None:
    """Number of processes whose data-iterator states were saved at `step` (None if unknown)."""
    data_dir = self.directory / str(step) / "data"
    if not data_dir.exists():
      return None
    names = [p.name for p in data_dir.iterdir() if p.name.startswith("process_")]
    counts = {int(n.split("-of-")[1].split(".")[0]) for n in names if "-of-" in n}
    return counts.pop() if len(counts) == 1 else None

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()


def _check_json_files(step_dir: epath.Path) -> None:
  """Raises CheckpointReadError naming the first metadata file of a step that is not JSON.

  These are the files a restore parses (orbax's tree and array metadata, grain's iterator
  states); checking them first names the damaged file instead of failing deep inside orbax.
  Nothing in a checkpoint is ever unpickled or imported.
  """
  files = [step_dir / "state" / "_METADATA"]
  for sub in ("data", "state/array_metadatas"):
    if (step_dir / sub).exists():
      files += [p for p in (step_dir / sub).iterdir()
                if sub != "data" or p.name.endswith(".json")]
  for f in files:
    if not f.exists():
      continue
    try:
      json.loads(f.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise CheckpointReadError(
          f"checkpoint file {f} is not valid JSON ({e}); the step is damaged or was not written "
          f"by npp_jax. Move {step_dir} away to resume from an earlier step.") from None


def save_params(path: epath.PathLike, params: Any, *, model_config: dict | None = None) -> None:
  """Writes a params-only checkpoint (what `config.ckpt.init_from` and the sampler read)."""
  path = as_path(path)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path / "params", params, force=True)
    ckptr.wait_until_finished()
  if model_config is not None and jax.process_index() == 0:
    (path / "model_config.json").write_text(json.dumps(model_config, indent=2, sort_keys=True))


def read_model_config(path: epath.PathLike) -> dict | None:
  """The model config stored beside a params checkpoint, if any."""
  f = as_path(path) / "model_config.json"
  return json.loads(f.read_text()) if f.exists() else None


def load_params(path: epath.PathLike, target_params: Any) -> Any:
  """Reads a params-only checkpoint into the shapes/shardings of `target_params`.

  Raises CheckpointMismatchError naming every mismatched key before reading any array, and
  FileNotFoundError naming the path when there is no checkpoint.
  """
  path = as_path(path) / "params"
  if not path.exists():
    raise FileNotFoundError(f"no params checkpoint at {path} (write one with npp_jax.convert or "
                            f"checkpoint.save_params).")
  with ocp.StandardCheckpointer() as ckptr:
    saved = _metadata_tree(ckptr.metadata(path))
    check_compatible(saved, target_params, what=f"params checkpoint {path}")
    return ckptr.restore(path, _abstract(target_params))


def restore_params(workdir: epath.PathLike, target: Any, *, use_ema: bool = False) -> Any:
  """Only `params` (or `ema`) of a training workdir's latest step; the optimizer state is never
  read. `target` gives the shapes and shardings (arrays or ShapeDtypeStructs)."""
  workdir = as_path(workdir)
  with logs.dropped(*_READ_ONLY_NOTES), ocp.CheckpointManager(
      workdir / "checkpoints", options=ocp.CheckpointManagerOptions(read_only=True)) as mngr:
    step = mngr.latest_step()
  if step is None:
    raise FileNotFoundError(f"no checkpoint step in {workdir / 'checkpoints'}.")
  key = "ema" if use_ema else "params"
  path = workdir / "checkpoints" / str(step) / "state"
  with ocp.PyTreeCheckpointer() as ckptr, logs.dropped(_NO_ITEM_METADATA):
    tree = _metadata_tree(ckptr.metadata(path))
    if key not in tree:
      raise ValueError(f"checkpoint {path} has no `{key}`" + (
          " (train with config.optim.ema_decay > 0 for EMA weights)." if use_ema else "."))
    check_compatible(tree[key], target, what=f"`{key}` of checkpoint {path}")
    item = {key: _abstract(target)}
    restored = ckptr.restore(path, args=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True))
  return restored[key]


class _SigtermFlag:
  """Records SIGTERM (the preemption notice of Cloud TPU VMs and of `kill`) instead of dying."""

  def __init__(self):
    self.received = False

  def install(self) -> None:
    import signal
    import threading
    if threading.current_thread() is threading.main_thread():
      signal.signal(signal.SIGTERM, self._handler)

  def _handler(self, signum, frame):
    del signum, frame
    self.received = True


_SIGTERM = _SigtermFlag()


def install_preemption_handler() -> None:
  """Makes SIGTERM a save-and-exit at a step all processes agree on (see reached_preemption).

  One process: a Python SIGTERM handler records the notice. Several processes: JAX's preemption
  sync manager, which jax.distributed.initialize starts (npp_jax.distributed), owns SIGTERM: a
  notice to any process reaches all of them and they agree on the step at which to save. Raises
  RuntimeError when it is not running (config jax_enable_preemption_service off): a preempted pod
  would then die without a save.
  """
  if jax.process_count() == 1:
    _SIGTERM.install()
  elif _jax_distributed.global_state.preemption_sync_manager is None:
    raise RuntimeError(
        f"{jax.process_count()} processes but JAX's preemption sync service is not running "
        f"(jax_enable_preemption_service={jax.config.jax_enable_preemption_service}): a SIGTERM "
        f"would stop the run without a checkpoint. Leave jax_enable_preemption_service on.")
