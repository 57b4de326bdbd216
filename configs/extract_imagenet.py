"""Tokenise ImageNet once into the token shards training reads (npp_jax/extract_codes.py).

Every view of an image goes into its one record: ten-crop (with flips) x crop ranges (1.1, 1.05)
= 20 views at 256 px, views 0..9 from crop range 1.1 (281 px square), 10..19 from 1.05 (268 px).
Training draws one of the 20 uniformly, as the reference's 50/50 choice between its `ten_crop`
and `ten_crop_105` code folders followed by a uniform crop.

Run the same command on every worker of a TPU pod slice (e.g. with launch/run.sh); it resumes
where a stopped run left off:

  python -m npp_jax.extract_codes --config=configs/extract_imagenet.py \
      --config.tfds.data_dir=gs://BUCKET/tensorflow_datasets \
      --config.vq_checkpoint=gs://BUCKET/vq/vq_ds16_c2i \
      --config.out=gs://BUCKET/imagenet256_codes

From an ImageNet folder (ROOT/<wnid>/*.JPEG, local or mounted on every worker) instead:

  python -m npp_jax.extract_codes --config=configs/extract_imagenet.py:folder \
      --config.folder.train=/data/imagenet/train --config.folder.validation=/data/imagenet/val \
      --config.vq_checkpoint=/data/vq_ds16_c2i.pt --config.out=gs://BUCKET/imagenet256_codes

Then train with --config.data.path=gs://BUCKET/imagenet256_codes (splits "train", "validation").

Resolution: extract at image_size 256 for the 256-px models (16x16 tokens). The NPP README's
extraction command uses --image-size 384 (24x24 tokens), which does not match its own 256-px
training command (that asserts imagenet256_codes exist); 384 codes belong to LlamaGen's *_384
models only.

Variants: `:folder` (ImageFolder source), `:mock` (tests: 32-px images, tiny shards).
"""
import ml_collections


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.source = "tfds"  # "tfds" (prepared ArrayRecord tfds dataset) | "folder" (ImageFolder layout).
  c.tfds = ml_collections.ConfigDict()
  c.tfds.name = "imagenet2012"  # prepared with file_format=array_record (manual download).
  c.tfds.data_dir = ""  # "" = tfds' default data dir.
  c.folder = ml_collections.ConfigDict()  # split -> ImageFolder root (source "folder").
  c.folder.train = ""
  c.folder.validation = ""
  c.splits = ("train", "validation")  # extracted together into one output directory.

  c.image_size = 256  # pixels; tokens per side = image_size / 16 for VQ-16.
  c.ten_crop = True  # False: centre crop at image_size + its flip (2 views, crop_ranges unused).
  c.crop_ranges = (1.1, 1.05)  # crop size int(image_size * range) before TenCrop(image_size).

  # Converted VQ params dir (npp_jax.convert), LlamaGen's vq_ds16_c2i.pt, or a state-dict .npz.
  c.vq_checkpoint = ""
  c.out = ""  # output token-shard directory, local or gs://.

  c.batch_size_per_device = 4  # images per device per step (each contributes all its views).
  c.records_per_shard = 10_000  # images per unit of work and per shard file (at most).
  c.mesh = ml_collections.ConfigDict()  # over each process's local devices; batch over data*fsdp.
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1  # must be 1: the tokenizer is replicated.
  c.num_threads = 0  # image decode/crop threads per process; 0 = min(32, CPU count).
  c.prefetch_batches = 2  # batches of images decoded ahead of the encoder.
  c.log_every_seconds = 60.0  # progress (images/s, ETA) log period.

  if arg == "folder":
    c.source = "folder"
  elif arg == "mock":
    c.source = "folder"
    c.splits = ("train",)
    c.image_size = 32
    c.batch_size_per_device = 1
    c.records_per_shard = 4
    c.num_threads = 2
    c.log_every_seconds = 0.0
  elif arg:
    raise ValueError(f"unknown variant {arg!r}: use '', 'folder' or 'mock'")
  return c
