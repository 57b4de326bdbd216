"""LlamaGen / NPP PyTorch weights -> npp_jax models, strictly.

Owns: normalising a reference checkpoint's state dict (layouts `{"model"}`, `{"module"}`,
`{"state_dict"}`, `{"ema"}` on request, or raw; `module.` / `_orig_mod.` prefixes), the rename
table from the reference's key names to our parameters, and strict coverage: every expected key
present with the right shape, unexpected keys reported, all problems in one error.

The GPT mapping (Linear weights are stored (out, in); our kernels are (in, out)):
  tok_embeddings.weight (V, D)                  -> tok_embeddings.embedding
  cls_embedding.embedding_table.weight (C+1, D) -> cls_embedding.embedding
  layers.{i}.attention.wqkv.weight ((H+2J)E, D) -> layers.attention.{wq, wk, wv}[i]  rows [q | k | v]
  layers.{i}.attention.wo.weight (D, HE)        -> layers.attention.wo[i]  (H, E, D)
  layers.{i}.feed_forward.w{1,2,3}.weight       -> layers.feed_forward.w{1,2,3}[i]  transposed
  layers.{i}.{attention,ffn}_norm.weight        -> layers.{attention,ffn}_norm.scale[i]
  norm.weight                                   -> norm.scale
  output.weight (V, D)                          -> output  (D, V)
Ignored: `freqs_cis` and `*.kv_cache.*` (buffers the reference leaves in some state dicts).
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from npp_jax import model as model_lib

_PREFIXES = ("module.", "_orig_mod.")
_IGNORED_GPT = re.compile(r"(^|\.)freqs_cis$|\.kv_cache\.")


class ConversionError(ValueError):
  """A state dict does not match the model: lists every missing, unexpected and mis-shaped key."""


def normalize_state_dict(ckpt: Mapping[str, Any], *, use_ema: bool = False) -> dict[str, np.ndarray]:
  """The flat {reference key: numpy array} inside any checkpoint layout the reference writes."""
  if use_ema:
    if "ema" not in ckpt:
      raise ConversionError(f"use_ema was requested but the checkpoint has no 'ema' entry "
                            f"(top-level keys: {sorted(ckpt)[:10]}).")
    ckpt = ckpt["ema"]
  else:
    for layout in ("model", "module", "state_dict"):
      if layout in ckpt and isinstance(ckpt[layout], Mapping):
        ckpt = ckpt[layout]
        break
  out = {}
  for key, value in ckpt.items():
    name = str(key)
    changed = True
    while changed:
      changed = False
      for prefix in _PREFIXES:
        if name.startswith(prefix):
          name, changed = name[len(prefix):], True
      name = name.replace("._orig_mod.", ".")
    out[name] = np.asarray(value)
  return out


def check_coverage(state_dict: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]],
                   *, ignore: re.Pattern | None = None, what: str = "checkpoint") -> None:
  """Raises one ConversionError listing all missing, unexpected and mis-shaped keys."""
  problems = []
  for key, shape in expected.items():
    if key not in state_dict:
      problems.append(f"missing key {key} (expected shape {tuple(shape)})")
    elif tuple(state_dict[key].shape) != tuple(shape):
      problems.append(f"shape mismatch for {key}: got {tuple(state_dict[key].shape)}, "
                      f"expected {tuple(shape)}")
  for key in state_dict:
    if key not in expected and not (ignore and ignore.search(key)):
      problems.append(f"unexpected key {key} (shape {tuple(state_dict[key].shape)})")
  if problems:
    raise ConversionError(f"{what} does not match the model ({len(problems)} problems):\n  "
                          + "\n  ".join(problems))


def gpt_config_from_state_dict(sd: Mapping[str, np.ndarray], *, variant: str | None = None,
                               n_head: int | None = None, **overrides: Any) -> model_lib.ModelConfig:
  """Infers the GPT's config from the shapes; the head count comes from `variant` or `n_head`."""
  for key in ("tok_embeddings.weight", "cls_embedding.embedding_table.weight",
              "layers.0.attention.wqkv.weight", "layers.0.feed_forward.w1.weight"):
    if key not in sd:
      raise ConversionError(f"not a LlamaGen GPT state dict: missing key {key}.")
  vocab, dim = sd["tok_embeddings.weight"].shape
  num_classes = sd["cls_embedding.embedding_table.weight"].shape[0] - 1
  layer_ids = {int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.", k))}
  n_layer = max(layer_ids) + 1
  ffn_dim = sd["layers.0.feed_forward.w1.weight"].shape[0]
  if variant is not None:
    if variant not in model_lib.VARIANTS:
      raise ConversionError(f"variant={variant!r} is unknown; choose one of {list(model_lib.VARIANTS)}.")
    v_layers, v_heads, v_dim = model_lib.VARIANTS[variant]
    if (v_layers, v_dim) != (n_layer, dim):
      raise ConversionError(f"variant={variant} has {v_layers} layers of width {v_dim}, but the "
                            f"checkpoint has {n_layer} layers of width {dim}.")
    n_head = v_heads if n_head is None else n_head
  if n_head is None:
    matches = [name for name, (l, _, d) in model_lib.VARIANTS.items() if (l, d) == (n_layer, dim)]
    if len(matches) != 1:
      raise ConversionError(f"cannot infer the head count of a {n_layer}-layer, width-{dim} GPT: "
                            f"pass variant= or n_head=.")
    n_head = model_lib.VARIANTS[matches[0]][1]
  head_dim = dim // n_head
  qkv_rows = sd["layers.0.attention.wqkv.weight"].shape[0]
  kv_heads = (qkv_rows - dim) // 2 // head_dim
  fields = dict(dim=dim, n_layer=n_layer, n_head=n_head,
                n_kv_head=None if kv_heads == n_head else kv_heads,
                vocab_size=vocab, num_classes=num_classes)
  fields.update(overrides)
  cfg = model_lib.ModelConfig(**fields)
  if cfg.ffn_dim != ffn_dim:
    raise ConversionError(f"FFN width {ffn_dim} of the checkpoint does not follow LlamaGen's rule "
                          f"for dim {dim} (gives {cfg.ffn_dim}).")
  return cfg


def gpt_expected_shapes(cfg: model_lib.ModelConfig) -> dict[str, tuple[int, ...]]:
  """The reference state dict's keys and shapes for `cfg`."""
  d, f, e = cfg.dim, cfg.ffn_dim, cfg.head_dim
  shapes = {"tok_embeddings.weight": (cfg.vocab_size, d),
            "cls_embedding.embedding_table.weight": (cfg.num_classes + 1, d),
            "norm.weight": (d,), "output.weight": (cfg.vocab_size, d)}
  for i in range(cfg.n_layer):
    shapes.update({
        f"layers.{i}.attention.wqkv.weight": ((cfg.n_head + 2 * cfg.kv_heads) * e, d),
        f"layers.{i}.attention.wo.weight": (d, cfg.n_head * e),
        f"layers.{i}.feed_forward.w1.weight": (f, d),
        f"layers.{i}.feed_forward.w3.weight": (f, d),
        f"layers.{i}.feed_forward.w2.weight": (d, f),
        f"layers.{i}.attention_norm.weight": (d,),
        f"layers.{i}.ffn_norm.weight": (d,),
    })
  return shapes


def gpt_params_from_state_dict(sd: Mapping[str, np.ndarray], cfg: model_lib.ModelConfig) -> dict:
  """Our parameter tree (a pure dict, as nnx.to_pure_dict) from a checked reference state dict."""
  d, h, j, e, nl = cfg.dim, cfg.n_head, cfg.kv_heads, cfg.head_dim, cfg.n_layer
  f32 = lambda a: np.asarray(a, np.float32)
  stack = lambda fmt, fn: np.stack([fn(f32(sd[fmt.format(i)])) for i in range(nl)])
  wqkv = lambda w: (w[: h * e].T.reshape(d, h, e), w[h * e:(h + j) * e].T.reshape(d, j, e),
                    w[(h + j) * e:].T.reshape(d, j, e))
  qkv = [wqkv(f32(sd[f"layers.{i}.attention.wqkv.weight"])) for i in range(nl)]
  return {
      "tok_embeddings": {"embedding": f32(sd["tok_embeddings.weight"])},
      "cls_embedding": {"embedding": f32(sd["cls_embedding.embedding_table.weight"])},
      "layers": {
          "attention": {
              "wq": np.stack([q for q, _, _ in qkv]),
              "wk": np.stack([k for _, k, _ in qkv]),
              "wv": np.stack([v for _, _, v in qkv]),
              "wo": stack("layers.{}.attention.wo.weight", lambda w: w.T.reshape(h, e, d)),
          },
          "feed_forward": {
              "w1": stack("layers.{}.feed_forward.w1.weight", lambda w: w.T),
              "w2": stack("layers.{}.feed_forward.w2.weight", lambda w: w.T),
              "w3": stack("layers.{}.feed_forward.w3.weight", lambda w: w.T),
          },
          "attention_norm": {"scale": stack("layers.{}.attention_norm.weight", lambda w: w)},
          "ffn_norm": {"scale": stack("layers.{}.ffn_norm.weight", lambda w: w)},
      },
      "norm": {"scale": f32(sd["norm.weight"])},
      "output": f32(sd["output.weight"]).T,
  }


def load_gpt(state_dict: Mapping[str, Any], *, variant: str | None = None, n_head: int | None = None,
             use_ema: bool = False, **overrides: Any) -> model_lib.Transformer:
  """A ready Transformer holding the weights of a LlamaGen/NPP GPT state dict.

  Args:
    state_dict: a mapping from the reference's key names to arrays, or any checkpoint layout that
      holds one (see `normalize_state_dict`).
    variant: a named size (B, L, ...) giving the head count; checked against the shapes.
    n_head: the head count, when no variant matches.
    use_ema: take the `ema` entry of a training checkpoint.
    **overrides: other ModelConfig fields (e.g. dtype, grid_size, dropout rates).

  Raises:
    ConversionError: listing every missing, unexpected or mis-shaped key.
  """
  sd = normalize_state_dict(state_dict, use_ema=use_ema)
  cfg = gpt_config_from_state_dict(sd, variant=variant, n_head=n_head, **overrides)
  check_coverage(sd, gpt_expected_shapes(cfg), ignore=_IGNORED_GPT, what="GPT state dict")
  model = model_lib.Transformer(cfg, rngs=nnx.Rngs(0))
  params = gpt_params_from_state_dict(sd, cfg)
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, jax_tree_asarray(params))
  nnx.update(model, state)
  return model


def jax_tree_asarray(tree: Any) -> Any:
  if isinstance(tree, dict):
    return {k: jax_tree_asarray(v) for k, v in tree.items()}
  return jnp.asarray(tree)
