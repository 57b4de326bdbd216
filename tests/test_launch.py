"""Tests for launch/: the TPU scripts' --dry_run commands, their input checks, and the shell
scripts they send to the workers, run here against a fake home directory.

No real gcloud is ever called: a fake `gcloud` first on PATH records every call (and fails in
dry-run tests, which also assert it was never invoked). Commands are compared as argv lists,
parsed with shlex from the printed lines, so the printout is proven copy-pasteable.
"""
import json
import os
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from hypothesis import HealthCheck, given, settings, strategies as st
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = ["create_tpu.sh", "setup_workers.sh", "run.sh", "stop.sh", "delete_tpu.sh",
           "supervise.sh"]
ZONE = "us-central2-b"
WORKDIR = "gs://my-bucket/runs/npp_xl"
TRICKY_FLAG = "--config.sample.note=it's a \"test\" of $HOME; `x` \\ \n+ &"

FAKE_GCLOUD = f"""#!{sys.executable}
import json, os, shutil, sys
args = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
  f.write(json.dumps(args) + "\\n")
if args[:4] == ["compute", "tpus", "tpu-vm", "scp"] and "FAKE_GCLOUD_SCP_COPY" in os.environ:
  shutil.copy(args[4], os.environ["FAKE_GCLOUD_SCP_COPY"])
sys.exit(int(os.environ["FAKE_GCLOUD_RC"]))
"""


@pytest.fixture
def env(tmp_path):
  """Environment with the fake gcloud first on PATH; `env.calls()` lists its recorded argv."""
  bin_dir = tmp_path / "fakebin"
  bin_dir.mkdir()
  (bin_dir / "gcloud").write_text(FAKE_GCLOUD)
  (bin_dir / "gcloud").chmod(0o755)
  log = tmp_path / "gcloud_calls.jsonl"
  return _Env(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_GCLOUD_LOG=str(log),
              FAKE_GCLOUD_RC="1", TMPDIR=str(tmp_path))


class _Env(dict):
  """A subprocess environment that can list the fake gcloud's calls (argv, "gcloud" first)."""

  def calls(self):
    log = pathlib.Path(self["FAKE_GCLOUD_LOG"])
    if not log.exists():
      return []
    return [["gcloud"] + json.loads(line) for line in log.read_text().splitlines()]


def _launch(script, *args, env, launch_dir=LAUNCH):
  # Bytes, decoded by hand: text=True would turn a "\r" inside a printed argument into "\n".
  p = subprocess.run(["bash", str(launch_dir / script), *args], env=env, capture_output=True,
                     timeout=20, check=False)
  p.stdout, p.stderr = p.stdout.decode(), p.stderr.decode()
  return p


def _commands(stdout):
  """The argv of every "+ cmd" that a --dry_run printed."""
  pieces = re.split(r"(?m)^\+ ", stdout)
  assert pieces[0] == "", stdout
  commands, pending = [], None
  for piece in pieces[1:]:
    pending = piece if pending is None else f"{pending}+ {piece}"
    try:
      commands.append(shlex.split(pending))
      pending = None
    except ValueError:  # that "+ " began a line inside a quoted (multi-line) argument
      continue
  assert pending is None, stdout
  return commands


def _dry_run(script, *args, env, launch_dir=LAUNCH):
  """Runs `script --dry_run args`, asserts success and that gcloud never ran; returns the argvs."""
  p = _launch(script, "--dry_run", *args, env=env, launch_dir=launch_dir)
  assert p.returncode == 0, p.stderr
  assert env.calls() == [], "gcloud was invoked under --dry_run"
  return _commands(p.stdout)


def _remote_script(argv):
  """The --command of a `gcloud ... ssh` argv."""
  (cmd,) = [a[len("--command="):] for a in argv if a.startswith("--command=")]
  return cmd


