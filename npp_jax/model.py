"""LlamaGen's class-conditional Llama transformer in Flax NNX, trained with next patch prediction.

Owns: the model configuration, LlamaGen's named sizes (`VARIANTS`), parameter counting, and the
transformer itself (RMSNorm, 2D-RoPE attention with optional GQA, SwiGLU FFN, class embedding with
the null class for classifier-free guidance). `block` is the transformer block, defined once: the
training scan runs it with causal attention over the sequence, KV-cache decoding
(`npp_jax/decode.py`) with attention over its cache, so a change to the block is made here only.

Layout choices (all invisible to the math, documented for the converter):
  * Layers are stacked: every per-layer parameter carries a leading `n_layer` axis and the forward
    pass is one `jax.lax.scan` (compile time flat in depth) with a configurable remat policy.
  * Attention uses separate q, k and v projections, kernels (D, heads, head_dim); the converter
    splits LlamaGen's fused `wqkv` rows [q | k | v]. Separate kernels shard cleanly over heads.
  * Params are float32; matmuls run in `config.dtype`; the residual stream, norms, softmax,
    logits and loss are float32.

Shape legend: B batch, N tokens, P patches (= sequence length L), D width, H heads,
J kv heads, E head_dim, F FFN hidden, V vocabulary, C classes (+1 null).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from npp_jax import kernels, patching

# LlamaGen's GPT sizes: name -> (n_layer, n_head, dim).
VARIANTS: dict[str, tuple[int, int, int]] = {
    "B": (12, 12, 768),
    "L": (24, 16, 1024),
    "XL": (36, 20, 1280),
    "XXL": (48, 24, 1536),
    "XXXL": (48, 40, 2560),
    "1B": (22, 32, 2048),
    "3B": (24, 32, 3200),
    "7B": (32, 32, 4096),
}

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def find_multiple(n: int, k: int) -> int:
  return n if n % k == 0 else n + k - (n % k)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture and numerics of the transformer."""
  dim: int
  n_layer: int
  n_head: int
  n_kv_head: int | None = None  # None: = n_head (LlamaGen); fewer: grouped-query attention.
  vocab_size: int = 16384
  num_classes: int = 1000  # the class table has num_classes + 1 rows; the last is the null class.
  grid_size: int = 16  # side of the square token grid (16 for ImageNet-256 with VQ-16).
  multiple_of: int = 256
  ffn_dim_multiplier: float | None = None
  norm_eps: float = 1e-5
  rope_base: float = 10000.0
  rope_placement: str = "coarse"  # see patching.rope_table.
  token_dropout: float = 0.1
  resid_dropout: float = 0.1
  ffn_dropout: float = 0.1
  class_dropout: float = 0.1  # training-time label -> null class, for CFG.
  dtype: str = "float32"  # compute dtype of the matmuls: float32 | bfloat16.
  remat: str = "none"  # none | full | dots | dots_no_batch.
  # Layer-scan unroll: 1 = a rolled loop, k = k layers per iteration, 0 = auto (kernels.scan_unroll).
  scan_unroll: int = 0
  # Kernel set: auto (by the devices a program is compiled for) | cpu | xla; see npp_jax/kernels.py.
  kernels: str = "auto"

  @property
  def head_dim(self) -> int:
    return self.dim // self.n_head

  @property
  def kv_heads(self) -> int:
    return self.n_kv_head or self.n_head

  @property
  def ffn_dim(self) -> int:
    hidden = int(2 * (4 * self.dim) / 3)
    if self.ffn_dim_multiplier is not None:
      hidden = int(self.ffn_dim_multiplier * hidden)
    return find_multiple(hidden, self.multiple_of)

  @property
  def num_tokens(self) -> int:
    return self.grid_size * self.grid_size

  def validate(self) -> None:
    """Raises a ValueError naming the offending field."""
    for name in ("dim", "n_head", "multiple_of"):
      if getattr(self, name) < 1:
        raise ValueError(f"model.{name}={getattr(self, name)} must be >= 1.")
    if self.n_kv_head is not None and not 1 <= self.n_kv_head <= self.n_head:
      raise ValueError(f"model.n_kv_head={self.n_kv_head} must be None or in [1, model.n_head].")
    if self.dim % self.n_head:
      raise ValueError(f"model.dim={self.dim} is not divisible by model.n_head={self.n_head}.")
    if self.head_dim % 2:
      raise ValueError(f"model head_dim={self.head_dim} must be even for RoPE.")
    if self.n_head % self.kv_heads:
      raise ValueError(f"model.n_head={self.n_head} is not a multiple of model.n_kv_head={self.n_kv_head}.")
    for name in ("token_dropout", "resid_dropout", "ffn_dropout", "class_dropout"):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise ValueError(f"model.{name}={getattr(self, name)} must lie in [0, 1).")
    if self.dtype not in DTYPES:
      raise ValueError(f"model.dtype={self.dtype!r} must be one of {sorted(DTYPES)}.")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"model.remat={self.remat!r} must be one of {REMAT_POLICIES}.")
    if self.rope_placement not in patching.ROPE_PLACEMENTS:
      raise ValueError(f"model.rope_placement={self.rope_placement!r} must be one of "
                       f"{patching.ROPE_PLACEMENTS}.")
    if self.kernels not in kernels.KERNELS:
      raise ValueError(f"model.kernels={self.kernels!r} must be one of {kernels.KERNELS}.")
    if self.scan_unroll < 0:
      raise ValueError(f"model.scan_unroll={self.scan_unroll} must be >= 0 (0 = auto).")
    for name in ("vocab_size", "num_classes", "grid_size", "n_layer"):
      if getattr(self, name) < 1:
        raise ValueError(f"model.{name}={getattr(self, name)} must be >= 1.")


