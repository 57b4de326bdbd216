"""The `python -m npp_jax.convert` command line and the converters: layouts and formats (.pt,
.npz, .safetensors), GPT and VQ round trips into sharded models, strict errors, bad flags and
destinations. Reading .pt files is tested in `test_torch_pickle.py`."""
import dataclasses
import json
import pathlib
import struct
import subprocess
import sys

from flax import nnx
import jax
import ml_dtypes
import numpy as np
import pytest

from naming import raises_naming
from npp_jax import checkpoint
from npp_jax import convert
from npp_jax import model as model_lib
from npp_jax import sharding
from npp_jax import torch_pickle
from npp_jax import vq
from torch_files import TINY_PT, assert_same, pure, run_cli, write_pt

TAU = 1e-4  # near-tie threshold for VQ codes (fixture README)


# ----------------------------------------------------------------------------- layouts and formats

@pytest.mark.parametrize("layout", ["raw", "model", "module", "state_dict", "ema"])
def test_layouts_and_prefixes_through_files(tmp_path, gpt, layout):
  sd = {(f"module._orig_mod.{k}" if i % 2 else f"_orig_mod.{k}"): v
        for i, (k, v) in enumerate(gpt["sd"].items())}
  sd["freqs_cis"] = gpt["io"]["freqs_cis_p1"]  # a buffer old reference checkpoints carry
  ckpt = sd if layout == "raw" else {layout: sd, "steps": 3, "args": {"lr": 1e-4}}
  path = write_pt(tmp_path / f"{layout}.pth", ckpt)
  assert_same(pure(convert.load_gpt(path, n_head=4, use_ema=layout == "ema")), gpt["params"])


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
  assert_same(pure(convert.load_gpt(tmp_path / "sd.npz", n_head=4)), gpt["params"])
  st_path = _write_safetensors(tmp_path / "sd.safetensors", gpt["sd"])
  assert_same(pure(convert.load_gpt(st_path, n_head=4)), gpt["params"])
  mixed = {"bf16": np.array([1.5, -2], ml_dtypes.bfloat16), "i64": np.arange(6).reshape(2, 3)}
  got = convert.read_checkpoint(_write_safetensors(tmp_path / "mixed.safetensors", mixed))
  assert sorted(got) == ["bf16", "i64"] and got["bf16"].dtype == ml_dtypes.bfloat16
  assert_same(got, mixed)
  np.savez(tmp_path / "objects.npz", w=np.array([{"a": 1}], dtype=object))
  with pytest.raises(convert.ConversionError, match="objects.npz"):
    convert.read_checkpoint(tmp_path / "objects.npz")
  with raises_naming(convert.ConversionError, tmp_path / "weights.h5", "'.h5'"):
    convert.read_checkpoint(tmp_path / "weights.h5")
  with pytest.raises(FileNotFoundError, match="nothing.pt"):
    convert.read_checkpoint(tmp_path / "nothing.pt")


# ----------------------------------------------------------------------------- command line: GPT

def test_cli_gpt_round_trip_into_a_sharded_model(tmp_path, gpt, capsys):
  dst = tmp_path / "gpt"
  code, out, err = run_cli(capsys, "--kind", "gpt", "--src", TINY_PT, "--dst", dst, "--n_head", 4)
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
  assert_same(pure(model), gpt["params"])
  io = gpt["io"]
  with sharding.use_mesh(mesh):
    logits = nnx.jit(lambda m, c, y: m(c, y))(model, io["idx"].astype(np.int32),
                                              io["labels"].astype(np.int32))
  np.testing.assert_allclose(np.asarray(logits), io["p1_train/logits"], rtol=0, atol=1e-4)
  assert_same(pure(convert.load_converted_gpt(dst)), gpt["params"])
  assert convert.load_converted_gpt(dst, dtype="bfloat16").cfg.dtype == "bfloat16"
  code, out, err = run_cli(capsys, "--kind", "gpt", "--src", TINY_PT, "--dst", tmp_path / "g24",
                        "--n_head", 4, "--grid_size", 24)  # e.g. a 384 px checkpoint
  assert code == 0 and convert.load_converted_gpt(tmp_path / "g24").cfg.grid_size == 24, err


def _broken(sd):
  bad = {k: v for k, v in sd.items() if k != "layers.0.ffn_norm.weight"}
  bad["layers.0.attention.bias"] = np.zeros(192, np.float32)
  bad["layers.1.feed_forward.w2.weight"] = np.zeros((256, 64), np.float32)
  return bad


def test_cli_strict_errors_list_every_key(tmp_path, gpt, capsys):
  path = write_pt(tmp_path / "bad.pt", {"model": _broken(gpt["sd"])})
  code, _, err = run_cli(capsys, "--kind", "gpt", "--src", path, "--dst", tmp_path / "out",
                      "--n_head", 4)
  assert code == 1
  for key in ("layers.0.ffn_norm.weight", "layers.0.attention.bias",
              "layers.1.feed_forward.w2.weight"):
    assert key in err
  assert not (tmp_path / "out").exists()
  code, _, err = run_cli(capsys, "--kind", "gpt", "--src", TINY_PT, "--dst", tmp_path / "out")
  assert code == 1 and "variant=" in err and "n_head=" in err


