"""Tests for npp_jax.data: shard format, validation errors, grain pipelines, global batches."""
import json
import subprocess
import sys

from array_record.python import array_record_module
import grain
import hypothesis
from hypothesis import strategies as st
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import pytest

from naming import raises_naming
from npp_jax import data

GRID, VOCAB, CLASSES, VIEWS = 4, 1000, 7, 3
N = GRID * GRID
# grain's index shuffle is slow on tiny domains (ms per index below ~100 records), so the pipeline
# tests use a few hundred records.
NUM = 256


def _codes(record_id: int) -> np.ndarray:
  """Codes that tell which record and view they came from: token 0 = id, token 1 = view."""
  codes_VxN = np.zeros((VIEWS, N), np.int64)
  codes_VxN[:, 0] = record_id
  codes_VxN[:, 1] = np.arange(VIEWS)
  codes_VxN[:, 2:] = (record_id * 7 + np.arange(N - 2)) % VOCAB
  return codes_VxN


def _write(directory, split, ids, *, process_index=0, records_per_shard=10):
  with data.ShardWriter(directory, split, grid_size=GRID, vocab_size=VOCAB, num_classes=CLASSES,
                        num_views=VIEWS, records_per_shard=records_per_shard,
                        process_index=process_index) as writer:
    for i in ids:
      writer.write(i % CLASSES, _codes(i))


def _make(directory, num_train=25, num_val=5):
  _write(directory, "train", range(num_train))
  _write(directory, "validation", range(500, 500 + num_val))
  return data.finalize(directory, num_processes=1)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
  directory = tmp_path_factory.mktemp("shards")
  _write(directory, "train", range(NUM), records_per_shard=100)
  data.finalize(directory, num_processes=1)
  return directory


def _batches(directory, n, **kwargs):
  args = dict(split="train", global_batch_size=32, seed=0, process_index=0, process_count=1)
  it = iter(data.make_train_dataset(directory, **{**args, **kwargs}))
  return [next(it) for _ in range(n)]


def _ids(batches):
  return [int(i) for b in batches for i in b["codes"][:, 0]]


# ---------------------------------------------------------------- format and writer


def test_round_trip(tmp_path):
  meta = _make(tmp_path)
  assert meta == data.ShardMetadata.load(tmp_path)
  assert (meta.grid_size, meta.vocab_size, meta.num_classes, meta.num_views) == (
      GRID, VOCAB, CLASSES, VIEWS)
  assert meta.token_dtype == "uint16"
  assert [n for _, n in meta.splits["train"]] == [10, 10, 5]
  assert meta.splits["train"][0][0] == "train-00000-00000.array_record"
  source = data.open_split(tmp_path, "train")
  assert len(source) == 25
  for i in range(25):
    assert source[i]["label"] == i % CLASSES and source[i]["label"].dtype == np.int32
    np.testing.assert_array_equal(source[i]["codes"], _codes(i))
    assert source[i]["codes"].dtype == np.uint16
  assert source.locate(13) == (tmp_path / "train-00000-00001.array_record", 3)
  assert not list(tmp_path.glob(".*tmp*")), "temporary metadata left behind"


@hypothesis.given(label=st.integers(0, 99), views=st.integers(1, 4), grid=st.integers(1, 5),
                  vocab=st.sampled_from([2, 300, 65536, 70000]), seed=st.integers(0, 2**31))
def test_encode_decode_property(label, views, grid, vocab, seed):
  meta = data.ShardMetadata(grid_size=grid, vocab_size=vocab, num_classes=100, num_views=views,
                            token_dtype=data.token_dtype_for(vocab), splits={})
  codes = np.random.default_rng(seed).integers(0, vocab, (views, grid * grid))
  out = data.decode_record(data.encode_record(label, codes, meta.token_dtype), meta, "x")
  assert out["label"] == label
  np.testing.assert_array_equal(out["codes"], codes)
  assert out["codes"].dtype == np.dtype(meta.token_dtype)


