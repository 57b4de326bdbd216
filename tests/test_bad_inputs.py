"""Every bad input gets a clear error that names the offending thing, and leaves an existing
checkpoint in the workdir untouched.

One module-level workdir holds a real checkpoint (a 2-step smoke run); almost every case runs
`train.train_and_evaluate` against it with one bad input and asserts (a) the exception type, (b)
that its message names the key / file / record, (c) that the checkpoint files hash the same before
and after. Config errors are raised before data is read and before anything compiles. Files from
outside (shards, metadata.json, checkpoints) are parsed, never unpickled or imported: hostile
pickle payloads below would create a marker file if anything ran them.
"""
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time

from array_record.python import array_record_module
import numpy as np
import pytest

from naming import raises_naming
from npp_jax import checkpoint as ckpt_lib
from npp_jax import config_lib, convert, data, train
from npp_jax import model as model_lib
from train_helpers import (ROOT, VOCAB, committed_steps, main_command, main_env, read_state,
                           smoke_config, tree_hash, wait_for)

TRAIN_FILE = "train-00000-00000.array_record"


@pytest.fixture(scope="module")
def trained_workdir(shards, tmp_path_factory):
  """A workdir with committed checkpoints at steps 1 and 2 of the smoke run."""
  wd = tmp_path_factory.mktemp("workdir")
  train.train_and_evaluate(config(shards, **{"ckpt.every_steps": 1}), str(wd), max_steps=2)
  assert committed_steps(wd / "checkpoints") == [1, 2]
  return wd


@pytest.fixture
def workdir(trained_workdir, tmp_path):
  """This test's copy of the trained workdir (a failing case cannot spoil the next one)."""
  wd = tmp_path / "workdir"
  shutil.copytree(trained_workdir, wd)
  return wd


def config(shards, **overrides):
  return smoke_config(shards, **{"data.eval_split": "", **overrides})


def expect_error(cfg, workdir, exc, *names, max_steps=None, allow_config_change=False):
  """Runs the trainer on `workdir` expecting `exc` whose message names each of `names` (config
  keys, values, files: see `raises_naming`); asserts the checkpoints there are byte-identical
  afterwards. Returns the error."""
  before = tree_hash(workdir / "checkpoints") if (workdir / "checkpoints").exists() else None
  with raises_naming(exc, *names) as err:
    train.train_and_evaluate(cfg, str(workdir), max_steps=max_steps,
                             allow_config_change=allow_config_change)
  if before is not None:
    assert tree_hash(workdir / "checkpoints") == before, "the checkpoint was modified"
  return err.value


# ------------------------------------------------------------------------------- config values

