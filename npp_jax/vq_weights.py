"""Strict loading of LlamaGen's PyTorch VQ state dicts into `vq.VQModel`.

Owns the key/layout mapping between the reference's state dict and the NNX model (submodule
names mirror the reference keys, so it is a rename table plus Conv2d weight transposes
(O, I, kh, kw) -> (kh, kw, I, O)), config inference from the weights' shapes, and the strict
check that reports every missing, unexpected or mis-shaped key at once.
"""
import functools
import re
from collections.abc import Mapping
from typing import Any

from flax import nnx
from flax import traverse_util
import jax.numpy as jnp
import numpy as np

from npp_jax.state_dict import normalize_state_dict
from npp_jax.vq import HIGHEST, VQConfig, VQModel

# Buffers of the reference that carry no model state for inference.
_DROPPED_KEYS = ("quantize.codebook_used",)


def _torch_key_and_shape(path, shape):
  """Flax state path + shape -> (reference key, reference shape)."""
  *mods, leaf = (str(p) for p in path)
  prefix = ".".join(mods)
  if leaf == "kernel":  # Conv (kh, kw, I, O) -> (O, I, kh, kw).
    return f"{prefix}.weight", (shape[3], shape[2], shape[0], shape[1])
  if leaf in ("scale", "embedding"):
    return f"{prefix}.weight", tuple(shape)
  return f"{prefix}.{leaf}", tuple(shape)


def _to_flax_layout(leaf, arr):
  return np.transpose(arr, (2, 3, 1, 0)) if leaf == "kernel" else arr


@functools.lru_cache(maxsize=8)
def _abstract(config: VQConfig, precision=HIGHEST):
  """(graphdef, ((state path, ShapeDtypeStruct), ...)) of VQModel(config); cached because
  nnx.eval_shape of the full model takes seconds."""
  model = nnx.eval_shape(lambda: VQModel(config, rngs=nnx.Rngs(0), precision=precision))
  graphdef, state = nnx.split(model)
  return graphdef, tuple(traverse_util.flatten_dict(nnx.to_pure_dict(state)).items())


def abstract_model(config: VQConfig, precision=HIGHEST) -> VQModel:
  """A VQModel whose parameters are ShapeDtypeStructs (for nnx.eval_shape, sharding plans)."""
  graphdef, flat = _abstract(config, precision)
  return nnx.merge(graphdef, traverse_util.unflatten_dict(dict(flat)))


def expected_state_dict_shapes(config: VQConfig) -> dict[str, tuple[int, ...]]:
  """The reference's parameter keys and shapes (PyTorch layout) for `config`, buffers excluded."""
  return dict(_torch_key_and_shape(p, v.shape) for p, v in _abstract(config, HIGHEST)[1])


def canonical_state_dict(ckpt: Mapping[str, Any]) -> dict[str, Any]:
  """Unwraps checkpoint layouts, strips `module.`/`_orig_mod.` prefixes (`state_dict`'s rules),
  and drops training buffers."""
  if not isinstance(ckpt, Mapping):
    raise ValueError(f"expected a state dict mapping, got {type(ckpt).__name__}")
  sd = normalize_state_dict(ckpt)
  return {k: v for k, v in sd.items() if k not in _DROPPED_KEYS}


def _shape_of(sd, key):
  if key not in sd:
    raise ValueError(f"cannot infer the VQ config: state dict has no key {key!r}")
  return tuple(np.shape(sd[key]))


def vq_config_from_state_dict(ckpt: Mapping[str, Any], codebook_l2_norm: bool = True) -> VQConfig:
  """Infers a VQConfig from the shapes of a reference state dict (arrays or anything with .shape).

  ch, ch_mult, num_res_blocks, z_channels and codebook size/dim come from the encoder and
  codebook shapes; `codebook_l2_norm` cannot be seen in the weights, so it is an argument.
  """
  sd = canonical_state_dict(ckpt)
  ch = _shape_of(sd, "encoder.conv_in.weight")[0]
  z_channels = _shape_of(sd, "encoder.conv_out.weight")[0]
  k, d = _shape_of(sd, "quantize.embedding.weight")
  levels = {int(m.group(1)) for key in sd
            if (m := re.match(r"encoder\.conv_blocks\.(\d+)\.", key))}
  if not levels or levels != set(range(len(levels))):
    raise ValueError(f"cannot infer the VQ config: encoder.conv_blocks levels {sorted(levels)} "
                     "are not 0..n-1")
  res = {int(m.group(1)) for key in sd
         if (m := re.match(r"encoder\.conv_blocks\.0\.res\.(\d+)\.", key))}
  ch_mult = []
  for i in range(len(levels)):
    cout = _shape_of(sd, f"encoder.conv_blocks.{i}.res.0.conv1.weight")[0]
    if cout % ch:
      raise ValueError(f"cannot infer the VQ config: encoder.conv_blocks.{i} width {cout} is "
                       f"not a multiple of ch={ch}")
    ch_mult.append(cout // ch)
  return VQConfig(ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=len(res), z_channels=z_channels,
                  codebook_size=k, codebook_embed_dim=d, codebook_l2_norm=codebook_l2_norm)


def load_vq_state_dict(ckpt: Mapping[str, Any], config: VQConfig | None = None, *,
                       precision=HIGHEST) -> VQModel:
  """Builds a VQModel from a reference (PyTorch-layout) state dict of numpy arrays, strictly.

  Accepts `{"model": sd}` or a raw sd, with or without `module.`/`_orig_mod.` prefixes; drops
  only `quantize.codebook_used`. The config is inferred from shapes unless given. Missing keys,
  unexpected keys and shape mismatches are all reported together in one ValueError.
  """
  sd = canonical_state_dict(ckpt)
  if config is None:
    config = vq_config_from_state_dict(sd)
  graphdef, flat = _abstract(config, precision)
  keys = {path: _torch_key_and_shape(path, v.shape) for path, v in flat}
  expected = dict(keys.values())
  missing = sorted(k for k in expected if k not in sd)
  unexpected = sorted(k for k in sd if k not in expected)
  mismatched = sorted(f"{k}: got {tuple(np.shape(sd[k]))}, expected {s}"
                      for k, s in expected.items() if k in sd and tuple(np.shape(sd[k])) != s)
  if missing or unexpected or mismatched:
    lines = [f"VQ state dict does not match {config}:"]
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("shape mismatches", mismatched)):
      if items:
        lines.append(f"  {len(items)} {title}:")
        lines.extend(f"    {item}" for item in items)
    raise ValueError("\n".join(lines))
  values = {path: jnp.asarray(_to_flax_layout(path[-1], np.asarray(sd[key], np.float32)))
            for path, (key, _) in keys.items()}
  return nnx.merge(graphdef, traverse_util.unflatten_dict(values))
