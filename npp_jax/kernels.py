"""Kernels: the two implementations of the model's hot spots, and the one decision between them.

Owns: which kernel set a program uses (`resolve`), the causal attention, the projections
(`dense`), the layer scan's unroll, and the output layer fused with the patch loss (one pass, or
chunked over positions, each with its written-out gradient).

Kernel sets (`model.kernels`):
  * "xla": the library forms that XLA's TPU and GPU compilers fuse well: `jax.nn.dot_product_attention`,
    einsum projections, a rolled layer scan, and the fused loss chunked only when one chunk's
    float32 logits per device would exceed `XLA_LOSS_CHUNK_BYTES` (memory, not speed).
  * "cpu": the forms XLA:CPU runs fastest (same maths): attention written out with the fully
    masked quarter of the scores skipped, projections as 2-D matmuls over flattened rows, the
    layer scan unrolled, and the loss chunked to fit a last-level cache.
  * "auto" (default): "cpu" when the program is compiled for CPU devices, else "xla". The devices
    are those of the mesh the program is traced under (`sharding.use_mesh`), else JAX's default
    devices: an ahead-of-time compile for a TPU topology on a CPU host builds the TPU program.

The equivalence of the two sets (values and gradients) is tested in tests/test_kernels.py.

Shape legend: B batch, L / M query / key positions, H heads, J kv heads, E head_dim, P positions,
K tokens per patch, D width, V vocabulary, R rows of a chunk, C chunks.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from npp_jax import patching

KERNELS = ("auto", "cpu", "xla")
# The CPU loss keeps one chunk's float32 logits within a last-level cache.
CPU_LOSS_CHUNK_BYTES = 1 << 24
# The accelerator loss splits only to bound memory: one chunk's float32 logits per device.
XLA_LOSS_CHUNK_BYTES = 1 << 30
# Name scope of the CPU-only kernels in a program's op names (tests check a TPU program has none).
CPU_SCOPE = "cpu_kernel"


def target_platform() -> str:
  """Platform ("cpu", "tpu", "gpu") of the devices the program being traced is compiled for."""
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and mesh.abstract_device is not None:
    return mesh.abstract_device.platform
  return jax.devices()[0].platform


def resolve(setting: str) -> str:
  """The kernel set ("cpu" or "xla") of `model.kernels` = setting for the program being traced."""
  if setting not in KERNELS:
    raise ValueError(f"model.kernels={setting!r} must be one of {KERNELS}.")
  if setting == "auto":
    return "cpu" if target_platform() == "cpu" else "xla"
  return setting


def compiler_options(config, mesh: jax.sharding.Mesh) -> dict | None:
  """XLA options for a program compiled for `mesh`'s devices: config.tpu_compiler_options when
  they are TPUs (the option names are TPU-only), else None."""
  if mesh.devices.flat[0].platform != "tpu":
    return None
  return dict(config.get("tpu_compiler_options") or {}) or None


def batch_shards() -> int:
  """Devices the batch axis is split over in the program being traced (1 without a mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return 1
  shape = dict(mesh.shape)
  return shape.get("data", 1) * shape.get("fsdp", 1)


# ---------------------------------------------------------------------------------------------
# Projections, layer scan.
# ---------------------------------------------------------------------------------------------
def dense(x: jax.Array, w: jax.Array, n_in: int, kernels: str) -> jax.Array:
  """Contracts the last `n_in` axes of x with the first `n_in` axes of w (jnp.tensordot).

  "cpu": a 2-D matmul over flattened rows. Same maths; on XLA:CPU the weight gradient of an
  einsum over (b, l, d) contracts two axes and the compiler materialises transposed copies of the
  activations' gradient for it, while the flattened form's gradient is one plain matmul.
  """
  if kernels != "cpu":
    return jnp.tensordot(x, w, axes=n_in)
  with jax.named_scope(CPU_SCOPE):
    lead, i = x.shape[: x.ndim - n_in], math.prod(w.shape[:n_in])
    y = jnp.dot(x.reshape(-1, i), w.reshape(i, -1))
    return y.reshape(*lead, *w.shape[n_in:])


def scan_unroll(setting: int, n_layer: int, kernels: str) -> int:
  """The layer scan's unroll: `setting` layers per iteration, or 0 = auto: fully unrolled on CPU
  (XLA:CPU runs loop bodies slower than straight-line code), rolled elsewhere (compile time flat
  in depth; XLA's TPU/GPU schedulers overlap the next layer's weight gathers with the loop)."""
  if setting:
    return min(setting, n_layer)
  return n_layer if kernels == "cpu" else 1


# ---------------------------------------------------------------------------------------------
# Attention.
# ---------------------------------------------------------------------------------------------
def causal_attention(q_BxLxHxE: jax.Array, k_BxLxJxE: jax.Array, v_BxLxJxE: jax.Array,
                     kernels: str) -> jax.Array:
  """Causal softmax attention, attn_BxLxHxE; H may be a multiple of J (grouped-query attention).

  "xla": `jax.nn.dot_product_attention`. "cpu": the same maths written out (float32 scores,
  causal mask, softmax, weighted values); grouped-query heads are grouped rather than k/v
  repeated; for L >= 128 the queries are split in two halves and the first half only scores the
  first half of the keys, so the fully masked quarter of the scores is never computed.
  """
  if kernels != "cpu":
    return jax.nn.dot_product_attention(q_BxLxHxE, k_BxLxJxE, v_BxLxJxE, is_causal=True)
  with jax.named_scope(CPU_SCOPE):
    l = q_BxLxHxE.shape[1]
    if l < 128 or l % 2:
      return _causal_attention_block(q_BxLxHxE, k_BxLxJxE, v_BxLxJxE, 0)
    c = l // 2
    first = _causal_attention_block(q_BxLxHxE[:, :c], k_BxLxJxE[:, :c], v_BxLxJxE[:, :c], 0)
    second = _causal_attention_block(q_BxLxHxE[:, c:], k_BxLxJxE, v_BxLxJxE, c)
    return jnp.concatenate([first, second], axis=1)


def _causal_attention_block(q_BxLxHxE: jax.Array, k_BxMxJxE: jax.Array, v_BxMxJxE: jax.Array,
                            offset: int) -> jax.Array:
  """Attention of the L queries at positions offset.. to the M keys at positions 0..M-1."""
  b, l, h, e = q_BxLxHxE.shape
  m, j = k_BxMxJxE.shape[1], k_BxMxJxE.shape[2]
  # Plain multi-head attention keeps 4-D contractions (faster code than a size-1 group axis).
  q, qk, pv = ((q_BxLxHxE, "blhe,bmhe->bhlm", "bhlm,bmhe->blhe") if j == h else
               (q_BxLxHxE.reshape(b, l, j, h // j, e), "blhge,bmhe->bhglm", "bhglm,bmhe->blhge"))
  s = jnp.einsum(qk, q, k_BxMxJxE, preferred_element_type=jnp.float32)
  causal_LxM = np.arange(m)[None, :] <= offset + np.arange(l)[:, None]
  s = jnp.where(causal_LxM, s * np.float32(1.0 / math.sqrt(e)), -jnp.inf)
  probs = jax.nn.softmax(s, axis=-1).astype(v_BxMxJxE.dtype)
  return jnp.einsum(pv, probs, v_BxMxJxE).reshape(b, l, h, e)


# ---------------------------------------------------------------------------------------------
# The output layer fused with the patch loss.
# ---------------------------------------------------------------------------------------------
def output_patch_loss(h_BxPxD: jax.Array, w_DxV: jax.Array, targets_BxPxK: jax.Array, *,
                      kernels: str, chunks: int | None = None) -> jax.Array:
  """`patching.patch_loss(h @ w, targets)`, fused with the output projection.

  Same value and gradients as the unfused form (tested). Logits are accumulated in float32
  whatever the dtype of h and w.

  Args:
    h_BxPxD: final-normed hidden states, in the compute dtype.
    w_DxV: the output projection.
    targets_BxPxK: `patching.group_targets` of the codes.
    kernels: the resolved kernel set; it picks the automatic chunk count.
    chunks: split the P positions into this many chunks (a divisor of P). 1: one pass; the
      backward materialises the B*P x V logits' gradient once and feeds both matmuls in layouts
      that need no transposed copy. > 1: a loop over chunks that, when differentiated, computes
      each chunk's logits, softmax and gradients together (gradients in the forward pass, the
      backward only scales them): the B*P x V logits are never held at once. None: auto
      (`auto_loss_chunks`).

  Returns:
    The scalar float32 loss.
  """
  b, p = h_BxPxD.shape[:2]
  if chunks is None:
    chunks = auto_loss_chunks(b, p, w_DxV.shape[-1], kernels)
  if chunks < 1 or p % chunks:
    raise ValueError(f"output_patch_loss: chunks={chunks} must be a divisor of P={p}.")
  if chunks == 1:
    return _output_patch_loss(h_BxPxD, w_DxV, targets_BxPxK)
  return _chunked_output_patch_loss(chunks, h_BxPxD, w_DxV, targets_BxPxK)


def auto_loss_chunks(batch: int, positions: int, vocab: int, kernels: str) -> int:
  """Chunks for `output_patch_loss`: halve P while one chunk's float32 logits on one device
  exceed the kernel set's budget (a CPU cache, or a memory bound on accelerators)."""
  limit = CPU_LOSS_CHUNK_BYTES if kernels == "cpu" else XLA_LOSS_CHUNK_BYTES
  rows = max(batch // batch_shards(), 1)
  chunks = 1
  while positions % (2 * chunks) == 0 and rows * (positions // chunks) * vocab * 4 > limit:
    chunks *= 2
  return chunks


@jax.custom_vjp
def _output_patch_loss(h_BxPxD, w_DxV, targets_BxPxK):
  return _output_patch_loss_fwd(h_BxPxD, w_DxV, targets_BxPxK)[0]


def _output_patch_loss_fwd(h_BxPxD, w_DxV, targets_BxPxK):
  logits = jnp.einsum("bld,dv->blv", h_BxPxD, w_DxV, preferred_element_type=jnp.float32)
  loss, (lse_BxP, targets) = patching.patch_loss_terms(logits, targets_BxPxK)
  return loss, (h_BxPxD, w_DxV, logits, lse_BxP, targets)


def _output_patch_loss_bwd(residuals, g):
  h, w, logits, lse_BxP, targets = residuals
  b, p, d = h.shape
  scale = g / (b * p * targets.shape[-1])
  d_logits = patching.patch_loss_logits_grad(logits, lse_BxP, targets, scale).reshape(b * p, -1)
  dh = jnp.dot(d_logits.astype(w.dtype), w.T, preferred_element_type=jnp.float32)
  dw = jnp.dot(h.reshape(b * p, d).T, d_logits.astype(h.dtype), preferred_element_type=jnp.float32)
  return dh.reshape(b, p, d).astype(h.dtype), dw.astype(w.dtype), None


_output_patch_loss.defvjp(_output_patch_loss_fwd, _output_patch_loss_bwd)


def _split_positions(x_BxPx_: jax.Array, chunks: int) -> jax.Array:
  """x_BxPx... -> x_Cx(B)x(P/C)x...: chunks over positions, so a batch-sharded x stays sharded."""
  b, p = x_BxPx_.shape[:2]
  x = x_BxPx_.reshape(b, chunks, p // chunks, *x_BxPx_.shape[2:])
  return jnp.swapaxes(x, 0, 1)


def _chunked_loss_and_grads(chunks, h_BxPxD, w_DxV, targets_BxPxK, with_grads):
  b, p, d = h_BxPxD.shape
  k = targets_BxPxK.shape[-1]
  scale = 1.0 / (b * p * k)
  hs = _split_positions(h_BxPxD, chunks)
  ts = _split_positions(targets_BxPxK.astype(jnp.int32), chunks)

  def body(carry, xs):
    # 2-D matmuls over the chunk's flattened rows: the fastest form on XLA:CPU, and the same
    # contraction for XLA's TPU/GPU compilers.
    h_RxD, t_RxK = xs[0].reshape(-1, d), xs[1].reshape(-1, k)
    logits_RxV = jnp.dot(h_RxD, w_DxV, preferred_element_type=jnp.float32)
    lse_R = jax.nn.logsumexp(logits_RxV, axis=-1)
    picked_RxK = jnp.take_along_axis(logits_RxV, t_RxK, axis=-1)
    ce = jnp.sum(lse_R[:, None] - picked_RxK)
    if not with_grads:
      return carry + ce, None
    total, dw_DxV = carry
    d_logits = patching.patch_loss_logits_grad(logits_RxV, lse_R, t_RxK, scale).astype(w_DxV.dtype)
    dh_RxD = jnp.dot(d_logits, w_DxV.T, preferred_element_type=jnp.float32)
    dw_DxV = dw_DxV + jnp.dot(h_RxD.T, d_logits, preferred_element_type=jnp.float32)
    return (total + ce, dw_DxV), dh_RxD.reshape(xs[0].shape).astype(h_BxPxD.dtype)

  if not with_grads:
    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (hs, ts))
    return total * scale
  init = (jnp.zeros((), jnp.float32), jnp.zeros(w_DxV.shape, jnp.float32))
  (total, dw_DxV), dhs = jax.lax.scan(body, init, (hs, ts))
  dh_BxPxD = jnp.swapaxes(dhs, 0, 1).reshape(h_BxPxD.shape)
  return total * scale, (dh_BxPxD, dw_DxV.astype(w_DxV.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunked_output_patch_loss(chunks, h_BxPxD, w_DxV, targets_BxPxK):
  return _chunked_loss_and_grads(chunks, h_BxPxD, w_DxV, targets_BxPxK, with_grads=False)


def _chunked_fwd(chunks, h_BxPxD, w_DxV, targets_BxPxK):
  return _chunked_loss_and_grads(chunks, h_BxPxD, w_DxV, targets_BxPxK, with_grads=True)


def _chunked_bwd(chunks, grads, g):
  del chunks
  dh, dw = grads
  return (dh * g).astype(dh.dtype), (dw * g).astype(dw.dtype), None


_chunked_output_patch_loss.defvjp(_chunked_fwd, _chunked_bwd)
