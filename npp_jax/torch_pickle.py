"""PyTorch weight files read without PyTorch and without running code from the file.

Owns `load(path)` for `torch.save` checkpoints in the zip format of torch >= 1.6
(`<root>/data.pkl` + `<root>/data/<key>` storages + `<root>/byteorder`), and
`load_safetensors(path)`.
Tensors come back as numpy arrays of their own dtype (bfloat16 via ml_dtypes), read-only and
memory-mapped where the zip stores them uncompressed (torch always does), so entries the caller
never touches (e.g. an optimizer state) are never copied into memory.

Integrity: every storage a tensor uses is checked against its zip member's CRC-32 before any array
is made over it, so a damaged file (a flipped bit in a download) is refused, naming the member,
instead of giving silently wrong weights. Memory-mapping bypasses zipfile's own CRC check, so this
costs one extra sequential read of the storages (at disk speed; about 0.4 s per GB when the file
is cached), through one bounded buffer; members that zipfile reads itself (the pickle, compressed
storages) are checked by zipfile.

Safety: `data.pkl` is read by a restricted unpickler. Its `find_class` builds only what a tensor
state dict needs (OrderedDict, the tensor/parameter rebuild functions, storage classes through
`persistent_load`, torch.Size, a few builtin containers), each replaced by our own code. Any other
global the file names (argparse.Namespace in `args`, numpy scalars, or `os.system` in a malicious
file) resolves to an inert `Opaque` placeholder: it records the name and the arguments and runs
nothing. Loading never fails because of what the non-weight entries hold (`opaque_entries` lists
them), and weights are taken only from containers of real arrays: `npp_jax.convert` refuses an
`Opaque` where weights are expected, and a file whose top level is not a mapping, naming the
class. A tensor's offset, sizes and strides are checked against its storage before any array is
made.

The legacy non-zip format (torch < 1.6) is refused with a message saying how to re-save it.
"""
from __future__ import annotations

import collections
import io
import json
import math
import os
import pickle
import struct
import zipfile
import zlib
from typing import Any

import ml_dtypes
import numpy as np

# torch's legacy (non-zip) files start with a pickled magic number.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_, "ComplexFloatStorage": np.complex64,
    "ComplexDoubleStorage": np.complex128, "UntypedStorage": np.uint8,
}
_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
# Bytes read at a time for the CRC-32 check: bounds the memory of checking multi-GB storages.
_CRC_CHUNK = 1 << 24
_BUILTINS = {"set": set, "frozenset": frozenset, "tuple": tuple, "list": list, "dict": dict}


class TorchFileError(ValueError):
  """A weight file is malformed, of an unsupported format, or not a tensor state dict."""


class Opaque:
  """An object of a class this reader does not construct: the name and arguments, nothing run.

  Attributes: `qualname` ("module.Class"), `args` (constructor arguments), `state` (what the
  pickle would have passed to `__setstate__`) and `items` (list/dict items appended to it).
  """
  qualname = "?"

  def __new__(cls, *args, **kwargs):
    # NEWOBJ calls only __new__, REDUCE both __new__ and __init__: record the arguments here.
    self = object.__new__(cls)
    self.args, self.kwargs, self.state, self.items = args, kwargs, None, []
    return self

  def __init__(self, *args, **kwargs):
    del args, kwargs

  def __setstate__(self, state):
    self.state = state

  def __setitem__(self, key, value):
    self.items.append((key, value))

  def append(self, value):
    self.items.append(value)

  def extend(self, values):
    self.items.extend(values)

  def __repr__(self):
    return f"<{self.qualname} (not constructed)>"


def _opaque_class(module: str, name: str) -> type:
  # A fresh subclass per global, so NEWOBJ's `cls.__new__(cls, ...)` and REDUCE's `cls(...)` both
  # land in Opaque's own methods.
  return type("Opaque", (Opaque,), {"qualname": f"{module}.{name}"})


class _Storage:
  __slots__ = ("key", "dtype", "numel")

  def __init__(self, key: str, dtype: np.dtype, numel: int):
    self.key, self.dtype, self.numel = key, dtype, numel


