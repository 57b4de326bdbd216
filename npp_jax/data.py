"""Token shards: the on-disk format, its writer and validating reader, and the grain pipelines.

Owns everything between "VQ codes of every view of an image" and "a global `jax.Array` batch":

* **Format.** A shard directory holds `metadata.json` and ArrayRecord files named
  `{split}-{process:05d}-{shard:05d}.array_record` (each writing process numbers its own files, so
  several hosts can write one split without coordinating). `metadata.json` holds format_version,
  grid_size, vocab_size, num_classes, num_views, token_dtype ("uint16" when vocab_size <= 65536,
  else "int32"), extra (free-form provenance: tokenizer, crops, ...) and per split num_records and
  the ordered list of {name, num_records}. One record is one image: a 16-byte little-endian
  header `magic b"NPPT" | version u8 | dtype u8 (1 uint16, 2 int32) | num_views u16 |
  num_tokens u32 | label i32`, then the codes of all views, [num_views, num_tokens] row-major.
* **Writing.** `ShardWriter` (one per process and split) writes files plus a small per-process
  manifest `manifests/{split}-{process:05d}.json`; after all processes are done (the caller puts a
  barrier there), one process calls `finalize`, which merges the manifests into `metadata.json`
  (written to a temporary name, then renamed, so readers never see half a file).
* **Reading.** `open_split` checks eagerly: metadata fields and types, split present, every file
  exists, is non-empty, opens as ArrayRecord and holds the record count the metadata says. Each
  record is checked lazily when read: header, length, label in [0, num_classes), token ids in
  [0, vocab_size). Any failure raises `ShardError` naming the file (and record index or field).
* **Pipelines.** `make_train_dataset` (seeded global shuffle, infinite repeat, per-process slice,
  seeded per-sample view, batch) and `make_eval_dataset` (one deterministic pass, padded + mask),
  both grain iterables whose iterators support `get_state`/`set_state`. `global_batch` assembles
  the process-local numpy batches into global arrays. TensorFlow is never imported here; for
  gs:// paths set EPATH_USE_TF=false before the first path is used (else etils picks tf.io.gfile
  whenever TensorFlow is installed).

Shapes: B batch, V views, N tokens per view (grid_size**2).
"""
import bisect
import concurrent.futures
import dataclasses
import json
import re
import struct
from typing import Any, Mapping

from array_record.python import array_record_module
from etils import epath
import grain
import jax
import numpy as np

from npp_jax import fileio

FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
MANIFEST_DIR = "manifests"
_MAGIC = b"NPPT"
_HEADER = struct.Struct("<4sBBHIi")  # magic, version, dtype code, num_views, num_tokens, label
_DTYPE_CODES = {"uint16": 1, "int32": 2}
_SPLIT_RE = re.compile(r"[A-Za-z0-9_]+")
_MANIFEST_RE = re.compile(r"([A-Za-z0-9_]+)-(\d{5})\.json")
# Threads and prefetch depth in batches for the pipelines (per worker process when num_workers > 0).
_READ_OPTIONS = grain.ReadOptions(num_threads=8, prefetch_buffer_size=16)
_HEADER_FIELDS = ("grid_size", "vocab_size", "num_classes", "num_views", "token_dtype", "extra")


class ShardError(ValueError):
  """A token-shard directory, file or record is missing, inconsistent or corrupt."""


def token_dtype_for(vocab_size: int) -> str:
  """The narrowest token dtype that holds ids in [0, vocab_size)."""
  return "uint16" if vocab_size <= 65536 else "int32"


