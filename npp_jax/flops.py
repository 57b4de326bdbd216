"""Analytic model FLOPs of the programs a run executes (for MFU and the roofline estimate).

Convention (PaLM's MFU): matmul FLOPs only, 2 per multiply-add; attention scores and weighted
values counted over the full L x L square (no causal halving); a training step is 3x the forward
pass (forward + backward); remat recomputation is not counted (it is not model work). Embedding
lookups, patch averaging, norms and the softmax are left out (< 1% at these sizes).
"""
from __future__ import annotations

from npp_jax import model as model_lib


def _layer_matmul_params(cfg: model_lib.ModelConfig) -> int:
  d, e = cfg.dim, cfg.head_dim
  attn = d * cfg.n_head * e + 2 * d * cfg.kv_heads * e + cfg.n_head * e * d
  return attn + 3 * d * cfg.ffn_dim


def forward_flops_per_image(cfg: model_lib.ModelConfig, patch_size: int = 1) -> float:
  """Forward-pass FLOPs of one image at patch side `patch_size` (L = N / p^2 positions)."""
  length = cfg.num_tokens // (patch_size * patch_size)
  per_position = 2 * (cfg.n_layer * _layer_matmul_params(cfg) + cfg.dim * cfg.vocab_size)
  attention = cfg.n_layer * 4 * length * length * cfg.n_head * cfg.head_dim
  return float(length * per_position + attention)


def train_flops_per_image(cfg: model_lib.ModelConfig, patch_size: int) -> float:
  """FLOPs of one image in a training step (forward + backward = 3x forward)."""
  return 3.0 * forward_flops_per_image(cfg, patch_size)


def sample_flops_per_image(cfg: model_lib.ModelConfig, *, cfg_rows: int = 2) -> float:
  """FLOPs of sampling one image token by token with a KV cache: `cfg_rows` rows (2 with
  classifier-free guidance) through every layer at each of the N positions, attention over the
  prefix, and the output layer once per image row (guidance combines before it)."""
  n, layers = cfg.num_tokens, cfg.n_layer
  per_row = n * 2 * layers * _layer_matmul_params(cfg)
  attention = layers * 4 * cfg.n_head * cfg.head_dim * (n * (n + 1) // 2)
  return float(cfg_rows * (per_row + attention) + n * 2 * cfg.dim * cfg.vocab_size)
