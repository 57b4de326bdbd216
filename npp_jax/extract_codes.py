"""ImageNet -> VQ codes of every view of every image -> token shards, resumably, on all hosts.

Owns the extraction run: config checks, VQ checkpoint loading, running the units of the plan
(`npp_jax.extract_plan`) resumably, batched encoding, and the final check.
The image sources (tfds ArrayRecord data sources, ImageNet-style folders) are
`npp_jax.image_sources`, the pixel pipeline `npp_jax.preprocess`, the shard format `npp_jax.data`.

One record per image: its label and the codes of all its views, [V, N] (V = 10 per crop range
with ten-crop, in `preprocess.view_names` order, e.g. crop range 1.1 views 0..9 then 1.05 views
10..19; V = 2 without ten-crop). Record order is the source's index order (ImageFolder order for
folders, so record i is the reference's `{i}.npy`).

Units and resumability. Every split is cut into the same number U of contiguous, near-equal
index ranges ("units"), U = ceil(largest split / records_per_shard) (`data.finalize` expects the
same writer count for every split). Unit u of a split is written by its own
`data.ShardWriter(process_index=u)`, i.e. to `{split}-{u:05d}-00000.array_record` plus its
manifest, and is done once its marker `extract_units/{split}-{u:05d}.json` exists (written after
the writer closed, with the unit's record count and label range). Process p of P does the units
u with u % P == p, skipping done ones, so a restart (even with another process count) redoes
only unfinished units, and the output files do not depend on the process count. The run's plan
(split sizes, U, shard header) is stored in `extract_plan.json`, written before anything else
once the config is checked; a restart with a different plan is refused (naming the differing
keys), and so is a non-empty output directory without a plan (someone else's files). After a
barrier, process 0 checks every unit's marker against the plan and the sources (record counts,
labels in range), calls `data.finalize`, and re-opens every split.

Encoding runs on this process's local devices (`vq.make_encode_fn` over a mesh of
`jax.local_devices()`, batch split over them): units need no cross-process lockstep, so processes
with different amounts of remaining work never wait on each other. JPEG decoding and cropping run
in a thread pool, a bounded number of images ahead of the encoder.

Shapes: B images per step, V views, S image size, N tokens per view.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import itertools
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from absl import app, flags, logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from npp_jax import checkpoint, data, distributed, extract_plan, fileio, hub, preprocess, sharding, vq
from npp_jax import load as load_lib
from npp_jax.image_sources import ImageSource, SourceError, open_sources



# ----------------------------------------------------------------------------- config

def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming `config.<key>` for a value the run cannot use (no I/O).

  Run before anything is written, so a corrected rerun is never refused by a plan recorded from
  the bad value (image_size vs the tokenizer and the mesh vs the devices are checked later, but
  also before the plan is written).
  """
  get = config.get  # A missing key reads None and is reported like a wrong value.

  def get_int(key, minimum, note=""):
    v = get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
      raise ValueError(f"config.{key}={v!r} must be an int >= {minimum}{note}")
    return v

  if not get("out"):
    raise ValueError("config.out is empty (an output directory, local or gs://)")
  size = get_int("image_size", 1, " (pixels of each view)")
  ten = get("ten_crop")
  if not isinstance(ten, bool):
    raise ValueError(f"config.ten_crop={ten!r} must be True or False")
  if ten:  # Without ten-crop the crop ranges are unused (and not recorded).
    ranges = get("crop_ranges")
    if isinstance(ranges, (str, bytes)) or not isinstance(ranges, Sequence) or not ranges:
      raise ValueError(f"config.crop_ranges={ranges!r} must be a non-empty sequence of crop "
                       f"ranges >= 1, e.g. (1.1, 1.05), when config.ten_crop is True")
    for r in ranges:
      ok = not isinstance(r, bool) and isinstance(r, (int, float)) and math.isfinite(r)
      if not ok or int(size * r) < size:
        raise ValueError(f"config.crop_ranges={tuple(ranges)!r}: {r!r} is not a number >= 1 "
                         f"(the crop int(image_size * range) must be >= config.image_size={size})")
    if len({float(r) for r in ranges}) != len(ranges):
      raise ValueError(f"config.crop_ranges={tuple(ranges)!r} repeats a crop range (its views "
                       f"would be stored twice)")
  get_int("records_per_shard", 1, " (images per unit and shard file)")
  get_int("batch_size_per_device", 1, " (images per device per step)")
  get_int("num_threads", 0, " (0 = min(32, CPU count))")
  get_int("prefetch_batches", 1, " (batches decoded ahead of the encoder)")
  every = get("log_every_seconds")
  if isinstance(every, bool) or not isinstance(every, (int, float)) or not every >= 0:
    raise ValueError(f"config.log_every_seconds={every!r} must be a number >= 0")


