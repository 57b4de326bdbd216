"""Tests for reading PyTorch weight files without PyTorch (npp_jax.torch_pickle) and for the
`python -m npp_jax.convert` command line (files -> params checkpoint -> model).

Real `torch.save` files (tests/fixtures/*.pt, made by tests/fixtures/make_torch_fixtures.py) prove
compatibility with PyTorch's format; `_write_pt` below writes the same format by hand (checked
against torch.load when written) for layouts, hostile pickles and crafted strides. No test
imports torch.
"""
import dataclasses
import json
import math
import os
import pathlib
import pickle
import struct
import subprocess
import sys
from unittest import mock
import zipfile
import zlib

from flax import nnx
from hypothesis import given, settings, strategies as st
import jax
import ml_dtypes
import numpy as np
import pytest

from npp_jax import checkpoint
from npp_jax import convert
from npp_jax import model as model_lib
from npp_jax import sharding
from npp_jax import torch_pickle
from npp_jax import vq

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
TINY_PT = FIXTURES / "tiny_gpt.pt"
TAU = 1e-4  # near-tie threshold for VQ codes (fixture README)


# ----------------------------------------------------------------------------- helpers

def _npz(name):
  with np.load(FIXTURES / name, allow_pickle=False) as z:
    arrays = {k: z[k] for k in z.files}
  return ({k: v for k, v in arrays.items() if not k.startswith("io/")},
          {k[3:]: v for k, v in arrays.items() if k.startswith("io/")})


@pytest.fixture(scope="module")
def gpt():
  sd, io = _npz("llamagen_gpt_tiny.npz")
  return dict(sd=sd, io=io, params=_pure(convert.load_gpt(sd, n_head=4)))


@pytest.fixture(scope="module")
def vq_fx():
  return _npz("llamagen_vq_small.npz")


def _pure(model):
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _assert_same(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


class _Raw:
  """Pickle opcodes spliced into `_write_pt`'s output verbatim (e.g. a hostile object)."""

  def __init__(self, ops: bytes):
    self.ops = ops


class _View:
  """A tensor over an explicit flat storage with an explicit offset, size and stride."""

  def __init__(self, storage, offset, size, stride):
    self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)


_STORAGE = {np.dtype(v): k for k, v in torch_pickle._STORAGE_DTYPES.items()
            if k != "UntypedStorage"}


def _write_pt(path, obj, *, byteorder="little"):
  """Writes `obj` (dicts, lists, tuples, scalars, numpy arrays, _View, _Raw) as torch.save would
  (zip format, protocol-2 pickle of `_rebuild_tensor_v2` calls and storage persistent ids)."""
  storages = []

  def emit(x):
    if isinstance(x, _Raw):
      return x.ops
    if isinstance(x, np.ndarray):
      flat = np.ascontiguousarray(x).reshape(-1)
      x = _View(flat, 0, x.shape, [math.prod(x.shape[i + 1:]) for i in range(x.ndim)])
    if isinstance(x, _View):
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


def _evil_ops(fn, *args):
  """The opcodes of a pickle that calls fn(*args) when loaded (PROTO and STOP stripped)."""
  return pickle.dumps(_Evil(fn, args), protocol=2)[2:-1]


def _cli(capsys, *argv):
  code = convert.main([str(a) for a in argv])
  out = capsys.readouterr()
  return code, out.out, out.err


# ----------------------------------------------------------------------------- real torch files

