"""KV-cache decoding: the cache, the per-layer weights and one decode step through the model's block.

Owns: `decode_weights` (each layer's weights sliced and cast once, before the decode loop),
`cache_phases` (the cache grows in phases), `empty_cache` / `grow_cache`, `attend` (attention of
a window of queries over the cache) and `cached_step` (W positions per row through every layer,
writing their k/v into the cache). The layer maths is `model_lib.block`, the same function the
training scan runs: decoding only supplies the attention over its cache. `npp_jax/sample.py`
(token by token) and `npp_jax/sjd.py` (speculative windows) drive these from their loops.

Layouts: the cache is (R, J, L, E) for both k and v, so the new positions' write is one
contiguous run per (row, head), nothing is transposed per step, and both attention products are
batched matmuls over (R, J) that read the cache at memory bandwidth. A step reads every weight
once plus the cache up to its phase's length, so it is bound by memory bandwidth.

Shape legend: R rows, W window positions, D width, H heads, J kv heads, G = H / J, E head_dim,
K = E / 2 rotary pairs, L cache length.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from npp_jax import model as model_lib
from npp_jax import kernels, sharding

_CACHE_AXES = ("act_batch", "act_heads", None, None)


def decode_weights(model: model_lib.Transformer) -> list[dict[str, jax.Array]]:
  """Each layer's weights (`model_lib.layer_params`), sliced and cast to the compute dtype once
  (norm scales stay float32).

  Slicing per layer outside the loop matters on CPU: slicing the stacked arrays inside the loop
  copies every layer's weights at every step.
  """
  cfg = model.cfg
  dtype = model_lib.DTYPES[cfg.dtype]
  stacked = model_lib.layer_params(model.layers)
  return [{k: a[i] if k.endswith("_norm") else a[i].astype(dtype) for k, a in stacked.items()}
          for i in range(cfg.n_layer)]


def cache_phases(num_tokens: int, phase: int = 64) -> list[tuple[int, int]]:
  """[(last step + 1, cache length)] of the decode phases.

  Step t attends to positions 0..t, so phase i's cache needs only its end's length (rounded up
  to a multiple of 8): on average 5/8 of the full cache is read instead of all of it, at the
  price of one compiled loop per phase (phases of 32 read 9/16 but double the compile time;
  no faster on a loaded 2-core CPU). Position N never enters (the last token is not fed).
  """
  ends = list(range(phase, num_tokens, phase)) + [num_tokens]
  return [(end, model_lib.find_multiple(end, 8)) for end in ends]


def empty_cache(cfg: model_lib.ModelConfig, rows: int) -> tuple:
  """Every layer's (k_RxJxLxE, v_RxJxLxE) at length 0 (`grow_cache` sizes it)."""
  dtype = model_lib.DTYPES[cfg.dtype]
  empty = jnp.zeros((rows, cfg.kv_heads, 0, cfg.head_dim), dtype)
  return ((empty, empty),) * cfg.n_layer


def grow_cache(cache: tuple, length: int) -> tuple:
  """Zero-pads every layer's k and v to `length` positions (a copy once per phase)."""
  def pad(a):
    a = jnp.pad(a, ((0, 0), (0, 0), (0, length - a.shape[2]), (0, 0)))
    return sharding.constrain(a, _CACHE_AXES)
  return tuple((pad(k), pad(v)) for k, v in cache)