# ----------------------------------------------------------------------------- the run

def _prefetch(fn: Callable[[Any], Any], items: Iterable[Any],
              pool: concurrent.futures.Executor, depth: int) -> Iterator[Any]:
  """fn(item) for items, in order, with up to `depth` calls running ahead in `pool`."""
  items = iter(items)
  queue = collections.deque()
  for item in items:
    queue.append(pool.submit(fn, item))
    if len(queue) >= depth:
      yield queue.popleft().result()
  while queue:
    yield queue.popleft().result()


class _Progress:
  """Logs images/s and ETA of this process every `every_s` seconds."""

  def __init__(self, total: int, every_s: float):
    self.total, self.every_s, self.done = total, every_s, 0
    self.start = self.last = time.monotonic()

  def update(self, n: int, where: str, force: bool = False) -> None:
    self.done += n
    now = time.monotonic()
    if force or now - self.last >= self.every_s:
      self.last = now
      rate = self.done / max(now - self.start, 1e-9)
      eta = (self.total - self.done) / rate if rate > 0 else float("inf")
      logging.info("extract %s: %d/%d images of this process, %.1f images/s, ETA %.0f min",
                   where, self.done, self.total, rate, eta / 60)


def _shard_header(sources: Mapping[str, ImageSource], model: vq.VQModel,
                  config: ml_collections.ConfigDict) -> dict[str, Any]:
  """data.ShardWriter header fields (grid, vocab, classes, views, provenance in `extra`)."""
  class_names = {s: src.class_names for s, src in sources.items()}
  first = next(iter(class_names.values()))
  for split, names in class_names.items():
    if names != first:
      raise SourceError(f"split {split!r} has {len(names)} classes that differ from split "
                        f"{next(iter(class_names))!r}'s {len(first)}: labels would not agree")
  cfg = model.config
  size, ten = int(config.image_size), bool(config.ten_crop)
  if size % cfg.downsample_factor:
    raise ValueError(f"config.image_size={size} is not a multiple of the tokenizer's "
                     f"downsampling factor {cfg.downsample_factor}")
  ranges = [float(r) for r in config.crop_ranges] if ten else []
  names = preprocess.view_names(ten, ranges)
  layout = (f"views {', '.join(f'{i}={n}' for i, n in enumerate(names))}; "
            + ("per crop range: center_crop_arr(crop size), then torchvision TenCrop order tl, tr, "
               "bl, br, center, then the same five of the horizontally flipped square"
               if ten else "center_crop_arr(image_size) and its horizontal flip"))
  extra = {
      "source": {s: src.description for s, src in sources.items()},
      "class_names": list(first),
      "image_size": size,
      "ten_crop": ten,
      "crop_ranges": ranges,
      "crop_sizes": [preprocess.crop_size(size, r) for r in ranges],
      "view_names": names,
      "view_layout": layout,
      "preprocessing": "PIL RGB decode, ADM center_crop_arr, ToTensor, Normalize(0.5, 0.5)",
      "tokenizer": {"checkpoint": (config.vq_checkpoint if hub.is_remote(config.vq_checkpoint)
                                   else str(checkpoint.as_path(config.vq_checkpoint))),
                    "config": dataclasses.asdict(cfg)},
  }
  return dict(grid_size=size // cfg.downsample_factor, vocab_size=cfg.codebook_size,
              num_classes=len(first), num_views=len(names), extra=extra)