def test_real_torch_checkpoint_loads_without_torch(gpt):
  ckpt = convert.read_checkpoint(TINY_PT)
  assert "torch" not in sys.modules
  assert sorted(ckpt) == ["args", "model", "optimizer", "steps"] and ckpt["steps"] == 5
  assert ckpt["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)
  assert sorted(ckpt["model"]) == sorted(gpt["sd"])
  for key, want in gpt["sd"].items():
    got = ckpt["model"][key]
    assert got.dtype == np.float32 and not got.flags.writeable
    np.testing.assert_array_equal(got, want)
  args = ckpt["args"]  # argparse.Namespace: recorded, not constructed
  assert isinstance(args, torch_pickle.Opaque) and args.qualname == "argparse.Namespace"
  assert args.state["gpt_model"] == "GPT-tiny"
  _assert_same(_pure(convert.load_gpt(TINY_PT, n_head=4)), gpt["params"])
  _assert_same(_pure(convert.load_gpt(pathlib.Path(TINY_PT), n_head=4)), gpt["params"])


def _get(tree, dotted):
  for part in dotted.split("."):
    tree = tree[int(part)] if isinstance(tree, (list, tuple)) else tree[part]
  return tree


def test_every_dtype_view_offset_stride_and_shared_storage():
  got = torch_pickle.load(FIXTURES / "torch_edge_cases.pt")
  with np.load(FIXTURES / "torch_edge_cases.npz") as z:
    want = {k: z[k] for k in z.files}
  for key, expected in want.items():
    a = _get(got, key)
    assert a.shape == expected.shape and not a.flags.writeable, key
    np.testing.assert_array_equal(a.astype(expected.dtype), expected, err_msg=key)
  assert got["bf16"].dtype == ml_dtypes.bfloat16 and got["f16"].dtype == np.float16
  assert got["i64"].dtype == np.int64 and got["i64"][2] == 2**40 and got["bool"].dtype == np.bool_
  assert np.shares_memory(got["tied_a"], got["tied_b"])  # one storage, mapped once
  assert got["size"] == (2, 3) and got["bytes"] == b"\x00\x01npp" and got["number"] == 1.25


def test_legacy_format_is_refused_with_a_resave_hint():
  with pytest.raises(torch_pickle.TorchFileError, match="legacy.*re-save"):
    convert.read_checkpoint(FIXTURES / "torch_legacy.pt")


# ----------------------------------------------------------------------------- hostile files

@pytest.fixture
def marker(tmp_path):
  path = tmp_path / "pwned"
  # Control: the payload is live, an ordinary unpickler runs it.
  pickle.loads(b"\x80\x02" + _evil_ops(open, str(path), "w") + b".").close()
  assert path.exists()
  path.unlink()
  return path


def _payloads(marker):
  return [_evil_ops(os.system, f"touch {marker}"), _evil_ops(open, str(marker), "w")]


def test_hostile_plain_pickle_is_refused_and_never_run(tmp_path, marker):
  for i, ops in enumerate(_payloads(marker)):
    path = tmp_path / f"evil{i}.pt"
    path.write_bytes(b"\x80\x02" + ops + b".")
    with pytest.raises(torch_pickle.TorchFileError, match="plain pickle holding .*(system|open)"):
      convert.read_checkpoint(path)
    assert not marker.exists()


def test_hostile_archive_is_refused_and_never_run(tmp_path, marker):
  for i, ops in enumerate(_payloads(marker)):
    path = _write_pt(tmp_path / f"evil{i}.pt", _Raw(ops))
    with pytest.raises(convert.ConversionError, match="holds a .*(system|open), not a mapping"):
      convert.read_checkpoint(path)
    with pytest.raises(convert.ConversionError):
      convert.load_gpt(path, n_head=4)
    assert not marker.exists()


def test_hostile_args_entry_is_inert_and_the_weights_still_load(tmp_path, marker, gpt, capsys):
  path = _write_pt(tmp_path / "ckpt.pt", {"model": gpt["sd"], "steps": 5,
                                          "args": _Raw(_evil_ops(os.system, f"touch {marker}"))})
  args = convert.read_checkpoint(path)["args"]
  assert args.qualname in ("posix.system", "os.system") and args.args == (f"touch {marker}",)
  _assert_same(_pure(convert.load_gpt(path, n_head=4)), gpt["params"])
  code, out, _ = _cli(capsys, "--kind", "gpt", "--src", path, "--dst", tmp_path / "out",
                      "--n_head", 4)
  assert code == 0 and f"args: {args.qualname}" in out
  assert not marker.exists()


def test_hostile_object_inside_the_weights_is_named(tmp_path, marker, gpt):
  sd = dict(gpt["sd"], **{"tok_embeddings.weight": _Raw(_evil_ops(open, str(marker), "w"))})
  with pytest.raises(convert.ConversionError, match="'tok_embeddings.weight' is a .*open object"):
    convert.load_gpt(_write_pt(tmp_path / "ckpt.pt", {"model": sd}), n_head=4)
  assert not marker.exists()


def test_tensors_reaching_outside_their_storage_are_refused(tmp_path):
  storage = np.arange(4, dtype=np.float32)
  for view, match in ((_View(storage, 0, (10,), (1,)), "past the end"),
                      (_View(storage, 2, (2, 2), (2, 1)), "past the end"),
                      (_View(storage, -1, (2,), (1,)), "offset")):
    with pytest.raises(torch_pickle.TorchFileError, match=match):
      torch_pickle.load(_write_pt(tmp_path / "bad.pt", {"w": view}))
  path = _write_pt(tmp_path / "short.pt", {"w": storage})
  with zipfile.ZipFile(path) as zf:  # the pickle claims 4 floats, the archive holds 2
    members = {n: zf.read(n) for n in zf.namelist()}
  members["archive/data/0"] = members["archive/data/0"][:8]
  with zipfile.ZipFile(path, "w") as zf:
    for name, data in members.items():
      zf.writestr(name, data)
  with pytest.raises(torch_pickle.TorchFileError, match="claims 4"):
    torch_pickle.load(path)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), shape=st.lists(st.integers(1, 4), min_size=1, max_size=3),
       dtype=st.sampled_from([np.float32, np.float16, ml_dtypes.bfloat16, np.int64, np.uint8]),
       big=st.booleans())
