"""Sampling: KV-cache decoding with classifier-free guidance, top-k/top-p, images and grids.

Owns: `generate` (token-by-token decoding of the final 1x1 model with a static-shape KV cache in
one compiled loop; the cache and the per-step layer maths live in `npp_jax/decode.py`),
`generate_full_recompute` (the same sampling without a cache, the reference
for tests and benchmarks), `make_sampler` (jitted and sharded over a mesh), the decoders from
codes to uint8 images (VQ-16, a built-in data set's palette, a raw token palette),
`sample_classes` (labels padded to the mesh in this one place) and `class_grid` / `sample_grid`.
Loading weights is `npp_jax/load.py`'s; the CLI that writes the ADM `.npz` lives in
`npp_jax/sample_cli.py` (`python -m npp_jax.sample` runs it).

Sampling follows LlamaGen's `generate` (facts section 4) except where noted:
  * CFG rows: each label b gets a conditional row and a null-class row, interleaved (row 2b, 2b+1)
    so that a pair never straddles two batch shards; both rows are fed the same sampled token.
    `logits = uncond + (cond - uncond) * cfg_scale` on raw logits. The reference ignores CFG for
    cfg_scale <= 1; here every cfg_scale != 1 applies the formula (1 skips the null rows).
    Being linear, the combination is applied to the final-normed hidden states, before the
    (bias-free) output layer: the same logits up to float rounding, half the output matmul.
  * Randomness is a function of the global sample index: row b uses fold_in(rng, offset + b) and
    step t fold_in(row_key, t), so samples do not depend on the batch size or device count.
  * top-p keeps every token tied with the last kept one (HF v3 keeps an arbitrary subset of ties).

Shape legend: B images, R = 2B (CFG) or B rows, N tokens per image, L cache length, D width,
H heads, J kv heads, E head_dim, V vocabulary, NL layers.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from PIL import Image, ImageDraw, ImageFont

from npp_jax import builtin_data, decode, load, sharding, sjd, vq
from npp_jax import model as model_lib
from npp_jax.token_choice import SamplingOptions, draw, guide, rows

NO_DROPOUT = load.NO_DROPOUT  # ModelConfig overrides of a sampling model.


# ---------------------------------------------------------------------------------------------
# The decode loop, shared by the cached and the full-recompute paths.
# ---------------------------------------------------------------------------------------------
def _loop(model, step_fn, carry, labels_B, rng, sample_offset, opts, return_logits, phases=None):
  """Steps t = 0..N-1: `step_fn(t, tokens_R, carry) -> (x_RxD, carry)` feeds the previous
  token (ignored at t = 0, the class position's prefill) and returns the residual stream of the
  position predicting token t. `phases` [(end, grow)] splits the steps into fori_loops;
  `grow(carry)` runs before each."""
  cfg = model.cfg
  b, n, v = labels_B.shape[0], cfg.num_tokens, cfg.vocab_size
  idx_B = jnp.asarray(sample_offset, jnp.int32) + jnp.arange(b, dtype=jnp.int32)
  row_keys_B = jax.vmap(jax.random.fold_in, (None, 0))(rng, idx_B)
  dtype = model_lib.DTYPES[cfg.dtype]
  scale_D = model.norm.scale[...]
  out_DxV = model.output[...].astype(dtype)  # cast once, outside the loop.

  def body(t, state):
    codes_BxN, carry, tok_B, buf_BxNxV = state
    x_RxD, carry = step_fn(t, rows(tok_B, opts), carry)
    h_BxD = guide(model_lib.rms_norm(x_RxD, scale_D, cfg.norm_eps), t, opts)
    logits_BxV = jnp.dot(h_BxD.astype(dtype), out_DxV, preferred_element_type=jnp.float32)
    keys_B = jax.vmap(jax.random.fold_in, (0, None))(row_keys_B, t)
    tok_B = draw(logits_BxV, keys_B, opts)
    codes_BxN = jax.lax.dynamic_update_slice(codes_BxN, tok_B[:, None], (0, t))
    if return_logits:
      buf_BxNxV = jax.lax.dynamic_update_slice(buf_BxNxV, logits_BxV[:, None], (0, t, 0))
    return codes_BxN, carry, tok_B, buf_BxNxV

  codes_BxN = jnp.zeros((b, n), jnp.int32)
  buf_BxNxV = jnp.zeros((b, n, v), jnp.float32) if return_logits else None
  state, start = (codes_BxN, carry, jnp.zeros((b,), jnp.int32), buf_BxNxV), 0
  for end, grow in phases or [(n, lambda c: c)]:
    state = (state[0], grow(state[1]), *state[2:])
    state, start = jax.lax.fori_loop(start, end, body, state), end
  return state[0], state[3]


def _generate_cached(model, labels_B, rng, sample_offset, opts, return_logits):
  cfg = model.cfg
  labels_R = rows(labels_B, opts, cfg.num_classes)
  layers = decode.decode_weights(model)  # sliced, cast and laid out once, outside the loop.
  table = jnp.asarray(model.rope(1))
  cls_RxD = model.class_embedding(labels_R)

  def step(t, tok_R, cache):
    tok_RxD = model.tok_embeddings(tok_R).astype(jnp.float32)
    x_RxD = jnp.where(t == 0, cls_RxD, tok_RxD)  # t = 0: prefill the class position.
    row = jax.lax.dynamic_slice_in_dim(table, t, 1, axis=0)
    x_Rx1xD, cache = decode.cached_step(cfg, layers, row, x_RxD[:, None], t, cache)
    return x_Rx1xD[:, 0], cache

  phases = [(end, functools.partial(decode.grow_cache, length=length))
            for end, length in decode.cache_phases(cfg.num_tokens)]
  return _loop(model, step, decode.empty_cache(cfg, labels_R.shape[0]), labels_B, rng,
               sample_offset, opts, return_logits, phases)


def _generate_recompute(model, labels_B, rng, sample_offset, opts, return_logits):
  labels_R = rows(labels_B, opts, model.cfg.num_classes)

  def step(t, tok_R, codes_RxN):
    # Token t-1 joins the input (at t = 0 a zero lands in slot 0, which step 1 overwrites).
    codes_RxN = jax.lax.dynamic_update_slice(codes_RxN, tok_R[:, None], (0, jnp.maximum(t - 1, 0)))
    x_RxNxD = model.hidden(codes_RxN, labels_R)  # the whole prefix, recomputed every step.
    return jax.lax.dynamic_slice_in_dim(x_RxNxD, t, 1, axis=1)[:, 0], codes_RxN

  codes_RxN = jnp.zeros((labels_R.shape[0], model.cfg.num_tokens), jnp.int32)
  return _loop(model, step, codes_RxN, labels_B, rng, sample_offset, opts, return_logits)


@functools.partial(jax.jit, static_argnames=("graphdef", "opts", "return_logits", "recompute",
                                             "return_forwards"))
def _generate_jit(graphdef, state, labels_B, rng, sample_offset, *, opts, return_logits, recompute,
                  return_forwards=False):
  model = nnx.merge(graphdef, state)
  if opts.method == "sjd":
    codes_BxN, logits_BxNxV, forwards_B = sjd.generate(model, labels_B, rng, sample_offset, opts,
                                                       return_logits)
  else:
    fn = _generate_recompute if recompute else _generate_cached
    codes_BxN, logits_BxNxV = fn(model, labels_B, rng, sample_offset, opts, return_logits)
    forwards_B = jnp.full(labels_B.shape, model.cfg.num_tokens, jnp.int32)
  codes_BxN = sharding.constrain(codes_BxN, ("act_batch", None))
  out = ((codes_BxN,) + ((logits_BxNxV,) if return_logits else ())
         + ((forwards_B,) if return_forwards else ()))
  return out if len(out) > 1 else codes_BxN


def _check_labels(labels_B: Any, num_classes: int) -> None:
  if isinstance(labels_B, jax.Array) and not labels_B.is_fully_addressable:
    return  # values live on other processes; each process checked its own before assembling.
  labels = np.asarray(labels_B)
  if labels.ndim != 1 or labels.size == 0:
    raise ValueError(f"labels_B must be a non-empty 1-D array, got shape {labels.shape}.")
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels_B must be integers, got dtype {labels.dtype}.")
  if labels.min() < 0 or labels.max() > num_classes:
    raise ValueError(f"labels_B must lie in [0, {num_classes}] ({num_classes} = the null class), "
                     f"got [{labels.min()}, {labels.max()}].")


def _run(model, labels_B, rng, sample_offset, opts, *, recompute, return_logits,
         return_forwards=False):
  _check_labels(labels_B, model.cfg.num_classes)
  graphdef, state = nnx.split(model)
  return _generate_jit(graphdef, state, jnp.asarray(labels_B, jnp.int32), rng,
                       jnp.asarray(sample_offset, jnp.int32), opts=opts.validate(),
                       return_logits=return_logits, recompute=recompute,
                       return_forwards=return_forwards)


def generate(model: model_lib.Transformer, labels_B: Any, rng: jax.Array, *, cfg_scale: float,
             cfg_interval: int = -1, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             method: str = "ar", window: int = 0, sample_offset: int = 0,
             return_logits: bool = False, return_forwards: bool = False):
  """Samples tokens with a KV cache, jitted (one compile per options and batch size).

  Args:
    model: the transformer; decoding uses patch size 1 (the full 16x16 token grid).
    labels_B: int class ids in [0, num_classes]; num_classes is the null class.
    rng: a jax.random key; row b draws from fold_in(rng, sample_offset + b).
    cfg_scale, cfg_interval, temperature, top_k, top_p: see `SamplingOptions`.
    method, window: "ar" (token by token, window 0) or "sjd" (speculative Jacobi decoding,
      `npp_jax/sjd.py`: `window` draft tokens verified per forward pass; the same distribution).
    sample_offset: global index of row 0 (chunked or multi-batch runs).
    return_logits: also return the CFG-combined raw logits each token was drawn from (from its
      final context), float32 [B, N, V].
    return_forwards: also return forwards_B, the forward passes each image took (N for "ar").

  Returns:
    codes_BxN int32 (then logits_BxNxV, forwards_B when asked for).
  """
  opts = SamplingOptions(cfg_scale, cfg_interval, temperature, top_k, top_p, method, window)
  return _run(model, labels_B, rng, sample_offset, opts, recompute=False,
              return_logits=return_logits, return_forwards=return_forwards)


def generate_full_recompute(model: model_lib.Transformer, labels_B: Any, rng: jax.Array, *,
                            cfg_scale: float, cfg_interval: int = -1, temperature: float = 1.0,
                            top_k: int = 0, top_p: float = 1.0, sample_offset: int = 0,
                            return_logits: bool = False):
  """`generate` without a cache: the full forward pass at every step (reference, O(N^2))."""
  opts = SamplingOptions(cfg_scale, cfg_interval, temperature, top_k, top_p)
  return _run(model, labels_B, rng, sample_offset, opts, recompute=True,
              return_logits=return_logits)


# ---------------------------------------------------------------------------------------------
# Sharded sampling.
# ---------------------------------------------------------------------------------------------
def to_global(mesh: jax.sharding.Mesh, x_B: np.ndarray, *, process_local: bool = False):
  """A global array of batch-major values (labels, codes), sharded over ('data', 'fsdp').

  With process_local=False every process passes the same global values; with True each process
  passes its own slice (jax.make_array_from_process_local_data).
  """
  x_B = np.asarray(x_B)
  sh = sharding.batch_sharding(mesh)
  if process_local:
    return jax.make_array_from_process_local_data(sh, x_B)
  return jax.make_array_from_callback(x_B.shape, sh, lambda idx: x_B[idx])


def to_host(x: jax.Array) -> np.ndarray:
  """The full value of a (possibly multi-process) array on every process."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def make_sampler(model: model_lib.Transformer, mesh: jax.sharding.Mesh, *,
                 return_logits: bool = False, return_forwards: bool = False,
                 **sampling_kwargs: Any) -> Callable:
  """A jitted `(labels_B, rng, sample_offset=0) -> codes_BxN` on `mesh`.

  Params are placed by their logical axis names (the training shardings of this mesh); rows are
  sharded over ('data', 'fsdp'). For sampling alone, a mesh with every device on 'data' keeps
  the params replicated and avoids gathering them at every step. labels_B is a global array or
  numpy labels that every process passes in full (see `global_labels` for per-process slices);
  its size must divide by the data x fsdp devices. Compiled once per batch size.
  `sampling_kwargs` are `SamplingOptions`' fields (method="sjd", window=k for speculative
  Jacobi decoding); return_logits / return_forwards add outputs as in `generate`.
  """
  opts = SamplingOptions(**sampling_kwargs).validate()
  graphdef, state = nnx.split(model)
  state = jax.device_put(state, sharding.state_shardings(state, mesh))
  def sample(labels_B, rng, sample_offset=0):
    if not isinstance(labels_B, jax.Array):
      labels_B = np.asarray(labels_B)
    _check_labels(labels_B, model.cfg.num_classes)
    sharding.check_batch(labels_B.shape[0], mesh)
    if not isinstance(labels_B, jax.Array) or labels_B.sharding != sharding.batch_sharding(mesh):
      labels_B = to_global(mesh, to_host(labels_B).astype(np.int32))
    with sharding.use_mesh(mesh):
      return _generate_jit(graphdef, state, labels_B, rng, jnp.asarray(sample_offset, jnp.int32),
                           opts=opts, return_logits=return_logits, recompute=False,
                           return_forwards=return_forwards)

  return sample


