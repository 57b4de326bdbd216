"""Image preprocessing for code extraction, exactly as LlamaGen's `extract_codes_c2i.py`.

Owns the pixel pipeline from a decoded PIL image to the float views the VQ encoder sees, in pure
numpy/PIL (no torch, no JAX):

1. `center_crop_arr(image, crop_size)`, ADM's recipe: while the short side is >= 2*crop_size,
   halve both sides with BOX; then BICUBIC-resize so the short side is crop_size (each side
   `round(x * scale)`, Python's round); then crop the centre square at offset (H - s) // 2.
   With ten-crop, crop_size = int(image_size * crop_range): 256 -> 281 (1.1) / 268 (1.05);
   384 -> 422 / 403.
2. `ten_crop(square, size)`: torchvision's TenCrop(size) order: top-left, top-right, bottom-left,
   bottom-right, centre, then the same five crops of the horizontally flipped square. The centre
   offset is int(round((s - size) / 2)) (12 for 281 -> 256, 19 for 422 -> 384).
3. `to_float`: ToTensor + Normalize(0.5, 0.5) in float32: (u8 / 255 - 0.5) / 0.5, in [-1, 1].

Without ten-crop the reference centre-crops straight to image_size (no crop range) and encodes
the image and its horizontal flip: 2 views.

Layout: views are NHWC float32 [V, S, S, 3], RGB. Boxes are (left, top, right, bottom) as PIL.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

TEN_CROP_NAMES = ("tl", "tr", "bl", "br", "center",
                  "tl_flip", "tr_flip", "bl_flip", "br_flip", "center_flip")
FLIP_NAMES = ("center", "center_flip")


def crop_size(image_size: int, crop_range: float) -> int:
  """The reference's `int(image_size * crop_range)` (float product, truncated)."""
  size = int(image_size * crop_range)
  if crop_range < 1.0 or size < image_size:
    raise ValueError(f"crop_range={crop_range} must be >= 1 (crop {size} < image_size "
                     f"{image_size})")
  return size


def center_crop_arr(image: Image.Image, size: int) -> Image.Image:
  """ADM's center_crop_arr: BOX-halve while short side >= 2*size, BICUBIC to short side = size,
  centre square crop. Returns a size x size PIL image in the input's mode."""
  if min(image.size) < 1:
    raise ValueError(f"image of size {image.size} has no pixels")
  while min(*image.size) >= 2 * size:
    image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
  scale = size / min(*image.size)
  image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
  arr = np.asarray(image)
  top = (arr.shape[0] - size) // 2
  left = (arr.shape[1] - size) // 2
  return Image.fromarray(arr[top:top + size, left:left + size])


def five_crop_boxes(side: int, size: int) -> tuple[tuple[int, int, int, int], ...]:
  """torchvision five_crop boxes (left, top, right, bottom) in a side x side square.

  Order tl, tr, bl, br, centre; the centre offset is int(round((side - size) / 2)) (Python's
  round, half to even, as torchvision's center_crop).
  """
  if size > side:
    raise ValueError(f"crop size {size} is larger than the {side}x{side} square")
  far = side - size
  c = int(round(far / 2.0))
  return ((0, 0, size, size), (far, 0, side, size), (0, far, size, side), (far, far, side, side),
          (c, c, c + size, c + size))


def ten_crop(square_SxSx3: np.ndarray, size: int) -> np.ndarray:
  """torchvision TenCrop(size) (no vertical flip) of a square uint8 image -> [10, size, size, 3].

  The last five are five_crop of the horizontally flipped square (so "tl_flip" is the mirror of
  the original's top-right corner).
  """
  side = square_SxSx3.shape[0]
  if square_SxSx3.shape[1] != side:
    raise ValueError(f"ten_crop needs a square image, got {square_SxSx3.shape}")
  boxes = five_crop_boxes(side, size)
  flipped = square_SxSx3[:, ::-1]
  return np.stack([img[t:b, l:r] for img in (square_SxSx3, flipped) for l, t, r, b in boxes])


def to_float(u8: np.ndarray) -> np.ndarray:
  """ToTensor + Normalize(mean=0.5, std=0.5), in float32 with torch's operation order."""
  x = np.asarray(u8, np.uint8).astype(np.float32) / np.float32(255)
  return (x - np.float32(0.5)) / np.float32(0.5)


def view_names(ten_crop_views: bool, crop_ranges: Sequence[float]) -> list[str]:
  """Names of the views in record order, e.g. "1.1/tl", ..., "1.05/center_flip"."""
  if not ten_crop_views:
    return list(FLIP_NAMES)
  return [f"{r}/{n}" for r in crop_ranges for n in TEN_CROP_NAMES]


def image_views(image: Image.Image, image_size: int, crop_ranges: Sequence[float],
                ten_crop_views: bool = True) -> np.ndarray:
  """All views of one RGB image -> float32 [V, image_size, image_size, 3] in [-1, 1].

  With ten-crop: for each crop range in order, the 10 TenCrop views of
  center_crop_arr(image, int(image_size * range)), so V = 10 * len(crop_ranges). Without:
  [centre crop at image_size, its horizontal flip], V = 2 (crop_ranges are unused, as in the
  reference).
  """
  if image.mode != "RGB":
    raise ValueError(f"expected an RGB image, got mode {image.mode!r}")
  if not ten_crop_views:
    square = np.asarray(center_crop_arr(image, image_size))
    return to_float(np.stack([square, square[:, ::-1]]))
  if not crop_ranges:
    raise ValueError("ten-crop needs at least one crop range")
  views = [ten_crop(np.asarray(center_crop_arr(image, crop_size(image_size, r))), image_size)
           for r in crop_ranges]
  return to_float(np.concatenate(views))
