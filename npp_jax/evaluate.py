"""ADM evaluator metrics (FID, sFID, Inception Score, precision/recall) on Inception features.

Owns a faithful reimplementation of OpenAI's ADM evaluator (guided-diffusion
`evaluations/evaluator.py`, copied unchanged into LlamaGen and NPP) with TF2 APIs only:

- features from `classify_image_graph_def.pb`: float32 images in [0, 255] fed at `ExpandDims:0`,
  pool features `pool_3:0` (2048-d), spatial features `mixed_6/conv:0[..., :7]` flattened, and
  class probabilities softmax(pool @ W) where W is the weight input of `softmax/logits/MatMul`
  (no bias, as in ADM);
- statistics (mean, `np.cov(rowvar=False)`), taken from the npz (`mu, sigma, mu_s, sigma_s`) when
  it carries them, as the ADM reference batches do;
- Frechet distance with `scipy.linalg.sqrtm` and ADM's eps retry;
- Inception Score over splits of 5000;
- k-NN (k=3) manifold precision/recall with 10000 x 10000 distance blocks whose squared distances
  are computed in float16 and recomputed in float32 when a block is not finite.

TensorFlow is imported lazily, inside `FeatureExtractor` only; the metric math
(`npp_jax.adm_metrics`) is numpy/scipy, so it runs on any features. The .pb is parsed as a protobuf (no code runs when it is loaded).

    python -m npp_jax.evaluate VIRTUAL_imagenet256_labeled.npz samples.npz \
        --inception=classify_image_graph_def.pb

prints the metrics like ADM and writes `samples.txt` and `samples.json` next to `samples.npz`.

Shape legend: N sample images, M reference images, H, W image size, D pool width (2048),
S spatial width (17*17*7), C classes (1008).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import zipfile
import zlib
from typing import Any, Iterator, Protocol

from absl import logging
import numpy as np

from npp_jax.adm_metrics import (compute_statistics, frechet_distance, inception_score,
                                 precision_recall)

INPUT_TENSOR = "ExpandDims:0"
POOL_TENSOR = "pool_3:0"
SPATIAL_TENSOR = "mixed_6/conv:0"
SOFTMAX_MATMUL = "softmax/logits/MatMul"
SPATIAL_CHANNELS = 7
STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
PR_K = 3  # ADM's k for the k-NN manifolds of precision/recall.
# Precision/recall needs more than k images in each batch (a covariance needs only 2).
MIN_IMAGES = PR_K + 1
# What numpy and zipfile raise on a damaged member (bad CRC, bad deflate stream, bad npy header).
_CORRUPT_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, ValueError)


# ----------------------------------------------------------------------------- Inception network


def load_graph_def(pb_path: str):
  """Parses `classify_image_graph_def.pb` and checks that ADM's tensors are in it.

  Returns:
    A `GraphDef` protobuf.
  """
  from tensorflow.core.framework import graph_pb2  # pylint: disable=g-import-not-at-top

  if not os.path.isfile(pb_path):
    raise FileNotFoundError(f"Inception graph not found: {pb_path} (download "
                            "classify_image_graph_def.pb from openaipublic, see README).")
  graph_def = graph_pb2.GraphDef()
  with open(pb_path, "rb") as f:
    try:
      graph_def.ParseFromString(f.read())
    except Exception as e:  # protobuf raises its own DecodeError.
      raise ValueError(f"{pb_path} is not a TensorFlow GraphDef protobuf: {e}") from e
  names = {node.name for node in graph_def.node}
  required = [INPUT_TENSOR, POOL_TENSOR, SPATIAL_TENSOR, SOFTMAX_MATMUL]
  missing = [t for t in required if t.split(":")[0] not in names]
  if missing:
    raise ValueError(f"{pb_path} lacks the Inception tensor(s) {missing} that the ADM evaluator "
                     f"reads; is it classify_image_graph_def.pb?")
  return graph_def


class FeatureExtractor:
  """ADM's Inception features from `classify_image_graph_def.pb`, with TF2 (no compat.v1).

  The GraphDef is imported inside a `tf.function` with `ExpandDims:0` mapped to a batch of images;
  the function runs only the ops its outputs need, so the graph's JPEG-decoding head and its
  batch-1 softmax head stay idle.
  """

  def __init__(self, pb_path: str, batch_size: int = 64):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    if batch_size < 1:
      raise ValueError(f"batch_size={batch_size} must be positive.")
    graph_def = load_graph_def(pb_path)
    self.pb_path = pb_path
    self.batch_size = batch_size

    def features(images_NxHxWx3):
      pool, spatial, matmul = tf.graph_util.import_graph_def(
          graph_def, input_map={INPUT_TENSOR: images_NxHxWx3},
          return_elements=[POOL_TENSOR, SPATIAL_TENSOR, SOFTMAX_MATMUL], name="inception")
      n = tf.shape(images_NxHxWx3)[0]
      pool_NxD = tf.reshape(pool, [n, -1])
      spatial_NxS = tf.reshape(spatial[..., :SPATIAL_CHANNELS], [n, -1])
      # ADM: softmax(pool @ W) with the MatMul's weight input; the graph's own head is batch-1.
      logits_NxC = tf.matmul(pool_NxD, matmul.inputs[1])
      return pool_NxD, spatial_NxS, tf.nn.softmax(logits_NxC)

    spec = tf.TensorSpec([None, None, None, 3], tf.float32)
    try:
      self._features = tf.function(features).get_concrete_function(spec)
    except (ValueError, TypeError) as e:
      raise ValueError(f"Cannot build ADM features from {pb_path}: {e}") from e
    self._tf = tf

  def features(self, images_NxHxWx3: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features of uint8 images, computed in batches of `batch_size` as float32 in [0, 255].

    Returns:
      (pool_NxD, spatial_NxS, probs_NxC), float32.
    """
    images_NxHxWx3 = np.asarray(images_NxHxWx3)
    _check_images(images_NxHxWx3.dtype, images_NxHxWx3.shape, "images")
    outs = [[], [], []]
    for i in range(0, len(images_NxHxWx3), self.batch_size):
      x = self._tf.constant(images_NxHxWx3[i:i + self.batch_size].astype(np.float32))
      for out, y in zip(outs, self._features(x)):
        out.append(y.numpy())
    pool, spatial, probs = (np.concatenate(o, axis=0) for o in outs)
    return pool, spatial, probs


