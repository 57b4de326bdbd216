"""LlamaGen's VQ tokenizer (VQ-16 / VQ-8) in Flax NNX, channel-last (NHWC).

This module owns the image tokenizer: the encoder/decoder networks, the L2-normalised vector
quantizer, image <-> code conversion, uint8 output conversion, and jitted batch-sharded
encode/decode helpers. Strict loading of LlamaGen PyTorch state dicts is `npp_jax.vq_weights`.

Submodule names mirror the reference state-dict keys (`encoder.conv_blocks.0.res.1.conv1`,
`quantize.embedding`, ...), so loading is a rename table plus layout transposes:
Conv2d weight (O, I, kh, kw) -> kernel (kh, kw, I, O); GroupNorm weight -> scale;
Embedding weight -> embedding.

Shape legend: B batch, H/W image height/width, h/w latent grid, N = h*w tokens, C channels,
Z z_channels, D codebook_embed_dim, K codebook_size.
"""
import dataclasses
import functools
import math

from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from npp_jax import sharding

_GN_GROUPS = 32
_GN_EPS = 1e-6
_L2_EPS = 1e-12  # F.normalize's default eps.
HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class VQConfig:
  """Tokenizer architecture. Defaults are LlamaGen's VQ-16 (`vq_ds16_c2i.pt`)."""
  ch: int = 128  # Base width; the reference hard-codes 128 (the parity fixture uses 64).
  ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # Per level, encoder and decoder alike.
  num_res_blocks: int = 2  # Encoder res blocks per level; the decoder uses one more.
  z_channels: int = 256
  codebook_size: int = 16384
  codebook_embed_dim: int = 8
  codebook_l2_norm: bool = True
  dropout: float = 0.0  # Kept for completeness; inference never drops.

  def __post_init__(self):
    object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
    if not self.ch_mult or min(self.ch_mult) < 1:
      raise ValueError(f"VQConfig.ch_mult must be non-empty positive ints, got {self.ch_mult}")
    for m in self.ch_mult:
      if (self.ch * m) % _GN_GROUPS:
        raise ValueError(f"VQConfig.ch * ch_mult ({self.ch}*{m}) must be divisible by the "
                         f"{_GN_GROUPS} GroupNorm groups")
    for field in ("num_res_blocks", "z_channels", "codebook_size", "codebook_embed_dim"):
      if getattr(self, field) < 1:
        raise ValueError(f"VQConfig.{field} must be >= 1, got {getattr(self, field)}")
    if self.dropout != 0.0:
      raise ValueError(f"VQConfig.dropout must be 0 (inference-only port), got {self.dropout}")

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.ch_mult) - 1)


VQ_16 = VQConfig()
VQ_8 = VQConfig(ch_mult=(1, 2, 2, 4))


# ----------------------------------------------------------------------------- building blocks

def _swish(x):
  return x * jax.nn.sigmoid(x)


def _l2_normalize(x, axis=-1):
  """F.normalize: x / max(||x||, 1e-12)."""
  norm = jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=True))
  return x / jnp.maximum(norm, _L2_EPS)


def _norm(c, rngs):
  # Two-pass variance, like torch, rather than E[x^2] - E[x]^2.
  return nnx.GroupNorm(c, num_groups=_GN_GROUPS, epsilon=_GN_EPS, use_fast_variance=False,
                       rngs=rngs)