class _TensorRef:
  """A tensor named by the pickle, turned into an array after unpickling (so no pickle opcode
  can ever touch a real array)."""
  __slots__ = ("storage", "offset", "size", "stride")

  def __init__(self, storage, offset, size, stride):
    self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

  def __setstate__(self, state):
    raise pickle.UnpicklingError("the pickle tries to set state on a tensor")


def _int_tuple(x: Any, what: str) -> tuple[int, ...]:
  if not isinstance(x, (tuple, list)) or not all(isinstance(i, int) and i >= 0 for i in x):
    raise pickle.UnpicklingError(f"tensor {what} must be a tuple of ints >= 0, got {x!r}")
  return tuple(x)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  del requires_grad, backward_hooks
  if not isinstance(storage, _Storage):
    raise pickle.UnpicklingError(f"tensor storage must be a persistent storage, got {storage!r}")
  if not isinstance(storage_offset, int) or storage_offset < 0:
    raise pickle.UnpicklingError(f"tensor storage offset {storage_offset!r} is not an int >= 0")
  if metadata:
    raise pickle.UnpicklingError(f"tensor with metadata {metadata!r} (conjugate/negative bits) "
                                 "is not supported")
  size, stride = _int_tuple(size, "size"), _int_tuple(stride, "stride")
  if len(size) != len(stride):
    raise pickle.UnpicklingError(f"tensor size {size} and stride {stride} differ in rank")
  if math.prod(size):  # The last element read must lie inside the storage.
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.numel:
      raise pickle.UnpicklingError(
          f"tensor (offset {storage_offset}, size {size}, stride {stride}) reads past the end of "
          f"storage {storage.key} ({storage.numel} elements)")
  return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
  del requires_grad, backward_hooks, state
  if not isinstance(data, _TensorRef):
    raise pickle.UnpicklingError(f"parameter data must be a tensor, got {data!r}")
  return data


class _PlainTensorType:
  """torch.Tensor / torch.nn.Parameter, as the `new_type` of `_rebuild_from_type_v2`."""


def _rebuild_from_type_v2(func, new_type, args, state):
  # torch wraps a tensor's rebuild in this when the tensor is a subclass or carries Python state;
  # only plain tensors and parameters without state are weights.
  if new_type is not _PlainTensorType or state:
    raise pickle.UnpicklingError(f"tensor of type {new_type!r} with state {state!r} is not a "
                                 "plain tensor")
  if func not in (_rebuild_tensor_v2, _rebuild_parameter):
    raise pickle.UnpicklingError(f"tensor rebuilt by {func!r} is not supported")
  return func(*args)


def _codecs_encode(text, encoding="utf-8"):
  # Protocol-2 pickles store bytes as _codecs.encode(str, "latin1").
  if not isinstance(text, str) or encoding != "latin1":
    raise pickle.UnpicklingError(f"_codecs.encode({text!r}, {encoding!r}) is not a bytes literal")
  return text.encode("latin1")


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Tensor"): _PlainTensorType,
    ("torch.nn.parameter", "Parameter"): _PlainTensorType,
    ("torch", "Size"): tuple,
    ("_codecs", "encode"): _codecs_encode,
}
_ALLOWED.update({("builtins", k): v for k, v in _BUILTINS.items()})


class _StorageClass:
  """What `find_class` returns for torch.*Storage: only ever used as a persistent-id tag."""

  def __init__(self, name: str):
    self.name = name

  def __repr__(self):
    return f"torch.{self.name}"