def _sh(script, home, path_prefix=None, check=True):
  """Runs a worker script here with HOME=home (and fake tools first on PATH)."""
  path = os.environ["PATH"] if path_prefix is None else f"{path_prefix}:{os.environ['PATH']}"
  p = subprocess.run(["bash", "-c", script], env=dict(os.environ, HOME=str(home), PATH=path),
                     cwd=home, capture_output=True, text=True, timeout=20, check=False)
  assert not check or p.returncode == 0, p.stderr
  return p


def _write_exe(path, text):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)
  path.chmod(0o755)


# ----------------------------------------------------------------------------- the scripts' shape

@pytest.mark.parametrize("script", SCRIPTS + ["common.sh", "build_wheelhouse.sh"])
def test_scripts_parse_and_are_strict(script):
  path = LAUNCH / script
  subprocess.run(["bash", "-n", str(path)], check=True, capture_output=True, text=True)
  if script != "common.sh":
    assert "\nset -euo pipefail\n" in path.read_text()
    assert os.access(path, os.X_OK), f"{script} is not executable"


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_prints_usage(script, env):
  p = _launch(script, "--help", env=env)
  assert p.returncode == 0 and p.stdout.startswith(f"Usage: launch/{script} NAME --zone ZONE")
  assert "--dry_run" in p.stdout and env.calls() == []


# ----------------------------------------------------------------------------- create / delete

@pytest.mark.parametrize("args, expected", [
    (["--accelerator", "v5litepod-64", "--spot"],
     ["tpu-vm", "create", "my-tpu", f"--zone={ZONE}", "--accelerator-type=v5litepod-64",
      "--version=v2-alpha-tpuv5-lite", "--spot"]),
    (["--accelerator=v4-32", "--preemptible", "--project", "my-proj", "--version", "tpu-vm-base"],
     ["tpu-vm", "create", "my-tpu", f"--zone={ZONE}", "--project=my-proj",
      "--accelerator-type=v4-32", "--version=tpu-vm-base", "--preemptible"]),
    (["--accelerator", "v6e-256", "--queued", "--spot"],
     ["queued-resources", "create", "my-tpu", f"--zone={ZONE}", "--node-id=my-tpu",
      "--accelerator-type=v6e-256", "--runtime-version=v2-alpha-tpuv6e", "--spot"]),
    (["--accelerator", "v5p-128", "--queued"],
     ["queued-resources", "create", "my-tpu", f"--zone={ZONE}", "--node-id=my-tpu",
      "--accelerator-type=v5p-128", "--runtime-version=v2-alpha-tpuv5"]),
])
def test_create_tpu_command(args, expected, env):
  assert _dry_run("create_tpu.sh", "my-tpu", "--zone", ZONE, *args, env=env) == [
      ["gcloud", "compute", "tpus"] + expected]


@pytest.mark.parametrize("args, expected", [
    ([], ["tpu-vm", "delete", "my-tpu", f"--zone={ZONE}"]),
    (["--queued", "--yes"], ["queued-resources", "delete", "my-tpu", f"--zone={ZONE}", "--force",
                             "--quiet"]),
])
def test_delete_tpu_command(args, expected, env):
  assert _dry_run("delete_tpu.sh", "my-tpu", f"--zone={ZONE}", *args, env=env) == [
      ["gcloud", "compute", "tpus"] + expected]


@pytest.mark.parametrize("script, args", [
    ("create_tpu.sh", ["my-tpu", "--zone", ZONE, "--accelerator", "v5litepod-16", "--spot"]),
    ("delete_tpu.sh", ["my-tpu", "--zone", ZONE, "--queued"]),
    ("run.sh", ["my-tpu", "--zone", ZONE, "--config", "configs/npp_xl.py", "--workdir", WORKDIR,
                "--", "--config.data.path=gs://my-bucket/tokens", TRICKY_FLAG]),
    ("stop.sh", ["my-tpu", "--zone", ZONE, "--grace", "7"]),
])
def test_real_run_executes_the_printed_commands(script, args, env):
  """Without --dry_run the scripts run exactly what --dry_run prints, and pass on gcloud's rc."""
  printed = _dry_run(script, *args, env=env)
  p = _launch(script, *args, env=dict(env, FAKE_GCLOUD_RC="0"))
  assert p.returncode == 0, p.stderr
  assert env.calls() == printed
  p = _launch(script, *args, env=dict(env, FAKE_GCLOUD_RC="7"))
  assert p.returncode == 7