def test_int32_tokens_above_uint16(tmp_path):
  with data.ShardWriter(tmp_path, "train", grid_size=1, vocab_size=100_000, num_classes=1,
                        num_views=1) as writer:
    writer.write(0, np.array([[99_999]]))
  assert data.finalize(tmp_path, num_processes=1).token_dtype == "int32"
  assert data.open_split(tmp_path, "train")[0]["codes"][0, 0] == 99_999


def test_writer_rejects_bad_input(tmp_path):
  with data.ShardWriter(tmp_path, "train", grid_size=GRID, vocab_size=VOCAB, num_classes=CLASSES,
                        num_views=VIEWS) as writer:
    with raises_naming(ValueError, "codes_VxN", (VIEWS, N + 1)):
      writer.write(0, np.zeros((VIEWS, N + 1), np.int32))
    with pytest.raises(ValueError, match="token ids"):
      writer.write(0, np.full((VIEWS, N), VOCAB))
    with pytest.raises(ValueError, match="label 7"):
      writer.write(CLASSES, np.zeros((VIEWS, N), np.int32))
  with pytest.raises(ValueError, match="split"):
    data.ShardWriter(tmp_path, "tr-ain", grid_size=4, vocab_size=4, num_classes=1, num_views=1)


def test_multi_process_writers_merge(tmp_path):
  _write(tmp_path, "train", range(0, 7), process_index=0, records_per_shard=4)
  with raises_naming(data.ShardError, tmp_path / data.MANIFEST_DIR, "'train'", [0]):
    data.finalize(tmp_path, num_processes=2)
  _write(tmp_path, "train", range(7, 12), process_index=1, records_per_shard=4)
  meta = data.finalize(tmp_path, num_processes=2)
  assert [f for f, _ in meta.splits["train"]] == [
      "train-00000-00000.array_record", "train-00000-00001.array_record",
      "train-00001-00000.array_record", "train-00001-00001.array_record"]
  source = data.open_split(tmp_path, "train")
  assert [int(source[i]["codes"][0, 0]) for i in range(len(source))] == list(range(12))


def test_failed_writer_leaves_no_manifest(tmp_path):
  with pytest.raises(RuntimeError):
    with data.ShardWriter(tmp_path, "train", grid_size=GRID, vocab_size=VOCAB,
                          num_classes=CLASSES, num_views=VIEWS) as writer:
      writer.write(0, _codes(0))
      raise RuntimeError("extraction crashed")
  with raises_naming(data.ShardError, tmp_path / data.MANIFEST_DIR):
    data.finalize(tmp_path, num_processes=1)
  assert not (tmp_path / data.METADATA_FILE).exists()


def test_finalize_rejects_disagreeing_manifests(tmp_path):
  _write(tmp_path, "train", range(3))
  with data.ShardWriter(tmp_path, "validation", grid_size=GRID, vocab_size=VOCAB,
                        num_classes=CLASSES + 1, num_views=VIEWS) as writer:
    writer.write(0, _codes(0))
  with raises_naming(data.ShardError, "validation-00000.json"):
    data.finalize(tmp_path, num_processes=1)


# ---------------------------------------------------------------- bad shards


def _edit_metadata(directory, fn):
  path = directory / data.METADATA_FILE
  d = json.loads(path.read_text())
  fn(d)
  path.write_text(json.dumps(d))


def test_missing_metadata(tmp_path):
  _write(tmp_path, "train", range(3))
  with raises_naming(data.ShardError, tmp_path / data.METADATA_FILE):
    data.open_split(tmp_path, "train")


def test_metadata_not_json(tmp_path):
  _make(tmp_path)
  (tmp_path / data.METADATA_FILE).write_text("{")
  with raises_naming(data.ShardError, tmp_path / data.METADATA_FILE, "JSON"):
    data.open_split(tmp_path, "train")


def test_metadata_unknown_field(tmp_path):
  _make(tmp_path)
  _edit_metadata(tmp_path, lambda d: d.update(patch_size=2))
  with raises_naming(data.ShardError, tmp_path / data.METADATA_FILE, ['patch_size']):
    data.open_split(tmp_path, "train")


@pytest.mark.parametrize("field,value", [("grid_size", "4"), ("num_views", True),
                                         ("vocab_size", 0), ("token_dtype", "int32")])