@dataclasses.dataclass(frozen=True)
class ShardMetadata:
  """Contents of `metadata.json`. `splits` maps split -> tuple of (file name, num_records)."""
  grid_size: int
  vocab_size: int
  num_classes: int
  num_views: int
  token_dtype: str
  splits: Mapping[str, tuple[tuple[str, int], ...]]
  extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def num_tokens(self) -> int:
    return self.grid_size ** 2

  def num_records(self, split: str) -> int:
    return sum(n for _, n in self.splits[split])

  @classmethod
  def from_json(cls, d: Any, source: str) -> "ShardMetadata":
    """Validates a parsed metadata dict; `source` names it in errors."""
    def fail(msg):
      raise ShardError(f"{source}: {msg}")
    def get_int(obj, key, where, minimum):
      v = obj.get(key)
      if type(v) is not int or v < minimum:  # bool is an int subclass: reject it too.
        fail(f"field {where}{key!r} must be an int >= {minimum}, got {v!r}")
      return v
    def check_keys(obj, keys, where):
      if not isinstance(obj, dict):
        fail(f"{where or 'top level'} must be a JSON object, got {type(obj).__name__}")
      if set(obj) != set(keys):
        unknown, missing = sorted(set(obj) - set(keys)), sorted(set(keys) - set(obj))
        fail(f"{where or 'top level'}: unknown fields {unknown}, missing fields {missing}")

    check_keys(d, ("format_version", "splits") + _HEADER_FIELDS, "")
    if d["format_version"] != FORMAT_VERSION:
      fail(f"field 'format_version' is {d['format_version']!r}, this reader knows {FORMAT_VERSION}")
    ints = {k: get_int(d, k, "", 1) for k in ("grid_size", "vocab_size", "num_classes", "num_views")}
    if d["token_dtype"] != token_dtype_for(ints["vocab_size"]):
      fail(f"field 'token_dtype' is {d['token_dtype']!r} but vocab_size {ints['vocab_size']} "
           f"needs {token_dtype_for(ints['vocab_size'])!r}")
    if not isinstance(d["extra"], dict):
      fail(f"field 'extra' must be a JSON object, got {d['extra']!r}")
    if not isinstance(d["splits"], dict) or not d["splits"]:
      fail(f"field 'splits' must be a non-empty JSON object, got {d['splits']!r}")
    splits = {}
    for split, info in d["splits"].items():
      check_keys(info, ("num_records", "files"), f"splits.{split}")
      if not isinstance(info["files"], list):
        fail(f"field 'splits.{split}.files' must be a list")
      files = []
      for i, f in enumerate(info["files"]):
        check_keys(f, ("name", "num_records"), f"splits.{split}.files[{i}]")
        name = f["name"]
        if not isinstance(name, str) or not name or "/" in name:
          fail(f"field 'splits.{split}.files[{i}].name' must be a plain file name, got {name!r}")
        files.append((name, get_int(f, "num_records", f"splits.{split}.files[{i}].", 0)))
      total = get_int(info, "num_records", f"splits.{split}.", 0)
      if total != sum(n for _, n in files):
        fail(f"field 'splits.{split}.num_records' is {total} but its files hold "
             f"{sum(n for _, n in files)} records")
      splits[split] = tuple(files)
    return cls(token_dtype=d["token_dtype"], splits=splits, extra=d["extra"], **ints)

  @classmethod
  def load(cls, directory: epath.PathLike) -> "ShardMetadata":
    path = epath.Path(directory) / METADATA_FILE
    if not path.exists():
      raise ShardError(f"{path}: missing (not a token-shard directory, or `finalize` never ran)")
    try:
      d = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ShardError(f"{path}: not valid JSON ({e})") from e
    return cls.from_json(d, str(path))


def encode_record(label: int, codes_VxN: np.ndarray, token_dtype: str) -> bytes:
  """Serialises one image. Does no range checks (`ShardWriter.write` does them)."""
  codes_VxN = np.asarray(codes_VxN)
  header = _HEADER.pack(_MAGIC, FORMAT_VERSION, _DTYPE_CODES[token_dtype], codes_VxN.shape[0],
                        codes_VxN.shape[1], int(label))
  return header + codes_VxN.astype(np.dtype(token_dtype).newbyteorder("<")).tobytes()


