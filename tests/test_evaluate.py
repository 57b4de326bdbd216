"""Tests of npp_jax.evaluate: npz input checks (every bad input named by file and key before the
Inception pass), and the TF2 feature path end to end on a tiny fake Inception GraphDef. The
metric math is tested in test_adm_metrics.py."""
import json
import os
import zipfile

import numpy as np
import pytest
from scipy import special

from naming import raises_naming
from npp_jax import adm_metrics as adm
from npp_jax import evaluate as ev


# ----------------------------------------------------------------------------- npz input


def _images(rng, n, h=12, w=10):
  return rng.integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_images_stream_in_batches(tmp_path, save):
  images = _images(np.random.default_rng(3), 11)
  path = str(tmp_path / "s.npz")
  save(path, images, np.arange(11))
  reader = ev.NpzImages(path)
  assert len(reader) == 11 and reader.shape == images.shape
  batches = list(reader.batches(4))
  assert [len(b) for b in batches] == [4, 4, 3]
  np.testing.assert_array_equal(np.concatenate(batches), images)


def test_npz_bad_inputs_name_the_file(tmp_path):
  rng = np.random.default_rng(4)
  cases = {
      "no_arr0.npz": (dict(images=_images(rng, 2)), ("'arr_0'", "['images']")),
      "float.npz": (dict(arr_0=_images(rng, 2).astype(np.float32)), ("uint8", "float32")),
      "gray.npz": (dict(arr_0=_images(rng, 2)[..., 0]), ("uint8", "(2, 12, 10)")),
      "rgba.npz": (dict(arr_0=np.zeros((2, 4, 4, 4), np.uint8)), ("uint8", "(2, 4, 4, 4)")),
  }
  for name, (arrays, names) in cases.items():
    path = str(tmp_path / name)
    np.savez(path, **arrays)
    with raises_naming(ValueError, path, *names):
      ev.NpzImages(path)
  with pytest.raises(FileNotFoundError, match="missing.npz"):
    ev.NpzImages(str(tmp_path / "missing.npz"))
  (tmp_path / "text.npz").write_text("not a zip")
  with pytest.raises(ValueError, match="text.npz"):
    ev.NpzImages(str(tmp_path / "text.npz"))
  np.savez(str(tmp_path / "partial.npz"), arr_0=_images(rng, 2), mu=np.zeros(3))
  with raises_naming(ValueError, "partial.npz", "'sigma'"):
    ev.read_statistics(str(tmp_path / "partial.npz"))


class _NoInception:
  """An extractor that fails the test if the (slow) Inception pass is ever reached."""

  def features(self, images_NxHxWx3):
    raise AssertionError(f"Inception pass ran on {images_NxHxWx3.shape}; the input check is late.")


class _StubExtractor:
  """Deterministic finite features of any images: pool 4-d, spatial 3-d, probs over 5 classes."""

  def __init__(self, nan_in=None):
    self.nan_in = nan_in

  def features(self, images_NxHxWx3):
    x = images_NxHxWx3.reshape(len(images_NxHxWx3), -1).astype(np.float64) / 255
    pool, spatial = x[:, :4], x[:, 4:7]
    probs = special.softmax(x[:, :5], axis=1)
    out = dict(pool=pool, spatial=spatial, probs=probs)
    if self.nan_in:
      out[self.nan_in] = np.where(np.arange(len(x))[:, None] == 1, np.nan, out[self.nan_in])
    return out["pool"], out["spatial"], out["probs"]


