"""Sampling CLI: the ADM-format `.npz` of N class-conditional samples, resumable in chunks.

Owns the label plan, the chunked `.npz` writer and the flags. The decoding itself is
`npp_jax/sample.py`, loading the weights `npp_jax/load.py`.

  python -m npp_jax.sample --pretrained=npp-b --out=DIR [--num_samples=50000] [--grid] ...
  python -m npp_jax.sample --config=configs/npp_b.py --checkpoint=DIR --out=DIR \
      [--num_samples=50000] [--per_device_batch=32] [--seed=0] [--labels=balanced|uniform] \
      [--png] [--grid] [--cfg_scale=2.0 --cfg_interval=-1 --temperature=1 --top_k=0 --top_p=1] \
      [--use_ema] [--decoder=auto|vq|builtin|tokens] [--mesh=data|config] [--method=sjd --window=k]

--pretrained names a released model (hub.PRETRAINED: npp-b ... npp-xxl, llamagen-b, llamagen-l):
its weights come from the Hugging Face Hub (downloaded and converted once, then cached), its
config from configs/ (unless --config is given) and the VQ-16 from the hub unless
config.sample.vq_checkpoint is set. --checkpoint is anything `load.load_model` takes: a params
checkpoint directory (converted weights), a training workdir (its latest step), a weight file,
`hf://OWNER/REPO/FILE` or a released name. Sampling parameters default to `config.sample.*`;
images are decoded with `config.sample.vq_checkpoint` (VQ-16) or a built-in data set's palette
(the demo). Writes:
  OUT/samples.npz        arr_0: uint8 [N, H, W, 3] (what the ADM evaluator reads), labels: int32 [N]
  OUT/chunks/chunk_*.npz one global batch each, written atomically; a restart skips finished ones
  OUT/run.json           the settings; a restart with different settings is refused
  OUT/png/{i:06d}.png    with --png;  OUT/grid.png  with --grid (config.sample.grid_classes)
Labels are class-balanced by default (as equal as possible, shuffled by --seed); --labels=uniform
draws them uniformly like the reference. Sample i depends only on --seed and i, not on the batch
size or the device count. `--mesh=data` (default) puts every device on the data axis (params
replicated, nothing gathered per step); `--mesh=config` uses config.mesh (FSDP, for models that
do not fit on one device). Multi-process: run the same command on every process.
"""
from __future__ import annotations

import importlib
import json
import time
import zipfile
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags
from PIL import Image

from npp_jax import distributed, fileio, hub, load, logs, sample, sharding

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the CLI's flags (only for the entry point, so importing this module is harmless)."""
  config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
  flags.DEFINE_enum("pretrained", None, list(hub.GPT_NAMES),
                    "A released model: weights from the hub, config from configs/, VQ-16.")
  flags.DEFINE_string("checkpoint", None, "Params checkpoint dir, training workdir, weight file, "
                      "hf://OWNER/REPO/FILE or a released name.")
  flags.DEFINE_string("out", None, "Output directory (local or gs://).")
  flags.DEFINE_integer("num_samples", 50000, "Number of images.")
  flags.DEFINE_integer("per_device_batch", 32, "Images per device per batch.")
  flags.DEFINE_integer("seed", 0, "Sampling seed (labels and tokens).")
  flags.DEFINE_enum("labels", "balanced", ["balanced", "uniform"], "Label distribution.")
  flags.DEFINE_bool("png", False, "Also write every image as OUT/png/{index:06d}.png.")
  flags.DEFINE_bool("grid", False, "Also write OUT/grid.png of config.sample.grid_classes.")
  flags.DEFINE_integer("grid_per_class", 4, "Images per class in the grid.")
  flags.DEFINE_bool("use_ema", False, "Use the EMA params of a training workdir.")
  flags.DEFINE_enum("decoder", "auto", ["auto", "vq", "builtin", "tokens"], "Codes -> images.")
  flags.DEFINE_enum("mesh", "data", ["data", "config"], "Device mesh (see the docstring).")
  flags.DEFINE_float("cfg_scale", None, "Default: config.sample.cfg_scale.")
  flags.DEFINE_integer("cfg_interval", None, "Default: config.sample.cfg_interval.")
  flags.DEFINE_float("temperature", None, "Default: config.sample.temperature.")
  flags.DEFINE_integer("top_k", None, "Default: config.sample.top_k.")
  flags.DEFINE_float("top_p", None, "Default: config.sample.top_p.")
  flags.DEFINE_enum("method", None, ["ar", "sjd"], "Decoding: ar = token by token (default), "
                    "sjd = speculative Jacobi decoding (same distribution, needs --window).")
  flags.DEFINE_integer("window", None, "sjd: draft tokens verified per forward pass.")
  distributed.define_flags()
  flags.adopt_module_key_flags(distributed)  # listed by --help