def decode_record(raw: bytes, meta: ShardMetadata, where: str) -> dict[str, np.ndarray]:
  """Parses and validates one record -> {"label": int32 [], "codes": [V, N] token dtype}.

  `where` ("FILE: record I") prefixes every error.
  """
  if len(raw) < _HEADER.size:
    raise ShardError(f"{where}: truncated record: {len(raw)} bytes, header alone is {_HEADER.size}")
  magic, version, dtype_code, num_views, num_tokens, label = _HEADER.unpack_from(raw)
  if magic != _MAGIC or version != FORMAT_VERSION:
    raise ShardError(f"{where}: undecodable record: magic {magic!r} version {version}, expected "
                     f"{_MAGIC!r} version {FORMAT_VERSION}")
  if (dtype_code, num_views, num_tokens) != (_DTYPE_CODES[meta.token_dtype], meta.num_views,
                                             meta.num_tokens):
    raise ShardError(f"{where}: record header (dtype code {dtype_code}, {num_views} views, "
                     f"{num_tokens} tokens) disagrees with metadata ({meta.token_dtype}, "
                     f"{meta.num_views} views, {meta.num_tokens} tokens)")
  dtype = np.dtype(meta.token_dtype).newbyteorder("<")
  expected = _HEADER.size + num_views * num_tokens * dtype.itemsize
  if len(raw) != expected:
    raise ShardError(f"{where}: truncated or padded record: {len(raw)} bytes, expected {expected}")
  if not 0 <= label < meta.num_classes:
    raise ShardError(f"{where}: label {label} outside [0, num_classes={meta.num_classes})")
  codes_VxN = np.frombuffer(raw, dtype, offset=_HEADER.size).reshape(num_views, num_tokens)
  if codes_VxN.max() >= meta.vocab_size or codes_VxN.min() < 0:
    bad = int(codes_VxN.max() if codes_VxN.max() >= meta.vocab_size else codes_VxN.min())
    raise ShardError(f"{where}: token id {bad} outside [0, vocab_size={meta.vocab_size})")
  return {"label": np.int32(label), "codes": codes_VxN.astype(meta.token_dtype)}


def check_split_name(split: str) -> None:
  """Refuses a split name that cannot name shard files (`<split>-NNNNN...`)."""
  if not _SPLIT_RE.fullmatch(split):
    raise ValueError(f"split name {split!r} must match {_SPLIT_RE.pattern}")