# Each case: config overrides, and what the error must name (the key(s) and the bad value(s)).
CONFIG_CASES = {
    "batch_not_divisible_by_devices": ({"global_batch_size": 12},
                                       ("config.global_batch_size", 12, "fsdp", 8)),
    "batch_zero": ({"global_batch_size": 0}, ("config.global_batch_size", 0)),
    "patch_not_dividing_grid": ({"npp.patch_sizes": (3, 1)}, ("level 0", 3, "16x16")),
    "levels_beyond_grid": ({"npp.num_levels": 6, "npp.epochs": 300}, ("level 0", 32, "16x16")),
    "levels_beyond_epochs": ({"npp.num_levels": 4},
                             ("npp.epochs", "npp.num_levels", 4, "npp.segment_factor")),
    "lambda_above_one": ({"npp.segment_factor": 1.5}, ("npp.segment_factor", 1.5)),
    "lambda_zero": ({"npp.segment_factor": 0.0}, ("npp.segment_factor", 0.0)),
    "fractions_not_summing_to_one": ({"npp.patch_sizes": (2, 1), "npp.fractions": (0.5, 0.6)},
                                     ("npp.fractions", (0.5, 0.6))),
    "fractions_without_patch_sizes": ({"npp.fractions": (0.3, 0.7)},
                                      ("config.npp.fractions", (0.3, 0.7),
                                       "config.npp.patch_sizes")),
    "zero_epochs": ({"npp.epochs": 0}, ("config.npp.epochs", 0)),
    "unknown_variant": ({"model.variant": "Q"}, ("config.model.variant", "'Q'")),
    "dropout_one": ({"model.resid_dropout": 1.0}, ("model.resid_dropout", 1.0)),
    "unknown_dtype": ({"model.dtype": "float16"}, ("model.dtype", "'float16'")),
    "unknown_remat": ({"model.remat": "everything"}, ("model.remat", "'everything'")),
    "kv_heads_not_dividing_heads": ({"model.n_kv_head": 3},
                                    ("model.n_head", 4, "model.n_kv_head", 3)),
    "head_dim_breaks_2d_rope": ({"model.dim": 72},
                                ("config.model.dim", "config.model.n_head", "head_dim", 18)),
    "mesh_not_dividing_devices": ({"mesh.tensor": 3}, ("config.mesh", "'tensor': 3", 8)),
    "mesh_needs_more_devices": ({"mesh.data": 2, "mesh.fsdp": 8},
                                ("config.mesh", "'data': 2", "'fsdp': 8", 16)),
    "mesh_unknown_axis": ({"mesh.pipeline": 2}, ("config.mesh", ['pipeline'])),
    "mesh_zero_axis": ({"mesh.data": 0}, ("config.mesh.data", 0)),
    "heads_not_split_by_tensor": ({"mesh.fsdp": 1, "mesh.tensor": 8},
                                  ("config.model.n_head", 4, "config.mesh.tensor", 8)),
    "vocab_not_split_by_tensor": ({"mesh.fsdp": 4, "mesh.tensor": 2, "model.vocab_size": 65},
                                  ("config.model.vocab_size", 65, "config.mesh.tensor", 2)),
    "dim_not_split_by_fsdp": ({"model.dim": 68, "model.n_head": 1},
                              ("config.model.dim", 68, "config.mesh.fsdp", 8)),
    "negative_lr": ({"optim.lr": -1.0}, ("config.optim.lr", -1.0)),
    "nan_lr": ({"optim.lr": float("nan")}, ("config.optim.lr", "nan")),
    "b2_one": ({"optim.b2": 1.0}, ("config.optim.b2", 1.0)),
    "zero_grad_clip": ({"optim.grad_clip": 0.0}, ("config.optim.grad_clip", 0.0)),
    "negative_warmup": ({"optim.warmup_epochs": -1.0}, ("config.optim.warmup_epochs", -1.0)),
    "keep_zero_checkpoints": ({"ckpt.keep": 0}, ("config.ckpt.keep", 0)),
    "log_every_zero": ({"log_every_steps": 0}, ("config.log_every_steps", 0)),
    "negative_sample_every": ({"sample_every_steps": -1}, ("config.sample_every_steps", -1)),
    "sampling_without_decoder": ({"sample_every_steps": 2},
                                 ("config.sample_every_steps", 2, "config.sample.vq_checkpoint")),
    "negative_seed": ({"seed": -1}, ("config.seed", -1)),
    "zero_eval_batches": ({"eval_batches": 0}, ("config.eval_batches", 0)),
    "negative_profile_steps": ({"profile_steps": -2}, ("config.profile_steps", -2)),
    "unknown_builtin_data": ({"data.builtin": "mnist"}, ("config.data.builtin", "'mnist'")),
    "empty_data_path": ({"data.path": ""}, ("config.data.path",)),
    "negative_workers": ({"data.num_workers": -1}, ("config.data.num_workers", -1)),
}


@pytest.mark.parametrize("name", sorted(CONFIG_CASES))
def test_bad_config_value(shards, workdir, name):
  overrides, names = CONFIG_CASES[name]
  expect_error(config(shards, **overrides), workdir, ValueError, *names)


def test_batch_not_divisible_by_processes(shards):
  with raises_naming(ValueError, "config.global_batch_size", 8, "process count", 3):
    config_lib.validate(config(shards), num_devices=8, process_count=3)


# ------------------------------------------------------------------------------- data