def test_strided_views_read_back_exactly(tmp_path_factory, data, shape, dtype, big):
  base = (np.arange(math.prod(shape)) % 251).astype(dtype).reshape(shape)
  slices = tuple(slice(data.draw(st.integers(0, n - 1)), None, data.draw(st.integers(1, 2)))
                 for n in shape)
  view = base[slices].transpose(data.draw(st.permutations(range(len(shape)))))
  item = base.itemsize
  offset = (view.__array_interface__["data"][0] - base.__array_interface__["data"][0]) // item
  path = tmp_path_factory.mktemp("views") / "v.pt"
  strides = [s // item for s in view.strides]
  _write_pt(path, {"v": _View(base.reshape(-1), offset, view.shape, strides)},
            byteorder="big" if big else "little")
  got = torch_pickle.load(path)["v"]
  assert got.dtype == view.dtype
  np.testing.assert_array_equal(got, view)


# ----------------------------------------------------------------------------- damaged files

def _flip(src, dst, at):
  data = bytearray(pathlib.Path(src).read_bytes())
  data[at] ^= 0x01
  pathlib.Path(dst).write_bytes(bytes(data))
  return dst


def test_damaged_real_checkpoint_is_refused_naming_the_member(tmp_path, capsys):
  bad = _flip(TINY_PT, tmp_path / "tiny_gpt.pt", 600_000)  # inside tiny_gpt/data/6
  with zipfile.ZipFile(bad) as zf:
    assert zf.testzip() == "tiny_gpt/data/6"  # control: the zip module sees the damage too
  with pytest.raises(torch_pickle.TorchFileError,
                     match=r"tiny_gpt.pt: storage 'tiny_gpt/data/6' fails its CRC-32 check"):
    torch_pickle.load(bad)
  code, _, err = _cli(capsys, "--kind", "gpt", "--src", bad, "--dst", tmp_path / "out",
                      "--n_head", 4)
  assert code == 1 and "'tiny_gpt/data/6'" in err and "re-download" in err
  assert not (tmp_path / "out").exists()


@settings(max_examples=30, deadline=None)
@given(data=st.data(), chunk=st.sampled_from([1, 7, 64, 1 << 24]),
       compress=st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]))
