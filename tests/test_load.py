"""npp_jax.load: one API loads a GPT from a params dir, a training workdir or a weight file, and a
VQ; the package's import graph has no circles. (Hub paths and released names: test_hub.py.)"""
import ast
import dataclasses
import pathlib

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from naming import raises_naming
from npp_jax import checkpoint as ckpt_lib
from npp_jax import config_lib, load, sharding
from test_sample import _randomised, _smoke_config
from torch_files import TINY_PT

PACKAGE = pathlib.Path(load.__file__).parent


def _same_params(a, b):
  for x, y in zip(jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_load_params_checkpoint_with_model_config(tmp_path):
  config = _smoke_config()
  model = _randomised(config_lib.model_config(config, **load.NO_DROPOUT))
  ckpt_lib.save_params(tmp_path, nnx.state(model), model_config=dataclasses.asdict(model.cfg))
  _same_params(load.load_model(str(tmp_path), config), model)
  # The stored architecture wins over a config that disagrees, and no config is needed.
  loaded = load.load_model(str(tmp_path), _smoke_config(n_layer=3))
  assert loaded.cfg.n_layer == 2 and loaded.cfg.resid_dropout == 0.0
  bare = load.load_model(tmp_path, dtype="bfloat16")
  _same_params(bare, model)
  assert bare.cfg.dtype == "bfloat16" and bare.cfg.token_dropout == 0.0


def test_load_training_workdir_params_or_ema(tmp_path):
  config = _smoke_config()
  model = _randomised(config_lib.model_config(config))
  ema = _randomised(config_lib.model_config(config), seed=7)
  params = nnx.split(model)[1]
  state = {"step": jnp.int32(3), "params": params, "opt_state": {"mu": jnp.ones((5, 7))},
           "ema": nnx.split(ema)[1]}
  for workdir, s in ((tmp_path / "a", state), (tmp_path / "b", dict(state, ema=None))):
    ck = ckpt_lib.Checkpointer(workdir, keep=1, async_save=False)
    ck.save(3, {k: v for k, v in s.items() if v is not None},
            iter(grain.MapDataset.range(4).to_iter_dataset()))
    ck.close()
  mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
  loaded = load.load_model(str(tmp_path / "a"), config, mesh=mesh)
  _same_params(loaded, model)
  assert loaded.layers.feed_forward.w1[...].sharding.spec[1] == "fsdp"
  _same_params(load.load_model(str(tmp_path / "a"), config, use_ema=True), ema)
  with raises_naming(ValueError, tmp_path / "b" / "checkpoints" / "3", "config.optim.ema_decay"):
    load.load_model(str(tmp_path / "b"), config, use_ema=True)
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match="layers"):
    load.load_model(str(tmp_path / "a"), _smoke_config(n_layer=3))
  # Without a config, the workdir's own config.json gives the architecture.
  with pytest.raises(ValueError, match="config.json"):
    load.load_model(str(tmp_path / "a"))
  (tmp_path / "a" / "config.json").write_text(config.to_json())
  _same_params(load.load_model(str(tmp_path / "a")), model)


def test_load_a_weight_file_onto_a_mesh(gpt):
  mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
  loaded = load.load_model(TINY_PT, mesh=mesh, n_head=4)
  assert loaded.cfg.n_head == 4 and loaded.cfg.class_dropout == 0.0
  assert loaded.layers.feed_forward.w1[...].sharding.spec[1] == "fsdp"
  got = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(loaded, nnx.Param)))
  jax.tree.map(np.testing.assert_array_equal, got, gpt["params"])


def test_bad_checkpoints_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="nothing"):
    load.load_model(str(tmp_path / "nothing"), _smoke_config())
  vq_dir = tmp_path / "vq_as_gpt"  # a tokenizer's model_config.json where a GPT's is expected
  ckpt_lib.save_params(vq_dir, {"w": np.zeros(2)},
                       model_config={"codebook_size": 64, "z_channels": 4})
  with raises_naming(ValueError, vq_dir, "model_config.json", "codebook_size",
                     "config.sample.vq_checkpoint"):
    load.load_model(str(vq_dir), _smoke_config())
  with pytest.raises(ValueError, match="use_ema"):
    load.load_model(str(vq_dir), use_ema=True)
  with pytest.raises(FileNotFoundError, match="nothing.pt"):
    load.load_vq(str(tmp_path / "nothing.pt"))


def _imports(path: pathlib.Path) -> set[str]:
  """The npp_jax modules `path` imports anywhere in it (module level or inside functions)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module == "npp_jax":
      found |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("npp_jax."):
      found.add(node.module.split(".")[1])
    elif isinstance(node, ast.Import):
      found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("npp_jax.")}
  return found


def test_no_import_circles_among_npp_jax_modules():
  modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
  graph = {m: _imports(PACKAGE / f"{m}.py") & modules - {m} for m in modules}
  assert graph["load"] >= {"convert", "hub", "checkpoint"} and "load" in graph["sample"]

  def cycle_from(node, path):
    for nxt in sorted(graph[node]):
      if nxt in path:
        return path[path.index(nxt):] + [nxt]
      found = cycle_from(nxt, path + [nxt])
      if found:
        return found
    return None

  for m in sorted(modules):
    assert cycle_from(m, [m]) is None, f"import circle: {' -> '.join(cycle_from(m, [m]))}"
