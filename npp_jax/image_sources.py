"""Labelled image sources for code extraction: ImageNet-style folders and prepared tfds splits.

Owns random access to (RGB PIL image, label, name) with the reference's indexing (torchvision
ImageFolder order, so index i is the reference's `{i}.npy`) and decoding (PIL, like
torchvision's pil_loader). Every error names the folder, split, record or file.
"""
from __future__ import annotations

import io
import os
from typing import Protocol

import ml_collections
import numpy as np
from PIL import Image

# torchvision's IMG_EXTENSIONS (ImageFolder), matched case-insensitively.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class SourceError(ValueError):
  """An image source (folder, class folder, tfds split, image file, label) is missing or bad."""


class ImageSource(Protocol):
  """Random access to labelled images."""
  description: str  # Provenance, stored in the shards' metadata.
  class_names: tuple[str, ...]  # Label i is class_names[i].

  def __len__(self) -> int: ...

  def load(self, index: int) -> tuple[Image.Image, int, str]:
    """(RGB PIL image, label, name for error messages) of image `index`."""


def decode_image(raw: bytes, name: str) -> Image.Image:
  """Encoded bytes -> RGB PIL image, like torchvision's pil_loader; errors name the image."""
  try:
    with Image.open(io.BytesIO(raw)) as image:
      return image.convert("RGB")
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError.
    raise SourceError(f"{name}: cannot decode image ({type(e).__name__}: {e})") from e


class FolderSource:
  """ImageNet-style folder ROOT/<class>/**/<image>, indexed exactly like torchvision ImageFolder.

  Classes are the sorted subfolder names (labels 0..C-1); images are found with a sorted
  os.walk per class and kept by extension (IMG_EXTENSIONS). Local paths (or a mounted bucket).
  """

  def __init__(self, root: str | os.PathLike):
    self.root = root = os.fspath(root)
    if not os.path.isdir(root):
      raise SourceError(f"image folder {root!r} does not exist or is not a directory")
    self.class_names = tuple(sorted(e.name for e in os.scandir(root) if e.is_dir()))
    if not self.class_names:
      raise SourceError(f"image folder {root!r} has no class subfolders (expected "
                        f"ROOT/<class>/<image>)")
    self._paths, labels = [], []
    for label, name in enumerate(self.class_names):
      class_dir = os.path.join(root, name)
      before = len(self._paths)
      for dirpath, _, fnames in sorted(os.walk(class_dir, followlinks=True)):
        self._paths += [os.path.join(dirpath, f) for f in sorted(fnames)
                        if f.lower().endswith(IMG_EXTENSIONS)]
      if len(self._paths) == before:
        raise SourceError(f"class folder {class_dir!r} holds no images (extensions "
                          f"{', '.join(IMG_EXTENSIONS)})")
      labels += [label] * (len(self._paths) - before)
    self._labels = np.asarray(labels, np.int32)
    # Absolute, so that the extraction plan does not depend on how the path was spelled.
    self.description = f"folder:{os.path.abspath(root)}"

  def __len__(self) -> int:
    return len(self._paths)

  def load(self, index: int) -> tuple[Image.Image, int, str]:
    path = self._paths[index]
    try:
      with open(path, "rb") as f:
        raw = f.read()
    except OSError as e:
      raise SourceError(f"{path}: cannot read ({e})") from e
    return decode_image(raw, path), int(self._labels[index]), path


class TfdsSource:
  """A split of a prepared tfds dataset (ArrayRecord files) via `tfds.data_source`, no tf.data.

  Images are read as their stored JPEG bytes and decoded with PIL like the folder source (tfds'
  own numpy decoding would use OpenCV when installed, which rounds differently). tfds' ImageNet
  stores the few CMYK/greyscale originals re-encoded as RGB JPEGs, so those few differ slightly
  from a folder of the original files. Labels are tfds' ClassLabel ids, which for imagenet2012
  are the sorted wnids, i.e. ImageFolder's order (checked).
  """

  def __init__(self, name: str, split: str, data_dir: str | None = None):
    import tensorflow_datasets as tfds  # Imported here: only this source needs it.
    try:
      self._source = tfds.data_source(name, split=split, data_dir=data_dir or None,
                                      download=False,
                                      decoders={"image": tfds.decode.SkipDecoding()})
    except Exception as e:  # tfds raises several types for a missing dataset/split.
      raise SourceError(f"tfds dataset {name!r} split {split!r} (data_dir {data_dir!r}) cannot be "
                        f"opened; is it prepared there as ArrayRecord (`tfds build {name} "
                        f"--file_format=array_record` after the manual download)? "
                        f"{type(e).__name__}: {e}") from e
    label = self._source.dataset_info.features["label"]
    self.class_names = tuple(label.names)
    if list(self.class_names) != sorted(self.class_names):
      raise SourceError(f"tfds {name!r} label names are not sorted, so its label ids are not "
                        f"ImageFolder's (LlamaGen's) class ids")
    if not len(self._source):
      raise SourceError(f"tfds {name!r} split {split!r} is empty")
    self.name, self.split = name, split
    self.description = f"tfds:{name}/{split}"

  def __len__(self) -> int:
    return len(self._source)

  def load(self, index: int) -> tuple[Image.Image, int, str]:
    example = self._source[index]
    file_name = example.get("file_name", b"")
    file_name = file_name.item() if isinstance(file_name, np.ndarray) else file_name
    file_name = file_name.decode() if isinstance(file_name, bytes) else str(file_name)
    where = f"tfds {self.name}/{self.split} record {index} ({file_name})"
    return decode_image(example["image"], where), int(example["label"]), where


def open_sources(config: ml_collections.ConfigDict) -> dict[str, ImageSource]:
  """split -> source for `config.splits`, from config.source ("tfds" | "folder")."""
  splits = list(config.splits)
  if not splits:
    raise ValueError("config.splits is empty")
  if config.source == "folder":
    missing = [s for s in splits if not config.folder.get(s)]
    if missing:
      raise ValueError(f"config.folder has no path for splits {missing} "
                       f"(set --config.folder.{missing[0]}=ROOT)")
    return {s: FolderSource(config.folder[s]) for s in splits}
  if config.source == "tfds":
    return {s: TfdsSource(config.tfds.name, s, config.tfds.data_dir) for s in splits}
  raise ValueError(f"config.source={config.source!r} must be 'tfds' or 'folder'")
