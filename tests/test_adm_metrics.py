"""The ADM evaluator's metric math (npp_jax.adm_metrics) against independent numpy/scipy
computations: FID (closed forms, eigenvalues, the eps retry), Inception Score, precision/recall
(brute force), pairwise distances."""
import warnings

from hypothesis import given, settings, strategies as st
import numpy as np
import pytest
from scipy import linalg, special

from naming import raises_naming
from npp_jax import adm_metrics as adm


def _random_cov(rng, d, n=None):
  x = rng.normal(size=(n or 4 * d, d)) @ rng.normal(size=(d, d))
  return np.cov(x, rowvar=False)


# ----------------------------------------------------------------------------- FID


def test_fid_of_identical_statistics_is_zero():
  rng = np.random.default_rng(0)
  feats = rng.normal(size=(200, 16)).astype(np.float32)
  mu, sigma = adm.compute_statistics(feats)
  np.testing.assert_allclose(mu, feats.mean(0), rtol=1e-6)
  np.testing.assert_allclose(sigma, np.cov(feats.astype(np.float64).T), rtol=1e-6)
  assert abs(adm.frechet_distance(mu, sigma, mu, sigma)) < 1e-8 * np.trace(sigma)


@settings(max_examples=30, deadline=None)
@given(d=st.integers(1, 12), seed=st.integers(0, 2**31 - 1))
def test_fid_of_diagonal_gaussians_has_closed_form(d, seed):
  rng = np.random.default_rng(seed)
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d) * 3
  s1, s2 = rng.uniform(0.1, 5, size=d), rng.uniform(0.1, 5, size=d)
  expected = np.sum((mu1 - mu2)**2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
  got = adm.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
  np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9)


@settings(max_examples=20, deadline=None)
@given(d=st.integers(2, 10), seed=st.integers(0, 2**31 - 1))
def test_fid_matches_eigenvalue_formula_and_is_symmetric(d, seed):
  rng = np.random.default_rng(seed)
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  s1, s2 = _random_cov(rng, d), _random_cov(rng, d)
  # tr sqrt(S1 S2) = sum sqrt(eig(S1^1/2 S2 S1^1/2)), a symmetric PSD matrix.
  r1 = linalg.sqrtm(s1).real
  eig = np.clip(linalg.eigvalsh(r1 @ s2 @ r1), 0, None)
  expected = np.sum((mu1 - mu2)**2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(eig))
  fd12 = adm.frechet_distance(mu1, s1, mu2, s2)
  fd21 = adm.frechet_distance(mu2, s2, mu1, s1)
  scale = np.trace(s1) + np.trace(s2)
  assert abs(fd12 - expected) < 1e-7 * scale
  assert abs(fd12 - fd21) < 1e-7 * scale


def test_fid_singular_product_retries_with_eps():
  # sqrtm of a nilpotent matrix is not finite; ADM then adds eps * I to both covariances.
  eps = 1e-6
  sigma1, sigma2 = np.array([[0., 1.], [0., 0.]]), np.eye(2)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # scipy's LinAlgWarning about the singular matrix.
    got = adm.frechet_distance(np.zeros(2), sigma1, np.zeros(2), sigma2, eps=eps)
  np.testing.assert_allclose(got, 2 - 4 * np.sqrt(eps * (1 + eps)), rtol=1e-9)


def test_fid_rejects_imaginary_root_and_mismatched_shapes():
  with pytest.raises(ValueError, match="imaginary"):
    adm.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), -np.eye(2))
  with raises_naming(ValueError, (2,), (3,)):  # the mean vectors' shapes
    adm.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
  with raises_naming(ValueError, (2, 2), (3, 3)):  # the covariances' shapes
    adm.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(3))


# ----------------------------------------------------------------------------- Inception Score


def test_inception_score_of_uniform_predictions_is_one():
  assert adm.inception_score(np.full((100, 10), 0.1)) == pytest.approx(1.0, abs=1e-12)
  assert adm.inception_score(np.zeros((7, 5)), from_logits=True) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("num_classes", [1, 3, 10])
