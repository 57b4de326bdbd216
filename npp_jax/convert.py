"""LlamaGen / NPP PyTorch weights -> npp_jax models, strictly.

Owns: the rename table from the reference's key names to our parameters, the GPT's config
from the shapes, reading weight files, and the converter CLI. Unwrapping a checkpoint's layout
and the strict coverage check (every missing, unexpected or mis-shaped key in one error) are
`npp_jax.state_dict`'s; loading a model by any name (hub, converted dir, workdir) is
`npp_jax.load`'s.

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

The VQ tokenizer's rename table and checks live in `npp_jax.vq_weights` (`load_vq_state_dict`;
it drops `quantize.codebook_used`); `load_vq` here only reads and unwraps the file.

Files: `read_checkpoint` reads `.pt`/`.pth`/`.bin`/`.ckpt` (torch.save zip archives, through the
restricted reader of `npp_jax.torch_pickle`: no PyTorch needed, nothing in the file is run),
`.npz` (no pickles) and `.safetensors`, local or on the Hugging Face Hub (`hf://OWNER/REPO/FILE`
or a released model's name such as `npp-b`, downloaded by `npp_jax.hub`).

Command line, writing a params-only orbax checkpoint (`checkpoint.save_params`: DST/params plus
DST/model_config.json holding the ModelConfig or VQConfig fields) that `config.ckpt.init_from`,
`config.sample.vq_checkpoint`, `load_converted_gpt` and `load_converted_vq` read:
  python -m npp_jax.convert --kind gpt --src c2i_B_256.pt --dst /ckpt/npp_b [--variant B]
  python -m npp_jax.convert --kind vq --src vq_ds16_c2i.pt --dst /ckpt/vq16
  python -m npp_jax.convert --kind gpt --src npp-b --dst gs://BUCKET/npp_b  # from the hub
Before reading SRC it refuses a DST that is a file or lies under one, and a DST holding a
conversion of the other kind; rerunning a conversion into its own DST overwrites it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import zipfile
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from npp_jax import checkpoint
from npp_jax import model as model_lib
from npp_jax import hub, torch_pickle
from npp_jax import vq, vq_weights
from npp_jax.state_dict import ConversionError, check_coverage, normalize_state_dict

_IGNORED_GPT = re.compile(r"(^|\.)freqs_cis$|\.kv_cache\.")
_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
PathLike = str | os.PathLike


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
  if not isinstance(n_head, (int, np.integer)) or n_head < 1 or dim % n_head:
    raise ConversionError(f"n_head={n_head!r} (--n_head) must be a positive divisor of the "
                          f"checkpoint's width {dim}.")
  n_head = int(n_head)  # A plain int, so that model_config.json can hold it.
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


def load_gpt(state_dict: Mapping[str, Any] | PathLike, *, variant: str | None = None,
             n_head: int | None = None, use_ema: bool = False,
             **overrides: Any) -> model_lib.Transformer:
  """A ready Transformer holding the weights of a LlamaGen/NPP GPT state dict.

  Args:
    state_dict: a mapping from the reference's key names to arrays, or any checkpoint layout that
      holds one (see `normalize_state_dict`), or the path of a file `read_checkpoint` reads
      (also `hf://...` or a released model's name, e.g. "npp-b").
    variant: a named size (B, L, ...) giving the head count; checked against the shapes. A
      released model's name brings its own.
    n_head: the head count, when no variant matches.
    use_ema: take the `ema` entry of a training checkpoint.
    **overrides: other ModelConfig fields (e.g. dtype, grid_size, dropout rates).

  Raises:
    ConversionError: listing every missing, unexpected or mis-shaped key.
  """
  if isinstance(state_dict, (str, os.PathLike)):
    if variant is None and n_head is None:
      variant = _released_variant(state_dict)
    state_dict = read_checkpoint(state_dict)
  sd = normalize_state_dict(state_dict, use_ema=use_ema)
  cfg = gpt_config_from_state_dict(sd, variant=variant, n_head=n_head, **overrides)
  check_coverage(sd, gpt_expected_shapes(cfg), ignore=_IGNORED_GPT, what="GPT state dict")
  # An abstract model filled with the weights: no random init to compute and throw away.
  graphdef, state = nnx.split(nnx.eval_shape(lambda: model_lib.Transformer(cfg, rngs=nnx.Rngs(0))))
  nnx.replace_by_pure_dict(state, jax_tree_asarray(gpt_params_from_state_dict(sd, cfg)))
  return nnx.merge(graphdef, state)


def _released_variant(path: PathLike) -> str | None:
  entry = hub.PRETRAINED.get(os.fspath(path))
  return entry.variant if entry is not None else None


def jax_tree_asarray(tree: Any) -> Any:
  if isinstance(tree, dict):
    return {k: jax_tree_asarray(v) for k, v in tree.items()}
  return jnp.asarray(tree)


# ---------------------------------------------------------------------------------------------
# Files.
# ---------------------------------------------------------------------------------------------
def read_checkpoint(path: PathLike) -> Mapping[str, Any]:
  """The top-level mapping of a weight file, tensors as numpy arrays (read-only, maybe mmapped).

  `.pt`/`.pth`/`.bin`/`.ckpt`: a torch.save zip archive, read without PyTorch; objects other than
  tensors and containers (e.g. the `args` Namespace) come back as inert `torch_pickle.Opaque`.
  `.npz`: arrays by name (pickled objects refused). `.safetensors`: arrays by name.
  `hf://OWNER/REPO/FILE` or a released model's name: downloaded first (`hub.download`).

  Raises:
    FileNotFoundError: no such file.
    IsADirectoryError: `path` is a directory (e.g. one written by `convert_checkpoint`, which
      `load_converted_gpt` / `load_converted_vq` read).
    ConversionError / torch_pickle.TorchFileError (both ValueError): unknown suffix, unreadable
      or damaged file, or a file whose top level is not a mapping.
  """
  path = os.fspath(path)
  if hub.is_remote(path):
    return _read_hub_file(path)
  if os.path.isdir(path):
    raise IsADirectoryError(f"{path} is a directory, not a weight file (.pt/.pth/.bin/.ckpt, .npz "
                            f"or .safetensors); a directory written by npp_jax.convert is read "
                            f"by load_converted_gpt / load_converted_vq.")
  suffix = os.path.splitext(path)[1].lower()
  if suffix in _TORCH_SUFFIXES:
    ckpt = torch_pickle.load(path)
  elif suffix == ".safetensors":
    ckpt = torch_pickle.load_safetensors(path)
  elif suffix == ".npz":
    if not os.path.isfile(path):
      raise FileNotFoundError(f"no checkpoint file at {path}")
    # np.load takes a non-zip file for a pickle and says "contains pickled (object) data".
    if not zipfile.is_zipfile(path):
      raise ConversionError(f"{path}: not a valid .npz file (not a zip archive).")
    try:
      with np.load(path, allow_pickle=False) as z:
        ckpt = {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, EOFError) as e:  # zipfile checks each member's CRC-32 here.
      raise ConversionError(f"{path}: a damaged .npz (zip) archive ({e}); re-create or "
                            f"re-download it.") from None
    except (ValueError, OSError) as e:
      raise ConversionError(f"{path}: cannot read the .npz without pickles: {e}") from None
  else:
    raise ConversionError(f"{path}: unknown checkpoint suffix {suffix!r}; expected one of "
                          f"{list(_TORCH_SUFFIXES) + ['.npz', '.safetensors']}.")
  if not isinstance(ckpt, Mapping):
    what = ckpt.qualname if isinstance(ckpt, torch_pickle.Opaque) else type(ckpt).__name__
    raise ConversionError(f"{path} holds a {what}, not a mapping of weights (a state dict or a "
                          f"training checkpoint holding one); re-save model.state_dict().")
  return ckpt


def _read_hub_file(spec: str) -> Mapping[str, Any]:
  """`read_checkpoint` of a hub file; one that cannot be read leaves the download cache."""
  local = hub.download(spec)
  try:
    return read_checkpoint(local)
  except ValueError as e:
    hub.evict(local)
    raise ConversionError(f"{hub.hub_path(spec)}: {e} (removed from the download cache {local}; "
                          f"a rerun downloads it again).") from None


def load_vq(path_or_state_dict: Mapping[str, Any] | PathLike, *,
            use_ema: bool = False) -> vq.VQModel:
  """A ready VQ tokenizer from a LlamaGen VQ checkpoint file or state dict.

  Layouts as `normalize_state_dict` (`{"model"}`, `{"module"}`, `{"state_dict"}`, `{"ema"}` with
  use_ema, raw; `module.`/`_orig_mod.` prefixes); the config (VQ-16, VQ-8, other widths) comes
  from the shapes; `vq_weights.load_vq_state_dict` checks every key strictly.

  Raises:
    ConversionError: listing every missing, unexpected or mis-shaped key, or an unreadable file.
  """
  source = "VQ state dict"
  if isinstance(path_or_state_dict, (str, os.PathLike)):
    source = os.fspath(path_or_state_dict)
    path_or_state_dict = read_checkpoint(path_or_state_dict)
  sd = normalize_state_dict(path_or_state_dict, use_ema=use_ema)
  try:
    return vq_weights.load_vq_state_dict(sd)
  except ValueError as e:
    raise ConversionError(f"{source}: {e}") from None


def _kind_of_stored_config(fields: Mapping[str, Any]) -> str | None:
  """The kind ("gpt" or "vq") of a model_config.json that `convert_checkpoint` wrote, or None."""
  if {"n_layer", "vocab_size"} <= set(fields):
    return "gpt"
  if {"codebook_size", "ch_mult"} <= set(fields):
    return "vq"
  return None


def _check_dst(kind: str, dst: PathLike) -> None:
  """Raises unless `dst` can take a `kind` conversion; run before any work is done.

  Raises:
    NotADirectoryError: `dst`, or a folder above it, is an existing file.
    ConversionError: `dst` already holds a conversion of the other kind (its model_config.json
      says so); rerunning the same kind into the same `dst` overwrites it, as before.
  """
  name = os.fspath(dst)
  if "://" in name:  # Object stores have no files-versus-folders conflict to check.
    return
  path = os.path.abspath(name)
  if os.path.exists(path) and not os.path.isdir(path):
    raise NotADirectoryError(f"--dst {name} is an existing file, not a directory: choose a "
                             f"directory path for the converted checkpoint.")
  parent = os.path.dirname(path)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise NotADirectoryError(f"--dst {name} cannot be created: {parent} is a file, not a "
                             f"directory.")
  config_file = os.path.join(path, "model_config.json")
  if os.path.isfile(config_file):
    try:
      with open(config_file) as f:
        fields = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
      return  # Not ours to judge: overwritten like any other leftover.
    stored = _kind_of_stored_config(fields) if isinstance(fields, dict) else None
    if stored is not None and stored != kind:
      what = {"gpt": "GPT", "vq": "VQ tokenizer"}
      raise ConversionError(f"--dst {name} already holds a converted {what[stored]} "
                            f"({config_file}); converting a {what[kind]} there would overwrite "
                            f"it: choose another --dst or remove it first.")


def convert_checkpoint(kind: str, src: PathLike, dst: PathLike, *, variant: str | None = None,
                       n_head: int | None = None, use_ema: bool = False,
                       **overrides: Any) -> dict[str, Any]:
  """Converts the GPT (`kind="gpt"`) or VQ (`kind="vq"`) weights of `src` into a params checkpoint.

  Writes `dst/params` (the nnx.State of `nnx.split(model)[1]`, what `checkpoint.load_params` reads
  into a model of the same config) and `dst/model_config.json` (the ModelConfig / VQConfig fields).
  `variant`, `n_head` and `overrides` (ModelConfig fields such as grid_size) are for the GPT only.

  Returns:
    A summary: dst, kind, num_params, model_config, and `ignored`, the non-weight objects of the
    file that were not constructed (e.g. `args: argparse.Namespace`).

  Raises:
    As `read_checkpoint`, `load_gpt`, `load_vq` and `_check_dst` (checked first).
  """
  if kind not in ("gpt", "vq"):
    raise ConversionError(f"kind={kind!r} must be 'gpt' or 'vq'.")
  if kind == "vq" and (variant is not None or n_head is not None or overrides):
    raise ConversionError("variant, n_head and model overrides apply to kind='gpt' only.")
  released = hub.PRETRAINED.get(os.fspath(src))
  if released is not None and released.kind != kind:
    raise ConversionError(f"--src {released.name} is a released {released.kind} model, not a "
                          f"{kind}: pass --kind {released.kind}.")
  if kind == "gpt" and variant is None and n_head is None:
    variant = _released_variant(src)
  _check_dst(kind, dst)
  ckpt = read_checkpoint(src)
  if kind == "gpt":
    model = load_gpt(ckpt, variant=variant, n_head=n_head, use_ema=use_ema, **overrides)
    config = model.cfg
  else:
    model = load_vq(ckpt, use_ema=use_ema)
    config = model.config
  fields = dataclasses.asdict(config)
  params = nnx.split(model)[1]
  checkpoint.save_params(dst, params, model_config=fields)
  return dict(dst=os.fspath(dst), kind=kind, model_config=fields,
              num_params=sum(math.prod(x.shape) for x in jax.tree.leaves(params)),
              ignored=[f"{where}: {name}" for where, name in torch_pickle.opaque_entries(ckpt)])


def _stored_config(path: PathLike, cls: type, what: str) -> dict[str, Any]:
  fields = checkpoint.read_model_config(path)
  if fields is None:
    raise FileNotFoundError(f"no model_config.json in {path}: not written by npp_jax.convert.")
  names = {f.name for f in dataclasses.fields(cls)}
  if set(fields) - names:
    raise ConversionError(f"{path} does not hold a converted {what}: model_config.json has "
                          f"fields {sorted(set(fields) - names)} that {cls.__name__} lacks.")
  return fields


def load_converted_gpt(path: PathLike, **overrides: Any) -> model_lib.Transformer:
  """The Transformer saved by `convert_checkpoint(kind="gpt")` in `path`.

  `overrides` change ModelConfig fields that are not shapes (dtype, dropout rates, remat).
  """
  cfg = model_lib.ModelConfig(**{**_stored_config(path, model_lib.ModelConfig, "GPT"), **overrides})
  abstract = nnx.eval_shape(lambda: model_lib.Transformer(cfg, rngs=nnx.Rngs(0)))
  graphdef, abstract = nnx.split(abstract)
  return nnx.merge(graphdef, checkpoint.load_params(path, abstract))


def load_converted_vq(path: PathLike) -> vq.VQModel:
  """The VQ tokenizer saved by `convert_checkpoint(kind="vq")` in `path`."""
  config = vq.VQConfig(**_stored_config(path, vq.VQConfig, "VQ tokenizer"))
  graphdef, abstract = nnx.split(vq_weights.abstract_model(config))
  return nnx.merge(graphdef, checkpoint.load_params(path, abstract))


# ---------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
  """`python -m npp_jax.convert ...`; returns the exit status (1 with the error on stderr)."""
  parser = argparse.ArgumentParser(
      prog="python -m npp_jax.convert",
      description="Convert LlamaGen/NPP PyTorch weights (GPT or VQ tokenizer) into an npp_jax "
                  "params checkpoint, strictly. PyTorch is not needed.")
  parser.add_argument("--kind", choices=("gpt", "vq"), required=True)
  parser.add_argument("--src", required=True,
                      help=".pt/.pth/.bin/.ckpt, .npz or .safetensors; hf://OWNER/REPO/FILE or a "
                           f"released model's name ({', '.join(hub.PRETRAINED)})")
  parser.add_argument("--dst", required=True, help="output directory (local or gs://)")
  parser.add_argument("--variant",
                      help=f"GPT size, checked against the shapes: {list(model_lib.VARIANTS)}")
  parser.add_argument("--n_head", type=int, help="GPT head count when no named size matches")
  parser.add_argument("--grid_size", type=int,
                      help="GPT token grid side (16 for 256 px, 24 for 384 px)")
  parser.add_argument("--use_ema", action="store_true", help="take the checkpoint's 'ema' weights")
  args = parser.parse_args(argv)
  overrides = {} if args.grid_size is None else {"grid_size": args.grid_size}
  try:
    out = convert_checkpoint(args.kind, args.src, args.dst, variant=args.variant,
                             n_head=args.n_head, use_ema=args.use_ema, **overrides)
  except (ValueError, OSError) as e:  # bad input; missing or unreadable files, failed downloads
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {out['dst']}/params ({out['num_params']:,} parameters, float32) and "
        f"{out['dst']}/model_config.json")
  print(f"{args.kind} config: {out['model_config']}")
  if out["ignored"]:
    print(f"not constructed, not weights (ignored): {', '.join(out['ignored'])}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
