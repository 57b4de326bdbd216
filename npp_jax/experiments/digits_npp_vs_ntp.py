"""The paper's claim in miniature: NPP against next-token prediction on the digits, per budget.

  python -m npp_jax.experiments.digits_npp_vs_ntp [--budgets=4,8,12] [--out=/tmp/npp_vs_ntp]

Owns the experiment: for every budget (epochs) it trains `configs/digits.py` (NPP, #L=2,
lambda=1/2) and `configs/digits.py:ntp` (#L=1) through `npp_jax.train.train_and_evaluate`, one
run after the other in this process, with the validation loss logged `--evals_per_run` times
during training. It reads those losses back from each run's TensorBoard event files (step and
wall time of every `eval_loss`), puts each point on two cost axes (wall-clock seconds since the
run started; analytic training FLOPs of the steps done, `flops.train_flops_per_image` per patch
size of the schedule's segments), and scores each finished model by how often a digit classifier
agrees with the class of `--samples_per_class` CFG samples per class (`digits.fit_digits_classifier`).

Writes to --out: `npp_vs_ntp.png` (validation loss and sample agreement against wall seconds and
against FLOPs), `npp_vs_ntp.md` (the table) and `npp_vs_ntp.json` (every run's curve and
figures, the table rows), plus each run's workdir under `runs/` and its samples grid
`runs/<run>/agreement_samples.png`. A run whose workdir holds `result.json` is reused (a run of
another config is refused); an unfinished one is refused (its wall clock would not be one run's).
"""
from __future__ import annotations

import ast
import json
import math
import resource
import time
from typing import Any, Sequence

from absl import app, flags, logging
from etils import epath
import ml_collections
import numpy as np

from configs import digits as digits_config

METHODS = ("npp", "ntp")  # configs/digits.py and configs/digits.py:ntp.
_LOSS_TOLERANCE = 0.01  # nats/token: "as good" for the validation loss.

# The default budgets: a third, two thirds and all of the demo's epochs (configs/digits.py).
DEMO_EPOCHS = digits_config.get_config().npp.epochs
_BUDGETS = flags.DEFINE_list("budgets", [str(round(DEMO_EPOCHS * k / 3)) for k in (1, 2, 3)],
                             "Training budgets in epochs (each trains NPP and NTP for that many "
                             "epochs; the default ends at the demo's).")
_OUT = flags.DEFINE_string("out", "/tmp/npp_vs_ntp", "Output directory (plot, table, runs).")
_EVALS = flags.DEFINE_integer("evals_per_run", 8, "Validation losses logged per run.", lower_bound=1)
_PER_CLASS = flags.DEFINE_integer("samples_per_class", 30, "CFG samples per class scored by the "
                                  "digit classifier.", lower_bound=1)
_SET = flags.DEFINE_multi_string("set", [], "KEY=VALUE config override for every run, e.g. "
                                 "--set=model.dim=256 (VALUE read as a Python literal).")
_NPP_SET = flags.DEFINE_multi_string("npp_set", [], "KEY=VALUE override for the NPP runs only, "
                                     "e.g. --npp_set=npp.segment_factor=0.25.")
_TUNE_MALLOC = flags.DEFINE_bool("tune_malloc", True, "On a CPU-only host, keep freed memory in "
                                 "one glibc malloc arena (npp_jax.malloc), as npp_jax.main does.")
_QUICK = flags.DEFINE_bool("quick", False, "A tiny check of the whole pipeline (1-layer width-32 "
                           "model, 2 steps per epoch, budgets 2,4; --budgets still wins if given).")


# ---------------------------------------------------------------------------------------------
# Configs and cost axes.
# ---------------------------------------------------------------------------------------------
def parse_overrides(items: Sequence[str], flag: str) -> dict[str, Any]:
  """["a.b=1", ...] -> {"a.b": 1}; values are Python literals, else strings."""
  out = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise ValueError(f"--{flag}={item!r} is not KEY=VALUE.")
    try:
      out[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key] = value
  return out


def _quick(c: ml_collections.ConfigDict) -> None:
  c.model.n_layer, c.model.n_head, c.model.dim = 1, 2, 32
  c.data.steps_per_epoch = 2
  c.ckpt.every_steps = 1000