def test_inception_score_of_evenly_spread_one_hot_is_num_classes(num_classes):
  probs = np.eye(num_classes)[np.arange(5 * num_classes) % num_classes]
  assert adm.inception_score(probs) == pytest.approx(num_classes, rel=1e-12)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 60), c=st.integers(2, 8), split=st.integers(1, 25),
       seed=st.integers(0, 2**31 - 1))
def test_inception_score_matches_kl_over_splits(n, c, split, seed):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(n, c)) * 3
  probs = special.softmax(logits, axis=1)
  scores = []
  for i in range(0, n, split):
    part = probs[i:i + split]
    kl = special.rel_entr(part, part.mean(0, keepdims=True)).sum(1)
    scores.append(np.exp(kl.mean()))
  got = adm.inception_score(probs, split_size=split)
  np.testing.assert_allclose(got, np.mean(scores), rtol=1e-10)
  np.testing.assert_allclose(adm.inception_score(logits, split, from_logits=True), got, rtol=1e-10)
  assert 1 - 1e-9 <= got <= c + 1e-9


# ----------------------------------------------------------------------------- precision / recall


def _brute_force_pr(ref, sample, k):
  def sq_dist(a, b):
    return ((a[:, None, :].astype(np.float64) - b[None, :, :])**2).sum(-1)
  radii_ref = np.sort(sq_dist(ref, ref), axis=1)[:, k]
  radii_sample = np.sort(sq_dist(sample, sample), axis=1)[:, k]
  d = sq_dist(ref, sample)
  precision = np.mean([(d[:, j] <= radii_ref).any() for j in range(len(sample))])
  recall = np.mean([(d[i, :] <= radii_sample).any() for i in range(len(ref))])
  return precision, recall


@settings(max_examples=40, deadline=None)
@given(m=st.integers(4, 30), n=st.integers(4, 30), d=st.integers(1, 6), k=st.integers(1, 3),
       row=st.integers(1, 12), col=st.integers(1, 12), shift=st.integers(0, 3),
       seed=st.integers(0, 2**31 - 1))
def test_precision_recall_matches_brute_force(m, n, d, k, row, col, shift, seed):
  # Small integer features make every float16 distance exact, so the comparison is exact.
  rng = np.random.default_rng(seed)
  ref = rng.integers(-4, 5, size=(m, d)).astype(np.float32)
  sample = (rng.integers(-4, 5, size=(n, d)) + shift).astype(np.float32)
  got = adm.precision_recall(ref, sample, k=k, row_batch_size=row, col_batch_size=col)
  assert got == pytest.approx(_brute_force_pr(ref, sample, k), abs=1e-12)


def test_precision_recall_of_identical_and_far_apart_sets():
  rng = np.random.default_rng(1)
  feats = rng.uniform(0, 2, size=(64, 32)).astype(np.float32)
  assert adm.precision_recall(feats, feats) == (1.0, 1.0)
  assert adm.precision_recall(feats, feats + 100, row_batch_size=16, col_batch_size=24) == (0., 0.)
  with raises_naming(ValueError, "k=3"):
    adm.precision_recall(feats[:3], feats)


def test_pairwise_distances_float16_and_float32_fallback():
  rng = np.random.default_rng(2)
  u, v = rng.uniform(0, 1, size=(20, 64)), rng.uniform(0, 1, size=(30, 64))
  exact = ((u[:, None] - v[None])**2).sum(-1)
  got = adm.pairwise_sq_distances(u, v)
  assert got.dtype == np.float32
  # float16 rounding (relative 2^-11 of the norms) is what ADM computes: close, not equal.
  np.testing.assert_allclose(got, exact, atol=0.1)
  assert not np.allclose(got, exact, atol=1e-4)
  # Norms over 65504 overflow float16, so the block is recomputed in float32.
  big_u, big_v = u * 100, v * 100
  exact_big = ((big_u[:, None] - big_v[None])**2).sum(-1)
  np.testing.assert_allclose(adm.pairwise_sq_distances(big_u, big_v), exact_big, rtol=1e-4)
