"""Executes notebooks/npp_sampling.ipynb end to end (nbclient, CPU) on a tiny smoke model."""
import dataclasses
import json
import pathlib
import re

import nbformat
from flax import nnx
from nbclient import NotebookClient

from configs import smoke
from npp_jax import checkpoint as ckpt_lib
from npp_jax import config_lib, sample
from npp_jax import model as model_lib

NOTEBOOK = pathlib.Path(__file__).parent.parent / "notebooks" / "npp_sampling.ipynb"


def _set_parameters(nb, **values):
  """Rewrites `NAME = ...` lines of the cell tagged "parameters" (every name must exist)."""
  cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
  source = cell.source
  for name, value in values.items():
    source, n = re.subn(rf"(?m)^{name} = .*$", f"{name} = {value!r}", source)
    assert n == 1, f"parameter {name} not found in the parameters cell"
  cell.source = source


def _outputs(cell):
  text = "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")
  images = [o for o in cell.outputs if "image/png" in o.get("data", {})]
  return text, images


def test_notebook_samples_a_grid_from_a_params_checkpoint(tmp_path):
  config = smoke.get_config()
  model = model_lib.Transformer(config_lib.model_config(config, **sample.NO_DROPOUT),
                                rngs=nnx.Rngs(0))
  ckpt_lib.save_params(tmp_path / "ckpt", nnx.state(model),
                       model_config=dataclasses.asdict(model.cfg))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  _set_parameters(nb, CHECKPOINT=str(tmp_path / "ckpt"), CONFIG="configs/smoke.py",
                  DEMO_WORKDIR=str(tmp_path / "none"), CLASSES=[0, 3], PER_CLASS=2,
                  CFG_SCALE=2.0, SEED=1)
  NotebookClient(nb, timeout=300, kernel_name="python3",
                 resources={"metadata": {"path": str(tmp_path)}}).execute()
  load_text, _ = _outputs(nb.cells[3])
  assert f"Loaded {tmp_path / 'ckpt'}" in load_text and "decoder: tokens" in load_text
  sample_text, _ = _outputs(nb.cells[4])
  assert "4 images" in sample_text and "grid (168, 140, 3)" in sample_text
  assert "'cfg_scale': 2.0" in sample_text
  _, images = _outputs(nb.cells[5])
  assert len(images) == 1
  json.dumps(nb)  # the executed notebook stays serialisable
