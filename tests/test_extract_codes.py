"""Tests for npp_jax.extract_codes and npp_jax.image_sources: end-to-end extraction
from an image folder and a mock tfds ImageNet, resumability, device/process invariance, errors."""
import functools
import logging
import os
import pathlib
import re
import shutil
import subprocess
import sys

from flax import nnx
import jax
import numpy as np
from PIL import Image
import pytest

from configs import extract_imagenet
from naming import raises_naming
from npp_jax import data, extract_codes, extract_plan, image_sources, load, preprocess, vq
from npp_jax import vq_weights

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY_VQ = vq.VQConfig(ch=32, ch_mult=(1, 1, 1), num_res_blocks=1, z_channels=32, codebook_size=64,
                      codebook_embed_dim=8)  # 32 px -> 8x8 tokens, fast to encode.
CLASSES = ("n03", "n01", "n02")  # Created unsorted; labels follow sorted names.
SIZES = ((40, 32), (33, 50), (80, 72), (100, 90))  # (w, h); 80x72 and 100x90 get BOX-halved.


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def vq_path(tmp_path_factory):
  """A random tiny VQ as a reference-layout state dict .npz (what a converter would read)."""
  rng = np.random.default_rng(0)
  sd = {}
  for key, shape in vq_weights.expected_state_dict_shapes(TINY_VQ).items():
    if len(shape) == 4:  # Conv weights, PyTorch's default init range.
      sd[key] = rng.uniform(-1, 1, shape).astype(np.float32) / np.sqrt(np.prod(shape[1:]))
    elif "norm" in key and key.endswith("weight"):
      sd[key] = np.ones(shape, np.float32)
    else:  # Biases and the codebook.
      sd[key] = rng.normal(0, 1.0 if key.startswith("quantize") else 0.1, shape).astype(np.float32)
  path = tmp_path_factory.mktemp("vq") / "tiny_vq.npz"
  np.savez(path, **sd)
  return str(path)