def test_metadata_wrong_type(tmp_path, field, value):
  _make(tmp_path)
  _edit_metadata(tmp_path, lambda d: d.update({field: value}))
  with raises_naming(data.ShardError, tmp_path / data.METADATA_FILE, repr(field), repr(value)):
    data.open_split(tmp_path, "train")


def test_metadata_split_total_mismatch(tmp_path):
  _make(tmp_path)
  _edit_metadata(tmp_path, lambda d: d["splits"]["train"].update(num_records=26))
  with raises_naming(data.ShardError, "'splits.train.num_records'", 26, 25):
    data.open_split(tmp_path, "train")


def test_metadata_file_count_mismatch(tmp_path):
  _make(tmp_path)
  def edit(d):
    d["splits"]["train"]["files"][1]["num_records"] = 11
    d["splits"]["train"]["num_records"] = 26
  _edit_metadata(tmp_path, edit)
  with raises_naming(data.ShardError, tmp_path / "train-00000-00001.array_record", 10, 11,
                     data.METADATA_FILE):
    data.open_split(tmp_path, "train")


def test_unknown_split(tmp_path):
  _make(tmp_path)
  with raises_naming(data.ShardError, "'test'", ['train', 'validation']):
    data.open_split(tmp_path, "test")


def test_missing_file(tmp_path):
  _make(tmp_path)
  (tmp_path / "train-00000-00002.array_record").unlink()
  with raises_naming(data.ShardError, tmp_path / "train-00000-00002.array_record"):
    data.open_split(tmp_path, "train")


def test_empty_file(tmp_path):
  _make(tmp_path)
  (tmp_path / "train-00000-00002.array_record").write_bytes(b"")
  with raises_naming(data.ShardError, tmp_path / "train-00000-00002.array_record"):
    data.open_split(tmp_path, "train")


def test_truncated_file(tmp_path):
  _make(tmp_path)
  path = tmp_path / "train-00000-00001.array_record"
  path.write_bytes(path.read_bytes()[:-100])
  with raises_naming(data.ShardError, path, "ArrayRecord"):
    data.open_split(tmp_path, "train")


_RECORD_3 = ("train-00000-00001.array_record", "record 3")  # what names record 3 of file 1


def _corrupt_record(directory, bad_raw: bytes):
  """Rewrites train file 1 (records 10..19) with local record 3 replaced by `bad_raw`."""
  path = directory / "train-00000-00001.array_record"
  writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
  for j in range(10):
    writer.write(bad_raw if j == 3 else data.encode_record((10 + j) % CLASSES, _codes(10 + j),
                                                           "uint16"))
  writer.close()
  source = data.open_split(directory, "train")  # Eager checks pass: the file is well-formed.
  source[12]  # Neighbours still decode.
  return source


def test_truncated_record(tmp_path):
  _make(tmp_path)
  raw = data.encode_record(0, _codes(13), "uint16")[:-2]
  source = _corrupt_record(tmp_path, raw)
  with raises_naming(data.ShardError, *_RECORD_3, len(raw), len(raw) + 2):
    source[13]
  source = _corrupt_record(tmp_path, b"NPP")
  with raises_naming(data.ShardError, *_RECORD_3):
    source[13]


def test_undecodable_record(tmp_path):
  _make(tmp_path)
  source = _corrupt_record(tmp_path, b"JPEG" + data.encode_record(0, _codes(13), "uint16")[4:])
  with raises_naming(data.ShardError, *_RECORD_3, b"JPEG"):
    source[13]
  source = _corrupt_record(tmp_path, data.encode_record(0, _codes(13)[:2], "uint16"))
  with raises_naming(data.ShardError, *_RECORD_3, "2 views", f"{VIEWS} views"):
    source[13]


def test_token_out_of_vocab(tmp_path):
  _make(tmp_path)
  codes = _codes(13)
  codes[1, 5] = VOCAB
  source = _corrupt_record(tmp_path, data.encode_record(0, codes, "uint16"))
  with raises_naming(data.ShardError, *_RECORD_3, VOCAB, f"vocab_size={VOCAB}"):
    source[13]