def config_for(variant: str, **overrides: Any) -> ModelConfig:
  """ModelConfig of a named LlamaGen size, with field overrides."""
  if variant not in VARIANTS:
    raise ValueError(f"model.variant={variant!r} is unknown; choose one of {list(VARIANTS)}.")
  n_layer, n_head, dim = VARIANTS[variant]
  return ModelConfig(dim=dim, n_layer=n_layer, n_head=n_head, **overrides)


def num_params(variant: str | ModelConfig, vocab_size: int = 16384, num_classes: int = 1000) -> int:
  """Number of parameters, counted from the abstract model (nothing is allocated)."""
  cfg = variant if isinstance(variant, ModelConfig) else config_for(
      variant, vocab_size=vocab_size, num_classes=num_classes)
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


# ---------------------------------------------------------------------------------------------
# Parameters: created without eager sharding; `sharding.create_sharded` places them on the mesh
# from their logical axis names.
# ---------------------------------------------------------------------------------------------
_normal = jax.nn.initializers.normal(0.02)


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], init=_normal) -> nnx.Param:
  return nnx.Param(init(rngs.params(), shape, jnp.float32), out_sharding=axes, eager_sharding=False)


def _ones(shape: tuple[int, ...], axes: tuple[str, ...]) -> nnx.Param:
  return nnx.Param(jnp.ones(shape, jnp.float32), out_sharding=axes, eager_sharding=False)


def _constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
  """Logical sharding constraint; a no-op without a mesh (single-device use)."""
  from npp_jax import sharding  # local: sharding imports nothing from model.
  return sharding.constrain(x, axes)


class Embed(nnx.Module):
  def __init__(self, num: int, dim: int, axes: tuple[str, str], *, rngs: nnx.Rngs):
    self.embedding = _param(rngs, (num, dim), axes)

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], ids, axis=0)


class RMSNorm(nnx.Module):
  """x / sqrt(mean(x^2) + eps) * scale; statistics in float32, as LlamaGen's RMSNorm."""

  def __init__(self, shape: tuple[int, ...], axes: tuple[str, ...], eps: float):
    self.scale = _ones(shape, axes)
    self.eps = eps


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return y.astype(x.dtype) * scale