class ShardWriter:
  """Writes one process's records of one split. Use as a context manager.

  Files are created lazily (a process with no records writes none) and rolled every
  `records_per_shard` records. Leaving the `with` block normally writes this process's manifest;
  leaving it by an exception writes none, so `finalize` refuses an incomplete split.
  """

  def __init__(self, out_dir: epath.PathLike, split: str, *, grid_size: int, vocab_size: int,
               num_classes: int, num_views: int, records_per_shard: int = 10_000,
               process_index: int = 0, extra: Mapping[str, Any] | None = None):
    check_split_name(split)
    if records_per_shard < 1 or process_index < 0:
      raise ValueError(f"records_per_shard={records_per_shard} must be >= 1 and "
                       f"process_index={process_index} >= 0")
    self.out_dir, self.split, self.process_index = epath.Path(out_dir), split, process_index
    self.header = dict(grid_size=grid_size, vocab_size=vocab_size, num_classes=num_classes,
                       num_views=num_views, token_dtype=token_dtype_for(vocab_size),
                       extra=dict(extra or {}))
    ShardMetadata.from_json(  # Validates the header fields once, with the reader's rules.
        {"format_version": FORMAT_VERSION, "splits": {split: {"num_records": 0, "files": []}},
         **self.header}, f"ShardWriter({split!r})")
    self.records_per_shard = records_per_shard
    self.files: list[tuple[str, int]] = []
    self._writer = None
    self._closed = False

  def __enter__(self) -> "ShardWriter":
    return self

  def write(self, label: int, codes_VxN: np.ndarray) -> None:
    """Appends one image: its label and the codes of all its views, int array [V, N]."""
    h = self.header
    codes_VxN = np.asarray(codes_VxN)
    if self._closed:
      raise ValueError(f"ShardWriter for split {self.split!r} is closed")
    if codes_VxN.shape != (h["num_views"], h["grid_size"] ** 2) or codes_VxN.dtype.kind not in "iu":
      raise ValueError(f"codes_VxN must be an integer array of shape ({h['num_views']}, "
                       f"{h['grid_size'] ** 2}), got {codes_VxN.dtype} {codes_VxN.shape}")
    if codes_VxN.size and (codes_VxN.min() < 0 or codes_VxN.max() >= h["vocab_size"]):
      raise ValueError(f"token ids must lie in [0, {h['vocab_size']}), got "
                       f"[{codes_VxN.min()}, {codes_VxN.max()}]")
    if not isinstance(label, (int, np.integer)) or not 0 <= label < h["num_classes"]:
      raise ValueError(f"label {label} outside [0, num_classes={h['num_classes']})")
    if self._writer is None or self.files[-1][1] >= self.records_per_shard:
      self._close_file()
      self.out_dir.mkdir(parents=True, exist_ok=True)
      name = f"{self.split}-{self.process_index:05d}-{len(self.files):05d}.array_record"
      # group_size:1 makes every record independently addressable (fast random access).
      self._writer = array_record_module.ArrayRecordWriter(str(self.out_dir / name), "group_size:1")
      if not self._writer.ok():
        raise ShardError(f"{self.out_dir / name}: cannot open for writing")
      self.files.append((name, 0))
    self._writer.write(encode_record(label, codes_VxN, h["token_dtype"]))
    self.files[-1] = (self.files[-1][0], self.files[-1][1] + 1)

  def _close_file(self) -> None:
    if self._writer is not None:
      ok = self._writer.ok()
      self._writer.close()
      self._writer = None
      if not ok:
        raise ShardError(f"{self.out_dir / self.files[-1][0]}: write failed")

  def close(self) -> None:
    """Closes the open file and writes this process's manifest."""
    self._close_file()
    self._closed = True
    manifest_dir = self.out_dir / MANIFEST_DIR
    manifest_dir.mkdir(parents=True, exist_ok=True)
    fileio.write_json_atomic(manifest_dir / f"{self.split}-{self.process_index:05d}.json",
                       {**self.header, "files": [{"name": f, "num_records": n}
                                                 for f, n in self.files]})

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.close()
    else:
      self._closed = True
      try:
        self._close_file()
      except ShardError:
        pass  # The original exception is the one to report.


def finalize(out_dir: epath.PathLike, *, num_processes: int) -> ShardMetadata:
  """Merges the per-process manifests of every split into `metadata.json`.

  Call once (process 0) after every writing process has closed its writers. Each split must
  have manifests from exactly processes 0..num_processes-1 (a missing one means a writer did not
  finish) and all manifests must agree on the header fields. Files are ordered by process, then
  shard. Returns the written metadata.
  """
  out_dir = epath.Path(out_dir)
  manifests: dict[str, dict[int, epath.Path]] = {}
  for p in sorted((out_dir / MANIFEST_DIR).glob("*.json")):
    if m := _MANIFEST_RE.fullmatch(p.name):
      manifests.setdefault(m.group(1), {})[int(m.group(2))] = p
  if not manifests:
    raise ShardError(f"{out_dir / MANIFEST_DIR}: no manifests; no ShardWriter closed here")
  header, splits = None, {}
  for split, by_process in sorted(manifests.items()):
    if sorted(by_process) != list(range(num_processes)):
      raise ShardError(f"{out_dir / MANIFEST_DIR}: split {split!r} has manifests of processes "
                       f"{sorted(by_process)}, expected 0..{num_processes - 1} (a writer did not "
                       f"finish, or manifests of an earlier run with more processes remain)")
    files = []
    for proc in range(num_processes):
      try:
        m = json.loads(by_process[proc].read_bytes().decode("utf-8"))
        this = {k: m[k] for k in _HEADER_FIELDS}
        files += [(f["name"], f["num_records"]) for f in m["files"]]
      except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ShardError(f"{by_process[proc]}: malformed manifest ({e!r})") from e
      if header is not None and this != header:
        raise ShardError(f"{by_process[proc]}: header {this} disagrees with {header}")
      header = this
    splits[split] = {"num_records": sum(n for _, n in files),
                     "files": [{"name": f, "num_records": n} for f, n in files]}
  d = {"format_version": FORMAT_VERSION, **header, "splits": splits}
  meta = ShardMetadata.from_json(d, str(out_dir / METADATA_FILE))
  fileio.write_json_atomic(out_dir / METADATA_FILE, d)
  return meta