# ----------------------------------------------------------------------------- bad input

# Each case: what the error must name (the flags and the bad values), not how it words it.
@pytest.mark.parametrize("script, args, names", [
    *[(s, ["--zone", ZONE], ("TPU name",)) for s in SCRIPTS],
    *[(s, ["my-tpu"], ("--zone",)) for s in SCRIPTS],
    ("stop.sh", ["my-tpu", "--zone", "mars"], ("--zone", "'mars'")),
    ("stop.sh", ["My_TPU", "--zone", ZONE], ("TPU name", "'My_TPU'")),
    ("stop.sh", ["my-tpu", "other", "--zone", ZONE], ("'other'",)),
    ("stop.sh", ["my-tpu", "--zone", ZONE, "--grace", "soon"], ("--grace", "'soon'")),
    ("delete_tpu.sh", ["my-tpu", "--zone", ZONE, "--force"], ("--force",)),
    ("create_tpu.sh", ["my-tpu", "--zone"], ("--zone",)),
    ("create_tpu.sh", ["my-tpu", "--zone", ZONE], ("--accelerator",)),
    ("create_tpu.sh", ["my-tpu", "--zone", ZONE, "--accelerator", "tpu64"],
     ("--accelerator", "'tpu64'")),
    ("create_tpu.sh", ["my-tpu", "--zone", ZONE, "--accelerator", "v9x-8"],
     ("--accelerator", "'v9x-8'", "--version")),
    ("create_tpu.sh", ["my-tpu", "--zone", ZONE, "--accelerator", "v4-8", "--spot",
                       "--preemptible"], ("--spot", "--preemptible")),
    ("create_tpu.sh", ["my-tpu", "--zone", ZONE, "--accelerator", "v4-8", "--queued",
                       "--preemptible"], ("--preemptible", "--queued", "--spot")),
    ("setup_workers.sh", ["my-tpu", "--zone", ZONE, "--local_src", "/nonexistent"],
     ("--local_src", "'/nonexistent'")),
    ("setup_workers.sh", ["my-tpu", "--zone", ZONE, "--local_src", "/"],
     ("--local_src", "'/'", "setup.py")),
    ("setup_workers.sh", ["my-tpu", "--zone", ZONE, "--local_src", ".", "--repo", "x"],
     ("--local_src", "--repo")),
    ("setup_workers.sh", ["my-tpu", "--zone", ZONE, "--python", "python2"],
     ("--python", "'python2'")),
    ("setup_workers.sh", ["my-tpu", "--zone", ZONE, "--wheelhouse", "/wheels"],
     ("--wheelhouse", "'/wheels'")),
    ("run.sh", ["my-tpu", "--zone", ZONE, "--cli", "eval", "--config", "c.py"],
     ("--cli", "'eval'")),
    ("run.sh", ["my-tpu", "--zone", ZONE, "--cli", "sample", "--config", "configs/npp_xl.py",
                "--", "--out=gs://my-bucket/s"], ("sample", "--checkpoint")),
    ("run.sh", ["my-tpu", "--zone", ZONE, "--cli", "sample", "--config", "configs/npp_xl.py",
                "--", "--checkpoint=gs://my-bucket/c", "--out", "/tmp/s"],
     ("--out", "'/tmp/s'", "gs://")),
    ("run.sh", ["my-tpu", "--zone", ZONE, "--cli", "extract", "--config", "configs/x.py",
                "--workdir", WORKDIR], ("--workdir", "extract", "--config.out")),
    ("run.sh", ["my-tpu", "--zone", ZONE, "--cli", "extract", "--config", "configs/x.py",
                "--", "--config.out=tokens"], ("--config.out", "'tokens'", "gs://")),
    ("run.sh", ["my-tpu", "--zone", ZONE, "--workdir", WORKDIR], ("--config",)),
    ("run.sh", ["my-tpu", "--zone", ZONE, "--config", "configs/npp_xl.py"], ("--workdir",)),
    ("run.sh", ["my-tpu", "--zone", ZONE, "--config", "configs/npp_xl.py", "--workdir",
                "/tmp/runs/x"], ("--workdir", "'/tmp/runs/x'", "gs://")),
    ("run.sh", ["my-tpu", "--zone", ZONE, "--config", "configs/npp_xl.py", "--workdir",
                "gs:///runs"], ("--workdir", "'gs:///runs'")),
    ("run.sh", ["my-tpu", "--zone", ZONE, "--config", "/abs/npp_xl.py", "--workdir", WORKDIR],
     ("--config", "'/abs/npp_xl.py'")),
    ("run.sh", ["my-tpu", "--zone", ZONE, "--config", "configs/npp_xl.py", "--workdir", WORKDIR,
                "--", "--workdir=gs://my-bucket/other"],
     ("'--workdir=gs://my-bucket/other'", "'--'")),
    ("run.sh", ["my-tpu", "--zone", ZONE, "--logs", "--attach"], ("--logs", "--attach")),
    ("run.sh", ["my-tpu", "--zone", ZONE, "--logs", "--worker", "w1"], ("--worker", "'w1'")),
    ("run.sh", ["my-tpu", "--zone", ZONE, "--config", "configs/npp_xl.py", "--workdir", WORKDIR,
                "--worker", "1"], ("--worker", "--logs", "--attach")),
])
def test_bad_input_exits_nonzero_with_a_clear_message(script, args, names, env):
  # Run for real (no --dry_run): the check must stop the script before any gcloud call.
  p = _launch(script, *args, env=dict(env, FAKE_GCLOUD_RC="0"))
  assert p.returncode == 2
  assert all(n in p.stderr for n in names) and f"launch/{script}" in p.stderr, p.stderr
  assert p.stdout == "" and env.calls() == []


