"""The ADM evaluator's metric math on Inception features, in numpy/scipy (no TensorFlow).

Owns the Gaussian statistics and Frechet distance (FID, sFID), the Inception Score over splits,
and k-NN manifold precision/recall, each as OpenAI's guided-diffusion `evaluations/evaluator.py`
computes them (see `npp_jax.evaluate` for the features and the CLI).

Shape legend: N sample features, M reference features, D feature width, C classes.
"""
from __future__ import annotations

from absl import logging
import numpy as np
from scipy import linalg


# ----------------------------------------------------------------------------- statistics, FID


def compute_statistics(feats_NxD: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Gaussian statistics of features as ADM computes them.

  Args:
    feats_NxD: one feature vector per image (N >= 2).

  Returns:
    (mu_D, sigma_DxD): `np.mean(axis=0)` (in the features' dtype) and `np.cov(rowvar=False)`.
  """
  feats_NxD = np.asarray(feats_NxD)
  if feats_NxD.ndim != 2 or feats_NxD.shape[0] < 2:
    raise ValueError(f"features must be N x D with N >= 2, got shape {feats_NxD.shape}.")
  return np.mean(feats_NxD, axis=0), np.cov(feats_NxD, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
  """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), exactly as ADM computes it.

  ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrtm(sigma1 sigma2)). When the matrix square
  root is not finite, eps * I is added to both covariances and it is retried. A complex square
  root is replaced by its real part unless its diagonal has an imaginary part above 1e-3.

  Args:
    mu1, mu2: means, shape D.
    sigma1, sigma2: covariances, shape D x D.
    eps: diagonal offset of the retry.

  Returns:
    The distance (FID for pool features, sFID for spatial features).

  Raises:
    ValueError: on mismatched shapes, non-finite inputs, or a square root that stays non-finite
      after the retry or has a large imaginary part.
  """
  mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
  sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
  if mu1.shape != mu2.shape:
    raise ValueError(f"Mean vectors have different shapes: {mu1.shape} vs {mu2.shape}.")
  if sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise ValueError(f"Covariances have shapes {sigma1.shape} and {sigma2.shape}; "
                     f"expected {mu1.shape * 2} for means of shape {mu1.shape}.")
  # Without this, a NaN mean gives a NaN distance and a NaN covariance a LinAlgError in sqrtm.
  for name, a in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
    bad = a.size - np.count_nonzero(np.isfinite(a))
    if bad:
      raise ValueError(f"Frechet distance: {name} has {bad} non-finite value(s).")
  diff = mu1 - mu2
  # ADM passes disp=False, which only silences a printed warning; SciPy 1.16 deprecated it.
  covmean = linalg.sqrtm(sigma1.dot(sigma2))
  if not np.isfinite(covmean).all():
    logging.warning("fid calculation produces singular product; adding %s to diagonal of cov "
                    "estimates", eps)
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if not np.isfinite(covmean).all():  # ADM would return NaN here.
      raise ValueError(f"Frechet distance: sqrtm(sigma1 sigma2) is not finite even with {eps} "
                       f"added to the diagonals (are the covariances PSD?).")
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f"Frechet distance: sqrtm(sigma1 sigma2) has an imaginary component "
                       f"{np.max(np.abs(covmean.imag))} (are the covariances PSD?).")
    covmean = covmean.real
  return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


# ----------------------------------------------------------------------------- Inception Score


def softmax(logits_NxC: np.ndarray) -> np.ndarray:
  """Numerically stable softmax over the last axis, in the logits' dtype."""
  z = logits_NxC - np.max(logits_NxC, axis=-1, keepdims=True)
  e = np.exp(z)
  return e / np.sum(e, axis=-1, keepdims=True)


def inception_score(probs_NxC: np.ndarray, split_size: int = 5000, *,
                    from_logits: bool = False) -> float:
  """ADM's Inception Score: the mean over consecutive splits of exp(E_x KL(p(y|x) || p(y))).

  Args:
    probs_NxC: class probabilities per image (or logits with `from_logits=True`).
    split_size: images per split (the last split may be shorter, as in ADM).
    from_logits: apply a softmax first.

  Returns:
    The score, between 1 and C.
  """
  probs_NxC = np.asarray(probs_NxC)
  if probs_NxC.ndim != 2 or probs_NxC.shape[0] == 0:
    raise ValueError(f"predictions must be N x C with N >= 1, got shape {probs_NxC.shape}.")
  if from_logits:
    probs_NxC = softmax(probs_NxC)
  scores = []
  for i in range(0, len(probs_NxC), split_size):
    part = probs_NxC[i:i + split_size]
    with np.errstate(divide="ignore", invalid="ignore"):
      kl = part * (np.log(part) - np.log(np.mean(part, 0, keepdims=True)))
    # 0 log 0 = 0. ADM gets NaN there; with Inception's softmax no probability is exactly 0,
    # so this only matters for synthetic one-hot predictions.
    kl = np.where(part > 0, kl, 0)
    scores.append(np.exp(np.mean(np.sum(kl, 1))))
  return float(np.mean(scores))


# ----------------------------------------------------------------------------- precision / recall


