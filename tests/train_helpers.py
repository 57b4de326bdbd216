"""Helpers for the end-to-end training tests: synthetic shards, the smoke config, `npp_jax.main` in
a subprocess, and what a run leaves behind (logged losses, TensorBoard scalars, checkpoints).

Import from test modules as `from train_helpers import ...` (pytest puts tests/ on sys.path).
"""
import glob
import hashlib
import os
import re
import subprocess
import sys
import time

import numpy as np

from configs import smoke
from npp_jax import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB, CLASSES = 64, 10
# `[done] grad_norm=..., loss=X, ...`: the metric writer's log line; its loss is step done - 1's.
_LOSS_LINE = re.compile(r"\[(\d+)\] grad_norm=[^\n]*?\bloss=([-+0-9.einaf]+)")
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's in-progress save directories (local file systems).


def write_shards(directory, num_train=64, num_val=16, seed=0):
  """Synthetic token shards: tokens correlated with the label so the model can learn."""
  rng = np.random.default_rng(seed)
  for split, n in (("train", num_train), ("validation", num_val)):
    with data.ShardWriter(directory, split, grid_size=16, vocab_size=VOCAB, num_classes=CLASSES,
                          num_views=2) as w:
      for _ in range(n):
        label = int(rng.integers(CLASSES))
        w.write(label, (label * 6 + rng.integers(0, 4, (2, 256))) % VOCAB)
  data.finalize(directory, num_processes=1)
  return str(directory)


def smoke_config(path, **overrides):
  """configs/smoke.py on `path` with per-step logging, a visible LR and dotted-key overrides."""
  c = smoke.get_config()
  c.data.path = path
  c.data.eval_split = "validation"
  c.log_every_steps = 1
  c.optim.lr = 0.1  # 3e-3 at batch 8: the loss moves visibly within 12 steps.
  c.compile_cache = ""  # the suite's shared cache (tests/conftest.py), not one per workdir.
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def main_env(devices, **extra):
  """Environment of a `python -m npp_jax.main` subprocess on `devices` fake CPU devices."""
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu")
  env.update(extra)
  return env


def main_command(workdir, shards, *, extra=(), overrides=None, code=None):
  """The command line of a smoke-config training run, matching `smoke_config(shards, **overrides)`.

  `code`: run this Python source (which must end by calling npp_jax.main's app) instead of `-m`.
  """
  overrides = {"data.eval_split": "validation", "log_every_steps": 1, "optim.lr": 0.1,
               "compile_cache": "", **(overrides or {})}
  head = [sys.executable, "-c", code] if code else [sys.executable, "-m", "npp_jax.main"]
  return head + [f"--config={ROOT}/configs/smoke.py", f"--workdir={workdir}",
                 f"--config.data.path={shards}",
                 *(f"--config.{k}={_flag_value(v)}" for k, v in overrides.items()), *extra]


def _flag_value(v):
  return ",".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)


def run_main(workdir, shards, *, devices, extra=(), overrides=None, timeout=300):
  """Runs a smoke-config training to completion; returns the CompletedProcess (text output)."""
  return subprocess.run(main_command(workdir, shards, extra=extra, overrides=overrides), cwd=ROOT,
                        env=main_env(devices), capture_output=True, text=True, timeout=timeout)


def start_main(workdir, shards, log_path, *, devices=8, extra=(), overrides=None, code=None,
               env=None, **popen_kwargs):
  """Starts a training subprocess with stdout+stderr to `log_path` (a pipe nobody reads would
  block the process once full). Returns the Popen."""
  log = open(log_path, "w")
  try:
    return subprocess.Popen(
        main_command(workdir, shards, extra=extra, overrides=overrides, code=code), cwd=ROOT,
        env=env or main_env(devices), stdout=log, stderr=subprocess.STDOUT, **popen_kwargs)
  finally:
    log.close()  # the child holds its own descriptor.


def wait_for(predicate, timeout, interval=0.005, proc=None):
  """Polls until predicate() is truthy (returns it) or timeout/`proc` exit (returns None)."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    value = predicate()
    if value:
      return value
    if proc is not None and proc.poll() is not None:
      return predicate() or None
    time.sleep(interval)
  return None


def logged_losses(text):
  """{step: loss} from the metric writer's log lines ("[done] ... loss=X" is step done - 1)."""
  return {step: float(v[-1]) for step, v in logged_loss_strings(text).items()}


def logged_loss_strings(text):
  """{step: [every logged loss string of that step, in order]}: repeats come from resumed runs."""
  out = {}
  for m in _LOSS_LINE.finditer(text):
    out.setdefault(int(m.group(1)) - 1, []).append(m.group(2))
  return out


def as_logged(loss):
  """A float as the clu LoggingWriter prints it."""
  return f"{loss:.6g}"


def event_scalars(workdir, tag):
  """{writer step: [float32 values of `tag`]} from every TensorBoard event file in `workdir`
  (exact values; several when several runs logged a step)."""
  from tensorboard.backend.event_processing import event_file_loader
  from tensorboard.util import tensor_util
  out = {}
  for f in sorted(glob.glob(os.path.join(str(workdir), "events.out.tfevents*"))):
    try:
      for ev in event_file_loader.EventFileLoader(f).Load():
        for v in ev.summary.value:
          if v.tag == tag:
            out.setdefault(ev.step, []).append(np.float32(tensor_util.make_ndarray(v.tensor)))
    except Exception:  # pylint: disable=broad-except  # a killed writer leaves a torn record.
      continue
  return out


def event_losses(workdir):
  """{step: [float32 losses]} from the TensorBoard events (step s's loss is logged at s + 1)."""
  return {s - 1: v for s, v in event_scalars(workdir, "loss").items()}


def run_losses(workdir):
  """{step: loss} (Python floats, the last logged value of each step) of the runs in `workdir`."""
  return {s: float(v[-1]) for s, v in sorted(event_losses(workdir).items())}


def committed_steps(checkpoint_dir):
  """Steps orbax regards as committed in a local checkpoints directory (tmp dirs excluded)."""
  if not os.path.isdir(checkpoint_dir):
    return []
  return sorted(int(n) for n in os.listdir(checkpoint_dir) if n.isdigit())


def tmp_dirs(checkpoint_dir):
  """Names of in-progress (or abandoned) orbax save directories."""
  try:
    return sorted(n for n in os.listdir(checkpoint_dir) if TMP_SUFFIX in n)
  except FileNotFoundError:
    return []


def read_state(step_dir):
  """The `state` item of a checkpoint step as {key path: numpy array}, without a target."""
  import jax
  import orbax.checkpoint as ocp
  path = os.path.join(str(step_dir), "state")
  with ocp.PyTreeCheckpointer() as ckptr:
    meta = ckptr.metadata(path)
    tree = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
    restored = ckptr.restore(path, args=ocp.args.PyTreeRestore(
        restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)))
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_flatten_with_path(restored)[0]}


def assert_states_equal(a, b):
  """Bit-for-bit equality of two `read_state` results."""
  assert sorted(a) == sorted(b)
  for k in a:
    assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
    assert a[k].tobytes() == b[k].tobytes(), f"{k} differs"


def tree_hash(root):
  """{relative path: sha256} of every file under `root` (directories by their file set)."""
  out = {}
  for d, _, files in os.walk(root):
    for f in files:
      p = os.path.join(d, f)
      with open(p, "rb") as fh:
        out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
  return out
