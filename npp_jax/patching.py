"""Next Patch Prediction (NPP) as pure functions: the whole idea of the paper in one file.

Owns: patch averaging of token embeddings, grouping of the targets per patch, the patch loss, the
2D RoPE tables of every patch level, and the multi-level patch schedule (segment boundaries,
patch size at a step and the training-cost ratio). The learning-rate schedule is `optim.py`'s.

Shape legend: B batch, N tokens of the square grid (N = G*G), G grid side, p patch side,
K = p*p tokens per patch, P = N / K patches, D width, V vocabulary, L sequence length.
"""
from __future__ import annotations

import dataclasses
import functools
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
  the logits instead of XLA's scatter of the gathered logits.
  """
  return _patch_loss_fwd(logits_BxPxV, targets_BxPxK)[0]


def _patch_loss_fwd(logits_BxPxV, targets_BxPxK):
  logits = logits_BxPxV.astype(jnp.float32)
  targets = targets_BxPxK.astype(jnp.int32)
  lse_BxP = jax.nn.logsumexp(logits, axis=-1)
  picked_BxPxK = jnp.take_along_axis(logits, targets, axis=-1)
  return jnp.mean(lse_BxP[..., None] - picked_BxPxK), (logits_BxPxV, lse_BxP, targets)


def _patch_loss_bwd(residuals, g):
  logits_BxPxV, lse_BxP, targets_BxPxK = residuals
  b, p, v = logits_BxPxV.shape
  k = targets_BxPxK.shape[-1]
  probs = jnp.exp(logits_BxPxV.astype(jnp.float32) - lse_BxP[..., None])
  vocab = jax.lax.broadcasted_iota(jnp.int32, (1, 1, v), 2)
  counts = sum((targets_BxPxK[..., i, None] == vocab).astype(jnp.float32) for i in range(k))
  d_logits = (k * probs - counts) * (g / (b * p * k))
  return d_logits.astype(logits_BxPxV.dtype), None


patch_loss.defvjp(_patch_loss_fwd, _patch_loss_bwd)


def output_patch_loss(h_BxPxD: jax.Array, w_DxV: jax.Array, targets_BxPxK: jax.Array, *,
                      chunks: int | None = None) -> jax.Array:
  """`patch_loss(h @ w, targets)`, fused with the output projection for speed.

  Same value and gradients as the unfused form (tested). Logits are accumulated in float32
  whatever the dtype of h and w.

  Args:
    h_BxPxD: final-normed hidden states, in the compute dtype.
    w_DxV: the output projection.
    targets_BxPxK: group_targets of the codes.
    chunks: split the P positions into this many chunks (a divisor of P). 1: one pass; the
      backward materialises the B*P x V logits' gradient once and feeds both matmuls in layouts
      that need no transposed copy. > 1: a loop over chunks that, when differentiated, computes
      each chunk's logits, softmax and gradients while the chunk is in cache (gradients in the
      forward pass, the backward only scales them): it never holds the B*P x V logits, and
      saves ~15% of the loss's time on CPU, where it is memory-bound. None: auto (chunks of
      ~16 MiB of logits on CPU, 1 elsewhere).

  Returns:
    The scalar float32 loss.
  """
  p = h_BxPxD.shape[1]
  if chunks is None:
    chunks = auto_loss_chunks(h_BxPxD.shape[0], p, w_DxV.shape[-1])
  if chunks < 1 or p % chunks:
    raise ValueError(f"output_patch_loss: chunks={chunks} must be a divisor of P={p}.")
  if chunks == 1:
    return _output_patch_loss(h_BxPxD, w_DxV, targets_BxPxK)
  return _chunked_output_patch_loss(chunks, h_BxPxD, w_DxV, targets_BxPxK)


def auto_loss_chunks(batch: int, positions: int, vocab: int, chunk_bytes: int = 1 << 24) -> int:
  """Chunks for `output_patch_loss`: 1 off CPU, else halve P while a chunk's logits exceed
  `chunk_bytes` (sized for a CPU's last-level cache)."""
  if jax.default_backend() != "cpu":
    return 1
  chunks = 1
  while positions % (2 * chunks) == 0 and batch * (positions // chunks) * vocab * 4 > chunk_bytes:
    chunks *= 2
  return chunks


@jax.custom_vjp
def _output_patch_loss(h_BxPxD, w_DxV, targets_BxPxK):
  return _output_patch_loss_fwd(h_BxPxD, w_DxV, targets_BxPxK)[0]


def _output_patch_loss_fwd(h_BxPxD, w_DxV, targets_BxPxK):
  logits = jnp.einsum("bld,dv->blv", h_BxPxD, w_DxV, preferred_element_type=jnp.float32)
  loss, (_, lse_BxP, targets) = _patch_loss_fwd(logits, targets_BxPxK)
  return loss, (h_BxPxD, w_DxV, logits, lse_BxP, targets)


def _output_patch_loss_bwd(residuals, g):
  h, w, logits, lse_BxP, targets = residuals
  b, p, d = h.shape
  d_logits = _patch_loss_bwd((logits, lse_BxP, targets), g)[0].reshape(b * p, -1)
  dh = jnp.dot(d_logits.astype(w.dtype), w.T, preferred_element_type=jnp.float32)
  dw = jnp.dot(h.reshape(b * p, d).T, d_logits.astype(h.dtype), preferred_element_type=jnp.float32)
  return dh.reshape(b, p, d).astype(h.dtype), dw.astype(w.dtype), None


_output_patch_loss.defvjp(_output_patch_loss_fwd, _output_patch_loss_bwd)


def _split_positions(x_BxPx_: jax.Array, chunks: int) -> jax.Array:
  """x_BxPx... -> x_Cx(B)x(P/C)x...: chunks over positions, so a batch-sharded x stays sharded."""
  b, p = x_BxPx_.shape[:2]
  x = x_BxPx_.reshape(b, chunks, p // chunks, *x_BxPx_.shape[2:])
  return jnp.swapaxes(x, 0, 1)


def _chunk_sums(h_RxD, w_DxV, targets_RxK):
  """Float32 logits of one chunk's R rows and the sum of their K cross entropies."""
  logits_RxV = jnp.dot(h_RxD, w_DxV, preferred_element_type=jnp.float32)
  lse_R = jax.nn.logsumexp(logits_RxV, axis=-1)
  picked_RxK = jnp.take_along_axis(logits_RxV, targets_RxK, axis=-1)
  return logits_RxV, lse_R, jnp.sum(lse_R[:, None] - picked_RxK)


def _chunked_loss_and_grads(chunks, h_BxPxD, w_DxV, targets_BxPxK, with_grads):
  b, p, d = h_BxPxD.shape
  k = targets_BxPxK.shape[-1]
  scale = 1.0 / (b * p * k)
  hs = _split_positions(h_BxPxD, chunks)
  ts = _split_positions(targets_BxPxK.astype(jnp.int32), chunks)

  def body(carry, xs):
    h_RxD, t_RxK = xs[0].reshape(-1, d), xs[1].reshape(-1, k)
    logits_RxV, lse_R, ce = _chunk_sums(h_RxD, w_DxV, t_RxK)
    if not with_grads:
      return carry + ce, None
    total, dw_DxV = carry
    # d loss / d logits = (K * softmax - target counts) * scale, as _patch_loss_bwd.
    probs = jnp.exp(logits_RxV - lse_R[:, None])
    vocab = jax.lax.broadcasted_iota(jnp.int32, (1, logits_RxV.shape[-1]), 1)
    counts = sum((t_RxK[:, i, None] == vocab).astype(jnp.float32) for i in range(k))
    d_logits = ((k * probs - counts) * scale).astype(w_DxV.dtype)
    dh_RxD = jnp.dot(d_logits, w_DxV.T, preferred_element_type=jnp.float32)
    dw_DxV = dw_DxV + jnp.dot(h_RxD.T, d_logits, preferred_element_type=jnp.float32)
    return (total + ce, dw_DxV), dh_RxD.reshape(xs[0].shape).astype(h_BxPxD.dtype)

  if not with_grads:
    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (hs, ts))
    return total * scale
  init = (jnp.zeros((), jnp.float32), jnp.zeros(w_DxV.shape, jnp.float32))
  (total, dw_DxV), dhs = jax.lax.scan(body, init, (hs, ts))
  dh_BxPxD = jnp.swapaxes(dhs, 0, 1).reshape(h_BxPxD.shape)
  return total * scale, (dh_BxPxD, dw_DxV.astype(w_DxV.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunked_output_patch_loss(chunks, h_BxPxD, w_DxV, targets_BxPxK):
  return _chunked_loss_and_grads(chunks, h_BxPxD, w_DxV, targets_BxPxK, with_grads=False)


def _chunked_fwd(chunks, h_BxPxD, w_DxV, targets_BxPxK):
  return _chunked_loss_and_grads(chunks, h_BxPxD, w_DxV, targets_BxPxK, with_grads=True)


def _chunked_bwd(chunks, grads, g):
  del chunks
  dh, dw = grads
  return (dh * g).astype(dh.dtype), (dw * g).astype(dw.dtype), None


_chunked_output_patch_loss.defvjp(_chunked_fwd, _chunked_bwd)


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


def apply_rope(x_BxLxHxE: jax.Array, table_Lx2: jax.Array) -> jax.Array:
  """Rotates interleaved pairs (x[2i], x[2i+1]) of every head by the table's angles (float32)."""
  x = x_BxLxHxE.astype(jnp.float32)
  *lead, e = x.shape
  x = x.reshape(*lead, e // 2, 2)
  cos = table_Lx2[None, :, None, :, 0]
  sin = table_Lx2[None, :, None, :, 1]
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