# ----------------------------------------------------------------------------- npz input


def _check_images(dtype, shape, what: str) -> None:
  if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or min(shape[:3]) < 1:
    raise ValueError(f"{what}: images must be uint8 N x H x W x 3 with N, H, W >= 1, "
                     f"got {np.dtype(dtype).name} {tuple(shape)}.")


def _check_npz_path(path: str) -> None:
  if os.path.isdir(path):
    raise IsADirectoryError(f"npz path is a directory, not a file: {path}")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"npz file not found: {path}")


@contextlib.contextmanager
def _reading(path: str, key: str):
  """Re-raises a damaged member's error (which names neither) with the npz path and the key."""
  try:
    yield
  except _CORRUPT_ERRORS as e:
    raise ValueError(f"{path}: cannot read {key!r} (member {key}.npy), the npz is damaged or "
                     f"not written by np.savez: {e}") from e


class NpzImages:
  """The `arr_0` images of an ADM-format npz, validated up front and streamed in batches.

  Streaming reads the array member of the zip directly, so 50k 256x256 images (9.8 GB) are never
  in memory at once. Works for `np.savez` and `np.savez_compressed` files.
  """

  def __init__(self, path: str):
    self.path = path
    _check_npz_path(path)
    try:
      with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    except zipfile.BadZipFile as e:
      raise ValueError(f"{path} is not an .npz (zip) file: {e}") from e
    if "arr_0.npy" not in names:
      keys = [n[:-4] for n in names if n.endswith(".npy")]
      raise ValueError(f"{path} has no 'arr_0' array of images (keys: {keys}).")
    with _reading(path, "arr_0"), zipfile.ZipFile(path) as zf, zf.open("arr_0.npy") as f:
      self.shape, fortran_order, dtype = _read_npy_header(f)
    _check_images(dtype, self.shape, f"{path} arr_0")
    self._streamable = not fortran_order

  def __len__(self) -> int:
    return self.shape[0]

  def batches(self, batch_size: int) -> Iterator[np.ndarray]:
    """Yields uint8 arrays of at most `batch_size` images, in order."""
    if not self._streamable:
      with _reading(self.path, "arr_0"), np.load(self.path, allow_pickle=False) as npz:
        images = npz["arr_0"]
      for i in range(0, len(images), batch_size):
        yield images[i:i + batch_size]
      return
    row = int(np.prod(self.shape[1:]))
    with zipfile.ZipFile(self.path) as zf, zf.open("arr_0.npy") as f:
      with _reading(self.path, "arr_0"):
        _read_npy_header(f)
      for i in range(0, self.shape[0], batch_size):
        bs = min(batch_size, self.shape[0] - i)
        # A bad CRC shows only when the member's last byte is read, i.e. in the last batch.
        with _reading(self.path, "arr_0"):
          data = f.read(bs * row)
        if len(data) != bs * row:
          raise ValueError(f"{self.path}: arr_0 is truncated at image {i}.")
        yield np.frombuffer(data, np.uint8).reshape((bs, *self.shape[1:]))


