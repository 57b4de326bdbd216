"""KV-cache decoding internals: decode-layout weights, the cache, and one decode step.

Owns: `decode_weights` (each layer's weights sliced, cast and laid out for single-position
matmuls once, before the decode loop), `cache_phases` (the cache grows in phases), `empty_cache`
/ `grow_cache`, and `cached_step` (one position through every layer, writing its k/v into the
cache). `npp_jax/sample.py` drives these from its sampling loop; the maths is the model's
(`model_lib.Transformer.hidden` at patch size 1), only the layouts differ:

  * q, k and v are one matmul against [wq | wk | wv] (D, (H + 2J) E), w1 and w3 one against
    [w1 | w3] (D, 2F), and wo is (H E, D). With the model's (H, E, D) wo, XLA:CPU transposed
    every layer's wo at every step (6% of a GPT-B step).
  * The cache is (R, J, L, E) for both k and v, so the new position's write is one contiguous
    row per (row, head), nothing is transposed per step, and both attention products are
    batched matmuls over (R, J) that read the cache at memory bandwidth.

Cost model (CPU, fp32, batch 8 with CFG = 16 rows): a step reads every weight once plus the
cache up to its phase's length (5/8 of the full cache on average), so it is bound by memory
bandwidth: ~51 MB per step for a 4-layer d256 model, ~580 MB for GPT-B.

Shape legend: R rows, D width, H heads, J kv heads, G = H / J, E head_dim, F FFN hidden,
L cache length.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from npp_jax import model as model_lib
from npp_jax import patching, sharding

_CACHE_AXES = ("act_batch", "act_heads", None, None)


def decode_weights(model: model_lib.Transformer) -> list[dict[str, jax.Array]]:
  """Each layer's weights in decode layouts and the compute dtype (norm scales stay float32).

  Slicing per layer once, outside the loop, matters on CPU: slicing the stacked arrays inside
  the loop copies every layer's weights at every step.
  """
  cfg = model.cfg
  dtype = model_lib.DTYPES[cfg.dtype]
  d = cfg.dim
  stacked = model_lib.layer_params(model.layers)
  layers = []
  for i in range(cfg.n_layer):
    p = {k: a[i] for k, a in stacked.items()}
    wqkv = jnp.concatenate([p[k].reshape(d, -1) for k in ("wq", "wk", "wv")], axis=1)
    layers.append({
        "wqkv": wqkv.astype(dtype),
        "wo": p["wo"].reshape(-1, d).astype(dtype),
        "w13": jnp.concatenate([p["w1"], p["w3"]], axis=1).astype(dtype),
        "w2": p["w2"].astype(dtype),
        "attention_norm": p["attention_norm"],
        "ffn_norm": p["ffn_norm"],
    })
  return layers


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
  """Feeds W consecutive positions per row (float32 x_RxWxD) through every layer, writing their
  k/v into the cache: returns the last residual x_RxWxD and the cache.

  `pos` is the first position: a scalar (token-by-token decoding, every row at the same
  position) or pos_R (speculative decoding, each row at its own). `rope_TxKx2` holds the RoPE
  rows of the R*W positions, row-major (T = 1 when every row is at the same single position;
  K = E / 2 rotary pairs). Query w of row r sees cache positions <= pos_r + w: whatever a
  longer window or a rejected draft wrote beyond that is never read, and is overwritten when
  decoding gets there. The layer loop is unrolled: a scan would slice every layer's weights
  and cache out of stacked arrays at every step, and on CPU those slices are copies.
  """
  dtype = model_lib.DTYPES[cfg.dtype]
  r, w = x_RxWxD.shape[:2]
  h_, j, e = cfg.n_head, cfg.kv_heads, cfg.head_dim
  first_Rx1x1 = jnp.reshape(pos, (-1, 1, 1))
  valid_RxWxL = (jnp.arange(cache[0][0].shape[2])[None, None]
                 <= first_Rx1x1 + jnp.arange(w)[None, :, None])
  x, new_cache = x_RxWxD.reshape(r * w, -1), []
  for p, (k_cache, v_cache) in zip(layers, cache):
    h = model_lib.rms_norm(x, p["attention_norm"], cfg.norm_eps).astype(dtype)
    qkv = jnp.dot(h, p["wqkv"])
    q, k, v = jnp.split(qkv, [h_ * e, (h_ + j) * e], axis=1)
    q = patching.apply_rope(q.reshape(1, r * w, h_, e), rope_TxKx2)
    k = patching.apply_rope(k.reshape(1, r * w, j, e), rope_TxKx2)
    k_cache = _write(k_cache, k.reshape(r, w, j, e).transpose(0, 2, 1, 3), pos)
    v_cache = _write(v_cache, v.reshape(r, w, j, e).transpose(0, 2, 1, 3), pos)
    o = attend(q.reshape(r, w, j, h_ // j, e), k_cache, v_cache, valid_RxWxL)
    x = x + jnp.dot(o.reshape(r * w, h_ * e).astype(dtype), p["wo"]).astype(jnp.float32)
    h = model_lib.rms_norm(x, p["ffn_norm"], cfg.norm_eps).astype(dtype)
    g, u = jnp.split(jnp.dot(h, p["w13"]), 2, axis=1)
    x = x + jnp.dot(jax.nn.silu(g) * u, p["w2"]).astype(jnp.float32)
    x = sharding.constrain(x, ("act_batch", "act_embed"))
    new_cache.append((k_cache, v_cache))
  return x.reshape(r, w, -1), tuple(new_cache)