@pytest.fixture
def bad_shards(shards, tmp_path):
  """A private copy of the shards to damage."""
  path = tmp_path / "bad_shards"
  shutil.copytree(shards, path)
  return path


def _edit_metadata(path, fn):
  meta = json.loads((path / data.METADATA_FILE).read_text())
  fn(meta)
  (path / data.METADATA_FILE).write_text(json.dumps(meta))


def test_data_path_missing(shards, workdir, tmp_path):
  expect_error(config(str(tmp_path / "nowhere")), workdir, data.ShardError,
               tmp_path / "nowhere" / "metadata.json")


@pytest.mark.parametrize("damage,names", [
    ("delete", ()), ("empty", ()), ("truncate", ("ArrayRecord",))])
def test_damaged_shard_file(workdir, bad_shards, damage, names):
  path = bad_shards / TRAIN_FILE
  if damage == "delete":
    path.unlink()
  else:
    path.write_bytes(b"" if damage == "empty" else path.read_bytes()[:-500])
  expect_error(config(str(bad_shards)), workdir, data.ShardError, path, *names)


def test_metadata_not_json(workdir, bad_shards):
  (bad_shards / data.METADATA_FILE).write_text('{"grid_size": 16,')
  expect_error(config(str(bad_shards)), workdir, data.ShardError,
               bad_shards / data.METADATA_FILE, "JSON")


def test_metadata_wrong_field_type(workdir, bad_shards):
  _edit_metadata(bad_shards, lambda m: m.update(vocab_size="64"))
  expect_error(config(str(bad_shards)), workdir, data.ShardError,
               bad_shards / data.METADATA_FILE, "'vocab_size'", "'64'")


def test_metadata_record_count_disagrees_with_file(workdir, bad_shards):
  def edit(m):
    m["splits"]["train"]["files"][0]["num_records"] = 65
    m["splits"]["train"]["num_records"] = 65
  _edit_metadata(bad_shards, edit)
  expect_error(config(str(bad_shards)), workdir, data.ShardError,
               bad_shards / TRAIN_FILE, 64, 65, data.METADATA_FILE)


def test_missing_train_split(shards, workdir):
  expect_error(config(shards, **{"data.train_split": "training"}), workdir, data.ShardError,
               "'training'", ['train', 'validation'])


def test_data_vocab_larger_than_model(shards, workdir):
  expect_error(config(shards, **{"model.vocab_size": 32}), workdir, ValueError,
               "config.data.path", 64, "config.model.vocab_size", 32)


def test_builtin_data_vocab_differs_from_model(shards, tmp_path):
  """The built-in digits (vocab 16) with the smoke model's vocab 64: its palette could not draw
  the samples, so set-up refuses before compiling."""
  expect_error(config(shards, **{"data.builtin": "digits"}), tmp_path / "w", ValueError,
               "config.model.vocab_size", 64, 16, "config.data.builtin", "'digits'")


def test_data_grid_differs_from_model(shards, workdir):
  expect_error(config(shards, **{"model.grid_size": 8}), workdir, ValueError,
               "config.data.path", "16x16", "config.model.grid_size", 8)


def test_batch_larger_than_dataset(shards, workdir):
  expect_error(config(shards, **{"global_batch_size": 128, "data.steps_per_epoch": -1}), workdir,
               ValueError,
               "config.global_batch_size", 128, 64)


def _records_of_batch(shards, batch_index):
  """Indices (in the train file) of the records that make up global batch `batch_index`."""
  source = data.open_split(shards, "train")
  it = iter(data.make_train_dataset(shards, split="train", global_batch_size=8, seed=0,
                                    process_index=0, process_count=1))
  batch = [next(it) for _ in range(batch_index + 1)][-1]
  records = [source[i]["codes"] for i in range(len(source))]
  return [next(i for i, views in enumerate(records) if any(np.array_equal(row, v) for v in views))
          for row in batch["codes"]]


