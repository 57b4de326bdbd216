"""A reference checkpoint's state dict, unwrapped and checked: shared by the GPT and VQ loaders.

Owns `ConversionError`, `normalize_state_dict` (the flat {key: array} inside the layouts the
reference writes: `{"model"}`, `{"module"}`, `{"state_dict"}`, `{"ema"}` on request, or raw;
`module.` / `_orig_mod.` prefixes stripped) and `check_coverage` (strict: every missing,
unexpected and mis-shaped key in one error).
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from npp_jax import torch_pickle

_PREFIXES = ("module.", "_orig_mod.")


class ConversionError(ValueError):
  """A state dict does not match the model: lists every missing, unexpected and mis-shaped key."""


def normalize_state_dict(ckpt: Mapping[str, Any], *, use_ema: bool = False) -> dict[str, np.ndarray]:
  """The flat {reference key: numpy array} inside any checkpoint layout the reference writes."""
  if use_ema:
    if "ema" not in ckpt:
      raise ConversionError(f"use_ema was requested but the checkpoint has no 'ema' entry "
                            f"(top-level keys: {sorted(ckpt)[:10]}).")
    ckpt = ckpt["ema"]
    if not isinstance(ckpt, Mapping):
      what = ckpt.qualname if isinstance(ckpt, torch_pickle.Opaque) else type(ckpt).__name__
      raise ConversionError(f"the checkpoint's 'ema' entry is a {what}, not a state dict.")
  else:
    for layout in ("model", "module", "state_dict"):
      if layout in ckpt and isinstance(ckpt[layout], Mapping):
        ckpt = ckpt[layout]
        break
  out = {}
  for key, value in ckpt.items():
    name = str(key)
    changed = True
    while changed:
      changed = False
      for prefix in _PREFIXES:
        if name.startswith(prefix):
          name, changed = name[len(prefix):], True
      name = name.replace("._orig_mod.", ".")
    if isinstance(value, torch_pickle.Opaque):
      raise ConversionError(f"entry {key!r} is a {value.qualname} object (not constructed), "
                            f"not an array: not a weights mapping (keys: "
                            f"{sorted(map(str, ckpt))[:10]}).")
    out[name] = np.asarray(value)
  return out


def check_coverage(state_dict: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]],
                   *, ignore: re.Pattern | None = None, what: str = "checkpoint") -> None:
  """Raises one ConversionError listing all missing, unexpected and mis-shaped keys."""
  problems = []
  for key, shape in expected.items():
    if key not in state_dict:
      problems.append(f"missing key {key} (expected shape {tuple(shape)})")
    elif tuple(state_dict[key].shape) != tuple(shape):
      problems.append(f"shape mismatch for {key}: got {tuple(state_dict[key].shape)}, "
                      f"expected {tuple(shape)}")
  for key in state_dict:
    if key not in expected and not (ignore and ignore.search(key)):
      problems.append(f"unexpected key {key} (shape {tuple(state_dict[key].shape)})")
  if problems:
    raise ConversionError(f"{what} does not match the model ({len(problems)} problems):\n  "
                          + "\n  ".join(problems))