def _sq_distances_f16(u_NxD: np.ndarray, v_MxD: np.ndarray) -> np.ndarray:
  """ADM's float16 graph: max(|u|^2 - 2 u.v + |v|^2, 0), every op rounded to float16.

  Sums and the matmul accumulate in float32 (as TF's half reductions and GEMMs do) and round
  their result to float16; elementwise ops are numpy float16 ops (computed in float, rounded).
  """
  u16, v16 = u_NxD.astype(np.float16), v_MxD.astype(np.float16)
  norm_u = np.sum(np.square(u16), axis=1, dtype=np.float32).astype(np.float16)
  norm_v = np.sum(np.square(v16), axis=1, dtype=np.float32).astype(np.float16)
  uv = (u16.astype(np.float32) @ v16.astype(np.float32).T).astype(np.float16)
  d = norm_u[:, None] - np.float16(2) * uv
  d += norm_v[None, :]
  return np.maximum(d, np.float16(0))


def pairwise_sq_distances(u_NxD: np.ndarray, v_MxD: np.ndarray) -> np.ndarray:
  """Squared Euclidean distances of one ADM distance block, float32 N x M.

  Computed in float16 as ADM does, and recomputed in float32 if any float16 value is not finite.
  """
  with np.errstate(over="ignore", invalid="ignore"):
    d_NxM = _sq_distances_f16(u_NxD, v_MxD)
    if np.isfinite(d_NxM).all():
      return d_NxM.astype(np.float32)
  u32, v32 = u_NxD.astype(np.float32), v_MxD.astype(np.float32)
  norm_u = np.sum(np.square(u32), axis=1)
  norm_v = np.sum(np.square(v32), axis=1)
  return np.maximum(norm_u[:, None] - 2 * (u32 @ v32.T) + norm_v[None, :], np.float32(0))


def manifold_radii(feats_NxD: np.ndarray, k: int = 3, row_batch_size: int = 10000,
                   col_batch_size: int = 10000) -> np.ndarray:
  """Squared distance of every feature to its k-th nearest neighbour (itself counting as 0th).

  ADM partitions a full row of distances; the k-th smallest of a row equals the k-th smallest of
  the k+1 smallest of each column block, so only those are kept (less memory, same values).

  Returns:
    radii_N, float32.
  """
  n = len(feats_NxD)
  if n <= k:
    raise ValueError(f"precision/recall with k={k} needs more than {k} feature vectors, got {n}.")
  radii_N = np.empty([n], np.float32)
  for r0 in range(0, n, row_batch_size):
    rows = feats_NxD[r0:r0 + row_batch_size]
    candidates = []
    for c0 in range(0, n, col_batch_size):
      d = pairwise_sq_distances(rows, feats_NxD[c0:c0 + col_batch_size])
      if d.shape[1] > k + 1:
        d = np.partition(d, k, axis=1)[:, :k + 1]
      candidates.append(d)
    radii_N[r0:r0 + len(rows)] = np.partition(np.concatenate(candidates, axis=1), k, axis=1)[:, k]
  return radii_N


def precision_recall(ref_feats_MxD: np.ndarray, sample_feats_NxD: np.ndarray, k: int = 3,
                     row_batch_size: int = 10000, col_batch_size: int = 10000
                     ) -> tuple[float, float]:
  """ADM's improved precision and recall (Kynkaanniemi et al. 2019) with k-NN manifolds.

  Precision: fraction of samples inside some reference ball (radius = squared distance of the
  reference point to its k-th neighbour). Recall: fraction of references inside some sample ball.
  A point is inside when its squared distance is <= the radius.

  Args:
    ref_feats_MxD: reference pool features.
    sample_feats_NxD: sample pool features.
    k: neighbourhood size (ADM: 3).
    row_batch_size, col_batch_size: distance block sizes (ADM: 10000; they set which blocks fall
      back to float32, so keep ADM's values to reproduce its numbers).

  Returns:
    (precision, recall).
  """
  ref_feats_MxD, sample_feats_NxD = np.asarray(ref_feats_MxD), np.asarray(sample_feats_NxD)
  if ref_feats_MxD.ndim != 2 or ref_feats_MxD.shape[1:] != sample_feats_NxD.shape[1:]:
    raise ValueError(f"reference and sample features must be M x D and N x D, got "
                     f"{ref_feats_MxD.shape} and {sample_feats_NxD.shape}.")
  radii_ref_M = manifold_radii(ref_feats_MxD, k, row_batch_size, col_batch_size)
  radii_sample_N = manifold_radii(sample_feats_NxD, k, row_batch_size, col_batch_size)
  ref_in_M = np.zeros([len(ref_feats_MxD)], bool)
  sample_in_N = np.zeros([len(sample_feats_NxD)], bool)
  for r0 in range(0, len(ref_feats_MxD), row_batch_size):
    r1 = r0 + row_batch_size
    for c0 in range(0, len(sample_feats_NxD), col_batch_size):
      c1 = c0 + col_batch_size
      d = pairwise_sq_distances(ref_feats_MxD[r0:r1], sample_feats_NxD[c0:c1])
      ref_in_M[r0:r1] |= np.any(d <= radii_sample_N[None, c0:c1], axis=1)
      sample_in_N[c0:c1] |= np.any(d <= radii_ref_M[r0:r1, None], axis=0)
  return float(np.mean(sample_in_N)), float(np.mean(ref_in_M))
