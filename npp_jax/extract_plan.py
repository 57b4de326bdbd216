"""The plan of a resumable extraction (`npp_jax.extract_codes`): units, the plan file, markers.

Owns `Plan` (split sizes, the number U of units per split, the shard header: a pure function of
the inputs, identical on every process), `make_plan`, `check_or_write_plan` (an output directory
takes a plan only if it is empty or holds the same plan; a differing plan is refused naming every
differing leaf key, a non-empty directory without a plan is refused untouched), and the unit
markers (`marker_path`, `read_marker`; written with `fileio.write_json_atomic`) that say which units are done.
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np

from npp_jax import fileio

PLAN_FILE = "extract_plan.json"
UNIT_DIR = "extract_units"
_PLAN_VERSION = 1
_MAX_UNITS = 99_999  # data.py names writers with 5 digits.


@dataclasses.dataclass(frozen=True)
class Plan:
  """What one output directory holds; identical on every process (a pure function of inputs)."""
  split_sizes: Mapping[str, int]
  num_units: int
  header: Mapping[str, Any]  # data.ShardWriter header fields: grid_size, ..., extra.

  def unit_range(self, split: str, unit: int) -> tuple[int, int]:
    n, u = self.split_sizes[split], self.num_units
    return unit * n // u, (unit + 1) * n // u

  def to_json(self) -> dict[str, Any]:
    # Round trip through JSON so tuples compare equal to what a file gives back.
    return json.loads(json.dumps({"version": _PLAN_VERSION, "split_sizes": dict(self.split_sizes),
                                  "num_units": self.num_units, "header": dict(self.header)}))


def make_plan(split_sizes: Mapping[str, int], records_per_shard: int,
              header: Mapping[str, Any]) -> Plan:
  """U = ceil(largest split / records_per_shard) units per split (at least 1)."""
  if records_per_shard < 1:
    raise ValueError(f"config.records_per_shard={records_per_shard} must be >= 1")
  num_units = max(1, math.ceil(max(split_sizes.values()) / records_per_shard))
  if num_units > _MAX_UNITS:
    raise ValueError(f"{num_units} units per split exceed {_MAX_UNITS}: raise "
                     f"config.records_per_shard={records_per_shard}")
  return Plan(dict(split_sizes), num_units, dict(header))


_ABSENT = object()  # A key missing on one side of a plan comparison.


def _leaf_diffs(have: Any, want: Any, where: str = "") -> list[tuple[str, Any, Any]]:
  """(dotted key, planned value, new value) of every leaf where two JSON values differ."""
  if isinstance(have, dict) and isinstance(want, dict):
    diffs = []
    for k in sorted(set(have) | set(want), key=str):
      key = f"{where}.{k}" if where else str(k)
      diffs += _leaf_diffs(have.get(k, _ABSENT), want.get(k, _ABSENT), key)
    return diffs
  if isinstance(have, list) and isinstance(want, list) and len(have) == len(want):
    return [d for i, (h, w) in enumerate(zip(have, want))
            for d in _leaf_diffs(h, w, f"{where}[{i}]")]
  return [] if have == want else [(where, have, want)]


def _show(value: Any, limit: int = 100) -> str:
  """JSON of a plan value, its middle elided past `limit` (paths differ mostly at the end)."""
  text = "(absent)" if value is _ABSENT else json.dumps(value)
  half = (limit - 3) // 2
  return text if len(text) <= limit else f"{text[:half]}...{text[-half:]}"


def _plan_mismatch(path: epath.Path, out: epath.Path, have: Any, want: dict[str, Any]) -> str:
  """The error for an output directory planned differently: what differs and how to go on."""
  diffs = _leaf_diffs(have, want) if isinstance(have, dict) else [("(whole plan)", have, want)]
  why = {"num_units": " (from config.records_per_shard)"}
  shown = "; ".join(f"{k}{why.get(k, '')}: planned {_show(h)}, now {_show(w)}"
                    for k, h, w in diffs[:8])
  if len(diffs) > 8:
    shown += f"; and {len(diffs) - 8} more"
  hint = ""
  if any(k.startswith("split_sizes") for k, _, _ in diffs):
    hint = ("A split's images changed since (files added, removed or renamed): restore them "
            "exactly (fix or replace an unreadable image instead of deleting it). ")
  return (f"config.out={out} was planned differently ({path.name}), so the run cannot resume "
          f"there: {shown}. {hint}To resume, rerun with the config and images the plan records; "
          f"to start over, delete {out} or use another config.out.")


def _plan_problem(out: epath.Path, plan: Plan, write: bool) -> str | None:
  """Why `out` cannot take this plan, else None; writes the plan if absent and `write`.

  An output directory is ours if it holds our plan file. A non-empty one without it holds
  someone else's files (e.g. other token shards with the same file names): refused before
  anything is written.
  """
  path = out / PLAN_FILE
  want = plan.to_json()
  if not path.exists():
    if out.exists() and not out.is_dir():
      return f"config.out={out} exists and is not a directory"
    tmp_prefix = f".{PLAN_FILE}.tmp-"  # A concurrent writer's plan, about to appear.
    names = sorted(p.name for p in out.iterdir()) if out.exists() else []
    names = [n for n in names if not n.startswith(tmp_prefix)]
    if not names:
      if write:
        out.mkdir(parents=True, exist_ok=True)
        fileio.write_json_atomic(path, want)
      return None
    if not path.exists():  # Checked again: another process may have written it meanwhile.
      few = ", ".join(names[:5]) + (f", ... ({len(names)} entries)" if len(names) > 5 else "")
      return (f"config.out={out} is not empty ({few}) but holds no {PLAN_FILE}, so it is not an "
              f"extraction output and its files could be overwritten; refusing to write there. "
              f"Use a new or empty directory for config.out (or delete {out} if its contents "
              f"are not needed).")
  try:
    have = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    return (f"{path}: unreadable plan ({e}); delete config.out={out} (or use another one) to "
            f"start over")
  return None if have == want else _plan_mismatch(path, out, have, want)


def check_or_write_plan(out: epath.Path, plan: Plan, process_index: int) -> None:
  """Refuses `out` if planned differently or holding foreign files, else writes the plan if absent.

  With several JAX processes, process 0 checks and writes, and tells the others (a collective),
  which then compare with the plan written. Processes simulated within one JAX process (tests)
  each check and write (the same bytes).
  """
  multi = jax.process_count() > 1
  problem, error = None, None
  if process_index == 0 or not multi:
    try:
      problem = _plan_problem(out, plan, write=True)
    except Exception as e:  # E.g. storage errors: told to the other processes, then raised.
      if not multi:
        raise
      error = e
  if multi:
    ok = int(multihost_utils.broadcast_one_to_all(np.int32(problem is None and error is None)))
    if error is not None:
      raise error
    if not ok and problem is None:
      problem = f"process 0 refused config.out={out}; its log says why"
    if problem is None and process_index != 0:
      problem = _plan_problem(out, plan, write=False)
  if problem is not None:
    raise ValueError(problem)


def marker_path(out: epath.Path, split: str, unit: int) -> epath.Path:
  return out / UNIT_DIR / f"{split}-{unit:05d}.json"


def read_marker(out: epath.Path, plan: Plan, split: str, unit: int) -> dict[str, int] | None:
  """The unit's marker if it exists and matches the plan, else None."""
  path = marker_path(out, split, unit)
  if not path.exists():
    return None
  try:
    marker = json.loads(path.read_text())
  except json.JSONDecodeError:
    logging.warning("%s: unreadable unit marker; the unit is redone", path)
    return None
  start, end = plan.unit_range(split, unit)
  if (marker.get("start"), marker.get("end"), marker.get("num_records")) != (start, end,
                                                                            end - start):
    logging.warning("%s: marker %s does not match the plan [%d, %d); the unit is redone", path,
                    marker, start, end)
    return None
  return marker