# ----------------------------------------------------------------------------- run / stop

def test_run_command(env):
  (ssh,) = _dry_run("run.sh", "my-tpu", "--zone", ZONE, "--config", "configs/npp_xl.py",
                    "--workdir", WORKDIR, "--", "--config.data.path=gs://my-bucket/tokens",
                    "--max_steps=10", env=env)
  assert ssh[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu", f"--zone={ZONE}",
                     "--worker=all"]
  script = _remote_script(ssh)
  assert (f"set -- python -m npp_jax.main --config=configs/npp_xl.py --workdir={WORKDIR} "
          "--config.data.path=gs://my-bucket/tokens --max_steps=10\n") in script
  assert 'nohup setsid "$@" >> "$HOME/npp_jax_logs/train.log" 2>&1 < /dev/null &' in script


def test_run_attach_and_logs(env):
  common = ["my-tpu", "--zone", ZONE]
  launch, tail = _dry_run("run.sh", *common, "--config", "configs/npp_xl.py:runlocal",
                          "--workdir", WORKDIR, "--attach", "--worker", "3", env=env)
  assert "--worker=all" in launch and "--worker=3" in tail
  assert _remote_script(tail) == 'tail -n 100 -F "$HOME/npp_jax_logs/train.log"'
  (logs,) = _dry_run("run.sh", *common, "--logs", "--worker=all", env=env)
  assert "--worker=all" in logs and "sed -u" in _remote_script(logs)
  (local,) = _dry_run("run.sh", *common, "--config", "configs/npp_xl.py", "--workdir", "runs/x",
                      "--allow_local", env=env)
  assert "--workdir=runs/x" in _remote_script(local)