@pytest.fixture(scope="module")
def model(vq_path):
  return load.load_vq(vq_path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """3 classes x 4 JPEGs of different sizes, plus a nested image and a non-image file."""
  root = tmp_path_factory.mktemp("imagenet") / "train"
  rng = np.random.default_rng(1)
  for c in CLASSES:
    (root / c).mkdir(parents=True)
    for j, (w, h) in enumerate(SIZES):
      yy, xx = np.mgrid[:h, :w]
      img = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 127 // (w + h)], -1)
      img = np.clip(img + rng.integers(-40, 40, img.shape), 0, 255).astype(np.uint8)
      Image.fromarray(img).save(root / c / f"img{3 - j}.JPEG", quality=92)
  (root / "n01" / "notes.txt").write_text("not an image")
  (root / "n01" / "sub").mkdir()
  Image.fromarray(np.full((36, 36, 3), 200, np.uint8)).save(root / "n01" / "sub" / "a.jpeg")
  return root


def _config(folder, vq_path, out, **overrides):
  c = extract_imagenet.get_config("mock")
  c.folder.train = str(folder)
  c.vq_checkpoint = vq_path
  c.out = str(out)
  c.update(overrides)
  return c


def _expected_records(folder):
  """(path, label) in ImageFolder order: sorted classes, sorted os.walk, sorted names."""
  out = []
  for label, c in enumerate(sorted(CLASSES)):
    for dirpath, _, names in sorted(os.walk(folder / c)):
      out += [(os.path.join(dirpath, n), label) for n in sorted(names) if not n.endswith(".txt")]
  return out


def _files(out):
  """Every shard byte and the metadata, to compare whole outputs."""
  out = pathlib.Path(out)
  return {p.name: p.read_bytes() for p in sorted(out.glob("*.array_record"))} | {
      "metadata": (out / data.METADATA_FILE).read_text()}


@functools.cache
def _jit_encode():
  return jax.jit(lambda graphdef, state, x: nnx.merge(graphdef, state).encode_to_indices(x))


def _encode_directly(model, views_BxSxSx3):
  graphdef, state = nnx.split(model)
  return np.asarray(_jit_encode()(graphdef, state, views_BxSxSx3))


_MAKE_ENCODE_FN = vq.make_encode_fn
_ENCODE_FNS = {}  # device ids -> encode fn of the tiny VQ, shared by the tests below.


@pytest.fixture
def shared_encode(monkeypatch, model):
  """make_encode_fn with one jitted function per device set, so tests do not recompile it per
  run (every test uses the same tiny VQ). Returns ([calls], [fail at call k or None])."""
  calls, fail_at = [0], [None]

  def make(unused_model, mesh):
    key = tuple(d.id for d in mesh.devices.flat)
    if key not in _ENCODE_FNS:
      _ENCODE_FNS[key] = _MAKE_ENCODE_FN(model, mesh)

    def call(x):
      calls[0] += 1
      if fail_at[0] is not None and calls[0] >= fail_at[0]:
        raise RuntimeError("simulated preemption")
      return _ENCODE_FNS[key](x)
    return call

  monkeypatch.setattr(extract_codes.vq, "make_encode_fn", make)
  return calls, fail_at


@pytest.fixture(scope="module")
def clean_run(folder, vq_path, tmp_path_factory):
  """One uninterrupted run through the real code path (8 devices, 8 images per step)."""
  out = tmp_path_factory.mktemp("clean") / "codes"
  meta = extract_codes.extract(_config(folder, vq_path, out))
  return out, meta


# ----------------------------------------------------------------------------- end to end

def _check_against_direct_encoding(out, model, records, views_fn, num_views):
  shards = data.open_split(out, "train")
  assert len(shards) == len(records)
  assert shards.metadata.num_views == num_views
  views = np.concatenate([views_fn(p) for p, _ in records])
  want_codes = _encode_directly(model, views).reshape(len(records), num_views, -1)
  assert len(np.unique(want_codes)) > 10  # The tiny VQ really discriminates.
  for i, (_, label) in enumerate(records):
    rec = shards[i]
    assert rec["label"] == label
    np.testing.assert_array_equal(rec["codes"], want_codes[i], err_msg=f"record {i}")


def test_folder_end_to_end(clean_run, folder, model):
  out, meta = clean_run
  records = _expected_records(folder)
  assert len(records) == 13 and meta.num_records("train") == 13
  assert meta.num_classes == 3 and meta.grid_size == 8 and meta.vocab_size == 64
  assert meta.extra["class_names"] == sorted(CLASSES)
  assert meta.extra["view_names"][:2] == ["1.1/tl", "1.1/tr"]
  assert meta.extra["crop_sizes"] == [35, 33]
  assert [n for _, n in meta.splits["train"]] == [3, 3, 3, 4]  # 4 near-equal units of <= 4.
  views_fn = lambda p: preprocess.image_views(Image.open(p).convert("RGB"), 32, (1.1, 1.05))
  _check_against_direct_encoding(out, model, records, views_fn, 20)


@pytest.fixture(scope="module")
def val_folder(folder):
  """A validation split with the same classes, one image each (3 images for 4 units)."""
  root = folder.parent / "val"
  for c in CLASSES:
    (root / c).mkdir(parents=True)
    shutil.copy(folder / c / "img0.JPEG", root / c / "img0.JPEG")
  return root


def test_two_splits_without_ten_crop(folder, val_folder, vq_path, model, tmp_path, shared_encode,
                                     caplog):
  caplog.set_level(logging.INFO, logger="absl")
  config = _config(folder, vq_path, tmp_path / "codes", ten_crop=False,
                   splits=("train", "validation"))
  config.folder.validation = str(val_folder)
  meta = extract_codes.extract(config, devices=jax.devices()[:1])
  assert meta.num_views == 2 and meta.extra["view_names"] == ["center", "center_flip"]
  assert meta.extra["crop_ranges"] == []
  # Both splits have 4 units (data.finalize's rule); validation's unit 0 is empty.
  assert [n for _, n in meta.splits["validation"]] == [1, 1, 1]
  assert meta.splits["validation"][0][0] == "validation-00001-00000.array_record"
  views_fn = lambda p: preprocess.image_views(Image.open(p).convert("RGB"), 32, (),
                                              ten_crop_views=False)
  _check_against_direct_encoding(tmp_path / "codes", model, _expected_records(folder), views_fn, 2)
  val = data.open_split(tmp_path / "codes", "validation")
  same_image = [p for p, _ in _expected_records(folder)].index(str(folder / "n02" / "img0.JPEG"))
  np.testing.assert_array_equal(
      val[1]["codes"], data.open_split(tmp_path / "codes", "train")[same_image]["codes"])
  assert [val[i]["label"] for i in range(3)] == [0, 1, 2]
  assert re.search(r"validation unit 3 done: 16/16 images of this process, [\d.]+ images/s, "
                   r"ETA 0 min", caplog.text)


def test_resume_skips_finished_units_and_matches_clean_run(clean_run, folder, vq_path, tmp_path,
                                                           shared_encode):
  calls, fail_at = shared_encode
  out = tmp_path / "codes"
  # One device, one image per step: 3 + 3 + 3 + 4 encode calls. Fail on the 6th: unit 0 is done;
  # unit 1 has its first record written (a batch is written after the next one is dispatched)
  # but no manifest.
  config = _config(folder, vq_path, out)
  devices = jax.devices()[:1]
  fail_at[0] = 6
  with pytest.raises(RuntimeError, match="simulated preemption"):
    extract_codes.extract(config, devices=devices)
  assert (out / "train-00001-00000.array_record").exists()
  assert not (out / data.MANIFEST_DIR / "train-00001.json").exists()
  assert sorted(p.name for p in (out / extract_plan.UNIT_DIR).iterdir()) == ["train-00000.json"]
  assert not (out / data.METADATA_FILE).exists()

  calls[0], fail_at[0] = 0, None
  extract_codes.extract(config, devices=devices)
  assert calls[0] == 3 + 3 + 4  # Units 1, 2, 3 only.
  assert _files(out) == _files(clean_run[0])

  # Lose a finished unit (its marker and file): only that unit is redone.
  (out / extract_plan.UNIT_DIR / "train-00002.json").unlink()
  (out / "train-00002-00000.array_record").unlink()
  calls[0] = 0
  extract_codes.extract(config, devices=devices)
  assert calls[0] == 3
  assert _files(out) == _files(clean_run[0])

  # A complete output is left alone.
  calls[0] = 0
  extract_codes.extract(config, devices=devices)
  assert calls[0] == 0 and _files(out) == _files(clean_run[0])


def test_output_independent_of_devices_batch_and_processes(clean_run, folder, vq_path, tmp_path,
                                                           shared_encode):
  # One device, one image per step (batches and padding differ from the 8-device clean run).
  one = tmp_path / "one_device"
  extract_codes.extract(_config(folder, vq_path, one), devices=jax.devices()[:1])
  assert _files(one) == _files(clean_run[0])
  # Two processes (run one after the other here): process 1 does units 1 and 3 and does not
  # finalize; process 0 does units 0 and 2, then checks and finalizes.
  two = tmp_path / "two_processes"
  config = _config(folder, vq_path, two)
  assert extract_codes.extract(config, process_index=1, process_count=2) is None
  assert sorted(p.name for p in (two / extract_plan.UNIT_DIR).iterdir()) == [
      "train-00001.json", "train-00003.json"]
  assert not (two / data.METADATA_FILE).exists()
  meta = extract_codes.extract(config, process_index=0, process_count=2)
  assert meta.num_records("train") == 13
  assert _files(two) == _files(clean_run[0])


@pytest.mark.slow  # ~25 s here: the mock encodes its JPEGs with TensorFlow (import ~10 s).
def test_tfds_mock_imagenet_end_to_end(vq_path, model, tmp_path, shared_encode):
  tfds = pytest.importorskip("tensorflow_datasets")
  config = _config("", vq_path, tmp_path / "codes", source="tfds", splits=("train",))
  with tfds.testing.mock_data(num_examples=5, policy=tfds.testing.MockPolicy.USE_CODE):
    meta = extract_codes.extract(config, devices=jax.devices()[:1])
    raw = tfds.data_source("imagenet2012", split="train",
                           decoders={"image": tfds.decode.SkipDecoding()})
    examples = [raw[i] for i in range(len(raw))]
  assert meta.num_records("train") == 5 and meta.num_classes == 1000
  assert meta.extra["source"] == {"train": "tfds:imagenet2012/train"}
  shards = data.open_split(tmp_path / "codes", "train")
  views = np.concatenate([
      preprocess.image_views(image_sources.decode_image(ex["image"], "x"), 32, (1.1, 1.05))
      for ex in examples])
  want = _encode_directly(model, views).reshape(5, 20, -1)
  for i, ex in enumerate(examples):
    assert shards[i]["label"] == int(ex["label"])
    np.testing.assert_array_equal(shards[i]["codes"], want[i])


# ----------------------------------------------------------------------------- bad input

class _ListSource:
  """In-memory ImageSource (labels as given, possibly out of range)."""
  description = "list"

  def __init__(self, labels, num_classes):
    self.labels, self.class_names = labels, tuple(f"c{i}" for i in range(num_classes))

  def __len__(self):
    return len(self.labels)

  def load(self, index):
    return Image.new("RGB", (40, 40), (index * 40, 0, 0)), self.labels[index], f"item {index}"


def test_load_vq_from_converted_dir_and_npz(vq_path, model, tmp_path):
  from npp_jax import convert
  convert.convert_checkpoint("vq", vq_path, tmp_path / "converted")
  for m in (load.load_vq(str(tmp_path / "converted")), load.load_vq(vq_path)):
    assert m.config == TINY_VQ
    for a, b in zip(jax.tree.leaves(nnx.state(m)), jax.tree.leaves(nnx.state(model))):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match="VQ checkpoint"):
    load.load_vq("")


