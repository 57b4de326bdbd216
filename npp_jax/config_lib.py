"""From an experiment's ml_collections config to the objects the code uses, validated up front.

Owns: `model_config(config)` (the ModelConfig of `config.model`), `schedule(config, num_records)`
(the patch schedule of `config.npp`), `validate(config)`, which checks every key that can be
checked before data is read or anything compiles, and names the key in its error, and
`resume_changes` (what a resumed run changed of the config its workdir saved).
"""
from __future__ import annotations

import json
import math
from typing import Any

import ml_collections

from npp_jax import builtin_data
from npp_jax import model as model_lib
from npp_jax import optim, patching
from npp_jax import sharding

_MODEL_FIELDS = ("n_kv_head", "vocab_size", "num_classes", "grid_size", "token_dropout",
                 "resid_dropout", "ffn_dropout", "class_dropout", "dtype", "remat",
                 "rope_placement", "scan_unroll", "kernels")


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
  cfg = model_config(config)
  if cfg.head_dim % 4:
    raise ValueError(f"config.model.dim / config.model.n_head = head_dim {cfg.head_dim} must be a "
                     f"multiple of 4 (2D RoPE rotates head_dim / 4 pairs per grid axis).")
  if not isinstance(config.seed, int) or config.seed < 0:
    raise ValueError(f"config.seed={config.seed!r} must be an int >= 0.")
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
  _check_parameter_splits(config, cfg, dict(zip(sharding.MESH_AXES, shape)))
  if config.npp.epochs < 1:
    raise ValueError(f"config.npp.epochs={config.npp.epochs} must be >= 1.")
  if config.npp.fractions and not config.npp.patch_sizes:
    raise ValueError(f"config.npp.fractions={config.npp.fractions} is set but "
                     f"config.npp.patch_sizes is not; fractions apply to explicit patch sizes.")
  # The schedule's own checks (levels vs grid, lambda, fractions) with a nominal epoch length.
  nominal = max(config.data.steps_per_epoch, 1000)
  patching.make_schedule(
      total_steps=config.npp.epochs * nominal, steps_per_epoch=nominal, epochs=config.npp.epochs,
      grid_size=config.model.grid_size, num_levels=config.npp.num_levels,
      segment_factor=config.npp.segment_factor, patch_sizes=config.npp.patch_sizes,
      fractions=config.npp.fractions)
  o = config.optim
  if o.schedule not in optim.SCHEDULES:
    raise ValueError(f"config.optim.schedule={o.schedule!r} must be one of {optim.SCHEDULES}.")
  for key in ("lr", "end_lr"):
    if not 0 < o[key] < math.inf:
      raise ValueError(f"config.optim.{key}={o[key]} must be finite and > 0.")
  for key in ("b1", "b2", "ema_decay", "decay_fraction"):
    if not 0.0 <= o[key] < 1.0:
      raise ValueError(f"config.optim.{key}={o[key]} must lie in [0, 1).")
  for key in ("weight_decay", "warmup_epochs"):
    if not 0 <= o[key] < math.inf:
      raise ValueError(f"config.optim.{key}={o[key]} must be finite and >= 0.")
  if not 0 < o.grad_clip < math.inf:
    raise ValueError(f"config.optim.grad_clip={o.grad_clip} must be finite and > 0.")
  for key in ("every_steps", "keep"):
    if config.ckpt[key] < 1:
      raise ValueError(f"config.ckpt.{key}={config.ckpt[key]} must be >= 1.")
  if config.log_every_steps < 1:
    raise ValueError(f"config.log_every_steps={config.log_every_steps} must be >= 1.")
  for key, value in (config.get("tpu_compiler_options") or {}).items():
    if not key.startswith("xla_") or not isinstance(value, (bool, int, float, str)):
      raise ValueError(f"config.tpu_compiler_options.{key}={value!r}: XLA options are named "
                       f"xla_... and take a bool, number or string.")
  for key in ("eval_every_steps", "sample_every_steps", "profile_steps"):
    if config[key] < 0:
      raise ValueError(f"config.{key}={config[key]} must be >= 0 (0 = off).")
  if config.eval_batches == 0 or config.eval_batches < -1:
    raise ValueError(f"config.eval_batches={config.eval_batches} must be >= 1 or -1 (the whole "
                     f"split); to skip evaluation, set config.data.eval_split=''.")
  if config.data.builtin:
    builtin_data.lookup(config.data.builtin)
  if not config.data.path and not config.data.builtin:
    raise ValueError("config.data.path is empty: point it at token shards "
                     "(e.g. --config.data.path=gs://BUCKET/imagenet256_tokens).")
  if config.data.num_workers < 0:
    raise ValueError(f"config.data.num_workers={config.data.num_workers} must be >= 0.")
  if config.sample_every_steps and not (config.sample.vq_checkpoint or config.data.builtin):
    raise ValueError(f"config.sample_every_steps={config.sample_every_steps} needs "
                     f"config.sample.vq_checkpoint (converted VQ-16 weights) to decode samples.")


def _check_parameter_splits(config: ml_collections.ConfigDict, cfg: model_lib.ModelConfig,
                            mesh: dict[str, int]) -> None:
  """Every parameter axis that sharding.RULES splits over a mesh axis must divide evenly."""
  kv = "config.model.n_kv_head" if config.model.n_kv_head else "config.model.n_head (kv heads)"
  splits = {"fsdp": (("config.model.dim", cfg.dim),),
            "tensor": (("config.model.n_head", cfg.n_head), (kv, cfg.kv_heads),
                       ("the FFN width (from config.model.dim)", cfg.ffn_dim),
                       ("config.model.vocab_size", cfg.vocab_size))}
  for axis, sizes in splits.items():
    for name, size in sizes:
      if size % mesh[axis]:
        raise ValueError(f"{name}={size} is not divisible by the '{axis}' mesh axis "
                         f"(config.mesh.{axis} resolves to {mesh[axis]}), which splits it.")


# Keys a resumed run may change: where and how it runs, not what it computes. Everything else
# (model, npp schedule, optim, batch size, seed, data splits) is the run's identity: changing it
# mid-run silently gives another experiment than the one its workdir holds.
RESUMABLE_CHANGES = ("mesh.", "log_every_steps", "eval_every_steps", "sample_every_steps",
                     "profile_steps", "compile_cache", "tpu_compiler_options.",
                     "ckpt.every_steps", "ckpt.keep", "ckpt.init_from", "data.path",
                     "data.num_workers", "data.eval_split", "model.remat", "model.scan_unroll",
                     "model.kernels",
                     "sample.")


def flat_dict(d: Any, prefix: str = "") -> dict[str, Any]:
  """{'a': {'b': 1}} -> {'a.b': 1}."""
  if not isinstance(d, dict):
    return {prefix[:-1]: d}
  out = {}
  for k, v in d.items():
    out.update(flat_dict(v, f"{prefix}{k}."))
  return out


def resume_changes(saved: dict, config: ml_collections.ConfigDict
                   ) -> list[tuple[str, Any, Any]]:
  """(key, saved value, new value) of every key outside RESUMABLE_CHANGES where `config`
  differs from the JSON config a workdir's earlier run saved (config.json). Keys only one side
  has (added to or removed from npp_jax since that run) are not changes the user made: their
  defaults keep the earlier behaviour."""
  old = flat_dict(saved)
  new = flat_dict(json.loads(config.to_json_best_effort(sort_keys=True)))
  return [(k, old[k], new[k]) for k in sorted(set(old) & set(new))
          if old[k] != new[k] and not k.startswith(RESUMABLE_CHANGES)]
