"""Setting up a notebook runtime (Colab, or any Jupyter kernel) for npp_jax: which accelerator it
has, whether its preinstalled jax can stay, and what to pip install.

Standard library only: the notebook imports this from a fresh clone before any dependency is
installed. The requirements are setup.py's (`SAMPLING_REQUIRES` and the `tpu` / `cuda12`
extras), read as data with `ast`, never executed.

Policy: install the package itself without dependencies (`pip install --no-deps -e REPO`), then
SAMPLING_REQUIRES, so the runtime keeps its own TensorFlow (sampling never imports it). The
runtime's jax stays when its version is in setup.py's range and it already runs on the runtime's
accelerator (probed in a subprocess, so the kernel has not imported jax before the install);
otherwise the supported jax is installed with the runtime's plugin: `jax[tpu]`, `jax[cuda12]`.
"""
from __future__ import annotations

import ast
import dataclasses
import glob
import os
import re
import shutil
import subprocess
import sys
from typing import Mapping

_PLATFORM = {"cpu": "cpu", "gpu": "gpu", "tpu": "tpu"}  # runtime -> platform of jax's devices
_EXTRA = {"gpu": "cuda12", "tpu": "tpu"}  # runtime -> setup.py extra with its jax plugin


@dataclasses.dataclass(frozen=True)
class Jax:
  """The jax a Python interpreter has: versions and the backend it runs on."""
  version: str
  jaxlib: str
  backend: str


def detect_runtime(env: Mapping[str, str] | None = None) -> str:
  """"tpu", "gpu" or "cpu": what the machine offers, whatever jax is installed."""
  env = os.environ if env is None else env
  if (env.get("COLAB_TPU_ADDR") or env.get("TPU_ACCELERATOR_TYPE")
      or glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*")):
    return "tpu"
  if env.get("COLAB_GPU", "0") not in ("", "0"):
    return "gpu"
  if shutil.which("nvidia-smi"):
    probe = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False)
    if probe.returncode == 0 and "GPU" in probe.stdout:
      return "gpu"
  return "cpu"


def installed_jax(python: str = sys.executable) -> Jax | None:
  """The jax of `python` and the backend it picks, or None when it has none that imports."""
  # The platform of the interpreter's default devices: what a program would run on there.
  code = ("import jax, jaxlib; "
          "print(jax.__version__, jaxlib.__version__, jax.devices()[0].platform)")
  probe = subprocess.run([python, "-c", code], capture_output=True, text=True, check=False)
  if probe.returncode != 0 or not probe.stdout.split():
    return None
  version, jaxlib, backend = probe.stdout.split()[-3:]
  return Jax(version, jaxlib, backend)


def requirements(repo: str) -> tuple[list[str], dict[str, list[str]]]:
  """setup.py's SAMPLING_REQUIRES and EXTRAS_REQUIRE, read without running setup.py."""
  found = {}
  for node in ast.parse(open(os.path.join(repo, "setup.py")).read()).body:
    if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
      if node.targets[0].id in ("SAMPLING_REQUIRES", "EXTRAS_REQUIRE"):
        found[node.targets[0].id] = ast.literal_eval(node.value)
  return found["SAMPLING_REQUIRES"], found["EXTRAS_REQUIRE"]


def _version(text: str) -> tuple[int, ...]:
  return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def in_range(version: str, requirement: str) -> bool:
  """Whether `version` satisfies a requirement's `>=A,<B` bounds (e.g. "jax>=0.10.2,<0.11")."""
  v = _version(version)
  for op, bound in re.findall(r"(>=|<=|==|<|>)\s*([\d.]+)", requirement):
    b = _version(bound)
    ok = {">=": v >= b, "<=": v <= b, "==": v == b, "<": v < b, ">": v > b}[op]
    if not ok:
      return False
  return True


def _name(requirement: str) -> str:
  return re.split(r"[\[<>=!~ ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def plan(repo: str, runtime: str, jax: Jax | None) -> tuple[list[list[str]], str]:
  """The pip argument lists that set up `runtime` (after `python -m pip`), and what they do."""
  sampling, extras = requirements(repo)
  jax_spec = next(r for r in sampling if _name(r) == "jax")
  others = [r for r in sampling if _name(r) not in ("jax", "jaxlib")]
  if jax is not None and jax.backend == _PLATFORM[runtime] and in_range(jax.version, jax_spec):
    jax_reqs = [f"jax=={jax.version}", f"jaxlib=={jax.jaxlib}"]
    note = f"keeping the runtime's jax {jax.version} (it runs on {jax.backend})"
  else:
    jax_reqs = extras[_EXTRA[runtime]] if runtime in _EXTRA else [
        r for r in sampling if _name(r) in ("jax", "jaxlib")]
    now = "none" if jax is None else f"{jax.version} on {jax.backend}"
    note = f"installing {', '.join(jax_reqs)} for the {runtime} runtime (its jax: {now})"
  return [["install", "-q", "--no-deps", "-e", repo], ["install", "-q", *jax_reqs, *others]], note


def install(repo: str) -> str:
  """Installs npp_jax from checkout `repo` for this runtime (see the module docstring); returns
  what it did."""
  runtime = detect_runtime()
  commands, note = plan(repo, runtime, installed_jax())
  for args in commands:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)
  return f"{runtime} runtime: {note}"
