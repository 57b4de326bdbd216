"""Tests for npp_jax.digits: the CPU demo's token shards, palette and scoring helpers."""
import math

import numpy as np
from PIL import Image
import pytest

from naming import raises_naming
from npp_jax import data
from npp_jax import digits


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
  return digits.build_digits_shards(tmp_path_factory.mktemp("digits"))


def _split_arrays(path, split):
  source = data.open_split(path, split)
  records = [source[i] for i in range(len(source))]
  return (np.stack([r["codes"] for r in records]).astype(np.int32),
          np.array([r["label"] for r in records]))


def test_shards_shapes_and_vocab(shards):
  meta = data.ShardMetadata.load(shards)
  assert (meta.grid_size, meta.vocab_size, meta.num_classes, meta.num_views) == (
      16, digits.DIGITS_VOCAB_SIZE, digits.DIGITS_NUM_CLASSES, digits.MAX_VIEWS)
  assert meta.num_records("train") + meta.num_records("validation") == 1797
  codes, labels = _split_arrays(shards, "train")
  assert codes.shape == (meta.num_records("train"), 9, 256)
  assert codes.min() == 0 and codes.max() == digits.DIGITS_VOCAB_SIZE - 1
  assert set(labels) == set(range(10))


def test_split_is_class_balanced(shards):
  _, train = _split_arrays(shards, "train")
  _, val = _split_arrays(shards, "validation")
  train_counts = np.bincount(train, minlength=10)
  val_counts = np.bincount(val, minlength=10)
  np.testing.assert_array_equal(val_counts, np.round(0.1 * (train_counts + val_counts)))
  assert val_counts.min() >= 17


def test_views_are_one_pixel_translations(shards):
  codes, _ = _split_arrays(shards, "validation")
  grids = codes.reshape(len(codes), 9, 16, 16)
  assert (grids[:, 0, 0, :] == 0).all() and (grids[:, 0, :, -1] == 0).all(), "1-pixel border"
  for v, (dy, dx) in enumerate(digits._SHIFTS):
    np.testing.assert_array_equal(grids[:, v], np.roll(grids[:, 0], (dy, dx), axis=(1, 2)))


def test_build_is_idempotent(shards, tmp_path):
  mtime = (shards / data.METADATA_FILE).stat().mtime
  assert digits.build_digits_shards(shards) == shards
  assert (shards / data.METADATA_FILE).stat().mtime == mtime, "valid shards are not rewritten"
  path = digits.build_digits_shards(tmp_path, num_views=2)
  assert data.ShardMetadata.load(path).num_views == 2
  assert data.ShardMetadata.load(digits.build_digits_shards(path, num_views=3)).num_views == 3


def test_palette_decode_round_trip(shards):
  codes, _ = _split_arrays(shards, "validation")
  images = digits.palette_decode(codes[:, 0])
  assert images.shape == (len(codes), 16, 16, 3) and images.dtype == np.uint8
  assert (images[..., 0] == images[..., 2]).all()
  np.testing.assert_array_equal(images[..., 0].reshape(len(codes), 256) // 17, codes[:, 0])
  # The decoded digit, shrunk back to 8x8, looks like the original sklearn image.
  from sklearn import datasets
  originals = datasets.load_digits().images[digits.digit_tokens()[2]]
  shrunk = np.stack([np.asarray(Image.fromarray(im[1:-1, 1:-1, 0].astype(np.float32)).resize(
      (8, 8), Image.BILINEAR)) for im in images])
  corr = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(shrunk, originals)]
  assert np.median(corr) > 0.9 and min(corr) > 0.6, (np.median(corr), min(corr))


def test_palette_decode_rejects_bad_tokens():
  with pytest.raises(ValueError, match=r"\[0, 16\)"):
    digits.palette_decode(np.full((1, 256), 16))
  with raises_naming(ValueError, "codes_BxN", (1, 16, 16)):
    digits.palette_decode(np.zeros((1, 16, 16), np.int32))


def test_classifier_accuracy_on_real_images(shards):
  predict = digits.fit_digits_classifier()
  codes, labels = _split_arrays(shards, "validation")
  acc_centred = np.mean(predict(digits.palette_decode(codes[:, 0])) == labels)
  acc_all = np.mean(predict(digits.palette_decode(codes.reshape(-1, 256))) == np.repeat(labels, 9))
  assert acc_centred > 0.95 and acc_all > 0.95, (acc_centred, acc_all)
  # Class-shuffled images score at chance: the metric measures the class, not the style.
  assert np.mean(predict(digits.palette_decode(codes[:, 0])) == np.roll(labels, 1)) < 0.3
  with pytest.raises(ValueError, match="uint8"):
    predict(np.zeros((1, 16, 16, 3), np.float32))


def test_unigram_entropy(shards):
  h = digits.unigram_entropy(shards, "validation")
  assert math.isfinite(h) and 0 < h < math.log(digits.DIGITS_VOCAB_SIZE)
  # Same number from the in-memory tokens: add-one smoothed train counts, centred val view.
  codes, _, is_val = digits.digit_tokens()
  counts = np.bincount(codes[~is_val].ravel(), minlength=16) + 1
  expected = -np.mean(np.log(counts / counts.sum())[codes[is_val][:, 0]])
  assert h == pytest.approx(expected, rel=1e-9)


def test_digits_feed_the_train_pipeline(shards):
  it = iter(data.make_train_dataset(shards, split="train", global_batch_size=64, seed=0,
                                    process_index=0, process_count=1))
  batch = next(it)
  assert batch["codes"].shape == (64, 256) and batch["codes"].max() < 16
  assert batch["labels"].min() >= 0 and batch["labels"].max() < 10
