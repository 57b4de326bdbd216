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


def attend(q_RxJxGxE: jax.Array, k_RxJxLxE: jax.Array, v_RxJxLxE: jax.Array,
           valid_L: jax.Array) -> jax.Array:
  """Softmax attention of one query position per head over the cache: o_RxJxGxE (float32)."""
  e = q_RxJxGxE.shape[-1]
  s = jnp.einsum("rjge,rjle->rjgl", q_RxJxGxE, k_RxJxLxE, preferred_element_type=jnp.float32)
  s = jnp.where(valid_L, s / math.sqrt(e), -jnp.inf)
  w = jax.nn.softmax(s, axis=-1).astype(v_RxJxLxE.dtype)
  return jnp.einsum("rjgl,rjle->rjge", w, v_RxJxLxE, preferred_element_type=jnp.float32)


def cached_step(cfg: model_lib.ModelConfig, layers: list[dict[str, jax.Array]],
                rope_row_1xKx2: jax.Array, x_RxD: jax.Array, pos: jax.Array,
                cache: tuple) -> tuple[jax.Array, tuple]:
  """Feeds one position (float32 x_RxD) through every layer: the last residual x_RxD, cache.

  `rope_row_1xKx2` is the RoPE table row of `pos` (K = E / 2 rotary pairs). The layer loop is
  unrolled: a scan would slice every layer's weights and cache out of stacked arrays at every
  step, and on CPU those slices are copies.
  """
  dtype = model_lib.DTYPES[cfg.dtype]
  r = x_RxD.shape[0]
  h_, j, e = cfg.n_head, cfg.kv_heads, cfg.head_dim
  valid_L = jnp.arange(cache[0][0].shape[2]) <= pos
  x, new_cache = x_RxD, []
  for p, (k_cache, v_cache) in zip(layers, cache):
    h = model_lib.rms_norm(x, p["attention_norm"], cfg.norm_eps).astype(dtype)
    qkv = jnp.dot(h, p["wqkv"])
    q, k, v = jnp.split(qkv, [h_ * e, (h_ + j) * e], axis=1)
    q = patching.apply_rope(q.reshape(r, 1, h_, e), rope_row_1xKx2)
    k = patching.apply_rope(k.reshape(r, 1, j, e), rope_row_1xKx2)
    k_cache = jax.lax.dynamic_update_slice(
        k_cache, k.reshape(r, j, 1, e).astype(k_cache.dtype), (0, 0, pos, 0))
    v_cache = jax.lax.dynamic_update_slice(
        v_cache, v.reshape(r, j, 1, e).astype(v_cache.dtype), (0, 0, pos, 0))
    o = attend(q.reshape(r, j, h_ // j, e), k_cache, v_cache, valid_L)
    x = x + jnp.dot(o.reshape(r, h_ * e).astype(dtype), p["wo"]).astype(jnp.float32)
    h = model_lib.rms_norm(x, p["ffn_norm"], cfg.norm_eps).astype(dtype)
    g, u = jnp.split(jnp.dot(h, p["w13"]), 2, axis=1)
    x = x + jnp.dot(jax.nn.silu(g) * u, p["w2"]).astype(jnp.float32)
    x = sharding.constrain(x, ("act_batch", "act_embed"))
    new_cache.append((k_cache, v_cache))
  return x, tuple(new_cache)