def _read_npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
  """(shape, fortran_order, dtype) of an .npy stream, leaving `f` at the start of the data."""
  version = np.lib.format.read_magic(f)
  if version == (1, 0):
    return np.lib.format.read_array_header_1_0(f)
  # Versions 2.0 and 3.0 share the layout (3.0 only allows utf-8 field names).
  return np.lib.format.read_array_header_2_0(f)


def read_statistics(path: str) -> tuple[tuple[np.ndarray, np.ndarray],
                                        tuple[np.ndarray, np.ndarray]] | None:
  """Precomputed ((mu_D, sigma_DxD), (mu_s_S, sigma_s_SxS)) of an npz, or None without `mu` (ADM).

  Raises:
    ValueError naming the file and the key when a statistic is missing, unreadable, not a
    numeric (float or integer) array, misshapen, not finite, or a sigma is not symmetric with a
    non-negative diagonal. Integer statistics are returned as float64.
  """
  _check_npz_path(path)
  if not zipfile.is_zipfile(path):
    raise ValueError(f"{path} is not an .npz (zip) file.")
  with np.load(path, allow_pickle=False) as npz:
    if "mu" not in npz.files:
      return None
    missing = [k for k in STAT_KEYS if k not in npz.files]
    if missing:
      raise ValueError(f"{path} has 'mu' but lacks the statistics {missing}.")
    arrays = {}
    for key in STAT_KEYS:
      with _reading(path, key):
        arrays[key] = npz[key]
  return (_valid_stats(path, arrays, "mu", "sigma"), _valid_stats(path, arrays, "mu_s", "sigma_s"))


def _valid_stats(path: str, arrays: dict[str, np.ndarray], mu_key: str, sigma_key: str
                 ) -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) of `arrays`, checked as a Gaussian's statistics (see `read_statistics`)."""
  for key in (mu_key, sigma_key):
    a = arrays[key]
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
      raise ValueError(f"{path}: {key!r} must be a float or integer array, got dtype {a.dtype}.")
    if np.issubdtype(a.dtype, np.integer):
      arrays[key] = a.astype(np.float64)
  mu, sigma = arrays[mu_key], arrays[sigma_key]
  if mu.ndim != 1 or sigma.shape != mu.shape * 2:
    raise ValueError(f"{path}: {mu_key!r} and {sigma_key!r} must be D and D x D, got shapes "
                     f"{mu.shape} and {sigma.shape}.")
  for key, a in ((mu_key, mu), (sigma_key, sigma)):
    bad = a.size - np.count_nonzero(np.isfinite(a))
    if bad:
      raise ValueError(f"{path}: {key!r} has {bad} non-finite value(s) (NaN or inf).")
  # A covariance is symmetric with non-negative variances; anything else makes sqrtm meaningless.
  asym = float(np.max(np.abs(sigma - sigma.T), initial=0))
  if asym > 1e-5 * float(np.max(np.abs(sigma), initial=0)):
    raise ValueError(f"{path}: {sigma_key!r} is not symmetric (max |sigma - sigma^T| = "
                     f"{asym:.3g}), so it is not a covariance.")
  negative = np.count_nonzero(np.diagonal(sigma) < 0)
  if negative:
    raise ValueError(f"{path}: {sigma_key!r} has {negative} negative diagonal values (variances), "
                     f"so it is not a covariance.")
  return mu, sigma