def test_any_flipped_byte_in_a_read_member_is_caught(tmp_path_factory, data, chunk, compress):
  # Members of every size, read in chunks smaller and larger than them, stored (mmapped and
  # checked by us) or deflated (checked by zipfile).
  tmp = tmp_path_factory.mktemp("crc")
  sd = {"a": np.arange(40, dtype=np.float32), "b": np.ones((3, 5), np.int64),
        "c": np.array([7], np.uint8)}
  path = _write_pt(tmp / "plain.pt", sd)
  if compress != zipfile.ZIP_STORED:
    with zipfile.ZipFile(path) as zf:
      members = {n: zf.read(n) for n in zf.namelist()}
    with zipfile.ZipFile(path, "w", compress) as zf:
      for name, blob in members.items():
        zf.writestr(name, blob)
  with mock.patch.object(torch_pickle, "_CRC_CHUNK", chunk):
    _assert_same(torch_pickle.load(path), sd)  # control: the intact file loads
    with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
      read = [i for i in zf.infolist() if i.filename != "archive/version"]  # never read
      info = data.draw(st.sampled_from(read))
      start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
      assert torch_pickle._member_offset(f, info) in (start, None)
    bad = _flip(path, tmp / "bad.pt", data.draw(st.integers(start, start + info.compress_size - 1)))
    if compress != zipfile.ZIP_STORED:
      # A flip in a deflate stream can leave the inflated bytes (all the CRC covers) intact, e.g.
      # the final-block bit: then the file must read back exactly.
      with zipfile.ZipFile(path) as zf:
        want = zf.read(info)
      with zipfile.ZipFile(bad) as zf:
        try:
          intact = zf.read(info) == want  # raises on a CRC or inflate failure
        except (zipfile.BadZipFile, EOFError, zlib.error):
          intact = False
      if intact:
        _assert_same(torch_pickle.load(bad), sd)
        return
    # CRC-32 catches every single-bit error in the bytes it covers.
    with pytest.raises(torch_pickle.TorchFileError, match=f"'{info.filename}'.*damaged"):
      torch_pickle.load(bad)


def test_directory_and_invalid_npz_sources_say_what_they_are(tmp_path, gpt, capsys):
  (tmp_path / "dir.pt").mkdir()
  for reader in (convert.read_checkpoint, torch_pickle.load, torch_pickle.load_safetensors):
    with pytest.raises(IsADirectoryError, match="dir.pt is a directory"):
      reader(tmp_path / "dir.pt")
  code, _, err = _cli(capsys, "--kind", "gpt", "--src", tmp_path / "dir.pt", "--dst",
                      tmp_path / "out", "--n_head", 4)
  assert code == 1 and "is a directory" in err and "not found" not in err
  (tmp_path / "random.npz").write_bytes(np.random.default_rng(0).bytes(1000))
  with pytest.raises(convert.ConversionError, match="random.npz: not a valid .npz"):
    convert.read_checkpoint(tmp_path / "random.npz")
  np.savez(tmp_path / "sd.npz", w=np.arange(1000, dtype=np.float32))
  with zipfile.ZipFile(tmp_path / "sd.npz") as zf:
    at = zf.getinfo("w.npy").header_offset + 30 + len("w.npy") + 2000  # inside the array
  _flip(tmp_path / "sd.npz", tmp_path / "damaged.npz", at)
  with pytest.raises(convert.ConversionError, match="damaged.npz: a damaged .npz.*CRC"):
    convert.read_checkpoint(tmp_path / "damaged.npz")


# ----------------------------------------------------------------------------- layouts and formats

