"""The library's one way to load a model: a GPT or a VQ tokenizer by any name a user has for it.

Owns `load_model` (a GPT, dropout off), `load_vq` (a VQ tokenizer), `load_params` (params into a
given target: `config.ckpt.init_from`) and the cache of converted hub weights. Each takes:
  * a released model's name (`hub.PRETRAINED`: npp-b ... npp-xxl, llamagen-b/-l, vq-16) or an
    `hf://OWNER/REPO/FILE` path: downloaded (`hub.download`), converted once by
    `convert.convert_checkpoint` into `<HF_HOME>/npp_jax/<kind>-<sha256>` and read from there
    after (the conversion is written beside it and renamed into place, so an interrupted one
    leaves nothing a later call reads);
  * a params checkpoint directory (`python -m npp_jax.convert`, `checkpoint.save_params`; its
    `model_config.json` gives the architecture);
  * a training workdir (its latest step's params, or the EMA with use_ema);
  * a LlamaGen weight file (.pt/.pth/.bin/.ckpt, .npz, .safetensors), converted in memory;
local paths or gs://. A multi-process run cannot share a per-host cache: it is told to convert
once onto shared storage (`python -m npp_jax.convert --src npp-b --dst gs://...`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
from typing import Any

import jax
import ml_collections
from absl import logging
from etils import epath
from flax import nnx

from npp_jax import checkpoint as ckpt_lib
from npp_jax import config_lib, convert, hub, sharding, vq
from npp_jax import model as model_lib

NO_DROPOUT = dict(token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0, class_dropout=0.0)
# ModelConfig fields that are choices of this run, not the checkpoint's to set.
_RUN_CHOICES = set(NO_DROPOUT) | {"dtype", "remat", "scan_unroll", "kernels"}


def converted(spec: str, kind: str, *, n_head: int | None = None) -> str:
  """The params checkpoint directory of hub weights `spec` ("gpt" or "vq"), converted on first
  use; later calls (same file on the hub) convert nothing."""
  if jax.process_count() > 1:
    raise ValueError(f"{spec}: hub weights are converted into a per-host cache, which the "
                     f"{jax.process_count()} processes of this run cannot share. Convert once "
                     f"onto shared storage and pass that path: python -m npp_jax.convert "
                     f"--kind {kind} --src {spec} --dst gs://BUCKET/{kind}")
  local = hub.download(spec)
  key = f"{kind}-{os.path.basename(os.path.realpath(local))}"
  dst = os.path.join(hub.hf_home(), "npp_jax", key + (f"-h{n_head}" if n_head else ""))
  if os.path.isfile(os.path.join(dst, "model_config.json")):
    return dst
  tmp = f"{dst}.tmp-{uuid.uuid4().hex[:8]}"
  try:
    convert.convert_checkpoint(kind, spec, tmp, n_head=n_head)
    logging.info("Converted %s into %s", hub.hub_path(spec), dst)
    try:
      os.rename(tmp, dst)
    except OSError:  # another process converted it first: keep theirs.
      if not os.path.isfile(os.path.join(dst, "model_config.json")):
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return dst


def _stored_model_cfg(config: ml_collections.ConfigDict | None, stored: dict | None,
                      where: str, overrides: dict) -> model_lib.ModelConfig:
  """The ModelConfig of a checkpoint without dropout: its stored model_config.json sets the
  architecture, `config` (if any) and `overrides` the choices of this run (dtype, remat)."""
  if stored is not None:
    unknown = sorted(set(stored) - {f.name for f in dataclasses.fields(model_lib.ModelConfig)})
    if unknown:
      hint = (" It describes a VQ tokenizer: pass it as config.sample.vq_checkpoint, and a GPT "
              "checkpoint as --checkpoint." if "codebook_size" in stored else "")
      raise ValueError(f"{where}model_config.json has fields no GPT model has: {unknown}.{hint}")
  if config is None:
    if stored is None:
      raise ValueError(f"{where}: no model_config.json and no config to give the architecture.")
    return model_lib.ModelConfig(**{**stored, **NO_DROPOUT, **overrides})
  cfg = config_lib.model_config(config, **NO_DROPOUT, **overrides)
  if stored is None:
    return cfg
  arch = {k: v for k, v in stored.items() if k not in _RUN_CHOICES}
  differ = {k: (getattr(cfg, k), v) for k, v in arch.items() if getattr(cfg, k) != v}
  if differ:
    logging.warning("The checkpoint's model_config.json overrides the config: %s", differ)
  return dataclasses.replace(cfg, **arch)


def _abstract_state(cfg: model_lib.ModelConfig, mesh: jax.sharding.Mesh | None):
  """(graphdef, state of ShapeDtypeStructs carrying the mesh's shardings, or device 0's)."""
  ctor = lambda: model_lib.Transformer(cfg, rngs=nnx.Rngs(0))
  if mesh is not None:
    return sharding.abstract_sharded(ctor, mesh)
  graphdef, state = nnx.split(nnx.eval_shape(ctor))
  device0 = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return graphdef, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device0),
                                state)


def _workdir_config(path: epath.Path) -> ml_collections.ConfigDict:
  f = path / "config.json"
  if not f.exists():
    raise ValueError(f"{path} is a training workdir without config.json: pass its config.")
  return ml_collections.ConfigDict(json.loads(f.read_text()))


def load_model(checkpoint: str | os.PathLike, config: ml_collections.ConfigDict | None = None, *,
               use_ema: bool = False, mesh: jax.sharding.Mesh | None = None,
               n_head: int | None = None, **overrides: Any) -> model_lib.Transformer:
  """The GPT of `checkpoint` (any form in the module docstring), deterministic (no dropout).

  Args:
    checkpoint: a released name, hf:// path, params dir, training workdir or weight file.
    config: an experiment config: its model gives the architecture where the checkpoint stores
      none (a workdir without config.json) and the run's choices (dtype, remat). Optional.
    use_ema: a training workdir's EMA params.
    mesh: place the arrays by the mesh's shardings (default: device 0).
    n_head: the head count of hub weights or a weight file whose shapes match no named size.
    **overrides: ModelConfig fields of this run, e.g. dtype="bfloat16".

  Raises:
    FileNotFoundError naming the path; ValueError (ConversionError, CheckpointMismatchError)
    naming the key; hub.HubError for a failed download.
  """
  spec = os.fspath(checkpoint)
  if hub.is_remote(spec):
    spec = converted(spec, "gpt", n_head=n_head)
  path = ckpt_lib.as_path(spec)
  if use_ema and not (path / "checkpoints").exists():
    raise ValueError(f"use_ema: {checkpoint} is not a training workdir (no EMA to load).")
  if (path / "checkpoints").exists():
    config = config if config is not None else _workdir_config(path)
    graphdef, target = _abstract_state(_stored_model_cfg(config, None, "", overrides), mesh)
    state = ckpt_lib.restore_params(path, target, use_ema=use_ema)
  elif (path / "params").exists():
    stored = ckpt_lib.read_model_config(path)
    graphdef, target = _abstract_state(
        _stored_model_cfg(config, stored, f"{path}/", overrides), mesh)
    state = ckpt_lib.load_params(path, target)
  elif path.is_file():
    model = convert.load_gpt(spec, n_head=n_head, **NO_DROPOUT)
    cfg = _stored_model_cfg(config, dataclasses.asdict(model.cfg), f"{spec}: ", overrides)
    graphdef, target = _abstract_state(cfg, mesh)
    state = jax.device_put(nnx.split(model)[1], jax.tree.map(lambda x: x.sharding, target))
  else:
    raise FileNotFoundError(f"checkpoint {checkpoint} is neither a params checkpoint (no "
                            f"{path / 'params'}), a training workdir (no "
                            f"{path / 'checkpoints'}), a weight file, nor a hub path "
                            f"(hf://OWNER/REPO/FILE or one of {list(hub.PRETRAINED)}).")
  return nnx.merge(graphdef, state)


def load_vq(spec: str | os.PathLike) -> vq.VQModel:
  """The VQ tokenizer of `spec`: "vq-16", an hf:// path, a converted dir (`python -m
  npp_jax.convert --kind vq`) or a LlamaGen weight file; local or gs://."""
  spec = os.fspath(spec)
  if not spec:
    raise ValueError("no VQ checkpoint given: pass vq-16, an hf:// path, a converted VQ dir or a "
                     ".pt/.npz file.")
  if hub.is_remote(spec):
    spec = converted(spec, "vq")
  path = epath.Path(spec)
  if not path.exists():
    raise FileNotFoundError(f"no VQ checkpoint at {spec}.")
  return convert.load_converted_vq(spec) if path.is_dir() else convert.load_vq(spec)


def load_params(spec: str, target: Any) -> Any:
  """Params checkpoint `spec` (a dir, a released name or an hf:// path) read into the shapes and
  shardings of `target` (what `config.ckpt.init_from` names)."""
  if hub.is_remote(spec):
    spec = converted(spec, "gpt")
  return ckpt_lib.load_params(spec, target)
