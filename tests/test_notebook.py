"""The sampling notebook: its runtime set-up (npp_jax/colab.py) for CPU, GPU and TPU runtimes, and
the notebook executed end to end (nbclient) in a simulated Colab GPU runtime against the local hub
stub (tests/hub_stub.py) serving tiny fixture weights under the released names."""
import json
import pathlib
import re

import nbformat
import pytest
from nbclient import NotebookClient

from npp_jax import colab
from hub_stub import HubStub, tiny_vq_state_dict
from torch_files import TINY_PT, write_pt

REPO = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "notebooks" / "npp_sampling.ipynb"


@pytest.mark.parametrize("runtime, jax, keeps, extra", [
    ("cpu", colab.Jax("0.10.2", "0.10.2", "cpu"), True, None),
    ("cpu", None, False, None),
    ("gpu", colab.Jax("0.10.5", "0.10.5", "gpu"), True, None),
    ("gpu", colab.Jax("0.10.2", "0.10.2", "cpu"), False, "jax[cuda12]"),  # no CUDA plugin
    ("gpu", colab.Jax("0.7.2", "0.7.2", "gpu"), False, "jax[cuda12]"),  # unsupported version
    ("tpu", colab.Jax("0.10.3", "0.10.2", "tpu"), True, None),
    ("tpu", colab.Jax("0.11.0", "0.11.0", "tpu"), False, "jax[tpu]"),
])
def test_install_plan_keeps_a_working_supported_jax(runtime, jax, keeps, extra):
  (package, deps), note = colab.plan(str(REPO), runtime, jax)
  assert package == ["install", "-q", "--no-deps", "-e", str(REPO)]
  names = [re.split(r"[\[<>=]", d)[0] for d in deps[2:]]
  assert "jax" in names and "huggingface_hub" in names
  assert not any("tensorflow" in d for d in deps)  # the runtime keeps its own TensorFlow
  if keeps:
    assert f"jax=={jax.version}" in deps and f"jaxlib=={jax.jaxlib}" in deps and "keeping" in note
  elif extra:
    assert any(d.startswith(extra) for d in deps) and "keeping" not in note
  else:
    assert "jax>=0.10.2,<0.11" in deps


def test_runtime_detection_from_the_environment():
  assert colab.detect_runtime({"TPU_ACCELERATOR_TYPE": "v5litepod-8"}) == "tpu"
  assert colab.detect_runtime({"COLAB_TPU_ADDR": "10.0.0.2:8470"}) == "tpu"
  assert colab.detect_runtime({"COLAB_GPU": "1"}) in ("gpu", "tpu")  # tpu if this host has one
  assert colab.in_range("0.10.7", "jax>=0.10.2,<0.11")
  assert not colab.in_range("0.11.0", "jax>=0.10.2,<0.11")


_SIMULATED_COLAB = '''# Test set-up (tests/test_notebook.py): a simulated Colab GPU runtime, a local hub.
import os, shutil, subprocess, sys, types
colab_module = sys.modules["google.colab"] = types.ModuleType("google.colab")
colab_module.output = types.ModuleType("google.colab.output")  # jax's debugger imports it on Colab
os.environ.update(COLAB_GPU="1", HF_ENDPOINT={endpoint!r}, HF_HOME={hf_home!r},
                  HF_HUB_DISABLE_TELEMETRY="1")
CALLS, _run = [], subprocess.run

def _simulated(args, *a, **k):  # pip and git are recorded; git clone copies this checkout
  if list(args[:3]) == [sys.executable, "-m", "pip"] or args[0] == "git":
    CALLS.append(list(args))
    if args[0] == "git":
      shutil.copytree({repo!r}, args[-1], ignore=shutil.ignore_patterns(
          ".git", ".venv", "__pycache__", ".pytest_cache", "*.egg-info"))
    return subprocess.CompletedProcess(args, 0)
  return _run(args, *a, **k)

subprocess.run = _simulated'''

_TINY_RELEASE = '''# Test set-up: the stub serves tiny weights as npp-b (2 layers, 4 heads, width 64)
import dataclasses
from npp_jax import hub, model as _model
_model.VARIANTS["tiny"] = (2, 4, 64)
hub.PRETRAINED["npp-b"] = dataclasses.replace(hub.PRETRAINED["npp-b"], variant="tiny")
import json
print("recorded:", json.dumps(CALLS))'''


def _text(cell):
  return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


@pytest.mark.slow
@pytest.mark.parametrize("method, window", [("ar", 0), ("sjd", 4)])
def test_notebook_runs_on_a_simulated_colab_against_the_hub_stub(tmp_path, method, window):
  nb = nbformat.read(NOTEBOOK, as_version=4)
  params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
  assert re.search(r'(?m)^MODEL = "npp-b"', params.source)  # the default is the released NPP-B
  install_dir = tmp_path / "content" / "npp_jax"
  source = re.sub(r"(?m)^REPO_URL = .*$", 'REPO_URL = "https://example.test/npp_jax.git"',
                  params.source)
  source = re.sub(r'(?m)^METHOD = "ar"', f"METHOD = {method!r}", source)
  source = re.sub(r"(?m)^WINDOW = 0", f"WINDOW = {window}", source)
  params.source = re.sub(r"(?m)^INSTALL_DIR = .*$", f"INSTALL_DIR = {str(install_dir)!r}", source)
  with HubStub() as stub:
    stub.add("pytttttt/LlamaGen-NPP", "c2i_B_256.pt", TINY_PT.read_bytes())
    stub.add("FoundationVision/LlamaGen", "vq_ds16_c2i.pt",
             write_pt(tmp_path / "vq.pt", {"model": tiny_vq_state_dict()}).read_bytes())
    setup = nbformat.v4.new_code_cell(_SIMULATED_COLAB.format(
        endpoint=stub.url, hf_home=str(tmp_path / "hf_home"), repo=str(REPO)))
    nb.cells.insert(2, setup)  # after the parameters, before the install cell
    nb.cells.insert(4, nbformat.v4.new_code_cell(_TINY_RELEASE))  # after the install cell
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    install, recorded, loaded, sampled, shown = (nb.cells[i] for i in (3, 4, 5, 6, 7))
    assert len(stub.gets("c2i_B_256.pt")) == 1 and len(stub.gets("vq_ds16_c2i.pt")) == 1
  git, package, deps = json.loads(_text(recorded).split("recorded: ", 1)[1])
  assert git[:2] == ["git", "clone"] and git[-1] == str(install_dir)
  assert package[3:] == ["install", "-q", "--no-deps", "-e", str(install_dir)]
  assert "jax[cuda12]>=0.10.2,<0.11" in deps and not any("tensorflow" in d for d in deps)
  assert "gpu runtime: installing jax[cuda12]" in _text(install)
  assert "npp-b: 2 layers, width 64, 1000 classes; decoder: vq" in _text(loaded)
  assert re.search(rf"8 images in [\d.]+ s \(CFG 2.0, seed 0, {method}\)", _text(sampled))
  assert len([o for o in shown.outputs if "image/png" in o.get("data", {})]) == 1
  # What the repository stores: the executed notebook without the test's set-up cells.
  del nb.cells[4], nb.cells[2]
  nbformat.write(nb, tmp_path / "executed.ipynb")