def test_missing_and_empty_folders(tmp_path):
  with raises_naming(image_sources.SourceError, tmp_path / "nowhere"):
    image_sources.FolderSource(tmp_path / "nowhere")
  (tmp_path / "root" / "a").mkdir(parents=True)
  (tmp_path / "root" / "b").mkdir()
  Image.new("RGB", (8, 8)).save(tmp_path / "root" / "a" / "x.JPEG")
  (tmp_path / "root" / "b" / "readme.txt").write_text("no images here")
  with raises_naming(image_sources.SourceError, tmp_path / "root" / "b"):
    image_sources.FolderSource(tmp_path / "root")
  (tmp_path / "flat").mkdir()
  Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "x.JPEG")
  with raises_naming(image_sources.SourceError, tmp_path / "flat"):
    image_sources.FolderSource(tmp_path / "flat")


def test_corrupt_jpeg_names_the_file(folder, vq_path, tmp_path, shared_encode):
  root = tmp_path / "train"
  shutil.copytree(folder, root)
  (root / "n02" / "img1.JPEG").write_bytes(b"\xff\xd8\xff\xe0 truncated")
  with raises_naming(image_sources.SourceError, root / "n02" / "img1.JPEG"):
    extract_codes.extract(_config(root, vq_path, tmp_path / "codes"), devices=jax.devices()[:1])
  assert not (tmp_path / "codes" / data.METADATA_FILE).exists()