def _count_records(path: epath.Path) -> int:
  if not path.exists():
    raise ShardError(f"{path}: missing shard file")
  if path.stat().length == 0:
    raise ShardError(f"{path}: empty shard file")
  reader = array_record_module.ArrayRecordReader(str(path), "readahead_buffer_size:0")
  ok = reader.ok()
  num_records = reader.num_records() if ok else 0
  try:
    reader.close()
  except RuntimeError:  # Closing a reader of a corrupt file re-raises the corruption.
    ok = False
  if not ok:
    raise ShardError(f"{path}: not a readable ArrayRecord file (truncated or corrupt)")
  return num_records


class ShardSource:
  """grain random-access source over one split: `source[i]` -> {"label": int32, "codes": [V, N]}.

  Picklable (grain worker processes reopen the files lazily).
  """

  def __init__(self, directory: epath.PathLike, split: str):
    self.directory = epath.Path(directory)
    self.metadata = meta = ShardMetadata.load(self.directory)
    if split not in meta.splits:
      raise ShardError(f"{self.directory / METADATA_FILE}: no split {split!r}; "
                       f"splits are {sorted(meta.splits)}")
    self.split = split
    self.paths = [self.directory / name for name, _ in meta.splits[split]]
    counts = [n for _, n in meta.splits[split]]
    if not sum(counts):
      raise ShardError(f"{self.directory / METADATA_FILE}: split {split!r} has no records")
    with concurrent.futures.ThreadPoolExecutor(min(32, len(self.paths))) as pool:
      actual = list(pool.map(_count_records, self.paths))
    for path, n, a in zip(self.paths, counts, actual):
      if n != a:
        raise ShardError(f"{path}: holds {a} records but {METADATA_FILE} says {n}")
    self._ends = list(np.cumsum(counts))
    # The [0:n] suffix tells array_record the count, so it does not reopen every file.
    self._source = grain.sources.ArrayRecordDataSource(
        [f"{p}[0:{n}]" for p, n in zip(self.paths, counts)])

  def __len__(self) -> int:
    return int(self._ends[-1])

  def locate(self, index: int) -> tuple[epath.Path, int]:
    """(file, record index within that file) of global record `index`."""
    f = bisect.bisect_right(self._ends, index)
    return self.paths[f], index - (int(self._ends[f - 1]) if f else 0)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"record {index} outside split {self.split!r} of {len(self)} records")
    path, local = self.locate(index)
    try:
      raw = self._source[index]
    except RuntimeError as e:  # array_record's error for corrupt chunks.
      raise ShardError(f"{path}: record {local}: unreadable ({e})") from e
    return decode_record(raw, self.metadata, f"{path}: record {local}")

  def __repr__(self) -> str:
    return f"ShardSource({self.directory}, split={self.split!r}, records={len(self)})"


def open_split(directory: epath.PathLike, split: str) -> ShardSource:
  """Opens and eagerly validates one split (see module docstring for what is checked when)."""
  return ShardSource(directory, split)


class _PickView(grain.transforms.RandomMap):
  """Picks one view per sample with grain's per-position seeded RNG."""

  def __init__(self, num_views: int):
    self.num_views = num_views

  def random_map(self, element, rng: np.random.Generator):
    v = rng.integers(self.num_views)
    return {"codes": element["codes"][v].astype(np.int32), "labels": element["label"]}


def _local_batch_size(global_batch_size: int, process_index: int, process_count: int) -> int:
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} outside [0, process_count={process_count})")
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                     f"process_count={process_count}")
  return global_batch_size // process_count