class _Unpickler(pickle.Unpickler):
  """Builds only allow-listed objects (our own replacements); everything else becomes Opaque."""

  def __init__(self, file, storage_sizes: dict[str, int] | None):
    super().__init__(file)
    self._storage_sizes = storage_sizes  # bytes per storage key; None: a plain pickle.

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
      return _StorageClass(name)
    return _opaque_class(module, name)

  def persistent_load(self, pid: Any) -> _Storage:
    if self._storage_sizes is None:
      raise pickle.UnpicklingError(f"persistent id {pid!r} outside a torch zip archive")
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"
            and isinstance(pid[1], _StorageClass) and isinstance(pid[4], int)):
      raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
    _, storage_class, key, _, numel = pid[:5]
    key = str(key)
    if key not in self._storage_sizes:
      raise pickle.UnpicklingError(f"storage {key} is not in the archive")
    dtype = np.dtype(_STORAGE_DTYPES[storage_class.name])
    if numel * dtype.itemsize > self._storage_sizes[key]:
      raise pickle.UnpicklingError(f"storage {key} claims {numel} x {dtype} but the archive "
                                   f"holds {self._storage_sizes[key]} bytes")
    return _Storage(key, dtype, numel)


def _unpickle(data: bytes, source: str, storage_sizes: dict[str, int] | None) -> Any:
  try:
    return _Unpickler(io.BytesIO(data), storage_sizes).load()
  except Exception as e:  # Untrusted input: any failure of the pickle machinery is a bad file.
    raise TorchFileError(f"{source}: cannot read the pickle safely: {type(e).__name__}: {e}") from e


def _member_offset(f: io.BufferedReader, info: zipfile.ZipInfo) -> int | None:
  """Byte offset of an uncompressed zip member's data in the open file `f` (None: must be
  inflated)."""
  if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size:
    return None
  f.seek(info.header_offset)
  header = f.read(30)
  if len(header) != 30 or header[:4] != b"PK\x03\x04":
    return None
  name_len, extra_len = struct.unpack("<HH", header[26:30])
  return info.header_offset + 30 + name_len + extra_len


def _damaged(path: str, info: zipfile.ZipInfo, what: str) -> TorchFileError:
  return TorchFileError(f"{path}: {what} '{info.filename}' fails its CRC-32 check: the file is "
                        f"damaged (re-download it).")


def _check_crc(f: io.BufferedReader, buf: memoryview, path: str, info: zipfile.ZipInfo,
               offset: int) -> None:
  """Raises TorchFileError unless the stored member whose data starts at `offset` matches the
  CRC-32 of its ZipInfo. Reads the member's `info.file_size` bytes (all the CRC covers) through
  the reusable buffer `buf`, so memory stays bounded however large the storage."""
  f.seek(offset)
  crc, left = 0, info.file_size
  while left:
    n = f.readinto(buf[:min(len(buf), left)])
    if not n:
      raise TorchFileError(f"{path}: storage '{info.filename}' is truncated ({left} of "
                           f"{info.file_size} bytes missing): the file is damaged "
                           f"(re-download it).")
    crc = zlib.crc32(buf[:n], crc)
    left -= n
  if crc != info.CRC:
    raise _damaged(path, info, "storage")


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: str, what: str) -> bytes:
  """A member read (and CRC-checked) by zipfile, its failures as TorchFileError naming it."""
  try:
    return zf.read(info)
  except zipfile.BadZipFile as e:
    if "CRC" in str(e):
      raise _damaged(path, info, what) from None
    raise TorchFileError(f"{path}: {what} '{info.filename}' cannot be read ({e}): the file is "
                         f"damaged (re-download it).") from None
  except (zlib.error, EOFError, NotImplementedError) as e:
    raise TorchFileError(f"{path}: {what} '{info.filename}' cannot be read ({type(e).__name__}: "
                         f"{e}): the file is damaged or uses an unsupported compression.") from None


def _resolve(obj: Any, make, seen: dict[int, Any]) -> Any:
  """`obj` with every _TensorRef replaced by its array (containers updated in place)."""
  if isinstance(obj, _TensorRef):
    return make(obj)
  if id(obj) in seen:
    return seen[id(obj)]
  if isinstance(obj, dict):
    seen[id(obj)] = obj
    for k in list(obj):
      obj[k] = _resolve(obj[k], make, seen)
  elif isinstance(obj, list):
    seen[id(obj)] = obj
    obj[:] = [_resolve(v, make, seen) for v in obj]
  elif isinstance(obj, tuple):
    out = tuple(_resolve(v, make, seen) for v in obj)
    seen[id(obj)] = out
    return out
  elif isinstance(obj, Opaque):
    seen[id(obj)] = obj
    obj.args = _resolve(obj.args, make, seen)
    obj.state = _resolve(obj.state, make, seen)
    obj.items = _resolve(obj.items, make, seen)
  return obj