class Extractor(Protocol):
  """What `evaluate` needs of a feature extractor (`FeatureExtractor` or a test double)."""

  def features(self, images_NxHxWx3: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ...


def npz_features(images: NpzImages, extractor: Extractor, batch_size: int = 64
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(pool_NxD, spatial_NxS, probs_NxC) of every image of an npz, read `batch_size` at a time."""
  outs = [[], [], []]
  num_batches = -(-len(images) // batch_size)
  for b, batch in enumerate(images.batches(batch_size)):
    for out, y in zip(outs, extractor.features(batch)):
      out.append(y)
    if (b + 1) % 100 == 0 or b + 1 == num_batches:
      logging.info("%s: %d/%d batches", images.path, b + 1, num_batches)
  pool, spatial, probs = (np.concatenate(o, axis=0) for o in outs)
  return pool, spatial, probs


def _check_stats(stats, dim: int, path: str, keys: str) -> None:
  mu, sigma = stats
  if np.shape(mu) != (dim,) or np.shape(sigma) != (dim, dim):
    raise ValueError(f"{path}: statistics {keys} have shapes {np.shape(mu)}, {np.shape(sigma)} "
                     f"but the Inception features are {dim}-d.")


def open_batch(path: str) -> tuple[NpzImages, tuple[tuple[np.ndarray, np.ndarray],
                                                    tuple[np.ndarray, np.ndarray]] | None]:
  """The images and the validated precomputed statistics (or None) of an ADM batch npz.

  Everything that can be checked without the Inception network is checked here, so a bad file
  fails before the slow pass: path, zip, `arr_0` header, image count (at least `MIN_IMAGES`)
  and the statistics (`read_statistics`).
  """
  images = NpzImages(path)
  if len(images) < MIN_IMAGES:
    raise ValueError(f"{path}: 'arr_0' holds {len(images)} image(s), but the ADM metrics need at "
                     f"least {MIN_IMAGES}: precision/recall with k={PR_K} needs more than {PR_K} "
                     f"images per batch (and a covariance at least 2).")
  return images, read_statistics(path)


def _check_finite(path: str, what: str, **arrays: np.ndarray) -> None:
  for name, a in arrays.items():
    bad = np.size(a) - np.count_nonzero(np.isfinite(a))
    if bad:
      raise ValueError(f"{path}: {what} {name!r} has {bad} non-finite value(s).")


def evaluate(ref_npz: str, sample_npz: str, extractor: Extractor, *, batch_size: int = 64
             ) -> dict[str, float | int]:
  """Scores a sample npz against a reference npz exactly as ADM's evaluator does.

  Pool and spatial statistics come from each npz's `mu, sigma, mu_s, sigma_s` when present (the
  ADM reference batches carry them) and from its features otherwise. The reference images are
  still run through the network: precision/recall needs their pool features.

  Args:
    ref_npz: reference batch, e.g. `VIRTUAL_imagenet256_labeled.npz`.
    sample_npz: samples, `arr_0` uint8 N x H x W x 3.
    extractor: a `FeatureExtractor` (or anything with the same `features` method).
    batch_size: images read from the npz and passed to the extractor at a time.

  Returns:
    {'inception_score', 'fid', 'sfid', 'precision', 'recall', 'num_samples', 'num_ref'}, all
    finite.

  Raises:
    ValueError naming the npz (and its key) for a bad input: before the Inception pass for
    anything `open_batch` checks, during it for a damaged `arr_0` whose CRC only fails at its end;
    also for non-finite features or metrics.
  """
  ref_images, ref_stats = open_batch(ref_npz)
  sample_images, sample_stats = open_batch(sample_npz)
  ref_pool, ref_spatial, _ = npz_features(ref_images, extractor, batch_size)
  sample_pool, sample_spatial, sample_probs = npz_features(sample_images, extractor, batch_size)
  _check_finite(ref_npz, "Inception features", pool=ref_pool, spatial=ref_spatial)
  _check_finite(sample_npz, "Inception features", pool=sample_pool, spatial=sample_spatial,
                probs=sample_probs)
  for path, stats, pool, spatial in ((ref_npz, ref_stats, ref_pool, ref_spatial),
                                     (sample_npz, sample_stats, sample_pool, sample_spatial)):
    if stats is not None:
      _check_stats(stats[0], pool.shape[1], path, "(mu, sigma)")
      _check_stats(stats[1], spatial.shape[1], path, "(mu_s, sigma_s)")
  if ref_stats is None:
    ref_stats = compute_statistics(ref_pool), compute_statistics(ref_spatial)
  if sample_stats is None:
    sample_stats = compute_statistics(sample_pool), compute_statistics(sample_spatial)
  precision, recall = precision_recall(ref_pool, sample_pool, k=PR_K)
  metrics = {
      "inception_score": inception_score(sample_probs),
      "fid": frechet_distance(*sample_stats[0], *ref_stats[0]),
      "sfid": frechet_distance(*sample_stats[1], *ref_stats[1]),
      "precision": precision,
      "recall": recall,
  }
  # A NaN score must never be printed or written as a result.
  bad = [k for k, v in metrics.items() if not np.isfinite(v)]
  if bad:
    raise ValueError(f"Metrics {bad} of {sample_npz} against {ref_npz} are not finite: {metrics}.")
  return {**metrics, "num_samples": len(sample_images), "num_ref": len(ref_images)}


def format_metrics(metrics: dict[str, Any]) -> str:
  """The lines ADM prints."""
  return "\n".join([f"Inception Score: {metrics['inception_score']}",
                    f"FID: {metrics['fid']}",
                    f"sFID: {metrics['sfid']}",
                    f"Precision: {metrics['precision']}",
                    f"Recall: {metrics['recall']}"])


def main(argv: list[str] | None = None) -> dict[str, Any]:
  """CLI: scores SAMPLES.npz against REF.npz and writes SAMPLES.txt and SAMPLES.json."""
  parser = argparse.ArgumentParser(prog="python -m npp_jax.evaluate",
                                   description="ADM evaluator: IS, FID, sFID, precision, recall.")
  parser.add_argument("ref_batch", help="reference batch npz, e.g. VIRTUAL_imagenet256_labeled.npz")
  parser.add_argument("sample_batch", help="sample npz (arr_0: uint8 N x H x W x 3)")
  parser.add_argument("--inception", required=True, help="path to classify_image_graph_def.pb")
  parser.add_argument("--batch_size", type=int, default=64, help="images per forward pass")
  args = parser.parse_args(argv)
  logging.set_verbosity(logging.INFO)
  for path in (args.ref_batch, args.sample_batch):
    open_batch(path)  # Fails on a bad npz before the slow graph import.
  extractor = FeatureExtractor(args.inception, batch_size=args.batch_size)
  metrics = evaluate(args.ref_batch, args.sample_batch, extractor, batch_size=args.batch_size)
  text = format_metrics(metrics)
  print(text)
  stem = os.path.splitext(args.sample_batch)[0]
  with open(stem + ".txt", "w") as f:
    f.write(text + "\n")
  with open(stem + ".json", "w") as f:
    json.dump({"ref_batch": args.ref_batch, "sample_batch": args.sample_batch, **metrics}, f,
              indent=2, allow_nan=False)  # `evaluate` already rejects NaN; JSON has none.
  return metrics


if __name__ == "__main__":
  main()