def make_train_dataset(path: epath.PathLike, *, split: str, global_batch_size: int, seed: int,
                       process_index: int, process_count: int, num_workers: int = 0,
                       shuffle: bool = True, start_batch: int = 0) -> grain.IterDataset:
  """Infinite training batches of this process: {"codes": int32 [b, N], "labels": int32 [b]}.

  b = global_batch_size // process_count. Records are shuffled globally with `seed` (reshuffled
  every epoch) and repeated forever into one global stream; global batch s is stream elements
  [s*GB, (s+1)*GB) and process p reads rows [p*b, (p+1)*b) of it, so processes read disjoint
  records within an epoch and the global batch (rows in order) is the same for any process count.
  Each sample's view is drawn from an RNG seeded by (`seed`, its stream position), so the stream
  is a pure function of the arguments (num_workers only changes the speed). `start_batch` skips
  the first batches: resuming from a step when no saved iterator state fits (e.g. after the
  process count changed). `iter(...)` gives an iterator with `get_state()`/`set_state()` for
  checkpointing.
  """
  local_bs = _local_batch_size(global_batch_size, process_index, process_count)
  source = open_split(path, split)
  stream = grain.MapDataset.source(source).seed(seed)
  if shuffle:
    stream = stream.shuffle()
  stream = stream.repeat(None).random_map(_PickView(source.metadata.num_views))
  ds = grain.MapDataset.range(start_batch * local_bs, len(stream))
  ds = ds.map(_GlobalRow(stream, global_batch_size, local_bs, process_index))
  # Batching before `to_iter_dataset` keeps batches identical for any num_workers; the read
  # options then count batches, and grain's default (500 ahead) would hold far too many.
  ds = ds.batch(local_bs, drop_remainder=True).to_iter_dataset(_READ_OPTIONS)
  if num_workers > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return ds


class _GlobalRow(grain.transforms.Map):
  """Local element j of process p -> stream element (j // b) * GB + p * b + j % b."""

  def __init__(self, stream: grain.MapDataset, global_batch_size: int, local_batch_size: int,
               process_index: int):
    self.stream, self.gb, self.b, self.p = stream, global_batch_size, local_batch_size, process_index

  def map(self, j):
    j = int(j)
    return self.stream[(j // self.b) * self.gb + self.p * self.b + j % self.b]


class _EvalLookup(grain.transforms.Map):
  """Padded position -> record `view` of that position, or a masked copy of record 0."""

  def __init__(self, source: ShardSource, view: int):
    self.source, self.view = source, view

  def map(self, position):
    real = int(position) < len(self.source)
    rec = self.source[int(position) if real else 0]
    return {"codes": rec["codes"][self.view].astype(np.int32), "labels": rec["label"],
            "mask": np.bool_(real)}


def make_eval_dataset(path: epath.PathLike, *, split: str, global_batch_size: int,
                      process_index: int, process_count: int, view: int = 0,
                      num_workers: int = 0) -> grain.IterDataset:
  """One deterministic pass over `split`, view `view` of every record, in file order.

  Yields {"codes": int32 [b, N], "labels": int32 [b], "mask": bool [b]}. The split is padded to a
  multiple of global_batch_size so every process yields the same number of batches (jitted eval
  steps are collective); padded entries repeat record 0 with mask False, so a masked mean counts
  each record exactly once across processes.
  """
  local_bs = _local_batch_size(global_batch_size, process_index, process_count)
  source = open_split(path, split)
  if not 0 <= view < source.metadata.num_views:
    raise ValueError(f"view={view} outside [0, num_views={source.metadata.num_views})")
  padded = -(-len(source) // global_batch_size) * global_batch_size
  ds = grain.MapDataset.range(padded)[process_index::process_count]
  ds = ds.map(_EvalLookup(source, view)).batch(local_bs).to_iter_dataset(_READ_OPTIONS)
  if num_workers > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return ds


def global_batch(local_batch: Mapping[str, np.ndarray],
                 sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
  """Process-local numpy batch [b, ...] -> global jax.Arrays [b * process_count, ...].

  `sharding` (e.g. NamedSharding(mesh, P(('data', 'fsdp')))) shards the leading axis; every leaf
  gets the same sharding.
  """
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}