def _set(c: ml_collections.ConfigDict, key: str, value: Any) -> None:
  """c.<key> = value for an existing key only (a typo must not train a run nobody asked for)."""
  *parents, leaf = key.split(".")
  node = c
  for name in parents:
    node = node.get(name) if isinstance(node, ml_collections.ConfigDict) else None
  if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
    raise ValueError(f"override config.{key}={value!r}: the config has no key config.{key}.")
  try:
    node[leaf] = value
  except (TypeError, ValueError) as e:
    raise ValueError(f"override config.{key}={value!r}: {e}") from None


def run_config(method: str, epochs: int, *, evals_per_run: int, quick: bool = False,
               overrides: dict[str, Any] | None = None) -> ml_collections.ConfigDict:
  """The digits config of `method` ("npp" or "ntp") trained for `epochs`, evaluating
  `evals_per_run` times (the last at the final step)."""
  if method not in METHODS:
    raise ValueError(f"method {method!r} is not one of {METHODS}")
  c = digits_config.get_config("ntp" if method == "ntp" else None)
  if quick:
    _quick(c)
  for key, value in (overrides or {}).items():
    _set(c, key, value)
  c.npp.epochs = epochs
  total = epochs * _steps_per_epoch(c)
  c.eval_every_steps = max(1, total // evals_per_run)
  return c


def _num_train_records() -> int:
  from npp_jax import digits
  _, _, is_val = digits.digit_tokens()
  return int((~is_val).sum())


def _steps_per_epoch(config: ml_collections.ConfigDict) -> int:
  from npp_jax import config_lib
  return config_lib.steps_per_epoch(config, _num_train_records())


def cumulative_flops(config: ml_collections.ConfigDict, steps: Sequence[int]) -> list[float]:
  """Analytic training FLOPs of the first `s` steps of the run, for each s in `steps`."""
  from npp_jax import config_lib, flops
  model_cfg = config_lib.model_config(config)
  schedule = config_lib.schedule(config, _num_train_records())
  per_step = {s.patch_size: config.global_batch_size * flops.train_flops_per_image(
      model_cfg, s.patch_size) for s in schedule.segments}
  return [float(sum(max(0, min(step, seg.end) - seg.start) * per_step[seg.patch_size]
                    for seg in schedule.segments)) for step in steps]


# ---------------------------------------------------------------------------------------------
# Reading a run back.
# ---------------------------------------------------------------------------------------------
def read_scalar(workdir: epath.PathLike, tag: str) -> list[tuple[int, float, float]]:
  """(step, wall_time, value) of every `tag` scalar in the workdir's TensorBoard event files,
  one per step (the last written wins), by step."""
  from tensorboard.backend.event_processing import event_file_loader
  from tensorboard.util import tensor_util
  files = sorted(epath.Path(workdir).glob("events.out.tfevents.*"))
  if not files:
    raise FileNotFoundError(f"no TensorBoard event files (events.out.tfevents.*) in {workdir}")
  points = {}
  for f in files:
    for event in event_file_loader.EventFileLoader(str(f)).Load():
      for v in event.summary.value:
        if v.tag == tag:
          value = (tensor_util.make_ndarray(v.tensor) if v.HasField("tensor") else v.simple_value)
          points[int(event.step)] = (int(event.step), float(event.wall_time), float(value))
  return [points[s] for s in sorted(points)]


def sample_agreement(config: ml_collections.ConfigDict, workdir: epath.Path,
                     per_class: int) -> tuple[float, np.ndarray]:
  """Agreement of the digit classifier with the class of `per_class` CFG samples of each digit
  (the run's final params, config.sample settings, one sampling seed for every run), and their
  grid."""
  import jax
  from npp_jax import digits, load, sample, sharding
  mesh = sharding.make_mesh(dict(config.mesh))
  model = load.load_model(str(workdir), config, mesh=mesh)
  decoder = sample.make_decoder("auto", model.cfg, mesh, builtin=config.data.builtin)
  images, labels = sample.sample_classes(
      model, mesh, config.sample.grid_classes, jax.random.key(config.seed + 1), decoder=decoder,
      per_class=per_class, **sample.options_from_config(config))
  grid = sample.class_grid(images, labels, ncols=per_class)
  return float(np.mean(digits.fit_digits_classifier()(images) == labels)), grid


def _as_json(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json_best_effort())


def _sampling(config: ml_collections.ConfigDict, per_class: int) -> dict:
  return dict(_as_json(config)["sample"], per_class=per_class)


def _score(config: ml_collections.ConfigDict, workdir: epath.Path, per_class: int) -> dict:
  """The sample agreement of a trained run, its grid written to agreement_samples.png."""
  from PIL import Image
  agreement, grid = sample_agreement(config, workdir, per_class)
  with (workdir / "agreement_samples.png").open("wb") as f:
    Image.fromarray(grid).save(f, format="PNG")
  return {"sample_agreement": agreement, "samples": 10 * per_class,
          "sampling": _sampling(config, per_class)}


def train_run(config: ml_collections.ConfigDict, workdir: epath.Path, per_class: int) -> dict:
  """Trains one run and returns its measured figures. A run with a result.json is reused (and
  only rescored when the sampling settings or sample count differ)."""
  from npp_jax import train
  result_file = workdir / "result.json"
  if result_file.exists():
    result = json.loads(result_file.read_text())
    trained = {k: v for k, v in _as_json(config).items() if k != "sample"}
    if result["config"] != trained:
      changed = sorted(k for k in set(trained) | set(result["config"])
                       if trained.get(k) != result["config"].get(k))
      raise ValueError(f"{workdir} holds a run of another config (differs in {changed}): use "
                       f"another --out, or delete the run to train it again.")
    if result["sampling"] != _sampling(config, per_class):  # rescore the trained model only.
      logging.info("Rescoring %s with %s.", workdir, _sampling(config, per_class))
      result.update(_score(config, workdir, per_class))
      result_file.write_text(json.dumps(result, indent=2))
    return result
  if workdir.exists() and any(workdir.iterdir()):
    raise ValueError(f"{workdir} holds an unfinished run (no result.json): its wall clock would "
                     f"not be one run's. Delete it (or pick another --out) to train it again.")
  workdir.mkdir(parents=True, exist_ok=True)
  start_usage = resource.getrusage(resource.RUSAGE_SELF)
  t0 = time.time()
  summary = train.train_and_evaluate(config, str(workdir))
  wall = time.time() - t0
  usage = resource.getrusage(resource.RUSAGE_SELF)
  cpu = (usage.ru_utime - start_usage.ru_utime) + (usage.ru_stime - start_usage.ru_stime)
  curve = read_scalar(workdir, "eval_loss")
  if not curve or curve[-1][0] != summary["step"]:
    raise ValueError(f"{workdir}: the event files hold no eval_loss at the final step "
                     f"{summary['step']} (found steps {[s for s, _, _ in curve]}).")
  steps = [s for s, _, _ in curve]
  result = {
      "epochs": int(config.npp.epochs), "num_levels": int(config.npp.num_levels),
      "steps": steps, "eval_loss": [v for _, _, v in curve],
      "wall_s": [t - t0 for _, t, _ in curve], "flops": cumulative_flops(config, steps),
      "final_eval_loss": curve[-1][2], "train_wall_s": curve[-1][1] - t0,
      "run_wall_s": wall, "run_cpu_s": cpu, "training_cost": summary["training_cost"],
      **_score(config, workdir, per_class),
      "config": {k: v for k, v in _as_json(config).items() if k != "sample"},
  }
  result_file.write_text(json.dumps(result, indent=2))
  return result


# ---------------------------------------------------------------------------------------------
# The comparison.
# ---------------------------------------------------------------------------------------------
def _agreement_tolerance(a: float, b: float, n: int) -> float:
  """Two standard errors of the difference of two agreements measured on n samples each."""
  return 2.0 * math.sqrt((a * (1 - a) + b * (1 - b)) / n)


def compare(results: dict[str, dict[int, dict]]) -> list[dict]:
  """One row per budget: both methods' figures, NPP/NTP cost ratios, whether NPP is as good
  (validation loss within _LOSS_TOLERANCE and agreement within two standard errors, or better),
  and the fewest FLOPs at which any NPP evaluation reached that budget's NTP loss."""
  npp_points = [(f, l) for r in results["npp"].values()
                for f, l in zip(r["flops"], r["eval_loss"])]
  rows = []
  for epochs in sorted(results["npp"]):
    a, b = results["npp"][epochs], results["ntp"][epochs]
    tol = _agreement_tolerance(a["sample_agreement"], b["sample_agreement"], a["samples"])
    as_good = (a["final_eval_loss"] <= b["final_eval_loss"] + _LOSS_TOLERANCE
               and a["sample_agreement"] >= b["sample_agreement"] - tol)
    reach = [f for f, l in npp_points if l <= b["final_eval_loss"]]
    rows.append({
        "epochs": epochs,
        "npp_eval_loss": a["final_eval_loss"], "ntp_eval_loss": b["final_eval_loss"],
        "npp_agreement": a["sample_agreement"], "ntp_agreement": b["sample_agreement"],
        "npp_train_wall_s": a["train_wall_s"], "ntp_train_wall_s": b["train_wall_s"],
        "npp_cpu_s": a["run_cpu_s"], "ntp_cpu_s": b["run_cpu_s"],
        "npp_flops": a["flops"][-1], "ntp_flops": b["flops"][-1],
        "flops_ratio": a["flops"][-1] / b["flops"][-1],
        "wall_ratio": a["train_wall_s"] / b["train_wall_s"],
        "npp_as_good": bool(as_good),
        "claim_holds": bool(as_good and a["flops"][-1] / b["flops"][-1] <= 0.65),
        "npp_flops_to_reach_ntp_loss": min(reach) / b["flops"][-1] if reach else None,
    })
  return rows


def table_markdown(rows: list[dict]) -> str:
  lines = [
      "| epochs | val loss NPP / NTP | agreement NPP / NTP | train wall s NPP / NTP (ratio) "
      "| run CPU s NPP / NTP (ratio) | TFLOPs NPP / NTP (ratio) | NPP as good "
      "| claim (as good at ≤ 0.65×) | NPP FLOPs to reach NTP's loss |",
      "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    reach = (f"{r['npp_flops_to_reach_ntp_loss']:.2f}×"
             if r["npp_flops_to_reach_ntp_loss"] is not None else "not reached")
    lines.append(
        f"| {r['epochs']} | {r['npp_eval_loss']:.3f} / {r['ntp_eval_loss']:.3f} "
        f"| {r['npp_agreement']:.0%} / {r['ntp_agreement']:.0%} "
        f"| {r['npp_train_wall_s']:.0f} / {r['ntp_train_wall_s']:.0f} ({r['wall_ratio']:.2f}) "
        f"| {r['npp_cpu_s']:.0f} / {r['ntp_cpu_s']:.0f} ({r['npp_cpu_s'] / r['ntp_cpu_s']:.2f}) "
        f"| {r['npp_flops'] / 1e12:.1f} / {r['ntp_flops'] / 1e12:.1f} ({r['flops_ratio']:.3f}) "
        f"| {'yes' if r['npp_as_good'] else 'no'} | {'yes' if r['claim_holds'] else 'no'} "
        f"| {reach} |")
  return "\n".join(lines) + "\n"


def plot(results: dict[str, dict[int, dict]], path: epath.Path, note: str = "") -> None:
  """2x2: validation loss curves and final sample agreement, against wall seconds and FLOPs;
  `note` (e.g. the config overrides) goes under the title."""
  try:
    import matplotlib
  except ImportError as e:
    raise ImportError("the plot needs matplotlib: pip install -e '.[experiments]'") from e
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex="col")
  colours = {"npp": "tab:blue", "ntp": "tab:orange"}
  budgets = sorted(results["npp"])
  for method, runs in results.items():
    ends_wall, ends_flops, agree = [], [], []
    for i, epochs in enumerate(budgets):
      r = runs[epochs]
      style = dict(color=colours[method], alpha=0.4 + 0.6 * (i + 1) / len(budgets), marker=".")
      label = f"{method.upper()} {epochs} ep"
      axes[0, 0].plot(r["wall_s"], r["eval_loss"], label=label, **style)
      axes[0, 1].plot(np.asarray(r["flops"]) / 1e12, r["eval_loss"], label=label, **style)
      ends_wall.append(r["train_wall_s"])
      ends_flops.append(r["flops"][-1] / 1e12)
      agree.append(100 * r["sample_agreement"])
    for ax, xs in ((axes[1, 0], ends_wall), (axes[1, 1], ends_flops)):
      ax.plot(xs, agree, color=colours[method], marker="o", label=method.upper())
      for x, y, epochs in zip(xs, agree, budgets):
        ax.annotate(f"{epochs} ep", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=8)
  axes[0, 0].set_ylabel("validation loss (nats/token)")
  axes[1, 0].set_ylabel("classifier agreement of CFG samples (%)")
  axes[1, 0].set_xlabel("wall-clock seconds since the run started")
  axes[1, 1].set_xlabel("training TFLOPs (analytic)")
  for ax in axes.ravel():
    ax.grid(alpha=0.3)
  for ax in axes[1]:
    ax.set_ylim(0, 100)
    ax.axhline(100 / 10, color="grey", linestyle=":", label="chance")
  axes[0, 1].legend(fontsize=8, ncol=2)
  axes[1, 1].legend(fontsize=8)
  fig.suptitle("Digits: next-patch (NPP, #L=2, λ=1/2) vs next-token prediction (NTP), "
               "same epochs" + (f"\n{note}" if note else ""))
  fig.tight_layout()
  with path.open("wb") as f:
    fig.savefig(f, format="png", dpi=110)
  plt.close(fig)


