"""Reading PyTorch weight files without PyTorch (npp_jax.torch_pickle): real `torch.save` files
(tests/fixtures/*.pt, made by tests/fixtures/make_torch_fixtures.py), hand-written ones
(`torch_files.write_pt`) with every dtype/view/stride, hostile pickles that must never run, and
damaged files that must be refused naming the member."""
import math
import os
import pathlib
import pickle
import sys
from unittest import mock
import zipfile
import zlib

from hypothesis import given, settings, strategies as st
import ml_dtypes
import numpy as np
import pytest

from naming import raises_naming
from npp_jax import convert
from npp_jax import torch_pickle
from torch_files import (FIXTURES, TINY_PT, Raw, View, assert_same, evil_ops, pure, run_cli,
                         write_pt)


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
  assert_same(pure(convert.load_gpt(TINY_PT, n_head=4)), gpt["params"])
  assert_same(pure(convert.load_gpt(pathlib.Path(TINY_PT), n_head=4)), gpt["params"])


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
  with raises_naming(torch_pickle.TorchFileError, FIXTURES / "torch_legacy.pt", "legacy",
                     "torch.save"):
    convert.read_checkpoint(FIXTURES / "torch_legacy.pt")


# ----------------------------------------------------------------------------- hostile files

@pytest.fixture
def marker(tmp_path):
  path = tmp_path / "pwned"
  # Control: the payload is live, an ordinary unpickler runs it.
  pickle.loads(b"\x80\x02" + evil_ops(open, str(path), "w") + b".").close()
  assert path.exists()
  path.unlink()
  return path


def _payloads(marker):
  """(pickle ops, what the refusal names) of each payload."""
  return [(evil_ops(os.system, f"touch {marker}"), "system"),
          (evil_ops(open, str(marker), "w"), "open")]


def test_hostile_plain_pickle_is_refused_and_never_run(tmp_path, marker):
  for i, (ops, what) in enumerate(_payloads(marker)):
    path = tmp_path / f"evil{i}.pt"
    path.write_bytes(b"\x80\x02" + ops + b".")
    with raises_naming(torch_pickle.TorchFileError, path, "pickle", what):
      convert.read_checkpoint(path)
    assert not marker.exists()


def test_hostile_archive_is_refused_and_never_run(tmp_path, marker):
  for i, (ops, what) in enumerate(_payloads(marker)):
    path = write_pt(tmp_path / f"evil{i}.pt", Raw(ops))
    with raises_naming(convert.ConversionError, path, what):
      convert.read_checkpoint(path)
    with pytest.raises(convert.ConversionError):
      convert.load_gpt(path, n_head=4)
    assert not marker.exists()


def test_hostile_args_entry_is_inert_and_the_weights_still_load(tmp_path, marker, gpt, capsys):
  path = write_pt(tmp_path / "ckpt.pt", {"model": gpt["sd"], "steps": 5,
                                          "args": Raw(evil_ops(os.system, f"touch {marker}"))})
  args = convert.read_checkpoint(path)["args"]
  assert args.qualname in ("posix.system", "os.system") and args.args == (f"touch {marker}",)
  assert_same(pure(convert.load_gpt(path, n_head=4)), gpt["params"])
  code, out, _ = run_cli(capsys, "--kind", "gpt", "--src", path, "--dst", tmp_path / "out",
                      "--n_head", 4)
  assert code == 0 and f"args: {args.qualname}" in out
  assert not marker.exists()


def test_hostile_object_inside_the_weights_is_named(tmp_path, marker, gpt):
  sd = dict(gpt["sd"], **{"tok_embeddings.weight": Raw(evil_ops(open, str(marker), "w"))})
  with raises_naming(convert.ConversionError, "'tok_embeddings.weight'", "open"):
    convert.load_gpt(write_pt(tmp_path / "ckpt.pt", {"model": sd}), n_head=4)
  assert not marker.exists()


def test_tensors_reaching_outside_their_storage_are_refused(tmp_path):
  storage = np.arange(4, dtype=np.float32)
  for view, names in ((View(storage, 0, (10,), (1,)), ("size (10,)", "stride (1,)")),
                      (View(storage, 2, (2, 2), (2, 1)), ("size (2, 2)", "stride (2, 1)")),
                      (View(storage, -1, (2,), (1,)), ("offset", -1))):
    with raises_naming(torch_pickle.TorchFileError, tmp_path / "bad.pt", *names):
      torch_pickle.load(write_pt(tmp_path / "bad.pt", {"w": view}))
  path = write_pt(tmp_path / "short.pt", {"w": storage})
  with zipfile.ZipFile(path) as zf:  # the pickle claims 4 floats, the archive holds 2
    members = {n: zf.read(n) for n in zf.namelist()}
  members["archive/data/0"] = members["archive/data/0"][:8]
  with zipfile.ZipFile(path, "w") as zf:
    for name, data in members.items():
      zf.writestr(name, data)
  with raises_naming(torch_pickle.TorchFileError, path, "float32", 4, 8):  # 4 floats, 8 bytes
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
  write_pt(path, {"v": View(base.reshape(-1), offset, view.shape, strides)},
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
  with raises_naming(torch_pickle.TorchFileError, bad, "'tiny_gpt/data/6'", "CRC-32"):
    torch_pickle.load(bad)
  code, _, err = run_cli(capsys, "--kind", "gpt", "--src", bad, "--dst", tmp_path / "out",
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
  path = write_pt(tmp / "plain.pt", sd)
  if compress != zipfile.ZIP_STORED:
    with zipfile.ZipFile(path) as zf:
      members = {n: zf.read(n) for n in zf.namelist()}
    with zipfile.ZipFile(path, "w", compress) as zf:
      for name, blob in members.items():
        zf.writestr(name, blob)
  with mock.patch.object(torch_pickle, "_CRC_CHUNK", chunk):
    assert_same(torch_pickle.load(path), sd)  # control: the intact file loads
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
        assert_same(torch_pickle.load(bad), sd)
        return
    # CRC-32 catches every single-bit error in the bytes it covers.
    with raises_naming(torch_pickle.TorchFileError, bad, f"'{info.filename}'"):
      torch_pickle.load(bad)


def test_directory_and_invalid_npz_sources_say_what_they_are(tmp_path, gpt, capsys):
  (tmp_path / "dir.pt").mkdir()
  messages = []
  for reader in (convert.read_checkpoint, torch_pickle.load, torch_pickle.load_safetensors):
    with raises_naming(IsADirectoryError, tmp_path / "dir.pt") as e:
      reader(tmp_path / "dir.pt")
    messages.append(str(e.value))
  code, _, err = run_cli(capsys, "--kind", "gpt", "--src", tmp_path / "dir.pt", "--dst",
                      tmp_path / "out", "--n_head", 4)
  assert code == 1 and messages[0] in err  # read_checkpoint's IsADirectoryError, not "missing"
  (tmp_path / "random.npz").write_bytes(np.random.default_rng(0).bytes(1000))
  with raises_naming(convert.ConversionError, tmp_path / "random.npz"):
    convert.read_checkpoint(tmp_path / "random.npz")
  np.savez(tmp_path / "sd.npz", w=np.arange(1000, dtype=np.float32))
  with zipfile.ZipFile(tmp_path / "sd.npz") as zf:
    at = zf.getinfo("w.npy").header_offset + 30 + len("w.npy") + 2000  # inside the array
  _flip(tmp_path / "sd.npz", tmp_path / "damaged.npz", at)
  with raises_naming(convert.ConversionError, tmp_path / "damaged.npz", "CRC"):
    convert.read_checkpoint(tmp_path / "damaged.npz")