def _rewrite_record(path, index, label=None, token=None):
  """Rewrites an ArrayRecord shard with record `index` given a bad label or one bad token id."""
  meta = data.ShardMetadata.load(path.parent)
  reader = array_record_module.ArrayRecordReader(str(path))
  raws = list(reader.read_all())
  reader.close()
  rec = data.decode_record(raws[index], meta, "original")
  codes = rec["codes"].astype(np.int64)
  if token is not None:
    codes[1, 7] = token
  raws[index] = data.encode_record(rec["label"] if label is None else label, codes, "uint16")
  writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
  for raw in raws:
    writer.write(raw)
  writer.close()


@pytest.mark.parametrize("what,names", [
    ("token", (VOCAB, f"vocab_size={VOCAB}")), ("label", (10, "num_classes=10"))])
def test_bad_record_met_during_training(shards, workdir, bad_shards, what, names):
  """The workdir resumes at step 2; one record of the batch of step 2 is bad: the error names the
  file and record, and stops the run before it saves anything."""
  index = _records_of_batch(shards, 2)[3]
  _rewrite_record(bad_shards / TRAIN_FILE, index, **{what: VOCAB if what == "token" else 10})
  expect_error(config(str(bad_shards)), workdir, data.ShardError,
               bad_shards / TRAIN_FILE, f"record {index}", *names)


# ------------------------------------------------------------------------------- checkpoints

def test_resume_with_a_config_that_changes_the_run_is_refused(shards, workdir):
  saved = (workdir / "config.json").read_bytes()
  expect_error(config(shards, **{"optim.lr": 0.2, "seed": 3}), workdir, ValueError,
               workdir, "optim.lr", 0.1, 0.2, "seed", 3, "--allow_config_change")
  assert (workdir / "config.json").read_bytes() == saved  # the refused run changed nothing


def test_resume_may_change_where_and_how_it_runs(shards, workdir):
  """Topology, logging/checkpoint cadence, data location and workers, remat are not the run's
  identity: a resume with them changed goes on."""
  summary = train.train_and_evaluate(
      config(shards, **{"mesh.data": 2, "mesh.fsdp": 4, "log_every_steps": 2, "ckpt.keep": 3,
                        "data.num_workers": 0, "model.remat": "full"}), str(workdir), max_steps=1)
  assert summary["step"] == 3
  assert json.loads((workdir / "config.json").read_text())["mesh"]["data"] == 2


def test_allow_config_change_resumes_and_keeps_the_earlier_config(shards, workdir):
  saved = (workdir / "config.json").read_text()
  summary = train.train_and_evaluate(config(shards, **{"optim.lr": 0.2}), str(workdir),
                                     max_steps=1, allow_config_change=True)
  assert summary["step"] == 3
  assert (workdir / "config.before_step_2.json").read_text() == saved
  assert json.loads((workdir / "config.json").read_text())["optim"]["lr"] == 0.2


def test_resume_with_another_model_size(shards, workdir):
  expect_error(config(shards, **{"model.dim": 128}), workdir, ckpt_lib.CheckpointMismatchError,
               workdir / "checkpoints" / "2", "params/tok_embeddings/embedding", (64, 64),
               (64, 128))


def test_damaged_latest_checkpoint(shards, workdir):
  wd = workdir
  manifest = wd / "checkpoints" / "2" / "state" / "manifest.ocdbt"
  manifest.write_bytes(manifest.read_bytes()[:20])
  expect_error(config(shards), wd, ckpt_lib.CheckpointReadError, wd / "checkpoints" / "2")


def test_init_from_params_of_another_size(shards, tmp_path):
  small = model_lib.ModelConfig(dim=32, n_layer=2, n_head=4, vocab_size=64, num_classes=10)
  from flax import nnx
  params = nnx.state(model_lib.Transformer(small, rngs=nnx.Rngs(0)), nnx.Param)
  ckpt_lib.save_params(tmp_path / "small", params)
  before = tree_hash(tmp_path / "small")
  expect_error(config(shards, **{"ckpt.init_from": str(tmp_path / "small")}), tmp_path / "w",
               ckpt_lib.CheckpointMismatchError,
               tmp_path / "small" / "params", "tok_embeddings/embedding", (64, 32), (64, 64))
  assert tree_hash(tmp_path / "small") == before