# ---------------------------------------------------------------------------------------------
# The CLI.
# ---------------------------------------------------------------------------------------------
def make_labels(num_samples: int, num_classes: int, seed: int, mode: str) -> np.ndarray:
  """int32 [num_samples]: balanced (counts differ by at most one, shuffled) or uniform."""
  if num_samples < 1:
    raise ValueError(f"num_samples={num_samples} must be >= 1.")
  rng = np.random.default_rng(seed)
  if mode == "balanced":
    return rng.permutation(np.arange(num_samples) % num_classes).astype(np.int32)
  if mode == "uniform":
    return rng.integers(0, num_classes, num_samples).astype(np.int32)
  raise ValueError(f"labels={mode!r} must be 'balanced' or 'uniform'.")


def _check_run(out: epath.Path, settings: dict) -> None:
  """Records the settings on the first run; refuses to resume a run made with other settings."""
  f = out / "run.json"
  if f.exists():
    try:
      old = json.loads(f.read_text())
    except (ValueError, UnicodeDecodeError) as e:
      raise ValueError(f"{f} is not valid JSON ({e}); delete it (or OUT) to start the run "
                       f"again.") from e
    diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
    if diff:
      raise ValueError(f"{f} was written with other settings ({{field: (then, now)}}: {diff}); "
                       f"use a new --out, or the same settings to resume.")
  elif jax.process_index() == 0:
    fileio.write_atomic(f, lambda fp: fp.write(json.dumps(settings, indent=2, sort_keys=True).encode()))


def _load_chunk(path: epath.Path, expected: int) -> dict[str, np.ndarray]:
  try:
    with path.open("rb") as f, np.load(f) as z:
      chunk = {k: z[k] for k in z.files}
  except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
    raise ValueError(f"chunk {path} cannot be read ({type(e).__name__}: {e}); delete it to "
                     f"sample it again.") from e
  images = chunk.get("images")
  if images is None or images.dtype != np.uint8 or len(images) != expected or images.ndim != 4:
    raise ValueError(f"chunk {path} is malformed (expected {expected} uint8 images); delete it "
                     f"to sample it again.")
  return chunk


def _assemble(out: epath.Path, chunk_files: list[epath.Path], sizes: list[int], png: bool) -> None:
  """Streams the chunks into OUT/samples.npz (no copy of all images in memory)."""
  first = _load_chunk(chunk_files[0], sizes[0])["images"]
  header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
            "shape": (sum(sizes), *first.shape[1:])}
  labels = []

  def write(f):
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
      with zf.open("arr_0.npy", "w", force_zip64=True) as arr:
        np.lib.format.write_array_header_2_0(arr, header)
        index = 0
        for path, size in zip(chunk_files, sizes):
          chunk = _load_chunk(path, size)
          if chunk["images"].shape[1:] != first.shape[1:]:
            raise ValueError(f"chunk {path} holds images of shape {chunk['images'].shape[1:]}, "
                             f"others {first.shape[1:]}.")
          arr.write(np.ascontiguousarray(chunk["images"]).tobytes())
          labels.append(chunk["labels"])
          if png:
            for img in chunk["images"]:
              with (out / "png" / f"{index:06d}.png").open("wb") as p:
                Image.fromarray(img).save(p, format="PNG")
              index += 1
      with zf.open("labels.npy", "w") as lab:
        np.lib.format.write_array(lab, np.concatenate(labels).astype(np.int32))

  if png:
    (out / "png").mkdir(parents=True, exist_ok=True)
  fileio.write_atomic(out / "samples.npz", write)


