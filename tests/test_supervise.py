"""Tests for what launch/ gained for pods: supervise.sh (the loop that recreates a preempted slice
and reruns the run until it is finished), against a scripted fake gcloud; run.sh --cli sample /
extract; build_wheelhouse.sh and setup_workers.sh --wheelhouse (helpers from test_launch.py).

The fake gcloud answers from a script of what the cloud does next: the slice's state at each
`describe`, whether the run is alive at each check over ssh, whether the finished marker exists at
each `storage ls`; every other call succeeds. Its recorded calls show what the supervisor did.
"""
import json
import sys

import pytest

from test_launch import (REPO, WORKDIR, ZONE, _dry_run, _fake_tools, _launch, _remote_script, _sh,
                         _wait_for, _write_exe, env, recording_home)  # noqa: F401  (fixtures)

SCRIPTED_GCLOUD = f"""#!{sys.executable}
import json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
  f.write(json.dumps(args) + "\\n")
path = os.environ["FAKE_GCLOUD_SCRIPT"]
world = json.load(open(path))
def pop(key):
  value = world[key].pop(0)
  json.dump(world, open(path, "w"))
  return value
if args[:2] == ["storage", "ls"]:
  sys.exit(0 if pop("done") else 1)
if args[3:4] == ["describe"]:
  state = pop("describe")
  if state == "NOT_FOUND":
    sys.exit(print("ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: no such node",
                   file=sys.stderr) or 1)
  print(state)
elif any("npp_jax_run_alive" in a for a in args):
  if pop("alive"):
    print("npp_jax_run_alive")
"""
RUN_ARGS = ["--config", "configs/npp_xl.py", "--workdir", WORKDIR, "--",
            "--config.data.path=gs://my-bucket/tokens"]
SLICE = ["my-tpu", "--zone", ZONE, "--accelerator", "v4-32", "--spot", "--repo",
         "https://example.com/npp_jax.git", "--poll", "0"]


@pytest.fixture
def cloud(env, tmp_path):
  """env with the scripted gcloud; call cloud(describe=[...], alive=[...], done=[...])."""
  (tmp_path / "fakebin" / "gcloud").write_text(SCRIPTED_GCLOUD)
  script = tmp_path / "world.json"

  def set_world(**world):
    script.write_text(json.dumps(world))
    return dict(env, FAKE_GCLOUD_SCRIPT=str(script))
  set_world.calls = env.calls
  return set_world


def _actions(calls):
  """What each recorded gcloud call did, in order: create, delete, describe, alive?, setup, run,
  done?."""
  out = []
  for argv in calls:
    cmd = next((a for a in argv if a.startswith("--command=")), "")
    if argv[1:3] == ["storage", "ls"]:
      out.append("done?")
    elif "describe" in argv or "create" in argv or "delete" in argv:
      out.append(next(a for a in ("describe", "create", "delete") if a in argv))
    elif "npp_jax_run_alive" in cmd:
      out.append("alive?")
    elif "pip install" in cmd:
      out.append("setup")
    elif "nohup setsid" in cmd:
      out.append("run")
  return out


def test_recreates_a_preempted_slice_and_reruns_until_finished(cloud):
  """No slice -> create; READY -> set up and run; alive -> wait; PREEMPTED -> delete and
  create; READY -> set up and run again (it resumes); the marker exists -> exit 0."""
  env = cloud(describe=["NOT_FOUND", "READY", "READY", "PREEMPTED", "CREATING", "READY"],
              alive=[False, True, False], done=[False] * 6 + [True])
  p = _launch("supervise.sh", *SLICE, "--", *RUN_ARGS, env=env)
  assert p.returncode == 0, p.stderr
  assert f"finished: {WORKDIR}/finished.json exists" in p.stderr
  assert _actions(cloud.calls()) == [
      "done?", "describe", "create",
      "done?", "describe", "alive?", "setup", "run",
      "done?", "describe", "alive?",
      "done?", "describe", "delete", "create",
      "done?", "describe",
      "done?", "describe", "alive?", "setup", "run",
      "done?"]
  creates = [c for c in cloud.calls() if "create" in c]
  assert all("--spot" in c and "--accelerator-type=v4-32" in c for c in creates)
  runs = [c for c in cloud.calls() if "nohup setsid" in " ".join(c)]
  assert runs[0] == runs[1]  # the same command: the trainer resumes from the workdir.