def test_init_from_missing(shards, tmp_path):
  expect_error(config(shards, **{"ckpt.init_from": str(tmp_path / "nope")}), tmp_path / "w",
               FileNotFoundError, tmp_path / "nope" / "params")


def test_converter_key_and_shape_mismatch():
  cfg = model_lib.config_for("B", vocab_size=64, num_classes=10)
  sd = {k: np.zeros(s, np.float32) if k.startswith(("tok_", "cls_", "norm", "output"))
        else np.broadcast_to(np.float32(0), s)
        for k, s in convert.gpt_expected_shapes(cfg).items()}
  del sd["layers.3.ffn_norm.weight"]
  sd["norm.weight"] = np.zeros(7, np.float32)
  sd["layers.0.attention.wqkv.bias"] = np.zeros(2304, np.float32)
  with raises_naming(convert.ConversionError, "layers.3.ffn_norm.weight", (768,), "norm.weight",
                     (7,), "layers.0.attention.wqkv.bias", (2304,)):
    convert.load_gpt(sd, variant="B")


# ------------------------------------------------------------------------------- workdir

def test_workdir_is_a_file(shards, tmp_path):
  path = tmp_path / "file"
  path.write_text("not a directory")
  with raises_naming(OSError, path):
    train.train_and_evaluate(config(shards), str(path))
  assert path.read_text() == "not a directory"