def _fake_worker(home):
  """A worker home as setup_workers.sh leaves it, with a fake `python` that records its argv and
  exits cleanly on SIGTERM (as the trainer does on a preemption notice)."""
  (home / "npp_jax" / "configs").mkdir(parents=True)
  (home / "npp_jax" / "configs" / "npp_xl.py").write_text("")
  _write_exe(home / "bin" / "python", """#!/usr/bin/env bash
printf '%s\\0' "$@" > "$HOME/argv.bin"
trap 'echo TERM > "$HOME/term.txt"; exit 0' TERM
while :; do sleep 0.1; done
""")
  (home / "npp_jax_venv" / "bin").mkdir(parents=True)
  (home / "npp_jax_venv" / "bin" / "activate").write_text('PATH="$HOME/bin:$PATH"\n')


def _wait_for(path, seconds=5.0):
  deadline = time.time() + seconds
  while not path.exists() and time.time() < deadline:
    time.sleep(0.02)
  assert path.exists(), f"{path} never appeared"


def test_run_and_stop_on_a_worker(env, tmp_path):
  """The worker scripts start the trainer detached with the exact argv, refuse a second run, and
  stop.sh's script ends it with SIGTERM."""
  home = tmp_path / "home"
  _fake_worker(home)
  logs = home / "npp_jax_logs"
  logs.mkdir()
  (logs / "run.pid").write_text(f"{os.getpid()}\n")  # stale pid of another process: ignored
  extra = ["--config.data.path=gs://my-bucket/tokens", TRICKY_FLAG]
  (ssh,) = _dry_run("run.sh", "my-tpu", "--zone", ZONE, "--config", "configs/npp_xl.py",
                    "--workdir", WORKDIR, "--", *extra, env=env)
  (stop,) = _dry_run("stop.sh", "my-tpu", "--zone", ZONE, "--grace", "5", env=env)
  pid = None
  try:
    started = _sh(_remote_script(ssh), home)
    _wait_for(home / "argv.bin")
    pid = int((logs / "run.pid").read_text())
    assert f"started pid {pid}" in started.stdout
    argv = (home / "argv.bin").read_bytes().decode().split("\0")[:-1]
    assert argv == ["-m", "npp_jax.main", "--config=configs/npp_xl.py", f"--workdir={WORKDIR}",
                    *extra]
    assert "npp_jax.main --config=configs/npp_xl.py" in (logs / "train.log").read_text()
    assert os.getpgid(pid) == pid  # setsid: its own session, so an ssh hang-up misses it

    again = _sh(_remote_script(ssh), home, check=False)
    assert again.returncode == 3 and str(pid) in again.stderr  # the running pid is named

    stopped = _sh(_remote_script(stop), home)
    assert f"pid {pid} stopped after" in stopped.stdout
    assert (home / "term.txt").read_text() == "TERM\n"
    assert not (logs / "run.pid").exists()
    assert "no run recorded" in _sh(_remote_script(stop), home).stdout
  finally:
    if pid is not None and not (home / "term.txt").exists():
      os.killpg(pid, signal.SIGKILL)


def test_run_without_setup_fails_on_the_worker(env, tmp_path):
  (ssh,) = _dry_run("run.sh", "my-tpu", "--zone", ZONE, "--config", "configs/nope.py",
                    "--workdir", WORKDIR, env=env)
  p = _sh(_remote_script(ssh), tmp_path, check=False)
  assert p.returncode == 2 and "launch/setup_workers.sh" in p.stderr
  _fake_worker(tmp_path)
  p = _sh(_remote_script(ssh), tmp_path, check=False)
  assert p.returncode == 2 and "configs/nope.py" in p.stderr