def test_a_run_that_keeps_stopping_is_given_up(cloud):
  """A run that stops on a healthy slice without finishing (a crash) is rerun --max_restarts
  times, then the supervisor exits 1 pointing at the logs."""
  env = cloud(describe=["READY"] * 3, alive=[False] * 3, done=[False] * 3)
  p = _launch("supervise.sh", *SLICE, "--max_restarts", "1", "--", *RUN_ARGS, env=env)
  assert p.returncode == 1
  assert "launch/run.sh" in p.stderr and "--logs" in p.stderr  # the command that shows the logs
  assert _actions(cloud.calls()).count("run") == 2 and _actions(cloud.calls()).count("setup") == 1


@pytest.mark.parametrize("run_args, done", [
    (RUN_ARGS, f"{WORKDIR}/finished.json"),
    (["--cli", "sample", "--config", "configs/npp_xl.py", "--",
      "--checkpoint=gs://my-bucket/c", "--out=gs://my-bucket/samples"],
     "gs://my-bucket/samples/samples.npz"),
    (["--cli=extract", "--config", "configs/extract_imagenet.py", "--",
      "--config.out", "gs://my-bucket/tokens"], "gs://my-bucket/tokens/metadata.json"),
])
def test_dry_run_prints_one_recovery_round(run_args, done, env):
  commands = _dry_run("supervise.sh", "my-tpu", "--zone", ZONE, "--accelerator", "v5litepod-64",
                      "--spot", "--queued", "--wheelhouse", "gs://my-bucket/wheels", "--",
                      *run_args,
                      env=env)
  assert commands[0] == ["gcloud", "storage", "ls", done]
  assert commands[1] == ["gcloud", "compute", "tpus", "queued-resources", "describe", "my-tpu",
                         f"--zone={ZONE}", "--format=value(state.state)"]
  assert commands[2][:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
  assert "--spot" in commands[2]
  setup, run = commands[-2], commands[-1]
  assert "--no-index" in setup[-1] and "gs://my-bucket/wheels/*" in setup[-1]
  assert "nohup setsid" in run[-1]


@pytest.mark.parametrize("args, message", [
    (["my-tpu", "--zone", ZONE, "--", *RUN_ARGS], "missing --accelerator"),
    (["my-tpu", "--zone", ZONE, "--accelerator", "v4-8"], "missing RUN_ARGS"),
    (["my-tpu", "--zone", ZONE, "--accelerator", "v4-8", "--poll", "soon", "--", *RUN_ARGS],
     "bad --poll"),
    (["my-tpu", "--zone", ZONE, "--accelerator", "v4-8", "--", "--cli", "extract", "--config",
      "configs/extract_imagenet.py"], "pass --done"),
    (["my-tpu", "--zone", ZONE, "--accelerator", "tpu", "--", *RUN_ARGS], "create_tpu.sh refused"),
    (["my-tpu", "--zone", ZONE, "--accelerator", "v4-8", "--", "--config", "/abs/npp_xl.py",
      "--workdir", WORKDIR], "run.sh refused"),
])
def test_supervise_bad_input(args, message, env):
  p = _launch("supervise.sh", *args, env=dict(env, FAKE_GCLOUD_RC="0"))
  assert p.returncode == 2 and message in p.stderr
  assert env.calls() == []


def test_build_wheelhouse_dry_run(env):
  build, download, upload = _dry_run("build_wheelhouse.sh", "gs://my-bucket/wheels",
                                     "--python_version", "3.12", env=env)
  assert build[:7] == ["python3", "-m", "pip", "wheel", "-q", "--no-deps", "--wheel-dir"]
  assert build[-1] == str(REPO)
  wheels = build[7]
  assert download[:4] == ["python3", "-m", "pip", "download"]
  for arg in ("--only-binary=:all:", "--platform=manylinux_2_35_x86_64", "--python-version=3.12",
              f"{wheels}/npp_jax-*.whl[tpu]", "setuptools"):
    assert arg in download
  assert upload == ["gcloud", "storage", "cp", f"{wheels}/*", "gs://my-bucket/wheels/"]
  p = _launch("build_wheelhouse.sh", "/tmp/wheels", env=env)
  assert p.returncode == 2 and "'/tmp/wheels'" in p.stderr and "gs://" in p.stderr


# ----------------------------------------------------------------------------- run.sh --cli

@pytest.mark.parametrize("cli, flags, module", [
    ("sample", ["--checkpoint=gs://my-bucket/ckpt", "--out", "gs://my-bucket/samples"],
     "npp_jax.sample"),
    ("extract", ["--config.out=gs://my-bucket/tokens"], "npp_jax.extract_codes"),
    ("extract", [], "npp_jax.extract_codes"),  # the output named in the config file
])
def test_run_other_clis(cli, flags, module, env, recording_home):
  """--cli sample / extract start their module on every worker, with their own log."""
  (ssh,) = _dry_run("run.sh", "my-tpu", "--zone", ZONE, "--cli", cli, "--config",
                    "configs/npp_xl.py", "--", *flags, env=env)
  script = _remote_script(ssh)
  assert f'>> "$HOME/npp_jax_logs/{cli}.log"' in script and "--worker=all" in ssh
  out = recording_home / "nohup.bin"
  out.unlink(missing_ok=True)
  (recording_home / "npp_jax_logs" / "run.pid").unlink(missing_ok=True)
  _sh(script, recording_home, path_prefix=recording_home / "bin")
  _wait_for(out)
  assert out.read_bytes().decode().split("\0")[:-1] == [
      "setsid", "python", "-m", module, "--config=configs/npp_xl.py", *flags]
  (logs,) = _dry_run("run.sh", "my-tpu", "--zone", ZONE, "--cli", cli, "--logs", env=env)
  assert f"$HOME/npp_jax_logs/{cli}.log" in _remote_script(logs)


# ----------------------------------------------------------------------------- wheelhouse

def test_setup_from_a_wheelhouse(env, tmp_path):
  """--wheelhouse: the workers copy the bucket's wheels with gcloud and pip installs only from
  them (no package index)."""
  bucket = tmp_path / "bucket"
  bucket.mkdir()
  (bucket / "jax-0.10.2-py3-none-any.whl").write_text("")
  (ssh,) = _dry_run("setup_workers.sh", "my-tpu", "--zone", ZONE, "--repo", "file:///nowhere",
                    "--wheelhouse", "gs://my-bucket/wheels/", env=env)
  script = _remote_script(ssh)
  assert "gcloud storage cp 'gs://my-bucket/wheels/*'" in script
  home = tmp_path / "home"
  (home / "npp_jax" / ".git").mkdir(parents=True)
  fake_bin = _fake_tools(home)
  _write_exe(fake_bin / "git", "#!/usr/bin/env bash\n")
  # The worker's gcloud, with the bucket at tmp_path/bucket.
  _write_exe(fake_bin / "gcloud", f"""#!/usr/bin/env bash
[ "$1 $2 $3" = "storage cp gs://my-bucket/wheels/*" ] || exit 9
cp {bucket}/* "$4"
""")
  _sh(script, home, path_prefix=fake_bin)
  assert (home / "npp_jax_wheels" / "jax-0.10.2-py3-none-any.whl").exists()
  wheels = f"--no-index --find-links={home}/npp_jax_wheels"
  assert (home / "python_calls.txt").read_text().splitlines()[:2] == [
      f"{home}/npp_jax|-m pip install -q {wheels} --upgrade pip",
      f"{home}/npp_jax|-m pip install -q {wheels} -e .[tpu]"]