def _strided(flat: np.ndarray, ref: _TensorRef) -> np.ndarray:
  """The tensor `ref` over its storage `flat`: a view when contiguous, else a copy; read-only,
  like the file it maps."""
  n = math.prod(ref.size)
  contiguous = all(s == math.prod(ref.size[i + 1:]) for i, s in enumerate(ref.stride)
                   if ref.size[i] > 1)
  if not n:
    out = np.zeros(ref.size, flat.dtype)
  elif contiguous:
    out = flat[ref.offset: ref.offset + n].reshape(ref.size)
  else:  # In bounds: _rebuild_tensor_v2 checked the last element against the storage size.
    item = flat.dtype.itemsize
    out = np.ascontiguousarray(np.lib.stride_tricks.as_strided(
        flat[ref.offset:], ref.size, tuple(s * item for s in ref.stride), writeable=False))
  out.flags.writeable = False
  return out


def load(path: str | os.PathLike) -> Any:
  """Reads a `torch.save` file (zip format) into Python containers of numpy arrays.

  Returns what `torch.load(path, weights_only=True)` would, with tensors as read-only numpy arrays
  of their own dtype and any non-allow-listed object as an inert `Opaque`.

  Raises:
    FileNotFoundError / IsADirectoryError: no such file / a directory.
    TorchFileError: legacy or unknown format, a malformed or damaged archive (a member failing its
      CRC-32 check), a malformed pickle, or a pickle whose tensors point outside their storages.
  """
  path = _require_file(path)
  if not zipfile.is_zipfile(path):
    _refuse_non_zip(path)
  try:
    zf = zipfile.ZipFile(path)
  except (zipfile.BadZipFile, EOFError, ValueError) as e:
    raise TorchFileError(f"{path}: a damaged zip archive ({e}); re-download it.") from None
  with zf, open(path, "rb") as f:
    infos = {i.filename: i for i in zf.infolist()}
    pkls = [n for n in infos if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pkls) != 1:
      raise TorchFileError(f"{path}: a zip file but not a torch.save archive (expected one "
                           f"<root>/data.pkl, found {pkls or 'none'}).")
    root = pkls[0][:-len("data.pkl")]
    byteorder = (_read_member(zf, infos[root + "byteorder"], path, "member").decode().strip()
                 if root + "byteorder" in infos else "little")
    if byteorder not in ("little", "big"):
      raise TorchFileError(f"{path}: unknown byteorder {byteorder!r}")
    data_prefix = root + "data/"
    members = {n[len(data_prefix):]: i for n, i in infos.items() if n.startswith(data_prefix)}
    obj = _unpickle(_read_member(zf, infos[pkls[0]], path, "member"), path,
                    {k: i.file_size for k, i in members.items()})
    mapped = np.memmap(path, mode="r")
    swap = byteorder != ("little" if np.little_endian else "big")
    flats: dict[tuple[str, str], np.ndarray] = {}
    checked: set[str] = set()  # Storage keys whose CRC-32 matched.
    crc_buf = memoryview(bytearray(
        min(_CRC_CHUNK, max((i.file_size for i in members.values()), default=0))))

    def flat_of(storage: _Storage) -> np.ndarray:
      cache_key = (storage.key, storage.dtype.str)
      if cache_key not in flats:
        info = members[storage.key]
        offset = _member_offset(f, info)
        nbytes = storage.numel * storage.dtype.itemsize
        if offset is not None and storage.key not in checked:
          # The mmap below bypasses zipfile's CRC check: one extra read of the member instead.
          _check_crc(f, crc_buf, path, info, offset)
          checked.add(storage.key)
        raw = (mapped[offset: offset + nbytes] if offset is not None
               else np.frombuffer(_read_member(zf, info, path, "storage"), np.uint8)[:nbytes])
        if raw.size != nbytes:
          raise TorchFileError(f"{path}: storage {storage.key} is truncated ({raw.size} of "
                               f"{nbytes} bytes).")
        flat = raw.view(dtype=storage.dtype, type=np.ndarray)
        if swap:
          flat = flat.byteswap()
        flat.flags.writeable = False
        flats[cache_key] = flat
      return flats[cache_key]

    try:
      return _resolve(obj, lambda ref: _strided(flat_of(ref.storage), ref), {})
    except RecursionError:
      raise TorchFileError(f"{path}: containers nested too deeply.") from None


