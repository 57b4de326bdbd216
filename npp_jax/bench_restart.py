"""Restart benchmark: how long a resumed run takes to its first step with and without the
persistent compilation cache (`config.compile_cache`).

  python -m npp_jax.bench_restart --config=configs/digits.py [--repeats=2] [--json] \
      [--main_flag=--config.model.n_layer=8 ...]

In a temporary workdir (or --workdir) it trains --steps steps with the cache on (which fills
`<workdir>/compile_cache` and leaves a checkpoint), then restarts the same command for one more
step, alternately with the cache off (`--config.compile_cache=`) and on, --repeats times each. For
every restart it prints the trainer's own figure (seconds from entering `train_and_evaluate` to
the end of the first step, which includes restoring the checkpoint and compiling or loading the
step) and the wall time of the whole process (imports, JAX start-up, exit), and with --json one
JSON line. Each run is `python -m npp_jax.main` in a subprocess, as a restarted worker would be.
"""
from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

_CONFIG = flags.DEFINE_string("config", "configs/digits.py", "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir (default: a temporary directory).")
_STEPS = flags.DEFINE_integer("steps", 2, "Steps of the first run (fills the cache).")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Restarts with and without the cache, each.")
_MAIN_FLAGS = flags.DEFINE_multi_string("main_flag", [], "Extra flags for npp_jax.main.")
_JSON = flags.DEFINE_bool("json", False, "Also print one JSON line.")

_FIRST_STEP = re.compile(r"First step of this run \(step (\d+)\) done ([0-9.]+)s after start-up "
                         r"began \(([0-9.]+)s of it compiling\)")


def _run(workdir: str, extra: list[str]) -> dict:
  """One `npp_jax.main` run of one more step (or --steps for the first); its timings."""
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  cmd = [sys.executable, "-m", "npp_jax.main", f"--config={_CONFIG.value}",
         f"--workdir={workdir}", *_MAIN_FLAGS.value, *extra]
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
  wall = time.perf_counter() - t0
  if proc.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
  m = _FIRST_STEP.search(proc.stderr)
  if not m:
    raise RuntimeError(f"no first-step line in the log of {' '.join(cmd)}:\n{proc.stderr[-3000:]}")
  return {"step": int(m.group(1)), "to_first_step_s": float(m.group(2)),
          "compile_s": float(m.group(3)), "process_s": wall,
          "cache_hit": "loaded from the persistent compilation cache" in proc.stderr}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  with tempfile.TemporaryDirectory() as tmp:
    workdir = _WORKDIR.value or os.path.join(tmp, "run")
    first = _run(workdir, [f"--max_steps={_STEPS.value}"])
    runs = {"off": [], "on": []}
    for _ in range(_REPEATS.value):
      runs["off"].append(_run(workdir, ["--max_steps=1", "--config.compile_cache="]))
      runs["on"].append(_run(workdir, ["--max_steps=1"]))
  print(f"Restart to the first step, {_CONFIG.value} {' '.join(_MAIN_FLAGS.value)} (first run: "
        f"{first['to_first_step_s']:.1f}s to its first step, {first['compile_s']:.1f}s compiling)")
  print("| compilation cache | to first step (s) | compiling (s) | whole process (s) |")
  print("|---|---|---|---|")
  for name, rs in runs.items():
    cells = [" / ".join(f"{r[k]:.1f}" for r in rs)
             for k in ("to_first_step_s", "compile_s", "process_s")]
    print(f"| {name} | {' | '.join(cells)} |")
  off = statistics.median(r["to_first_step_s"] for r in runs["off"])
  on = statistics.median(r["to_first_step_s"] for r in runs["on"])
  print(f"Median to first step: {off:.1f}s without the cache, {on:.1f}s with it ({on / off:.2f}x); "
        f"cache hits: {sum(r['cache_hit'] for r in runs['on'])}/{len(runs['on'])} with, "
        f"{sum(r['cache_hit'] for r in runs['off'])}/{len(runs['off'])} without.")
  if _JSON.value:
    print(json.dumps({"config": _CONFIG.value, "main_flags": _MAIN_FLAGS.value, "first": first,
                      "cache_off": runs["off"], "cache_on": runs["on"]}))


if __name__ == "__main__":
  app.run(main)