# ---------------------------------------------------------------------------------------------
# Decoders: codes_BxN -> uint8 images_BxHxWx3 (numpy, on every process).
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Decoder:
  name: str  # "vq" | "builtin" | "tokens"
  fn: Callable[[Any], np.ndarray]

  def __call__(self, codes_BxN: Any) -> np.ndarray:
    return self.fn(codes_BxN)


def _token_palette(codes_BxN: Any, vocab_size: int) -> np.ndarray:
  """Each token id as a fixed colour, one pixel per token (models without a VQ decoder)."""
  codes = to_host(codes_BxN)
  palette = np.random.default_rng(0).integers(0, 256, (vocab_size, 3), dtype=np.uint8)
  g = math.isqrt(codes.shape[1])
  return palette[codes].reshape(codes.shape[0], g, g, 3)


def make_decoder(kind: str, model_cfg: model_lib.ModelConfig, mesh: jax.sharding.Mesh | None = None,
                 *, vq_checkpoint: str = "", builtin: str = "") -> Decoder:
  """The decoder of `kind`: "vq", "builtin" (the palette of the built-in data set `builtin`,
  config.data.builtin), "tokens", or "auto" (builtin when `builtin` is set, else VQ, which then
  needs `vq_checkpoint`)."""
  if kind == "auto":
    kind = "builtin" if builtin else "vq"
  if kind == "builtin":
    decode_fn = builtin_data.lookup(builtin).decode
    return Decoder("builtin", lambda c: decode_fn(to_host(c)))
  if kind == "tokens":
    return Decoder("tokens", lambda c: _token_palette(c, model_cfg.vocab_size))
  if kind != "vq":
    raise ValueError(f"decoder={kind!r} must be one of auto, vq, builtin, tokens.")
  if not vq_checkpoint:
    raise ValueError("config.sample.vq_checkpoint is empty: a VQ decoder needs converted VQ-16 "
                     "weights (or pick decoder 'tokens' to see raw codes).")
  if mesh is None:
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  vq_model = load.load_vq(vq_checkpoint)
  if vq_model.config.codebook_size != model_cfg.vocab_size:
    raise ValueError(f"VQ checkpoint {vq_checkpoint} has a codebook of "
                     f"{vq_model.config.codebook_size} codes but the model's vocab_size is "
                     f"{model_cfg.vocab_size}: it is not this model's tokenizer.")
  decode = vq.make_decode_fn(vq_model, mesh)
  shards = sharding.batch_shards(mesh)

  def fn(codes_BxN):
    codes = to_host(codes_BxN)
    pad = -len(codes) % shards
    codes = np.concatenate([codes, np.repeat(codes[-1:], pad, axis=0)])
    images = to_host(vq.to_uint8(decode(to_global(mesh, codes))))
    return images[: len(images) - pad]

  return Decoder("vq", fn)