def _flip_byte(path, member, frac=0.5):
  """Flips one byte of a zip member's stored data (at `frac` of it), leaving its CRC stale."""
  with zipfile.ZipFile(path) as zf:
    info = zf.getinfo(member)
  raw = bytearray(open(path, "rb").read())
  o = info.header_offset
  name_len, extra_len = (int.from_bytes(raw[o + i:o + i + 2], "little") for i in (26, 28))
  pos = o + 30 + name_len + extra_len + int(frac * info.compress_size)
  raw[pos] ^= 0xFF
  open(path, "wb").write(bytes(raw))


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("which", ["ref", "samples"])
def test_too_few_images_fail_before_the_inception_pass(tmp_path, n, which):
  rng = np.random.default_rng(8)
  paths = {w: str(tmp_path / f"{w}.npz") for w in ("ref", "samples")}
  for w, path in paths.items():
    np.savez(path, _images(rng, n if w == which else 10, 8, 8))
  with raises_naming(ValueError, paths[which], "'arr_0'", n, ev.MIN_IMAGES):
    ev.evaluate(paths["ref"], paths["samples"], _NoInception())
  # The CLI checks before it even loads the graph (a missing .pb would say FileNotFoundError).
  with raises_naming(ValueError, paths[which], "'arr_0'", n):
    ev.main([paths["ref"], paths["samples"], f"--inception={tmp_path / 'absent.pb'}"])
  np.savez(paths[which], _images(rng, ev.MIN_IMAGES, 8, 8))
  assert len(ev.open_batch(paths[which])[0]) == ev.MIN_IMAGES


def _stats(d=4, ds=3):
  return dict(mu=np.zeros(d), sigma=np.eye(d), mu_s=np.ones(ds), sigma_s=2 * np.eye(ds))


def _with(key, fn):
  stats = _stats()
  stats[key] = fn(stats[key])
  return stats


_BAD_STATS = {
    # What each error must name: the statistic's key and the offending value (count, dtype, shape).
    "nan_mu": (_with("mu", lambda a: a + [np.nan, 0, 0, 0]), ("'mu'", 1)),
    "nan_sigma": (_with("sigma", lambda a: np.diag([np.nan] * 3 + [1.])), ("'sigma'", 3)),
    "inf_sigma_s": (_with("sigma_s", lambda a: np.full_like(a, np.inf)), ("'sigma_s'", 9)),
    "str_mu": (_with("mu", lambda a: np.array(["a", "b", "c", "d"])), ("'mu'", "<U1")),
    "bool_mu_s": (_with("mu_s", lambda a: a > 0), ("'mu_s'", "bool")),
    "object_mu": (_with("mu", lambda a: np.array([1, "x", None, 2.0], object)),
                  ("'mu'", "mu.npy", "allow_pickle")),
    "rank_mu_s": (_with("mu_s", lambda a: a[None]), ("'mu_s'", "'sigma_s'", "(1, 3)")),
    "shape_sigma": (_with("sigma", lambda a: a[:3]), ("'mu'", "'sigma'", "(3, 4)")),
    "asymmetric": (_with("sigma", lambda a: a + np.triu(np.ones_like(a), 1)), ("'sigma'",)),
    "negative_var": (_with("sigma_s", lambda a: -a), ("'sigma_s'", 3)),
}


@pytest.mark.parametrize("case", sorted(_BAD_STATS))
def test_bad_precomputed_statistics_fail_before_the_inception_pass(tmp_path, case):
  stats, names = _BAD_STATS[case]
  rng = np.random.default_rng(9)
  ref_path, sample_path = str(tmp_path / "REF.npz"), str(tmp_path / "samples.npz")
  np.savez(ref_path, _images(rng, 5, 8, 8), **stats)
  np.savez(sample_path, _images(rng, 5, 8, 8))
  with raises_naming(ValueError, ref_path, *names) as e:
    ev.evaluate(ref_path, sample_path, _NoInception())
  assert sample_path not in str(e.value)


def test_good_precomputed_statistics_are_read_as_numbers(tmp_path):
  path = str(tmp_path / "ref.npz")
  stats = _stats()
  stats["mu"] = np.arange(4)  # Integer statistics are numbers too.
  stats["sigma_s"] = np.float32(stats["sigma_s"])
  np.savez(path, _images(np.random.default_rng(10), 4, 8, 8), **stats)
  (mu, sigma), (mu_s, sigma_s) = ev.read_statistics(path)
  assert mu.dtype == np.float64 and sigma_s.dtype == np.float32
  np.testing.assert_array_equal(mu, np.arange(4))
  np.testing.assert_array_equal(sigma, np.eye(4))
  np.testing.assert_array_equal(mu_s, np.ones(3))