def _require_file(path: str | os.PathLike) -> str:
  """`path` as a str; FileNotFoundError / IsADirectoryError naming it unless it is a file."""
  path = os.fspath(path)
  if os.path.isdir(path):
    raise IsADirectoryError(f"{path} is a directory, not a weight file.")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no checkpoint file at {path}")
  return path


def _refuse_non_zip(path: str) -> None:
  """Explains why a non-zip file cannot be read; never returns."""
  with open(path, "rb") as f:
    data = f.read()
  if data[:1] != b"\x80":
    raise TorchFileError(f"{path}: not a torch.save zip archive nor a pickle (unknown format).")
  first = _unpickle(data, path, None)  # Restricted: safe even for a hostile pickle.
  if first == _LEGACY_MAGIC:
    raise TorchFileError(
        f"{path} uses PyTorch's legacy (pre-1.6, non-zip) format, which this reader does not "
        f"support; re-save it with a recent torch: torch.save(torch.load(f, weights_only=True), "
        f"new_file).")
  what = first.qualname if isinstance(first, Opaque) else type(first).__name__
  raise TorchFileError(f"{path} is a plain pickle holding {what}, not a torch.save zip "
                       f"archive; nothing in it was run.")


def opaque_entries(obj: Any, prefix: str = "") -> list[tuple[str, str]]:
  """(path, "module.Class") of every Opaque reachable through dicts/lists/tuples of `obj`."""
  out, stack, seen = [], [(prefix, obj)], set()
  while stack:
    where, x = stack.pop()
    if isinstance(x, Opaque):
      out.append((where or "<top>", x.qualname))
    elif isinstance(x, (dict, list, tuple)) and id(x) not in seen:
      seen.add(id(x))
      items = x.items() if isinstance(x, dict) else enumerate(x)
      stack.extend((f"{where}.{k}" if where else str(k), v) for k, v in items)
  return sorted(out)


def load_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a `.safetensors` file (8-byte header length, JSON header, raw little-endian data)."""
  path = _require_file(path)
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(8)
    n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
    if not 0 < n <= size - 8:
      raise TorchFileError(f"{path}: not a safetensors file (header length {n}).")
    try:
      header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise TorchFileError(f"{path}: bad safetensors header: {e}") from None
  if not isinstance(header, dict):
    raise TorchFileError(f"{path}: the safetensors header is not a JSON object.")
  mapped = np.memmap(path, mode="r")
  out = {}
  for name, spec in header.items():
    if name == "__metadata__":
      continue
    try:
      dtype = np.dtype(_SAFETENSORS_DTYPES[spec["dtype"]])
      shape = _int_tuple(spec["shape"], "shape")
      begin, end = (int(v) for v in spec["data_offsets"])
    except (KeyError, TypeError, ValueError, pickle.UnpicklingError) as e:
      raise TorchFileError(
          f"{path}: tensor {name!r} has a bad header entry {spec!r} ({e}).") from None
    if end - begin != math.prod(shape) * dtype.itemsize or not 0 <= begin <= end <= size - 8 - n:
      raise TorchFileError(f"{path}: tensor {name!r} data_offsets {begin, end} do not fit its "
                           f"shape {shape} x {dtype} or the file.")
    array = mapped[8 + n + begin: 8 + n + end].view(dtype=dtype, type=np.ndarray).reshape(shape)
    out[name] = array if np.little_endian else array.byteswap()  # the format is little-endian
  return out
