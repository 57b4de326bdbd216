"""The optimizer: AdamW with the per-segment NPP learning-rate schedule, decay mask and optional EMA.

Owns: `make_optimizer(config, schedule, steps_per_epoch)` (an optax GradientTransformation built
from optax combinators only) and `learning_rate(config, schedule, steps_per_epoch)`.

Recipe (LlamaGen / NPP): AdamW beta = (0.9, 0.95), weight decay 0.05 on >= 2-D parameters only
(the reference decays `p.dim() >= 2`, i.e. everything but the RMSNorm scales), global-norm
clipping at 1.0, base LR 1e-4 per 256 images of global batch, per-segment warmup / constant /
linear decay to end_lr. Our stacked layer parameters carry an extra leading layer axis, so the
mask looks at the parameter's rank without that axis.
"""
from __future__ import annotations

import jax
import ml_collections
import optax
from flax import nnx

from npp_jax import patching


def learning_rate(config: ml_collections.ConfigDict, schedule: patching.Schedule,
                  steps_per_epoch: int) -> optax.Schedule:
  """Absolute LR as a pure function of the global step."""
  scale = config.global_batch_size / 256.0
  base, end = config.optim.lr * scale, config.optim.end_lr * scale
  mult = patching.lr_multiplier(
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