@pytest.mark.parametrize("label", [CLASSES, -1])
def test_label_out_of_range(tmp_path, label):
  _make(tmp_path)
  source = _corrupt_record(tmp_path, data.encode_record(label, _codes(13), "uint16"))
  with raises_naming(data.ShardError, *_RECORD_3, label, f"num_classes={CLASSES}"):
    source[13]


def test_bad_record_surfaces_through_pipeline(tmp_path):
  _make(tmp_path)
  _corrupt_record(tmp_path, b"garbage-garbage-garbage")
  ds = data.make_eval_dataset(tmp_path, split="train", global_batch_size=5, process_index=0,
                              process_count=1)
  with raises_naming(data.ShardError, *_RECORD_3):
    list(ds)


# ---------------------------------------------------------------- train pipeline


def test_train_batches_shapes_and_determinism(shards):
  a, b = _batches(shards, 12), _batches(shards, 12)
  assert a[0]["codes"].shape == (32, N) and a[0]["codes"].dtype == np.int32
  assert a[0]["labels"].shape == (32,) and a[0]["labels"].dtype == np.int32
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["codes"], y["codes"])
    np.testing.assert_array_equal(x["labels"], y["labels"])
  np.testing.assert_array_equal(a[0]["labels"], np.array(_ids(a[:1])) % CLASSES)
  assert _ids(a) != _ids(_batches(shards, 12, seed=1))
  assert sorted(_ids(a[:8])) == list(range(NUM)), "one epoch visits every record once"
  assert _ids(a[8:]) != _ids(a[:4]), "epochs are reshuffled"
  assert _ids(_batches(shards, 3, shuffle=False)) == list(range(96))


@hypothesis.settings(max_examples=12, deadline=None)
@hypothesis.given(process_count=st.integers(1, 4), local_bs=st.integers(1, 16),
                  seed=st.integers(0, 2**16))
def test_process_slices_disjoint(shards, process_count, local_bs, seed):
  per_process = NUM // process_count // local_bs  # Batches per process within the first epoch.
  seen = [_ids(_batches(shards, per_process, global_batch_size=local_bs * process_count, seed=seed,
                        process_index=p, process_count=process_count))
          for p in range(process_count)]
  flat = sum(seen, [])
  assert len(set(flat)) == len(flat), "processes read disjoint records"
  if NUM % (process_count * local_bs) == 0:
    assert sorted(flat) == list(range(NUM)), "together they cover the split"


def test_view_choice_deterministic_and_covering(shards):
  views = [int(v) for b in _batches(shards, 30) for v in b["codes"][:, 1]]
  assert views == [int(v) for b in _batches(shards, 30) for v in b["codes"][:, 1]]
  counts = np.bincount(views, minlength=VIEWS)
  assert len(counts) == VIEWS and counts.min() > 250, counts
  # Tokens beyond the marker are that record's, whatever the view.
  b = _batches(shards, 1)[0]
  np.testing.assert_array_equal(b["codes"][:, 2:], [_codes(i)[0, 2:] for i in b["codes"][:, 0]])


def test_batch_size_validation(shards):
  with raises_naming(ValueError, "global_batch_size=6", "process_count=4"):
    _batches(shards, 1, global_batch_size=6, process_index=1, process_count=4)
  with pytest.raises(ValueError, match="process_index=2"):
    _batches(shards, 1, process_index=2, process_count=2)


def test_resume_mid_epoch(shards):
  it = iter(data.make_train_dataset(shards, split="train", global_batch_size=32, seed=3,
                                    process_index=1, process_count=2))
  for _ in range(5):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(8)]  # Crosses the epoch boundary (8 batches per epoch).
  it2 = iter(data.make_train_dataset(shards, split="train", global_batch_size=32, seed=3,
                                     process_index=1, process_count=2))
  it2.set_state(state)
  for x in expected:
    y = next(it2)
    np.testing.assert_array_equal(x["codes"], y["codes"])
    np.testing.assert_array_equal(x["labels"], y["labels"])