def test_non_finite_features_or_metrics_never_reach_the_output(tmp_path, monkeypatch):
  rng = np.random.default_rng(11)
  ref_path, sample_path = str(tmp_path / "ref.npz"), str(tmp_path / "samples.npz")
  np.savez(ref_path, _images(rng, 20, 8, 8))
  np.savez(sample_path, _images(rng, 20, 8, 8))
  metrics = ev.evaluate(ref_path, sample_path, _StubExtractor(), batch_size=6)
  assert all(np.isfinite(v) for v in metrics.values())
  # The stub puts NaN in the 2nd image of each of the 4 batches (6, 6, 6, 2).
  with raises_naming(ValueError, sample_path, "'probs'", 20):
    ev.evaluate(ref_path, sample_path, _StubExtractor(nan_in="probs"), batch_size=6)
  with raises_naming(ValueError, ref_path, "'spatial'", 12):
    ev.evaluate(ref_path, sample_path, _StubExtractor(nan_in="spatial"), batch_size=6)
  with raises_naming(ValueError, "mu1", 2):
    adm.frechet_distance(np.array([np.nan, np.inf]), np.eye(2), np.zeros(2), np.eye(2))
  # Should a metric still come out NaN, the CLI fails and writes neither .txt nor .json.
  monkeypatch.setattr(ev, "FeatureExtractor", lambda *a, **k: _StubExtractor())
  monkeypatch.setattr(ev, "inception_score", lambda probs: float("nan"))
  with raises_naming(ValueError, "['inception_score']", sample_path):
    ev.main([ref_path, sample_path, "--inception=unused.pb"])
  assert not (tmp_path / "samples.json").exists() and not (tmp_path / "samples.txt").exists()


def test_damaged_npz_members_are_named(tmp_path):
  rng = np.random.default_rng(12)
  for save in (np.savez, np.savez_compressed):
    path = str(tmp_path / f"crc_{save.__name__}.npz")
    save(path, _images(rng, 11))
    _flip_byte(path, "arr_0.npy", frac=0.9)
    # Whether zlib or the CRC check notices, the error names the file and the member.
    with raises_naming(ValueError, path, "'arr_0'", "arr_0.npy"):
      list(ev.NpzImages(path).batches(4))
  path = str(tmp_path / "magic.npz")
  with zipfile.ZipFile(path, "w") as zf:  # A well-formed zip whose member is no .npy.
    zf.writestr("arr_0.npy", b"NOTNUMPY" + bytes(200))
  with raises_naming(ValueError, path, "'arr_0'", "magic string"):  # numpy's own error, kept
    ev.NpzImages(path)
  path = str(tmp_path / "stats.npz")
  np.savez(path, _images(rng, 5, 8, 8), **_stats())
  _flip_byte(path, "sigma.npy", frac=0.9)
  with raises_naming(ValueError, path, "'sigma'", "CRC"):
    ev.read_statistics(path)


def test_zero_size_images_and_directories_are_rejected_up_front(tmp_path):
  for shape in [(5, 0, 0, 3), (5, 4, 0, 3), (5, 0, 4, 3)]:
    path = str(tmp_path / "empty.npz")
    np.savez(path, np.zeros(shape, np.uint8))
    with raises_naming(ValueError, path, "arr_0", shape):
      ev.NpzImages(path)
  (tmp_path / "dir.npz").mkdir()
  for read in (ev.NpzImages, ev.read_statistics, ev.open_batch):
    with raises_naming(IsADirectoryError, tmp_path / "dir.npz"):
      read(str(tmp_path / "dir.npz"))


# ----------------------------------------------------------------------------- TF feature path

_POOL_DIM, _NUM_CLASSES, _SPATIAL_CH = 16, 10, 9


def _fake_weights():
  rng = np.random.default_rng(5)
  return dict(
      k1=rng.normal(size=(3, 3, 3, _SPATIAL_CH)).astype(np.float32) * 0.3,
      k2=rng.normal(size=(3, 3, _SPATIAL_CH, _POOL_DIM)).astype(np.float32) * 0.3,
      w=rng.normal(size=(_POOL_DIM, _NUM_CLASSES)).astype(np.float32),
      b=rng.normal(size=(_NUM_CLASSES,)).astype(np.float32))