def test_label_out_of_range_names_the_image(vq_path, tmp_path, shared_encode):
  config = _config("", vq_path, tmp_path / "codes")
  with raises_naming(image_sources.SourceError, "item 2", "num_classes=3"):
    extract_codes.extract(config, sources={"train": _ListSource([0, 1, 3, 2], 3)},
                          devices=jax.devices()[:1])


def test_bad_config_and_changed_plan(folder, vq_path, tmp_path, clean_run, shared_encode):
  with pytest.raises(ValueError, match="config.source='imagenet'"):
    extract_codes.extract(_config(folder, vq_path, tmp_path / "a", source="imagenet"))
  with raises_naming(ValueError, "config.folder", ['validation']):
    extract_codes.extract(_config(folder, vq_path, tmp_path / "a", splits=("train", "validation")))
  with pytest.raises(FileNotFoundError, match="missing.npz"):
    extract_codes.extract(_config(folder, str(tmp_path / "missing.npz"), tmp_path / "a"))
  other = tmp_path / "other_classes"
  (other / "n09").mkdir(parents=True)
  Image.new("RGB", (8, 8)).save(other / "n09" / "x.JPEG")
  config = _config(folder, vq_path, tmp_path / "a", splits=("train", "validation"))
  config.folder.validation = str(other)
  with raises_naming(image_sources.SourceError, "'validation'", "'train'"):
    extract_codes.extract(config)
  with raises_naming(image_sources.SourceError, "'imagenet2012'", "'train'",
                     tmp_path / "no_tfds_here", "ArrayRecord"):
    image_sources.TfdsSource("imagenet2012", "train", str(tmp_path / "no_tfds_here"))
  # Resuming into the clean run's directory with another unit size is refused.
  out = tmp_path / "copy"
  shutil.copytree(clean_run[0], out)
  with raises_naming(ValueError, out, "extract_plan.json", "num_units",
                     "config.records_per_shard", 4, 3):
    extract_codes.extract(_config(folder, vq_path, out, records_per_shard=5))
  with raises_naming(ValueError, "header.extra.crop_ranges[0]", 1.1, 1.2,
                     "header.extra.crop_sizes[0]", 35, 38):
    extract_codes.extract(_config(folder, vq_path, out, crop_ranges=(1.2, 1.05)))