def _encode_and_write(examples: Iterable[tuple[np.ndarray, int]], writer: data.ShardWriter,
                      encode: Callable[[jax.Array], jax.Array], batch_sharding: Any,
                      step_images: int, on_written: Callable[[int], None]) -> list[int]:
  """Encodes (views VxSxSx3, label) examples `step_images` at a time and writes their records.

  Returns the labels written, in order. The last batch is zero-padded to the compiled shape.
  """
  labels, pending = [], None

  def flush(codes_BVxN, batch_labels):
    codes_BxVxN = np.asarray(codes_BVxN).reshape(step_images, -1, codes_BVxN.shape[-1])
    for label, codes_VxN in zip(batch_labels, codes_BxVxN):
      writer.write(label, codes_VxN)
    labels.extend(batch_labels)
    on_written(len(batch_labels))

  examples = iter(examples)
  while batch := list(itertools.islice(examples, step_images)):
    views_BxVxSxSx3 = np.stack([views for views, _ in batch])
    if len(batch) < step_images:
      pad = np.zeros((step_images - len(batch),) + views_BxVxSxSx3.shape[1:], np.float32)
      views_BxVxSxSx3 = np.concatenate([views_BxVxSxSx3, pad])
    # Placed explicitly: jit refuses sharded numpy inputs when there are several processes.
    views_BVxSxSx3 = jax.device_put(
        views_BxVxSxSx3.reshape((-1,) + views_BxVxSxSx3.shape[2:]), batch_sharding)
    # Dispatch is asynchronous: the previous batch is written while this one encodes.
    codes = encode(views_BVxSxSx3)
    if pending is not None:
      flush(*pending)
    pending = (codes, [label for _, label in batch])
  if pending is not None:
    flush(*pending)
  return labels


def _final_check(out: epath.Path, plan: extract_plan.Plan) -> data.ShardMetadata:
  """Process 0, after every process finished: markers vs plan, finalize, reopen every split."""
  num_classes = plan.header["num_classes"]
  for split, size in plan.split_sizes.items():
    total = 0
    for unit in range(plan.num_units):
      marker = extract_plan.read_marker(out, plan, split, unit)
      where = extract_plan.marker_path(out, split, unit)
      if marker is None:
        raise data.ShardError(f"{where}: unit {unit} of split {split!r} is not finished (a "
                              f"process failed or was stopped); rerun")
      if marker["num_records"] and not (0 <= marker["label_min"] <= marker["label_max"]
                                        < num_classes):
        raise data.ShardError(f"{where}: labels [{marker['label_min']}, "
                              f"{marker['label_max']}] outside [0, {num_classes})")
      total += marker["num_records"]
    if total != size:
      raise data.ShardError(f"split {split!r}: units hold {total} records, the source {size}")
  meta = data.finalize(out, num_processes=plan.num_units)
  if set(meta.splits) != set(plan.split_sizes):
    raise data.ShardError(f"{out}: manifests of splits {sorted(meta.splits)}, planned "
                          f"{sorted(plan.split_sizes)} (stale files of another run?)")
  for split, size in plan.split_sizes.items():
    if meta.num_records(split) != size:
      raise data.ShardError(f"{out}: split {split!r} has {meta.num_records(split)} records in "
                            f"{data.METADATA_FILE}, the source {size}")
    shards = data.open_split(out, split)  # Checks every file's record count.
    for index in {0, len(shards) - 1}:
      _ = shards[index]  # Decoding checks the header, label and token range.
  return meta


