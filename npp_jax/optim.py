"""The optimizer: AdamW with the learning-rate schedule, decay mask and optional EMA.

Owns: `make_optimizer(config, schedule, steps_per_epoch)` (an optax GradientTransformation built
from optax combinators only), `learning_rate(config, schedule, steps_per_epoch)` and the
per-segment multiplier `lr_multiplier`.

Recipe (LlamaGen / NPP): AdamW beta = (0.9, 0.95), weight decay 0.05 on >= 2-D parameters only
(the reference decays `p.dim() >= 2`, i.e. everything but the RMSNorm scales), global-norm
clipping at 1.0, base LR 1e-4 per 256 images of global batch. `config.optim.schedule` picks the
LR over steps: "npp" (NPP's `--scheduler`: per-segment warmup / constant / linear decay to
end_lr) or "constant" (LlamaGen's baselines, trained without `--scheduler`). Our stacked layer
parameters carry an extra leading layer axis, so the mask looks at the parameter's rank without
that axis.
"""
from __future__ import annotations

import jax
import ml_collections
import optax
from flax import nnx

from npp_jax import patching

SCHEDULES = ("npp", "constant")


def lr_multiplier(schedule: patching.Schedule, *, warmup_steps: int, decay_fraction: float = 0.2,
                  end_factor: float = 0.1) -> optax.Schedule:
  """Per-segment learning-rate multiplier, a pure function of the global step.

  In every segment: linear warmup from 0 to 1 over `warmup_steps`, constant, then linear decay to
  `end_factor` (end_lr / base_lr) over the last `decay_fraction` of the segment (the NPP code's
  per-segment LambdaLR, but a function of the global step so resume lands exactly).
  """
  pieces, boundaries = [], []
  for seg in schedule.segments:
    length = seg.end - seg.start
    warm = min(warmup_steps, length)
    decay = int(length * decay_fraction)
    const = max(length - warm - decay, 0)
    pieces.append(optax.join_schedules(
        [optax.linear_schedule(0.0, 1.0, max(warm, 1)),
         optax.constant_schedule(1.0),
         optax.linear_schedule(1.0, end_factor, max(decay, 1))],
        [warm, warm + const]))
    boundaries.append(seg.end)
  return optax.join_schedules(pieces, boundaries[:-1])


def learning_rate(config: ml_collections.ConfigDict, schedule: patching.Schedule,
                  steps_per_epoch: int) -> optax.Schedule:
  """Absolute LR as a pure function of the global step."""
  scale = config.global_batch_size / 256.0
  base, end = config.optim.lr * scale, config.optim.end_lr * scale
  if config.optim.schedule == "constant":
    return optax.constant_schedule(base)
  if config.optim.schedule != "npp":
    raise ValueError(f"config.optim.schedule={config.optim.schedule!r} must be one of "
                     f"{SCHEDULES}.")
  mult = lr_multiplier(
      schedule, warmup_steps=int(round(config.optim.warmup_epochs * steps_per_epoch)),
      decay_fraction=config.optim.decay_fraction, end_factor=end / base)
  return lambda step: base * mult(step)


def decay_mask(params: nnx.State) -> nnx.State:
  """True for weights that are matrices (or stacks of matrices): embeddings and projections."""
  def is_matrix(path, x):
    stacked = bool(path) and getattr(path[0], "key", None) == "layers"
    return (x.ndim - 1 if stacked else x.ndim) >= 2
  return jax.tree_util.tree_map_with_path(is_matrix, params)


def make_optimizer(config: ml_collections.ConfigDict, schedule: patching.Schedule,
                   steps_per_epoch: int) -> optax.GradientTransformation:
  o = config.optim
  tx = optax.chain(
      optax.clip_by_global_norm(o.grad_clip),
      optax.adamw(learning_rate(config, schedule, steps_per_epoch), b1=o.b1, b2=o.b2,
                  weight_decay=o.weight_decay, mask=decay_mask),
  )
  return tx
