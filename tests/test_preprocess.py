"""Tests for npp_jax.preprocess: the reference's crop geometry, view order and float conversion."""
from hypothesis import given, settings, strategies as st
import numpy as np
from PIL import Image
import pytest

from naming import raises_naming
from npp_jax import preprocess


def test_crop_sizes_and_centre_offsets():
  assert [preprocess.crop_size(s, r) for s in (256, 384) for r in (1.1, 1.05)] == [
      281, 268, 422, 403]
  assert preprocess.five_crop_boxes(281, 256) == (
      (0, 0, 256, 256), (25, 0, 281, 256), (0, 25, 256, 281), (25, 25, 281, 281),
      (12, 12, 268, 268))
  assert preprocess.five_crop_boxes(422, 384)[4] == (19, 19, 403, 403)
  assert preprocess.five_crop_boxes(268, 256)[4] == (6, 6, 262, 262)
  assert preprocess.five_crop_boxes(403, 384)[4] == (10, 10, 394, 394)  # round(9.5) = 10.
  with pytest.raises(ValueError, match="crop_range"):
    preprocess.crop_size(256, 0.9)


@settings(max_examples=60, deadline=None)
@given(side=st.integers(1, 600), size=st.integers(1, 600))
def test_five_crop_boxes_property(side, size):
  if size > side:
    with raises_naming(ValueError, size, f"{side}x{side}"):
      preprocess.five_crop_boxes(side, size)
    return
  boxes = preprocess.five_crop_boxes(side, size)
  for left, top, right, bottom in boxes:
    assert right - left == size and bottom - top == size
    assert 0 <= left and 0 <= top and right <= side and bottom <= side
  assert boxes[4][:2] == (int(round((side - size) / 2)),) * 2


def test_ten_crop_order_on_coordinate_image():
  """Each pixel encodes its (row, col); a crop's top-left pixel and its column step show where
  it came from and whether it was flipped."""
  s, size = 281, 256
  rows, cols = np.mgrid[:s, :s]
  img = np.stack([rows % 256, cols % 256, rows // 256 + 2 * (cols // 256)], -1).astype(np.uint8)
  crops = preprocess.ten_crop(img, size)
  assert crops.shape == (10, size, size, 3)
  decode = lambda px: (int(px[0]) + 256 * (int(px[2]) % 2), int(px[1]) + 256 * (int(px[2]) // 2))
  origins = [decode(c[0, 0]) for c in crops]
  # tl, tr, bl, br, centre; then the flipped square's, whose column c is the original's 280-c.
  assert origins == [(0, 0), (0, 25), (25, 0), (25, 25), (12, 12),
                     (0, 280), (0, 255), (25, 280), (25, 255), (12, 268)]
  steps = [decode(c[0, 1])[1] - decode(c[0, 0])[1] for c in crops]
  assert steps == [1] * 5 + [-1] * 5


def test_views_of_quadrant_image():
  """A 281-px square with one colour per quadrant goes through image_views unchanged in
  geometry (center_crop_arr of an exact-size square is the identity)."""
  s, h = 281, 140
  colours = {"TL": (255, 0, 0), "TR": (0, 255, 0), "BL": (0, 0, 255), "BR": (255, 255, 255)}
  img = np.zeros((s, s, 3), np.uint8)
  img[:h, :h], img[:h, h:], img[h:, :h], img[h:, h:] = (colours[k] for k in colours)
  pil = Image.fromarray(img)
  np.testing.assert_array_equal(np.asarray(preprocess.center_crop_arr(pil, s)), img)
  views = preprocess.image_views(pil, 256, (1.1,))
  assert views.shape == (10, 256, 256, 3) and views.dtype == np.float32
  f = lambda k: np.asarray(colours[k], np.float32) / 127.5 - 1
  corner = {"tl": (0, 0), "tr": (0, -1), "bl": (-1, 0), "br": (-1, -1)}
  for i, name in enumerate(preprocess.TEN_CROP_NAMES):
    base = name.removesuffix("_flip")
    if base == "center":
      # Centre crop [12, 268): its corners lie in the four quadrants, mirrored when flipped.
      got = [views[i][corner[k]] for k in ("tl", "tr", "bl", "br")]
      want = ["TL", "TR", "BL", "BR"] if name == "center" else ["TR", "TL", "BR", "BL"]
    else:
      got = [views[i][corner[base]]]
      want = [{"tl": "TL", "tr": "TR", "bl": "BL", "br": "BR"}[base]]
      if name.endswith("_flip"):  # Crop `base` of the mirrored square shows the other side.
        want = [{"TL": "TR", "TR": "TL", "BL": "BR", "BR": "BL"}[want[0]]]
    for g, w in zip(got, want):
      np.testing.assert_array_equal(g, f(w), err_msg=f"view {i} ({name})")


def test_to_float_matches_torch_order_and_range():
  u8 = np.arange(256, dtype=np.uint8)
  x = preprocess.to_float(u8)
  want = (u8.astype(np.float32) / np.float32(255) - np.float32(0.5)) / np.float32(0.5)
  np.testing.assert_array_equal(x, want)
  assert x.dtype == np.float32 and x[0] == -1 and x[255] == 1 and np.all(np.diff(x) > 0)


def test_center_crop_arr_hand_computed():
  rng = np.random.default_rng(0)
  big = Image.fromarray(rng.integers(0, 256, (800, 1200, 3), dtype=np.uint8))
  # 800 >= 2*281: BOX to 600x400; scale 281/400: (round(421.5)=422, 281); crop x (422-281)//2.
  want = np.asarray(big.resize((600, 400), Image.BOX).resize((422, 281), Image.BICUBIC))[:, 70:351]
  np.testing.assert_array_equal(np.asarray(preprocess.center_crop_arr(big, 281)), want)
  small = Image.fromarray(rng.integers(0, 256, (30, 20, 3), dtype=np.uint8))
  # Upsampled: scale 35/20: (35, round(52.5)=52); crop y (52-35)//2 = 8.
  want = np.asarray(small.resize((35, 52), Image.BICUBIC))[8:43]
  np.testing.assert_array_equal(np.asarray(preprocess.center_crop_arr(small, 35)), want)


@settings(max_examples=40, deadline=None)
@given(w=st.integers(1, 300), h=st.integers(1, 300), size=st.integers(1, 80))
def test_center_crop_arr_is_square(w, h, size):
  out = preprocess.center_crop_arr(Image.new("RGB", (w, h)), size)
  assert out.size == (size, size)


def test_image_views_counts_and_names():
  pil = Image.new("RGB", (50, 40), (10, 20, 30))
  assert preprocess.image_views(pil, 32, (1.1, 1.05)).shape == (20, 32, 32, 3)
  two = preprocess.image_views(pil, 32, (1.1, 1.05), ten_crop_views=False)
  assert two.shape == (2, 32, 32, 3)
  np.testing.assert_array_equal(two[1], two[0][:, ::-1])
  assert preprocess.view_names(True, (1.1, 1.05))[9:11] == ["1.1/center_flip", "1.05/tl"]
  with raises_naming(ValueError, "RGB", "'L'"):
    preprocess.image_views(Image.new("L", (40, 40)), 32, (1.1,))