# ---------------------------------------------------------------------------------------------
# Grids.
# ---------------------------------------------------------------------------------------------
def class_grid(images_BxHxWx3: np.ndarray, labels: Sequence[Any], ncols: int, *,
               min_tile: int = 64) -> np.ndarray:
  """A labelled grid: tiles (nearest-upscaled to >= min_tile px) under a strip with the label.

  Returns a uint8 [rows*(tile+strip+pad)+pad, ncols*(tile+pad)+pad, 3] image.
  """
  images = np.asarray(images_BxHxWx3)
  if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
    raise ValueError(f"images must be uint8 BxHxWx3, got {images.dtype} {images.shape}.")
  if len(labels) != len(images):
    raise ValueError(f"{len(labels)} labels for {len(images)} images.")
  if ncols < 1:
    raise ValueError(f"ncols={ncols} must be >= 1.")
  b, h, w, _ = images.shape
  scale = max(1, -(-min_tile // min(h, w)))
  th, tw, strip, pad = h * scale, w * scale, 14, 4
  nrows = -(-b // ncols)
  canvas = Image.new("RGB", (ncols * (tw + pad) + pad, nrows * (th + strip + pad) + pad), "white")
  draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
  for i, (img, label) in enumerate(zip(images, labels)):
    r, c = divmod(i, ncols)
    x, y = pad + c * (tw + pad), pad + r * (th + strip + pad)
    draw.text((x + 1, y), str(label), fill="black", font=font)
    canvas.paste(Image.fromarray(img).resize((tw, th), Image.NEAREST), (x, y + strip))
  return np.asarray(canvas)


def sample_classes(model: model_lib.Transformer, mesh: jax.sharding.Mesh, classes: Sequence[int],
                   rng: jax.Array, *, decoder: Decoder, per_class: int = 1,
                   **sampling_kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
  """`per_class` decoded samples of each class: uint8 images [B, H, W, 3] and int32 labels [B]
  (B = len(classes) * per_class, class-major). The batch is padded to the mesh's batch shards by
  repeating the last label (any number of classes on any number of devices)."""
  labels = np.repeat(np.asarray(classes, np.int32), per_class)
  n = len(labels)
  padded = np.concatenate([labels, np.repeat(labels[-1:], -n % sharding.batch_shards(mesh))])
  codes = to_host(make_sampler(model, mesh, **sampling_kwargs)(padded, rng))[:n]
  return decoder(codes), labels


def sample_grid(model: model_lib.Transformer, mesh: jax.sharding.Mesh, classes: Sequence[int],
                rng: jax.Array, *, decoder: Decoder, per_class: int = 1, ncols: int | None = None,
                **sampling_kwargs: Any) -> np.ndarray:
  """Samples `per_class` images of each class and returns their labelled uint8 grid
  (one row per class when per_class > 1)."""
  images, labels = sample_classes(model, mesh, classes, rng, decoder=decoder, per_class=per_class,
                                  **sampling_kwargs)
  ncols = ncols or (per_class if per_class > 1 else len(labels))
  return class_grid(images, labels, ncols)


def options_from_config(config: ml_collections.ConfigDict, **overrides: Any) -> dict:
  """Sampling kwargs from `config.sample`, with non-None overrides."""
  s = config.sample
  opts = dict(cfg_scale=s.cfg_scale, cfg_interval=s.cfg_interval, temperature=s.temperature,
              top_k=s.top_k, top_p=s.top_p)
  opts.update({k: v for k, v in overrides.items() if v is not None})
  SamplingOptions(**opts).validate()
  return opts


if __name__ == "__main__":
  import runpy

  # `python -m npp_jax.sample` is the CLI's name: run sample_cli as __main__ (no import of the CLI
  # by this library module).
  runpy.run_module("npp_jax.sample_cli", run_name="__main__", alter_sys=True)