def attend(q_RxWxJxGxE: jax.Array, k_RxJxLxE: jax.Array, v_RxJxLxE: jax.Array,
           valid_RxWxL: jax.Array) -> jax.Array:
  """Softmax attention of W query positions per row over the cache: o_RxWxJxGxE (float32).

  `valid_RxWxL` (R may be 1) says which cache positions each query sees (its causal prefix).
  The queries of a kv head are one (G W)-row operand: the same batched dots as for W = 1
  (XLA:CPU has no bfloat16 dot with two free dimensions on one side).
  """
  r, w, j, g, e = q_RxWxJxGxE.shape
  q = q_RxWxJxGxE.transpose(0, 2, 3, 1, 4).reshape(r, j, g * w, e)
  s = jnp.einsum("rjqe,rjle->rjql", q, k_RxJxLxE, preferred_element_type=jnp.float32)
  s = s.reshape(r, j, g, w, -1)
  s = jnp.where(valid_RxWxL[:, None, None], s / math.sqrt(e), -jnp.inf).reshape(r, j, g * w, -1)
  p = jax.nn.softmax(s, axis=-1).astype(v_RxJxLxE.dtype)
  o = jnp.einsum("rjql,rjle->rjqe", p, v_RxJxLxE, preferred_element_type=jnp.float32)
  return o.reshape(r, j, g, w, e).transpose(0, 3, 1, 2, 4)


def _write(cache_RxJxLxE: jax.Array, new_RxJxWxE: jax.Array, pos: jax.Array) -> jax.Array:
  """Writes W positions starting at `pos` (a scalar: every row; pos_R: row r at pos_R[r])."""
  new_RxJxWxE = new_RxJxWxE.astype(cache_RxJxLxE.dtype)
  if jnp.ndim(pos) == 0:
    return jax.lax.dynamic_update_slice(cache_RxJxLxE, new_RxJxWxE, (0, 0, pos, 0))
  return jax.vmap(lambda c, u, p: jax.lax.dynamic_update_slice(c, u, (0, p, 0)))(
      cache_RxJxLxE, new_RxJxWxE, pos)


def cached_step(cfg: model_lib.ModelConfig, layers: list[dict[str, jax.Array]],
                rope_TxKx2: jax.Array, x_RxWxD: jax.Array, pos: jax.Array,
                cache: tuple) -> tuple[jax.Array, tuple]:
  """Feeds W consecutive positions per row (float32 x_RxWxD) through every layer's
  `model_lib.block`, writing their k/v into the cache: returns the last residual x_RxWxD and the
  cache.

  `pos` is the first position: a scalar (token-by-token decoding, every row at the same
  position) or pos_R (speculative decoding, each row at its own). `rope_TxKx2` holds the RoPE
  rows of the R*W positions, row-major (T = 1 when every row is at the same single position).
  Query w of row r sees cache positions <= pos_r + w: whatever a longer window or a rejected
  draft wrote beyond that is never read, and is overwritten when decoding gets there. The layer
  loop is unrolled: a scan would slice every layer's weights and cache out of stacked arrays at
  every step, and on CPU those slices are copies.
  """
  r, w = x_RxWxD.shape[:2]
  kern = kernels.resolve(cfg.kernels)
  rope = rope_TxKx2.reshape(1 if rope_TxKx2.shape[0] == 1 else r, -1, *rope_TxKx2.shape[1:])
  first_Rx1x1 = jnp.reshape(pos, (-1, 1, 1))
  valid_RxWxL = (jnp.arange(cache[0][0].shape[2])[None, None]
                 <= first_Rx1x1 + jnp.arange(w)[None, :, None])
  x, new_cache = x_RxWxD, []
  for p, (k_cache, v_cache) in zip(layers, cache):
    def attend_cache(q_RxWxHxE, k_RxWxJxE, v_RxWxJxE, k_cache=k_cache, v_cache=v_cache):
      k_cache = _write(k_cache, k_RxWxJxE.transpose(0, 2, 1, 3), pos)
      v_cache = _write(v_cache, v_RxWxJxE.transpose(0, 2, 1, 3), pos)
      j, e = k_RxWxJxE.shape[2:]
      q = q_RxWxHxE.reshape(r, w, j, -1, e)
      return attend(q, k_cache, v_cache, valid_RxWxL).reshape(q_RxWxHxE.shape), (k_cache, v_cache)
    x, layer_cache = model_lib.block(cfg, kern, p, x, rope, attend_cache)
    new_cache.append(layer_cache)
  return x, tuple(new_cache)
