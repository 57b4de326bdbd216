"""Released weights in one call: names and hf:// paths downloaded from a local hub stub
(tests/hub_stub.py via HF_ENDPOINT), converted once, cached; damaged downloads named and gone."""
import dataclasses
import os
import pathlib
import subprocess
import sys

from huggingface_hub import constants as hf_constants
from huggingface_hub import file_download as hf_download
import jax
import numpy as np
import pytest
from flax import nnx

from naming import raises_naming
from npp_jax import checkpoint as ckpt_lib
from npp_jax import convert, hub, load, sample_cli
from npp_jax import model as model_lib
from hub_stub import HubStub, tiny_vq_state_dict
from torch_files import TINY_PT, pure, write_pt
from train_helpers import main_env

REPO = pathlib.Path(__file__).resolve().parent.parent

NPP = "pytttttt/LlamaGen-NPP"
LLAMAGEN = "FoundationVision/LlamaGen"


@pytest.fixture
def stub(monkeypatch, tmp_path):
  """A hub serving the tiny reference GPT as NPP-B and a 512-code VQ as VQ-16; HF_HOME in tmp.

  npp-b is registered with the tiny GPT's size (2 layers, 4 heads, width 64) in place of GPT-B's.
  """
  monkeypatch.setitem(model_lib.VARIANTS, "tiny", (2, 4, 64))
  monkeypatch.setitem(hub.PRETRAINED, "npp-b",
                      dataclasses.replace(hub.PRETRAINED["npp-b"], variant="tiny"))
  monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_TELEMETRY", True)
  monkeypatch.setattr(hf_download.time, "sleep", lambda s: None)  # retries
  # The hub client writes what it received in chunks of this size (10 MB); a dropped connection
  # loses the partial chunk. Weights are hundreds of MB; the tiny fixture needs small chunks.
  monkeypatch.setattr(hf_constants, "DOWNLOAD_CHUNK_SIZE", 1 << 16)
  for var in ("HF_HUB_CACHE", "HF_HUB_OFFLINE"):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
  with HubStub() as server:
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    server.add(NPP, "c2i_B_256.pt", TINY_PT.read_bytes())
    server.add(LLAMAGEN, "vq_ds16_c2i.pt",
               write_pt(tmp_path / "vq.pt", {"model": tiny_vq_state_dict()}).read_bytes())
    yield server


def _converted_dirs():
  root = pathlib.Path(hub.hf_home()) / "npp_jax"
  return sorted(p.name for p in root.iterdir()) if root.exists() else []


def _blobs():
  return sorted(p.name for p in pathlib.Path(hub.hub_cache()).rglob("*")
                if p.is_file() and "blobs" in p.parts or p.name.endswith(".incomplete"))


def test_parse_names_the_bad_path():
  assert hub.parse("hf://a/b/dir/f.pt") == hub.HubFile("a/b", "dir/f.pt")
  assert hub.parse("hf://a/b@v1/f.pt") == hub.HubFile("a/b", "f.pt", "v1")
  assert hub.parse("npp-xl").filename == "c2i_XL_256.pt"
  for bad in ("hf://a/b", "hf://a//f.pt", "/local/file.pt"):
    with raises_naming(ValueError, repr(bad), "hf://OWNER/REPO/FILE"):
      hub.parse(bad)


def test_released_models_know_their_size_config_and_cfg():
  assert {n: (p.variant, p.cfg_scale, p.fid) for n, p in hub.PRETRAINED.items()
          if n.startswith("npp")} == {"npp-b": ("B", 2.0, 4.47), "npp-l": ("L", 1.75, 2.76),
                                      "npp-xl": ("XL", 1.70, 2.65), "npp-xxl": ("XXL", 1.65, 2.55)}
  for name in hub.GPT_NAMES:
    config = sample_cli.pretrained_config(name)
    entry = hub.PRETRAINED[name]
    assert config.model.variant == entry.variant and config.sample.cfg_scale == entry.cfg_scale
    assert config.sample.vq_checkpoint == "vq-16"


def test_a_name_downloads_converts_once_and_loads(stub, gpt, monkeypatch):
  model = load.load_model("npp-b")
  jax.tree.map(np.testing.assert_array_equal, pure(model), gpt["params"])
  assert model.cfg.class_dropout == 0.0 and len(stub.gets("c2i_B_256.pt")) == 1
  (dst,) = _converted_dirs()
  assert dst.startswith("gpt-")
  # The second call downloads and converts nothing (the hub is only asked for the file's ETag).
  monkeypatch.setattr(convert, "convert_checkpoint", None)
  again = load.load_model("npp-b", dtype="bfloat16")
  assert again.cfg.dtype == "bfloat16" and len(stub.gets("c2i_B_256.pt")) == 1
  jax.tree.map(np.testing.assert_array_equal, pure(again), gpt["params"])
  # init_from reads the same cache; offline, the cache alone serves it.
  target = nnx.split(model)[1]
  jax.tree.map(np.testing.assert_array_equal, load.load_params("npp-b", target), target)
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
  pure(load.load_model("npp-b"))