@pytest.mark.parametrize("layout", ["raw", "model", "module", "state_dict", "ema"])
def test_layouts_and_prefixes_through_files(tmp_path, gpt, layout):
  sd = {(f"module._orig_mod.{k}" if i % 2 else f"_orig_mod.{k}"): v
        for i, (k, v) in enumerate(gpt["sd"].items())}
  sd["freqs_cis"] = gpt["io"]["freqs_cis_p1"]  # a buffer old reference checkpoints carry
  ckpt = sd if layout == "raw" else {layout: sd, "steps": 3, "args": {"lr": 1e-4}}
  path = _write_pt(tmp_path / f"{layout}.pth", ckpt)
  _assert_same(_pure(convert.load_gpt(path, n_head=4, use_ema=layout == "ema")), gpt["params"])


def _write_safetensors(path, sd):
  header, blobs, at = {"__metadata__": {"format": "pt"}}, [], 0
  names = {v: k for k, v in torch_pickle._SAFETENSORS_DTYPES.items()}
  for key, value in sd.items():
    blob = np.ascontiguousarray(value).tobytes()
    header[key] = {"dtype": names[value.dtype.type], "shape": list(value.shape),
                   "data_offsets": [at, at + len(blob)]}
    blobs.append(blob)
    at += len(blob)
  head = json.dumps(header).encode()
  path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))
  return path


def test_npz_and_safetensors_files(tmp_path, gpt):
  np.savez(tmp_path / "sd.npz", **gpt["sd"])
  _assert_same(_pure(convert.load_gpt(tmp_path / "sd.npz", n_head=4)), gpt["params"])
  st_path = _write_safetensors(tmp_path / "sd.safetensors", gpt["sd"])
  _assert_same(_pure(convert.load_gpt(st_path, n_head=4)), gpt["params"])
  mixed = {"bf16": np.array([1.5, -2], ml_dtypes.bfloat16), "i64": np.arange(6).reshape(2, 3)}
  got = convert.read_checkpoint(_write_safetensors(tmp_path / "mixed.safetensors", mixed))
  assert sorted(got) == ["bf16", "i64"] and got["bf16"].dtype == ml_dtypes.bfloat16
  _assert_same(got, mixed)
  np.savez(tmp_path / "objects.npz", w=np.array([{"a": 1}], dtype=object))
  with pytest.raises(convert.ConversionError, match="objects.npz"):
    convert.read_checkpoint(tmp_path / "objects.npz")
  with pytest.raises(convert.ConversionError, match="unknown checkpoint suffix '.h5'"):
    convert.read_checkpoint(tmp_path / "weights.h5")
  with pytest.raises(FileNotFoundError, match="nothing.pt"):
    convert.read_checkpoint(tmp_path / "nothing.pt")


# ----------------------------------------------------------------------------- command line: GPT

def test_cli_gpt_round_trip_into_a_sharded_model(tmp_path, gpt, capsys):
  dst = tmp_path / "gpt"
  code, out, err = _cli(capsys, "--kind", "gpt", "--src", TINY_PT, "--dst", dst, "--n_head", 4)
  assert code == 0, err
  assert f"{dst}/params" in out and "260,992 parameters" in out and "'n_head': 4" in out
  fields = checkpoint.read_model_config(dst)
  assert [fields[k] for k in ("dim", "n_layer", "n_head", "vocab_size")] == [64, 2, 4, 512]
  # What config.ckpt.init_from does: load_params into the state of a fresh model of the same
  # config, sharded over 8 devices. load_params reads only the shapes and shardings of its target,
  # so the target is abstract here (a random init would only slow the test down).
  cfg = model_lib.ModelConfig(**fields)
  mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
  graphdef, target = nnx.split(nnx.eval_shape(lambda: model_lib.Transformer(cfg, rngs=nnx.Rngs(1))))
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        target, sharding.state_shardings(target, mesh))
  params = checkpoint.load_params(dst, target)
  jax.tree.map(lambda p, t: np.testing.assert_equal(p.sharding, t.sharding), params, target)
  assert len(params["tok_embeddings"]["embedding"][...].sharding.device_set) == 8
  model = nnx.merge(graphdef, params)
  _assert_same(_pure(model), gpt["params"])
  io = gpt["io"]
  with sharding.use_mesh(mesh):
    logits = nnx.jit(lambda m, c, y: m(c, y))(model, io["idx"].astype(np.int32),
                                              io["labels"].astype(np.int32))
  np.testing.assert_allclose(np.asarray(logits), io["p1_train/logits"], rtol=0, atol=1e-4)
  _assert_same(_pure(convert.load_converted_gpt(dst)), gpt["params"])
  assert convert.load_converted_gpt(dst, dtype="bfloat16").cfg.dtype == "bfloat16"
  code, out, err = _cli(capsys, "--kind", "gpt", "--src", TINY_PT, "--dst", tmp_path / "g24",
                        "--n_head", 4, "--grid_size", 24)  # e.g. a 384 px checkpoint
  assert code == 0 and convert.load_converted_gpt(tmp_path / "g24").cfg.grid_size == 24, err