# PyTorch's default conv weight init, uniform(+-1/sqrt(fan_in)).
_torch_kernel_init = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def _conv(cin, cout, k, precision, rngs, stride=1, padding=None):
  if padding is None:
    padding = ((k // 2, k // 2),) * 2
  return nnx.Conv(cin, cout, (k, k), strides=stride, padding=padding, precision=precision,
                  kernel_init=_torch_kernel_init, rngs=rngs)


class ResnetBlock(nnx.Module):
  """norm1 -> swish -> conv1 -> norm2 -> swish -> conv2, plus a (1x1 when in != out) skip."""

  def __init__(self, cin, cout, precision, rngs):
    self.norm1 = _norm(cin, rngs)
    self.conv1 = _conv(cin, cout, 3, precision, rngs)
    self.norm2 = _norm(cout, rngs)
    self.conv2 = _conv(cout, cout, 3, precision, rngs)
    self.nin_shortcut = _conv(cin, cout, 1, precision, rngs) if cin != cout else None

  def __call__(self, x_BxHxWxC):
    h = self.conv1(_swish(self.norm1(x_BxHxWxC)))
    h = self.conv2(_swish(self.norm2(h)))
    x = self.nin_shortcut(x_BxHxWxC) if self.nin_shortcut is not None else x_BxHxWxC
    return x + h


class AttnBlock(nnx.Module):
  """Single-head self-attention over the h*w positions with all C channels, plus residual."""

  def __init__(self, c, precision, rngs):
    self.precision = precision
    self.norm = _norm(c, rngs)
    self.q = _conv(c, c, 1, precision, rngs)
    self.k = _conv(c, c, 1, precision, rngs)
    self.v = _conv(c, c, 1, precision, rngs)
    self.proj_out = _conv(c, c, 1, precision, rngs)

  def __call__(self, x_BxHxWxC):
    b, h, w, c = x_BxHxWxC.shape
    hn = self.norm(x_BxHxWxC)
    q_BxLxC, k_BxLxC, v_BxLxC = (f(hn).reshape(b, h * w, c) for f in (self.q, self.k, self.v))
    s_BxLxL = jnp.einsum("bqc,bkc->bqk", q_BxLxC, k_BxLxC, precision=self.precision) * c**-0.5
    a_BxLxL = jax.nn.softmax(s_BxLxL.astype(jnp.float32), axis=-1)
    o_BxLxC = jnp.einsum("bqk,bkc->bqc", a_BxLxL, v_BxLxC, precision=self.precision)
    return x_BxHxWxC + self.proj_out(o_BxLxC.reshape(b, h, w, c))


class Downsample(nnx.Module):
  """Zero-pad right/bottom by one, then 3x3 stride-2 VALID conv (not 'SAME')."""

  def __init__(self, c, precision, rngs):
    self.conv = _conv(c, c, 3, precision, rngs, stride=2, padding="VALID")

  def __call__(self, x_BxHxWxC):
    return self.conv(jnp.pad(x_BxHxWxC, ((0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample(nnx.Module):
  """Nearest-neighbour x2, then 3x3 conv."""

  def __init__(self, c, precision, rngs):
    self.conv = _conv(c, c, 3, precision, rngs)

  def __call__(self, x_BxHxWxC):
    x = jnp.repeat(jnp.repeat(x_BxHxWxC, 2, axis=1), 2, axis=2)
    return self.conv(x)


class ConvBlock(nnx.Module):
  """One resolution level: res blocks, attention after each (lowest resolution only), resample."""

  def __init__(self, res, attn, downsample=None, upsample=None):
    self.res = nnx.List(res)
    self.attn = nnx.List(attn)
    self.downsample = downsample
    self.upsample = upsample

  def __call__(self, x):
    for i, res in enumerate(self.res):
      x = res(x)
      if self.attn:
        x = self.attn[i](x)
    if self.downsample is not None:
      x = self.downsample(x)
    if self.upsample is not None:
      x = self.upsample(x)
    return x


def _mid(c, precision, rngs):
  return nnx.List([ResnetBlock(c, c, precision, rngs), AttnBlock(c, precision, rngs),
                   ResnetBlock(c, c, precision, rngs)])


class Encoder(nnx.Module):
  """Image BxHxWx3 -> BxhxwxZ. conv_blocks[0] is the highest resolution."""

  def __init__(self, cfg: VQConfig, precision, rngs):
    n = len(cfg.ch_mult)
    self.conv_in = _conv(3, cfg.ch, 3, precision, rngs)
    in_mult = (1,) + cfg.ch_mult
    blocks = []
    for i in range(n):
      cin, cout = cfg.ch * in_mult[i], cfg.ch * cfg.ch_mult[i]
      res = [ResnetBlock(cin if j == 0 else cout, cout, precision, rngs)
             for j in range(cfg.num_res_blocks)]
      attn = ([AttnBlock(cout, precision, rngs) for _ in range(cfg.num_res_blocks)]
              if i == n - 1 else [])
      down = Downsample(cout, precision, rngs) if i != n - 1 else None
      blocks.append(ConvBlock(res, attn, downsample=down))
    self.conv_blocks = nnx.List(blocks)
    c = cfg.ch * cfg.ch_mult[-1]
    self.mid = _mid(c, precision, rngs)
    self.norm_out = _norm(c, rngs)
    self.conv_out = _conv(c, cfg.z_channels, 3, precision, rngs)

  def __call__(self, x_BxHxWx3):
    h = self.conv_in(x_BxHxWx3)
    for block in self.conv_blocks:
      h = block(h)
    for block in self.mid:
      h = block(h)
    return self.conv_out(_swish(self.norm_out(h)))


class Decoder(nnx.Module):
  """Latent BxhxwxZ -> image BxHxWx3. conv_blocks[0] is the LOWEST resolution."""

  def __init__(self, cfg: VQConfig, precision, rngs):
    n = len(cfg.ch_mult)
    c = cfg.ch * cfg.ch_mult[-1]
    self.conv_in = _conv(cfg.z_channels, c, 3, precision, rngs)
    self.mid = _mid(c, precision, rngs)
    blocks = []
    for i_level in reversed(range(n)):
      cout = cfg.ch * cfg.ch_mult[i_level]
      res = []
      for _ in range(cfg.num_res_blocks + 1):
        res.append(ResnetBlock(c, cout, precision, rngs))
        c = cout
      attn = ([AttnBlock(c, precision, rngs) for _ in range(cfg.num_res_blocks + 1)]
              if i_level == n - 1 else [])
      up = Upsample(c, precision, rngs) if i_level != 0 else None
      blocks.append(ConvBlock(res, attn, upsample=up))
    self.conv_blocks = nnx.List(blocks)
    self.norm_out = _norm(c, rngs)
    self.conv_out = _conv(c, 3, 3, precision, rngs)

  def __call__(self, z_BxhxwxZ):
    h = self.conv_in(z_BxhxwxZ)
    for block in self.mid:
      h = block(h)
    for block in self.conv_blocks:
      h = block(h)
    return self.conv_out(_swish(self.norm_out(h)))


def nearest_codes(z_BxNxD, codebook_KxD, *, l2_norm: bool = True, precision=HIGHEST):
  """The reference quantizer's code choice.

  With `l2_norm`, z and the codebook rows are L2-normalised first (F.normalize), so the argmin
  of the squared distance is the argmax of the cosine similarity. Ties go to the lowest index.
  Returns (z as compared BxNxD, codes BxN int32).
  """
  if l2_norm:
    z_BxNxD, codebook_KxD = _l2_normalize(z_BxNxD), _l2_normalize(codebook_KxD)
  # Same expression as the reference, |z|^2 + |e|^2 - 2 z.e, so near-ties resolve alike.
  d_BxNxK = (jnp.sum(z_BxNxD**2, -1, keepdims=True) + jnp.sum(codebook_KxD**2, -1)
             - 2 * jnp.einsum("bnd,kd->bnk", z_BxNxD, codebook_KxD, precision=precision))
  return z_BxNxD, jnp.argmin(d_BxNxK, axis=-1).astype(jnp.int32)


class VectorQuantizer(nnx.Module):
  """Holds the codebook (`quantize.embedding`); picks and looks up codes."""

  def __init__(self, cfg: VQConfig, precision, rngs):
    self.l2_norm = cfg.codebook_l2_norm
    self.precision = precision
    k = cfg.codebook_size

    def init(key, shape, dtype):  # The reference: uniform(-1/K, 1/K), then rows L2-normalised.
      e = jax.random.uniform(key, shape, dtype, -1.0 / k, 1.0 / k)
      return _l2_normalize(e) if cfg.codebook_l2_norm else e

    self.embedding = nnx.Embed(k, cfg.codebook_embed_dim, embedding_init=init, rngs=rngs)

  def codebook(self):
    """The KxD vectors used for distances and lookup."""
    e_KxD = self.embedding.embedding[...]
    return _l2_normalize(e_KxD) if self.l2_norm else e_KxD

  def __call__(self, z_BxNxD):
    """Returns (z as compared BxNxD, codes BxN int32)."""
    return nearest_codes(z_BxNxD, self.embedding.embedding[...], l2_norm=self.l2_norm,
                         precision=self.precision)

  def lookup(self, codes_BxN):
    return jnp.take(self.codebook(), codes_BxN, axis=0)


# ----------------------------------------------------------------------------- the model

class VQModel(nnx.Module):
  """LlamaGen VQModel: encoder -> quant_conv -> quantize; lookup -> post_quant_conv -> decoder."""

  def __init__(self, config: VQConfig, *, rngs: nnx.Rngs, precision=HIGHEST):
    self.config = cfg = config
    self.encoder = Encoder(cfg, precision, rngs)
    self.quant_conv = _conv(cfg.z_channels, cfg.codebook_embed_dim, 1, precision, rngs)
    self.quantize = VectorQuantizer(cfg, precision, rngs)
    self.post_quant_conv = _conv(cfg.codebook_embed_dim, cfg.z_channels, 1, precision, rngs)
    self.decoder = Decoder(cfg, precision, rngs)

  def _check_images(self, images):
    f = self.config.downsample_factor
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] % f or images.shape[2] % f:
      raise ValueError(f"images must be BxHxWx3 with H, W divisible by {f}, got {images.shape}")

  def encode(self, images_BxHxWx3) -> dict[str, jax.Array]:
    """Encodes images in [-1, 1] and returns every intermediate of the reference's encode.

    Returns a dict with `enc_out` (BxhxwxZ, encoder output), `h` (BxhxwxD, quant_conv output),
    `z_l2` (BxNxD, the vectors compared with the codebook), `codes` (BxN int32, row-major over
    the latent grid) and `quant` (BxhxwxD, codebook rows of the codes).
    """
    images_BxHxWx3 = jnp.asarray(images_BxHxWx3, jnp.float32)
    self._check_images(images_BxHxWx3)
    enc_out = self.encoder(images_BxHxWx3)
    h = self.quant_conv(enc_out)
    b, gh, gw, d = h.shape
    z_l2, codes = self.quantize(h.reshape(b, gh * gw, d))
    quant = self.quantize.lookup(codes).reshape(b, gh, gw, d)
    return dict(enc_out=enc_out, h=h, z_l2=z_l2, codes=codes, quant=quant)

  def encode_to_indices(self, images_BxHxWx3) -> jax.Array:
    """Images BxHxWx3 in [-1, 1] -> codes BxN int32, N = (H/f)*(W/f), row-major."""
    return self.encode(images_BxHxWx3)["codes"]

  def decode(self, quant_BxhxwxD) -> jax.Array:
    """Quantised latents BxhxwxD -> images BxHxWx3 (float, not clamped)."""
    return self.decoder(self.post_quant_conv(quant_BxhxwxD))

  def decode_from_indices(self, codes_BxN, grid_hw: tuple[int, int] | None = None) -> jax.Array:
    """Codes BxN -> images BxHxWx3 (float, nominally [-1, 1], not clamped).

    The latent grid is `grid_hw`, or square (N must then be a perfect square).
    """
    codes_BxN = jnp.asarray(codes_BxN)
    if codes_BxN.ndim != 2:
      raise ValueError(f"codes must be BxN, got shape {codes_BxN.shape}")
    b, n = codes_BxN.shape
    if grid_hw is None:
      side = math.isqrt(n)
      grid_hw = (side, side)
    if grid_hw[0] * grid_hw[1] != n:
      raise ValueError(f"codes of length {n} do not fill the latent grid {grid_hw}")
    quant = self.quantize.lookup(codes_BxN).reshape(b, *grid_hw, -1)
    return self.decode(quant)


def to_uint8(images):
  """Float images in [-1, 1] -> uint8, exactly like the reference: clamp(127.5x+128).to(uint8)."""
  return jnp.clip(127.5 * jnp.asarray(images, jnp.float32) + 128.0, 0, 255).astype(jnp.uint8)


# ----------------------------------------------------------------------------- sharded helpers

def _batch_sharding(mesh: Mesh) -> NamedSharding:
  axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)
  if not axes:
    raise ValueError(f"mesh needs a 'data' or 'fsdp' axis for the batch, has {mesh.axis_names}")
  return NamedSharding(mesh, P(axes))


def sharded_jit(graphdef: nnx.GraphDef, mesh: Mesh, method: str):
  """`(state, x) -> model.<method>(x)` jitted with params replicated and the batch (axis 0)
  sharded (`npp_jax.aot` lowers it with abstract arguments)."""
  batch = _batch_sharding(mesh)

  @functools.partial(jax.jit, in_shardings=(NamedSharding(mesh, P()), batch), out_shardings=batch)
  def run(state, x):
    return getattr(nnx.merge(graphdef, state), method)(x)

  return run


def _make_sharded(model: VQModel, mesh: Mesh, method: str):
  """Jits `model.<method>` with params replicated and the batch (axis 0) sharded."""
  graphdef, state = nnx.split(model)
  state = jax.device_put(state, NamedSharding(mesh, P()))
  _batch_sharding(mesh)  # refuses a mesh without a batch axis.
  run = sharded_jit(graphdef, mesh, method)

  def call(x):
    sharding.check_batch(x.shape[0], mesh)
    return run(state, x)

  return call


def make_encode_fn(model: VQModel, mesh: Mesh):
  """Returns jitted `images_BxHxWx3 -> codes_BxN`, batch sharded over ('data', 'fsdp')."""
  return _make_sharded(model, mesh, "encode_to_indices")


def make_decode_fn(model: VQModel, mesh: Mesh):
  """Returns jitted `codes_BxN -> images_BxHxWx3` (square grid), batch sharded like encode."""
  return _make_sharded(model, mesh, "decode_from_indices")
