"""Speculative Jacobi decoding (SJD; Teng et al., ICLR 2025, arXiv 2410.01699): several tokens
per forward pass, samples exactly from the model's distribution.

Owns `generate`, the compiled SJD loop that `sample.generate(..., method="sjd", window=k)` and
`sample.make_sampler(..., method="sjd", window=k)` run. It draws through `npp_jax/token_choice.py`
and feeds the KV cache through `decode.cached_step`, like token-by-token decoding.

Each row holds its final tokens 0..n-1 and k drafts for tokens n..n+k-1, each with the
distribution q it was drawn from. One iteration (one forward pass):
  1. Feed positions n..n+k (inputs: token n-1, or the class at n = 0, then the k drafts) through
     the cache: p_n..p_{n+k}, the filtered, temperature-scaled, CFG-combined distributions the
     token-by-token sampler draws from, each given the window's tokens before it.
  2. Verify the drafts in order (speculative sampling): draft i is accepted with probability
     min(1, p_i(x_i) / q_i(x_i)); at the first rejection the token is drawn from
     norm(max(0, p_i - q_i)) instead; when all k pass, token n+k is drawn from p_{n+k}. 1 to
     k+1 tokens become final. Every verified p_i is exact: its context is the accepted tokens.
  3. Jacobi update: the drafts after the new end are redrawn from this pass's p_j (computed
     with the old, partly rejected context), which becomes their q; positions that no pass has
     reached yet are drawn uniformly (q = 1/V).
Why the output is exact: a draft is drawn from its q with fresh randomness, and nothing that
decides the tokens before it reads it (attention is causal), so given the accepted prefix it is
a draw from q, independent of the acceptance draws; speculative sampling then yields a draw from
p whatever q is. q must be the distribution the draft was actually drawn from (stale context
included), never one recomputed with the new context.

The cache is rolled back for free: position j's input is token j-1, so after an iteration the
entries of positions < n' (the new final count) all come from final tokens, the first stale one
is position n', and the next iteration starts writing there. A query never reads a cache entry
beyond its own position (`decode.cached_step`).

Randomness: each draw is keyed by (global sample index, token index, the row's final count n
when the draw is made, purpose). n grows every iteration, so no key repeats, and nothing
depends on the batch row, the batch size or the loop's iteration count: samples are the same
on any number of devices and in any batch split, like token-by-token decoding (but not the
same samples as it: the two methods use their randomness differently).

The loop runs until every row has its N tokens; finished rows are carried unchanged.

Shape legend: B images, R = 2B (CFG) or B rows, N tokens per image, K = window drafts, W = K + 1
window positions, M = N + 2W token buffer, D width, V vocabulary.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from npp_jax import decode
from npp_jax import model as model_lib
from npp_jax.token_choice import SamplingOptions, categorical, filtered_logits, guide, rows

_DRAFT, _ACCEPT, _RESIDUAL = 0, 1, 2  # what a key draws (the last fold_in).


def _keys(row_keys_B: jax.Array, t_BxW: jax.Array, n_B: jax.Array, purpose: int) -> jax.Array:
  """keys_BxW of (row, token index t, final count n, purpose)."""
  def one(row_key, t, n):
    return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(row_key, t), n), purpose)
  return jax.vmap(jax.vmap(one, (None, 0, None)), (0, 0, 0))(row_keys_B, t_BxW, n_B)


def _put(x_BxM___: jax.Array, block_BxW___: jax.Array, start_B: jax.Array) -> jax.Array:
  """Row b of `block` written into row b of `x` at position start_B[b] (axis 1)."""
  def one(x, block, start):
    return jax.lax.dynamic_update_slice_in_dim(x, block, start, axis=0)
  return jax.vmap(one)(x_BxM___, block_BxW___, start_B)


def _uniform_drafts(keys_BxK: jax.Array, v: int) -> jax.Array:
  return jax.vmap(jax.vmap(lambda key: jax.random.randint(key, (), 0, v)))(keys_BxK)


def generate(model: model_lib.Transformer, labels_B: jax.Array, rng: jax.Array,
             sample_offset: jax.Array, opts: SamplingOptions, return_logits: bool):
  """SJD samples (traced inside the sampler's jit).

  Returns:
    codes_BxN int32; logits_BxNxV (float32 CFG-combined raw logits of the pass that made each
    token final) or None; forwards_B int32, the forward passes row b took to finish.
  """
  cfg = model.cfg
  b, n, v, k = labels_B.shape[0], cfg.num_tokens, cfg.vocab_size, opts.window
  w, m = k + 1, cfg.num_tokens + 2 * (k + 1)
  dtype = model_lib.DTYPES[cfg.dtype]
  labels_R = rows(labels_B, opts, cfg.num_classes)
  layers = decode.decode_weights(model)  # sliced, cast and laid out once, outside the loop.
  table = jnp.asarray(model.rope(1))
  cls_RxD = model.class_embedding(labels_R)
  scale_D = model.norm.scale[...]
  out_DxV = model.output[...].astype(dtype)
  idx_B = jnp.asarray(sample_offset, jnp.int32) + jnp.arange(b, dtype=jnp.int32)
  row_keys_B = jax.vmap(jax.random.fold_in, (None, 0))(rng, idx_B)
  slots_W, drafts_K = jnp.arange(w), jnp.arange(k)

  def forward(n_B, codes_BxM, cache):
    """Positions n..n+k of every row: filtered logits f_BxWxV, raw logits_BxWxV, cache."""
    t_BxW = n_B[:, None] + slots_W  # the token each window position predicts (= its position)
    prev_BxW = jnp.take_along_axis(codes_BxM, jnp.maximum(t_BxW - 1, 0), axis=1)
    t_RxW = rows(t_BxW, opts)
    x_RxWxD = model.tok_embeddings(rows(prev_BxW, opts)).astype(jnp.float32)
    x_RxWxD = jnp.where((t_RxW == 0)[..., None], cls_RxD[:, None], x_RxWxD)
    rope_TxKx2 = table[jnp.minimum(t_RxW, table.shape[0] - 1).reshape(-1)]
    x_RxWxD, cache = decode.cached_step(cfg, layers, rope_TxKx2, x_RxWxD, rows(n_B, opts), cache)
    h_BxWxD = guide(model_lib.rms_norm(x_RxWxD, scale_D, cfg.norm_eps), t_BxW[..., None], opts)
    logits_BxWxV = jnp.einsum("bwd,dv->bwv", h_BxWxD.astype(dtype), out_DxV,
                              preferred_element_type=jnp.float32)
    f_BxWxV = filtered_logits(logits_BxWxV.reshape(b * w, v), opts).reshape(b, w, v)
    return f_BxWxV, logits_BxWxV, cache

  def body(state):
    n_B, codes_BxM, q_BxKxV, cache, forwards_B, logits_buf = state
    f_BxWxV, logits_BxWxV, cache = forward(n_B, codes_BxM, cache)
    p_BxWxV = jax.nn.softmax(f_BxWxV, axis=-1)
    # Verify: accept draft i with probability min(1, p_i(x_i) / q_i(x_i)), in order.
    t_BxK = n_B[:, None] + drafts_K
    x_BxK = jnp.take_along_axis(codes_BxM, t_BxK, axis=1)
    p_x_BxK = jnp.take_along_axis(p_BxWxV[:, :k], x_BxK[..., None], axis=-1)[..., 0]
    q_x_BxK = jnp.take_along_axis(q_BxKxV, x_BxK[..., None], axis=-1)[..., 0]
    u_BxK = jax.vmap(jax.vmap(jax.random.uniform))(_keys(row_keys_B, t_BxK, n_B, _ACCEPT))
    ok_BxW = jnp.concatenate([u_BxK * q_x_BxK < p_x_BxK, jnp.zeros((b, 1), bool)], axis=1)
    a_B = jnp.argmin(ok_BxW, axis=1)  # drafts accepted: slot of the first failure (slot k fails)
    # The token at slot a: from the residual norm(max(0, p - q)); slot k has no draft (q = 0).
    p_a_BxV = jnp.take_along_axis(p_BxWxV, a_B[:, None, None], axis=1)[:, 0]
    q_a_BxV = jnp.take_along_axis(q_BxKxV, jnp.minimum(a_B, k - 1)[:, None, None], axis=1)[:, 0]
    res_BxV = jnp.maximum(p_a_BxV - jnp.where((a_B < k)[:, None], q_a_BxV, 0.0), 0.0)
    res_BxV = jnp.where(res_BxV.sum(-1, keepdims=True) > 0, res_BxV, p_a_BxV)  # p == q: rounding
    res_keys_B = _keys(row_keys_B, (n_B + a_B)[:, None], n_B, _RESIDUAL)[:, 0]
    tok_B = categorical(res_keys_B, jnp.log(res_BxV))
    new_n_B = n_B + a_B + 1
    # Jacobi update: the drafts of tokens new_n..new_n+k-1 from this pass's p where it reached
    # them (slot a+1+j predicted token new_n+j), else uniform.
    src_BxK = a_B[:, None] + 1 + drafts_K
    from_p_BxK = src_BxK <= k
    src_f_BxKxV = jnp.take_along_axis(f_BxWxV, jnp.minimum(src_BxK, k)[..., None], axis=1)
    draft_keys_BxK = _keys(row_keys_B, new_n_B[:, None] + drafts_K, new_n_B, _DRAFT)
    drawn_BxK = categorical(draft_keys_BxK.reshape(-1), src_f_BxKxV.reshape(b * k, v))
    drafts_BxK = jnp.where(from_p_BxK, drawn_BxK.reshape(b, k), _uniform_drafts(draft_keys_BxK, v))
    new_q_BxKxV = jnp.where(from_p_BxK[..., None], jax.nn.softmax(src_f_BxKxV, axis=-1), 1.0 / v)
    # Rows that already have N tokens keep their state.
    active_B = n_B < n
    block_BxW = jnp.concatenate([tok_B[:, None], drafts_BxK], axis=1)
    codes_BxM = jnp.where(active_B[:, None], _put(codes_BxM, block_BxW, n_B + a_B), codes_BxM)
    q_BxKxV = jnp.where(active_B[:, None, None], new_q_BxKxV, q_BxKxV)
    if return_logits:  # slots after a are overwritten by the pass that makes them final.
      logits_buf = jnp.where(active_B[:, None, None], _put(logits_buf, logits_BxWxV, n_B),
                             logits_buf)
    n_B = jnp.where(active_B, jnp.minimum(new_n_B, n), n_B)
    return n_B, codes_BxM, q_BxKxV, cache, forwards_B + active_B, logits_buf

  zeros_B = jnp.zeros((b,), jnp.int32)
  first_BxK = _uniform_drafts(_keys(row_keys_B, jnp.broadcast_to(drafts_K, (b, k)), zeros_B,
                                    _DRAFT), v)
  codes_BxM = jnp.zeros((b, m), jnp.int32).at[:, :k].set(first_BxK)
  q_BxKxV = jnp.full((b, k, v), 1.0 / v, jnp.float32)
  cache = decode.grow_cache(decode.empty_cache(cfg, labels_R.shape[0]),
                            model_lib.find_multiple(n + w, 8))
  logits_buf = jnp.zeros((b, m, v), jnp.float32) if return_logits else None
  state = (zeros_B, codes_BxM, q_BxKxV, cache, zeros_B, logits_buf)
  state = jax.lax.while_loop(lambda s: jnp.any(s[0] < n), body, state)
  _, codes_BxM, _, _, forwards_B, logits_buf = state
  return codes_BxM[:, :n], None if logits_buf is None else logits_buf[:, :n], forwards_B
