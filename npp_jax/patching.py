"""Next Patch Prediction (NPP) as pure functions: the whole idea of the paper in one file.

Owns: patch averaging of token embeddings, grouping of the targets per patch, the patch loss, the
2D RoPE tables of every patch level, and the multi-level patch schedule (segment boundaries,
patch size at a step and the training-cost ratio). The learning-rate schedule is `optim.py`'s.

Shape legend: B batch, N tokens of the square grid (N = G*G), G grid side, p patch side,
K = p*p tokens per patch, P = N / K patches, D width, V vocabulary, L sequence length.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def grid_side(num_tokens: int) -> int:
  """Side G of the square token grid holding `num_tokens` = G*G tokens."""
  g = math.isqrt(num_tokens)
  if g * g != num_tokens:
    raise ValueError(f"{num_tokens} tokens do not form a square grid.")
  return g


def check_patch_size(grid_size: int, patch_size: int, *, name: str = "patch_size") -> None:
  """Raises a ValueError naming `name` unless `patch_size` evenly divides the grid."""
  if not isinstance(patch_size, (int, np.integer)) or patch_size < 1:
    raise ValueError(f"{name}={patch_size!r} must be a positive integer.")
  if grid_size % patch_size:
    raise ValueError(f"{name}={patch_size} does not divide the {grid_size}x{grid_size} token grid.")


def average_patches(x_BxNxD: jax.Array, p: int) -> jax.Array:
  """Patch embeddings: the mean of each non-overlapping p x p block of the token grid.

  Args:
    x_BxNxD: token embeddings in row-major grid order.
    p: patch side.

  Returns:
    x_BxPxD, the patches in row-major order over the coarse (G/p) x (G/p) grid.
  """
  b, n, d = x_BxNxD.shape
  g = grid_side(n)
  check_patch_size(g, p)
  if p == 1:
    return x_BxNxD
  x = x_BxNxD.reshape(b, g // p, p, g // p, p, d)
  return x.mean(axis=(2, 4)).reshape(b, n // (p * p), d)


def group_targets(codes_BxN: jax.Array, p: int) -> jax.Array:
  """The K tokens of every patch, patches and in-patch order both row-major: codes_BxPxK."""
  b, n = codes_BxN.shape
  g = grid_side(n)
  check_patch_size(g, p)
  c = codes_BxN.reshape(b, g // p, p, g // p, p).transpose(0, 1, 3, 2, 4)
  return c.reshape(b, n // (p * p), p * p)


@jax.custom_vjp
def patch_loss(logits_BxPxV: jax.Array, targets_BxPxK: jax.Array) -> jax.Array:
  """Mean over all B*P*K of the cross entropy of position i's logits against each token of patch i.

  Equals the reference's loss on the K-fold repeated logits, but computes one log-sum-exp per
  position and gathers K logits, so nothing of size K*V is ever materialised. Computed in float32.
  The gradient is written out, (K * softmax - target counts) / (B*P*K), as one fused pass over
  the logits instead of XLA's scatter of the gathered logits. (The training step fuses this loss
  with the output layer: `kernels.output_patch_loss`.)
  """
  return patch_loss_terms(logits_BxPxV, targets_BxPxK)[0]


def patch_loss_terms(logits_BxPxV, targets_BxPxK):
  """The patch loss and what its gradient needs: (loss, (float32 lse_BxP, int32 targets))."""
  logits = logits_BxPxV.astype(jnp.float32)
  targets = targets_BxPxK.astype(jnp.int32)
  lse_BxP = jax.nn.logsumexp(logits, axis=-1)
  picked_BxPxK = jnp.take_along_axis(logits, targets, axis=-1)
  return jnp.mean(lse_BxP[..., None] - picked_BxPxK), (lse_BxP, targets)


def patch_loss_logits_grad(logits_BxPxV, lse_BxP, targets_BxPxK, scale):
  """d(sum of the B*P*K cross entropies)/d logits times `scale`: (K * softmax - counts) * scale."""
  k = targets_BxPxK.shape[-1]
  probs = jnp.exp(logits_BxPxV.astype(jnp.float32) - lse_BxP[..., None])
  nd = logits_BxPxV.ndim
  vocab = jax.lax.broadcasted_iota(jnp.int32, (1,) * (nd - 1) + logits_BxPxV.shape[-1:], nd - 1)
  counts = sum((targets_BxPxK[..., i, None] == vocab).astype(jnp.float32) for i in range(k))
  return (k * probs - counts) * scale


def _patch_loss_fwd(logits_BxPxV, targets_BxPxK):
  loss, (lse_BxP, targets) = patch_loss_terms(logits_BxPxV, targets_BxPxK)
  return loss, (logits_BxPxV, lse_BxP, targets)


def _patch_loss_bwd(residuals, g):
  logits_BxPxV, lse_BxP, targets_BxPxK = residuals
  b, p, k = targets_BxPxK.shape
  d_logits = patch_loss_logits_grad(logits_BxPxV, lse_BxP, targets_BxPxK, g / (b * p * k))
  return d_logits.astype(logits_BxPxV.dtype), None


patch_loss.defvjp(_patch_loss_fwd, _patch_loss_bwd)


# ---------------------------------------------------------------------------------------------
# 2D RoPE.
# ---------------------------------------------------------------------------------------------
ROPE_PLACEMENTS = ("coarse", "centre")


def rope_table(head_dim: int, grid_size: int, *, patch_size: int = 1, base: float = 10000.0,
               cls_token_num: int = 1, placement: str = "coarse") -> np.ndarray:
  """LlamaGen's 2D RoPE table for the patch level with side `patch_size`.

  Row 0..cls_token_num-1 belong to the class position(s) and are all zeros (cos = sin = 0), which
  zeroes the class position's q and k exactly as the reference does. Row cls_token_num + i*g + j
  holds the angles of coarse-grid cell (i, j), g = grid_size / patch_size: the first head_dim/4
  rotary pairs rotate by i*f, the last head_dim/4 by j*f, with f_k = base^(-4k/head_dim).

  Args:
    head_dim: per-head width (even; head_dim/4 frequencies per axis, floor for 3B's 100).
    grid_size: side G of the token grid.
    patch_size: side p of the patches; the table is built on the (G/p) x (G/p) grid.
    base: RoPE base.
    cls_token_num: number of leading conditioning positions.
    placement: "coarse" (the reference: patch (i, j) sits at coordinate (i, j)) or "centre"
      (patch (i, j) sits at the centre of its p x p block on the fine grid, (i*p + (p-1)/2, ...),
      so every level shares the token grid's coordinates).

  Returns:
    float32 array (cls_token_num + g*g, head_dim // 2, 2): [..., 0] = cos, [..., 1] = sin.
  """
  if placement not in ROPE_PLACEMENTS:
    raise ValueError(f"rope placement={placement!r} must be one of {ROPE_PLACEMENTS}.")
  check_patch_size(grid_size, patch_size)
  half = head_dim // 2
  freqs = 1.0 / (base ** (np.arange(0, half, 2, dtype=np.float32)[: half // 2] / half))
  g = grid_size // patch_size
  coord = np.arange(g, dtype=np.float32)
  if placement == "centre":
    coord = coord * patch_size + (patch_size - 1) / 2.0
  rows = np.repeat(coord, g)  # i for cell i*g + j
  cols = np.tile(coord, g)  # j
  angles = np.concatenate([np.outer(rows, freqs), np.outer(cols, freqs)], axis=-1)
  table = np.stack([np.cos(angles), np.sin(angles)], axis=-1).astype(np.float32)
  cls = np.zeros((cls_token_num,) + table.shape[1:], np.float32)
  return np.concatenate([cls, table], axis=0)


def apply_rope(x_BxLxHxE: jax.Array, table: jax.Array) -> jax.Array:
  """Rotates interleaved pairs (x[2i], x[2i+1]) of every head by the table's angles (float32).

  `table` is L x K x 2 (cos, sin of K = E/2 angles per position, the same for every row) or
  B x L x K x 2 (each row at its own positions, as in speculative decoding)."""
  x = x_BxLxHxE.astype(jnp.float32)
  *lead, e = x.shape
  x = x.reshape(*lead, e // 2, 2)
  table_BxLxKx2 = table if table.ndim == 4 else table[None]
  cos = table_BxLxKx2[:, :, None, :, 0]
  sin = table_BxLxKx2[:, :, None, :, 1]
  x0, x1 = x[..., 0], x[..., 1]
  out = jnp.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], axis=-1)
  return out.reshape(*lead, e).astype(x_BxLxHxE.dtype)


# ---------------------------------------------------------------------------------------------
# Schedule.
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Segment:
  """One patch level: steps [start, end) train with patches of side `patch_size`."""
  patch_size: int
  start: int
  end: int

  @property
  def tokens_per_patch(self) -> int:
    return self.patch_size * self.patch_size


def segment_epochs(epochs: int, num_levels: int, segment_factor: float) -> list[int]:
  """Segment ends in epochs, as the reference: [int(E * lambda^i) for i < #L][::-1]."""
  if num_levels < 1:
    raise ValueError(f"npp.num_levels={num_levels} must be >= 1.")
  if num_levels > 1 and not 0.0 < segment_factor < 1.0:
    raise ValueError(f"npp.segment_factor={segment_factor} must lie in (0, 1).")
  ends = [int(epochs * segment_factor ** i) for i in range(num_levels)][::-1]
  if ends[0] < 1 or any(b <= a for a, b in zip(ends, ends[1:])):
    raise ValueError(
        f"npp.epochs={epochs}, npp.num_levels={num_levels}, npp.segment_factor={segment_factor} "
        f"give empty segments (ends {ends} epochs).")
  return ends


@dataclasses.dataclass(frozen=True)
class Schedule:
  """The patch schedule: consecutive segments covering steps [0, total_steps)."""
  segments: tuple[Segment, ...]

  @property
  def total_steps(self) -> int:
    return self.segments[-1].end

  @property
  def patch_sizes(self) -> tuple[int, ...]:
    return tuple(s.patch_size for s in self.segments)

  def segment_at(self, step: int) -> Segment:
    for seg in self.segments:
      if step < seg.end:
        return seg
    return self.segments[-1]

  def patch_size_at(self, step: int) -> int:
    """Patch side used to train step `step` (steps past the end keep the last level)."""
    return self.segment_at(step).patch_size

  @property
  def boundaries(self) -> tuple[int, ...]:
    """Steps at which a new segment starts (excluding 0)."""
    return tuple(s.start for s in self.segments[1:])


def make_schedule(*, total_steps: int, steps_per_epoch: int, epochs: int, grid_size: int,
                  num_levels: int = 1, segment_factor: float = 0.5,
                  patch_sizes: Sequence[int] | None = None,
                  fractions: Sequence[float] | None = None) -> Schedule:
  """Builds the patch schedule.

  Either from (epochs, #L, lambda) exactly as the reference (level l, counted from the first,
  uses p = 2^(#L-1-l); segment ends at int(E*lambda^i) epochs times steps_per_epoch, the last
  clipped to total_steps), or from an explicit list of patch sides with the fraction of training
  each gets (paper Table 3a, e.g. patch_sizes=(4, 1), fractions=(0.5, 0.5)).
  """
  if total_steps < 1:
    raise ValueError(f"total_steps={total_steps} must be >= 1.")
  if patch_sizes:
    patch_sizes = tuple(int(p) for p in patch_sizes)
    fractions = tuple(fractions) if fractions else (1.0 / len(patch_sizes),) * len(patch_sizes)
    if len(fractions) != len(patch_sizes):
      raise ValueError(f"npp.fractions {fractions} and npp.patch_sizes {patch_sizes} differ in length.")
    if any(f <= 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
      raise ValueError(f"npp.fractions {fractions} must be positive and sum to 1.")
    cum = np.cumsum(fractions)
    ends = [int(round(c * total_steps)) for c in cum]
  else:
    patch_sizes = tuple(2 ** (num_levels - 1 - l) for l in range(num_levels))
    ends = [e * steps_per_epoch for e in segment_epochs(epochs, num_levels, segment_factor)]
  ends[-1] = total_steps
  for i, p in enumerate(patch_sizes):
    check_patch_size(grid_size, p, name=f"npp patch size of level {i}")
  segments, start = [], 0
  for p, end in zip(patch_sizes, ends):
    if end <= start:
      raise ValueError(f"npp schedule has an empty segment for patch size {p} "
                       f"(steps {start}..{end}); train longer or use fewer levels.")
    segments.append(Segment(p, start, end))
    start = end
  return Schedule(tuple(segments))


def training_cost(schedule: Schedule) -> float:
  """Training compute relative to next-token prediction: sum over segments of fraction / K.

  The paper's figures: #L = 2/3/4 with lambda = 1/2 give 0.625 / 0.578 / 0.572; #L = 2 with
  lambda = 2/3, 3/4, 4/5 gives 0.5 / 0.4375 / 0.4 (the paper prints 0.43, truncated).
  """
  total = schedule.total_steps
  return sum((s.end - s.start) / total / s.tokens_per_patch for s in schedule.segments)