@pytest.fixture(scope="module")
def recording_home():
  """A worker home whose `nohup` only records its argv, for many quick launches."""
  with tempfile.TemporaryDirectory() as d:
    home = pathlib.Path(d)
    _fake_worker(home)
    _write_exe(home / "bin" / "nohup", """#!/usr/bin/env bash
printf '%s\\0' "$@" > "$HOME/nohup.tmp"
mv "$HOME/nohup.tmp" "$HOME/nohup.bin"
""")
    yield home


_ARG = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\0"), max_size=12)


@settings(max_examples=10, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(extra=st.lists(_ARG.filter(lambda a: not a.startswith(("--config", "--workdir"))),
                      max_size=4))
def test_main_flags_reach_python_verbatim(extra, env, recording_home):
  """Any flags after `--` survive both quoting layers (printed command, worker shell)."""
  (ssh,) = _dry_run("run.sh", "my-tpu", "--zone", ZONE, "--config", "configs/npp_xl.py",
                    "--workdir", WORKDIR, "--", *extra, env=env)
  out = recording_home / "nohup.bin"
  out.unlink(missing_ok=True)
  (recording_home / "npp_jax_logs" / "run.pid").unlink(missing_ok=True)
  _sh(_remote_script(ssh), recording_home, path_prefix=recording_home / "bin")
  _wait_for(out)
  assert out.read_bytes().decode().split("\0")[:-1] == [
      "setsid", "python", "-m", "npp_jax.main", "--config=configs/npp_xl.py",
      f"--workdir={WORKDIR}", *extra]


# ----------------------------------------------------------------------------- setup_workers

FAKE_PY311 = """#!/usr/bin/env bash
# Fake interpreter: only `-m venv DIR`, making a venv whose python records cwd and argv.
[ "$1 $2" = "-m venv" ] || exit 9
mkdir -p "$3/bin"
printf '#!/usr/bin/env bash\\necho "$PWD|$*" >> "$HOME/python_calls.txt"\\n' > "$3/bin/python"
chmod +x "$3/bin/python"
ln -s python "$3/bin/python3.11"
echo "$3" >> "$HOME/venvs_created.txt"
"""


def _fake_tools(home):
  _write_exe(home / "bin" / "python3.11", FAKE_PY311)
  _write_exe(home / "bin" / "sudo", '#!/usr/bin/env bash\necho "sudo $*" >&2\nexit 1\n')
  return home / "bin"


def _git(repo, *args):
  subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t",
                  "-c", "init.defaultBranch=main", *args], check=True, capture_output=True)


def _checkout(path):
  """A tiny npp_jax-like git working tree: tracked, untracked and ignored files."""
  path.mkdir()
  _git(path, "init", "-q")
  (path / "setup.py").write_text("# v1\n")
  (path / ".gitignore").write_text("ignored.txt\n")
  (path / "ignored.txt").write_text("x")
  (path / "npp_jax").mkdir()
  (path / "npp_jax" / "main.py").write_text("")
  _git(path, "add", "setup.py", ".gitignore")
  return path