class Attention(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    nl, d, h, j, e = cfg.n_layer, cfg.dim, cfg.n_head, cfg.kv_heads, cfg.head_dim
    self.wq = _param(rngs, (nl, d, h, e), ("layers", "embed", "heads", "head_dim"))
    self.wk = _param(rngs, (nl, d, j, e), ("layers", "embed", "kv_heads", "head_dim"))
    self.wv = _param(rngs, (nl, d, j, e), ("layers", "embed", "kv_heads", "head_dim"))
    self.wo = _param(rngs, (nl, h, e, d), ("layers", "heads", "head_dim", "embed"))


class FeedForward(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    nl, d, f = cfg.n_layer, cfg.dim, cfg.ffn_dim
    self.w1 = _param(rngs, (nl, d, f), ("layers", "embed", "mlp"))
    self.w3 = _param(rngs, (nl, d, f), ("layers", "embed", "mlp"))
    self.w2 = _param(rngs, (nl, f, d), ("layers", "mlp", "embed"))


class Layers(nnx.Module):
  """All transformer blocks, each parameter stacked over a leading layer axis."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.attention = Attention(cfg, rngs=rngs)
    self.feed_forward = FeedForward(cfg, rngs=rngs)
    self.attention_norm = RMSNorm((cfg.n_layer, cfg.dim), ("layers", "norm"), cfg.norm_eps)
    self.ffn_norm = RMSNorm((cfg.n_layer, cfg.dim), ("layers", "norm"), cfg.norm_eps)


def _dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
  if rng is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def _remat_policy(name: str):
  return {
      "full": None,
      "dots": jax.checkpoint_policies.checkpoint_dots,
      "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
  }[name]


def block(cfg: ModelConfig, kern: str, p: dict, x_BxLxD: jax.Array, rope_table: jax.Array,
          attend, rngs: tuple[jax.Array | None, jax.Array | None] = (None, None)):
  """The transformer block: the one definition, used by the training scan and by KV-cache decoding.

  Pre-norm attention with RoPE on q and k, then a pre-norm SwiGLU FFN, each added to the float32
  residual stream (with dropout when `rngs` are given). The two phases differ only in `attend`:

    attend(q_BxLxHxE, k_BxLxJxE, v_BxLxJxE) -> (attn_BxLxHxE, aux)

  training passes causal attention over the L positions themselves (aux None); decoding
  (`npp_jax/decode.py`) writes k and v into its cache and attends over the cache (aux = the
  layer's updated cache). `p` holds one layer's weights in the model's layouts (the decoder slices
  and casts them once, outside its loop); `rope_table` is L x K x 2 (shared by every row) or
  B x L x K x 2 (a position per row). Returns (x_BxLxD, aux).
  """
  dtype = DTYPES[cfg.dtype]
  h = rms_norm(x_BxLxD, p["attention_norm"], cfg.norm_eps).astype(dtype)
  q = patching.apply_rope(kernels.dense(h, p["wq"].astype(dtype), 1, kern), rope_table)
  k = patching.apply_rope(kernels.dense(h, p["wk"].astype(dtype), 1, kern), rope_table)
  v = kernels.dense(h, p["wv"].astype(dtype), 1, kern)
  attn, aux = attend(q, k, v)
  o = kernels.dense(attn.astype(dtype), p["wo"].astype(dtype), 2, kern)
  x = x_BxLxD + _dropout(o, cfg.resid_dropout, rngs[0]).astype(jnp.float32)
  x = _constrain(x, ("act_batch", "act_seq", "act_embed"))
  h = rms_norm(x, p["ffn_norm"], cfg.norm_eps).astype(dtype)
  g = kernels.dense(h, p["w1"].astype(dtype), 1, kern)
  u = kernels.dense(h, p["w3"].astype(dtype), 1, kern)
  a = _constrain(jax.nn.silu(g) * u, ("act_batch", "act_seq", "act_mlp"))
  y = kernels.dense(a, p["w2"].astype(dtype), 1, kern)
  x = x + _dropout(y, cfg.ffn_dropout, rngs[1]).astype(jnp.float32)
  return _constrain(x, ("act_batch", "act_seq", "act_embed")), aux


def _train_block(cfg: ModelConfig, kern: str, table_LxKx2: jax.Array, x_BxLxD: jax.Array, p: dict,
                 rng: jax.Array | None) -> jax.Array:
  """`block` on the full sequence with causal attention: the layer scan's body."""
  causal = lambda q, k, v: (kernels.causal_attention(q, k, v, kern), None)
  rngs = (None, None) if rng is None else tuple(jax.random.split(rng))
  return block(cfg, kern, p, x_BxLxD, table_LxKx2, causal, rngs)[0]


def layer_params(layers: Layers) -> dict[str, jax.Array]:
  """The stacked per-layer arrays under flat names, as the scan body consumes them."""
  a, f = layers.attention, layers.feed_forward
  return {"wq": a.wq[...], "wk": a.wk[...], "wv": a.wv[...], "wo": a.wo[...],
          "w1": f.w1[...], "w2": f.w2[...], "w3": f.w3[...],
          "attention_norm": layers.attention_norm.scale[...], "ffn_norm": layers.ffn_norm.scale[...]}


class Transformer(nnx.Module):
  """LlamaGen's c2i GPT. Submodule names mirror the reference's state-dict keys."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    cfg.validate()
    self.cfg = cfg
    self.tok_embeddings = Embed(cfg.vocab_size, cfg.dim, ("table", "embed"), rngs=rngs)
    self.cls_embedding = Embed(cfg.num_classes + 1, cfg.dim, ("table", "embed"), rngs=rngs)
    self.layers = Layers(cfg, rngs=rngs)
    self.norm = RMSNorm((cfg.dim,), ("norm",), cfg.norm_eps)
    self.output = _param(rngs, (cfg.dim, cfg.vocab_size), ("embed", "vocab"),
                         init=jax.nn.initializers.zeros)

  def rope(self, patch_size: int) -> np.ndarray:
    cfg = self.cfg
    return patching.rope_table(cfg.head_dim, cfg.grid_size, patch_size=patch_size,
                               base=cfg.rope_base, placement=cfg.rope_placement)

  def normed(self, x_BxLxD: jax.Array) -> jax.Array:
    """The final RMSNorm, in the compute dtype: the output layer's input."""
    return rms_norm(x_BxLxD, self.norm.scale[...], self.cfg.norm_eps).astype(DTYPES[self.cfg.dtype])

  def logits(self, x_BxLxD: jax.Array) -> jax.Array:
    """Final norm and output projection of the residual stream; float32 logits_BxLxV."""
    h = self.normed(x_BxLxD)
    return jnp.einsum("bld,dv->blv", h, self.output[...].astype(h.dtype),
                      preferred_element_type=jnp.float32)

  def class_embedding(self, labels_B: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """Class embeddings; in training (rng given) labels drop to the null class w.p. class_dropout."""
    if rng is not None and self.cfg.class_dropout > 0:
      drop = jax.random.uniform(rng, labels_B.shape) < self.cfg.class_dropout
      labels_B = jnp.where(drop, self.cfg.num_classes, labels_B)
    return self.cls_embedding(labels_B).astype(jnp.float32)

  def __call__(self, codes_BxN: jax.Array, labels_B: jax.Array, *, patch_size: int = 1,
               deterministic: bool = True, rng: jax.Array | None = None) -> jax.Array:
    """Next-patch logits.

    Args:
      codes_BxN: all N = G*G tokens of each image, row-major.
      labels_B: class ids in [0, num_classes]; num_classes is the null class.
      patch_size: patch side p (static); 1 is plain next-token prediction.
      deterministic: no dropout (and no class dropout) when True.
      rng: dropout key, required when deterministic is False.

    Returns:
      float32 logits_BxPxV, P = N / p^2: position i predicts the p*p tokens of patch i. The
      input sequence is [class] + patch_embeddings[:-1].
    """
    return self.logits(self.hidden(codes_BxN, labels_B, patch_size=patch_size,
                                   deterministic=deterministic, rng=rng))

  def hidden(self, codes_BxN: jax.Array, labels_B: jax.Array, *, patch_size: int = 1,
             deterministic: bool = True, rng: jax.Array | None = None) -> jax.Array:
    """The residual stream after the last block, float32 x_BxPxD (arguments as __call__)."""
    cfg = self.cfg
    if not deterministic and rng is None:
      raise ValueError("Transformer: rng is required when deterministic=False.")
    rng = None if deterministic else rng
    k_cls, k_tok, k_layers = (None, None, None) if rng is None else jax.random.split(rng, 3)
    emb = self.tok_embeddings(codes_BxN).astype(jnp.float32)
    emb = patching.average_patches(emb, patch_size)
    x = jnp.concatenate([self.class_embedding(labels_B, k_cls)[:, None], emb[:, :-1]], axis=1)
    x = _dropout(x, cfg.token_dropout, k_tok)
    x = _constrain(x, ("act_batch", "act_seq", "act_embed"))
    table = jnp.asarray(self.rope(patch_size)[: x.shape[1]])
    kern = kernels.resolve(cfg.kernels)  # from the devices this program is compiled for.
    body = lambda carry, xs: (_train_block(cfg, kern, table, carry, *xs), None)
    if cfg.remat != "none":
      body = jax.checkpoint(body, policy=_remat_policy(cfg.remat), prevent_cse=False)
    keys = None if k_layers is None else jax.random.split(k_layers, cfg.n_layer)
    x, _ = jax.lax.scan(body, x, (layer_params(self.layers), keys),
                        unroll=kernels.scan_unroll(cfg.scan_unroll, cfg.n_layer, kern))
    return x