def test_resume_through_orbax(shards, tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  def make():
    return iter(data.make_train_dataset(shards, split="train", global_batch_size=32, seed=5,
                                        process_index=0, process_count=1))
  it = make()
  for _ in range(3):
    next(it)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    expected = _ids([next(it) for _ in range(5)])
    it2 = make()
    mngr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(it2)))
  assert _ids([next(it2) for _ in range(5)]) == expected


@pytest.mark.slow
def test_workers_match_in_process(shards):
  a = _batches(shards, 10, num_workers=0)
  b = _batches(shards, 10, num_workers=2)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["codes"], y["codes"])
    np.testing.assert_array_equal(x["labels"], y["labels"])
  args = dict(split="train", global_batch_size=96, process_index=0, process_count=1)
  a = list(data.make_eval_dataset(shards, num_workers=0, **args))
  b = list(data.make_eval_dataset(shards, num_workers=2, **args))
  assert len(a) == len(b) == 3
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["codes"], y["codes"])
    np.testing.assert_array_equal(x["mask"], y["mask"])


# ---------------------------------------------------------------- eval pipeline and global batch


def test_eval_dataset_pads_and_covers_once(tmp_path):
  _make(tmp_path, num_train=25)
  per_process = []
  for p in range(2):
    batches = list(data.make_eval_dataset(tmp_path, split="train", global_batch_size=8,
                                          process_index=p, process_count=2))
    assert len(batches) == 4, "every process yields ceil(25 / 8) batches"
    assert all(b["codes"].shape == (4, N) and b["mask"].dtype == np.bool_ for b in batches)
    assert all((b["codes"][:, 1] == 0).all() for b in batches), "view 0"
    per_process.append([int(i) for b in batches for i in b["codes"][:, 0][b["mask"]]])
  assert sorted(sum(per_process, [])) == list(range(25))
  assert per_process[0] == list(range(0, 25, 2)), "deterministic file order"
  last = list(data.make_eval_dataset(tmp_path, split="train", global_batch_size=8, view=2,
                                     process_index=1, process_count=2))[-1]
  assert last["mask"].sum() == 0 and (last["codes"][:, 1] == 2).all()


def test_global_batch_on_mesh(shards):
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))
  sharding = NamedSharding(mesh, P(("data", "fsdp")))
  local = _batches(shards, 1, global_batch_size=8)[0]
  batch = data.global_batch(local, sharding)
  assert batch["codes"].shape == (8, N) and batch["labels"].shape == (8,)
  assert batch["codes"].sharding == sharding and batch["labels"].sharding == sharding
  np.testing.assert_array_equal(np.asarray(batch["codes"]), local["codes"])
  shard_rows = {s.index[0].start for s in batch["codes"].addressable_shards}
  assert shard_rows == {0, 2, 4, 6}, "batch split 4 ways over data x fsdp, replicated over tensor"
  assert all(s.data.shape == (2, N) for s in batch["codes"].addressable_shards)


@pytest.mark.slow  # a Python subprocess
def test_data_path_never_imports_tensorflow(shards):
  code = (f"import sys; from npp_jax import data; "
          f"it = iter(data.make_train_dataset({str(shards)!r}, split='train', global_batch_size=4,"
          f" seed=0, process_index=0, process_count=1)); next(it); "
          f"assert 'tensorflow' not in sys.modules, 'tensorflow imported'")
  subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("process_count", [2, 4])
def test_global_batches_independent_of_process_count(shards, process_count):
  """Global batch s holds the same records and views for 1 or several processes (resume onto
  another topology relies on it)."""
  one = _batches(shards, 6, global_batch_size=32)
  parts = [_batches(shards, 6, global_batch_size=32, process_index=p, process_count=process_count)
           for p in range(process_count)]
  for s in range(6):
    together = np.concatenate([parts[p][s]["codes"] for p in range(process_count)])
    np.testing.assert_array_equal(together, one[s]["codes"])  # same rows, same order.


def test_start_batch_skips_batches(shards):
  full = _batches(shards, 10)
  skipped = _batches(shards, 4, start_batch=6)
  for x, y in zip(full[6:], skipped):
    np.testing.assert_array_equal(x["codes"], y["codes"])