@pytest.mark.parametrize("overrides, names", [
    ({"crop_ranges": ()}, ("config.crop_ranges", "()")),
    ({"crop_ranges": (1.1, 0.9)}, ("config.crop_ranges", "(1.1, 0.9)")),
    ({"crop_ranges": (1.1, 1.1)}, ("config.crop_ranges", "(1.1, 1.1)")),
    ({"image_size": 0}, ("config.image_size", 0)),
    ({"image_size": 30}, ("config.image_size", 30)),
    ({"num_threads": -1}, ("config.num_threads", -1)),
    ({"batch_size_per_device": 0}, ("config.batch_size_per_device", 0)),
    ({"records_per_shard": 0}, ("config.records_per_shard", 0)),
    ({"prefetch_batches": 0}, ("config.prefetch_batches", 0)),
    ({"log_every_seconds": -1.0}, ("config.log_every_seconds", -1.0)),
    ({"mesh": {"data": -1, "fsdp": 3}}, ("config.mesh", "'fsdp': 3", 8)),
    ({"mesh": {"data": -1, "tensor": 2}}, ("config.mesh.tensor", 2)),
    ({"out": ""}, ("config.out",)),
])
def test_bad_config_value_names_the_key_and_writes_nothing(folder, vq_path, tmp_path, overrides,
                                                           names):
  """Refused before the plan is written, so the corrected rerun is not 'planned differently'."""
  config = _config(folder, vq_path, tmp_path / "codes")
  config.update(overrides)
  with raises_naming(ValueError, *names):
    extract_codes.extract(config)
  assert not (tmp_path / "codes").exists()


def test_crop_ranges_unused_without_ten_crop(folder, vq_path, tmp_path):
  extract_codes.check_config(_config(folder, vq_path, tmp_path, ten_crop=False, crop_ranges=()))