def _fake_body(tf, x, wts):
  """Resize, normalise, `mixed_6/conv` (8x8x9) and `pool_3` (1x1x16), with Inception's names."""
  x = tf.raw_ops.ResizeBilinear(images=x, size=tf.constant([16, 16]), name="ResizeBilinear")
  x = tf.raw_ops.Mul(x=x - 128.0, y=tf.constant(1 / 128.0), name="Mul")
  c = tf.raw_ops.Conv2D(input=x, filter=tf.constant(wts["k1"]), strides=[1, 2, 2, 1],
                        padding="SAME", name="mixed_6/conv/Conv2D")
  spatial = tf.raw_ops.Relu(features=c, name="mixed_6/conv")
  c2 = tf.raw_ops.Conv2D(input=spatial, filter=tf.constant(wts["k2"]), strides=[1, 1, 1, 1],
                         padding="SAME", name="mixed_10/Conv2D")
  pool = tf.raw_ops.AvgPool(value=tf.nn.relu(c2), ksize=[1, 8, 8, 1], strides=[1, 1, 1, 1],
                            padding="VALID", name="pool_3")
  return spatial, pool


def _write_fake_inception(tf, path, wts, drop=None):
  """A tiny GraphDef shaped like classify_image_graph_def.pb: JPEG head, ExpandDims input,
  batch-1 softmax head (`pool_3/_reshape` to [1, D]) that would fail if run on a batch."""
  g = tf.Graph()
  with g.as_default():
    contents = tf.raw_ops.Placeholder(dtype=tf.string, shape=[], name="DecodeJpeg/contents")
    x = tf.raw_ops.DecodeJpeg(contents=contents, channels=3, name="DecodeJpeg")
    x = tf.raw_ops.Cast(x=x, DstT=tf.float32, name="Cast")
    x = tf.raw_ops.ExpandDims(input=x, axis=tf.constant(0), name="ExpandDims")
    _, pool = _fake_body(tf, x, wts)
    r = tf.raw_ops.Reshape(tensor=pool, shape=tf.constant([1, _POOL_DIM]), name="pool_3/_reshape")
    m = tf.raw_ops.MatMul(a=r, b=tf.constant(wts["w"], name="softmax/weights"),
                          name="softmax/logits/MatMul")
    logits = tf.raw_ops.BiasAdd(value=m, bias=tf.constant(wts["b"]), name="softmax/logits")
    tf.raw_ops.Softmax(logits=logits, name="softmax")
  graph_def = g.as_graph_def()
  if drop:
    kept = [n for n in graph_def.node if n.name != drop]
    del graph_def.node[:]
    graph_def.node.extend(kept)
  with open(path, "wb") as f:
    f.write(graph_def.SerializeToString())


@pytest.fixture(scope="module")
def fake_inception(tmp_path_factory):
  tf = pytest.importorskip("tensorflow")
  wts = _fake_weights()
  path = str(tmp_path_factory.mktemp("inception") / "fake_inception.pb")
  _write_fake_inception(tf, path, wts)
  return tf, wts, path, ev.FeatureExtractor(path, batch_size=4)