def _broken(sd):
  bad = {k: v for k, v in sd.items() if k != "layers.0.ffn_norm.weight"}
  bad["layers.0.attention.bias"] = np.zeros(192, np.float32)
  bad["layers.1.feed_forward.w2.weight"] = np.zeros((256, 64), np.float32)
  return bad


def test_cli_strict_errors_list_every_key(tmp_path, gpt, capsys):
  path = _write_pt(tmp_path / "bad.pt", {"model": _broken(gpt["sd"])})
  code, _, err = _cli(capsys, "--kind", "gpt", "--src", path, "--dst", tmp_path / "out",
                      "--n_head", 4)
  assert code == 1 and "3 problems" in err
  for key in ("missing key layers.0.ffn_norm.weight", "unexpected key layers.0.attention.bias",
              "shape mismatch for layers.1.feed_forward.w2.weight"):
    assert key in err
  assert not (tmp_path / "out").exists()
  code, _, err = _cli(capsys, "--kind", "gpt", "--src", TINY_PT, "--dst", tmp_path / "out")
  assert code == 1 and "pass variant= or n_head=" in err


def test_cli_bad_n_head_and_dst_fail_cleanly_before_any_write(tmp_path, capsys):
  for n_head in (0, -4, 3):
    code, _, err = _cli(capsys, "--kind", "gpt", "--src", TINY_PT, "--dst", tmp_path / "out",
                        "--n_head", n_head)
    assert code == 1 and f"n_head={n_head} (--n_head)" in err and "width 64" in err
  (tmp_path / "file").write_text("keep me")
  for dst, says in ((tmp_path / "file", "is an existing file"),
                    (tmp_path / "file" / "sub" / "out", f"{tmp_path / 'file'} is a file")):
    code, _, err = _cli(capsys, "--kind", "gpt", "--src", TINY_PT, "--dst", dst, "--n_head", 4)
    assert code == 1 and f"--dst {dst}" in err and says in err, err
  assert (tmp_path / "file").read_text() == "keep me"
  assert not (tmp_path / "out").exists()


def test_cli_refuses_to_overwrite_the_other_kind_but_reruns_the_same(tmp_path, gpt, capsys):
  vq_dir, gpt_dir = tmp_path / "vq", tmp_path / "gpt"
  vq_fields = json.loads(json.dumps(dataclasses.asdict(vq.VQConfig())))
  gpt_fields = dataclasses.asdict(model_lib.config_for("B"))
  for path, fields in ((vq_dir, vq_fields), (gpt_dir, gpt_fields)):
    path.mkdir()
    (path / "model_config.json").write_text(json.dumps(fields))
  code, _, err = _cli(capsys, "--kind", "gpt", "--src", TINY_PT, "--dst", vq_dir, "--n_head", 4)
  assert code == 1 and f"--dst {vq_dir} already holds a converted VQ tokenizer" in err
  code, _, err = _cli(capsys, "--kind", "vq", "--src", TINY_PT, "--dst", gpt_dir)
  assert code == 1 and f"--dst {gpt_dir} already holds a converted GPT" in err
  assert checkpoint.read_model_config(vq_dir) == vq_fields  # untouched
  # The same kind again (here over a GPT-B conversion) overwrites, as rerunning a command must.
  code, _, err = _cli(capsys, "--kind", "gpt", "--src", TINY_PT, "--dst", gpt_dir, "--n_head", 4)
  assert code == 0, err
  _assert_same(_pure(convert.load_converted_gpt(gpt_dir)), gpt["params"])


