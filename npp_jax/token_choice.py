"""How a token is chosen from the model's logits, shared by every decoding method.

Owns `SamplingOptions` (guidance, temperature, top-k/top-p, and the decoding method), the
filter (`filter_logits`, HF v3 semantics), the filtered distribution every method samples
(`filtered_logits`), the draw (`categorical`, `draw`), and classifier-free guidance's row layout
and combination (`rows`, `guide`). `npp_jax/sample.py` (token by token) and `npp_jax/sjd.py`
(speculative Jacobi decoding) both draw through these, so the two methods sample the same
distribution.

Shape legend: B images, R = 2B (CFG) or B rows, V vocabulary, C any trailing width.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

METHODS = ("ar", "sjd")


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
  """How tokens are drawn (static: one compiled sampler per set of options)."""
  cfg_scale: float = 1.0  # guidance on raw logits; 1 = no null-class rows at all.
  cfg_interval: int = -1  # > -1: decode steps i > cfg_interval (token i + 1) use cond logits only.
  temperature: float = 1.0  # logits / max(temperature, 1e-5): 0 is greedy.
  top_k: int = 0  # keep logits >= the k-th largest; 0 = off.
  top_p: float = 1.0  # nucleus (HF v3 semantics) in (0, 1]; 1 = off.
  method: str = "ar"  # "ar": token by token; "sjd": speculative Jacobi decoding (npp_jax/sjd.py).
  window: int = 0  # sjd: draft tokens verified per forward pass (>= 1); ar: 0.

  def validate(self) -> "SamplingOptions":
    if not math.isfinite(self.cfg_scale):
      raise ValueError(f"cfg_scale={self.cfg_scale} must be finite.")
    if int(self.cfg_interval) != self.cfg_interval or self.cfg_interval < -1:
      raise ValueError(f"cfg_interval={self.cfg_interval} must be an integer >= -1.")
    if not (math.isfinite(self.temperature) and self.temperature >= 0):
      raise ValueError(f"temperature={self.temperature} must be >= 0.")
    if int(self.top_k) != self.top_k or self.top_k < 0:
      raise ValueError(f"top_k={self.top_k} must be an integer >= 0 (0 = off).")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p={self.top_p} must lie in (0, 1] (1 = off).")
    if self.method not in METHODS:
      raise ValueError(f"method={self.method!r} must be one of {', '.join(METHODS)}.")
    if int(self.window) != self.window:
      raise ValueError(f"window={self.window} must be an integer.")
    if self.method == "sjd" and self.window < 1:
      raise ValueError(f"window={self.window}: method='sjd' needs window >= 1 (draft tokens per "
                       f"forward pass).")
    if self.method == "ar" and self.window != 0:
      raise ValueError(f"window={self.window} applies only to method='sjd' (method='ar' decodes "
                       f"one token per forward pass).")
    return self

  @property
  def use_cfg(self) -> bool:
    return self.cfg_scale != 1.0


def filter_logits(logits_BxV: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """HF v3 `top_k_top_p_filtering`: removed logits become -inf.

  top-k keeps logits >= the k-th largest (ties kept). top-p sorts descending, takes the
  cumulative softmax, removes tokens whose cumulative probability exceeds top_p, shifted right by
  one so that the first token crossing the threshold (and the argmax) stays.
  """
  if top_k > 0:
    kth = jax.lax.top_k(logits_BxV, min(top_k, logits_BxV.shape[-1]))[0][..., -1:]
    logits_BxV = jnp.where(logits_BxV < kth, -jnp.inf, logits_BxV)
  if top_p < 1.0:
    sorted_BxV = -jnp.sort(-logits_BxV, axis=-1)
    cum_BxV = jnp.cumsum(jax.nn.softmax(sorted_BxV, axis=-1), axis=-1)
    # The kept set is a prefix of the sorted order (cum is non-decreasing): its length is 1 plus
    # the number of earlier positions still within top_p. Cut at that prefix's smallest logit.
    keep_B1 = 1 + jnp.sum(cum_BxV[..., :-1] <= top_p, axis=-1, keepdims=True)
    threshold_B1 = jnp.take_along_axis(sorted_BxV, keep_B1 - 1, axis=-1)
    logits_BxV = jnp.where(logits_BxV < threshold_B1, -jnp.inf, logits_BxV)
  return logits_BxV


def categorical(keys_B: jax.Array, logits_BxV: jax.Array) -> jax.Array:
  """One draw per row from softmax(logits) by inverting the CDF with a single uniform per row.

  Two levels (block sums, then one block's cumulative sum) keep it cheap: a Gumbel-max draw
  needs V random numbers and two logs per row, and a full-length cumsum is slow on CPU. Tokens
  of probability zero (filtered to -inf) are never drawn.
  """
  b, v = logits_BxV.shape
  size = 1 << math.isqrt(v - 1).bit_length()  # a power of two >= sqrt(V)
  nb = -(-v // size)
  logits = jnp.pad(logits_BxV.astype(jnp.float32), ((0, 0), (0, nb * size - v)),
                   constant_values=-jnp.inf)
  p_BxNbxS = jnp.exp(logits - logits.max(-1, keepdims=True)).reshape(b, nb, size)
  cum_BxNb = jnp.cumsum(p_BxNbxS.sum(-1), axis=-1)
  u_B = jax.vmap(jax.random.uniform)(keys_B)
  target_B = (1.0 - u_B) * cum_BxNb[:, -1]  # in (0, total]
  blk_B = jnp.minimum(jnp.sum(cum_BxNb < target_B[:, None], axis=-1), nb - 1)
  before_B = jnp.where(blk_B > 0, jnp.take_along_axis(
      cum_BxNb, jnp.maximum(blk_B - 1, 0)[:, None], axis=-1)[:, 0], 0.0)
  p_BxS = jnp.take_along_axis(p_BxNbxS, blk_B[:, None, None], axis=1)[:, 0]
  within_B = jnp.sum(jnp.cumsum(p_BxS, axis=-1) < (target_B - before_B)[:, None], axis=-1)
  # Rounding may overshoot the block's last token of non-zero probability: clamp to it.
  last_B = jnp.max(jnp.where(p_BxS > 0, jnp.arange(size), 0), axis=-1)
  return (blk_B * size + jnp.minimum(within_B, last_B)).astype(jnp.int32)


def filtered_logits(logits_BxV: jax.Array, opts: SamplingOptions) -> jax.Array:
  """Raw logits -> the logits whose softmax every method samples: temperature (clamped at
  1e-5), then top-k/top-p."""
  return filter_logits(logits_BxV / max(opts.temperature, 1e-5), opts.top_k, opts.top_p)


def draw(logits_BxV: jax.Array, keys_B: jax.Array, opts: SamplingOptions) -> jax.Array:
  """Tokens_B from raw logits: one draw from `filtered_logits`."""
  return categorical(keys_B, filtered_logits(logits_BxV, opts))


def guide(x_Rx___xC: jax.Array, t: jax.Array | int, opts: SamplingOptions) -> jax.Array:
  """CFG-combined x_Bx___xC of the positions predicting token t (t = 0: the class position).

  `t` is a scalar or broadcasts against x_Bx___xC (one token index per position). The
  combination is linear, so it applies as well to the normed hidden states as to the logits
  they project to: the decode loops combine before the output layer, which then multiplies B
  rows instead of R = 2B.
  """
  if not opts.use_cfg:
    return x_Rx___xC
  pairs = x_Rx___xC.reshape(-1, 2, *x_Rx___xC.shape[1:])
  cond, uncond = pairs[:, 0], pairs[:, 1]
  guided = uncond + (cond - uncond) * opts.cfg_scale
  if opts.cfg_interval > -1:
    # The reference's decode step i produces token i + 1 and drops CFG once i > cfg_interval.
    guided = jnp.where(t - 1 > opts.cfg_interval, cond, guided)
  return guided


def rows(x_B: jax.Array, opts: SamplingOptions, null_value: int | None = None) -> jax.Array:
  """Per-image values x_Bx___ -> per-row values x_Rx___ (cond, null interleaved under CFG)."""
  if not opts.use_cfg:
    return x_B
  other = x_B if null_value is None else jnp.full_like(x_B, null_value)
  return jnp.stack([x_B, other], axis=1).reshape(-1, *x_B.shape[1:])