def test_feature_extractor_matches_direct_computation(fake_inception):
  tf, wts, _, extractor = fake_inception
  images = _images(np.random.default_rng(6), 7)
  pool, spatial, probs = extractor.features(images)
  assert pool.shape == (7, _POOL_DIM) and spatial.shape == (7, 8 * 8 * 7)
  assert probs.shape == (7, _NUM_CLASSES)
  spatial_ref, pool_ref = _fake_body(tf, tf.constant(images.astype(np.float32)), wts)
  np.testing.assert_allclose(pool, pool_ref.numpy().reshape(7, -1), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(spatial, spatial_ref.numpy()[..., :7].reshape(7, -1), rtol=1e-5,
                             atol=1e-5)
  # ADM's IS head: softmax(pool @ W) with the MatMul's weights and no bias.
  np.testing.assert_allclose(probs, special.softmax(pool @ wts["w"], axis=1), rtol=1e-4,
                             atol=1e-6)


def test_feature_extractor_rejects_bad_graphs_and_images(fake_inception, tmp_path):
  tf, wts, _, extractor = fake_inception
  for name in ("softmax/logits/MatMul", "mixed_6/conv"):
    path = str(tmp_path / "broken.pb")
    _write_fake_inception(tf, path, wts, drop=name)
    with raises_naming(ValueError, path, name):
      ev.load_graph_def(path)
  with pytest.raises(FileNotFoundError, match="nope.pb"):
    ev.FeatureExtractor(str(tmp_path / "nope.pb"))
  with raises_naming(ValueError, "uint8", "float32"):
    extractor.features(np.zeros((2, 8, 8, 3), np.float32))
  with raises_naming(ValueError, (2, 0, 0, 3)):  # Before TF's "non-zero size" error.
    extractor.features(np.zeros((2, 0, 0, 3), np.uint8))


# 10 samples give singular 448-d spatial covariances; scipy warns, ADM's formula still applies.
@pytest.mark.slow  # the whole evaluator end to end
@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")
def test_evaluate_end_to_end_and_precomputed_reference_statistics(fake_inception, tmp_path):
  _, _, pb_path, extractor = fake_inception
  rng = np.random.default_rng(7)
  ref_images, sample_images = _images(rng, 12, 20, 20), _images(rng, 10, 16, 24)
  ref_path, sample_path = str(tmp_path / "ref.npz"), str(tmp_path / "samples.npz")
  np.savez(ref_path, ref_images)
  np.savez(sample_path, sample_images)

  metrics = ev.evaluate(ref_path, sample_path, extractor, batch_size=5)
  assert set(metrics) == {"inception_score", "fid", "sfid", "precision", "recall", "num_samples",
                          "num_ref"}
  ref_pool, ref_spatial, _ = extractor.features(ref_images)
  pool, spatial, probs = extractor.features(sample_images)
  fid = adm.frechet_distance(*adm.compute_statistics(pool), *adm.compute_statistics(ref_pool))
  sfid = adm.frechet_distance(*adm.compute_statistics(spatial), *adm.compute_statistics(ref_spatial))
  assert metrics["fid"] == pytest.approx(fid, rel=1e-5) and metrics["fid"] > 0
  assert metrics["sfid"] == pytest.approx(sfid, rel=1e-5) and metrics["sfid"] > 0
  assert metrics["inception_score"] == pytest.approx(adm.inception_score(probs), rel=1e-6)
  assert (metrics["precision"], metrics["recall"]) == adm.precision_recall(ref_pool, pool)
  assert (metrics["num_samples"], metrics["num_ref"]) == (10, 12)

  # A reference batch with precomputed statistics (as ADM's) uses them instead of its images'.
  mu, sigma = np.full(_POOL_DIM, 3.0), np.eye(_POOL_DIM)
  mu_s, sigma_s = np.zeros(spatial.shape[1]), 2 * np.eye(spatial.shape[1])
  np.savez(ref_path, ref_images, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
  stats = ev.evaluate(ref_path, sample_path, extractor, batch_size=5)
  assert stats["fid"] == pytest.approx(
      adm.frechet_distance(*adm.compute_statistics(pool), mu, sigma), rel=1e-5)
  assert stats["sfid"] == pytest.approx(
      adm.frechet_distance(*adm.compute_statistics(spatial), mu_s, sigma_s), rel=1e-5)
  assert stats["precision"] == metrics["precision"] and stats["recall"] == metrics["recall"]

  np.savez(ref_path, ref_images, mu=mu[:3], sigma=sigma[:3, :3], mu_s=mu_s, sigma_s=sigma_s)
  with raises_naming(ValueError, ref_path, "(mu, sigma)", "(3,)", 16):
    ev.evaluate(ref_path, sample_path, extractor)

  # The CLI prints ADM's lines and writes them next to the samples.
  np.savez(ref_path, ref_images)
  out = ev.main([ref_path, sample_path, f"--inception={pb_path}", "--batch_size=8"])
  assert out["fid"] == pytest.approx(fid, rel=1e-5)
  text = (tmp_path / "samples.txt").read_text()
  assert text.startswith("Inception Score: ") and "\nFID: " in text and "\nRecall: " in text
  saved = json.loads((tmp_path / "samples.json").read_text())
  assert saved["sfid"] == pytest.approx(sfid, rel=1e-5)
  assert os.path.basename(saved["sample_batch"]) == "samples.npz"