def test_cli_wrong_variant_exits_nonzero_from_the_shell(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "npp_jax.convert", "--kind", "gpt", "--src", str(TINY_PT),
       "--dst", str(tmp_path / "out"), "--variant", "B"],
      capture_output=True, text=True, cwd=pathlib.Path(__file__).parents[1], timeout=120)
  assert proc.returncode == 1
  assert ("variant=B has 12 layers of width 768, but the checkpoint has 2 layers of width 64"
          in proc.stderr)
  with pytest.raises(convert.ConversionError, match="'7X'"):
    convert.convert_checkpoint("gpt", TINY_PT, tmp_path / "out", variant="7X")
  with pytest.raises(convert.ConversionError, match="kind='gpt' only"):
    convert.convert_checkpoint("vq", TINY_PT, tmp_path / "out", variant="B")


# ----------------------------------------------------------------------------- command line: VQ

def test_cli_vq_round_trip_reproduces_reference_codes(tmp_path, vq_fx, capsys):
  sd, io = vq_fx
  assert "quantize.codebook_used" in sd  # a buffer the converter drops
  path = _write_pt(tmp_path / "vq.pt", {"model": {f"module.{k}": v for k, v in sd.items()},
                                        "steps": 1, "args": None})
  dst = tmp_path / "vq"
  code, out, err = _cli(capsys, "--kind", "vq", "--src", path, "--dst", dst)
  assert code == 0, err
  assert "vq config" in out
  assert checkpoint.read_model_config(dst)["ch"] == 64
  model = convert.load_converted_vq(dst)
  want = {k: v for k, v in sd.items() if k != "quantize.codebook_used"}
  _assert_same(_pure(model), _pure(convert.load_vq(want)))
  # The same jitted function as test_vq.py, so the two share one compilation (conftest cache).
  codes = np.asarray(nnx.jit(lambda m, x: m.encode(x))(
      model, np.transpose(io["image"], (0, 2, 3, 1)))["codes"])
  sure = io["code_margin"] >= TAU
  assert sure.mean() > 0.9
  np.testing.assert_array_equal(codes[sure], io["codes"][sure])
  with pytest.raises(convert.ConversionError, match="does not hold a converted GPT"):
    convert.load_converted_gpt(dst)


def test_cli_vq_strict_errors_and_ema(tmp_path, vq_fx, capsys):
  sd, _ = vq_fx
  bad = {k: v for k, v in sd.items() if k != "decoder.conv_out.bias"}
  bad["decoder.extra.weight"] = np.zeros(3, np.float32)
  path = _write_pt(tmp_path / "bad.pt", {"model": sd, "ema": bad})
  code, _, err = _cli(capsys, "--kind", "vq", "--src", path, "--dst", tmp_path / "out", "--use_ema")
  assert code == 1 and "decoder.conv_out.bias" in err and "decoder.extra.weight" in err
  code, _, err = _cli(capsys, "--kind", "vq", "--src", TINY_PT, "--dst", tmp_path / "out")
  assert code == 1 and "encoder.conv_in.weight" in err  # a GPT file is not a tokenizer
  with pytest.raises(FileNotFoundError, match="model_config.json"):
    convert.load_converted_vq(tmp_path)