def test_workdir_under_a_file(shards, tmp_path):
  (tmp_path / "file").write_text("x")
  with raises_naming(OSError, tmp_path / "file"):
    train.train_and_evaluate(config(shards), str(tmp_path / "file" / "run"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_workdir_in_read_only_directory(shards, tmp_path):
  ro = tmp_path / "ro"
  ro.mkdir()
  ro.chmod(0o500)
  try:
    with raises_naming(OSError, ro / "run"):
      train.train_and_evaluate(config(shards), str(ro / "run"))
  finally:
    ro.chmod(0o700)


# ------------------------------------------------------------------------------- non-finite loss

def test_non_finite_loss_names_the_step_and_keeps_the_checkpoint(shards, workdir):
  err = expect_error(config(shards, **{"optim.lr": 1e38, "ckpt.every_steps": 100}), workdir,
                     train.NonFiniteLossError, "loss", "checkpoint", allow_config_change=True)
  # The bad step and the kept checkpoint (2, where the run resumed) are named.
  assert err.step >= 2 and err.kept_step == 2
  assert str(err.step) in str(err) and "2" in str(err)


def test_non_finite_run_never_saves_non_finite_params(shards, tmp_path):
  with pytest.raises(train.NonFiniteLossError):
    train.train_and_evaluate(config(shards, **{"optim.lr": 1e38, "ckpt.every_steps": 1}),
                             str(tmp_path))
  steps = committed_steps(tmp_path / "checkpoints")
  assert steps
  for step in steps:
    state = read_state(tmp_path / "checkpoints" / str(step))
    assert all(np.isfinite(v).all() for k, v in state.items() if "params" in k), step


# ------------------------------------------------------------------------------- untrusted files

class _Evil:
  """Unpickling this creates `path` (a harmless marker standing in for arbitrary code)."""

  def __init__(self, path):
    self.path = str(path)

  def __reduce__(self):
    return open, (self.path, "w")


def test_pickle_in_a_shard_record_is_just_bytes(workdir, bad_shards, tmp_path):
  marker = tmp_path / "pwned"
  payload = pickle.dumps(_Evil(marker))
  writer = array_record_module.ArrayRecordWriter(str(bad_shards / TRAIN_FILE), "group_size:1")
  for _ in range(64):
    writer.write(payload)
  writer.close()
  expect_error(config(str(bad_shards)), workdir, data.ShardError,
               bad_shards / TRAIN_FILE, "record")
  assert not marker.exists()


@pytest.mark.parametrize("content", [
    "pickle",
    "python_keys"])
def test_metadata_json_is_parsed_as_json_only(workdir, bad_shards, tmp_path, content):
  marker = tmp_path / "pwned"
  if content == "pickle":
    (bad_shards / data.METADATA_FILE).write_bytes(pickle.dumps(_Evil(marker)))
    names = ("JSON",)
  else:
    _edit_metadata(bad_shards, lambda m: m.update(__reduce__=["os.system", "touch " + str(marker)]))
    names = (['__reduce__'],)
  expect_error(config(str(bad_shards)), workdir, data.ShardError,
               bad_shards / data.METADATA_FILE, *names)
  assert not marker.exists()


@pytest.mark.parametrize("name", ["state/_METADATA", "data/process_0-of-1.json",
                                  "state/array_metadatas/process_0"])
def test_hostile_checkpoint_metadata_fails_cleanly(shards, workdir, tmp_path, name):
  wd = workdir
  marker = tmp_path / "pwned"
  (wd / "checkpoints" / "2" / name).write_bytes(pickle.dumps(_Evil(marker)))
  expect_error(config(shards), wd, ckpt_lib.CheckpointReadError,
               wd / "checkpoints" / "2" / name, "JSON")
  assert not marker.exists()


@pytest.mark.slow
def test_hostile_files_orbax_ignores_run_nothing(shards, workdir, tmp_path, monkeypatch):
  """_CHECKPOINT_METADATA (with a handler type naming an importable module) and _sharding are not
  needed to restore: orbax ignores their damage, resumes, and neither unpickles nor imports."""
  wd = workdir
  marker = tmp_path / "pwned"
  (tmp_path / "npp_evil_handler.py").write_text(f"open({str(marker)!r}, 'w')\nclass H: pass\n")
  monkeypatch.syspath_prepend(str(tmp_path))  # importable, were anything to import it.
  meta_file = wd / "checkpoints" / "2" / "_CHECKPOINT_METADATA"
  meta = json.loads(meta_file.read_text())
  meta["item_handlers"] = {"state": "npp_evil_handler.H", "data": "npp_evil_handler.H"}
  meta_file.write_text(json.dumps(meta))
  (wd / "checkpoints" / "2" / "state" / "_sharding").write_bytes(pickle.dumps(_Evil(marker)))
  summary = train.train_and_evaluate(config(shards), str(wd), max_steps=1)
  assert summary["step"] == 3
  assert not marker.exists() and "npp_evil_handler" not in sys.modules


# ------------------------------------------------------------------------------- multi-process

@pytest.mark.slow
def test_dead_peer_process_stops_the_survivor(shards, tmp_path):
  """Two JAX processes train together; SIGKILL of process 1 mid-training makes process 0 exit
  non-zero within a bounded time instead of hanging in a collective. (Killing process 0, the
  coordinator, stops process 1 within a second.)"""
  import portpicker
  port = portpicker.pick_unused_port()
  procs, logs = [], []
  for i in range(2):
    logs.append(tmp_path / f"p{i}.log")
    with open(logs[-1], "w") as log:
      procs.append(subprocess.Popen(
          main_command(tmp_path / "w", shards, overrides={"data.eval_split": "", "npp.epochs": 40},
                       extra=[f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                              f"--process_id={i}", "--heartbeat_timeout_seconds=10"]),
          cwd=ROOT, env=main_env(4), stdout=log, stderr=subprocess.STDOUT))
  try:
    started = wait_for(lambda: "] grad_norm=" in logs[1].read_text(), 240, 0.1, procs[1])
    assert started, logs[1].read_text()[-3000:]
    procs[1].send_signal(signal.SIGKILL)
    t0 = time.time()
    rc = procs[0].wait(timeout=180)
    elapsed = time.time() - t0
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  log0 = logs[0].read_text()
  print(f"survivor exited with {rc} {elapsed:.1f}s after its peer was killed")
  assert rc != 0, log0[-3000:]
  assert elapsed < 60, log0[-3000:]
  assert re.search(r"Gloo .* failed|heartbeat|another task died", log0), log0[-3000:]
