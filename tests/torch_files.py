"""Shared by the weight-file tests (`test_torch_pickle.py`, `test_convert_cli.py`): the parity
fixtures, `write_pt` (writes PyTorch's zip format by hand, checked against torch.load when
written, for layouts, hostile pickles and crafted strides; no test imports torch), and helpers.
"""
import math
import pathlib
import pickle
import struct
import zipfile

from flax import nnx
import jax
import numpy as np

from npp_jax import convert
from npp_jax import torch_pickle

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
TINY_PT = FIXTURES / "tiny_gpt.pt"


def load_npz(name):
  with np.load(FIXTURES / name, allow_pickle=False) as z:
    arrays = {k: z[k] for k in z.files}
  return ({k: v for k, v in arrays.items() if not k.startswith("io/")},
          {k[3:]: v for k, v in arrays.items() if k.startswith("io/")})


def gpt_fixture():
  """The tiny reference GPT's state dict, its reference I/O and its converted params."""
  sd, io = load_npz("llamagen_gpt_tiny.npz")
  return dict(sd=sd, io=io, params=pure(convert.load_gpt(sd, n_head=4)))


def pure(model):
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def assert_same(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


class Raw:
  """Pickle opcodes spliced into `write_pt`'s output verbatim (e.g. a hostile object)."""

  def __init__(self, ops: bytes):
    self.ops = ops


class View:
  """A tensor over an explicit flat storage with an explicit offset, size and stride."""

  def __init__(self, storage, offset, size, stride):
    self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)


_STORAGE = {np.dtype(v): k for k, v in torch_pickle._STORAGE_DTYPES.items()
            if k != "UntypedStorage"}


def write_pt(path, obj, *, byteorder="little"):
  """Writes `obj` (dicts, lists, tuples, scalars, numpy arrays, View, Raw) as torch.save would
  (zip format, protocol-2 pickle of `_rebuild_tensor_v2` calls and storage persistent ids)."""
  storages = []

  def emit(x):
    if isinstance(x, Raw):
      return x.ops
    if isinstance(x, np.ndarray):
      flat = np.ascontiguousarray(x).reshape(-1)
      x = View(flat, 0, x.shape, [math.prod(x.shape[i + 1:]) for i in range(x.ndim)])
    if isinstance(x, View):
      data = x.storage.byteswap() if byteorder == "big" else x.storage
      storages.append(data.tobytes())
      pid = (b"(" + emit("storage") + f"ctorch\n{_STORAGE[x.storage.dtype]}\n".encode()
             + emit(str(len(storages) - 1)) + emit("cpu") + emit(x.storage.size) + b"tQ")
      return (b"ctorch._utils\n_rebuild_tensor_v2\n(" + pid + emit(x.offset) + emit(x.size)
              + emit(x.stride) + b"\x89ccollections\nOrderedDict\n)RtR")
    if isinstance(x, dict):
      return b"}" + (b"(" + b"".join(emit(k) + emit(v) for k, v in x.items()) + b"u" if x else b"")
    if isinstance(x, list):
      return b"]" + (b"(" + b"".join(map(emit, x)) + b"e" if x else b"")
    if isinstance(x, tuple):
      return b"(" + b"".join(map(emit, x)) + b"t"
    if isinstance(x, bool):
      return b"\x88" if x else b"\x89"
    if isinstance(x, int):
      n = (x.bit_length() + 8) // 8
      return b"\x8a" + bytes([n]) + x.to_bytes(n, "little", signed=True)
    if isinstance(x, float):
      return b"G" + struct.pack(">d", x)
    if isinstance(x, str):
      return b"X" + struct.pack("<I", len(x.encode())) + x.encode()
    assert x is None, type(x)
    return b"N"

  pkl = b"\x80\x02" + emit(obj) + b"."
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
    zf.writestr("archive/data.pkl", pkl)
    zf.writestr("archive/byteorder", byteorder)
    for i, data in enumerate(storages):
      zf.writestr(f"archive/data/{i}", data)
    zf.writestr("archive/version", "3\n")
  return path


class _Evil:
  def __init__(self, fn, args):
    self.fn, self.args = fn, args

  def __reduce__(self):
    return self.fn, self.args


def evil_ops(fn, *args):
  """The opcodes of a pickle that calls fn(*args) when loaded (PROTO and STOP stripped)."""
  return pickle.dumps(_Evil(fn, args), protocol=2)[2:-1]


def run_cli(capsys, *argv):
  code = convert.main([str(a) for a in argv])
  out = capsys.readouterr()
  return code, out.out, out.err