def _tree(root):
  return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_foreign_output_directory_is_refused_untouched(folder, vq_path, tmp_path):
  from npp_jax import digits
  out = digits.build_digits_shards(tmp_path / "digits")  # Also writes train-00000-00000...
  before = _tree(pathlib.Path(out))
  with raises_naming(ValueError, "config.out", out, "manifests", "metadata.json",
                     "train-00000-00000.array_record", "extract_plan.json"):
    extract_codes.extract(_config(folder, vq_path, out))
  assert _tree(pathlib.Path(out)) == before
  (tmp_path / "a_file").write_text("x")
  with raises_naming(ValueError, "config.out", tmp_path / "a_file"):
    extract_codes.extract(_config(folder, vq_path, tmp_path / "a_file"))


def test_bad_image_says_replace_not_delete_and_rerun_resumes(folder, vq_path, tmp_path,
                                                             shared_encode):
  root, out = tmp_path / "train", tmp_path / "codes"
  shutil.copytree(folder, root)
  out.mkdir()  # An existing empty directory is fine.
  bad = root / "n01" / "a0.JPEG"  # Sorts first: the first image loaded.
  bad.symlink_to(tmp_path / "gone.JPEG")
  config = _config(root, vq_path, out)
  devices = jax.devices()[:1]
  with raises_naming(image_sources.SourceError, bad, "Replace", "delete"):  # replace, not delete
    extract_codes.extract(config, devices=devices)
  bad.unlink()
  bad.write_bytes(b"")  # Still bad, but the same images: the plan accepts the rerun.
  with raises_naming(image_sources.SourceError, bad, "Replace"):
    extract_codes.extract(config, devices=devices)
  bad.unlink()
  with raises_naming(ValueError, "split_sizes.train", 14, 13, out, "config.out"):
    extract_codes.extract(config, devices=devices)
  shutil.copy(root / "n01" / "img0.JPEG", bad)
  assert extract_codes.extract(config, devices=devices).num_records("train") == 14


def test_plan_names_differing_leaf_keys_and_ignores_path_spelling(clean_run, folder, vq_path,
                                                                  tmp_path, monkeypatch,
                                                                  shared_encode):
  out = tmp_path / "copy"
  shutil.copytree(clean_run[0], out)
  calls, _ = shared_encode
  # The same VQ file and image folder by relative paths: the same plan, nothing left to do.
  monkeypatch.chdir(pathlib.Path(vq_path).parent)
  config = _config(os.path.relpath(folder), "tiny_vq.npz", out)
  assert extract_codes.extract(config).num_records("train") == 13
  assert calls[0] == 0 and _files(out) == _files(clean_run[0])
  # Another VQ file: the leaf key and both paths are named.
  shutil.copy(vq_path, "other.npz")
  with raises_naming(ValueError, "header.extra.tokenizer.checkpoint", "tiny_vq.npz",
                     "other.npz"):
    extract_codes.extract(_config(folder, "other.npz", out))


def test_config_variants():
  assert extract_imagenet.get_config().image_size == 256
  assert extract_imagenet.get_config().crop_ranges == (1.1, 1.05)
  assert extract_imagenet.get_config("folder").source == "folder"
  with raises_naming(ValueError, "variant", "'384'"):
    extract_imagenet.get_config("384")


# ----------------------------------------------------------------------------- multi-process

@pytest.mark.slow
def test_two_processes_command_line(clean_run, folder, vq_path, tmp_path):
  """`python -m npp_jax.extract_codes` in 2 JAX processes (2 CPU devices each) on localhost."""
  portpicker = pytest.importorskip("portpicker")
  port = portpicker.pick_unused_port()
  out = tmp_path / "codes"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen(
      [sys.executable, "-m", "npp_jax.extract_codes", "--config=configs/extract_imagenet.py:mock",
       f"--config.folder.train={folder}", f"--config.vq_checkpoint={vq_path}",
       f"--config.out={out}", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
       f"--process_id={i}"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True) for i in range(2)]
  logs = [p.communicate(timeout=240)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], logs
  assert "Wrote" in logs[0] and "train 13 records" in logs[0]
  assert _files(out) == _files(clean_run[0])
