"""From an experiment's ml_collections config to the objects the code uses, validated up front.

Owns: `model_config(config)` (the ModelConfig of `config.model`), `schedule(config, num_records)`
(the patch schedule of `config.npp`), and `validate(config)`, which checks every key that can be
checked before data is read or anything compiles, and names the key in its error.
"""
from __future__ import annotations

from typing import Any

import ml_collections

from npp_jax import model as model_lib
from npp_jax import patching
from npp_jax import sharding

_MODEL_FIELDS = ("n_kv_head", "vocab_size", "num_classes", "grid_size", "token_dropout",
                 "resid_dropout", "ffn_dropout", "class_dropout", "dtype", "remat",
                 "rope_placement", "scan_unroll")


def model_config(config: ml_collections.ConfigDict, **overrides: Any) -> model_lib.ModelConfig:
  """ModelConfig from `config.model`: a named variant's sizes, then explicit size overrides."""
  m = config.model
  fields = {k: m[k] for k in _MODEL_FIELDS}
  if m.variant is not None:
    if m.variant not in model_lib.VARIANTS:
      raise ValueError(f"config.model.variant={m.variant!r} is unknown; choose one of "
                       f"{list(model_lib.VARIANTS)} or None with explicit sizes.")
    n_layer, n_head, dim = model_lib.VARIANTS[m.variant]
  else:
    n_layer = n_head = dim = None
  sizes = dict(n_layer=m.n_layer or n_layer, n_head=m.n_head or n_head, dim=m.dim or dim)
  for key, value in sizes.items():
    if value is None:
      raise ValueError(f"config.model.{key} must be set when config.model.variant is None.")
  fields.update(sizes)
  fields.update(overrides)
  cfg = model_lib.ModelConfig(**fields)
  try:
    cfg.validate()
  except ValueError as e:
    raise ValueError(f"config.{e}") from None
  return cfg


def steps_per_epoch(config: ml_collections.ConfigDict, num_records: int) -> int:
  if config.data.steps_per_epoch > 0:
    return int(config.data.steps_per_epoch)
  steps = num_records // config.global_batch_size
  if steps < 1:
    raise ValueError(f"config.global_batch_size={config.global_batch_size} exceeds the "
                     f"{num_records} training records of config.data.path.")
  return steps


def schedule(config: ml_collections.ConfigDict, num_records: int) -> patching.Schedule:
  """The patch schedule of `config.npp` over npp.epochs epochs of `num_records` images."""
  spe = steps_per_epoch(config, num_records)
  n = config.npp
  try:
    return patching.make_schedule(
        total_steps=n.epochs * spe, steps_per_epoch=spe, epochs=n.epochs,
        grid_size=config.model.grid_size, num_levels=n.num_levels,
        segment_factor=n.segment_factor, patch_sizes=n.patch_sizes, fractions=n.fractions)
  except ValueError as e:
    raise ValueError(f"config: {e}") from None


def validate(config: ml_collections.ConfigDict, *, num_devices: int, process_count: int) -> None:
  """Checks every key that needs no data; raises a ValueError naming the key."""
  model_config(config)
  if config.global_batch_size < 1:
    raise ValueError(f"config.global_batch_size={config.global_batch_size} must be >= 1.")
  try:
    shape = sharding.mesh_shape(dict(config.mesh), num_devices)
  except ValueError as e:
    raise ValueError(f"config.{e}") from None
  shards = shape[0] * shape[1]
  for divisor, what in ((shards, "the data x fsdp devices"), (process_count, "the process count")):
    if config.global_batch_size % divisor:
      raise ValueError(f"config.global_batch_size={config.global_batch_size} is not divisible by "
                       f"{what} ({divisor}).")
  if config.npp.epochs < 1:
    raise ValueError(f"config.npp.epochs={config.npp.epochs} must be >= 1.")
  # The schedule's own checks (levels vs grid, lambda, fractions) with a nominal epoch length.
  nominal = max(config.data.steps_per_epoch, 1000)
  patching.make_schedule(
      total_steps=config.npp.epochs * nominal, steps_per_epoch=nominal, epochs=config.npp.epochs,
      grid_size=config.model.grid_size, num_levels=config.npp.num_levels,
      segment_factor=config.npp.segment_factor, patch_sizes=config.npp.patch_sizes,
      fractions=config.npp.fractions)
  o = config.optim
  for key in ("lr", "end_lr"):
    if not o[key] > 0:
      raise ValueError(f"config.optim.{key}={o[key]} must be > 0.")
  for key in ("b1", "b2", "ema_decay", "decay_fraction"):
    if not 0.0 <= o[key] < 1.0:
      raise ValueError(f"config.optim.{key}={o[key]} must lie in [0, 1).")
  if o.weight_decay < 0 or o.grad_clip <= 0 or o.warmup_epochs < 0:
    raise ValueError("config.optim.weight_decay and config.optim.warmup_epochs must be >= 0 and "
                     "config.optim.grad_clip > 0.")
  if config.ckpt.every_steps < 1 or config.ckpt.keep < 1:
    raise ValueError(f"config.ckpt.every_steps={config.ckpt.every_steps} and "
                     f"config.ckpt.keep={config.ckpt.keep} must be >= 1.")
  if config.log_every_steps < 1:
    raise ValueError(f"config.log_every_steps={config.log_every_steps} must be >= 1.")
  if config.data.builtin not in ("", "digits"):
    raise ValueError(f"config.data.builtin={config.data.builtin!r} must be '' or 'digits'.")
  if not config.data.path and not config.data.builtin:
    raise ValueError("config.data.path is empty: point it at token shards "
                     "(e.g. --config.data.path=gs://BUCKET/imagenet256_tokens).")
  if config.data.num_workers < 0:
    raise ValueError(f"config.data.num_workers={config.data.num_workers} must be >= 0.")