def run(config: ml_collections.ConfigDict, checkpoint: str, out: str, *, num_samples: int,
        per_device_batch: int = 32, seed: int = 0, labels: str = "balanced", png: bool = False,
        grid: bool = False, grid_per_class: int = 4, use_ema: bool = False,
        decoder: str = "auto", mesh: str = "data", max_chunks: int | None = None,
        **sampling_overrides: Any) -> dict:
  """Samples `num_samples` images into `out` (see the module docstring); resumes what is there.

  max_chunks stops after that many newly sampled chunks without assembling (tests simulate a
  pre-emption with it). Returns a summary: chunks sampled and skipped, whether complete, paths.
  """
  opts = sample.options_from_config(config, **sampling_overrides)
  if per_device_batch < 1:
    raise ValueError(f"per_device_batch={per_device_batch} must be >= 1.")
  if grid and grid_per_class < 1:
    raise ValueError(f"grid_per_class={grid_per_class} must be >= 1.")
  if mesh not in ("data", "config"):
    raise ValueError(f"mesh={mesh!r} must be 'data' or 'config'.")
  device_mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1} if mesh == "data"
                                   else dict(config.mesh))
  out = epath.Path(out)
  model = load.load_model(checkpoint, config, use_ema=use_ema, mesh=device_mesh)
  # The checkpoint's model_config.json wins over the config (load.load_model warns if they differ).
  num_classes = model.cfg.num_classes
  all_labels = make_labels(num_samples, num_classes, seed, labels)
  dec = sample.make_decoder(decoder, model.cfg, device_mesh,
                            vq_checkpoint=config.sample.vq_checkpoint, builtin=config.data.builtin)
  batch = per_device_batch * jax.device_count()
  num_chunks = -(-num_samples // batch)
  pad_labels = np.arange(num_chunks * batch - num_samples) % num_classes
  padded = np.concatenate([all_labels, pad_labels]).astype(np.int32)
  (out / "chunks").mkdir(parents=True, exist_ok=True)
  _check_run(out, dict(checkpoint=str(checkpoint), use_ema=use_ema, num_samples=num_samples,
                       chunk_size=batch, seed=seed, labels=labels, decoder=dec.name, **opts))
  sampler = sample.make_sampler(model, device_mesh, **opts)
  base = jax.random.fold_in(jax.random.key(seed), 0)
  files = [out / "chunks" / f"chunk_{i:05d}.npz" for i in range(num_chunks)]
  sizes = [min(batch, num_samples - i * batch) for i in range(num_chunks)]
  done, skipped, t0 = 0, 0, time.time()
  for i, (path, size) in enumerate(zip(files, sizes)):
    if path.exists():
      skipped += 1
      continue
    if max_chunks is not None and done >= max_chunks:
      return dict(sampled=done, skipped=skipped, complete=False, out=str(out))
    codes = sampler(padded[i * batch:(i + 1) * batch], base, i * batch)
    images = dec(codes)[:size]
    codes = sample.to_host(codes)[:size]
    if jax.process_index() == 0:
      chunk = dict(images=images, labels=padded[i * batch:i * batch + size], codes=codes)
      fileio.write_atomic(path, lambda f: np.savez(f, **chunk))
    done += 1
    rate = done * batch / (time.time() - t0)
    remaining = sum(sizes[i + 1:])
    logging.info("chunk %d/%d: %.2f images/s, ETA %.0f s", i + 1, num_chunks, rate,
                 remaining / rate)
  if jax.process_index() == 0:
    _assemble(out, files, sizes, png)
  if grid:  # every process takes part in sampling; process 0 writes.
    image = sample.sample_grid(model, device_mesh, config.sample.grid_classes,
                               jax.random.fold_in(jax.random.key(seed), 1), decoder=dec,
                               per_class=grid_per_class, **opts)
    if jax.process_index() == 0:
      with (out / "grid.png").open("wb") as f:
        Image.fromarray(image).save(f, format="PNG")
  logging.info("Wrote %s (%d images; %d chunks sampled, %d resumed).", out / "samples.npz",
               num_samples, done, skipped)
  return dict(sampled=done, skipped=skipped, complete=True, out=str(out))


def pretrained_config(name: str) -> ml_collections.ConfigDict:
  """The experiment config of released model `name`, decoding with the hub's VQ-16."""
  config = importlib.import_module(f"configs.{hub.PRETRAINED[name].config}").get_config()
  config.sample.vq_checkpoint = "vq-16"
  return config


def _config_and_checkpoint() -> tuple[ml_collections.ConfigDict, str]:
  """The config and checkpoint the flags name (--pretrained fills what is not given)."""
  name = FLAGS.pretrained
  if FLAGS.out is None:
    raise app.UsageError("--out is required.")
  if name is None and (FLAGS.config is None or FLAGS.checkpoint is None):
    raise app.UsageError("--config and --checkpoint are required (or --pretrained=NAME).")
  if name is not None:
    entry = hub.PRETRAINED[name]
    logging.info("%s (%s): its paper reports FID %s at CFG %s on 50k samples.", name, entry.path,
                 entry.fid, entry.cfg_scale)
  if FLAGS.config is None:
    return pretrained_config(name), FLAGS.checkpoint or name
  config = FLAGS.config
  if name is not None and not config.sample.vq_checkpoint:
    config.sample.vq_checkpoint = "vq-16"
  return config, FLAGS.checkpoint or name


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logs.quiet_library_logs()
  config, checkpoint = _config_and_checkpoint()
  distributed.initialize_from_flags(sigterm_stops=True)  # resumes from what it wrote
  run(config, checkpoint, FLAGS.out, num_samples=FLAGS.num_samples,
      per_device_batch=FLAGS.per_device_batch, seed=FLAGS.seed, labels=FLAGS.labels,
      png=FLAGS.png, grid=FLAGS.grid, grid_per_class=FLAGS.grid_per_class,
      use_ema=FLAGS.use_ema, decoder=FLAGS.decoder, mesh=FLAGS.mesh, cfg_scale=FLAGS.cfg_scale,
      cfg_interval=FLAGS.cfg_interval, temperature=FLAGS.temperature, top_k=FLAGS.top_k,
      top_p=FLAGS.top_p, method=FLAGS.method, window=FLAGS.window)


if __name__ == "__main__":
  define_flags()
  app.run(main)