def test_hf_paths_work_in_the_converter_and_for_the_vq(stub, gpt, vq_fx, tmp_path):
  stub.add("someone/tiny", "weights/tiny_gpt.pt", TINY_PT.read_bytes())
  path = "hf://someone/tiny/weights/tiny_gpt.pt"
  jax.tree.map(np.testing.assert_array_equal, pure(convert.load_gpt(path, n_head=4)),
               gpt["params"])
  jax.tree.map(np.testing.assert_array_equal, pure(load.load_model(path, n_head=4)),
               gpt["params"])
  out = convert.convert_checkpoint("gpt", "npp-b", tmp_path / "npp_b")
  assert out["model_config"]["n_head"] == 4
  with pytest.raises(convert.ConversionError, match="--kind vq"):
    convert.convert_checkpoint("gpt", "vq-16", tmp_path / "x")
  sd = tiny_vq_state_dict()
  vq = load.load_vq("vq-16")
  assert vq.config.codebook_size == 512
  np.testing.assert_array_equal(np.asarray(vq.quantize.embedding.embedding[...]),
                                sd["quantize.embedding.weight"])
  assert load.load_vq("vq-16").config == vq.config and len(stub.gets("vq_ds16_c2i.pt")) == 1


def test_a_dropped_connection_resumes_with_a_range_request(stub, gpt):
  stub.files[(NPP, "c2i_B_256.pt")].truncate = 1
  jax.tree.map(np.testing.assert_array_equal, pure(load.load_model("npp-b")), gpt["params"])
  first, second = ({k.lower(): v for k, v in h.items()} for h in stub.gets("c2i_B_256.pt"))
  assert "range" not in first
  start = int(second["range"].removeprefix("bytes=").removesuffix("-"))
  assert 0 < start <= len(TINY_PT.read_bytes()) // 2  # what had arrived is kept


def test_a_truncated_download_is_named_and_leaves_no_file(stub):
  stub.files[(NPP, "c2i_B_256.pt")].truncate = 100  # every attempt stops halfway
  with pytest.raises(hub.HubError, match="hf://pytttttt/LlamaGen-NPP/c2i_B_256.pt"):
    load.load_model("npp-b")
  assert _blobs() == [] and _converted_dirs() == []


def test_a_file_that_is_not_what_the_hub_says_is_removed(stub, gpt):
  stub.files[(NPP, "c2i_B_256.pt")].corrupt = True
  with raises_naming(hub.HubError, "hf://pytttttt/LlamaGen-NPP/c2i_B_256.pt", "sha256"):
    load.load_model("npp-b")
  assert _blobs() == [] and _converted_dirs() == []
  stub.files[(NPP, "c2i_B_256.pt")].corrupt = False  # the hub is fixed: a rerun downloads again
  jax.tree.map(np.testing.assert_array_equal, pure(load.load_model("npp-b")), gpt["params"])


def test_wrong_files_are_named_and_nothing_corrupt_is_cached(stub):
  stub.add(NPP, "not_weights.pt", b"<html>rate limited</html>")
  with pytest.raises(convert.ConversionError, match="hf://pytttttt/LlamaGen-NPP/not_weights.pt"):
    load.load_model("hf://pytttttt/LlamaGen-NPP/not_weights.pt")
  assert _blobs() == []  # an unreadable file leaves the download cache too
  # A readable file of the wrong kind: refused by the strict converter, no conversion cached.
  with raises_naming(convert.ConversionError, "GPT", "tok_embeddings.weight"):
    load.load_model(f"hf://{LLAMAGEN}/vq_ds16_c2i.pt")
  assert _converted_dirs() == []
  with pytest.raises(FileNotFoundError, match="hf://pytttttt/LlamaGen-NPP/missing.pt"):
    load.load_model("hf://pytttttt/LlamaGen-NPP/missing.pt")
  with pytest.raises(FileNotFoundError, match="hf://nobody/nothing/f.pt"):
    load.load_vq("hf://nobody/nothing/f.pt")


def test_several_processes_are_told_to_convert_onto_shared_storage(stub, monkeypatch):
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with raises_naming(ValueError, "npp-b", "npp_jax.convert", "gs://"):
    load.load_model("npp-b")
  assert stub.requests == []


# `python -m npp_jax.sample`, with the tiny weights registered as npp-b (as the `stub` fixture does).
_CLI = """import dataclasses, runpy
from npp_jax import hub, model
model.VARIANTS["tiny"] = (2, 4, 64)
hub.PRETRAINED["npp-b"] = dataclasses.replace(hub.PRETRAINED["npp-b"], variant="tiny")
runpy.run_module("npp_jax.sample", run_name="__main__", alter_sys=True)
"""


@pytest.mark.slow
def test_sample_cli_from_a_released_name(stub, tmp_path):
  """`python -m npp_jax.sample --pretrained=npp-b`: config, weights and VQ-16 from the name alone,
  no convert step; a second run converts and downloads nothing."""
  for out in ("a", "b"):
    args = [sys.executable, "-c", _CLI, "--pretrained=npp-b", f"--out={tmp_path / out}",
            "--num_samples=8", "--per_device_batch=1", "--grid", "--grid_per_class=1"]
    done = subprocess.run(args, cwd=REPO, env=main_env(8, HF_HUB_DISABLE_TELEMETRY="1"),
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(tmp_path / out / "samples.npz") as z:
      assert z["arr_0"].shape == (8, 32, 32, 3) and z["arr_0"].dtype == np.uint8
    assert (tmp_path / out / "grid.png").exists()
  assert len(stub.gets("c2i_B_256.pt")) == 1 and len(stub.gets("vq_ds16_c2i.pt")) == 1
  (gpt_dir,) = [d for d in _converted_dirs() if d.startswith("gpt-")]
  stored = ckpt_lib.read_model_config(os.path.join(hub.hf_home(), "npp_jax", gpt_dir))
  assert stored["n_head"] == 4 and stored["n_layer"] == 2