def extract(config: ml_collections.ConfigDict, *, sources: Mapping[str, ImageSource] | None = None,
            devices: Sequence[jax.Device] | None = None, process_index: int | None = None,
            process_count: int | None = None) -> data.ShardMetadata | None:
  """Runs (or resumes) the extraction described by `config` into `config.out`.

  Args:
    config: see configs/extract_imagenet.py.
    sources: split -> ImageSource, instead of the config's source and splits.
    devices: this process's encoding devices (default jax.local_devices()).
    process_index, process_count: this process's share of the units (default JAX's).
  Returns the finalized metadata on process 0, None on the others.
  """
  p = jax.process_index() if process_index is None else process_index
  num_p = jax.process_count() if process_count is None else process_count
  if not 0 <= p < num_p:
    raise ValueError(f"process_index={p} outside [0, process_count={num_p})")
  check_config(config)
  out = epath.Path(config.out)
  try:
    mesh = sharding.make_mesh(dict(config.mesh), list(devices or jax.local_devices()))
  except ValueError as e:
    raise ValueError(f"config.mesh={dict(config.mesh)}: {e}") from e
  if mesh.shape["tensor"] != 1:
    raise ValueError(f"config.mesh.tensor={mesh.shape['tensor']} must be 1: the tokenizer is "
                     f"replicated and only the batch is split")
  step_images = config.batch_size_per_device * mesh.devices.size
  sources = dict(open_sources(config) if sources is None else sources)
  for split in sources:
    data.check_split_name(split)  # data.ShardWriter's rule, checked before any work.
  if not config.vq_checkpoint:
    raise ValueError("config.vq_checkpoint is empty (vq-16, an hf:// path, a converted VQ dir, "
                     "or a .pt/.npz file)")
  model = load_lib.load_vq(config.vq_checkpoint)
  header = _shard_header(sources, model, config)
  plan = extract_plan.make_plan({s: len(src) for s, src in sources.items()},
                                config.records_per_shard, header)
  # The writers' own header check, run now (it does no I/O) so it cannot fail after the plan.
  data.ShardWriter(out, next(iter(sources)), records_per_shard=1, **plan.header)
  extract_plan.check_or_write_plan(out, plan, p)

  size, num_classes = header["extra"]["image_size"], header["num_classes"]
  encode = vq.make_encode_fn(model, mesh)
  batch_sharding = sharding.batch_sharding(mesh)

  mine = [(s, u) for s in sources for u in range(plan.num_units) if u % num_p == p]
  todo = [(s, u) for s, u in mine if extract_plan.read_marker(out, plan, s, u) is None]
  logging.info("extract process %d/%d: %d of its %d units already done; %d to do; %d images per "
               "step on %d devices", p, num_p, len(mine) - len(todo), len(mine), len(todo),
               step_images, mesh.devices.size)

  def load(item):
    split, index = item
    try:
      image, label, name = sources[split].load(index)
    except SourceError as e:
      raise SourceError(
          f"{e}. Replace or repair this image, then rerun to resume. Do not delete it: that "
          f"changes the image count of split {split!r}, which the plan in "
          f"{out / extract_plan.PLAN_FILE} fixes, so such a rerun is refused (it would have to "
          f"start over in an empty config.out)") from e
    if not 0 <= label < num_classes:
      raise SourceError(f"{name}: label {label} outside [0, num_classes={num_classes})")
    views = preprocess.image_views(image, size, header["extra"]["crop_ranges"],
                                   header["extra"]["ten_crop"])
    return views, label

  items = [(s, i) for s, u in todo for i in range(*plan.unit_range(s, u))]
  progress = _Progress(len(items), float(config.log_every_seconds))
  pool = concurrent.futures.ThreadPoolExecutor(config.num_threads or min(32, os.cpu_count() or 1))
  try:
    examples = _prefetch(load, items, pool, config.prefetch_batches * step_images)
    for split, unit in todo:
      start, end = plan.unit_range(split, unit)
      with data.ShardWriter(out, split, process_index=unit, records_per_shard=max(1, end - start),
                            **plan.header) as writer:
        labels = _encode_and_write(itertools.islice(examples, end - start), writer, encode,
                                   batch_sharding, step_images,
                                   functools.partial(progress.update, where=f"{split} unit {unit}"))
      fileio.write_json_atomic(extract_plan.marker_path(out, split, unit), {
          "start": start, "end": end, "num_records": len(labels),
          "label_min": min(labels, default=0), "label_max": max(labels, default=0)})
      progress.update(0, f"{split} unit {unit} done", force=True)
  finally:
    pool.shutdown(wait=True, cancel_futures=True)

  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("npp_jax.extract_codes: units done")
  meta = None
  if p == 0:
    meta = _final_check(out, plan)
    logging.info("extract: finalized %s: %s", out,
                 {s: meta.num_records(s) for s in meta.splits})
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("npp_jax.extract_codes: finalized")
  return meta


# ----------------------------------------------------------------------------- command line

def _define_flags():
  """The CLI's flags; defined only when run as a program (npp_jax.main also owns --config)."""
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "Extraction config file.", lock_config=True)
  distributed.define_flags()
  flags.adopt_module_key_flags(distributed)  # listed by --help
  flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  distributed.initialize_from_flags(sigterm_stops=True)  # resumes from what it wrote
  meta = extract(f.config)
  if meta is not None:
    print(f"Wrote {f.config.out}: " + ", ".join(f"{s} {meta.num_records(s)} records"
                                                for s in meta.splits)
          + f"; {meta.num_views} views of {meta.num_tokens} tokens each.")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