def run(budgets: Sequence[int], out: epath.PathLike, *, evals_per_run: int = 8,
        samples_per_class: int = 30, quick: bool = False, overrides: dict | None = None,
        npp_overrides: dict | None = None) -> dict:
  """Trains every (method, budget), writes the plot, table and JSON; returns the JSON's dict."""
  budgets = sorted({int(b) for b in budgets})
  if len(budgets) < 1 or budgets[0] < 2:
    raise ValueError(f"--budgets={budgets}: give at least one budget, each >= 2 epochs (NPP's "
                     f"#L=2 schedule needs a whole epoch per level).")
  out = epath.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  results: dict[str, dict[int, dict]] = {m: {} for m in METHODS}
  for epochs in budgets:
    for method in METHODS:
      both = dict(overrides or {}, **((npp_overrides or {}) if method == "npp" else {}))
      config = run_config(method, epochs, evals_per_run=evals_per_run, quick=quick,
                          overrides=both)
      r = train_run(config, out / "runs" / f"{method}_e{epochs}", samples_per_class)
      results[method][epochs] = r
      print(f"{method.upper()} {epochs} epochs: val loss {r['final_eval_loss']:.4f}, agreement "
            f"{r['sample_agreement']:.0%}, train wall {r['train_wall_s']:.0f} s, run CPU "
            f"{r['run_cpu_s']:.0f} s, {r['flops'][-1] / 1e12:.2f} TFLOPs", flush=True)
  rows = compare(results)
  note = ", ".join(f"{k}={v}" for k, v in {**(overrides or {}), **{
      f"{k} (NPP)": v for k, v in (npp_overrides or {}).items()}}.items())
  plot(results, out / "npp_vs_ntp.png", note)
  (out / "npp_vs_ntp.md").write_text(table_markdown(rows))
  report = {"budgets": budgets, "overrides": overrides or {}, "npp_overrides": npp_overrides or {},
            "quick": quick, "rows": rows,
            "runs": {m: {str(e): r for e, r in runs.items()} for m, runs in results.items()}}
  (out / "npp_vs_ntp.json").write_text(json.dumps(report, indent=2))
  return report


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from npp_jax import logs, malloc
  logs.quiet_library_logs()
  if _TUNE_MALLOC.value and malloc.cpu_only():
    malloc.tune_malloc()  # before JAX starts its CPU client's threads.
  budgets = _BUDGETS.value
  if _QUICK.value and not flags.FLAGS["budgets"].present:
    budgets = ["2", "4"]
  try:
    budgets = [int(b) for b in budgets]
  except ValueError:
    raise app.UsageError(f"--budgets={','.join(budgets)} must be integers (epochs).") from None
  run(budgets, _OUT.value, evals_per_run=_EVALS.value,
      samples_per_class=2 if _QUICK.value and not flags.FLAGS["samples_per_class"].present
      else _PER_CLASS.value, quick=_QUICK.value,
      overrides=parse_overrides(_SET.value, "set"),
      npp_overrides=parse_overrides(_NPP_SET.value, "npp_set"))
  out = epath.Path(_OUT.value)
  print((out / "npp_vs_ntp.md").read_text())
  print(f"plot: {out / 'npp_vs_ntp.png'}\ntable: {out / 'npp_vs_ntp.md'}\n"
        f"json: {out / 'npp_vs_ntp.json'}")


if __name__ == "__main__":
  app.run(main)