def test_cli_bad_n_head_and_dst_fail_cleanly_before_any_write(tmp_path, capsys):
  for n_head in (0, -4, 3):
    code, _, err = run_cli(capsys, "--kind", "gpt", "--src", TINY_PT, "--dst", tmp_path / "out",
                        "--n_head", n_head)
    assert code == 1 and all(s in err for s in (f"n_head={n_head}", "--n_head", "64")), err
  (tmp_path / "file").write_text("keep me")
  for dst in (tmp_path / "file", tmp_path / "file" / "sub" / "out"):
    code, _, err = run_cli(capsys, "--kind", "gpt", "--src", TINY_PT, "--dst", dst, "--n_head", 4)
    assert code == 1 and "--dst" in err and str(dst) in err, err
  assert err.count(str(tmp_path / "file")) >= 2, err  # the dst, and the file in its way
  assert (tmp_path / "file").read_text() == "keep me"
  assert not (tmp_path / "out").exists()


def test_cli_refuses_to_overwrite_the_other_kind_but_reruns_the_same(tmp_path, gpt, capsys):
  vq_dir, gpt_dir = tmp_path / "vq", tmp_path / "gpt"
  vq_fields = json.loads(json.dumps(dataclasses.asdict(vq.VQConfig())))
  gpt_fields = dataclasses.asdict(model_lib.config_for("B"))
  for path, fields in ((vq_dir, vq_fields), (gpt_dir, gpt_fields)):
    path.mkdir()
    (path / "model_config.json").write_text(json.dumps(fields))
  code, _, err = run_cli(capsys, "--kind", "gpt", "--src", TINY_PT, "--dst", vq_dir, "--n_head", 4)
  assert code == 1 and "--dst" in err and str(vq_dir / "model_config.json") in err, err
  code, _, err = run_cli(capsys, "--kind", "vq", "--src", TINY_PT, "--dst", gpt_dir)
  assert code == 1 and "--dst" in err and str(gpt_dir / "model_config.json") in err, err
  assert checkpoint.read_model_config(vq_dir) == vq_fields  # untouched
  # The same kind again (here over a GPT-B conversion) overwrites, as rerunning a command must.
  code, _, err = run_cli(capsys, "--kind", "gpt", "--src", TINY_PT, "--dst", gpt_dir, "--n_head", 4)
  assert code == 0, err
  assert_same(pure(convert.load_converted_gpt(gpt_dir)), gpt["params"])


@pytest.mark.slow  # a Python subprocess
def test_cli_wrong_variant_exits_nonzero_from_the_shell(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "npp_jax.convert", "--kind", "gpt", "--src", str(TINY_PT),
       "--dst", str(tmp_path / "out"), "--variant", "B"],
      capture_output=True, text=True, cwd=pathlib.Path(__file__).parents[1], timeout=120)
  assert proc.returncode == 1
  assert all(s in proc.stderr for s in ("variant=B", "12", "768", "64")), proc.stderr
  with pytest.raises(convert.ConversionError, match="'7X'"):
    convert.convert_checkpoint("gpt", TINY_PT, tmp_path / "out", variant="7X")
  with raises_naming(convert.ConversionError, "variant", "kind='gpt'"):
    convert.convert_checkpoint("vq", TINY_PT, tmp_path / "out", variant="B")


# ----------------------------------------------------------------------------- command line: VQ

def test_cli_vq_round_trip_reproduces_reference_codes(tmp_path, vq_fx, capsys):
  sd, io = vq_fx
  assert "quantize.codebook_used" in sd  # a buffer the converter drops
  path = write_pt(tmp_path / "vq.pt", {"model": {f"module.{k}": v for k, v in sd.items()},
                                        "steps": 1, "args": None})
  dst = tmp_path / "vq"
  code, out, err = run_cli(capsys, "--kind", "vq", "--src", path, "--dst", dst)
  assert code == 0, err
  assert "vq config" in out
  assert checkpoint.read_model_config(dst)["ch"] == 64
  model = convert.load_converted_vq(dst)
  want = {k: v for k, v in sd.items() if k != "quantize.codebook_used"}
  assert_same(pure(model), pure(convert.load_vq(want)))
  # The same jitted function as test_vq.py, so the two share one compilation (conftest cache).
  codes = np.asarray(nnx.jit(lambda m, x: m.encode(x))(
      model, np.transpose(io["image"], (0, 2, 3, 1)))["codes"])
  sure = io["code_margin"] >= TAU
  assert sure.mean() > 0.9
  np.testing.assert_array_equal(codes[sure], io["codes"][sure])
  with raises_naming(convert.ConversionError, dst, "ModelConfig"):
    convert.load_converted_gpt(dst)


def test_cli_vq_strict_errors_and_ema(tmp_path, vq_fx, capsys):
  sd, _ = vq_fx
  bad = {k: v for k, v in sd.items() if k != "decoder.conv_out.bias"}
  bad["decoder.extra.weight"] = np.zeros(3, np.float32)
  path = write_pt(tmp_path / "bad.pt", {"model": sd, "ema": bad})
  code, _, err = run_cli(capsys, "--kind", "vq", "--src", path, "--dst", tmp_path / "out",
                         "--use_ema")
  assert code == 1 and "decoder.conv_out.bias" in err and "decoder.extra.weight" in err
  code, _, err = run_cli(capsys, "--kind", "vq", "--src", TINY_PT, "--dst", tmp_path / "out")
  assert code == 1 and "encoder.conv_in.weight" in err  # a GPT file is not a tokenizer
  with pytest.raises(FileNotFoundError, match="model_config.json"):
    convert.load_converted_vq(tmp_path)