def test_setup_from_local_checkout(env, tmp_path):
  """The tarball holds the working tree minus ignored files; the worker script unpacks it over
  old sources, reuses the venv and pip-installs `.[tpu]` in the checkout; rerunning is safe."""
  src = _checkout(tmp_path / "src")
  copy = tmp_path / "scp_copy.tar.gz"
  args = ["my-tpu", "--zone", ZONE, "--local_src", str(src)]
  tar, scp, ssh = _dry_run("setup_workers.sh", *args, env=env)
  assert tar[:2] == ["tar_working_tree", str(src)]
  assert not pathlib.Path(tar[2]).exists()  # dry run: nothing written
  assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tar[2], "my-tpu:npp_jax_src.tar.gz",
                 f"--zone={ZONE}", "--worker=all"]
  assert ssh[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu", f"--zone={ZONE}",
                     "--worker=all"]

  p = _launch("setup_workers.sh", *args, env=dict(env, FAKE_GCLOUD_RC="0",
                                                  FAKE_GCLOUD_SCP_COPY=str(copy)))
  assert p.returncode == 0, p.stderr
  real_scp, real_ssh = env.calls()
  assert not pathlib.Path(real_scp[5]).exists()  # the local tarball is cleaned up
  assert _remote_script(real_ssh) == _remote_script(ssh)
  listing = subprocess.run(["tar", "-tzf", str(copy)], check=True, capture_output=True,
                           text=True).stdout.split()
  assert sorted(listing) == [".gitignore", "npp_jax/main.py", "setup.py"]

  home = tmp_path / "home"
  (home / "npp_jax").mkdir(parents=True)
  (home / "npp_jax" / "stale.py").write_text("")
  fake_bin = _fake_tools(home)
  for _ in range(2):
    shutil.copy(copy, home / "npp_jax_src.tar.gz")
    _sh(_remote_script(ssh), home, path_prefix=fake_bin)
  assert (home / "npp_jax" / "npp_jax" / "main.py").exists()
  assert not (home / "npp_jax" / "stale.py").exists()
  assert not (home / "npp_jax_src.tar.gz").exists()
  assert (home / "venvs_created.txt").read_text() == f"{home}/npp_jax_venv\n"
  install = [f"{home}/npp_jax|-m pip install -q --upgrade pip",
             f"{home}/npp_jax|-m pip install -q -e .[tpu]", f"{home}/npp_jax|-c import npp_jax"]
  assert (home / "python_calls.txt").read_text().splitlines() == install * 2


def test_setup_defaults_to_this_checkout(env):
  tar, scp, ssh = _dry_run("setup_workers.sh", "my-tpu", "--zone", ZONE, env=env)
  assert tar[:2] == ["tar_working_tree", str(REPO)] and scp[6] == "my-tpu:npp_jax_src.tar.gz"
  assert 'pip install -q -e ".[tpu]"' in _remote_script(ssh)


def test_setup_from_git(env, tmp_path):
  """--repo/--ref: clone once, then fetch and check out the requested ref on every rerun."""
  origin = _checkout(tmp_path / "origin")
  _git(origin, "commit", "-q", "-m", "v1")
  _git(origin, "tag", "v1")
  (origin / "setup.py").write_text("# v2\n")
  _git(origin, "commit", "-q", "-am", "v2")
  home = tmp_path / "home"
  home.mkdir()
  fake_bin = _fake_tools(home)
  url = f"file://{origin}"
  for ref_args, content in [(["--ref", "v1"], "# v1\n"), ([], "# v2\n"), (["--ref=v1"], "# v1\n")]:
    (ssh,) = _dry_run("setup_workers.sh", "my-tpu", "--zone", ZONE, "--repo", url, *ref_args,
                      env=env)
    assert "--worker=all" in ssh and f"git clone -q {url}" in _remote_script(ssh)
    _sh(_remote_script(ssh), home, path_prefix=fake_bin)
    assert (home / "npp_jax" / "setup.py").read_text() == content
  assert len((home / "venvs_created.txt").read_text().splitlines()) == 1


def test_setup_ref_uses_the_origin_of_this_checkout(env, tmp_path):
  copy = _checkout(tmp_path / "copy")
  shutil.copytree(LAUNCH, copy / "launch")
  p = _launch("setup_workers.sh", "--dry_run", "my-tpu", "--zone", ZONE, "--ref", "main", env=env,
              launch_dir=copy / "launch")
  assert p.returncode == 2 and "needs an 'origin' remote" in p.stderr
  _git(copy, "remote", "add", "origin", "https://example.com/npp_jax.git")
  (ssh,) = _dry_run("setup_workers.sh", "my-tpu", "--zone", ZONE, "--ref", "main", env=env,
                    launch_dir=copy / "launch")
  script = _remote_script(ssh)
  assert "git clone -q https://example.com/npp_jax.git" in script
  assert "git fetch -q origin main\n" in script
